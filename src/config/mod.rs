//! Typed configuration for the Sonora gateway: defaults, a TOML file, `SONORA_*`
//! environment variables and command-line overrides, merged in rising precedence and
//! validated once at startup, so a bad setting stops the process with one line naming
//! the key and its source instead of surfacing in the middle of a call.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

mod settings;
mod telemetry;

pub use settings::{
    AudioConfig, Config, EngineConfig, EngineKind, LocalConfig, NovaSonicConfig, ServerConfig,
};
pub use telemetry::{LogConfig, LogFormat, TelemetryConfig};

/// Exit status for any [`ConfigError`]: `EX_USAGE` from sysexits.
pub const EXIT_CODE: i32 = 64;
/// Environment variable naming the config file when no `--config` path is given.
pub const CONFIG_ENV: &str = "SONORA_CONFIG";
/// Environment variable holding the log filter (`crate::telemetry`), ignored here.
pub const LOG_ENV: &str = "SONORA_LOG";

pub(crate) const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
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

impl Config {
    /// Checks every range and format rule; the one place where limits live.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_from(&|_| None)
    }

    fn validate_nova_sonic(
        &self,
        bad: &dyn Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let n = &self.nova_sonic;
        if !n.model.starts_with("amazon.nova")
            && !n.model.starts_with("arn:")
            && !n.model.contains(".amazon.nova")
        {
            let reason = "not a Nova Sonic model id, like amazon.nova-2-sonic-v1:0";
            return Err(bad("nova_sonic.model", quoted(&n.model), reason));
        }
        if ![8_000, 16_000, 24_000].contains(&n.output_rate_hz) {
            let reason = "must be 8000, 16000 or 24000 Hz";
            return Err(bad(
                "nova_sonic.output_rate_hz",
                n.output_rate_hz.to_string(),
                reason,
            ));
        }
        for (key, value) in [
            ("nova_sonic.top_p", n.top_p),
            ("nova_sonic.temperature", n.temperature),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(bad(key, value.to_string(), "must be between 0 and 1"));
            }
        }
        if !["", "HIGH", "MEDIUM", "LOW"].contains(&n.endpointing.to_ascii_uppercase().as_str()) {
            let reason = "must be HIGH, MEDIUM, LOW or empty";
            return Err(bad(
                "nova_sonic.endpointing",
                quoted(&n.endpointing),
                reason,
            ));
        }
        if !n.endpoint_url.is_empty()
            && !n.endpoint_url.starts_with("https://")
            && !n.endpoint_url.starts_with("http://")
        {
            let reason = "must be an https:// URL";
            return Err(bad(
                "nova_sonic.endpoint_url",
                quoted(&n.endpoint_url),
                reason,
            ));
        }
        if !n.ca_file.is_empty() && !Path::new(&n.ca_file).is_file() {
            return Err(bad(
                "nova_sonic.ca_file",
                quoted(&n.ca_file),
                "no such file",
            ));
        }
        if n.voice.is_empty() || !n.voice.bytes().all(|b| b.is_ascii_alphabetic()) {
            let reason = "must be a voice id such as lupe or carlos";
            return Err(bad("nova_sonic.voice", quoted(&n.voice), reason));
        }
        let prices = [
            ("nova_sonic.speech_in_usd_per_1k", n.speech_in_usd_per_1k),
            ("nova_sonic.speech_out_usd_per_1k", n.speech_out_usd_per_1k),
            ("nova_sonic.text_in_usd_per_1k", n.text_in_usd_per_1k),
            ("nova_sonic.text_out_usd_per_1k", n.text_out_usd_per_1k),
        ];
        for (key, usd) in prices {
            if let Err(reason) = crate::usage::PriceTable::from_usd_per_1k(usd, usd, usd, usd) {
                return Err(bad(key, usd.to_string(), &reason));
            }
        }
        Ok(())
    }

    /// [`Config::validate`], naming the source of a bad value by its key.
    fn validate_from(&self, origin: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, reason: &str| invalid(key, value, origin(key), reason);
        if self.listen.parse::<SocketAddr>().is_err() {
            let reason = "not an address like 127.0.0.1:8080";
            return Err(bad("listen", quoted(&self.listen), reason));
        }
        let (a, s, l, n) = (&self.audio, &self.server, &self.local, &self.nova_sonic);
        let (cap, block) = (a.decoder_input_cap_bytes as u64, a.max_block_bytes as u64);
        let block_unit = "bytes (audio.decoder_input_cap_bytes)";
        #[rustfmt::skip]
        let ranges: [(&str, u64, u64, u64, &str); 36] = [
            ("audio.decoder_input_cap_bytes", cap, 64 * KIB, 64 * MIB, "bytes"),
            ("audio.max_block_bytes", block, KIB, cap, block_unit),
            ("audio.uplink_queue_ms", a.uplink_queue_ms.into(), 100, 60_000, "ms"),
            ("audio.downlink_queue_ms", a.downlink_queue_ms.into(), 100, 120_000, "ms"),
            ("audio.no_audio_timeout_ms", a.no_audio_timeout_ms.into(), 500, 600_000, "ms"),
            ("audio.realtime_burst_ms", a.realtime_burst_ms.into(), 1_000, 120_000, "ms"),
            ("server.max_sessions", s.max_sessions.into(), 1, 100_000, "sessions"),
            ("server.max_message_bytes", s.max_message_bytes as u64, KIB, 16 * MIB, "bytes"),
            ("server.hello_timeout_ms", s.hello_timeout_ms.into(), 100, 60_000, "ms"),
            ("server.idle_timeout_ms", s.idle_timeout_ms.into(), 1_000, 3_600_000, "ms"),
            ("server.max_conversation_s", s.max_conversation_s.into(), 10, 86_400, "s"),
            ("server.write_timeout_ms", s.write_timeout_ms.into(), 100, 600_000, "ms"),
            ("server.shutdown_grace_ms", s.shutdown_grace_ms.into(), 0, 600_000, "ms"),
            ("server.max_sessions_per_client", s.max_sessions_per_client.into(), 1, 100_000, "sessions"),
            ("server.connections_per_minute_per_client", s.connections_per_minute_per_client.into(), 1, 1_000_000, "requests"),
            ("server.header_read_timeout_ms", s.header_read_timeout_ms.into(), 100, 600_000, "ms"),
            ("server.keepalive_timeout_ms", s.keepalive_timeout_ms.into(), 100, 3_600_000, "ms"),
            ("server.max_connections", s.max_connections.into(), s.max_sessions.into(), 1_000_000, "connections (each conversation holds one: at least server.max_sessions)"),
            ("local.asr_beam_size", l.asr_beam_size.into(), 1, 16, "hypotheses"),
            ("local.asr_threads", l.asr_threads.into(), 0, 256, "threads"),
            ("local.vad_hangover_ms", l.vad_hangover_ms.into(), 100, 5_000, "ms"),
            ("local.vad_preroll_ms", l.vad_preroll_ms.into(), 0, 1_000, "ms"),
            ("local.vad_pause_ms", l.vad_pause_ms.into(), 50, 5_000, "ms"),
            ("local.tts_rate_wpm", l.tts_rate_wpm.into(), 80, 450, "words per minute"),
            ("local.output_rate_hz", l.output_rate_hz.into(), 8_000, 48_000, "Hz"),
            ("local.chat_timeout_ms", l.chat_timeout_ms.into(), 500, 120_000, "ms"),
            ("local.vad_pause_ms", l.vad_pause_ms.into(), 50, l.vad_hangover_ms.into(), "ms (local.vad_hangover_ms)"),
            ("nova_sonic.max_tokens", n.max_tokens.into(), 1, 10_000, "tokens"),
            ("nova_sonic.rotate_after_s", n.rotate_after_s.into(), 1, 460, "s (the service ends a stream at 8 minutes)"),
            ("nova_sonic.handoff_wait_s", n.handoff_wait_s.into(), 0, 120, "s"),
            ("nova_sonic.stall_timeout_ms", n.stall_timeout_ms.into(), 200, 120_000, "ms"),
            ("nova_sonic.max_retries", n.max_retries.into(), 0, 10, "tries"),
            ("nova_sonic.open_backoff_ms", n.open_backoff_ms.into(), 100, 60_000, "ms"),
            ("nova_sonic.open_backoff_max_ms", n.open_backoff_max_ms.into(), n.open_backoff_ms.into(), 600_000, "ms (nova_sonic.open_backoff_ms)"),
            ("nova_sonic.max_opens_per_minute", n.max_opens_per_minute.into(), 2, 600, "streams"),
            ("nova_sonic.breaker_cooldown_ms", n.breaker_cooldown_ms.into(), 100, 3_600_000, "ms"),
        ];
        for (key, value, min, max, unit) in ranges {
            if !(min..=max).contains(&value) {
                let reason = format!("must be between {min} and {max} {unit}");
                return Err(bad(key, value.to_string(), &reason));
            }
        }
        let lang = &self.engine.language;
        let lang_ok = lang.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !lang_ok || !(2..=16).contains(&lang.len()) {
            let reason = "must be 2 to 16 ASCII letters, digits or '-', like es or en-US";
            return Err(bad("engine.language", quoted(lang), reason));
        }
        // A block or a whole message must fit beside what is already waiting.
        let needed = block.max(256 * KIB) + s.max_message_bytes as u64;
        if cap < needed {
            let reason = format!(
                "must hold a block (audio.max_block_bytes, or 256 KiB of Tracks) plus one message (server.max_message_bytes): at least {needed} bytes"
            );
            return Err(bad(
                "audio.decoder_input_cap_bytes",
                cap.to_string(),
                &reason,
            ));
        }
        self.validate_nova_sonic(&bad)?;
        self.telemetry.check(&bad)?;
        if let Err(reason) = self.tools.validate() {
            // The reason reads `tools.key = value: why`.
            let parts = reason.split_once(" = ").and_then(|(key, rest)| {
                let (value, why) = rest.split_once(": ")?;
                Some((key.to_owned(), value.to_owned(), why.to_owned()))
            });
            return Err(match parts {
                Some((key, value, why)) => bad(&key, value, &why),
                None => bad("tools", String::new(), &reason),
            });
        }
        if !l.chat_url.is_empty() && l.chat_model.is_empty() {
            let reason = "must name the model when local.chat_url is set";
            return Err(bad("local.chat_model", quoted(&l.chat_model), reason));
        }
        if !(1.0..=20.0).contains(&a.max_realtime_factor) {
            let reason = "must be between 1 and 20 times real time";
            return Err(bad(
                "audio.max_realtime_factor",
                a.max_realtime_factor.to_string(),
                reason,
            ));
        }
        if !(0.05..=0.95).contains(&l.vad_threshold) {
            let reason = "must be between 0.05 and 0.95";
            return Err(bad(
                "local.vad_threshold",
                l.vad_threshold.to_string(),
                reason,
            ));
        }
        if let Some(origin) = s
            .allowed_origins
            .iter()
            .find(|o| o.as_str() != "*" && crate::server::net::Origin::parse(o).is_none())
        {
            let reason =
                "origins are \"*\" or scheme://host[:port], e.g. https://ayuda.example.edu";
            return Err(bad("server.allowed_origins", quoted(origin), reason));
        }
        for proxy in &s.trusted_proxies {
            if let Err(why) = crate::server::net::IpNet::parse(proxy) {
                let reason = format!("{why}: entries are IPs or CIDRs, e.g. 10.0.0.0/8");
                return Err(bad("server.trusted_proxies", quoted(proxy), &reason));
            }
        }
        for host in &s.allowed_hosts {
            if let Err(why) = crate::server::net::HostPort::parse(host) {
                let reason = format!("{why}: entries are host or host:port, e.g. voz.example.edu");
                return Err(bad("server.allowed_hosts", quoted(host), &reason));
            }
        }
        if !s.metrics_listen.is_empty() && s.metrics_listen.parse::<SocketAddr>().is_err() {
            let reason = "not an address like 10.0.0.5:9100 (empty: /metrics stays on listen)";
            return Err(bad(
                "server.metrics_listen",
                quoted(&s.metrics_listen),
                reason,
            ));
        }
        if s.auth_tokens.iter().any(|t| t.trim().is_empty()) {
            let shown = Value::from(vec![REDACTED; s.auth_tokens.len()]).to_string();
            return Err(bad("server.auth_tokens", shown, "tokens must not be empty"));
        }
        Ok(())
    }

    /// The listen address. Meant for a validated config; an unparsable address (only
    /// possible when `validate` was skipped) yields the default 127.0.0.1:8080.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen.parse().unwrap_or(DEFAULT_LISTEN)
    }

    /// The effective config as TOML, with every non-empty secret shown as
    /// `"<redacted>"` and every URL without its credentials and query string
    /// (where keys travel), tables in arrays (`tools.http`) included.
    pub fn to_redacted_toml(&self) -> String {
        let mut table = to_table(self);
        for (key, value) in leaves(&table) {
            if is_secret(&key) {
                set_leaf(&mut table, &key, redact(&value));
            }
        }
        redact_urls(&mut table);
        toml::to_string(&table).unwrap_or_default()
    }
}

