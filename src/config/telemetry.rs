//! The `[log]` and `[telemetry]` sections: how log lines look and where turn
//! spans are exported. Read by `crate::telemetry` when the process starts.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Log lines on stderr.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Line format: `text` for people, `json` for one JSON object per line (no unit).
    pub format: LogFormat,
}

/// How a log line is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the fields of every enclosing span.
    Json,
}

/// Export of conversation and turn spans to an OpenTelemetry collector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (`/v1/traces` is added
    /// unless the URL ends with it); empty: no export (no unit).
    pub otlp_endpoint: String,
    /// Longest wait for one export request, in milliseconds.
    pub otlp_timeout_ms: u32,
    /// Longest time a finished span waits before its batch is sent, in milliseconds.
    pub otlp_batch_ms: u32,
    /// Finished spans waiting for export, and most in one request (up to 512); past it new ones are dropped and counted, in spans.
    pub otlp_queue_spans: u32,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_timeout_ms: 5_000,
            otlp_batch_ms: 1_000,
            otlp_queue_spans: 2_048,
        }
    }
}

impl TelemetryConfig {
    /// The first bad setting, made into an error by `bad(key, value shown, reason)`.
    pub(super) fn check(
        &self,
        bad: &dyn Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let endpoint = &self.otlp_endpoint;
        let is_url = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !endpoint.is_empty() && !is_url {
            let reason = "must be an http:// or https:// URL, like http://127.0.0.1:4318";
            let shown = toml::Value::from(crate::redact::url(endpoint)).to_string();
            return Err(bad("telemetry.otlp_endpoint", shown, reason));
        }
        #[rustfmt::skip]
        let ranges = [
            ("telemetry.otlp_timeout_ms", self.otlp_timeout_ms, 100, 120_000, "ms"),
            ("telemetry.otlp_batch_ms", self.otlp_batch_ms, 10, 60_000, "ms"),
            ("telemetry.otlp_queue_spans", self.otlp_queue_spans, 1, 1_000_000, "spans"),
        ];
        super::check_ranges(&ranges, &bad)?;
        Ok(())
    }
}
