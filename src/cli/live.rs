//! `sonora talk` without `--input`: the default microphone and speakers
//! (through cpal), until Ctrl-C.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use rtrb::{Consumer, Producer, RingBuffer};

use super::Failure;
use crate::audio::{ENGINE_RATE_HZ, StreamResampler};
use crate::config::Config;
use crate::engine::{ConversationOptions, Engine, EngineEvent, Role, Stage};
use crate::session::{ClientInput, ClientOutput, Conversation, SessionLimits};

/// Microphone audio the ring holds for the conversation, in seconds.
const MIC_RING_S: usize = 2;
/// Reply audio the ring holds for the speaker, in seconds; the rest of a
/// longer reply waits on the conversation's side.
const SPEAKER_RING_S: usize = 4;
/// How often the conversation side moves audio between the rings and the
/// conversation.
const TICK: Duration = Duration::from_millis(10);

/// What the audio threads and the conversation share: no lock, no
/// allocation on the audio threads.
#[derive(Debug, Default)]
struct Shared {
    /// Microphone samples lost because the ring was full.
    mic_dropped: AtomicU64,
    /// Set on barge-in: the speaker thread discards what it holds.
    flush_speaker: AtomicBool,
}

/// Runs a conversation on the default audio devices, or says why it cannot.
pub(crate) fn run(config: &Config) -> Result<(), Failure> {
    if !audio_system_present() {
        return Err(anyhow!(
            "no audio device on this machine (no /dev/snd and no sound server): \
             give a recording with --input QUESTION.wav"
        )
        .into());
    }
    let host = cpal::default_host();
    let microphone = host.default_input_device().ok_or_else(|| {
        anyhow!("no microphone found on this machine: give a recording with --input QUESTION.wav")
    })?;
    let speaker_device = host.default_output_device().ok_or_else(|| {
        anyhow!("no speaker found on this machine: give --input and --output files")
    })?;
    let mic_config = microphone
        .default_input_config()
        .context("microphone configuration")?;
    let out_config = speaker_device
        .default_output_config()
        .context("speaker configuration")?;

    let shared = Arc::new(Shared::default());
    let mic_rate = usize::try_from(mic_config.sample_rate()).unwrap_or(48_000);
    let (mut mic_tx, mic_rx) = RingBuffer::<f32>::new(mic_rate * MIC_RING_S);
    let mic_channels = usize::from(mic_config.channels());
    let on_error = |e: cpal::Error| eprintln!("audio device error: {e}");
    let mic_shared = Arc::clone(&shared);
    let mic_stream = match mic_config.sample_format() {
        cpal::SampleFormat::F32 => microphone.build_input_stream(
            mic_config.config(),
            move |data: &[f32], _: &cpal::InputCallbackInfo| {
                record(data, mic_channels, |s| s, &mut mic_tx, &mic_shared);
            },
            on_error,
            None,
        ),
        cpal::SampleFormat::I16 => {
            let mic_shared = Arc::clone(&shared);
            microphone.build_input_stream(
                mic_config.config(),
                move |data: &[i16], _: &cpal::InputCallbackInfo| {
                    let to_f32 = |s| f32::from(s) / 32768.0;
                    record(data, mic_channels, to_f32, &mut mic_tx, &mic_shared);
                },
                on_error,
                None,
            )
        }
        other => return Err(anyhow!("microphone sample format {other:?} is not supported").into()),
    }
    .context("cannot open the microphone")?;

    let out_channels = usize::from(out_config.channels());
    let out_rate = usize::try_from(out_config.sample_rate()).unwrap_or(48_000);
    let (speaker_tx, mut speaker_rx) =
        RingBuffer::<f32>::new(out_rate * out_channels * SPEAKER_RING_S);
    let out_shared = Arc::clone(&shared);
    let out_stream = match out_config.sample_format() {
        cpal::SampleFormat::F32 => speaker_device.build_output_stream(
            out_config.config(),
            move |data: &mut [f32], _: &cpal::OutputCallbackInfo| {
                play(&mut speaker_rx, &out_shared, data, |s| s);
            },
            on_error,
            None,
        ),
        cpal::SampleFormat::I16 => speaker_device.build_output_stream(
            out_config.config(),
            move |data: &mut [i16], _: &cpal::OutputCallbackInfo| {
                play(&mut speaker_rx, &out_shared, data, |s| {
                    (s * 32767.0).clamp(-32768.0, 32767.0) as i16
                });
            },
            on_error,
            None,
        ),
        other => return Err(anyhow!("speaker sample format {other:?} is not supported").into()),
    }
    .context("cannot open the speaker")?;
    mic_stream.play().context("cannot start the microphone")?;
    out_stream.play().context("cannot start the speaker")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let engine = std::sync::Arc::new(runtime.block_on(super::engines::load_pool(config))?.0);
    let devices = Devices {
        mic_rate_hz: mic_config.sample_rate(),
        out_rate_hz: out_config.sample_rate(),
        out_channels,
    };
    eprintln!("listening (Ctrl-C to stop)…");
    let rings = Rings {
        mic: mic_rx,
        speaker: speaker_tx,
        shared,
    };
    let dropped = runtime.block_on(converse(config, engine.as_ref(), rings, devices))?;
    drop((mic_stream, out_stream));
    if dropped > 0 {
        eprintln!("microphone: {dropped} samples lost while the conversation fell behind");
    }
    Ok(())
}

