//! Nova Sonic's output events, parsed into typed values.

use serde::Deserialize;
use serde_json::Value;

use super::input::BlockRole;
use crate::base64::decode as base64_decode;

/// One output event, parsed.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::enum_variant_names,
    reason = "named after the wire events textOutput and audioOutput"
)]
pub(crate) enum Output {
    CompletionStart,
    ContentStart {
        content_id: String,
        kind: BlockKind,
        role: Option<BlockRole>,
        /// From the nested `additionalModelFields` JSON.
        stage: Option<GenerationStage>,
    },
    TextOutput {
        content_id: String,
        content: String,
    },
    AudioOutput {
        content_id: String,
        samples: Vec<i16>,
    },
    ToolUse {
        content_id: String,
        tool_use_id: String,
        tool_name: String,
        /// The arguments, parsed from their JSON string.
        input: Value,
    },
    ContentEnd {
        content_id: String,
        kind: Option<BlockKind>,
        stop_reason: Option<String>,
    },
    CompletionEnd {
        stop_reason: Option<String>,
    },
    /// The `usageEvent` object, for `usage::UsageMeter::ingest`.
    Usage(Value),
    /// An event this version does not know: kept by name, never fatal.
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum BlockKind {
    Text,
    Audio,
    Tool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum GenerationStage {
    Speculative,
    Final,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContentStart {
    #[serde(default)]
    content_id: String,
    #[serde(rename = "type")]
    kind: Option<BlockKind>,
    role: Option<BlockRole>,
    additional_model_fields: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContent {
    #[serde(default)]
    content_id: String,
    #[serde(default)]
    content: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawToolUse {
    #[serde(default)]
    content_id: String,
    tool_use_id: String,
    tool_name: String,
    #[serde(default)]
    content: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContentEnd {
    #[serde(default)]
    content_id: String,
    #[serde(rename = "type")]
    kind: Option<BlockKind>,
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCompletionEnd {
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stage {
    generation_stage: GenerationStage,
}

/// Parses one output chunk's JSON. An error means the chunk is not an
/// event at all (or a known event with a broken body).
pub(crate) fn parse_output(bytes: &[u8]) -> Result<Output, String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("event is not JSON: {e}"))?;
    let Some(Value::Object(event)) = value.get("event") else {
        return Err("no \"event\" object".into());
    };
    let Some((name, body)) = event.iter().next() else {
        return Err("empty \"event\" object".into());
    };
    let body = body.clone();
    let broken = |e: serde_json::Error| format!("{name}: {e}");
    Ok(match name.as_str() {
        "completionStart" => Output::CompletionStart,
        "contentStart" => {
            let raw: RawContentStart = serde_json::from_value(body).map_err(broken)?;
            let stage = raw
                .additional_model_fields
                .as_deref()
                .and_then(|fields| serde_json::from_str::<Stage>(fields).ok())
                .map(|s| s.generation_stage);
            match raw.kind {
                Some(kind) => Output::ContentStart {
                    content_id: raw.content_id,
                    kind,
                    role: raw.role,
                    stage,
                },
                None => Output::Other("contentStart without a type".into()),
            }
        }
        "textOutput" => {
            let raw: RawContent = serde_json::from_value(body).map_err(broken)?;
            Output::TextOutput {
                content_id: raw.content_id,
                content: raw.content,
            }
        }
        "audioOutput" => {
            let raw: RawContent = serde_json::from_value(body).map_err(broken)?;
            let bytes = base64_decode(&raw.content).map_err(|e| format!("audioOutput: {e}"))?;
            if bytes.len() % 2 != 0 {
                return Err("audioOutput: an odd number of bytes".into());
            }
            let samples = crate::audio::samples_from_le(&bytes).collect();
            Output::AudioOutput {
                content_id: raw.content_id,
                samples,
            }
        }
        "toolUse" => {
            let raw: RawToolUse = serde_json::from_value(body).map_err(broken)?;
            let input = if raw.content.trim().is_empty() {
                Value::Object(serde_json::Map::new())
            } else {
                serde_json::from_str(&raw.content).map_err(|e| {
                    format!("toolUse {}: arguments are not JSON: {e}", raw.tool_name)
                })?
            };
            Output::ToolUse {
                content_id: raw.content_id,
                tool_use_id: raw.tool_use_id,
                tool_name: raw.tool_name,
                input,
            }
        }
        "contentEnd" => {
            let raw: RawContentEnd = serde_json::from_value(body).map_err(broken)?;
            Output::ContentEnd {
                content_id: raw.content_id,
                kind: raw.kind,
                stop_reason: raw.stop_reason,
            }
        }
        "completionEnd" => {
            let raw: RawCompletionEnd = serde_json::from_value(body).map_err(broken)?;
            Output::CompletionEnd {
                stop_reason: raw.stop_reason,
            }
        }
        "usageEvent" => Output::Usage(body),
        other => Output::Other(other.to_owned()),
    })
}

/// Whether an assistant text is the barge-in marker `{ "interrupted" : true }`.
pub(crate) fn is_interruption_marker(text: &str) -> bool {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("interrupted").and_then(Value::as_bool))
        .unwrap_or(false)
}
