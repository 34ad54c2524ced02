//! Amazon Nova Sonic (Bedrock bidirectional streaming).
//!
//! `input` builds every input event with serde types, `output` parses
//! every output event, `translate` turns them into `EngineEvent`s (turns,
//! transcripts by stage, audio, one barge-in per turn, tool calls, usage
//! through `usage_event`, which reads `usageEvent`s into the engine-neutral
//! `usage::UsageMeter`). `stream` is one SDK call and decides what kind of
//! failure each SDK error is, `client` the SDK client (Region, endpoint
//! override, CA file), `history` the text replayed into new streams, and
//! `conversation` drives one conversation across streams: silence while
//! the user is mute, tools, warm rotation before the connection limit,
//! retries. `policy` paces every stream open: backoff with jitter and a cap
//! per conversation, and one circuit breaker per engine that sheds load
//! while Bedrock throttles. `models` names the models and their prices.
//! Nova Sonic's wire types never leave this module.

mod client;
mod conversation;
mod history;
mod input;
mod models;
mod output;
mod policy;
mod stream;
mod translate;
mod usage_event;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use aws_config::Region;
use tokio::time::Instant;

pub use self::client::{
    ClientError, ClientSettings, FALLBACK_REGION, RegionSource, StaticCredentials, resolve_region,
};
pub use self::input::{Endpointing, Inference};
pub use self::models::{DEFAULT_MODEL, MODEL_2, MODEL_V1, builtin_prices, is_v1, rates_confirmed};
use self::policy::{Breaker, Count, OpenStats};
use self::stream::Service;
use super::{ConversationOptions, Engine, EngineSession, EngineStat, StartError, StatKind, Voice};
use crate::config::NovaSonicConfig;
use crate::tools::Tools;
use crate::usage::{PriceTable, Rates};

pub use super::DEFAULT_SYSTEM_PROMPT;

/// Everything a Nova Sonic conversation is made with.
#[derive(Debug, Clone)]
pub struct NovaSonicSettings {
    pub client: ClientSettings,
    pub model: String,
    /// Voice when a conversation asks for none.
    pub voice: String,
    pub output_rate_hz: u32,
    pub system_prompt: String,
    pub inference: Inference,
    /// Nova 2 only; `None` omits it (and is forced for v1).
    pub endpointing: Option<Endpointing>,
    /// Stream age at which a warm hand-off to a new stream begins.
    pub rotate_after: Duration,
    /// How long the hand-off waits for the assistant to start speaking
    /// before it is forced.
    pub handoff_wait: Duration,
    /// No reply for this long after the user's turn means a stalled stream.
    pub stall_timeout: Duration,
    /// Reconnections allowed within one turn.
    pub max_retries: u32,
    /// The wait before the second try to open a stream after a failure (the
    /// first is at once); each later try waits three times longer.
    pub open_backoff: Duration,
    /// The longest wait between tries, before jitter.
    pub open_backoff_max: Duration,
    /// Streams one conversation may open within a minute.
    pub max_opens_per_minute: u32,
    /// How long throttling or a quota refusal makes the engine refuse new
    /// conversations and hold back opens (doubled on repeated trips).
    pub breaker_cooldown: Duration,
    pub prices: PriceTable,
}

