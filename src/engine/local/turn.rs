//! The turn-end model: Smart Turn v3.2 hears the last 8 s of the user's
//! speech and says how likely it is that the user has finished, from how the
//! speech ends (intonation, a word left hanging) rather than from silence.
//!
//! It runs through ONNX Runtime, loaded at run time from the library file
//! `scripts/install-turn-model` installs, never from a search path. Its
//! input is what pipecat, the model's publisher, computes: 16 kHz audio, the
//! last 8 s (shorter audio zero-padded at the front), normalised to zero
//! mean and unit variance, then Whisper's log-mel features (80 × 800).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use tokio::task::JoinHandle;

use super::mel::{self, N_MELS, Tail};

/// The model's window: 8 s at 16 kHz.
pub(super) const WINDOW_SAMPLES: usize = 8 * crate::audio::ENGINE_RATE_HZ as usize;
/// Feature frames in the window (hop 160; the 801st frame is dropped).
const FRAMES: usize = 800;
const INPUT: &str = "input_features";
const OUTPUT: &str = "logits";
/// Added to the variance before the square root, as the reference does.
const VARIANCE_EPSILON: f64 = 1e-7;

/// Where the turn-end model comes from, and when it ends a turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnSettings {
    /// The Smart Turn v3 ONNX model.
    pub model: PathBuf,
    /// The ONNX Runtime shared library.
    pub library: PathBuf,
    /// Probability above which the user has finished.
    pub threshold: f32,
}

impl TurnSettings {
    /// Loads the model and judges a second of silence with it, returning
    /// how long that took (blocking; what `sonora doctor` reports).
    pub fn check(&self) -> Result<Duration, String> {
        let detector = TurnDetector::load(&self.model, &self.library)?;
        let started = Instant::now();
        detector.end_probability(&[0; crate::audio::ENGINE_RATE_HZ as usize])?;
        Ok(started.elapsed())
    }
}

/// The loaded model, shared by every conversation of an engine.
pub(super) struct TurnDetector {
    /// One run at a time: each takes one core for about 100 ms.
    session: Mutex<Session>,
    /// The turn to run, taken before a blocking thread is used (see [`judge`]).
    gate: Arc<tokio::sync::Semaphore>,
    model: PathBuf,
}

impl fmt::Debug for TurnDetector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurnDetector")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// ONNX Runtime, once per process: the library stays loaded and its
/// environment alive (the runtime allows only one per process).
struct Runtime {
    library: PathBuf,
    /// None while the library is loaded but its environment failed to start.
    environment: Option<Environment>,
}

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

/// Loads ONNX Runtime from `library`, or checks that the copy already loaded
/// in this process is that file.
fn runtime(library: &Path) -> Result<Environment, String> {
    let library = std::fs::canonicalize(library).map_err(|e| {
        format!(
            "ONNX Runtime library {}: {e} (scripts/install-turn-model installs it)",
            library.display()
        )
    })?;
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    let loaded = match slot.as_mut() {
        Some(loaded) if loaded.library != library => {
            return Err(format!(
                "ONNX Runtime is already loaded from {} in this process; {} cannot be loaded beside it",
                loaded.library.display(),
                library.display()
            ));
        }
        Some(loaded) => loaded,
        None => {
            // A library that fails to load leaves nothing behind: a later
            // call may try again, with this file or another.
            let _ =
                ort::init_from(&library).map_err(|e| format!("cannot load ONNX Runtime: {e}"))?;
            slot.insert(Runtime {
                library,
                environment: None,
            })
        }
    };
    if let Some(environment) = &loaded.environment {
        return Ok(environment.clone());
    }
    let environment = ort::init().with_name("sonora").build().map_err(|e| {
        format!(
            "cannot start ONNX Runtime from {}: {e}",
            loaded.library.display()
        )
    })?;
    loaded.environment = Some(environment.clone());
    Ok(environment)
}

impl TurnDetector {
    /// Loads the model from `model` with ONNX Runtime from `library`
    /// (blocking: at start-up, or on the blocking pool).
    pub(super) fn load(model: &Path, library: &Path) -> Result<Self, String> {
        if !model.is_file() {
            return Err(format!(
                "turn-end model {}: no such file (scripts/install-turn-model installs it)",
                model.display()
            ));
        }
        let environment = runtime(library)?;
        let session = build_session(&environment, model)
            .map_err(|e| format!("turn-end model {}: {e}", model.display()))?;
        check_signature(&session).map_err(|e| {
            format!(
                "turn-end model {}: {e}: not a Smart Turn v3 model",
                model.display()
            )
        })?;
        Ok(Self {
            session: Mutex::new(session),
            gate: Arc::new(tokio::sync::Semaphore::new(1)),
            model: model.to_path_buf(),
        })
    }

