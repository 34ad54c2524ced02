//! API keys and the short-lived client tokens a key buys.
//!
//! A key's secret (`sk_…`) is shown once, at creation; the ledger keeps
//! only its SHA-256. A server-side application trades the key for a client
//! token (`ct_…`) that a browser puts in its `hello`: usable once, until it
//! expires, tied to its key, optionally limited to an engine, a voice or a
//! language. Tokens too are stored only as hashes.

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row as _;

use super::{Ledger, LedgerError, int, now_ms};

/// How a key's budget is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Month,
    Total,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Month => "month",
            Self::Total => "total",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "day" => Some(Self::Day),
            "month" => Some(Self::Month),
            "total" => Some(Self::Total),
            _ => None,
        }
    }
}

/// What a new key may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Spend per period, in micro-dollars, with its period.
    pub budget: Option<(u64, Period)>,
    /// Conversations at once.
    pub max_sessions: Option<u64>,
}

/// A key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
    pub budget_micro_usd: Option<i64>,
    pub budget_period: Option<String>,
    pub max_sessions: Option<i64>,
}

/// What a client token may be used for; empty fields leave it open.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Restrictions {
    pub engine: Option<String>,
    pub voice: Option<String>,
    pub language: Option<String>,
}

/// A token just issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuedToken {
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub key: String,
}

/// A token redeemed by a `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub key_id: String,
    pub restrictions: Restrictions,
}

/// Why a key or token was not accepted. The messages are safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the key is not valid or was revoked")]
    BadKey,
    #[error("the token is not valid, was already used or has expired")]
    BadToken,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// `bytes` random bytes in hex, from the operating system.