impl NovaSonicSettings {
    pub fn from_config(config: &NovaSonicConfig) -> Self {
        let text = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        let endpointing = match config.endpointing.to_ascii_uppercase().as_str() {
            "HIGH" => Some(Endpointing::High),
            "LOW" => Some(Endpointing::Low),
            "MEDIUM" => Some(Endpointing::Medium),
            _ => None,
        };
        let mut prices = builtin_prices();
        let usd = [
            config.speech_in_usd_per_1k,
            config.speech_out_usd_per_1k,
            config.text_in_usd_per_1k,
            config.text_out_usd_per_1k,
        ];
        if usd.iter().any(|p| *p > 0.0) {
            // Each configured price replaces one built-in rate (validated by the config).
            let given = PriceTable::from_usd_per_1k(usd[0], usd[1], usd[2], usd[3]).ok();
            let builtin = prices.rates(&config.model).copied().unwrap_or_default();
            if let Some(given) = given {
                let pick = |i: usize, g: u64, b: u64| if usd[i] > 0.0 { g } else { b };
                let rates = Rates {
                    speech_in: pick(0, given.speech_in, builtin.speech_in),
                    speech_out: pick(1, given.speech_out, builtin.speech_out),
                    text_in: pick(2, given.text_in, builtin.text_in),
                    text_out: pick(3, given.text_out, builtin.text_out),
                };
                prices = prices.with_override(&config.model, rates);
            }
        }
        Self {
            client: ClientSettings {
                region: config.region.clone(),
                endpoint_url: text(&config.endpoint_url),
                ca_file: text(&config.ca_file).map(Into::into),
                credentials: None,
            },
            model: config.model.clone(),
            voice: config.voice.clone(),
            output_rate_hz: config.output_rate_hz,
            system_prompt: text(&config.system_prompt)
                .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_owned()),
            inference: Inference {
                max_tokens: config.max_tokens,
                top_p: config.top_p as f32,
                temperature: config.temperature as f32,
            },
            endpointing: if is_v1(&config.model) {
                None
            } else {
                endpointing
            },
            rotate_after: Duration::from_secs(config.rotate_after_s.into()),
            handoff_wait: Duration::from_secs(config.handoff_wait_s.into()),
            stall_timeout: Duration::from_millis(config.stall_timeout_ms.into()),
            max_retries: config.max_retries,
            open_backoff: Duration::from_millis(config.open_backoff_ms.into()),
            open_backoff_max: Duration::from_millis(config.open_backoff_max_ms.into()),
            max_opens_per_minute: config.max_opens_per_minute,
            breaker_cooldown: Duration::from_millis(config.breaker_cooldown_ms.into()),
            prices,
        }
    }
}

#[derive(Debug)]
struct Shared {
    settings: NovaSonicSettings,
    service: Service,
    region: Region,
    region_source: RegionSource,
    tools: Option<Tools>,
    /// Shared by every conversation: throttling anywhere holds back all.
    breaker: Breaker,
    stats: OpenStats,
}

/// The Nova Sonic engine: one SDK client shared by all conversations.
#[derive(Debug, Clone)]
pub struct NovaSonicEngine {
    shared: Arc<Shared>,
}

impl NovaSonicEngine {
    /// Builds the client (reads the AWS configuration and, when none is
    /// configured, looks the Region up along the AWS chain; no call to
    /// Bedrock yet: bad credentials show on the first conversation, as a
    /// fatal error).
    pub async fn connect(
        settings: NovaSonicSettings,
        tools: Option<Tools>,
    ) -> Result<Self, ClientError> {
        let connected = client::connect(&settings.client).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                breaker: Breaker::new(settings.breaker_cooldown),
                settings,
                service: Service::Bedrock(connected.client),
                region: connected.region,
                region_source: connected.region_source,
                tools,
                stats: OpenStats::default(),
            }),
        })
    }

    pub fn settings(&self) -> &NovaSonicSettings {
        &self.shared.settings
    }

    /// The Region the engine calls, and where that came from.
    pub fn region(&self) -> (&str, RegionSource) {
        (self.shared.region.as_ref(), self.shared.region_source)
    }
}

#[cfg(test)]
impl NovaSonicEngine {
    /// An engine whose streams go to the test, which plays the service.
    fn fake(
        settings: NovaSonicSettings,
        tools: Option<Tools>,
    ) -> (Self, tokio::sync::mpsc::UnboundedReceiver<stream::FakeCall>) {
        let (calls, opened) = tokio::sync::mpsc::unbounded_channel();
        let engine = Self {
            shared: Arc::new(Shared {
                breaker: Breaker::new(settings.breaker_cooldown),
                settings,
                service: Service::Fake(calls),
                region: Region::from_static(FALLBACK_REGION),
                region_source: RegionSource::Fallback,
                tools,
                stats: OpenStats::default(),
            }),
        };
        (engine, opened)
    }
}

