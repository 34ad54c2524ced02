//! `sonora talk`: a spoken conversation from the terminal. A WAV file stands
//! in for the microphone (paced in real time or as fast as the engine takes
//! it); the replies go to a WAV file, every event to a JSON-lines file.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;

use super::Failure;
use crate::audio::{self, ENGINE_RATE_HZ, StreamResampler};
use crate::config::Config;
use crate::engine::{ConversationOptions, Engine, EngineEvent, Role, Stage};
use crate::session::{
    ClientInput, ClientOutput, CloseReason, Conversation, ConversationSummary, SessionLimits,
};

#[derive(Debug, Args)]
pub(crate) struct TalkArgs {
    /// Engine: `local` (offline, the default), `nova-sonic`, `openai-realtime` or `gemini-live`.
    #[arg(long)]
    pub(crate) engine: Option<String>,
    /// WAV file spoken into the conversation (several questions separated by silence are
    /// several turns). Without it, the default microphone and speakers are used.
    #[arg(long, value_name = "QUESTION.wav")]
    input: Option<PathBuf>,
    /// Where to write all reply audio.
    #[arg(long, value_name = "REPLY.wav")]
    output: Option<PathBuf>,
    /// Where to write every engine event as a JSON line with a timestamp.
    #[arg(long, value_name = "EVENTS.jsonl")]
    events: Option<PathBuf>,
    /// Stream the input at real-time pace, as a microphone would.
    #[arg(long)]
    realtime: bool,
    /// Knowledge base directory (Markdown FAQ files) for the local engine.
    #[arg(long, value_name = "DIR")]
    pub(crate) knowledge: Option<PathBuf>,
    /// Conversation language, e.g. `es` or `en`.
    #[arg(long)]
    pub(crate) language: Option<String>,
    /// Reply voice.
    #[arg(long)]
    pub(crate) voice: Option<String>,
    #[command(flatten)]
    pub(crate) nova: super::nova::NovaFlags,
}

impl TalkArgs {
    /// The flags that are configuration settings, as overrides.
    pub(crate) fn overrides(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(engine) = &self.engine {
            out.push(("engine.kind".into(), engine.clone()));
        }
        if let Some(dir) = &self.knowledge {
            out.push(("local.knowledge_dir".into(), dir.display().to_string()));
        }
        if let Some(language) = &self.language {
            out.push(("engine.language".into(), language.clone()));
        }
        if let Some(voice) = &self.voice {
            out.push(("engine.voice".into(), voice.clone()));
        }
        out.extend(self.nova.overrides());
        out
    }
}

/// Frames sent to the conversation: 20 ms at 16 kHz.
const FRAME_SAMPLES: usize = 320;
/// In fast mode, keep at most this much audio queued ahead of the engine.
const FAST_LOOKAHEAD_MS: u64 = 1_000;

pub(crate) fn run(config: &Config, args: &TalkArgs) -> Result<(), Failure> {
    let Some(input) = &args.input else {
        return super::live::run(config);
    };
    let wav = audio::wav::read(input).map_err(|e| anyhow!(e))?;
    let speech = to_16k_mono(&wav)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let engine = std::sync::Arc::new(runtime.block_on(super::engines::load_pool(config))?.0);
    let summary = runtime.block_on(converse(config, args, engine.as_ref(), speech))?;
    println!("{summary}");
    match summary["close"].as_str() {
        Some("client_stopped") => Ok(()),
        other => Err(anyhow!(
            "the conversation ended abnormally: {}",
            other.unwrap_or("unknown")
        )
        .into()),
    }
}

fn to_16k_mono(wav: &audio::wav::WavAudio) -> anyhow::Result<Vec<i16>> {
    let channels = usize::from(wav.channels.max(1));
    let mono: Vec<i16> = wav
        .samples
        .chunks_exact(channels)
        .map(|f| (f.iter().map(|&s| i32::from(s)).sum::<i32>() / channels as i32) as i16)
        .collect();
    let mut resampler =
        StreamResampler::new(wav.rate_hz, ENGINE_RATE_HZ).map_err(|e| anyhow!(e))?;
    let mut out = Vec::with_capacity(mono.len());
    resampler.push(&mono, &mut out);
    resampler.finish(&mut out);
    Ok(out)
}

