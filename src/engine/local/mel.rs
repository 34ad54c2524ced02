//! Whisper's log-mel features, computed exactly as its reference extractor
//! does: a centred STFT (reflect padding, periodic Hann window of 400,
//! hop 160), power through 80 Slaney mel filters, log10 floored at 1e-10,
//! clamped to 8 below the maximum of the *whole* window, then `(x + 4) / 4`.
//!
//! Speech recognition pads the audio with silence to Whisper's 30 s window
//! before the STFT, so the padding gets the value real silence gets; the
//! turn-end model takes the last 8 s, normalised, the same way.

use std::sync::{Arc, OnceLock};

use realfft::{RealFftPlanner, RealToComplex};

pub(super) const N_MELS: usize = 80;
const N_FFT: usize = 400;
const HOP: usize = 160;
const BINS: usize = N_FFT / 2 + 1;
const SAMPLE_RATE: f64 = crate::audio::ENGINE_RATE_HZ as f64;
/// log10 of the power floor.
const FLOOR_LOG: f32 = -10.0;

/// One mel filter: its first FFT bin and its weights from there.
#[derive(Debug)]
struct Filter {
    start: usize,
    weights: Vec<f32>,
}

/// The filters, the window and the FFT plan, made once.
struct Extractor {
    filters: Vec<Filter>,
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

fn extractor() -> &'static Extractor {
    static EXTRACTOR: OnceLock<Extractor> = OnceLock::new();
    EXTRACTOR.get_or_init(|| Extractor {
        filters: slaney_filters(),
        window: (0..N_FFT)
            .map(|n| {
                let phase = 2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64;
                (0.5 - 0.5 * phase.cos()) as f32
            })
            .collect(),
        fft: RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT),
    })
}

/// What lies past the end of the signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tail {
    /// Silence (speech recognition: the audio is padded to 30 s first).
    Silence,
    /// The signal reflected (the signal already fills the window).
    Reflect,
}

/// Log-mel features of `signal` (samples in −1..1 at 16 kHz): `frames`
/// frames, row-major `[80][frames]`, normalised over the whole window.
pub(super) fn log_mel(signal: &[f32], frames: usize, tail: Tail) -> Vec<f32> {
    let ex = extractor();
    let mut out = vec![FLOOR_LOG; N_MELS * frames];
    let mut frame = ex.fft.make_input_vec();
    let mut spectrum = ex.fft.make_output_vec();
    let mut scratch = ex.fft.make_scratch_vec();
    let mut power = [0f32; BINS];
    let len = signal.len() as isize;
    let sample = |i: isize| -> f32 {
        let i = if i < 0 { -i } else { i };
        if i < len {
            signal[i as usize]
        } else {
            match tail {
                Tail::Silence => 0.0,
                Tail::Reflect => {
                    let j = 2 * (len - 1) - i;
                    if j >= 0 { signal[j as usize] } else { 0.0 }
                }
            }
        }
    };
    let half = (N_FFT / 2) as isize;
    for t in 0..frames {
        let start = (t * HOP) as isize - half;
        if tail == Tail::Silence && start >= len {
            // Only silence from here on: every frame stays at the floor.
            break;
        }
        for (n, slot) in frame.iter_mut().enumerate() {
            *slot = sample(start + n as isize) * ex.window[n];
        }
        if ex
            .fft
            .process_with_scratch(&mut frame, &mut spectrum, &mut scratch)
            .is_err()
        {
            continue;
        }
        for (p, c) in power.iter_mut().zip(&spectrum) {
            *p = c.norm_sqr();
        }
        for (m, filter) in ex.filters.iter().enumerate() {
            let energy: f32 = filter
                .weights
                .iter()
                .zip(&power[filter.start..])
                .map(|(w, p)| w * p)
                .sum();
            out[m * frames + t] = energy.max(1e-10).log10();
        }
    }
    let floor = out.iter().copied().fold(f32::NEG_INFINITY, f32::max) - 8.0;
    for v in &mut out {
        *v = (v.max(floor) + 4.0) / 4.0;
    }
    out
}

/// Whisper's window: 30 s.
pub(super) const WINDOW_FRAMES: usize = 3000;

/// Features for speech recognition: 16-bit PCM as Whisper's reference
/// transcribes it, padded with silence to `frames` (its window is 3,000).
pub(super) fn whisper_features(pcm: &[i16], frames: usize) -> Vec<f32> {
    let audio: Vec<f32> = pcm
        .iter()
        .take(frames * HOP)
        .map(|&s| f32::from(s) / 32768.0)
        .collect();
    log_mel(&audio, frames, Tail::Silence)
}