/// Whether ALSA can possibly find a device: a sound card, or a sound
/// server it can route to. Asking ALSA on a machine with neither fills the
/// terminal with library errors before saying no.
fn audio_system_present() -> bool {
    let server = std::env::var_os("PULSE_SERVER").is_some()
        || std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|dir| {
            let dir = std::path::Path::new(&dir);
            dir.join("pulse/native").exists() || dir.join("pipewire-0").exists()
        });
    std::path::Path::new("/dev/snd").exists() || server
}

#[derive(Debug, Clone, Copy)]
struct Devices {
    mic_rate_hz: u32,
    out_rate_hz: u32,
    out_channels: usize,
}

/// The conversation's ends of the rings.
struct Rings {
    mic: Consumer<f32>,
    speaker: Producer<f32>,
    shared: Arc<Shared>,
}

/// Microphone callback: each frame downmixed to mono into the ring; what
/// does not fit is counted and lost.
fn record<T: Copy>(
    data: &[T],
    channels: usize,
    to_f32: impl Fn(T) -> f32,
    ring: &mut Producer<f32>,
    shared: &Shared,
) {
    let mut lost = 0;
    for frame in data.chunks(channels.max(1)) {
        let mono = frame.iter().map(|&s| to_f32(s)).sum::<f32>() / frame.len() as f32;
        if ring.push(mono).is_err() {
            lost += 1;
        }
    }
    if lost > 0 {
        shared.mic_dropped.fetch_add(lost, Ordering::Relaxed);
    }
}

/// Speaker callback: the device buffer from the ring (already interleaved),
/// silence when it is empty; after a barge-in, what the ring holds is
/// discarded first.
fn play<T: Copy>(
    ring: &mut Consumer<f32>,
    shared: &Shared,
    data: &mut [T],
    from_f32: impl Fn(f32) -> T,
) {
    if shared.flush_speaker.swap(false, Ordering::AcqRel) {
        while ring.pop().is_ok() {}
    }
    for slot in data.iter_mut() {
        *slot = from_f32(ring.pop().unwrap_or(0.0));
    }
}

/// Moves reply audio from `pending` into the speaker ring while it has room.
fn feed_speaker(pending: &mut VecDeque<f32>, ring: &mut Producer<f32>) {
    while let Some(&sample) = pending.front() {
        if ring.push(sample).is_err() {
            break;
        }
        pending.pop_front();
    }
}