/// Where [`load`] looks: the file, the environment and the flag overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Explicit `--config` path; a missing file is an error.
    pub file: Option<PathBuf>,
    /// Read only if it exists and neither `file` nor `SONORA_CONFIG` is set.
    pub default_file: PathBuf,
    /// The process environment as name/value pairs.
    pub env: Vec<(String, String)>,
    /// Dotted key and value text from command-line flags, applied last.
    pub overrides: Vec<(String, String)>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        let default_file = PathBuf::from("sonora.toml");
        Self {
            file: None,
            default_file,
            env: Vec::new(),
            overrides: Vec::new(),
        }
    }
}

/// Dotted key -> (final value, where it came from), for every setting not left at its default.
type Assigned = BTreeMap<String, (Value, String)>;

/// Merges defaults < file < `SONORA_*` environment < overrides, then validates the result.
pub fn load(options: &LoadOptions) -> Result<Config, ConfigError> {
    let defaults = to_table(&Config::default());
    let known: BTreeMap<String, Value> = leaves(&defaults).into_iter().collect();
    let mut set = Assigned::new();
    if let Some((path, origin)) = config_file(options) {
        let fail = |reason| ConfigError::File {
            path: path.clone(),
            origin: origin.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path);
        let text = text.map_err(|e| fail(format!("cannot read config file: {e}")))?;
        let table: Result<Table, _> = text.parse();
        let table = table.map_err(|e| fail(syntax_reason(&text, &e)))?;
        assign_file(&defaults, &table, "", &path, &mut set)?;
    }
    for (name, text) in &options.env {
        if !name.starts_with("SONORA_") || name == CONFIG_ENV || name == LOG_ENV {
            continue;
        }
        let found = known.iter().find(|(k, _)| env_name(k) == *name);
        let (key, default) = found.ok_or_else(|| unknown(name, "env"))?;
        let value = parse_text(key, default, text, name)?;
        set.insert(key.clone(), (value, name.clone()));
    }
    for (key, text) in &options.overrides {
        let origin = format!("--{key}");
        let default = known.get(key).ok_or_else(|| unknown(key, &origin))?;
        let value = parse_text(key, default, text, &origin)?;
        set.insert(key.clone(), (value, origin));
    }
    // One setting at a time, so a value serde rejects is blamed on its own key.
    let (mut table, mut config) = (defaults, Config::default());
    for (key, (value, origin)) in &set {
        set_leaf(&mut table, key, value.clone());
        let shown = render(key, value);
        config = Config::deserialize(Value::Table(table.clone()))
            .map_err(|e| invalid(key, shown, Some(origin.clone()), e.message()))?;
    }
    let origin_of = |key: &str| set.get(key).map(|(_, origin)| origin.clone());
    config.validate_from(&|key| origin_of(key).or_else(|| Some("defaults".to_owned())))?;
    Ok(config)
}

