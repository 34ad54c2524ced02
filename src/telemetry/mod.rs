//! Logs and traces. One span per connection, per conversation and per turn;
//! log lines to stderr (text or JSON) filtered by `SONORA_LOG`; and, when
//! `telemetry.otlp_endpoint` is set, the conversation and turn spans exported
//! over OTLP/HTTP from a background thread that never holds up a conversation.
//!
//! - [`init`] installs the process-wide subscriber and returns the [`Telemetry`]
//!   handle that flushes the export on shutdown.
//! - [`connection_span`] and [`conversation_span`] open the outer spans; the
//!   session feeds every engine event to a [`ConversationTrace`], which opens
//!   and closes the turn spans and records their latency, tokens and cost.

mod export;
mod otlp;
mod turn;

use std::net::IpAddr;

use tracing::Span;
use tracing::field::Empty;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

pub use export::ExportStats;
pub use turn::ConversationTrace;

use crate::config::{Config, ConfigError, LOG_ENV, LogFormat};

/// Target of the spans this module opens; the exporter takes spans of this
/// target only.
const SPAN_TARGET: &str = "sonora::telemetry";

/// The filter when `SONORA_LOG` is unset, for `serve`: the gateway's own
/// events down to `info`, other crates' warnings.
pub const SERVER_FILTER: &str = "warn,sonora=info";
/// The filter when `SONORA_LOG` is unset, for the other commands, whose
/// own output is what the user reads: Sonora's warnings, and only errors
/// from the libraries (the AWS SDK warns for every credential source it
/// tries, which `doctor` reports in its own words).
pub const COMMAND_FILTER: &str = "error,sonora=warn";

/// The running telemetry: the span exporter, when one is configured.
#[derive(Debug)]
pub struct Telemetry {
    exporter: Option<export::Exporter>,
}

impl Telemetry {
    /// Counters of the span export; `None` without an endpoint.
    pub fn export_stats(&self) -> Option<ExportStats> {
        self.exporter.as_ref().map(export::Exporter::stats)
    }

    /// Sends what is queued (within `telemetry.otlp_timeout_ms`, at most
    /// five seconds), stops the exporter and logs its counters.
    pub fn shutdown(self) {
        if let Some(exporter) = self.exporter {
            exporter.shutdown();
        }
    }
}

/// What this process's span exporter has done (for `/metrics`); `None`
/// when no collector is configured.
pub fn export_stats() -> Option<ExportStats> {
    export::installed_stats()
}

/// Installs the process-wide subscriber: log lines to stderr in the
/// configured format, filtered by `SONORA_LOG` (else `default_filter`), and
/// the span exporter when `telemetry.otlp_endpoint` is set. `env` is the
/// process environment. A second call in one process changes nothing and
/// returns a handle without exporter.
pub fn init(
    config: &Config,
    env: &[(String, String)],
    default_filter: &str,
) -> Result<Telemetry, ConfigError> {
    let directives = env
        .iter()
        .rfind(|(name, _)| name == LOG_ENV)
        .map(|(_, value)| (value.as_str(), true))
        .unwrap_or((default_filter, false));
    let filter = parse_filter(directives.0).map_err(|reason| ConfigError::Invalid {
        key: LOG_ENV.to_owned(),
        value: toml::Value::from(directives.0).to_string(),
        origin: directives.1.then(|| "env".to_owned()),
        reason,
    })?;
    let logs = match config.log.format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
    }
    .with_filter(filter);
    let (exporter, spans) = if config.telemetry.otlp_endpoint.is_empty() {
        (None, None)
    } else {
        let exporter = export::Exporter::start(&config.telemetry);
        let layer = otlp::OtlpLayer::new(exporter.queue())
            .with_filter(Targets::new().with_target(SPAN_TARGET, LevelFilter::TRACE));
        (Some(exporter), Some(layer))
    };
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    Ok(Telemetry {
        exporter: exporter.filter(|_| installed),
    })
}

/// A `SONORA_LOG` value as a filter, or why it is not one.
fn parse_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::WARN.into())
        .parse(directives)
        .map_err(|e| format!("not a log filter like info or warn,sonora=debug: {e}"))
}

/// The span of one client connection. Recorded down to `warn`, so that a
/// warning always names its connection.
pub fn connection_span(connection_id: u64, client: IpAddr) -> Span {
    tracing::warn_span!(
        target: SPAN_TARGET,
        "connection",
        connection.id = connection_id,
        client.address = %client,
    )
}

/// The span of one conversation, named by the id its client was given.
/// Engine, model and voice are recorded when the engine is ready.
pub fn conversation_span(conversation_id: &str, language: &str) -> Span {
    tracing::warn_span!(
        target: SPAN_TARGET,
        "conversation",
        conversation.id = %conversation_id,
        language = language,
        engine = Empty,
        model = Empty,
        voice = Empty,
        close.reason = Empty,
        turns = Empty,
        usage.input_tokens = Empty,
        usage.output_tokens = Empty,
        usage.cost_micro_usd = Empty,
    )
}

#[cfg(test)]
mod tests;
