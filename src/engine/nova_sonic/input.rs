//! Nova Sonic's input events as serde types: every event is built by a
//! serializer, never a string template. The wire shape is
//! `{"event": {"<eventName>": {…}}}` inside each event-stream chunk.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::base64::encode as base64_encode;

/// Audio sample size, in bits, for both directions.
const SAMPLE_BITS: u32 = 16;

/// One input event, serialized as `{"event": {"<name>": body}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Input {
    event: InputEvent,
}

impl Input {
    /// The UTF-8 JSON bytes that go in one `chunk`.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        // Serializing these plain structs cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    #[cfg(test)]
    pub(crate) fn name(&self) -> &'static str {
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
pub(crate) struct Tool {
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
    pub(crate) fn new(name: &str, description: &str, schema: &Value) -> Self {
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
pub(crate) enum BlockRole {
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
pub(crate) struct Builder {
    prompt: String,
    next_content: u64,
}

impl Builder {
    /// `prompt` must be unique per stream (a UUID in practice).
    pub(crate) fn new(prompt: &str) -> Self {
        Self {
            prompt: prompt.to_owned(),
            next_content: 0,
        }
    }

    /// A fresh content name: never reused within the stream.
    pub(crate) fn content_name(&mut self, what: &str) -> String {
        self.next_content += 1;
        format!("{}-{what}-{}", self.prompt, self.next_content)
    }

    pub(crate) fn session_start(
        &self,
        inference: Inference,
        endpointing: Option<Endpointing>,
    ) -> Input {
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
    pub(crate) fn prompt_start(&self, voice: &str, output_rate_hz: u32, tools: &[Tool]) -> Input {
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
    pub(crate) fn text_block(
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
    pub(crate) fn audio_start(&mut self, input_rate_hz: u32) -> (Input, String) {
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
    pub(crate) fn audio_input(&self, audio: &str, samples: &[i16]) -> Input {
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
    pub(crate) fn tool_result(&mut self, tool_use_id: &str, result: &Value) -> Vec<Input> {
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

    pub(crate) fn content_end(&self, name: &str) -> Input {
        Input {
            event: InputEvent::ContentEnd(ContentRef {
                prompt_name: self.prompt.clone(),
                content_name: name.to_owned(),
            }),
        }
    }

    /// The closing pair after the audio block's `contentEnd`.
    pub(crate) fn prompt_and_session_end(&self) -> [Input; 2] {
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