/// The environment variable for a dotted key: `audio.uplink_queue_ms` -> `SONORA_AUDIO_UPLINK_QUEUE_MS`.
pub fn env_name(dotted_key: &str) -> String {
    let upper = dotted_key.to_ascii_uppercase();
    format!("SONORA_{}", upper.replace('.', "_"))
}

/// Every dotted leaf key, sorted, with its default value rendered as TOML text.
pub fn keys() -> Vec<(String, String)> {
    let all = leaves(&to_table(&Config::default()));
    all.into_iter().map(|(k, v)| (k, v.to_string())).collect()
}

/// The file to read and how it was named, if any.
fn config_file(options: &LoadOptions) -> Option<(PathBuf, String)> {
    if let Some(path) = &options.file {
        return Some((path.clone(), "--config".to_owned()));
    }
    let env = &options.env;
    if let Some((_, path)) = env.iter().rfind(|(n, v)| n == CONFIG_ENV && !v.is_empty()) {
        return Some((PathBuf::from(path), CONFIG_ENV.to_owned()));
    }
    let default = (options.default_file.clone(), "default path".to_owned());
    options.default_file.exists().then_some(default)
}

fn syntax_reason(text: &str, error: &toml::de::Error) -> String {
    let at = error.span().map_or(0, |span| span.start);
    let before = text.get(..at).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let message = one_line(error.message());
    format!("invalid TOML at line {line}, column {column}: {message}")
}

