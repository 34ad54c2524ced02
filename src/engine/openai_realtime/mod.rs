//! OpenAI Realtime (the GA interface over WebSocket; Azure OpenAI's too).
//!
//! `wire` holds the events as serde types, `prices` the models' published
//! prices (cached input and the transcription model included), `cost` turns
//! a response's usage into exact per-modality cost, `connect` opens a session
//! (with the conversation as text, `engine::text_history`), and
//! `conversation` drives one conversation: 24 kHz audio in and out, the
//! service's voice detection, barge-in with the reply cut where the user
//! stopped hearing it, tools, reconnection and the warm hand-off before the
//! service's session limit.
//! The wire types never leave this module.

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

pub use self::prices::{Prices, builtin_prices};
use super::wss::{ConnectError, Tls};
use super::{ConversationOptions, Engine, EngineSession, EngineStat, StartError, Voice};
use crate::config::OpenAiRealtimeConfig;
use crate::tools::Tools;

/// The service's own endpoint.
pub const DEFAULT_ENDPOINT: &str = "wss://api.openai.com/v1/realtime";
/// The model when none is configured.
pub const DEFAULT_MODEL: &str = "gpt-realtime";
/// The rate of the audio the service takes and sends (`audio/pcm` is 24 kHz only).
pub const RATE_HZ: u32 = 24_000;
/// The service ends a session after 60 minutes.
pub const SESSION_LIMIT: Duration = Duration::from_secs(60 * 60);

/// The voices the service offers; none is bound to a language.
const VOICES: [(&str, &str); 10] = [
    ("marin", "Marin"),
    ("cedar", "Cedar"),
    ("alloy", "Alloy"),
    ("ash", "Ash"),
    ("ballad", "Ballad"),
    ("coral", "Coral"),
    ("echo", "Echo"),
    ("sage", "Sage"),
    ("shimmer", "Shimmer"),
    ("verse", "Verse"),
];

/// How the service decides that the user finished a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnDetection {
    /// Silence after speech: `silence_ms` of it ends the turn.
    ServerVad { silence_ms: u32 },
    /// The service's model of whether the user is done.
    SemanticVad,
}

/// Everything an OpenAI Realtime conversation is made with.
#[derive(Debug, Clone)]
pub struct OpenAiRealtimeSettings {
    /// `wss://…/v1/realtime` (the model is added as a query parameter).
    pub endpoint_url: String,
    pub api_key: String,
    pub model: String,
    /// Voice when a conversation asks for none.
    pub voice: String,
    pub system_prompt: String,
    /// The model that transcribes the user's speech; empty: no user transcripts.
    pub transcription_model: String,
    pub turn_detection: TurnDetection,
    /// PEM certificates trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Session age at which the conversation moves to a new session at the
    /// next quiet moment.
    pub rotate_after: Duration,
    /// No event for this long while a reply is due means a stalled session.
    pub stall_timeout: Duration,
    /// Reconnections allowed within one turn.
    pub max_retries: u32,
    /// How long a throttling or quota answer keeps new conversations away.
    pub cooldown: Duration,
    pub prices: Prices,
}

impl OpenAiRealtimeSettings {
    /// Settings from the configuration; the key falls back to `OPENAI_API_KEY`.
    pub fn from_config(config: &OpenAiRealtimeConfig) -> Self {
        let text = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        let api_key = text(&config.api_key)
            .or_else(|| std::env::var("OPENAI_API_KEY").ok().and_then(|k| text(&k)))
            .unwrap_or_default();
        let turn_detection = if config.turn_detection == "semantic_vad" {
            TurnDetection::SemanticVad
        } else {
            TurnDetection::ServerVad {
                silence_ms: config.vad_silence_ms,
            }
        };
        Self {
            endpoint_url: text(&config.endpoint_url).unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            api_key,
            model: config.model.clone(),
            voice: config.voice.clone(),
            system_prompt: text(&config.system_prompt)
                .unwrap_or_else(|| super::DEFAULT_SYSTEM_PROMPT.to_owned()),
            transcription_model: config.transcription_model.trim().to_owned(),
            turn_detection,
            ca_file: text(&config.ca_file).map(Into::into),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms.into()),
            rotate_after: Duration::from_secs(config.rotate_after_s.into()),
            stall_timeout: Duration::from_millis(config.stall_timeout_ms.into()),
            max_retries: config.max_retries,
            cooldown: Duration::from_millis(config.cooldown_ms.into()),
            prices: prices::from_config(config),
        }
    }

    /// The URL with the model as a query parameter.
    fn url(&self) -> String {
        let url = self.endpoint_url.trim_end_matches('/');
        if url.contains("model=") {
            return url.to_owned();
        }
        let join = if url.contains('?') { '&' } else { '?' };
        format!("{url}{join}model={}", self.model)
    }

    /// The authentication header: Azure OpenAI takes `api-key`, OpenAI a bearer token.
    fn auth_header(&self) -> (&'static str, String) {
        let host = self
            .endpoint_url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', ':', '?']).next())
            .unwrap_or_default();
        if host.ends_with(".azure.com") {
            ("api-key", self.api_key.clone())
        } else {
            ("authorization", format!("Bearer {}", self.api_key))
        }
    }
}

