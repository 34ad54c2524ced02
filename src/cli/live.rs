//! `sonora talk` without `--input`: the default microphone and speakers
//! (through cpal), until Ctrl-C.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use tokio::sync::mpsc;

use super::Failure;
use crate::audio::{OUTPUT_RATE_HZ, StreamResampler};
use crate::config::Config;
use crate::engine::{ConversationOptions, Engine, EngineEvent, Role, Stage};
use crate::session::{ClientInput, ClientOutput, Conversation, SessionLimits};

/// Reply audio waiting for the speaker, shared with the audio thread.
type Speaker = Arc<Mutex<VecDeque<f32>>>;

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

    let (mic_tx, mic_rx) = mpsc::channel::<Vec<f32>>(256);
    let mic_channels = usize::from(mic_config.channels());
    let on_error = |e: cpal::Error| eprintln!("audio device error: {e}");
    let mic_stream = match mic_config.sample_format() {
        cpal::SampleFormat::F32 => microphone.build_input_stream(
            mic_config.config(),
            move |data: &[f32], _: &cpal::InputCallbackInfo| {
                let _ = mic_tx.try_send(downmix(data, mic_channels, |s| s));
            },
            on_error,
            None,
        ),
        cpal::SampleFormat::I16 => microphone.build_input_stream(
            mic_config.config(),
            move |data: &[i16], _: &cpal::InputCallbackInfo| {
                let _ = mic_tx.try_send(downmix(data, mic_channels, |s| f32::from(s) / 32768.0));
            },
            on_error,
            None,
        ),
        other => return Err(anyhow!("microphone sample format {other:?} is not supported").into()),
    }
    .context("cannot open the microphone")?;

    let speaker: Speaker = Arc::default();
    let out_channels = usize::from(out_config.channels());
    let feed = Arc::clone(&speaker);
    let out_stream = match out_config.sample_format() {
        cpal::SampleFormat::F32 => speaker_device.build_output_stream(
            out_config.config(),
            move |data: &mut [f32], _: &cpal::OutputCallbackInfo| play(&feed, data, |s| s),
            on_error,
            None,
        ),
        cpal::SampleFormat::I16 => speaker_device.build_output_stream(
            out_config.config(),
            move |data: &mut [i16], _: &cpal::OutputCallbackInfo| {
                play(&feed, data, |s| {
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
    let engine = runtime.block_on(super::engines::load(config))?.engine;
    let devices = Devices {
        mic_rate_hz: mic_config.sample_rate(),
        out_rate_hz: out_config.sample_rate(),
        out_channels,
    };
    eprintln!("listening (Ctrl-C to stop)…");
    runtime.block_on(converse(config, engine.as_ref(), mic_rx, &speaker, devices))?;
    drop((mic_stream, out_stream));
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

fn downmix<T: Copy>(data: &[T], channels: usize, to_f32: impl Fn(T) -> f32) -> Vec<f32> {
    data.chunks(channels.max(1))
        .map(|frame| frame.iter().map(|&s| to_f32(s)).sum::<f32>() / frame.len() as f32)
        .collect()
}

/// Fills the device buffer from the reply queue (already interleaved), or silence.
fn play<T: Copy>(speaker: &Speaker, data: &mut [T], from_f32: impl Fn(f32) -> T) {
    let mut queue = speaker
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for slot in data.iter_mut() {
        *slot = from_f32(queue.pop_front().unwrap_or(0.0));
    }
}

async fn converse(
    config: &Config,
    engine: &dyn Engine,
    mut mic: mpsc::Receiver<Vec<f32>>,
    speaker: &Speaker,
    devices: Devices,
) -> anyhow::Result<()> {
    let options = ConversationOptions {
        language: config.engine.language.clone(),
        voice: config.engine.voice.clone(),
    };
    let session = engine.start(options).map_err(|e| anyhow!(e))?;
    let mut handle = Conversation::spawn(session, None, SessionLimits::from_config(config));
    let mut to_16k =
        StreamResampler::new(devices.mic_rate_hz, OUTPUT_RATE_HZ).map_err(|e| anyhow!(e))?;
    let mut to_device: Option<(u32, StreamResampler)> = None;
    let (mut pcm, mut samples) = (Vec::new(), Vec::new());
    let mut stopping = false;
    loop {
        tokio::select! {
            frame = mic.recv(), if !stopping => {
                let Some(frame) = frame else { break };
                samples.clear();
                samples.extend(frame.iter().map(|&s| (s * 32767.0).clamp(-32768.0, 32767.0) as i16));
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
                    let mut out = Vec::new();
                    resampler.push(&reply.samples, &mut out);
                    let mut queue = speaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    for s in out {
                        queue.extend(std::iter::repeat_n(f32::from(s) / 32768.0, devices.out_channels));
                    }
                }
                Some(ClientOutput::Event(EngineEvent::Interrupted { .. })) => {
                    speaker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
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
    Ok(())
}