/// Records every leaf of a file table, checking names and types against the defaults.
fn assign_file(
    defaults: &Table,
    given: &Table,
    prefix: &str,
    path: &Path,
    set: &mut Assigned,
) -> Result<(), ConfigError> {
    for (name, value) in given {
        let key = format!("{prefix}{name}");
        match (defaults.get(name), value) {
            (None, _) => {
                return Err(ConfigError::UnknownKey {
                    path: path.into(),
                    key,
                });
            }
            (Some(Value::Table(inner)), Value::Table(value)) => {
                assign_file(inner, value, &format!("{key}."), path, set)?;
            }
            (Some(default), _) => {
                let origin = path.display().to_string();
                let coerced = coerce(default, value);
                let value = coerced.ok_or_else(|| wrong_type(&key, value, &origin, default))?;
                set.insert(key, (value, origin));
            }
        }
    }
    Ok(())
}

/// Parses flag or environment text by the TOML type of the key's default value;
/// arrays also accept a plain comma-separated list of strings.
fn parse_text(key: &str, default: &Value, text: &str, origin: &str) -> Result<Value, ConfigError> {
    let trimmed = text.trim();
    let parsed = match default {
        Value::String(_) => Some(Value::from(text)),
        Value::Array(_) if !trimmed.starts_with('[') => {
            let items = trimmed.split(',').map(str::trim).filter(|s| !s.is_empty());
            Some(Value::Array(items.map(Value::from).collect()))
        }
        _ => trimmed.parse().ok().and_then(|v| coerce(default, &v)),
    };
    parsed.ok_or_else(|| wrong_type(key, &Value::from(text), origin, default))
}

