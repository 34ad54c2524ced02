//! The `/ws` wire protocol, version 1 (docs/protocol.md): JSON text frames
//! both ways, binary frames for audio both ways. These types never leave
//! `server`.

use serde::Serialize;
use serde_json::{Value, json};

use crate::audio::AudioFormat;
use crate::engine::{EngineEvent, Role, Stage};
use crate::session::{ConversationSummary, CountersSnapshot};
use crate::usage::UsageDelta;

/// The protocol version this server speaks.
pub const VERSION: u64 = 1;

use crate::audio::PCM_RATES_HZ;

/// Longest typed text accepted, in characters.
pub const MAX_TEXT_CHARS: usize = 4_000;

/// Largest text frame (JSON) accepted, in bytes: a `tool_result` included.
/// Audio frames may be larger, up to `server.max_message_bytes`.
pub const MAX_TEXT_MESSAGE_BYTES: usize = 64 * 1024;

/// Most tool calls a client may have open at once; past it, a call's
/// result is refused as unknown.
pub const MAX_OPEN_TOOL_CALLS: usize = 16;

/// Every error code the server sends, with whether the session goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A text frame that is not JSON, or JSON that is not an object.
    BadJson,
    /// A JSON object without a string `type`, or a field of the wrong type.
    BadMessage,
    /// A `type` this version does not know.
    UnknownType,
    /// `hello` with a version other than [`VERSION`].
    UnsupportedVersion,
    /// `hello` with an audio format or rate the server does not take.
    UnsupportedAudio,
    /// `hello` with a voice the engine does not offer.
    UnknownVoice,
    /// Audio, text or stop before a `hello` was accepted.
    HelloFirst,
    /// A second `hello` on a session that already has one.
    DuplicateHello,
    /// `hello` without a valid token while tokens are required (closes, 1008).
    Unauthorized,
    /// No `hello` within the hello timeout (closes, 1008).
    HelloTimeout,
    /// A frame over the size limit (closes, 1009).
    MessageTooLarge,
    /// Typed text that is empty or too long.
    BadText,
    /// An audio chunk the decoder refused (its input cap): the chunk is lost.
    ChunkRefused,
    /// User audio dropped, oldest first, because the engine fell behind.
    UplinkDropped,
    /// The engine was slow to accept audio.
    EngineStall,
    /// The engine could not start a conversation (closes, 1011).
    EngineUnavailable,
    /// The engine is shedding load (its service throttles): try again
    /// later (closes, 1013).
    EngineBusy,
    /// An error the engine reported; `fatal` says whether the session ends.
    EngineError,
    /// The audio could not be decoded: the session ends with `bad_audio`.
    BadAudio,
    /// The engine is still answering earlier turns and refused this one.
    Busy,
    /// A `tool_result` for an id this conversation did not send, or sent
    /// twice.
    UnknownToolCall,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::BadMessage => "bad_message",
            Self::UnknownType => "unknown_type",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnsupportedAudio => "unsupported_audio",
            Self::UnknownVoice => "unknown_voice",
            Self::HelloFirst => "hello_first",
            Self::DuplicateHello => "duplicate_hello",
            Self::Unauthorized => "unauthorized",
            Self::HelloTimeout => "hello_timeout",
            Self::MessageTooLarge => "message_too_large",
            Self::BadText => "bad_text",
            Self::ChunkRefused => "chunk_refused",
            Self::UplinkDropped => "uplink_dropped",
            Self::EngineStall => "engine_stall",
            Self::EngineUnavailable => "engine_unavailable",
            Self::EngineBusy => "engine_busy",
            Self::EngineError => "engine_error",
            Self::BadAudio => "bad_audio",
            Self::Busy => "busy",
            Self::UnknownToolCall => "unknown_tool_call",
        }
    }

    /// Every code, for metrics and documentation tests.
    pub const ALL: [Self; 21] = [
        Self::BadJson,
        Self::BadMessage,
        Self::UnknownType,
        Self::UnsupportedVersion,
        Self::UnsupportedAudio,
        Self::UnknownVoice,
        Self::HelloFirst,
        Self::DuplicateHello,
        Self::Unauthorized,
        Self::HelloTimeout,
        Self::MessageTooLarge,
        Self::BadText,
        Self::ChunkRefused,
        Self::UplinkDropped,
        Self::EngineStall,
        Self::EngineUnavailable,
        Self::EngineBusy,
        Self::EngineError,
        Self::BadAudio,
        Self::Busy,
        Self::UnknownToolCall,
    ];

    /// The code a session warning maps to.
    pub fn for_warning(code: &str) -> Self {
        match code {
            "chunk_refused" => Self::ChunkRefused,
            "uplink_dropped" => Self::UplinkDropped,
            _ => Self::EngineStall,
        }
    }
}

