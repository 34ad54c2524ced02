//! `sonora bench local`: Spanish questions through the local engine. First
//! recognition accuracy (keyword recall, word error rate) of the library's
//! own Whisper pipeline against the engine's; then whole conversations,
//! timed from the true end of speech (known from the generated audio) and
//! from the engine's decision, against the same engine with its pauses
//! judged by the voice detector alone and a plain cascade that starts
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

use super::accuracy::{QUESTIONS, Question, Score, VOICES};

#[derive(Debug, Args)]
pub(crate) struct LocalBenchArgs {
    /// How many spoken questions go through whole conversations for the
    /// latency figures (cycling through the question set).
    #[arg(long, default_value_t = 8)]
    questions: usize,
    /// Beam sizes whose recognition accuracy and time are compared.
    #[arg(long, value_delimiter = ',', default_value = "1,5")]
    beams: Vec<usize>,
    /// Recognition windows to compare: the audio and this much silence (ms)
    /// instead of Whisper's full 30 s (at the last beam size, with the
    /// engine's prompt).
    #[arg(long, value_delimiter = ',', default_value = "1000,3000")]
    margins: Vec<u32>,
    /// Prompts to compare besides the engine's: the knowledge base's
    /// questions within N characters (0: none), as the engine is configured.
    #[arg(long, value_delimiter = ',', alias = "vocabulary-chars")]
    prompt_chars: Vec<usize>,
    /// Skip the accuracy comparison (latency only).
    #[arg(long)]
    no_accuracy: bool,
    /// Write the generated question WAVs here (for inspection).
    #[arg(long)]
    keep_audio: Option<PathBuf>,
}

/// A recognition margin that gives Whisper its whole 30 s window.
const FULL_WINDOW_MS: u32 = 30_000;

/// The text Whisper is given before the audio.
#[derive(Debug, Clone, Copy)]
enum Prompt {
    Nothing,
    /// The engine's: the knowledge base's questions.
    Engine,
    /// The base's questions, whole ones within this many characters.
    Questions(usize),
    /// The headings' content words within this many characters.
    Words(usize),
}

/// One spoken question: its audio and where its speech truly ends.
struct Spoken {
    question: Question,
    voice: &'static str,
    audio: Vec<i16>,
    /// Samples up to the last one of speech (before the noise was added).
    speech_end: usize,
}

#[derive(Debug, Default, Clone)]
struct TurnTiming {
    /// The engine's end-of-speech decision → first reply audio.
    decided_ms: f64,
    /// The true end of speech → first reply audio.
    true_end_ms: f64,
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
    let mut spoken = Vec::new();
    for (v, voice) in VOICES.iter().enumerate() {
        for (i, question) in QUESTIONS.iter().enumerate() {
            let seed = (v * QUESTIONS.len() + i) as u64;
            let (audio, speech_end) =
                spoken_question(&settings.tts.program, voice, question.text, seed).await?;
            if let Some(dir) = &args.keep_audio {
                std::fs::create_dir_all(dir)?;
                let path = dir.join(format!("q{i}-{voice}.wav"));
                crate::audio::wav::write_mono(&path, ENGINE_RATE_HZ, &audio)
                    .map_err(|e| anyhow!(e))?;
            }
            spoken.push(Spoken {
                question: *question,
                voice,
                audio,
                speech_end,
            });
        }
    }
    let language = &config.engine.language;
    let mut summary = serde_json::Map::new();
    if !args.no_accuracy {
        let rows = accuracy_table(&settings, language, args, &spoken).await?;
        summary.insert("accuracy".into(), serde_json::Value::Array(rows));
    }

