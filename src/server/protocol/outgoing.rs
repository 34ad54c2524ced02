//! Every text frame the server sends, as one serde-tagged enum: the
//! `type` tag and the field names are the wire format.

use serde::Serialize;
use serde_json::Value;

use super::ErrorCode;
use crate::engine::{EngineEvent, ErrorKind, Role, Stage, TurnEndReason};
use crate::session::{CloseReason, ConversationSummary, CountersSnapshot};
use crate::usage::UsageDelta;

/// Every text frame the server sends, serialized with its `type` tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ServerMessage<'a> {
    Ready {
        version: u64,
        session: &'a str,
        engine: &'a str,
        model: &'a str,
        voice: &'a str,
        language: &'a str,
        input: &'a str,
        output: OutputFormat,
        /// What is left of the conversation's budget, when one limits it.
        #[serde(skip_serializing_if = "Option::is_none")]
        budget: Option<Budget>,
        /// The secret a client re-attaches with after a dropped connection,
        /// when the server keeps conversations for their clients.
        #[serde(skip_serializing_if = "Option::is_none")]
        resume: Option<&'a str>,
    },
    /// A client re-attached: the frames it missed came just before.
    Resumed {
        session: &'a str,
        /// Frames sent again, from the first after the client's `last_seq`.
        replayed: u64,
        /// Frames after `last_seq` that were not kept (the oldest reply
        /// audio first), and the reply audio among them.
        skipped: u64,
        skipped_audio_ms: u64,
    },
    Error {
        code: ErrorCode,
        /// The engine's own kind, for errors an engine reported.
        #[serde(skip_serializing_if = "Option::is_none")]
        kind: Option<ErrorKind>,
        message: &'a str,
        fatal: bool,
    },
    Transcript {
        role: Role,
        stage: Stage,
        text: &'a str,
        turn: u64,
    },
    Speech {
        state: SpeechState,
        turn: u64,
    },
    Interrupted {
        turn: u64,
    },
    Tool {
        id: &'a str,
        name: &'a str,
        input: &'a Value,
    },
    TurnEnd {
        turn: u64,
        reason: TurnEndReason,
    },
    Rotated {
        generation: u32,
        gap_ms: f64,
        /// The engine instance a conversation moved to after its own
        /// failed; absent for a hand-off within the same engine.
        #[serde(skip_serializing_if = "Option::is_none")]
        engine: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        model: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        voice: Option<&'a str>,
    },
    /// Every engine that fits the hello is full: the conversation waits
    /// for a place, `position` from 1 among `waiting`.
    Queued {
        position: usize,
        waiting: usize,
    },
    Latency {
        turn: u64,
        ms: u64,
    },
    Usage {
        delta: &'a UsageDelta,
        total: &'a UsageDelta,
        #[serde(skip_serializing_if = "Option::is_none")]
        budget: Option<Budget>,
    },
    Stats(Stats),
    End {
        reason: CloseReason,
        message: &'a str,
        summary: &'a ConversationSummary,
    },
}

/// What is left under the tightest of a conversation's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Budget {
    pub(crate) remaining_micro_usd: u64,
}

/// The reply audio format announced in `ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct OutputFormat {
    pub(crate) format: &'static str,
    pub(crate) rate: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum SpeechState {
    Started,
    Ended,
}

