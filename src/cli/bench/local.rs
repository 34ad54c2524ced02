//! `sonora bench local`: Spanish questions through the local engine, with
//! early recognition (the default) against a plain cascade that starts
//! recognising only after the end-of-speech hangover, in one run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use tokio::sync::mpsc;

use crate::audio::ENGINE_RATE_HZ;
use crate::cli::Failure;
use crate::config::Config;
use crate::engine::local::{LocalEngine, LocalSettings};
use crate::engine::{ConversationOptions, Engine, EngineEvent, EngineInput, Role, Stage};
use crate::tts;

/// Questions about the example knowledge base, 2–6 s when spoken.
const QUESTIONS: [&str; 8] = [
    "¿Cómo me matriculo en un curso?",
    "¿Cuál es el horario de la biblioteca?",
    "¿Cómo puedo renovar un libro prestado?",
    "Olvidé la contraseña del portal del estudiante, ¿qué hago?",
    "¿Dónde pido una constancia de estudios?",
    "¿Qué becas puedo solicitar?",
    "¿Cómo obtengo el carné de estudiante?",
    "¿Qué documentos necesito para la matrícula?",
];

#[derive(Debug, Args)]
pub(crate) struct LocalBenchArgs {
    /// How many questions to ask (cycling through the built-in list).
    #[arg(long, default_value_t = 8)]
    questions: usize,
    /// Write the generated question WAVs here (for inspection).
    #[arg(long)]
    keep_audio: Option<PathBuf>,
}

#[derive(Debug, Default, Clone)]
struct TurnTiming {
    latency_ms: f64,
    transcript: String,
}

pub(crate) fn run(config: &Config, args: &LocalBenchArgs) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(bench(config, args)).map_err(Failure::from)
}

