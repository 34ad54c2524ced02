//! The Live API's messages as serde types: what Sonora sends (one key per
//! message) and what it reads of what the service sends. A server message
//! is an object whose fields say what it carries; fields Sonora does not
//! read are ignored, and one with a field of the wrong type is malformed.

use std::time::Duration;

use crate::engine::Role;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A message Sonora sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum ClientMessage {
    /// The connection's settings: sent once, first.
    Setup(Value),
    RealtimeInput(RealtimeInput),
    ClientContent(ClientContent),
    ToolResponse(ToolResponse),
}

/// Input in the realtime stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum RealtimeInput {
    /// Base64 PCM16 with its rate in `mime_type`.
    Audio {
        data: String,
        #[serde(rename = "mimeType")]
        mime_type: String,
    },
    /// Typed user words.
    Text(String),
}

/// Ordered turns: the conversation so far, replayed into a fresh session.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ClientContent {
    turns: Vec<Value>,
    turn_complete: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ToolResponse {
    function_responses: Vec<Value>,
}

impl ClientMessage {
    /// 16 kHz PCM16 user audio.
    pub(super) fn audio(samples: &[i16]) -> Self {
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        Self::RealtimeInput(RealtimeInput::Audio {
            data: crate::base64::encode(&bytes),
            mime_type: format!("audio/pcm;rate={}", super::INPUT_RATE_HZ),
        })
    }

    pub(super) fn text(text: &str) -> Self {
        Self::RealtimeInput(RealtimeInput::Text(text.to_owned()))
    }

    /// The conversation so far as text turns; the model waits for the
    /// user's next words before it answers.
    pub(super) fn history(messages: &[(Role, String)]) -> Self {
        let turns = messages
            .iter()
            .map(|(role, text)| {
                let role = match role {
                    Role::User => "user",
                    Role::Assistant => "model",
                };
                json!({"role": role, "parts": [{"text": text}]})
            })
            .collect();
        Self::ClientContent(ClientContent {
            turns,
            turn_complete: false,
        })
    }

    /// A tool's result. The service takes an object: anything else is
    /// wrapped as `{"result": …}`.
    pub(super) fn tool_response(id: &str, name: &str, result: &Value) -> Self {
        let response = if result.is_object() {
            result.clone()
        } else {
            json!({"result": result})
        };
        Self::ToolResponse(ToolResponse {
            function_responses: vec![json!({"id": id, "name": name, "response": response})],
        })
    }

    pub(super) fn to_text(&self) -> String {
        // Serialising these plain types cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A message the service sends, as far as Sonora reads it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServerMessage {
    #[serde(default)]
    pub(super) setup_complete: Option<Value>,
    #[serde(default)]
    pub(super) server_content: Option<ServerContent>,
    #[serde(default)]
    pub(super) tool_call: Option<ToolCall>,
    #[serde(default)]
    pub(super) tool_call_cancellation: Option<ToolCallCancellation>,
    #[serde(default)]
    pub(super) go_away: Option<GoAway>,
    #[serde(default)]
    pub(super) session_resumption_update: Option<ResumptionUpdate>,
    #[serde(default)]
    pub(super) usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    pub(super) voice_activity: Option<VoiceActivity>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ServerContent {
    #[serde(default)]
    pub(super) model_turn: Option<Content>,
    #[serde(default)]
    pub(super) input_transcription: Option<Transcription>,
    #[serde(default)]
    pub(super) output_transcription: Option<Transcription>,
    #[serde(default)]
    pub(super) interrupted: bool,
    #[serde(default)]
    pub(super) generation_complete: bool,
    #[serde(default)]
    pub(super) turn_complete: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(super) struct Content {
    #[serde(default)]
    pub(super) parts: Vec<Part>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Part {
    #[serde(default)]
    pub(super) inline_data: Option<Blob>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Blob {
    #[serde(default)]
    pub(super) mime_type: String,
    #[serde(default)]
    pub(super) data: String,
}

impl Blob {
    /// The sample rate of PCM audio (`audio/pcm;rate=24000`); `None` for
    /// anything that is not PCM audio.
    pub(super) fn pcm_rate_hz(&self) -> Option<u32> {
        let mut parts = self.mime_type.split(';').map(str::trim);
        if !parts.next()?.eq_ignore_ascii_case("audio/pcm") {
            return None;
        }
        let rate = parts
            .find_map(|p| p.strip_prefix("rate="))
            .and_then(|r| r.parse().ok());
        Some(rate.unwrap_or(super::OUTPUT_RATE_HZ))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(super) struct Transcription {
    #[serde(default)]
    pub(super) text: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ToolCall {
    #[serde(default)]
    pub(super) function_calls: Vec<FunctionCall>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(super) struct FunctionCall {
    #[serde(default)]
    pub(super) id: String,
    pub(super) name: String,
    #[serde(default)]
    pub(super) args: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(super) struct ToolCallCancellation {
    #[serde(default)]
    pub(super) ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct GoAway {
    /// A protobuf duration as JSON: `"50s"`, `"1.5s"`.
    #[serde(default)]
    pub(super) time_left: Option<String>,
}

impl GoAway {
    /// The time left, when it is given and readable.
    pub(super) fn time_left(&self) -> Option<Duration> {
        let text = self.time_left.as_deref()?.trim().strip_suffix('s')?;
        let secs: f64 = text.parse().ok()?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ResumptionUpdate {
    #[serde(default)]
    pub(super) new_handle: String,
    #[serde(default)]
    pub(super) resumable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct VoiceActivity {
    #[serde(default)]
    pub(super) voice_activity_type: String,
}

/// `usageMetadata`: the tokens of one model turn, not running totals. The
/// per-modality lists leave out modalities with no tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UsageMetadata {
    #[serde(default)]
    pub(super) prompt_token_count: u64,
    #[serde(default)]
    pub(super) cached_content_token_count: u64,
    #[serde(default)]
    pub(super) response_token_count: u64,
    #[serde(default)]
    pub(super) tool_use_prompt_token_count: u64,
    #[serde(default)]
    pub(super) thoughts_token_count: u64,
    #[serde(default)]
    pub(super) total_token_count: u64,
    #[serde(default)]
    pub(super) prompt_tokens_details: Option<Vec<ModalityCount>>,
    #[serde(default)]
    pub(super) cache_tokens_details: Option<Vec<ModalityCount>>,
    #[serde(default)]
    pub(super) response_tokens_details: Option<Vec<ModalityCount>>,
    #[serde(default)]
    pub(super) tool_use_prompt_tokens_details: Option<Vec<ModalityCount>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ModalityCount {
    #[serde(default)]
    pub(super) modality: String,
    #[serde(default)]
    pub(super) token_count: u64,
}

/// Reads one message of the service, from a text or a binary frame; `None`
/// for what is not a JSON object of the expected shape.
pub(super) fn parse(bytes: &[u8]) -> Option<ServerMessage> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    if !value.is_object() {
        return None;
    }
    serde_json::from_value(value).ok()
}