/// Runs the conversation until Ctrl-C or its end; returns how many
/// microphone samples were lost.
async fn converse(
    config: &Config,
    engine: &dyn Engine,
    mut rings: Rings,
    devices: Devices,
) -> anyhow::Result<u64> {
    let options = ConversationOptions {
        language: config.engine.language.clone(),
        voice: config.engine.voice.clone(),
        history: Vec::new(),
    };
    let session = engine.start(options).map_err(|e| anyhow!(e))?;
    let mut handle = Conversation::spawn(session, None, SessionLimits::from_config(config));
    let mut to_16k =
        StreamResampler::new(devices.mic_rate_hz, ENGINE_RATE_HZ).map_err(|e| anyhow!(e))?;
    let mut to_device: Option<(u32, StreamResampler)> = None;
    let (mut pcm, mut samples, mut out) = (Vec::new(), Vec::new(), Vec::new());
    let mut pending = VecDeque::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                feed_speaker(&mut pending, &mut rings.speaker);
                if stopping {
                    continue;
                }
                samples.clear();
                while let Ok(s) = rings.mic.pop() {
                    samples.push((s * 32767.0).clamp(-32768.0, 32767.0) as i16);
                }
                pcm.clear();
                to_16k.push(&samples, &mut pcm);
                if !pcm.is_empty() {
                    let _ = handle.input.send(ClientInput::Pcm(pcm.clone())).await;
                }
            }
            _ = tokio::signal::ctrl_c(), if !stopping => {
                stopping = true;
                let _ = handle.input.send(ClientInput::Stop).await;
            }
            output = handle.output.recv() => match output {
                Some(ClientOutput::Event(EngineEvent::Audio(reply))) => {
                    let resampler = match &mut to_device {
                        Some((rate, r)) if *rate == reply.rate_hz => r,
                        _ => {
                            let r = StreamResampler::new(reply.rate_hz, devices.out_rate_hz).map_err(|e| anyhow!(e))?;
                            &mut to_device.insert((reply.rate_hz, r)).1
                        }
                    };
                    out.clear();
                    resampler.push(&reply.samples, &mut out);
                    for &s in &out {
                        pending.extend(std::iter::repeat_n(f32::from(s) / 32768.0, devices.out_channels));
                    }
                    feed_speaker(&mut pending, &mut rings.speaker);
                }
                Some(ClientOutput::Event(EngineEvent::Interrupted { .. })) => {
                    pending.clear();
                    rings.shared.flush_speaker.store(true, Ordering::Release);
                }
                Some(ClientOutput::Event(EngineEvent::Transcript { role, text, stage: Stage::Final, .. })) => {
                    match role {
                        Role::User => println!("you: {text}"),
                        Role::Assistant => println!("sonora: {text}"),
                    }
                }
                Some(ClientOutput::Closed { reason, message, .. }) => {
                    eprintln!("conversation closed: {} {message}", reason.code());
                    break;
                }
                Some(_) => {}
                None => break,
            },
        }
    }
    Ok(rings.shared.mic_dropped.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_microphone_ring_downmixes_and_counts_what_it_cannot_hold() {
        let shared = Shared::default();
        let (mut tx, mut rx) = RingBuffer::<f32>::new(3);
        // Four stereo frames into a ring of three: one is lost and counted.
        let stereo = [0.5_f32, 0.1, -0.5, -0.1, 1.0, 0.0, 0.2, 0.2];
        record(&stereo, 2, |s| s, &mut tx, &shared);
        assert_eq!(shared.mic_dropped.load(Ordering::Relaxed), 1);
        let got: Vec<f32> = std::iter::from_fn(|| rx.pop().ok()).collect();
        assert_eq!(got, [0.3, -0.3, 0.5]);
    }

    #[test]
    fn the_speaker_plays_silence_when_empty_and_drops_its_audio_on_barge_in() {
        let shared = Shared::default();
        let (mut tx, mut rx) = RingBuffer::<f32>::new(8);
        let mut pending: VecDeque<f32> = (1..=10).map(|i| i as f32 / 10.0).collect();
        feed_speaker(&mut pending, &mut tx);
        assert_eq!(pending.len(), 2, "what does not fit waits");
        let mut buffer = [9.0_f32; 3];
        play(&mut rx, &shared, &mut buffer, |s| s);
        assert_eq!(buffer, [0.1, 0.2, 0.3]);
        shared.flush_speaker.store(true, Ordering::Release);
        play(&mut rx, &shared, &mut buffer, |s| s);
        assert_eq!(buffer, [0.0; 3], "barge-in: the rest of the reply is gone");
        assert!(!shared.flush_speaker.load(Ordering::Acquire));
        feed_speaker(&mut pending, &mut tx);
        play(&mut rx, &shared, &mut buffer, |s| s);
        assert_eq!(buffer, [0.9, 1.0, 0.0]);
    }
}