    let load_started = Instant::now();
    let engine = LocalEngine::load(&settings).map_err(|e| anyhow!(e))?;
    let load_ms = load_started.elapsed().as_secs_f64() * 1000.0;
    // The same engine with its pauses judged by the voice detector alone,
    // and a plain cascade that starts recognising only after the hangover.
    let mut detector_settings = settings.clone();
    detector_settings.vad.quiet_db = 0.0;
    let detector = LocalEngine::load(&detector_settings).map_err(|e| anyhow!(e))?;
    let mut cascade_settings = detector_settings.clone();
    cascade_settings.vad.pause_ms = cascade_settings.vad.hangover_ms + 1;
    let cascade = LocalEngine::load(&cascade_settings).map_err(|e| anyhow!(e))?;
    let contenders = [
        ("Sonora", &engine),
        ("voice detector alone", &detector),
        ("plain cascade", &cascade),
    ];

    // Component timings on the same audio.
    let turns: Vec<&Spoken> = spoken.iter().cycle().take(args.questions.max(1)).collect();
    let mut asr_ms = Vec::new();
    let mut tts_first_ms = Vec::new();
    let mut tts_total_ms = Vec::new();
    for s in &turns {
        let started = Instant::now();
        engine
            .transcribe(&s.audio, language)
            .await
            .map_err(|e| anyhow!(e))?;
        asr_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let (first, total) = time_tts(&settings.tts, s.question.text).await?;
        tts_first_ms.push(first);
        tts_total_ms.push(total);
    }

    let mut timings: Vec<Vec<TurnTiming>> = vec![Vec::new(); contenders.len()];
    for (i, s) in turns.iter().enumerate() {
        // Rotate the order so no contender always runs on a warm cache.
        for k in 0..contenders.len() {
            let c = (i + k) % contenders.len();
            timings[c].push(one_turn(contenders[c].1, config, s).await?);
        }
        let [e, d, c] = [0, 1, 2].map(|c| &timings[c][i]);
        eprintln!(
            "q{i} ({}): from true end {:.0} ms (detector alone {:.0}, cascade {:.0}), from the decision {:.0} ms, heard {:?}",
            s.voice, e.true_end_ms, d.true_end_ms, c.true_end_ms, e.decided_ms, e.transcript
        );
    }
    let peak_rss = peak_rss_bytes();
    println!(
        "{:<22} {:>24} {:>24} {:>15}",
        "conversations (ms)", "true end p50 / p90", "decision p50 / p90", "keyword recall"
    );
    let mut per_contender = serde_json::Map::new();
    let mut true_end_p50 = Vec::new();
    for ((name, _), turned) in contenders.iter().zip(&timings) {
        let mut true_end: Vec<f64> = turned.iter().map(|t| t.true_end_ms).collect();
        let mut decided: Vec<f64> = turned.iter().map(|t| t.decided_ms).collect();
        let mut score = Score::default();
        for (t, s) in turned.iter().zip(&turns) {
            score.add(&s.question, &t.transcript);
        }
        let (t50, t90) = pct(&mut true_end);
        true_end_p50.push(t50);
        let (d50, d90) = pct(&mut decided);
        println!(
            "{name:<22} {:>24} {:>24} {:>14.1}%",
            format!("{t50:.0} / {t90:.0}"),
            format!("{d50:.0} / {d90:.0}"),
            score.keyword_recall() * 100.0
        );
        per_contender.insert(
            (*name).to_owned(),
            serde_json::json!({
                "true_end_latency_ms": {"p50": t50, "p90": t90},
                "decision_latency_ms": {"p50": d50, "p90": d90},
                "keyword_recall": score.keyword_recall(),
                "transcripts": turned.iter().map(|t| t.transcript.clone()).collect::<Vec<_>>(),
            }),
        );
    }
    let rows = [
        ("speech recognition (whole recording)", pct(&mut asr_ms)),
        ("synthesis, first audio", pct(&mut tts_first_ms)),
        ("synthesis, whole reply", pct(&mut tts_total_ms)),
    ];
    println!("{:<58} {:>9} {:>9}", "component (ms)", "p50", "p90");
    for (name, (p50, p90)) in rows {
        println!("{name:<58} {p50:>9.0} {p90:>9.0}");
    }
    let (true_p50, cascade_p50) = (true_end_p50[0], true_end_p50[2]);
    println!(
        "questions {}   model load {load_ms:.0} ms   peak RSS {:.0} MB   cascade/Sonora p50 {:.2}x",
        turns.len(),
        peak_rss as f64 / 1e6,
        cascade_p50 / true_p50.max(1.0)
    );
    let ms = |(p50, p90): (f64, f64)| serde_json::json!({"p50": p50, "p90": p90});
    let latency = serde_json::json!({
        "bench": "local",
        "questions": turns.len(),
        "conversations": per_contender,
        "asr_ms": ms(rows[0].1),
        "tts_first_audio_ms": ms(rows[1].1),
        "tts_total_ms": ms(rows[2].1),
        "model_load_ms": load_ms,
        "peak_rss_bytes": peak_rss,
    });
    if let serde_json::Value::Object(latency) = latency {
        summary.extend(latency);
    }
    println!("{}", serde_json::Value::Object(summary));
    Ok(())
}