async fn bench(config: &Config, args: &LocalBenchArgs) -> anyhow::Result<()> {
    let settings = LocalSettings::from_config(&config.local);
    let mut questions = Vec::new();
    for i in 0..args.questions.max(1) {
        let text = QUESTIONS[i % QUESTIONS.len()];
        let audio = spoken_question(&settings.tts.program, text, i as u64).await?;
        if let Some(dir) = &args.keep_audio {
            std::fs::create_dir_all(dir)?;
            crate::audio::wav::write_mono(&dir.join(format!("q{i}.wav")), ENGINE_RATE_HZ, &audio)
                .map_err(|e| anyhow!(e))?;
        }
        questions.push((text, audio));
    }
    let load_started = Instant::now();
    let early = LocalEngine::load(&settings).map_err(|e| anyhow!(e))?;
    let load_ms = load_started.elapsed().as_secs_f64() * 1000.0;
    let mut cascade_settings = settings.clone();
    cascade_settings.vad.pause_ms = cascade_settings.vad.hangover_ms + 1;
    let cascade = LocalEngine::load(&cascade_settings).map_err(|e| anyhow!(e))?;

    // Component timings on the same audio.
    let mut asr_ms = Vec::new();
    let mut tts_first_ms = Vec::new();
    let mut tts_total_ms = Vec::new();
    for (text, audio) in &questions {
        let started = Instant::now();
        let heard = early
            .transcribe(audio, &config.engine.language)
            .await
            .map_err(|e| anyhow!(e))?;
        asr_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let _ = heard;
        let (first, total) = time_tts(&settings.tts, text).await?;
        tts_first_ms.push(first);
        tts_total_ms.push(total);
    }

    let mut early_turns = Vec::new();
    let mut cascade_turns = Vec::new();
    for (i, (_, audio)) in questions.iter().enumerate() {
        // Alternate the order so neither mode always runs on a warm cache.
        let (first, second) = if i % 2 == 0 {
            (&early, &cascade)
        } else {
            (&cascade, &early)
        };
        let a = one_turn(first, config, audio).await?;
        let b = one_turn(second, config, audio).await?;
        let (e, c) = if i % 2 == 0 { (a, b) } else { (b, a) };
        eprintln!(
            "q{i}: early {:.0} ms, cascade {:.0} ms, heard {:?}",
            e.latency_ms, c.latency_ms, e.transcript
        );
        early_turns.push(e);
        cascade_turns.push(c);
    }
    let mut early_latency: Vec<f64> = early_turns.iter().map(|t| t.latency_ms).collect();
    let mut cascade_latency: Vec<f64> = cascade_turns.iter().map(|t| t.latency_ms).collect();
    let peak_rss = peak_rss_bytes();
    let rows = [
        (
            "end of speech → first reply audio (early recognition)",
            pct(&mut early_latency),
        ),
        (
            "end of speech → first reply audio (plain cascade)",
            pct(&mut cascade_latency),
        ),
        ("speech recognition", pct(&mut asr_ms)),
        ("synthesis, first audio", pct(&mut tts_first_ms)),
        ("synthesis, whole reply", pct(&mut tts_total_ms)),
    ];
    println!("{:<58} {:>9} {:>9}", "measure (ms)", "p50", "p90");
    for (name, (p50, p90)) in rows {
        println!("{name:<58} {p50:>9.0} {p90:>9.0}");
    }
    let (early_p50, early_p90) = rows[0].1;
    let (cascade_p50, _) = rows[1].1;
    println!(
        "questions {}   model load {load_ms:.0} ms   peak RSS {:.0} MB   cascade/early p50 {:.2}x",
        questions.len(),
        peak_rss as f64 / 1e6,
        cascade_p50 / early_p50.max(1.0)
    );
    let summary = serde_json::json!({
        "bench": "local",
        "questions": questions.len(),
        "latency_ms": {"p50": early_p50, "p90": early_p90},
        "cascade_latency_ms": {"p50": cascade_p50, "p90": rows[1].1.1},
        "asr_ms": {"p50": rows[2].1.0, "p90": rows[2].1.1},
        "tts_first_audio_ms": {"p50": rows[3].1.0, "p90": rows[3].1.1},
        "tts_total_ms": {"p50": rows[4].1.0, "p90": rows[4].1.1},
        "model_load_ms": load_ms,
        "peak_rss_bytes": peak_rss,
        "transcripts": early_turns.iter().map(|t| t.transcript.clone()).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

/// Speaks `text` with eSpeak NG's Spanish voice at 16 kHz, with 300 ms of
/// lead-in and light white noise (~17 dB SNR), as a microphone would.
pub(crate) async fn spoken_question(
    program: &std::path::Path,
    text: &str,
    seed: u64,
) -> anyhow::Result<Vec<i16>> {
    let config = tts::TtsConfig {
        program: program.to_path_buf(),
        voice: "es".into(),
        rate_wpm: 150,
        output_rate_hz: ENGINE_RATE_HZ,
    };
    let (tx, mut rx) = mpsc::channel(64);
    let speaking = tokio::spawn({
        let text = text.to_owned();
        async move { tts::speak(&config, "es", &text, &tx).await }
    });
    let mut audio = vec![0i16; 16 * 300];
    while let Some(frame) = rx.recv().await {
        audio.extend(frame);
    }
    speaking.await?.map_err(|e| anyhow!(e))?;
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    for s in &mut audio {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let noise = ((state >> 33) % 801) as i32 - 400;
        *s = (i32::from(*s) + noise).clamp(-32768, 32767) as i16;
    }
    Ok(audio)
}

async fn time_tts(config: &tts::TtsConfig, text: &str) -> anyhow::Result<(f64, f64)> {
    let (tx, mut rx) = mpsc::channel(64);
    let started = Instant::now();
    let speaking = tokio::spawn({
        let config = config.clone();
        let text = text.to_owned();
        async move { tts::speak(&config, "es", &text, &tx).await }
    });
    let mut first = None;
    while rx.recv().await.is_some() {
        first.get_or_insert_with(|| started.elapsed());
    }
    speaking.await?.map_err(|e| anyhow!(e))?;
    let total = started.elapsed();
    Ok((
        first.unwrap_or(total).as_secs_f64() * 1000.0,
        total.as_secs_f64() * 1000.0,
    ))
}

/// One question through a fresh conversation, streamed in real time as a
/// microphone would (so the end-of-speech hangover takes its real time),
/// then trailing silence; returns end-of-speech → first reply audio.
async fn one_turn(
    engine: &LocalEngine,
    config: &Config,
    audio: &[i16],
) -> anyhow::Result<TurnTiming> {
    let options = ConversationOptions {
        language: config.engine.language.clone(),
        voice: config.engine.voice.clone(),
    };
    let mut session = engine.start(options).map_err(|e| anyhow!(e))?;
    let mut feed = audio.to_vec();
    feed.extend(std::iter::repeat_n(
        0,
        16 * (config.local.vad_hangover_ms as usize + 600),
    ));
    let input = session.input.clone();
    let feeder = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        for frame in feed.chunks(320) {
            pace.tick().await;
            if input
                .send(EngineInput::Audio(frame.to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut ended_at = None;
    let mut timing = TurnTiming::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let event = tokio::time::timeout_at(deadline, session.events.recv())
            .await
            .map_err(|_| anyhow!("no reply within 60 s"))?
            .ok_or_else(|| anyhow!("the engine closed before replying"))?;
        match event {
            EngineEvent::SpeechEnded { .. } => ended_at = Some(Instant::now()),
            EngineEvent::Transcript {
                role: Role::User,
                stage: Stage::Final,
                text,
                ..
            } => timing.transcript = text,
            EngineEvent::Audio(_) => {
                let ended =
                    ended_at.ok_or_else(|| anyhow!("reply audio before the end of speech"))?;
                timing.latency_ms = ended.elapsed().as_secs_f64() * 1000.0;
                break;
            }
            EngineEvent::TurnEnd { .. } => {
                return Err(anyhow!("the turn ended without reply audio"));
            }
            _ => {}
        }
    }
    feeder.abort();
    let _ = session.input.send(EngineInput::Close).await;
    while let Some(event) = session.events.recv().await {
        if event == EngineEvent::Closed {
            break;
        }
    }
    Ok(timing)
}

fn pct(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if values.is_empty() {
            return 0.0;
        }
        let i = ((values.len() - 1) as f64 * p).round() as usize;
        values[i]
    };
    (at(0.5), at(0.9))
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}