/// Numbers for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    hand_offs: AtomicU64,
    malformed: AtomicU64,
}

/// What the engine's conversations share.
type Shared = super::cloud::Shared<OpenAiRealtimeSettings, Stats>;

/// The OpenAI Realtime engine: one connection per conversation.
#[derive(Debug, Clone)]
pub struct OpenAiRealtimeEngine {
    shared: Arc<Shared>,
}

impl OpenAiRealtimeEngine {
    /// Checks the settings and reads the certificates; nothing is sent to the
    /// service until a conversation starts.
    pub fn new(settings: OpenAiRealtimeSettings, tools: Option<Tools>) -> Result<Self, String> {
        if settings.api_key.is_empty() {
            return Err(
                "no OpenAI API key: set openai_realtime.api_key or OPENAI_API_KEY".to_owned(),
            );
        }
        let tls = Tls::new(settings.ca_file.as_deref())?;
        let shared = Shared::new(tls, settings.cooldown, settings, tools);
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    pub fn settings(&self) -> &OpenAiRealtimeSettings {
        &self.shared.settings
    }
}

impl Engine for OpenAiRealtimeEngine {
    fn probe(&self) -> Option<super::Probe<'_>> {
        Some(Box::pin(async move {
            let settings = &self.shared.settings;
            let opening = connect::Opening {
                voice: settings.voice.clone(),
                language: "es".to_owned(),
                history: Vec::new(),
                delay: Duration::ZERO,
            };
            let conn = connect::open(self.shared.clone(), opening)
                .await
                .map_err(|e| match e {
                    ConnectError::Auth(_) | ConnectError::Refused(_) => {
                        super::ProbeError::Refused(e.to_string())
                    }
                    ConnectError::Throttled(_) | ConnectError::Unavailable(_) => {
                        super::ProbeError::Unreached(e.to_string())
                    }
                })?;
            conn.close(Duration::from_secs(2)).await;
            Ok(format!(
                "{} took the key and opened a session",
                settings.model
            ))
        }))
    }

    fn name(&self) -> &'static str {
        "openai-realtime"
    }

    fn voices(&self) -> Vec<Voice> {
        VOICES
            .iter()
            .map(|(id, label)| Voice::new(id, label, "mul"))
            .collect()
    }

    fn prices(&self) -> String {
        self.shared
            .settings
            .prices
            .stamp(&self.shared.settings.model)
    }

    fn paid(&self) -> bool {
        true
    }

    fn start(&self, options: ConversationOptions) -> Result<EngineSession, StartError> {
        let voice = if options.voice.is_empty() {
            self.shared.settings.voice.clone()
        } else {
            options.voice.to_ascii_lowercase()
        };
        if !VOICES.iter().any(|(id, _)| *id == voice) {
            return Err(StartError::Unsupported(format!(
                "OpenAI Realtime has no voice {voice:?}"
            )));
        }
        if let Some(refusal) = self.shared.refusal("OpenAI Realtime") {
            return Err(refusal);
        }
        let options = ConversationOptions { voice, ..options };
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
                "hand_offs_total",
                "Conversations moved to a new OpenAI Realtime session before the session limit.",
                &stats.hand_offs,
            ),
            counter(
                "malformed_events_total",
                "Messages from OpenAI Realtime that were not the events they claimed to be.",
                &stats.malformed,
            ),
        ];
        self.shared.stats(own)
    }
}
