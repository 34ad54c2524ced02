//! The `/ws` wire protocol, version 1 (docs/protocol.md): JSON text frames
//! both ways, binary frames for audio both ways. Client frames are parsed
//! here; the server's are in `outgoing`. These types never leave `server`.

mod outgoing;

use serde_json::Value;

pub(crate) use self::outgoing::{Budget, OutputFormat, ServerMessage, Stats};
use crate::audio::AudioFormat;
use crate::session::Warning;

/// The protocol version this server speaks.
pub(crate) const VERSION: u64 = 1;

use crate::audio::PCM_RATES_HZ;

/// Longest typed text accepted, in characters.
pub(crate) const MAX_TEXT_CHARS: usize = 4_000;

/// Largest text frame (JSON) accepted, in bytes: a `tool_result` included.
/// Audio frames may be larger, up to `server.max_message_bytes`.
pub(crate) const MAX_TEXT_MESSAGE_BYTES: usize = 64 * 1024;

/// Most tool calls a client may have open at once; past it, a call's
/// result is refused as unknown.
pub(crate) const MAX_OPEN_TOOL_CALLS: usize = 16;

crate::names::named_enum! {
    /// Every error code the server sends, with whether the session goes on.
    pub(crate) enum ErrorCode {
        /// A text frame that is not JSON, or JSON that is not an object.
        BadJson = "bad_json",
        /// A JSON object without a string `type`, or a field of the wrong type.
        BadMessage = "bad_message",
        /// A `type` this version does not know.
        UnknownType = "unknown_type",
        /// `hello` with a version other than [`VERSION`].
        UnsupportedVersion = "unsupported_version",
        /// `hello` with an audio format or rate the server does not take.
        UnsupportedAudio = "unsupported_audio",
        /// `hello` with a voice the engine does not offer.
        UnknownVoice = "unknown_voice",
        /// `hello` naming an engine the server does not run.
        UnknownEngine = "unknown_engine",
        /// Audio, text or stop before a `hello` was accepted.
        HelloFirst = "hello_first",
        /// A second `hello` on a session that already has one.
        DuplicateHello = "duplicate_hello",
        /// `hello` without a valid token while tokens are required (closes, 1008).
        Unauthorized = "unauthorized",
        /// No `hello` within the hello timeout (closes, 1008).
        HelloTimeout = "hello_timeout",
        /// A frame over the size limit (closes, 1009).
        MessageTooLarge = "message_too_large",
        /// Typed text that is empty or too long.
        BadText = "bad_text",
        /// An audio chunk the decoder refused (its input cap): the chunk is lost.
        ChunkRefused = "chunk_refused",
        /// User audio dropped, oldest first, because the engine fell behind.
        UplinkDropped = "uplink_dropped",
        /// The engine was slow to accept audio.
        EngineStall = "engine_stall",
        /// The engine could not start a conversation (closes, 1011).
        EngineUnavailable = "engine_unavailable",
        /// The engine is shedding load (its service throttles): try again
        /// later (closes, 1013).
        EngineBusy = "engine_busy",
        /// An error the engine reported; `fatal` says whether the session ends.
        EngineError = "engine_error",
        /// The audio could not be decoded: the session ends with `bad_audio`.
        BadAudio = "bad_audio",
        /// The engine is still answering earlier turns and refused this one.
        Busy = "busy",
        /// A `tool_result` for an id this conversation did not send, or sent
        /// twice.
        UnknownToolCall = "unknown_tool_call",
        /// The ledger cannot record the conversation's cost: a new one is
        /// refused (closes, 1013); a running paid one ends.
        LedgerUnavailable = "ledger_unavailable",
        /// A budget (the key's for its period, the service's for the day, or
        /// the conversation's) has no room for another turn: a new
        /// conversation is refused (closes, 1008); a running one ends after
        /// its reply.
        BudgetExceeded = "budget_exceeded",
        /// The key's `max_sessions` conversations are running (closes, 1013).
        KeyBusy = "key_busy",
        /// A `hello` with a `resume` secret that names no conversation
        /// waiting for its client (wrong, expired or ended), or a
        /// `last_seq` it never sent (closes, 1008).
        ResumeFailed = "resume_failed",
    }
}

impl ErrorCode {
    /// The code a session warning is sent with.
    pub(crate) fn for_warning(warning: Warning) -> Self {
        match warning {
            Warning::ChunkRefused => Self::ChunkRefused,
            Warning::UplinkDropped => Self::UplinkDropped,
            Warning::EngineStall => Self::EngineStall,
        }
    }
}

/// A protocol error: a code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtocolError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl ProtocolError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A client's `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) audio: AudioFormat,
    /// An engine instance or kind to run on; empty for any.
    pub(crate) engine: String,
    pub(crate) voice: String,
    pub(crate) language: String,
    pub(crate) token: String,
    /// A conversation to re-attach to instead of a new one.
    pub(crate) resume: Option<Resume>,
}

/// The `resume` of a hello: the secret of the conversation's `ready`, and
/// the `seq` of the last server frame the client received.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Resume {
    pub(crate) secret: String,
    pub(crate) last_seq: u64,
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resume")
            .field("secret", &"…")
            .field("last_seq", &self.last_seq)
            .finish()
    }
}

/// A client text frame, parsed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClientMessage {
    Hello(Hello),
    Text(String),
    ToolResult { id: String, result: Value },
    Stop,
}

/// Parses one client text frame.
pub(crate) fn parse_client(text: &str) -> Result<ClientMessage, ProtocolError> {
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
    let resume = match object.get("resume") {
        None | Some(Value::Null) => None,
        Some(Value::String(secret)) if !secret.is_empty() && secret.len() <= 200 => {
            let last_seq = match object.get("last_seq") {
                None | Some(Value::Null) => 0,
                Some(seq) => seq.as_u64().ok_or_else(|| {
                    bad("hello: \"last_seq\" must be a whole number, the seq of the last frame received".into())
                })?,
            };
            Some(Resume {
                secret: secret.clone(),
                last_seq,
            })
        }
        Some(_) => {
            return Err(bad(
                "hello: \"resume\" must be the secret string of the conversation's ready".into(),
            ));
        }
    };
    Ok(Hello {
        audio,
        engine: text("engine")?,
        voice: text("voice")?,
        language: text("language")?,
        token: text("token")?,
        resume,
    })
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
        assert_eq!(pcm.resume, None);
    }

    #[test]
    fn a_resuming_hello_names_its_secret_and_last_frame() {
        let resume = |extra: &str| {
            let text =
                format!(r#"{{"type":"hello","version":1,"audio":{{"format":"webm"}}{extra}}}"#);
            parse_client(&text).map(|message| match message {
                ClientMessage::Hello(hello) => hello.resume,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(
            resume(r#","resume":"s3cret","last_seq":41"#),
            Ok(Some(Resume {
                secret: "s3cret".into(),
                last_seq: 41
            }))
        );
        assert_eq!(
            resume(r#","resume":"s3cret""#).map(|r| r.map(|r| r.last_seq)),
            Ok(Some(0))
        );
        for bad in [
            r#","resume":5"#,
            r#","resume":"""#,
            r#","resume":"s","last_seq":-1"#,
            r#","resume":"s","last_seq":"7""#,
        ] {
            assert_eq!(
                resume(bad).map_err(|e| e.code),
                Err(ErrorCode::BadMessage),
                "{bad}"
            );
        }
        let shown = format!(
            "{:?}",
            Resume {
                secret: "s3cret".into(),
                last_seq: 1
            }
        );
        assert!(!shown.contains("s3cret"), "{shown}");
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
