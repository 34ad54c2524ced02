//! The `[gemini_live]` section: Google's Gemini Live API.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Gemini Live over WebSocket (`crate::engine::gemini_live`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeminiLiveConfig {
    /// Endpoint, `wss://…/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent`; empty: Google's (no unit).
    pub endpoint_url: String,
    /// API key, sent as `x-goog-api-key`; empty: `GEMINI_API_KEY`, then `GOOGLE_API_KEY` from the environment (no unit).
    pub api_key: String,
    /// Access token sent as `Authorization: Bearer` instead of the key when set (no unit).
    pub access_token: String,
    /// Model, e.g. `gemini-3.1-flash-live-preview` (no unit).
    pub model: String,
    /// Voice when the client asks for none, e.g. `Kore`, `Puck` (no unit).
    pub voice: String,
    /// System prompt; empty uses the built-in Spanish help-desk prompt (text).
    pub system_prompt: String,
    /// PEM file of certificates to trust besides the system's (path).
    pub ca_file: String,
    /// Longest wait to open a connection and have its setup accepted, in milliseconds.
    pub connect_timeout_ms: u32,
    /// No reply for this long after the user's last words or a tool result means a stalled connection, in milliseconds.
    pub stall_timeout_ms: u32,
    /// Reconnections allowed before a reply completes, in tries.
    pub max_retries: u32,
    /// After a throttling or quota answer, how long new conversations are refused, in milliseconds.
    pub cooldown_ms: u32,
    /// Audio input price; 0 keeps the published one, in USD per 1,000 tokens.
    pub speech_in_usd_per_1k: f64,
    /// Audio output price; 0 keeps the published one, in USD per 1,000 tokens.
    pub speech_out_usd_per_1k: f64,
    /// Text input price; 0 keeps the published one, in USD per 1,000 tokens.
    pub text_in_usd_per_1k: f64,
    /// Text output price; 0 keeps the published one, in USD per 1,000 tokens.
    pub text_out_usd_per_1k: f64,
}

impl Default for GeminiLiveConfig {
    fn default() -> Self {
        Self {
            endpoint_url: String::new(),
            api_key: String::new(),
            access_token: String::new(),
            model: "gemini-3.1-flash-live-preview".into(),
            voice: "Kore".into(),
            system_prompt: String::new(),
            ca_file: String::new(),
            connect_timeout_ms: 10_000,
            stall_timeout_ms: 15_000,
            max_retries: 3,
            cooldown_ms: 30_000,
            speech_in_usd_per_1k: 0.0,
            speech_out_usd_per_1k: 0.0,
            text_in_usd_per_1k: 0.0,
            text_out_usd_per_1k: 0.0,
        }
    }
}

impl GeminiLiveConfig {
    /// The first bad setting, made into an error by `bad(key, value shown, reason)`.
    pub(super) fn check(
        &self,
        bad: &dyn Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let quoted = |s: &str| toml::Value::from(s).to_string();
        let url = self.endpoint_url.trim();
        if !url.is_empty() && !url.starts_with("wss://") && !url.starts_with("ws://") {
            return Err(bad(
                "gemini_live.endpoint_url",
                quoted(url),
                "must start with wss:// (or ws:// for a local test server)",
            ));
        }
        let model = self.model.trim();
        let bare = model.strip_prefix("models/").unwrap_or(model);
        if bare.is_empty() || bare.contains(['&', '?', '#', ' ', '/']) {
            return Err(bad(
                "gemini_live.model",
                quoted(&self.model),
                "must be a model name such as gemini-3.1-flash-live-preview",
            ));
        }
        if self.voice.trim().is_empty() || self.voice.contains(char::is_whitespace) {
            return Err(bad(
                "gemini_live.voice",
                quoted(&self.voice),
                "must be a voice name such as Kore",
            ));
        }
        if self.access_token.contains(char::is_whitespace) {
            return Err(bad(
                "gemini_live.access_token",
                "\"<redacted>\"".to_owned(),
                "must be the token alone, without `Bearer` or spaces",
            ));
        }
        #[rustfmt::skip]
        let ranges = [
            ("gemini_live.connect_timeout_ms", self.connect_timeout_ms, 500, 60_000, "ms"),
            ("gemini_live.stall_timeout_ms", self.stall_timeout_ms, 1_000, 120_000, "ms"),
            ("gemini_live.max_retries", self.max_retries, 0, 10, "tries"),
            ("gemini_live.cooldown_ms", self.cooldown_ms, 0, 600_000, "ms"),
        ];
        super::check_ranges(&ranges, &bad)?;
        let prices = [
            (
                "gemini_live.speech_in_usd_per_1k",
                self.speech_in_usd_per_1k,
            ),
            (
                "gemini_live.speech_out_usd_per_1k",
                self.speech_out_usd_per_1k,
            ),
            ("gemini_live.text_in_usd_per_1k", self.text_in_usd_per_1k),
            ("gemini_live.text_out_usd_per_1k", self.text_out_usd_per_1k),
        ];
        super::check_prices(&prices, &bad)
    }
}