/// Frames holding `samples` of audio.
pub(super) fn frames_for(samples: usize) -> usize {
    samples.div_ceil(HOP)
}

fn hz_to_mel(hz: f64) -> f64 {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    let log_step = 6.4f64.ln() / 27.0;
    if hz >= MIN_LOG_HZ {
        MIN_LOG_HZ / F_SP + (hz / MIN_LOG_HZ).ln() / log_step
    } else {
        hz / F_SP
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    let min_log_mel = MIN_LOG_HZ / F_SP;
    let log_step = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        MIN_LOG_HZ * (log_step * (mel - min_log_mel)).exp()
    } else {
        mel * F_SP
    }
}

/// The Slaney-scale, area-normalised filters over 0–8 kHz that Whisper's
/// reference ships (librosa's defaults).
fn slaney_filters() -> Vec<Filter> {
    let top = hz_to_mel(SAMPLE_RATE / 2.0);
    let points: Vec<f64> = (0..N_MELS + 2)
        .map(|i| mel_to_hz(top * i as f64 / (N_MELS + 1) as f64))
        .collect();
    (0..N_MELS)
        .map(|m| {
            let (lo, mid, hi) = (points[m], points[m + 1], points[m + 2]);
            let norm = 2.0 / (hi - lo);
            let weights: Vec<(usize, f32)> = (0..BINS)
                .filter_map(|k| {
                    let f = k as f64 * SAMPLE_RATE / N_FFT as f64;
                    let rising = (f - lo) / (mid - lo);
                    let falling = (hi - f) / (hi - mid);
                    let w = rising.min(falling).max(0.0) * norm;
                    (w > 0.0).then_some((k, w as f32))
                })
                .collect();
            let start = weights.first().map_or(0, |&(k, _)| k);
            let end = weights.last().map_or(0, |&(k, _)| k + 1);
            let mut dense = vec![0f32; end.saturating_sub(start)];
            for (k, w) in weights {
                dense[k - start] = w;
            }
            Filter {
                start,
                weights: dense,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference extractor's features of the fixture's first 600 frames
    /// (`scripts/reference/whisper_mel.py`).
    const REFERENCE: &[u8] = include_bytes!("testdata/espeak_es_mel.f32");

    #[test]
    fn matches_the_reference_extractor() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/espeak_es_16k.wav"
        );
        let wav = crate::audio::wav::read(std::path::Path::new(path)).unwrap();
        assert_eq!((wav.rate_hz, wav.channels), (16_000, 1));
        let ours = whisper_features(&wav.samples, WINDOW_FRAMES);
        let kept = REFERENCE.len() / 4 / N_MELS;
        let reference: Vec<f32> = REFERENCE
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut worst = (0f32, 0, 0);
        for m in 0..N_MELS {
            for t in 0..kept {
                let d = (ours[m * 3000 + t] - reference[m * kept + t]).abs();
                if d > worst.0 {
                    worst = (d, m, t);
                }
            }
        }
        assert!(worst.0 < 2e-3, "largest difference {worst:?}");
        // Past the audio, every frame holds the value silence gets after the
        // window's clamp (not 0.0).
        let padding = reference[kept - 1];
        assert!((padding - -0.756_828).abs() < 1e-4, "{padding}");
        for m in 0..N_MELS {
            for t in kept..3000 {
                assert!((ours[m * 3000 + t] - padding).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn silence_is_flat() {
        let features = whisper_features(&[0; 16_000], WINDOW_FRAMES);
        assert_eq!(features.len(), N_MELS * 3000);
        assert!(features.iter().all(|&v| v == (-10.0 + 4.0) / 4.0));
    }

    #[test]
    fn filters_cover_the_band_once() {
        let filters = slaney_filters();
        assert_eq!(filters.len(), N_MELS);
        // Each filter's peak sits between its neighbours'.
        let peaks: Vec<usize> = filters
            .iter()
            .map(|f| {
                let (i, _) = f
                    .weights
                    .iter()
                    .enumerate()
                    .fold((0, 0f32), |a, (i, &w)| if w > a.1 { (i, w) } else { a });
                f.start + i
            })
            .collect();
        assert!(peaks.windows(2).all(|p| p[0] <= p[1]), "{peaks:?}");
        assert!(filters.iter().all(|f| !f.weights.is_empty()));
    }
}