fn random_hex(bytes: usize) -> Result<String, LedgerError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| LedgerError::Unavailable(format!("no randomness: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn failed(e: sqlx::Error) -> LedgerError {
    LedgerError::Unavailable(e.to_string())
}

impl Ledger {
    /// A new key and its secret, which is never stored.
    pub async fn create_key(
        &self,
        name: &str,
        limits: &KeyLimits,
    ) -> Result<(KeyInfo, String), LedgerError> {
        let id = format!("key_{}", random_hex(8)?);
        let secret = format!("sk_{}", random_hex(24)?);
        let created_ms = now_ms();
        let (budget, period) = match limits.budget {
            Some((micro, period)) => (Some(int(micro)), Some(period.as_str().to_owned())),
            None => (None, None),
        };
        let max_sessions = limits.max_sessions.map(int);
        sqlx::query(
            "INSERT INTO api_keys (id, name, secret_sha256, created_ms, budget_micro_usd, \
             budget_period, max_sessions) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(sha256_hex(&secret))
        .bind(created_ms)
        .bind(budget)
        .bind(period.as_deref())
        .bind(max_sessions)
        .execute(self.pool())
        .await
        .map_err(failed)?;
        let info = KeyInfo {
            id,
            name: name.to_owned(),
            created_ms,
            revoked_ms: None,
            budget_micro_usd: budget,
            budget_period: period,
            max_sessions,
        };
        Ok((info, secret))
    }

    /// Every key, oldest first.
    pub async fn keys(&self) -> Result<Vec<KeyInfo>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, name, created_ms, revoked_ms, budget_micro_usd, budget_period, \
             max_sessions FROM api_keys ORDER BY created_ms, id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(failed)?;
        rows.iter()
            .map(|row| {
                Ok(KeyInfo {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    created_ms: row.try_get("created_ms")?,
                    revoked_ms: row.try_get("revoked_ms")?,
                    budget_micro_usd: row.try_get("budget_micro_usd")?,
                    budget_period: row.try_get("budget_period")?,
                    max_sessions: row.try_get("max_sessions")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(failed)
    }

    /// Revokes a key: its unused tokens stop working too. `false` when no
    /// such key is live.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, LedgerError> {
        let done =
            sqlx::query("UPDATE api_keys SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL")
                .bind(now_ms())
                .bind(id)
                .execute(self.pool())
                .await
                .map_err(failed)?;
        Ok(done.rows_affected() == 1)
    }

    /// Trades a key's secret for a client token valid `ttl_s` seconds.
    pub async fn issue_token(
        &self,
        secret: &str,
        ttl_s: u32,
        restrictions: &Restrictions,
    ) -> Result<IssuedToken, AuthError> {
        let key =
            sqlx::query("SELECT id FROM api_keys WHERE secret_sha256 = $1 AND revoked_ms IS NULL")
                .bind(sha256_hex(secret))
                .fetch_optional(self.pool())
                .await
                .map_err(failed)?;
        let Some(key) = key else {
            return Err(AuthError::BadKey);
        };
        let key_id: String = key.try_get("id").map_err(failed)?;
        let token = format!("ct_{}", random_hex(24)?);
        let created_ms = now_ms();
        let expires_ms = created_ms + i64::from(ttl_s) * 1000;
        sqlx::query(
            "INSERT INTO client_tokens (token_sha256, key_id, created_ms, expires_ms, engine, \
             voice, language) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(sha256_hex(&token))
        .bind(key_id.as_str())
        .bind(created_ms)
        .bind(expires_ms)
        .bind(restrictions.engine.as_deref())
        .bind(restrictions.voice.as_deref())
        .bind(restrictions.language.as_deref())
        .execute(self.pool())
        .await
        .map_err(failed)?;
        // Expired tokens are of no use to anyone: cleared as new ones come.
        let _ = sqlx::query("DELETE FROM client_tokens WHERE expires_ms < $1")
            .bind(created_ms - 86_400_000)
            .execute(self.pool())
            .await;
        Ok(IssuedToken {
            token,
            expires_at: expires_ms / 1000,
            key: key_id,
        })
    }

    /// Uses a client token up: once, before it expires, while its key is
    /// live. Two `hello`s racing with one token: one wins.
    pub async fn redeem_token(&self, token: &str) -> Result<Redeemed, AuthError> {
        let now = now_ms();
        let row = sqlx::query(
            "UPDATE client_tokens SET used_ms = $1 \
             WHERE token_sha256 = $2 AND used_ms IS NULL AND expires_ms > $3 \
             AND key_id IN (SELECT id FROM api_keys WHERE revoked_ms IS NULL) \
             RETURNING key_id, engine, voice, language",
        )
        .bind(now)
        .bind(sha256_hex(token))
        .bind(now)
        .fetch_optional(self.pool())
        .await
        .map_err(failed)?;
        let Some(row) = row else {
            return Err(AuthError::BadToken);
        };
        Ok(Redeemed {
            key_id: row.try_get("key_id").map_err(failed)?,
            restrictions: Restrictions {
                engine: row.try_get("engine").map_err(failed)?,
                voice: row.try_get("voice").map_err(failed)?,
                language: row.try_get("language").map_err(failed)?,
            },
        })
    }

    /// Gives a redeemed token back: the conversation it opened never
    /// started (the engine or the key's limit on conversations refused it),
    /// so it may be used again until it expires.
    pub async fn release_token(&self, token: &str) -> Result<(), LedgerError> {
        sqlx::query("UPDATE client_tokens SET used_ms = NULL WHERE token_sha256 = $1")
            .bind(sha256_hex(token))
            .execute(self.pool())
            .await
            .map_err(failed)?;
        Ok(())
    }

    /// What a key has spent in the period holding `at_ms` (in `zone`).
    pub async fn key_spent(
        &self,
        key: &KeyInfo,
        at_ms: i64,
        zone: &jiff::tz::TimeZone,
    ) -> Result<u64, LedgerError> {
        let Some(period) = key.budget_period.as_deref().and_then(Period::parse) else {
            return Ok(0);
        };
        let row =
            sqlx::query("SELECT spent_micro_usd FROM budgets WHERE scope = $1 AND period = $2")
                .bind(format!("key:{}", key.id))
                .bind(super::budget::period_label(period, at_ms, zone))
                .fetch_optional(self.pool())
                .await
                .map_err(failed)?;
        let spent: i64 = match row {
            Some(row) => row.try_get(0).map_err(failed)?,
            None => 0,
        };
        Ok(u64::try_from(spent).unwrap_or(0))
    }
}