/// Recognition of every spoken question by the library's own pipeline
/// (ct2rs computing the features, beam 5: the engine before its reference
/// features) and by the engine's with and without the knowledge base's
/// questions as its prompt at each beam size; prints keyword recall, word error rate and
/// recognition time for each.
async fn accuracy_table(
    settings: &LocalSettings,
    language: &str,
    args: &LocalBenchArgs,
    spoken: &[Spoken],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut rows = Vec::new();
    let baseline = library_transcripts(settings, language, spoken).await?;
    rows.push(("library features, beam 5".to_owned(), baseline));
    // (beam, prompt, margin, known words: none, weighing, correcting)
    let mut variants = Vec::new();
    for &beam in &args.beams {
        variants.push((beam, Prompt::Nothing, FULL_WINDOW_MS, None));
        variants.push((beam, Prompt::Engine, FULL_WINDOW_MS, None));
    }
    let last_beam = args.beams.last().copied().unwrap_or(1);
    for &margin in &args.margins {
        variants.push((last_beam, Prompt::Engine, margin, None));
    }
    // The engine as configured: its hypotheses weighed by the known
    // words, then its near misses corrected.
    let margin = settings.asr.margin_ms;
    if settings.words.is_some() {
        variants.push((last_beam, Prompt::Engine, margin, Some(false)));
        variants.push((last_beam, Prompt::Engine, margin, Some(true)));
    }
    let configured = settings.words.as_ref().map(|w| w.correct);
    // The prompt the engine had before: the headings' content words.
    variants.push((last_beam, Prompt::Words(400), margin, configured));
    for &chars in &args.prompt_chars {
        let prompt = if chars == 0 {
            Prompt::Nothing
        } else {
            Prompt::Questions(chars)
        };
        variants.push((last_beam, prompt, margin, configured));
    }
    let knowledge = crate::knowledge::KnowledgeBase::load(&settings.knowledge_dir)?;
    {
        for (beam, prompt, margin, correct) in variants {
            let mut variant = settings.clone();
            variant.asr.beam_size = beam;
            variant.asr.vocabulary = match prompt {
                Prompt::Nothing => Some(String::new()),
                Prompt::Engine => None,
                Prompt::Questions(chars) => Some(knowledge.questions_text(chars)),
                Prompt::Words(chars) => Some(knowledge.vocabulary(chars)),
            };
            variant.asr.margin_ms = margin;
            variant.words = correct.and_then(|correct| {
                let mut words = settings.words.clone()?;
                words.correct = correct;
                Some(words)
            });
            let engine = LocalEngine::load(&variant).map_err(|e| anyhow!(e))?;
            let mut out = Vec::new();
            for s in spoken {
                let started = Instant::now();
                let text = engine
                    .transcribe(&s.audio, language)
                    .await
                    .map_err(|e| anyhow!(e))?;
                out.push((text, started.elapsed().as_secs_f64() * 1000.0));
            }
            let name = format!(
                "reference features{}, beam {beam}{}{}",
                match prompt {
                    Prompt::Nothing => String::new(),
                    Prompt::Engine => " + questions".to_owned(),
                    Prompt::Questions(chars) => format!(" + questions in {chars} characters"),
                    Prompt::Words(chars) => format!(" + headings' words in {chars} characters"),
                },
                if margin >= FULL_WINDOW_MS {
                    String::new()
                } else {
                    format!(", window audio + {margin} ms")
                },
                match correct {
                    None => "",
                    Some(false) => ", hypotheses weighed by known words",
                    Some(true) => ", … and near misses corrected",
                }
            );
            rows.push((name, out));
        }
    }
    println!(
        "{:<72} {:>15} {:>16} {:>16}",
        "recognition (16 spoken questions)", "keyword recall", "word error rate", "time p50 (ms)"
    );
    let mut json = Vec::new();
    for (name, transcripts) in rows {
        let mut score = Score::default();
        for (s, (text, _)) in spoken.iter().zip(&transcripts) {
            score.add(&s.question, text);
        }
        let mut times: Vec<f64> = transcripts.iter().map(|(_, ms)| *ms).collect();
        let (p50, _) = pct(&mut times);
        for (s, (text, _)) in spoken.iter().zip(&transcripts) {
            eprintln!("{name} | {} | {:?} → {text:?}", s.voice, s.question.text);
        }
        println!(
            "{name:<72} {:>14.1}% {:>15.1}% {p50:>16.0}",
            score.keyword_recall() * 100.0,
            score.word_error_rate() * 100.0
        );
        json.push(serde_json::json!({
            "variant": name,
            "keyword_recall": score.keyword_recall(),
            "word_error_rate": score.word_error_rate(),
            "asr_ms_p50": p50,
            "transcripts": transcripts.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
        }));
    }
    Ok(json)
}

