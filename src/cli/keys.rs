//! `sonora keys`: API keys in the ledger. `create` prints the secret once
//! (then, as the last line, `{"id", "name", "key"}` as JSON); `list` and
//! `revoke` never show it.

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};

use super::Failure;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::ledger::keys::{KeyLimits, Period};

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// A new key: its secret is printed once and never stored.
    Create(CreateArgs),
    /// Every key (never its secret).
    List(LedgerArg),
    /// Revokes a key: its unused client tokens stop working too.
    Revoke {
        /// The key's id (`key_…`).
        id: String,
        #[command(flatten)]
        ledger: LedgerArg,
    },
}

#[derive(Debug, Args)]
pub(crate) struct LedgerArg {
    /// The ledger's database (setting `ledger.url`, SONORA_LEDGER_URL).
    #[arg(long, value_name = "URL")]
    ledger: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Who or what the key is for.
    #[arg(long)]
    name: String,
    /// Most the key may spend per period, in US dollars.
    #[arg(long, value_name = "USD", requires = "period")]
    budget_usd: Option<f64>,
    /// The budget's period: `day` and `month` reset at local midnight and
    /// on the 1st (`ledger.time_zone`); `total` never does.
    #[arg(long, value_name = "day|month|total", requires = "budget_usd")]
    period: Option<String>,
    /// Most conversations the key may hold at once.
    #[arg(long, value_name = "N")]
    max_sessions: Option<u64>,
    #[command(flatten)]
    ledger: LedgerArg,
}

impl KeysCommand {
    pub(crate) fn overrides(&self) -> Vec<(String, String)> {
        let ledger = match self {
            Self::Create(args) => &args.ledger,
            Self::List(ledger) | Self::Revoke { ledger, .. } => ledger,
        };
        ledger
            .ledger
            .iter()
            .map(|url| ("ledger.url".to_owned(), url.clone()))
            .collect()
    }
}

/// `--budget-usd` in whole micro-dollars.
fn micro_usd(usd: f64) -> anyhow::Result<u64> {
    crate::usage::micro_usd(usd).map_err(|reason| anyhow!("--budget-usd {reason}"))
}

pub(crate) fn run(config: &Config, command: &KeysCommand) -> Result<(), Failure> {
    if !config.ledger.enabled() {
        return Err(anyhow!("keys live in the ledger, and ledger.url is off").into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let ledger = Ledger::open_beside(&config.ledger)
            .await
            .map_err(anyhow::Error::from)?;
        match command {
            KeysCommand::Create(args) => create(&ledger, args).await,
            KeysCommand::List(_) => {
                // The configuration was validated: the zone exists.
                let zone = jiff::tz::TimeZone::get(&config.ledger.time_zone)
                    .map_err(|e| anyhow!("ledger.time_zone: {e}"))?;
                list(&ledger, &zone).await
            }
            KeysCommand::Revoke { id, .. } => {
                if ledger.revoke_key(id).await.map_err(anyhow::Error::from)? {
                    println!("revoked {id}");
                    Ok(())
                } else {
                    Err(anyhow!("no live key has the id {id}").into())
                }
            }
        }
    })
}

async fn create(ledger: &Ledger, args: &CreateArgs) -> Result<(), Failure> {
    let name = args.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(anyhow!("--name must be 1 to 100 characters").into());
    }
    let budget = match (args.budget_usd, args.period.as_deref()) {
        (Some(usd), Some(period)) => {
            let period = Period::parse(period)
                .ok_or_else(|| anyhow!("--period is day, month or total, not {period:?}"))?;
            Some((micro_usd(usd)?, period))
        }
        _ => None,
    };
    if args.max_sessions == Some(0) {
        return Err(anyhow!("--max-sessions must be at least 1").into());
    }
    let limits = KeyLimits {
        budget,
        max_sessions: args.max_sessions,
    };
    let (info, secret) = ledger
        .create_key(name, &limits)
        .await
        .map_err(anyhow::Error::from)?;
    println!("API key {} ({}): {secret}", info.id, info.name);
    println!(
        "Keep it now: it is shown only once. Trade it for client tokens with POST /api/tokens."
    );
    let last = serde_json::json!({"id": info.id, "name": info.name, "key": secret});
    println!("{last}");
    Ok(())
}

async fn list(ledger: &Ledger, zone: &jiff::tz::TimeZone) -> Result<(), Failure> {
    let keys = ledger.keys().await.map_err(anyhow::Error::from)?;
    let dollars = |micro: u64| format!("${}.{:06}", micro / 1_000_000, micro % 1_000_000);
    for key in &keys {
        let budget = match (key.budget_micro_usd, &key.budget_period) {
            (Some(micro), Some(period)) => {
                let spent = ledger
                    .key_spent(key, crate::ledger::now_ms(), zone)
                    .await
                    .map_err(anyhow::Error::from)?;
                let micro = u64::try_from(micro).unwrap_or(0);
                format!("{}/{period}, {} spent", dollars(micro), dollars(spent))
            }
            _ => "no budget".to_owned(),
        };
        let sessions = key.max_sessions.map_or_else(
            || "any number at once".to_owned(),
            |n| format!("{n} at once"),
        );
        let state = if key.revoked_ms.is_some() {
            "revoked"
        } else {
            "live"
        };
        println!("{}\t{}\t{state}\t{budget}\t{sessions}", key.id, key.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_whole_micro_dollars() {
        assert_eq!(micro_usd(1.5).expect("ok"), 1_500_000);
        assert_eq!(micro_usd(0.000_001).expect("ok"), 1);
        assert!(micro_usd(0.000_000_5).is_err());
        assert!(micro_usd(-1.0).is_err());
        assert!(micro_usd(f64::NAN).is_err());
    }
}
