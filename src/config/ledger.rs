//! The `[ledger]` section: where conversations, usage and cost are recorded.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The durable record of conversations, usage and cost (`crate::ledger`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Database: `sqlite://PATH` (a file, created when missing) or `postgres://…`; `off` records nothing (no unit).
    pub url: String,
    /// This gateway's name in the ledger; several gateways sharing one database need different names. Empty: the host name (no unit).
    pub gateway_name: String,
    /// Record what was said in each turn (transcripts); off by default (no unit).
    pub store_transcripts: bool,
    /// Records waiting for the ledger's writer; past it a conversation waits, in records.
    pub queue_records: u32,
    /// Longest wait for the database on one write before the ledger counts as unavailable, in milliseconds.
    pub write_timeout_ms: u32,
    /// Time zone of reports' days (and of budgets' days and months), an IANA name (no unit).
    pub time_zone: String,
    /// Most all conversations together may spend in one day of `time_zone`; 0: no limit, in US dollars.
    pub global_daily_usd: f64,
    /// Most one conversation may spend; 0: no limit, in US dollars.
    pub conversation_usd: f64,
    /// Held against a conversation's budgets for its next turn (the most a limit is passed by), in US dollars.
    pub turn_reserve_usd: f64,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/sonora.db".to_owned(),
            gateway_name: String::new(),
            store_transcripts: false,
            queue_records: 4_096,
            write_timeout_ms: 5_000,
            time_zone: "America/Lima".to_owned(),
            global_daily_usd: 0.0,
            conversation_usd: 0.0,
            turn_reserve_usd: 0.02,
        }
    }
}

impl LedgerConfig {
    /// Whether anything is recorded.
    pub fn enabled(&self) -> bool {
        self.url != "off"
    }

    /// `global_daily_usd` in micro-dollars, when set.
    pub fn global_daily_micro_usd(&self) -> Option<u64> {
        crate::usage::micro_usd(self.global_daily_usd).ok()
    }

    /// `conversation_usd` in micro-dollars, when set.
    pub fn conversation_micro_usd(&self) -> Option<u64> {
        crate::usage::micro_usd(self.conversation_usd).ok()
    }

    /// `turn_reserve_usd` in micro-dollars.
    pub fn turn_reserve_micro_usd(&self) -> u64 {
        crate::usage::micro_usd(self.turn_reserve_usd).unwrap_or(0)
    }

    /// The first bad setting, made into an error by `bad(key, value shown, reason)`.
    pub(super) fn check(
        &self,
        bad: &dyn Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let url = &self.url;
        let known = url == "off"
            || url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://");
        if !known {
            let reason = "must be sqlite://PATH, postgres://… or off";
            let shown = toml::Value::from(crate::redact::url(url)).to_string();
            return Err(bad("ledger.url", shown, reason));
        }
        let name_ok = self
            .gateway_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            && self.gateway_name.len() <= 64;
        if !name_ok {
            let reason = "at most 64 letters, digits and - _ . :";
            let shown = toml::Value::from(self.gateway_name.as_str()).to_string();
            return Err(bad("ledger.gateway_name", shown, reason));
        }
        if jiff::tz::TimeZone::get(&self.time_zone).is_err() {
            let reason = "must be an IANA time zone name, like America/Lima or UTC";
            let shown = toml::Value::from(self.time_zone.as_str()).to_string();
            return Err(bad("ledger.time_zone", shown, reason));
        }
        let amounts = [
            ("ledger.global_daily_usd", self.global_daily_usd),
            ("ledger.conversation_usd", self.conversation_usd),
            ("ledger.turn_reserve_usd", self.turn_reserve_usd),
        ];
        for (key, usd) in amounts {
            if usd != 0.0
                && let Err(reason) = crate::usage::micro_usd(usd)
            {
                return Err(bad(key, usd.to_string(), &reason));
            }
        }
        let reserve = self.turn_reserve_micro_usd();
        if let Some(cap) = self.conversation_micro_usd()
            && cap < reserve
        {
            let reason = "must be at least ledger.turn_reserve_usd, or no conversation could start";
            return Err(bad(
                "ledger.conversation_usd",
                self.conversation_usd.to_string(),
                reason,
            ));
        }
        #[rustfmt::skip]
        let ranges = [
            ("ledger.queue_records", self.queue_records, 16, 1_000_000, "records"),
            ("ledger.write_timeout_ms", self.write_timeout_ms, 100, 600_000, "ms"),
        ];
        super::check_ranges(&ranges, &bad)?;
        Ok(())
    }
}
