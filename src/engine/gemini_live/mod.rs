//! Google's Gemini Live API (`BidiGenerateContent` over WebSocket).
//!
//! `wire` holds the messages as serde types, `prices` the models' prices
//! (third-party quotes, unconfirmed), `cost` bills a turn's usage from its
//! per-modality lists (the conversation as text for a session that cannot
//! be resumed is `engine::text_history`'s), `connect` opens a connection (`setup`,
//! `setupComplete`) and reads close codes, and `conversation` drives one
//! conversation: 16 kHz audio in, 24 kHz audio out, barge-in, tools, the
//! move to a resumed connection on `goAway` and reconnection after a loss.
//! The wire types never leave this module.
//!
//! Voice activity: the service detects the user's turns itself and by
//! default says nothing about them; it only interrupts its reply. So
//! `SpeechStarted`/`SpeechEnded` are emitted only when the service sends
//! `voiceActivity` messages, never inferred from its replies: a
//! `SpeechEnded` made up at the first reply audio would make the measured
//! latency (from `SpeechEnded` to that audio) zero. Without them no latency
//! is measured for the turn and its trace opens at the reply.

mod connect;
mod conversation;
mod cost;
mod prices;
mod wire;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use self::prices::{builtin_prices, stamp};
use super::wss::Tls;
use super::{ConversationOptions, Engine, EngineSession, EngineStat, StartError, Voice};
use crate::config::GeminiLiveConfig;
use crate::tools::Tools;
use crate::usage::PriceTable;

/// The service's own endpoint.
pub const DEFAULT_ENDPOINT: &str = "wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
/// The model when none is configured.
pub const DEFAULT_MODEL: &str = "gemini-3.1-flash-live-preview";
/// The rate of the user audio sent (the engine's own input rate).
pub const INPUT_RATE_HZ: u32 = 16_000;
/// The rate of the reply audio the service sends.
pub const OUTPUT_RATE_HZ: u32 = 24_000;

/// Chirp 3 HD voices; none is bound to a language.
const VOICES: [&str; 8] = [
    "Puck", "Charon", "Kore", "Fenrir", "Aoede", "Leda", "Orus", "Zephyr",
];

/// How the connection proves who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// An API key, sent as `x-goog-api-key`.
    ApiKey(String),
    /// An OAuth access token, sent as `Authorization: Bearer`.
    Bearer(String),
}

/// Everything a Gemini Live conversation is made with.
#[derive(Debug, Clone)]
pub struct GeminiLiveSettings {
    /// `wss://…BidiGenerateContent`.
    pub endpoint_url: String,
    /// `None` when neither a key nor a token is configured.
    pub credential: Option<Credential>,
    /// The model's name without `models/`.
    pub model: String,
    /// Voice when a conversation asks for none.
    pub voice: String,
    /// The model's instructions; the conversation's language is added to it.
    pub system_prompt: String,
    /// PEM certificates trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Longest wait to open a connection and have its setup accepted.
    pub connect_timeout: Duration,
    /// No reply for this long after the user's last words or a tool result
    /// means a stalled connection.
    pub stall_timeout: Duration,
    /// Reconnections allowed within one turn.
    pub max_retries: u32,
    /// How long a throttling or quota answer keeps new conversations away.
    pub cooldown: Duration,
    /// Rates by model, the configured ones in place of the built-in ones.
    pub prices: PriceTable,
}

impl GeminiLiveSettings {
    /// Settings from the configuration; the key falls back to
    /// `GEMINI_API_KEY`, then `GOOGLE_API_KEY`, and a configured access
    /// token is used instead of any key.
    pub fn from_config(config: &GeminiLiveConfig) -> Self {
        let text = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        let env = |name: &str| std::env::var(name).ok().and_then(|k| text(&k));
        let credential = match text(&config.access_token) {
            Some(token) => Some(Credential::Bearer(token)),
            None => text(&config.api_key)
                .or_else(|| env("GEMINI_API_KEY"))
                .or_else(|| env("GOOGLE_API_KEY"))
                .map(Credential::ApiKey),
        };
        let model = config.model.trim();
        let model = model.strip_prefix("models/").unwrap_or(model).to_owned();
        Self {
            endpoint_url: text(&config.endpoint_url).unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            credential,
            prices: prices::from_config(config, &model),
            model,
            voice: config.voice.trim().to_owned(),
            system_prompt: text(&config.system_prompt)
                .unwrap_or_else(|| super::DEFAULT_SYSTEM_PROMPT.to_owned()),
            ca_file: text(&config.ca_file).map(Into::into),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms.into()),
            stall_timeout: Duration::from_millis(config.stall_timeout_ms.into()),
            max_retries: config.max_retries,
            cooldown: Duration::from_millis(config.cooldown_ms.into()),
        }
    }

    /// The authentication header.
    fn auth_header(&self) -> Option<(&'static str, String)> {
        match self.credential.as_ref()? {
            Credential::ApiKey(key) => Some(("x-goog-api-key", key.clone())),
            Credential::Bearer(token) => Some(("authorization", format!("Bearer {token}"))),
        }
    }
}