/// The spoken questions through ct2rs's own Whisper pipeline: its features,
/// the language given, beam 5.
async fn library_transcripts(
    settings: &LocalSettings,
    language: &str,
    spoken: &[Spoken],
) -> anyhow::Result<Vec<(String, f64)>> {
    let dir = settings.model_dir.clone();
    let threads = settings.asr.threads;
    let language = language.split(['-', '_']).next().unwrap_or("es").to_owned();
    let audio: Vec<Vec<f32>> = spoken
        .iter()
        .map(|s| s.audio.iter().map(|&x| f32::from(x) / 32768.0).collect())
        .collect();
    tokio::task::spawn_blocking(move || {
        let config = ct2rs::Config {
            compute_type: ct2rs::ComputeType::INT8,
            num_threads_per_replica: threads,
            ..ct2rs::Config::default()
        };
        let whisper = ct2rs::Whisper::new(&dir, config)?;
        let options = ct2rs::WhisperOptions {
            beam_size: 5,
            ..ct2rs::WhisperOptions::default()
        };
        audio
            .iter()
            .map(|samples| {
                let started = Instant::now();
                let parts = whisper.generate(samples, Some(&language), false, &options)?;
                Ok((parts.join(" "), started.elapsed().as_secs_f64() * 1000.0))
            })
            .collect()
    })
    .await?
}

