//! The Realtime API's events as serde types: what Sonora sends, and what it
//! reads of what the service sends (everything else is ignored by type).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::Role;

/// An event Sonora sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub(super) enum ClientEvent {
    #[serde(rename = "session.update")]
    SessionUpdate { session: Value },
    #[serde(rename = "input_audio_buffer.append")]
    Append { audio: String },
    #[serde(rename = "conversation.item.create")]
    ItemCreate { item: Value },
    #[serde(rename = "conversation.item.truncate")]
    Truncate {
        item_id: String,
        content_index: u32,
        audio_end_ms: u64,
    },
    #[serde(rename = "response.create")]
    ResponseCreate { response: Value },
}

impl ClientEvent {
    /// A message of the conversation so far, replayed into a new connection.
    pub(super) fn history(role: Role, text: &str) -> Self {
        let (role, kind) = match role {
            Role::User => ("user", "input_text"),
            Role::Assistant => ("assistant", "output_text"),
        };
        Self::ItemCreate {
            item: json!({
                "type": "message",
                "role": role,
                "content": [{"type": kind, "text": text}],
            }),
        }
    }

    /// The user's typed words.
    pub(super) fn user_text(text: &str) -> Self {
        Self::history(Role::User, text)
    }

    /// A tool's result for the model.
    pub(super) fn tool_output(call_id: &str, output: &Value) -> Self {
        Self::ItemCreate {
            item: json!({
                "type": "function_call_output",
                "call_id": call_id,
                "output": output.to_string(),
            }),
        }
    }

    pub(super) fn respond() -> Self {
        Self::ResponseCreate {
            response: json!({}),
        }
    }

    pub(super) fn to_text(&self) -> String {
        // Serialising these plain types cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// An event the service sends, as far as Sonora reads it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type")]
pub(super) enum ServerEvent {
    #[serde(rename = "session.created")]
    SessionCreated {},
    #[serde(rename = "session.updated")]
    SessionUpdated {},
    #[serde(rename = "error")]
    Error { error: ApiError },
    #[serde(rename = "input_audio_buffer.speech_started")]
    SpeechStarted {
        #[serde(default)]
        item_id: String,
    },
    #[serde(rename = "input_audio_buffer.speech_stopped")]
    SpeechStopped {
        #[serde(default)]
        item_id: String,
    },
    #[serde(rename = "conversation.item.input_audio_transcription.delta")]
    InputTranscriptDelta {
        #[serde(default)]
        item_id: String,
        #[serde(default)]
        delta: String,
    },
    #[serde(rename = "conversation.item.input_audio_transcription.completed")]
    InputTranscript {
        #[serde(default)]
        item_id: String,
        #[serde(default)]
        transcript: String,
        #[serde(default)]
        usage: Option<TranscriptionUsage>,
    },
    #[serde(rename = "conversation.item.input_audio_transcription.failed")]
    InputTranscriptFailed {
        #[serde(default)]
        item_id: String,
    },
    #[serde(rename = "response.created")]
    ResponseCreated { response: ResponseInfo },
    #[serde(rename = "response.output_audio.delta")]
    AudioDelta {
        #[serde(default)]
        response_id: String,
        item_id: String,
        delta: String,
    },
    #[serde(
        rename = "response.output_audio_transcript.delta",
        alias = "response.output_text.delta"
    )]
    TranscriptDelta {
        #[serde(default)]
        item_id: String,
        delta: String,
    },
    #[serde(
        rename = "response.output_audio_transcript.done",
        alias = "response.output_text.done"
    )]
    TranscriptDone {
        #[serde(default)]
        item_id: String,
        #[serde(default, alias = "text")]
        transcript: String,
    },
    #[serde(rename = "response.function_call_arguments.done")]
    FunctionCall {
        call_id: String,
        name: String,
        #[serde(default)]
        arguments: String,
    },
    #[serde(rename = "response.done")]
    ResponseDone { response: ResponseInfo },
    #[serde(other)]
    Other,
}

/// The `error` object of an `error` event or of a failed response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(super) struct ApiError {
    #[serde(default, rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) code: Option<String>,
    #[serde(default)]
    pub(super) message: String,
}

impl ApiError {
    /// The code, or the type when there is no code.
    pub(super) fn code(&self) -> &str {
        self.code.as_deref().unwrap_or(&self.kind)
    }

    /// The service throttles or the account's quota is used up.
    pub(super) fn throttled(&self) -> bool {
        let code = self.code();
        code.contains("rate_limit") || code.contains("quota") || self.kind.contains("rate_limit")
    }
}

/// A response as `response.created` and `response.done` describe it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(super) struct ResponseInfo {
    #[serde(default)]
    pub(super) id: String,
    #[serde(default)]
    pub(super) status: String,
    #[serde(default)]
    pub(super) status_details: Option<StatusDetails>,
    #[serde(default)]
    pub(super) usage: Option<Usage>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(super) struct StatusDetails {
    #[serde(default)]
    pub(super) reason: Option<String>,
    #[serde(default)]
    pub(super) error: Option<ApiError>,
}

/// `response.usage`: tokens of one response, not running totals. Cached
/// input tokens are part of the input tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(super) struct Usage {
    #[serde(default)]
    pub(super) input_tokens: u64,
    #[serde(default)]
    pub(super) output_tokens: u64,
    #[serde(default)]
    pub(super) input_token_details: InputDetails,
    #[serde(default)]
    pub(super) output_token_details: OutputDetails,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(super) struct InputDetails {
    #[serde(default)]
    pub(super) text_tokens: u64,
    #[serde(default)]
    pub(super) audio_tokens: u64,
    #[serde(default)]
    pub(super) cached_tokens: u64,
    #[serde(default)]
    pub(super) cached_tokens_details: CachedDetails,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(super) struct CachedDetails {
    #[serde(default)]
    pub(super) text_tokens: u64,
    #[serde(default)]
    pub(super) audio_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(super) struct OutputDetails {
    #[serde(default)]
    pub(super) text_tokens: u64,
    #[serde(default)]
    pub(super) audio_tokens: u64,
}

/// A transcription model's own usage, billed apart from the speech model.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(super) enum TranscriptionUsage {
    Tokens {
        #[serde(default)]
        input_tokens: u64,
        #[serde(default)]
        output_tokens: u64,
        #[serde(default)]
        input_token_details: Option<TranscriptionInput>,
    },
    Duration {
        #[serde(default)]
        seconds: f64,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(super) struct TranscriptionInput {
    #[serde(default)]
    pub(super) text_tokens: u64,
    #[serde(default)]
    pub(super) audio_tokens: u64,
}

/// Reads one message of the service; `None` for what is not JSON or not an
/// object with a `type`.
pub(super) fn parse(text: &str) -> Option<ServerEvent> {
    serde_json::from_str(text).ok()
}