/// A protocol error: a code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A client's `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub audio: AudioFormat,
    pub voice: String,
    pub language: String,
    pub token: String,
}

/// A client text frame, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Hello(Hello),
    Text(String),
    ToolResult { id: String, result: Value },
    Stop,
}

/// Parses one client text frame.
pub fn parse_client(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ProtocolError::new(ErrorCode::BadJson, format!("the message is not JSON: {e}"))
    })?;
    let Value::Object(object) = value else {
        let message = "the message must be a JSON object with a \"type\"";
        return Err(ProtocolError::new(ErrorCode::BadJson, message));
    };
    let kind = object.get("type").and_then(Value::as_str).ok_or_else(|| {
        ProtocolError::new(ErrorCode::BadMessage, "the message has no string \"type\"")
    })?;
    let string = |name: &str, required: bool| -> Result<String, ProtocolError> {
        match object.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) if !required => Ok(String::new()),
            None => Err(ProtocolError::new(
                ErrorCode::BadMessage,
                format!("{kind}: \"{name}\" is missing"),
            )),
            Some(other) => Err(ProtocolError::new(
                ErrorCode::BadMessage,
                format!("{kind}: \"{name}\" must be a string, not {other}"),
            )),
        }
    };
    match kind {
        "hello" => parse_hello(&object).map(ClientMessage::Hello),
        "text" => {
            let text = string("text", true)?;
            let trimmed = text.trim();
            if trimmed.is_empty() {
                return Err(ProtocolError::new(ErrorCode::BadText, "text: it is empty"));
            }
            let chars = trimmed.chars().count();
            if chars > MAX_TEXT_CHARS {
                let message = format!("text: {chars} characters, at most {MAX_TEXT_CHARS}");
                return Err(ProtocolError::new(ErrorCode::BadText, message));
            }
            Ok(ClientMessage::Text(trimmed.to_owned()))
        }
        "tool_result" => Ok(ClientMessage::ToolResult {
            id: string("id", true)?,
            result: object.get("result").cloned().unwrap_or(Value::Null),
        }),
        "stop" => Ok(ClientMessage::Stop),
        other => {
            let shown: String = other.chars().take(40).collect();
            Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!(
                    "unknown message type {shown:?} (this server speaks version {VERSION}: hello, text, tool_result, stop)"
                ),
            ))
        }
    }
}

fn parse_hello(object: &serde_json::Map<String, Value>) -> Result<Hello, ProtocolError> {
    let bad = |message: String| ProtocolError::new(ErrorCode::BadMessage, message);
    let version = object
        .get("version")
        .ok_or_else(|| bad("hello: \"version\" is missing".into()))?;
    if version.as_u64() != Some(VERSION) {
        return Err(ProtocolError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "hello: version {version} is not supported; this server speaks version {VERSION}"
            ),
        ));
    }
    let audio = object
        .get("audio")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            bad(
                "hello: \"audio\" must be an object such as {\"format\":\"pcm16\",\"rate\":16000}"
                    .into(),
            )
        })?;
    let format = audio
        .get("format")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("hello: \"audio.format\" must be a string".into()))?;
    let unsupported = |message: String| ProtocolError::new(ErrorCode::UnsupportedAudio, message);
    let audio = match format {
        "pcm16" => {
            let rate = audio.get("rate").and_then(Value::as_u64).ok_or_else(|| {
                unsupported("hello: pcm16 needs \"audio.rate\" in Hz, e.g. 16000".into())
            })?;
            let rate_hz = u32::try_from(rate)
                .ok()
                .filter(|r| PCM_RATES_HZ.contains(r))
                .ok_or_else(|| {
                    unsupported(format!(
                        "hello: pcm16 at {rate} Hz is not supported (the rates capture devices use: {})",
                        crate::audio::pcm_rates_list()
                    ))
                })?;
            AudioFormat::Pcm16 {
                rate_hz,
                channels: 1,
            }
        }
        "webm" => AudioFormat::Webm,
        "ogg" => AudioFormat::Ogg,
        other => {
            let shown: String = other.chars().take(40).collect();
            return Err(unsupported(format!(
                "hello: audio format {shown:?} is not supported (pcm16, webm or ogg)"
            )));
        }
    };
    let text = |name: &str| -> Result<String, ProtocolError> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) if s.len() <= 200 => Ok(s.trim().to_owned()),
            Some(_) => Err(bad(format!("hello: \"{name}\" must be a short string"))),
        }
    };
    Ok(Hello {
        audio,
        voice: text("voice")?,
        language: text("language")?,
        token: text("token")?,
    })
}