impl Engine for NovaSonicEngine {
    fn name(&self) -> &'static str {
        "nova-sonic"
    }

    fn prices(&self) -> String {
        let settings = &self.shared.settings;
        let rates = settings
            .prices
            .rates(&settings.model)
            .copied()
            .unwrap_or_default();
        format!("{} {}", settings.model, rates.stamp())
    }

    fn paid(&self) -> bool {
        true
    }

    fn voices(&self) -> Vec<Voice> {
        let v1 = is_v1(&self.shared.settings.model);
        let mut voices = vec![
            Voice::new("lupe", "Lupe", "es-US"),
            Voice::new("carlos", "Carlos", "es-US"),
            Voice::new("tiffany", "Tiffany", "en-US"),
            Voice::new("matthew", "Matthew", "en-US"),
            Voice::new("amy", "Amy", "en-GB"),
            Voice::new("ambre", "Ambre", "fr-FR"),
            Voice::new("florian", "Florian", "fr-FR"),
            Voice::new("beatrice", "Beatrice", "it-IT"),
            Voice::new("lorenzo", "Lorenzo", "it-IT"),
            Voice::new("lennart", "Lennart", "de-DE"),
        ];
        if v1 {
            voices.push(Voice::new("greta", "Greta", "de-DE"));
        } else {
            voices.extend([
                Voice::new("tina", "Tina", "de-DE"),
                Voice::new("olivia", "Olivia", "en-AU"),
                Voice::new("kiara", "Kiara", "en-IN"),
                Voice::new("arjun", "Arjun", "en-IN"),
                Voice::new("carolina", "Carolina", "pt-BR"),
                Voice::new("leo", "Leo", "pt-BR"),
            ]);
        }
        voices
    }

    fn start(&self, options: ConversationOptions) -> Result<EngineSession, StartError> {
        let voices = self.voices();
        let voice = if options.voice.is_empty() {
            // The configured voice, unless the conversation's language is
            // another one that has a voice of its own.
            let language = options.language.to_ascii_lowercase();
            let configured = &self.shared.settings.voice;
            let speaks = |v: &Voice| {
                let tag = v.language.to_ascii_lowercase();
                tag == language || tag.split('-').next() == language.split('-').next()
            };
            match voices.iter().find(|v| &v.id == configured) {
                Some(v) if speaks(v) || language.is_empty() => configured.clone(),
                _ => voices
                    .iter()
                    .find(|v| speaks(v))
                    .map_or_else(|| configured.clone(), |v| v.id.clone()),
            }
        } else {
            options.voice.to_ascii_lowercase()
        };
        if !voices.iter().any(|v| v.id == voice) {
            return Err(StartError::Unsupported(format!(
                "Nova Sonic has no voice {voice:?}"
            )));
        }
        if let Some(wait) = self.busy() {
            self.shared.stats.add(Count::Refused);
            return Err(StartError::Busy {
                retry_after: wait,
                message: format!(
                    "Bedrock is throttling: no new Nova Sonic conversations for {:.1} s",
                    wait.as_secs_f64()
                ),
            });
        }
        let (session, input, events) = EngineSession::channel();
        // The caller's span (the conversation's) follows the driver.
        let driver = conversation::run(self.shared.clone(), voice, options.history, input, events);
        tokio::spawn(tracing::Instrument::in_current_span(driver));
        Ok(session)
    }

    fn busy(&self) -> Option<Duration> {
        self.shared.breaker.wait(Instant::now())
    }

    fn stats(&self) -> Vec<EngineStat> {
        let stats = &self.shared.stats;
        let counter = |name, help, value| EngineStat {
            name,
            help,
            kind: StatKind::Counter,
            value,
        };
        vec![
            counter(
                "stream_opens_total",
                "Nova Sonic streams opened (first, reconnection, rotation).",
                stats.get(Count::Opened),
            ),
            counter(
                "stream_opens_postponed_total",
                "Nova Sonic stream opens put off by the backoff or the circuit breaker.",
                stats.get(Count::Postponed),
            ),
            counter(
                "stream_opens_capped_total",
                "Nova Sonic stream opens refused by the per-conversation cap (nova_sonic.max_opens_per_minute).",
                stats.get(Count::Capped),
            ),
            counter(
                "breaker_trips_total",
                "Times throttling or a quota refusal opened the circuit breaker.",
                self.shared.breaker.trips(),
            ),
            counter(
                "conversations_refused_total",
                "New conversations the engine refused while its circuit breaker cooled down.",
                stats.get(Count::Refused),
            ),
            EngineStat {
                name: "breaker_open",
                help: "1 while the circuit breaker cools down and new conversations are refused.",
                kind: StatKind::Gauge,
                value: u64::from(self.busy().is_some()),
            },
        ]
    }
}
