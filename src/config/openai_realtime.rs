//! The `[openai_realtime]` section: OpenAI Realtime (or Azure OpenAI's).

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// OpenAI Realtime over WebSocket (`crate::engine::openai_realtime`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiRealtimeConfig {
    /// Endpoint, `wss://…/v1/realtime`; empty: OpenAI's (an Azure OpenAI resource's `wss://NAME.openai.azure.com/openai/v1/realtime` works too) (no unit).
    pub endpoint_url: String,
    /// API key; empty: `OPENAI_API_KEY` from the environment (no unit).
    pub api_key: String,
    /// Model (on Azure, the deployment), e.g. `gpt-realtime`, `gpt-realtime-mini` (no unit).
    pub model: String,
    /// Voice when the client asks for none, e.g. `marin`, `cedar` (no unit).
    pub voice: String,
    /// System prompt; empty uses the built-in Spanish help-desk prompt (text).
    pub system_prompt: String,
    /// Model that transcribes the user's speech, e.g. `gpt-4o-mini-transcribe`; empty: no user transcripts (no unit).
    pub transcription_model: String,
    /// End of the user's turn: `server_vad` (silence) or `semantic_vad` (no unit).
    pub turn_detection: String,
    /// Silence that ends a turn with `server_vad`, in milliseconds.
    pub vad_silence_ms: u32,
    /// PEM file of certificates to trust besides the system's (path).
    pub ca_file: String,
    /// Longest wait to open a session, in milliseconds.
    pub connect_timeout_ms: u32,
    /// Session age after which the conversation moves to a new session at the next quiet moment (the service ends sessions at 60 minutes), in seconds.
    pub rotate_after_s: u32,
    /// No reply for this long after the user's turn means a stalled session, in milliseconds.
    pub stall_timeout_ms: u32,
    /// Reconnections allowed before a reply completes, in tries.
    pub max_retries: u32,
    /// After throttling or a quota answer, how long new conversations are refused, in milliseconds.
    pub cooldown_ms: u32,
    /// Audio input price; 0 keeps the published one, in USD per 1,000 tokens.
    pub speech_in_usd_per_1k: f64,
    /// Cached audio input price; 0 keeps the published one, in USD per 1,000 tokens.
    pub cached_speech_in_usd_per_1k: f64,
    /// Audio output price; 0 keeps the published one, in USD per 1,000 tokens.
    pub speech_out_usd_per_1k: f64,
    /// Text input price; 0 keeps the published one, in USD per 1,000 tokens.
    pub text_in_usd_per_1k: f64,
    /// Cached text input price; 0 keeps the published one, in USD per 1,000 tokens.
    pub cached_text_in_usd_per_1k: f64,
    /// Text output price; 0 keeps the published one, in USD per 1,000 tokens.
    pub text_out_usd_per_1k: f64,
    /// Transcription model input price; 0 keeps the published one, in USD per 1,000 tokens.
    pub transcription_in_usd_per_1k: f64,
    /// Transcription model output price; 0 keeps the published one, in USD per 1,000 tokens.
    pub transcription_out_usd_per_1k: f64,
}

impl Default for OpenAiRealtimeConfig {
    fn default() -> Self {
        Self {
            endpoint_url: String::new(),
            api_key: String::new(),
            model: "gpt-realtime".into(),
            voice: "marin".into(),
            system_prompt: String::new(),
            transcription_model: "gpt-4o-mini-transcribe".into(),
            turn_detection: "server_vad".into(),
            vad_silence_ms: 500,
            ca_file: String::new(),
            connect_timeout_ms: 10_000,
            rotate_after_s: 3_300,
            stall_timeout_ms: 15_000,
            max_retries: 3,
            cooldown_ms: 30_000,
            speech_in_usd_per_1k: 0.0,
            cached_speech_in_usd_per_1k: 0.0,
            speech_out_usd_per_1k: 0.0,
            text_in_usd_per_1k: 0.0,
            cached_text_in_usd_per_1k: 0.0,
            text_out_usd_per_1k: 0.0,
            transcription_in_usd_per_1k: 0.0,
            transcription_out_usd_per_1k: 0.0,
        }
    }
}

impl OpenAiRealtimeConfig {
    /// The first bad setting, made into an error by `bad(key, value shown, reason)`.
    pub(super) fn check(
        &self,
        bad: &dyn Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let quoted = |s: &str| toml::Value::from(s).to_string();
        let url = self.endpoint_url.trim();
        if !url.is_empty() && !url.starts_with("wss://") && !url.starts_with("ws://") {
            return Err(bad(
                "openai_realtime.endpoint_url",
                quoted(url),
                "must start with wss:// (or ws:// for a local test server)",
            ));
        }
        if self.model.trim().is_empty() || self.model.contains(['&', '?', '#', ' ']) {
            return Err(bad(
                "openai_realtime.model",
                quoted(&self.model),
                "must be a model or deployment name",
            ));
        }
        if !matches!(self.turn_detection.as_str(), "server_vad" | "semantic_vad") {
            return Err(bad(
                "openai_realtime.turn_detection",
                quoted(&self.turn_detection),
                "must be server_vad or semantic_vad",
            ));
        }
        #[rustfmt::skip]
        let ranges = [
            ("openai_realtime.vad_silence_ms", self.vad_silence_ms, 100, 5_000, "ms"),
            ("openai_realtime.connect_timeout_ms", self.connect_timeout_ms, 500, 60_000, "ms"),
            ("openai_realtime.rotate_after_s", self.rotate_after_s, 1, 3_540, "s"),
            ("openai_realtime.stall_timeout_ms", self.stall_timeout_ms, 1_000, 120_000, "ms"),
            ("openai_realtime.max_retries", self.max_retries, 0, 10, "tries"),
            ("openai_realtime.cooldown_ms", self.cooldown_ms, 0, 600_000, "ms"),
        ];
        super::check_ranges(&ranges, &bad)?;
        let prices = [
            (
                "openai_realtime.speech_in_usd_per_1k",
                self.speech_in_usd_per_1k,
            ),
            (
                "openai_realtime.cached_speech_in_usd_per_1k",
                self.cached_speech_in_usd_per_1k,
            ),
            (
                "openai_realtime.speech_out_usd_per_1k",
                self.speech_out_usd_per_1k,
            ),
            (
                "openai_realtime.text_in_usd_per_1k",
                self.text_in_usd_per_1k,
            ),
            (
                "openai_realtime.cached_text_in_usd_per_1k",
                self.cached_text_in_usd_per_1k,
            ),
            (
                "openai_realtime.text_out_usd_per_1k",
                self.text_out_usd_per_1k,
            ),
            (
                "openai_realtime.transcription_in_usd_per_1k",
                self.transcription_in_usd_per_1k,
            ),
            (
                "openai_realtime.transcription_out_usd_per_1k",
                self.transcription_out_usd_per_1k,
            ),
        ];
        super::check_prices(&prices, &bad)
    }
}
