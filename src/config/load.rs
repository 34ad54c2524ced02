//! Loading: defaults < TOML file < `SONORA_*` environment < flag overrides,
//! merged one setting at a time so a rejected value is blamed on its own
//! key and source; and the redacted view of the result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::{Table, Value};

use super::{CONFIG_ENV, Check, Config, ConfigError, LOG_ENV, REDACTED, SECRET_SUFFIXES};

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

/// Merges defaults < file < `SONORA_*` environment < overrides, then checks the
/// result: the generic rules, then each of `checks` (the owners' sections).
pub fn load(options: &LoadOptions, checks: &[Check]) -> Result<Config, ConfigError> {
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
    // `tools.http[1].url` was set with the whole `tools.http` array.
    let origin_of = |key: &str| {
        let mut key = key;
        loop {
            if let Some((_, origin)) = set.get(key) {
                return Some(origin.clone());
            }
            key = &key[..key.rfind(['.', '['])?];
        }
    };
    config.validate_from(checks, &|key| {
        origin_of(key).or_else(|| Some("defaults".to_owned()))
    })?;
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

impl Config {
    /// The effective config as TOML, with every non-empty secret shown as
    /// `"<redacted>"` and every URL without its credentials and query string
    /// (where keys travel), tables in arrays (`tools.http`) included.
    pub fn to_redacted_toml(&self) -> String {
        let mut table = to_table(self);
        redact_table(&mut table);
        toml::to_string(&table).unwrap_or_default()
    }
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

pub(super) fn invalid(
    key: &str,
    value: String,
    origin: Option<String>,
    reason: &str,
) -> ConfigError {
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

/// Redacts every secret, and every string under a key ending in `url`, at
/// any depth (tables in arrays too: `engine.instances`, `tools.http`).
fn redact_table(table: &mut Table) {
    for (key, value) in table.iter_mut() {
        match value {
            _ if is_secret(key) => *value = redact(value),
            Value::String(text) if is_url_key(key) => {
                *text = crate::redact::url(text);
            }
            Value::Table(inner) => redact_table(inner),
            Value::Array(items) => {
                for item in items {
                    if let Value::Table(inner) = item {
                        redact_table(inner);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Keys whose values are URLs, which may carry credentials or keys in
/// their query: `…url`, `…endpoint`.
fn is_url_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.ends_with("url") || key.ends_with("endpoint")
}

pub(super) fn is_secret(key: &str) -> bool {
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
        Value::String(text) if is_url_key(key) => Value::from(crate::redact::url(text)),
        _ => value.clone(),
    };
    shown.to_string()
}

pub(super) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