/// The body of a `stats` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Stats {
    turns: u32,
    latency_ms: Option<u64>,
    queues: QueueStats,
    decoder: DecoderStats,
    audio_in_ms: u64,
    audio_out_ms: u64,
    interruptions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct QueueStats {
    uplink_ms: u64,
    uplink_high_water_ms: u64,
    uplink_dropped_ms: u64,
    downlink_ms: u64,
    downlink_high_water_ms: u64,
    downlink_cleared_ms: u64,
    engine_send_stalls: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct DecoderStats {
    bytes_in: u64,
    bytes_refused: u64,
    chunks_refused: u64,
    packets_decoded: u64,
    packets_concealed: u64,
    packets_corrupt: u64,
    too_fast: u64,
}

impl Stats {
    pub(crate) fn new(counters: &CountersSnapshot, turns: u32, latency_ms: &[u64]) -> Self {
        Self {
            turns,
            latency_ms: latency_ms.last().copied(),
            queues: QueueStats {
                uplink_ms: counters.uplink_queued_ms,
                uplink_high_water_ms: counters.uplink_high_water_ms,
                uplink_dropped_ms: counters.uplink_dropped_ms,
                downlink_ms: counters.downlink_queued_ms,
                downlink_high_water_ms: counters.downlink_high_water_ms,
                downlink_cleared_ms: counters.downlink_cleared_ms,
                engine_send_stalls: counters.engine_send_stalls,
            },
            decoder: DecoderStats {
                bytes_in: counters.decoder_bytes_in,
                bytes_refused: counters.decoder_bytes_refused,
                chunks_refused: counters.chunks_refused,
                packets_decoded: counters.packets_decoded,
                packets_concealed: counters.packets_concealed,
                packets_corrupt: counters.packets_corrupt,
                too_fast: counters.audio_too_fast,
            },
            audio_in_ms: counters.audio_in_ms,
            audio_out_ms: counters.audio_out_ms,
            interruptions: counters.interruptions,
        }
    }
}

impl<'a> ServerMessage<'a> {
    /// An error the server found, with whether the conversation ends.
    pub(crate) fn error(code: ErrorCode, message: &'a str, fatal: bool) -> Self {
        Self::Error {
            code,
            kind: None,
            message,
            fatal,
        }
    }

    /// The message for an engine event, or `None` for audio (a binary
    /// frame), `Ready` (sent as `ready`), `Usage` (sent with the running
    /// total) and `Closed` (sent as `end`).
    pub(crate) fn event(event: &'a EngineEvent) -> Option<Self> {
        let message = match event {
            EngineEvent::Transcript {
                role,
                text,
                stage,
                turn_id,
            } => Self::Transcript {
                role: *role,
                stage: *stage,
                text,
                turn: *turn_id,
            },
            EngineEvent::Interrupted { turn_id } => Self::Interrupted { turn: *turn_id },
            EngineEvent::ToolCall { id, name, json } => Self::Tool {
                id,
                name,
                input: json,
            },
            EngineEvent::TurnEnd { turn_id, reason } => Self::TurnEnd {
                turn: *turn_id,
                reason: *reason,
            },
            EngineEvent::SpeechStarted { turn_id } => Self::Speech {
                state: SpeechState::Started,
                turn: *turn_id,
            },
            EngineEvent::SpeechEnded { turn_id } => Self::Speech {
                state: SpeechState::Ended,
                turn: *turn_id,
            },
            EngineEvent::Rotated { generation, gap_ms } => Self::Rotated {
                generation: *generation,
                gap_ms: *gap_ms,
                engine: None,
                model: None,
                voice: None,
            },
            EngineEvent::Moved {
                engine,
                model,
                voice,
                generation,
                gap_ms,
                ..
            } => Self::Rotated {
                generation: *generation,
                gap_ms: *gap_ms,
                engine: Some(engine),
                model: Some(model),
                voice: Some(voice),
            },
            EngineEvent::Error { kind, message } => Self::Error {
                code: match kind {
                    ErrorKind::Busy => ErrorCode::Busy,
                    _ => ErrorCode::EngineError,
                },
                kind: Some(*kind),
                message,
                fatal: matches!(kind, ErrorKind::Fatal),
            },
            EngineEvent::Ready { .. }
            | EngineEvent::Audio(_)
            | EngineEvent::Usage(_)
            | EngineEvent::Closed => return None,
        };
        Some(message)
    }

    /// The message as the text of one frame.
    pub(crate) fn to_text(&self) -> String {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_messages_keep_their_wire_shape() {
        use serde_json::json;
        let value = |message: ServerMessage<'_>| -> Value {
            serde_json::from_str(&message.to_text()).expect("JSON")
        };
        assert_eq!(
            value(ServerMessage::error(ErrorCode::BadJson, "no", true)),
            json!({"type": "error", "code": "bad_json", "message": "no", "fatal": true})
        );
        let busy = EngineEvent::Error {
            kind: ErrorKind::Busy,
            message: "later".into(),
        };
        assert_eq!(
            value(ServerMessage::event(&busy).expect("a message")),
            json!({"type": "error", "code": "busy", "kind": "busy", "message": "later", "fatal": false})
        );
        let transcript = EngineEvent::Transcript {
            role: Role::Assistant,
            text: "hola".into(),
            stage: Stage::Final,
            turn_id: 3,
        };
        assert_eq!(
            value(ServerMessage::event(&transcript).expect("a message")),
            json!({"type": "transcript", "role": "assistant", "stage": "final", "text": "hola", "turn": 3})
        );
        let ended = EngineEvent::SpeechEnded { turn_id: 4 };
        assert_eq!(
            value(ServerMessage::event(&ended).expect("a message")),
            json!({"type": "speech", "state": "ended", "turn": 4})
        );
        let turn_end = EngineEvent::TurnEnd {
            turn_id: 4,
            reason: TurnEndReason::Interrupted,
        };
        assert_eq!(
            value(ServerMessage::event(&turn_end).expect("a message")),
            json!({"type": "turn_end", "turn": 4, "reason": "interrupted"})
        );
        assert_eq!(ServerMessage::event(&EngineEvent::Closed), None);
        let stats = value(ServerMessage::Stats(Stats::new(
            &CountersSnapshot::default(),
            2,
            &[],
        )));
        assert_eq!(stats["type"], "stats");
        assert_eq!(stats["latency_ms"], Value::Null);
        assert_eq!(stats["queues"]["downlink_high_water_ms"], 0);
        assert_eq!(stats["decoder"]["too_fast"], 0);
        let summary = ConversationSummary::default();
        let end = value(ServerMessage::End {
            reason: CloseReason::SlowClient,
            message: "bye",
            summary: &summary,
        });
        assert_eq!(
            (end["type"].clone(), end["reason"].clone()),
            (json!("end"), json!("slow_client"))
        );
    }
}