/// The server's text frames.
pub mod out {
    use super::*;

    pub fn error(code: ErrorCode, message: &str, fatal: bool) -> Value {
        json!({"type": "error", "code": code.as_str(), "message": message, "fatal": fatal})
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one field each of the ready message"
    )]
    pub fn ready(
        session: &str,
        engine: &str,
        model: &str,
        voice: &str,
        language: &str,
        input: &str,
        output_rate_hz: u32,
    ) -> Value {
        json!({
            "type": "ready",
            "version": VERSION,
            "session": session,
            "engine": engine,
            "model": model,
            "voice": voice,
            "language": language,
            "input": input,
            "output": {"format": "pcm16", "rate": output_rate_hz},
        })
    }

    pub fn usage(delta: &UsageDelta, total: &UsageDelta) -> Value {
        json!({"type": "usage", "delta": delta, "total": total})
    }

    pub fn stats(counters: &CountersSnapshot, turns: u32, latency_ms: &[u64]) -> Value {
        json!({
            "type": "stats",
            "turns": turns,
            "latency_ms": latency_ms.last(),
            "queues": {
                "uplink_ms": counters.uplink_queued_ms,
                "uplink_high_water_ms": counters.uplink_high_water_ms,
                "uplink_dropped_ms": counters.uplink_dropped_ms,
                "downlink_ms": counters.downlink_queued_ms,
                "downlink_high_water_ms": counters.downlink_high_water_ms,
                "downlink_cleared_ms": counters.downlink_cleared_ms,
                "engine_send_stalls": counters.engine_send_stalls,
            },
            "decoder": {
                "bytes_in": counters.decoder_bytes_in,
                "bytes_refused": counters.decoder_bytes_refused,
                "chunks_refused": counters.chunks_refused,
                "packets_decoded": counters.packets_decoded,
                "packets_concealed": counters.packets_concealed,
                "packets_corrupt": counters.packets_corrupt,
                "too_fast": counters.audio_too_fast,
            },
            "audio_in_ms": counters.audio_in_ms,
            "audio_out_ms": counters.audio_out_ms,
            "interruptions": counters.interruptions,
        })
    }

    pub fn end(reason: &str, message: &str, summary: &ConversationSummary) -> Value {
        json!({"type": "end", "reason": reason, "message": message, "summary": summary})
    }

    /// The text frame for an engine event, or `None` for audio (a binary
    /// frame), `Ready` (sent as `ready`) and `Closed` (sent as `end`).
    pub fn event(event: &EngineEvent) -> Option<Value> {
        let value = match event {
            EngineEvent::Transcript {
                role,
                text,
                stage,
                turn_id,
            } => json!({
                "type": "transcript",
                "role": match role { Role::User => "user", Role::Assistant => "assistant" },
                "stage": match stage { Stage::Speculative => "speculative", Stage::Final => "final" },
                "text": text,
                "turn": turn_id,
            }),
            EngineEvent::Interrupted { turn_id } => json!({"type": "interrupted", "turn": turn_id}),
            EngineEvent::ToolCall { id, name, json } => {
                json!({"type": "tool", "id": id, "name": name, "input": json})
            }
            EngineEvent::TurnEnd { turn_id, reason } => {
                json!({"type": "turn_end", "turn": turn_id, "reason": reason})
            }
            EngineEvent::SpeechStarted { turn_id } => {
                json!({"type": "speech", "state": "started", "turn": turn_id})
            }
            EngineEvent::SpeechEnded { turn_id } => {
                json!({"type": "speech", "state": "ended", "turn": turn_id})
            }
            EngineEvent::Rotated { generation, gap_ms } => {
                json!({"type": "rotated", "generation": generation, "gap_ms": gap_ms})
            }
            EngineEvent::Error { kind, message } => json!({
                "type": "error",
                "code": match kind {
                    crate::engine::ErrorKind::Busy => ErrorCode::Busy,
                    _ => ErrorCode::EngineError,
                }.as_str(),
                "kind": kind,
                "message": message,
                "fatal": matches!(kind, crate::engine::ErrorKind::Fatal),
            }),
            EngineEvent::Ready { .. }
            | EngineEvent::Audio(_)
            | EngineEvent::Usage(_)
            | EngineEvent::Closed => return None,
        };
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client(text).expect_err("refused").code
    }

    #[test]
    fn hello_in_each_format() {
        let hello = |audio: &str| {
            let text = format!(
                r#"{{"type":"hello","version":1,"audio":{audio},"voice":"lupe","language":"es","token":"t"}}"#
            );
            match parse_client(&text) {
                Ok(ClientMessage::Hello(hello)) => hello,
                other => panic!("{other:?}"),
            }
        };
        let pcm = hello(r#"{"format":"pcm16","rate":48000}"#);
        assert_eq!(
            pcm.audio,
            AudioFormat::Pcm16 {
                rate_hz: 48_000,
                channels: 1
            }
        );
        assert_eq!((pcm.voice.as_str(), pcm.language.as_str()), ("lupe", "es"));
        assert_eq!(hello(r#"{"format":"webm"}"#).audio, AudioFormat::Webm);
        assert_eq!(hello(r#"{"format":"ogg"}"#).audio, AudioFormat::Ogg);
    }

    #[test]
    fn every_refusal_has_its_code() {
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"kind":"hello"}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"text","text":5}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":"text","text":"   "}"#), ErrorCode::BadText);
        let long = format!(r#"{{"type":"text","text":"{}"}}"#, "a".repeat(4_001));
        assert_eq!(code(&long), ErrorCode::BadText);
        assert_eq!(
            code(r#"{"type":"hello","version":2,"audio":{"format":"webm"}}"#),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            code(r#"{"type":"hello","audio":{"format":"webm"}}"#),
            ErrorCode::BadMessage
        );
        assert_eq!(
            code(r#"{"type":"hello","version":1,"audio":{"format":"mp4"}}"#),
            ErrorCode::UnsupportedAudio
        );
        assert_eq!(
            code(r#"{"type":"hello","version":1,"audio":{"format":"pcm16"}}"#),
            ErrorCode::UnsupportedAudio
        );
        assert_eq!(
            code(r#"{"type":"hello","version":1,"audio":{"format":"pcm16","rate":4000}}"#),
            ErrorCode::UnsupportedAudio
        );
        assert_eq!(
            code(r#"{"type":"tool_result","result":{}}"#),
            ErrorCode::BadMessage
        );
    }

    #[test]
    fn text_is_trimmed_and_stop_needs_nothing_else() {
        assert_eq!(
            parse_client(r#"{"type":"text","text":"  hola  "}"#),
            Ok(ClientMessage::Text("hola".into()))
        );
        assert_eq!(parse_client(r#"{"type":"stop"}"#), Ok(ClientMessage::Stop));
    }

    #[test]
    fn the_protocol_document_lists_every_code() {
        let doc = include_str!("../../docs/protocol.md");
        for code in ErrorCode::ALL {
            let row = format!("| `{}` |", code.as_str());
            assert!(
                doc.contains(&row),
                "docs/protocol.md has no row for {}",
                code.as_str()
            );
        }
        for reason in crate::session::CloseReason::ALL {
            assert!(
                doc.contains(&format!("`{}`", reason.code())),
                "{}",
                reason.code()
            );
        }
    }

    #[test]
    fn codes_serialize_as_their_names() {
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).expect("serializes"),
                code.as_str()
            );
        }
    }
}