    /// How likely it is that the user has finished speaking, from 0 to 1,
    /// judging the end of `pcm` (16 kHz mono; only its last 8 s count).
    /// Blocking for about 100 ms: run it on the blocking pool.
    pub(super) fn end_probability(&self, pcm: &[i16]) -> Result<f32, String> {
        if pcm.is_empty() {
            return Err("no audio to judge the end of".to_owned());
        }
        let features = features(pcm);
        let input = Tensor::from_array(([1usize, N_MELS, FRAMES], features))
            .map_err(|e| format!("turn-end model input: {e}"))?;
        // A run that panicked left the session as it was: keep using it.
        let mut session = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        let outputs = session
            .run(ort::inputs![INPUT => input])
            .map_err(|e| format!("turn-end model: {e}"))?;
        let output = outputs
            .get(OUTPUT)
            .ok_or_else(|| format!("turn-end model: no {OUTPUT:?} output"))?;
        let (_, values) = output
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("turn-end model output: {e}"))?;
        match values.first() {
            Some(&p) if (0.0..=1.0).contains(&p) => Ok(p),
            other => Err(format!("turn-end model: {other:?} is not a probability")),
        }
    }
}

/// A pause being judged: the generation it was reported in, and the job
/// (`Ok(None)`: skipped, the pause went stale before its turn).
pub(super) type TurnCheck = (u64, JoinHandle<Result<Option<f32>, String>>);

/// Judges the end of `pcm` on the blocking pool, one run at a time per
/// engine ([`super::gate::run`]); a job whose pause went stale (`current`
/// moved past `generation`) while it waited is skipped.
pub(super) fn judge(
    detector: &Arc<TurnDetector>,
    pcm: Vec<i16>,
    current: &Arc<AtomicU64>,
    generation: u64,
) -> TurnCheck {
    let detector = Arc::clone(detector);
    let current = Arc::clone(current);
    let job = tokio::spawn(async move {
        let gate = Arc::clone(&detector.gate);
        super::gate::run(
            &gate,
            Some((current, generation)),
            "the turn-end model",
            move || detector.end_probability(&pcm),
        )
        .await
    });
    (generation, job)
}

/// Resolves with the verdict and the pause it judged; pends forever when
/// nothing is being judged.
pub(super) async fn verdict(check: &mut Option<TurnCheck>) -> (u64, Result<Option<f32>, String>) {
    let Some((generation, job)) = check.as_mut() else {
        return std::future::pending().await;
    };
    let verdict = match job.await {
        Ok(verdict) => verdict,
        Err(e) => Err(format!("turn-end model stopped: {e}")),
    };
    let generation = *generation;
    *check = None;
    (generation, verdict)
}

/// Drops the pause being judged, if any: it went stale.
pub(super) fn cancel(check: &mut Option<TurnCheck>) {
    if let Some((_, job)) = check.take() {
        job.abort();
    }
}

fn build_session(environment: &Environment, model: &Path) -> ort::Result<Session> {
    Session::builder(environment)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        // The engine runs several things at once: one core for this.
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .commit_from_file(model)
}

/// The model takes float features [batch, 80, 800] and gives [batch, 1].
fn check_signature(session: &Session) -> Result<(), String> {
    let shape = |outlets: &[ort::value::Outlet], name: &str| -> Result<Vec<i64>, String> {
        let outlet = outlets
            .iter()
            .find(|o| o.name() == name)
            .ok_or_else(|| format!("no {name:?} tensor"))?;
        match (outlet.dtype().tensor_type(), outlet.dtype().tensor_shape()) {
            (Some(ort::value::TensorElementType::Float32), Some(shape)) => Ok(shape.to_vec()),
            _ => Err(format!("{name:?} is not a float tensor")),
        }
    };
    let input = shape(session.inputs(), INPUT)?;
    let output = shape(session.outputs(), OUTPUT)?;
    if input.len() != 3 || input[1..] != [N_MELS as i64, FRAMES as i64] {
        return Err(format!("{INPUT:?} has shape {input:?}"));
    }
    if output.len() != 2 || output[1] != 1 {
        return Err(format!("{OUTPUT:?} has shape {output:?}"));
    }
    Ok(())
}

/// The model's input for `pcm`: row-major [80][800].
fn features(pcm: &[i16]) -> Vec<f32> {
    let kept = &pcm[pcm.len().saturating_sub(WINDOW_SAMPLES)..];
    let mut signal = vec![0f32; WINDOW_SAMPLES];
    let start = WINDOW_SAMPLES - kept.len();
    for (slot, &s) in signal[start..].iter_mut().zip(kept) {
        *slot = f32::from(s) / 32768.0;
    }
    normalise(&mut signal);
    // The window is full, so frames past its end see the reflected signal.
    mel::log_mel(&signal, FRAMES, Tail::Reflect)
}

/// Zero mean, unit variance over the whole window, padding included.
fn normalise(signal: &mut [f32]) {
    let n = signal.len() as f64;
    let mean = signal.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let variance = signal
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let scale = 1.0 / (variance + VARIANCE_EPSILON).sqrt();
    for x in signal {
        *x = ((f64::from(*x) - mean) * scale) as f32;
    }
}

#[cfg(test)]
mod tests;