/// `given` if it has the default's TOML type (integers widen to floats), else `None`.
fn coerce(default: &Value, given: &Value) -> Option<Value> {
    match (default, given) {
        (Value::Float(_), Value::Integer(i)) => Some(Value::Float(*i as f64)),
        _ if default.type_str() == given.type_str() => Some(given.clone()),
        _ => None,
    }
}

fn wrong_type(key: &str, given: &Value, origin: &str, default: &Value) -> ConfigError {
    ConfigError::WrongType {
        key: key.to_owned(),
        value: render(key, given),
        origin: origin.to_owned(),
        expected: format!("a TOML {}", default.type_str()),
    }
}

fn unknown(name: &str, origin: &str) -> ConfigError {
    let (name, origin) = (name.to_owned(), origin.to_owned());
    ConfigError::UnknownSetting { name, origin }
}

fn invalid(key: &str, value: String, origin: Option<String>, reason: &str) -> ConfigError {
    let (key, reason) = (key.to_owned(), one_line(reason));
    ConfigError::Invalid {
        key,
        value,
        origin,
        reason,
    }
}

/// A config as a TOML table; cannot fail for these plain structs (tests cover it).
fn to_table(config: &Config) -> Table {
    Table::try_from(config).unwrap_or_default()
}

/// Every non-table value with its dotted key, sorted by key.
fn leaves(table: &Table) -> Vec<(String, Value)> {
    fn walk(table: &Table, prefix: &str, out: &mut Vec<(String, Value)>) {
        for (name, value) in table {
            match value {
                Value::Table(inner) => walk(inner, &format!("{prefix}{name}."), out),
                _ => out.push((format!("{prefix}{name}"), value.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk(table, "", &mut out);
    out
}

fn set_leaf(table: &mut Table, key: &str, value: Value) {
    match key.split_once('.') {
        None => drop(table.insert(key.to_owned(), value)),
        Some((head, rest)) => {
            if let Some(Value::Table(inner)) = table.get_mut(head) {
                set_leaf(inner, rest, value);
            }
        }
    }
}

/// Redacts every string under a key ending in `url`, at any depth.
fn redact_urls(table: &mut Table) {
    for (key, value) in table.iter_mut() {
        match value {
            Value::String(text) if key.to_ascii_lowercase().ends_with("url") => {
                *text = crate::redact::url(text);
            }
            Value::Table(inner) => redact_urls(inner),
            Value::Array(items) => {
                for item in items {
                    if let Value::Table(inner) = item {
                        redact_urls(inner);
                    }
                }
            }
            _ => {}
        }
    }
}

fn is_secret(key: &str) -> bool {
    let name = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    SECRET_SUFFIXES.iter().any(|suffix| name.ends_with(suffix))
}

/// Non-empty strings become `"<redacted>"`; non-empty arrays keep only their length.
fn redact(value: &Value) -> Value {
    match value {
        Value::String(s) if !s.is_empty() => Value::from(REDACTED),
        Value::Array(items) if !items.is_empty() => Value::from(vec![REDACTED; items.len()]),
        _ => value.clone(),
    }
}

/// A value as TOML text for messages, with secrets redacted.
fn render(key: &str, value: &Value) -> String {
    let shown = match value {
        _ if is_secret(key) => redact(value),
        Value::String(text) if key.to_ascii_lowercase().ends_with("url") => {
            Value::from(crate::redact::url(text))
        }
        _ => value.clone(),
    };
    shown.to_string()
}

fn quoted(text: &str) -> String {
    Value::from(text).to_string()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
