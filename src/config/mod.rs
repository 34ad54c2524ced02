//! Typed configuration for the Sonora gateway: defaults, a TOML file, `SONORA_*`
//! environment variables and command-line overrides, merged in rising precedence and
//! validated once at startup, so a bad setting stops the process with one line naming
//! the key and its source instead of surfacing in the middle of a call.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

mod gemini_live;
mod instances;
mod ledger;
mod load;
mod openai_realtime;
mod settings;
mod telemetry;
mod telephony;
mod validate;

pub use gemini_live::GeminiLiveConfig;
pub use instances::EngineInstanceConfig;
pub use ledger::LedgerConfig;
pub use load::{LoadOptions, env_name, keys, load};
pub use openai_realtime::OpenAiRealtimeConfig;
pub use settings::{
    AudioConfig, Config, EngineConfig, EngineKind, HttpToolConfig, LocalConfig, NovaSonicConfig,
    ServerConfig, ToolsConfig,
};
pub use telemetry::{LogConfig, LogFormat, TelemetryConfig};
pub use telephony::TelephonyConfig;

/// Exit status for any [`ConfigError`]: `EX_USAGE` from sysexits.
pub const EXIT_CODE: i32 = 64;
/// Environment variable naming the config file when no `--config` path is given.
pub const CONFIG_ENV: &str = "SONORA_CONFIG";
/// Environment variable holding the log filter (`crate::telemetry`), ignored here.
pub const LOG_ENV: &str = "SONORA_LOG";

pub(crate) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
pub(crate) const KIB: u64 = 1024;
pub(crate) const MIB: u64 = 1024 * KIB;
const SECRET_SUFFIXES: [&str; 5] = ["token", "tokens", "key", "secret", "password"];
const REDACTED: &str = "<redacted>";

/// Why the configuration was rejected: one line naming the key, its source and what
/// was expected. Sources read as a file path, an environment variable or `--flag`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file is unreadable or not TOML: report it and exit with [`EXIT_CODE`].
    #[error("{} (from {origin}): {reason}", .path.display())]
    File {
        path: PathBuf,
        origin: String,
        reason: String,
    },
    /// A file key names no setting: report it and exit with [`EXIT_CODE`].
    #[error("{}: unknown key {key}", .path.display())]
    UnknownKey { path: PathBuf, key: String },
    /// A `SONORA_*` variable or a flag names no setting: report it and exit with [`EXIT_CODE`].
    #[error("unknown setting {name} (from {origin})")]
    UnknownSetting { name: String, origin: String },
    /// A value has the wrong type: report it and exit with [`EXIT_CODE`].
    #[error("{key} = {value} (from {origin}): expected {expected}")]
    WrongType {
        key: String,
        value: String,
        origin: String,
        expected: String,
    },
    /// A value is out of range or malformed: report it and exit with [`EXIT_CODE`].
    #[error("{key} = {value}{}: {reason}", from_suffix(.origin.as_deref()))]
    Invalid {
        key: String,
        value: String,
        origin: Option<String>,
        reason: String,
    },
}

impl ConfigError {
    /// The dotted key, environment variable or flag key the error names, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::File { .. } => None,
            Self::UnknownSetting { name: key, .. }
            | Self::UnknownKey { key, .. }
            | Self::WrongType { key, .. }
            | Self::Invalid { key, .. } => Some(key),
        }
    }
}

fn from_suffix(origin: Option<&str>) -> String {
    origin.map(|o| format!(" (from {o})")).unwrap_or_default()
}

/// A setting its owner rejects: the dotted key, the value as TOML text, and
/// why. Owners (the server, the tools) check their own section with a
/// [`Check`]; [`load`] adds where the value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} = {value}: {reason}")]
pub struct SettingError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl SettingError {
    /// `value` is shown as it would be written in TOML (strings quoted).
    pub fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// An owner's check of its section of a loaded configuration, run by
/// [`load`] and [`Config::validate`] after the generic rules.
pub type Check = fn(&Config) -> Result<(), SettingError>;

impl Config {
    /// The listen address. Meant for a validated config; an unparsable address (only
    /// possible when `validate` was skipped) yields the default 127.0.0.1:8080.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.parse().unwrap_or(DEFAULT_LISTEN)
    }
}

/// `text` as a TOML string, for messages.
pub fn quoted(text: &str) -> String {
    toml::Value::from(text).to_string()
}

/// The first of `ranges` (key, value, lowest, highest, unit) whose value is
/// out of its range, made into an error by `bad(key, value shown, reason)`.
pub(crate) fn check_ranges<T: PartialOrd + std::fmt::Display + Copy>(
    ranges: &[(&str, T, T, T, &str)],
    bad: &dyn Fn(&str, String, &str) -> ConfigError,
) -> Result<(), ConfigError> {
    for &(key, value, min, max, unit) in ranges {
        if !(min..=max).contains(&value) {
            let reason = format!("must be between {min} and {max} {unit}");
            return Err(bad(key, value.to_string(), reason.trim_end()));
        }
    }
    Ok(())
}

/// The first of `prices` (key, US dollars per thousand tokens) that is not
/// a usable price; 0 (the built-in price) is always fine.
pub(crate) fn check_prices(
    prices: &[(&str, f64)],
    bad: &dyn Fn(&str, String, &str) -> ConfigError,
) -> Result<(), ConfigError> {
    for &(key, usd) in prices {
        if usd == 0.0 {
            continue;
        }
        if let Err(reason) = crate::usage::PriceTable::from_usd_per_1k(usd, 0.0, 0.0, 0.0) {
            return Err(bad(key, usd.to_string(), &reason));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
