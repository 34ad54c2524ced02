//! Nova Sonic's event JSON, both ways, as serde types: every input event
//! is built by a serializer (never a string template), every output event
//! is parsed into a typed value. The wire shape is
//! `{"event": {"<eventName>": {…}}}` inside each event-stream chunk.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Audio sample size, in bits, for both directions.
const SAMPLE_BITS: u32 = 16;

/// One input event, serialized as `{"event": {"<name>": body}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Input {
    event: InputEvent,
}

impl Input {
    /// The UTF-8 JSON bytes that go in one `chunk`.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn name(&self) -> &'static str {
        match &self.event {
            InputEvent::SessionStart(_) => "sessionStart",
            InputEvent::PromptStart(_) => "promptStart",
            InputEvent::ContentStart(_) => "contentStart",
            InputEvent::TextInput(_) => "textInput",
            InputEvent::AudioInput(_) => "audioInput",
            InputEvent::ToolResult(_) => "toolResult",
            InputEvent::ContentEnd(_) => "contentEnd",
            InputEvent::PromptEnd(_) => "promptEnd",
            InputEvent::SessionEnd(_) => "sessionEnd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
enum InputEvent {
    SessionStart(SessionStart),
    PromptStart(PromptStart),
    ContentStart(ContentStart),
    TextInput(ContentChunk),
    AudioInput(ContentChunk),
    ToolResult(ContentChunk),
    ContentEnd(ContentRef),
    PromptEnd(PromptRef),
    SessionEnd(Empty),
}

/// Inference settings of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inference {
    pub max_tokens: u32,
    pub top_p: f32,
    pub temperature: f32,
}

impl Default for Inference {
    fn default() -> Self {
        Self {
            max_tokens: 1024,
            top_p: 0.9,
            temperature: 0.7,
        }
    }
}

/// Nova 2's end-of-turn patience.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Endpointing {
    High,
    Medium,
    Low,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionStart {
    inference_configuration: Inference,
    #[serde(skip_serializing_if = "Option::is_none")]
    turn_detection_configuration: Option<TurnDetection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct TurnDetection {
    endpointing_sensitivity: Endpointing,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct MediaType {
    media_type: &'static str,
}

const TEXT_PLAIN: MediaType = MediaType {
    media_type: "text/plain",
};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct AudioConfiguration {
    media_type: &'static str,
    sample_rate_hertz: u32,
    sample_size_bits: u32,
    channel_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    voice_id: Option<String>,
    encoding: &'static str,
    audio_type: &'static str,
}

impl AudioConfiguration {
    fn lpcm(rate_hz: u32, voice: Option<&str>) -> Self {
        Self {
            media_type: "audio/lpcm",
            sample_rate_hertz: rate_hz,
            sample_size_bits: SAMPLE_BITS,
            channel_count: 1,
            voice_id: voice.map(str::to_owned),
            encoding: "base64",
            audio_type: "SPEECH",
        }
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tool {
    #[serde(rename = "toolSpec")]
    spec: ToolSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolSpec {
    name: String,
    description: String,
    input_schema: ToolSchema,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct ToolSchema {
    /// The JSON schema as a JSON-encoded string, as the service wants it.
    json: String,
}

impl Tool {
    pub fn new(name: &str, description: &str, schema: &Value) -> Self {
        Self {
            spec: ToolSpec {
                name: name.to_owned(),
                description: description.to_owned(),
                input_schema: ToolSchema {
                    json: schema.to_string(),
                },
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct PromptStart {
    prompt_name: String,
    text_output_configuration: MediaType,
    audio_output_configuration: AudioConfiguration,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_use_output_configuration: Option<MediaType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_configuration: Option<ToolConfiguration>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfiguration {
    tools: Vec<Tool>,
    tool_choice: Value,
}

/// Who a content block speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BlockRole {
    System,
    SystemSpeech,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ContentStart {
    prompt_name: String,
    content_name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    interactive: bool,
    role: BlockRole,
    #[serde(skip_serializing_if = "Option::is_none")]
    text_input_configuration: Option<MediaType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audio_input_configuration: Option<AudioConfiguration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_result_input_configuration: Option<ToolResultConfiguration>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolResultConfiguration {
    tool_use_id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    text_input_configuration: MediaType,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ContentChunk {
    prompt_name: String,
    content_name: String,
    content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct ContentRef {
    prompt_name: String,
    content_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct PromptRef {
    prompt_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Empty {}

/// Builds the input events of one stream: one prompt, unique content names.
#[derive(Debug, Clone)]
pub struct Builder {
    prompt: String,
    next_content: u64,
}

impl Builder {
    /// `prompt` must be unique per stream (a UUID in practice).
    pub fn new(prompt: &str) -> Self {
        Self {
            prompt: prompt.to_owned(),
            next_content: 0,
        }
    }

    pub fn prompt_name(&self) -> &str {
        &self.prompt
    }

    /// A fresh content name: never reused within the stream.
    pub fn content_name(&mut self, what: &str) -> String {
        self.next_content += 1;
        format!("{}-{what}-{}", self.prompt, self.next_content)
    }

    pub fn session_start(&self, inference: Inference, endpointing: Option<Endpointing>) -> Input {
        Input {
            event: InputEvent::SessionStart(SessionStart {
                inference_configuration: inference,
                turn_detection_configuration: endpointing.map(|e| TurnDetection {
                    endpointing_sensitivity: e,
                }),
            }),
        }
    }

    /// The prompt, with the reply voice and rate and the tools (none: no
    /// tool configuration at all).
    pub fn prompt_start(&self, voice: &str, output_rate_hz: u32, tools: &[Tool]) -> Input {
        let tooling = (!tools.is_empty()).then(|| ToolConfiguration {
            tools: tools.to_vec(),
            tool_choice: serde_json::json!({"auto": {}}),
        });
        Input {
            event: InputEvent::PromptStart(PromptStart {
                prompt_name: self.prompt.clone(),
                text_output_configuration: TEXT_PLAIN,
                audio_output_configuration: AudioConfiguration::lpcm(output_rate_hz, Some(voice)),
                tool_use_output_configuration: tooling.as_ref().map(|_| MediaType {
                    media_type: "application/json",
                }),
                tool_configuration: tooling,
            }),
        }
    }

    /// A whole text block: start, the text in pieces of at most
    /// `max_piece_bytes` (cut at character boundaries), end.
    pub fn text_block(
        &mut self,
        role: BlockRole,
        interactive: bool,
        text: &str,
        max_piece_bytes: usize,
    ) -> Vec<Input> {
        let name = self.content_name("text");
        let mut events = vec![Input {
            event: InputEvent::ContentStart(ContentStart {
                prompt_name: self.prompt.clone(),
                content_name: name.clone(),
                kind: "TEXT",
                interactive,
                role,
                text_input_configuration: Some(TEXT_PLAIN),
                audio_input_configuration: None,
                tool_result_input_configuration: None,
            }),
        }];
        for piece in pieces(text, max_piece_bytes.max(4)) {
            events.push(Input {
                event: InputEvent::TextInput(ContentChunk {
                    prompt_name: self.prompt.clone(),
                    content_name: name.clone(),
                    content: piece.to_owned(),
                }),
            });
        }
        events.push(self.content_end(&name));
        events
    }

    /// Opens the user's audio block (kept open for the whole stream);
    /// returns the event and the block's name.
    pub fn audio_start(&mut self, input_rate_hz: u32) -> (Input, String) {
        let name = self.content_name("audio");
        let event = Input {
            event: InputEvent::ContentStart(ContentStart {
                prompt_name: self.prompt.clone(),
                content_name: name.clone(),
                kind: "AUDIO",
                interactive: true,
                role: BlockRole::User,
                text_input_configuration: None,
                audio_input_configuration: Some(AudioConfiguration::lpcm(input_rate_hz, None)),
                tool_result_input_configuration: None,
            }),
        };
        (event, name)
    }

    /// One frame of user audio for the block `audio`.
    pub fn audio_input(&self, audio: &str, samples: &[i16]) -> Input {
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        Input {
            event: InputEvent::AudioInput(ContentChunk {
                prompt_name: self.prompt.clone(),
                content_name: audio.to_owned(),
                content: base64_encode(&bytes),
            }),
        }
    }

    /// A tool result: start, the result (always a JSON object), end.
    pub fn tool_result(&mut self, tool_use_id: &str, result: &Value) -> Vec<Input> {
        let name = self.content_name("tool");
        let result = match result {
            Value::Object(_) => result.clone(),
            other => serde_json::json!({ "result": other }),
        };
        vec![
            Input {
                event: InputEvent::ContentStart(ContentStart {
                    prompt_name: self.prompt.clone(),
                    content_name: name.clone(),
                    kind: "TOOL",
                    interactive: false,
                    role: BlockRole::Tool,
                    text_input_configuration: None,
                    audio_input_configuration: None,
                    tool_result_input_configuration: Some(ToolResultConfiguration {
                        tool_use_id: tool_use_id.to_owned(),
                        kind: "TEXT",
                        text_input_configuration: TEXT_PLAIN,
                    }),
                }),
            },
            Input {
                event: InputEvent::ToolResult(ContentChunk {
                    prompt_name: self.prompt.clone(),
                    content_name: name.clone(),
                    content: result.to_string(),
                }),
            },
            self.content_end(&name),
        ]
    }

    pub fn content_end(&self, name: &str) -> Input {
        Input {
            event: InputEvent::ContentEnd(ContentRef {
                prompt_name: self.prompt.clone(),
                content_name: name.to_owned(),
            }),
        }
    }

    /// The closing pair after the audio block's `contentEnd`.
    pub fn prompt_and_session_end(&self) -> [Input; 2] {
        [
            Input {
                event: InputEvent::PromptEnd(PromptRef {
                    prompt_name: self.prompt.clone(),
                }),
            },
            Input {
                event: InputEvent::SessionEnd(Empty {}),
            },
        ]
    }
}

/// `text` cut into pieces of at most `max` bytes at character boundaries.
fn pieces(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        out.push(piece);
        rest = tail;
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(rest);
    }
    out
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional, whitespace refused).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let trimmed = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for (at, c) in trimmed.bytes().enumerate() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("invalid base64 byte {c:#04x} at {at}")),
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if bits >= 6 {
        return Err("truncated base64".into());
    }
    Ok(out)
}

/// One output event, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
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
pub enum BlockKind {
    Text,
    Audio,
    Tool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum GenerationStage {
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
pub fn parse_output(bytes: &[u8]) -> Result<Output, String> {
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
            let samples = bytes
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
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
pub fn is_interruption_marker(text: &str) -> bool {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("interrupted").and_then(Value::as_bool))
        .unwrap_or(false)
}