/// Speaks `text` with an eSpeak NG voice at 16 kHz, with 300 ms of lead-in
/// and light white noise (~17 dB SNR), as a microphone would; also returns
/// where the speech truly ends (its last sample above −44 dBFS before the
/// noise went in).
pub(crate) async fn spoken_question(
    program: &std::path::Path,
    voice: &str,
    text: &str,
    seed: u64,
) -> anyhow::Result<(Vec<i16>, usize)> {
    let config = tts::TtsConfig {
        program: program.to_path_buf(),
        voice: voice.into(),
        rate_wpm: 150,
        output_rate_hz: ENGINE_RATE_HZ,
    };
    let (tx, mut rx) = mpsc::channel(64);
    let speaking = tokio::spawn({
        let text = text.to_owned();
        let voice = voice.to_owned();
        async move { tts::speak(&config, &voice, &text, &tx).await }
    });
    let mut audio = vec![0i16; 16 * 300];
    while let Some(frame) = rx.recv().await {
        audio.extend(frame);
    }
    speaking.await?.map_err(|e| anyhow!(e))?;
    let speech_end = audio
        .iter()
        .rposition(|s| s.unsigned_abs() > 200)
        .map_or(audio.len(), |i| i + 1);
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    for s in &mut audio {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let noise = ((state >> 33) % 801) as i32 - 400;
        *s = (i32::from(*s) + noise).clamp(-32768, 32767) as i16;
    }
    Ok((audio, speech_end))
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
/// microphone would (so the end-of-speech wait takes its real time), then
/// trailing silence; times the first reply audio from the true end of
/// speech and from the engine's decision.
async fn one_turn(
    engine: &LocalEngine,
    config: &Config,
    spoken: &Spoken,
) -> anyhow::Result<TurnTiming> {
    let options = ConversationOptions {
        language: config.engine.language.clone(),
        voice: config.engine.voice.clone(),
        history: Vec::new(),
    };
    let mut session = engine.start(options).map_err(|e| anyhow!(e))?;
    let mut feed = spoken.audio.clone();
    feed.extend(std::iter::repeat_n(
        0,
        16 * (config.local.vad_hangover_ms as usize + 600),
    ));
    let input = session.input.clone();
    let speech_end = spoken.speech_end;
    let (true_end_tx, true_end_rx) = tokio::sync::oneshot::channel();
    let feeder = tokio::spawn(async move {
        let mut true_end_tx = Some(true_end_tx);
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        for (i, frame) in feed.chunks(320).enumerate() {
            pace.tick().await;
            if input
                .send(EngineInput::Audio(frame.to_vec()))
                .await
                .is_err()
            {
                break;
            }
            // The frame holding the last sample of speech is in: its
            // position within the frame says how long ago speech ended.
            let end = (i + 1) * 320;
            if end >= speech_end
                && let Some(tx) = true_end_tx.take()
            {
                let after = Duration::from_micros(((end - speech_end) as u64 * 1000) / 16);
                let _ = tx.send(Instant::now() - after);
            }
        }
    });
    let mut true_end_rx = Some(true_end_rx);
    let mut true_end = None;
    let mut decided_at = None;
    let mut timing = TurnTiming::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let event = tokio::time::timeout_at(deadline, session.events.recv())
            .await
            .map_err(|_| anyhow!("no reply within 60 s"))?
            .ok_or_else(|| anyhow!("the engine closed before replying"))?;
        if let Some(rx) = true_end_rx.as_mut()
            && let Ok(at) = rx.try_recv()
        {
            true_end = Some(at);
            true_end_rx = None;
        }
        match event {
            EngineEvent::SpeechEnded { .. } => decided_at = Some(Instant::now()),
            EngineEvent::Transcript {
                role: Role::User,
                stage: Stage::Final,
                text,
                ..
            } => timing.transcript = text,
            EngineEvent::Audio(_) => {
                let now = Instant::now();
                let decided =
                    decided_at.ok_or_else(|| anyhow!("reply audio before the end of speech"))?;
                let true_end = match true_end {
                    Some(at) => at,
                    None => {
                        true_end_rx
                            .take()
                            .ok_or_else(|| anyhow!("no true end of speech"))?
                            .await?
                    }
                };
                timing.decided_ms = (now - decided).as_secs_f64() * 1000.0;
                timing.true_end_ms = now.saturating_duration_since(true_end).as_secs_f64() * 1000.0;
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
