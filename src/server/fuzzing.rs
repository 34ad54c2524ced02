//! Entry point for the protocol fuzz target in `fuzz/`: a sequence of
//! client frames, parsed as the `/ws` connection parses them, driven through
//! a real conversation (decoder, queues, watchdogs) and the scripted echo
//! engine. Whatever the frames, the conversation must end with exactly one
//! `Closed`, last, and its decoder must never outrun the clock.

use std::time::{Duration, Instant};

use super::protocol::{self, ClientMessage};
use crate::audio::{AudioFormat, DecoderLimits, RealtimeLimit, StreamDecoder};
use crate::engine::scripted::ScriptedEngine;
use crate::engine::{ConversationOptions, Engine};
use crate::session::{ClientInput, ClientOutput, Conversation, SessionLimits};

/// `data[0]` picks the audio format; then each operation is a byte (its low
/// two bits the kind: text frame, binary frame, 16 kHz PCM, read what is
/// waiting), a length byte, and that many bytes of payload.
pub fn frames(data: &[u8]) {
    let Some((&format, mut rest)) = data.split_first() else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let audio = match format % 3 {
        0 => AudioFormat::Webm,
        1 => AudioFormat::Ogg,
        _ => AudioFormat::Pcm16 {
            rate_hz: 16_000,
            channels: 1,
        },
    };
    runtime.block_on(async move {
        let pace = RealtimeLimit::default();
        let limits = SessionLimits {
            close_grace_ms: 2_000,
            decoder: DecoderLimits {
                realtime: Some(pace),
                ..DecoderLimits::default()
            },
            ..SessionLimits::default()
        };
        let engine = ScriptedEngine::echo_turns(400, 100);
        let options = ConversationOptions {
            language: "es".into(),
            voice: String::new(),
            history: Vec::new(),
        };
        let Ok(session) = engine.start(options) else {
            return;
        };
        let decoder = StreamDecoder::new(Some(audio), limits.decoder);
        let handle = Conversation::spawn(session, Some(decoder), limits);
        let (input, mut output, counters) = (handle.input, handle.output, handle.counters);
        let started = Instant::now();
        let mut outputs = Vec::new();
        while let [op, len, tail @ ..] = rest {
            let len = usize::from(*len).min(tail.len());
            let (payload, next) = tail.split_at(len);
            rest = next;
            let item = match op & 3 {
                0 => match protocol::parse_client(&String::from_utf8_lossy(payload)) {
                    Ok(ClientMessage::Text(text)) => Some(ClientInput::Text(text)),
                    Ok(ClientMessage::ToolResult { id, result }) => {
                        Some(ClientInput::ToolResult { id, json: result })
                    }
                    Ok(ClientMessage::Stop) => Some(ClientInput::Stop),
                    Ok(ClientMessage::Hello(_)) | Err(_) => None,
                },
                1 => Some(ClientInput::Audio(bytes::Bytes::copy_from_slice(payload))),
                2 => Some(ClientInput::Pcm(
                    crate::audio::samples_from_le(payload).collect(),
                )),
                _ => {
                    while let Ok(item) = output.try_recv() {
                        outputs.push(item);
                    }
                    None
                }
            };
            if let Some(item) = item {
                // A conversation that ended takes no more input.
                let sent = tokio::time::timeout(Duration::from_secs(5), input.send(item));
                if !matches!(sent.await, Ok(Ok(()))) {
                    break;
                }
            }
        }
        // Stop, or (when its input is full) the client going away: the
        // same for the conversation.
        let _ = input.try_send(ClientInput::Stop);
        drop(input);
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(item) = output.recv().await {
                outputs.push(item);
            }
        })
        .await;
        assert!(ended.is_ok(), "the conversation did not end");
        let closed = outputs
            .iter()
            .filter(|o| matches!(o, ClientOutput::Closed { .. }))
            .count();
        assert_eq!(closed, 1, "exactly one Closed");
        assert!(matches!(outputs.last(), Some(ClientOutput::Closed { .. })));
        let wall_ms = started.elapsed().as_millis() as u64;
        let audio_ms = counters.snapshot().audio_in_ms;
        let allowed_ms =
            u64::from(pace.burst_ms) + wall_ms * u64::from(pace.speed_permille) / 1000 + 120;
        let direct_pcm_ms = data.len() as u64 / 32 + 1;
        assert!(
            audio_ms <= allowed_ms + direct_pcm_ms,
            "{audio_ms} ms of audio in {wall_ms} ms"
        );
    });
}
