//! Several engines at once: each `[[engine.instances]]` table names an
//! engine of some kind, its own limit and priority, and the settings of that
//! kind's section it changes (`region`, `model`, `endpoint_url`, …). An
//! instance's whole configuration is the main one with those settings
//! written over its kind's section, so each kind is loaded, checked and
//! doctored the same way with or without instances.

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use super::{Config, EngineKind, SettingError};

/// Longest instance name, in bytes.
const MAX_NAME_BYTES: usize = 32;
/// Most instances.
const MAX_INSTANCES: usize = 16;

/// One engine instance (`[[engine.instances]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineInstanceConfig {
    /// Its name in `hello`, metrics and the ledger: 1 to 32 of `a-z 0-9 - _`.
    pub name: String,
    /// Its engine: `local`, `nova-sonic`, `openai-realtime` or `gemini-live`.
    pub kind: EngineKind,
    /// Most conversations it serves at once; 0 for no limit of its own.
    #[serde(default)]
    pub max_concurrent: u32,
    /// Lower goes first; equal priorities keep the order written.
    #[serde(default)]
    pub priority: i32,
    /// Settings of its kind's section (`nova_sonic.region` as `region`)
    /// that differ for this instance.
    #[serde(flatten)]
    pub settings: Table,
}

impl Config {
    /// The configuration instance `index` runs with: `engine.kind` is its
    /// kind, its settings are written over that kind's section, and no
    /// instances are left. Errors name the instance's own keys.
    pub fn for_instance(&self, index: usize) -> Result<Config, SettingError> {
        let instance = &self.engine.instances[index];
        let key = |name: &str| format!("engine.instances[{index}].{name}");
        let mut config = self.clone();
        config.engine.kind = instance.kind;
        config.engine.instances = Vec::new();
        let section_name = instance.kind.section();
        let mut table = Table::try_from(&config).unwrap_or_default();
        let Some(Value::Table(section)) = table.get_mut(section_name) else {
            return Err(SettingError::new(
                key("kind"),
                "",
                "has no settings section",
            ));
        };
        for (name, value) in &instance.settings {
            let Some(default) = section.get(name) else {
                let reason = format!("not a setting of [{section_name}]");
                return Err(SettingError::new(key(name), value.to_string(), reason));
            };
            let value = match (default, value) {
                (Value::Float(_), Value::Integer(i)) => Value::Float(*i as f64),
                _ if default.type_str() == value.type_str() => value.clone(),
                _ => {
                    let reason = format!("expected a TOML {}", default.type_str());
                    return Err(SettingError::new(key(name), value.to_string(), reason));
                }
            };
            section.insert(name.clone(), value);
        }
        Config::deserialize(Value::Table(table))
            .map_err(|e| SettingError::new(key("kind"), instance.kind.as_str(), e.message()))
    }

    /// The instances' own rules: names, limits, and each instance's
    /// configuration checked as a whole by `check` (its errors renamed to
    /// the instance's keys where the instance set the value).
    pub(super) fn check_instances(
        &self,
        check: &dyn Fn(&Config) -> Result<(), SettingError>,
    ) -> Result<(), SettingError> {
        let instances = &self.engine.instances;
        if instances.len() > MAX_INSTANCES {
            let reason = format!("at most {MAX_INSTANCES} instances");
            return Err(SettingError::new(
                "engine.instances",
                instances.len().to_string(),
                reason,
            ));
        }
        if !instances.is_empty() && !self.engine.voice.is_empty() {
            // Voices differ between engines: each instance names its own.
            let reason = "must be empty with engine.instances: set each instance's voice";
            return Err(SettingError::new(
                "engine.voice",
                super::quoted(&self.engine.voice),
                reason,
            ));
        }
        for (index, instance) in instances.iter().enumerate() {
            let key = |name: &str| format!("engine.instances[{index}].{name}");
            let name = &instance.name;
            let name_ok = !name.is_empty()
                && name.len() <= MAX_NAME_BYTES
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !name_ok {
                let reason = format!("must be 1 to {MAX_NAME_BYTES} of a-z 0-9 - _");
                return Err(SettingError::new(key("name"), super::quoted(name), reason));
            }
            if instances[..index].iter().any(|i| i.name == *name) {
                let reason = "another instance has this name";
                return Err(SettingError::new(key("name"), super::quoted(name), reason));
            }
            if instance.max_concurrent > 100_000 {
                let reason = "must be between 0 (no limit) and 100000 conversations";
                return Err(SettingError::new(
                    key("max_concurrent"),
                    instance.max_concurrent.to_string(),
                    reason,
                ));
            }
            let config = self.for_instance(index)?;
            let section = instance.kind.section();
            check(&config).map_err(|mut e| {
                let own = e
                    .key
                    .strip_prefix(section)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .filter(|rest| instance.settings.contains_key(*rest));
                if let Some(rest) = own {
                    e.key = key(rest);
                } else {
                    e.reason = format!("{} (for engine.instances[{index}])", e.reason);
                }
                e
            })?;
        }
        Ok(())
    }
}