/// The listed voice `name` stands for, case aside.
fn voice_named(name: &str) -> Option<&'static str> {
    VOICES
        .iter()
        .copied()
        .find(|v| v.eq_ignore_ascii_case(name))
}

/// Numbers for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    resumptions: AtomicU64,
    reconnects: AtomicU64,
    malformed: AtomicU64,
    usage_mismatches: AtomicU64,
}

/// What the engine's conversations share.
type Shared = super::cloud::Shared<GeminiLiveSettings, Stats>;

/// The Gemini Live engine: one connection (and its resumptions) per
/// conversation.
#[derive(Debug, Clone)]
pub struct GeminiLiveEngine {
    shared: Arc<Shared>,
}

impl GeminiLiveEngine {
    /// Checks the settings and reads the certificates; nothing is sent to the
    /// service until a conversation starts.
    pub fn new(settings: GeminiLiveSettings, tools: Option<Tools>) -> Result<Self, String> {
        if settings.credential.is_none() {
            return Err(
                "no Gemini API key: set gemini_live.api_key, GEMINI_API_KEY or \
                 GOOGLE_API_KEY (or gemini_live.access_token)"
                    .to_owned(),
            );
        }
        if voice_named(&settings.voice).is_none() {
            return Err(format!(
                "gemini_live.voice {:?} is not one of {}",
                settings.voice,
                VOICES.join(", ")
            ));
        }
        let tls = Tls::new(settings.ca_file.as_deref())?;
        let shared = Shared::new(tls, settings.cooldown, settings, tools);
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// What the engine was made with.
    pub fn settings(&self) -> &GeminiLiveSettings {
        &self.shared.settings
    }
}

impl Engine for GeminiLiveEngine {
    fn probe(&self) -> Option<super::Probe<'_>> {
        Some(Box::pin(async move {
            let settings = &self.shared.settings;
            let opening = connect::Opening {
                voice: settings.voice.clone(),
                language: "es".to_owned(),
                handle: None,
                history: Vec::new(),
                delay: Duration::ZERO,
            };
            let conn = connect::open(self.shared.clone(), opening)
                .await
                .map_err(|e| match e.verdict {
                    connect::Verdict::Fatal => super::ProbeError::Refused(e.message),
                    _ => super::ProbeError::Unreached(e.message),
                })?;
            conn.close(Duration::from_secs(2)).await;
            Ok(format!(
                "{} took the credentials and the setup",
                settings.model
            ))
        }))
    }

    fn name(&self) -> &'static str {
        "gemini-live"
    }

    fn voices(&self) -> Vec<Voice> {
        VOICES.iter().map(|id| Voice::new(id, id, "mul")).collect()
    }

    fn prices(&self) -> String {
        let settings = &self.shared.settings;
        stamp(&settings.prices, &settings.model)
    }

    fn paid(&self) -> bool {
        true
    }

    fn start(&self, options: ConversationOptions) -> Result<EngineSession, StartError> {
        let asked = if options.voice.is_empty() {
            &self.shared.settings.voice
        } else {
            &options.voice
        };
        let Some(voice) = voice_named(asked) else {
            return Err(StartError::Unsupported(format!(
                "Gemini Live has no voice {asked:?}"
            )));
        };
        if let Some(refusal) = self.shared.refusal("Gemini Live") {
            return Err(refusal);
        }
        let options = ConversationOptions {
            voice: voice.to_owned(),
            ..options
        };
        let shared = self.shared.clone();
        Ok(super::cloud::start(move |input, events| {
            conversation::run(shared, options, input, events)
        }))
    }

    fn busy(&self) -> Option<Duration> {
        self.shared.busy()
    }

    fn stats(&self) -> Vec<EngineStat> {
        let stats = &self.shared.stats;
        let counter = EngineStat::counter;
        let own = vec![
            counter(
                "resumptions_total",
                "Conversations moved to a resumed Gemini Live connection after goAway.",
                &stats.resumptions,
            ),
            counter(
                "reconnects_total",
                "Gemini Live connections reopened after a loss.",
                &stats.reconnects,
            ),
            counter(
                "malformed_events_total",
                "Messages from Gemini Live that were not the messages they claimed to be.",
                &stats.malformed,
            ),
            counter(
                "usage_mismatches_total",
                "Gemini Live usage reports whose per-modality lists did not add up to their totals.",
                &stats.usage_mismatches,
            ),
        ];
        self.shared.stats(own)
    }
}