async fn converse(
    config: &Config,
    args: &TalkArgs,
    engine: &dyn Engine,
    mut speech: Vec<i16>,
) -> anyhow::Result<serde_json::Value> {
    let options = ConversationOptions {
        language: config.engine.language.clone(),
        voice: config.engine.voice.clone(),
        history: Vec::new(),
    };
    let session = engine.start(options).map_err(|e| anyhow!(e))?;
    let limits = SessionLimits {
        // A file may hold many questions: let the engine finish them all.
        close_grace_ms: 300_000,
        ..SessionLimits::from_config(config)
    };
    let mut handle = Conversation::spawn(session, None, limits);
    // Enough trailing silence for the last turn to end.
    let tail_ms = u64::from(config.local.vad_hangover_ms) + 500;
    speech.extend(std::iter::repeat_n(0, (tail_ms * 16) as usize));

    let mut events_file = match &args.events {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => None,
    };
    let started = Instant::now();
    let mut reply: Vec<i16> = Vec::new();
    let mut reply_rate_hz = config.local.output_rate_hz;
    let mut frames = speech.chunks(FRAME_SAMPLES);
    let mut feeding = true;
    // A cloud engine hears in real time: pace the file like a microphone.
    let realtime = args.realtime || config.engine.kind.is_cloud();
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let summary: ConversationSummary;
    let close: String;
    loop {
        tokio::select! {
            output = handle.output.recv() => {
                let Some(output) = output else {
                    return Err(anyhow!("the conversation ended without closing"));
                };
                let t_ms = started.elapsed().as_millis() as u64;
                match output {
                    ClientOutput::Event(event) => {
                        show(&event);
                        if let EngineEvent::Audio(pcm) = &event {
                            reply_rate_hz = pcm.rate_hz;
                            reply.extend_from_slice(&pcm.samples);
                        }
                        if let Some(file) = events_file.as_mut() {
                            writeln!(file, "{}", event_line(t_ms, &event))?;
                        }
                    }
                    ClientOutput::Latency { turn_id, ms } => {
                        if let Some(file) = events_file.as_mut() {
                            let line = serde_json::json!({"t_ms": t_ms, "type": "latency", "turn_id": turn_id, "ms": ms});
                            writeln!(file, "{line}")?;
                        }
                    }
                    ClientOutput::Warning { code, message } => {
                        eprintln!("warning: {code}: {message}");
                        if let Some(file) = events_file.as_mut() {
                            let line = serde_json::json!({"t_ms": t_ms, "type": "warning", "code": code, "message": message});
                            writeln!(file, "{line}")?;
                        }
                    }
                    ClientOutput::Closed { reason, message, summary: s } => {
                        if let Some(file) = events_file.as_mut() {
                            let line = serde_json::json!({"t_ms": t_ms, "type": "closed", "reason": reason.code(), "message": message});
                            writeln!(file, "{line}")?;
                        }
                        summary = *s;
                        close = reason.code().to_owned();
                        if reason != CloseReason::ClientStopped {
                            eprintln!("conversation closed: {} ({message})", reason.code());
                        }
                        break;
                    }
                }
            }
            _ = pace.tick(), if feeding && realtime => {
                feeding = feed(&handle.input, frames.next()).await;
            }
            () = tokio::time::sleep(Duration::from_millis(2)), if feeding && !realtime => {
                while feeding && handle.counters.uplink_queued_ms() < FAST_LOOKAHEAD_MS {
                    feeding = feed(&handle.input, frames.next()).await;
                }
            }
        }
    }
    if let Some(mut file) = events_file {
        file.flush()?;
    }
    if let Some(path) = &args.output {
        audio::wav::write_mono(path, reply_rate_hz, &reply).map_err(|e| anyhow!(e))?;
    }
    let usage = summary.usage;
    Ok(serde_json::json!({
        "turns": summary.turns,
        "latency_ms": summary.latency_ms,
        "tokens": {
            "speech_in": usage.speech_in_tokens,
            "speech_out": usage.speech_out_tokens,
            "text_in": usage.text_in_tokens,
            "text_out": usage.text_out_tokens,
        },
        "cost_micro_usd": usage.cost_micro_usd,
        "cost_by_modality_micro_usd": {
            "speech": usage.speech_cost_micro_usd,
            "text": usage.text_cost_micro_usd,
        },
        "audio_in_ms": usage.audio_in_ms,
        "audio_out_ms": usage.audio_out_ms,
        "text_in_chars": usage.text_in_chars,
        "text_out_chars": usage.text_out_chars,
        "reply_samples": reply.len(),
        "reply_rate_hz": reply_rate_hz,
        "close": close,
    }))
}

/// Sends one frame, or `Stop` after the last; false once there is nothing more to send.
async fn feed(input: &crate::session::InputSender, frame: Option<&[i16]>) -> bool {
    match frame {
        Some(frame) => input.send(ClientInput::Pcm(frame.to_vec())).await.is_ok(),
        None => {
            let _ = input.send(ClientInput::Stop).await;
            false
        }
    }
}

fn show(event: &EngineEvent) {
    match event {
        EngineEvent::Transcript {
            role: Role::User,
            text,
            ..
        } => println!("you: {text}"),
        EngineEvent::Transcript {
            role: Role::Assistant,
            text,
            stage: Stage::Final,
            ..
        } => println!("sonora: {text}"),
        EngineEvent::Interrupted { .. } => println!("(interrupted)"),
        EngineEvent::Error { kind, message } => eprintln!("engine error ({kind:?}): {message}"),
        _ => {}
    }
}

/// One JSON line for an event; audio is described, not dumped.
fn event_line(t_ms: u64, event: &EngineEvent) -> serde_json::Value {
    let mut value = serde_json::to_value(event)
        .unwrap_or_else(|e| serde_json::json!({"type": "unprintable", "error": e.to_string()}));
    if let (EngineEvent::Audio(pcm), Some(map)) = (event, value.as_object_mut()) {
        map.insert("samples".into(), pcm.samples.len().into());
        map.insert("duration_ms".into(), pcm.duration_ms().into());
    }
    if let Some(map) = value.as_object_mut() {
        map.insert("t_ms".into(), t_ms.into());
    }
    value
}
