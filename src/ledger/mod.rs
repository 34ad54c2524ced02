//! The ledger: a durable record of every conversation, every usage delta
//! an engine reported and what it cost, on SQLite (one file, the default)
//! or PostgreSQL (shared by several gateways).
//!
//! Writes go through one writer task ([`writer`]) with a bounded queue and
//! batched transactions, so no conversation waits on a disk per frame.
//! [`Ledger::usage`] returns once its delta is committed: a gateway tells
//! the client a cost only after the ledger holds it, so a crash can lose
//! nothing a client was shown. Money is integer micro-dollars throughout;
//! each usage row names the price table it was priced with, and is stored
//! once per (conversation, upstream stream, sequence) however often it is
//! written. Conversations a gateway left open (it crashed) are closed as
//! `interrupted` when a gateway of the same name opens the ledger again.

pub mod budget;
pub mod keys;
pub mod report;
mod schema;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::{Connection as _, Executor as _, Row as _};
use tokio::sync::{mpsc, oneshot};

pub use self::budget::{Account, Refusal, Standing};
use crate::config::LedgerConfig;
use crate::usage::UsageDelta;

/// The end reason of a conversation its gateway never closed.
pub const INTERRUPTED: &str = "interrupted";

/// Which database holds the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Why the ledger could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The database could not be opened or prepared.
    #[error("cannot open the ledger {url}: {message}")]
    Open { url: String, message: String },
    /// A write or read failed, or took longer than `ledger.write_timeout_ms`.
    #[error("the ledger is unavailable: {0}")]
    Unavailable(String),
}

/// What the writer has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Records committed.
    pub written: AtomicU64,
    /// Records lost to a failed write.
    pub failed: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
}

/// A conversation as it starts (before the engine does: a conversation
/// the ledger cannot record does not start).
#[derive(Debug, Clone)]
pub struct Started {
    pub id: String,
    pub key_id: Option<String>,
    /// Who is calling, as stored: [`client_hash`] of an address or a
    /// caller's number, never either itself.
    pub client: String,
    /// `web` or `phone`.
    pub channel: &'static str,
    pub engine: String,
    pub language: String,
    pub voice: String,
    /// One turn's worth, held against the conversation's budgets before
    /// each turn: 0 for an engine that costs nothing.
    pub reserve_micro_usd: u64,
}

/// Whether a conversation may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Recorded; with its account when a budget limits it.
    Admitted(Option<Account>),
    /// Not recorded, and not to start.
    Refused(Refusal),
}

/// The limits every conversation of a gateway shares (from `[ledger]`).
#[derive(Debug, Clone)]
pub(crate) struct Budgets {
    pub(crate) zone: jiff::tz::TimeZone,
    pub(crate) global_daily_micro_usd: Option<u64>,
    pub(crate) conversation_micro_usd: Option<u64>,
    /// SQLite takes its write lock at the start of each transaction.
    pub(crate) sqlite: bool,
}

/// One usage delta and where it came from.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub conversation: String,
    /// The engine's upstream stream (a rotation starts a new one).
    pub stream: u64,
    /// The delta's place among the conversation's deltas.
    pub sequence: u64,
    /// The price table the cost was computed with.
    pub prices: String,
    pub delta: UsageDelta,
    /// The conversation's budgets, when it has any: the delta is settled
    /// against them in the same transaction.
    pub account: Option<Account>,
}

/// One finished turn.
#[derive(Debug, Clone)]
pub struct TurnRecord {
    pub conversation: String,
    pub turn: u64,
    /// From the end of the user's speech to the first reply audio.
    pub latency_ms: Option<u64>,
    /// `completed`, `interrupted`, …
    pub outcome: String,
    /// Kept only with `ledger.store_transcripts`.
    pub user_text: Option<String>,
    pub reply_text: Option<String>,
}

/// A handle on the ledger; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: AnyPool,
    backend: Backend,
    gateway: String,
    store_transcripts: bool,
    jobs: mpsc::Sender<writer::Job>,
    healthy: AtomicBool,
    stats: LedgerStats,
    /// The URL without credentials, for messages.
    shown_url: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// A stored integer: the database's are signed.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Ledger {
    /// Opens (creating a SQLite file and its directory when missing) and
    /// migrates the ledger, closes this gateway's conversations left open
    /// as `interrupted`, and starts the writer on the current runtime.
    pub async fn open(config: &LedgerConfig) -> Result<Self, LedgerError> {
        Self::open_as(config, true).await
    }

    /// The ledger for a command (keys, reports) beside running gateways:
    /// it closes no conversation.
    pub async fn open_beside(config: &LedgerConfig) -> Result<Self, LedgerError> {
        Self::open_as(config, false).await
    }

    async fn open_as(config: &LedgerConfig, gateway: bool) -> Result<Self, LedgerError> {
        let (backend, pool) = connect(config).await?;
        let shown_url = crate::redact::url(&config.url);
        let failed = |message: String| LedgerError::Open {
            url: shown_url.clone(),
            message,
        };
        let name = gateway_name(config);
        if gateway {
            close_interrupted(&pool, &name)
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        let budgets = Budgets {
            zone: jiff::tz::TimeZone::get(&config.time_zone).map_err(|e| failed(e.to_string()))?,
            global_daily_micro_usd: config.global_daily_micro_usd(),
            conversation_micro_usd: config.conversation_micro_usd(),
            sqlite: backend == Backend::Sqlite,
        };
        let (jobs, queue) = mpsc::channel(config.queue_records as usize);
        let inner = Arc::new(Inner {
            pool: pool.clone(),
            backend,
            gateway: name,
            store_transcripts: config.store_transcripts,
            jobs,
            healthy: AtomicBool::new(true),
            stats: LedgerStats::default(),
            shown_url,
        });
        let timeout = Duration::from_millis(u64::from(config.write_timeout_ms));
        tokio::spawn(writer::run(
            pool,
            Arc::downgrade(&inner),
            queue,
            timeout,
            budgets,
        ));
        Ok(Self { inner })
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// This gateway's name in the ledger.
    pub fn gateway(&self) -> &str {
        &self.inner.gateway
    }

    /// The database, without credentials.
    pub fn shown_url(&self) -> &str {
        &self.inner.shown_url
    }

    /// Whether the last write succeeded.
    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &LedgerStats {
        &self.inner.stats
    }

    /// The pool, for reports.
    pub fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// Admits a conversation against its budgets and its key's limit on
    /// conversations at once, and records its start; returns once it is
    /// committed. A refused conversation is not recorded.
    pub async fn started(&self, start: Started) -> Result<Admission, LedgerError> {
        let client = start.client.clone();
        let done = self
            .commit(writer::Write::Started {
                start,
                client,
                gateway: self.inner.gateway.clone(),
                at_ms: now_ms(),
            })
            .await?;
        match done {
            writer::Done::Admission(admission) => Ok(admission),
            _ => Ok(Admission::Admitted(None)),
        }
    }

    /// The engine (instance), model and voice, once it is ready, and again
    /// when the conversation moves to another engine (not waited for).
    pub fn ready(&self, conversation: &str, engine: &str, model: &str, voice: &str) {
        self.queue(writer::Write::Ready {
            conversation: conversation.to_owned(),
            engine: engine.to_owned(),
            model: model.to_owned(),
            voice: voice.to_owned(),
        });
    }

    /// Records one usage delta, adds it to its conversation's totals and
    /// settles it against the conversation's budgets; returns once all
    /// three are committed, with the account as it now stands. Writing the
    /// same (conversation, stream, sequence) again changes nothing.
    pub async fn usage(&self, record: UsageRecord) -> Result<Option<Account>, LedgerError> {
        let done = self
            .commit(writer::Write::Usage {
                record,
                at_ms: now_ms(),
            })
            .await?;
        match done {
            writer::Done::Settled(account) => Ok(account),
            _ => Ok(None),
        }
    }

    /// Records a finished turn (not waited for); its texts only with
    /// `ledger.store_transcripts`.
    pub fn turn(&self, mut record: TurnRecord) {
        if !self.inner.store_transcripts {
            record.user_text = None;
            record.reply_text = None;
        }
        self.queue(writer::Write::Turn {
            record,
            at_ms: now_ms(),
        });
    }

    /// Records a conversation's end and gives back what it held against
    /// its budgets; returns once it is committed.
    pub async fn ended(
        &self,
        conversation: &str,
        reason: &str,
        turns: u32,
    ) -> Result<(), LedgerError> {
        self.commit(writer::Write::Ended {
            conversation: conversation.to_owned(),
            reason: reason.to_owned(),
            turns,
            at_ms: now_ms(),
        })
        .await
        .map(drop)
    }

    /// Queues a write and waits for its commit.
    async fn commit(&self, write: writer::Write) -> Result<writer::Done, LedgerError> {
        let (done, committed) = oneshot::channel();
        let job = writer::Job {
            write,
            done: Some(done),
        };
        if self.inner.jobs.send(job).await.is_err() {
            return Err(LedgerError::Unavailable(
                "the ledger's writer has stopped".into(),
            ));
        }
        committed.await.unwrap_or_else(|_| {
            Err(LedgerError::Unavailable(
                "the ledger's writer has stopped".into(),
            ))
        })
    }

    /// Queues a write nobody waits for; with the queue full it is lost and
    /// counted.
    fn queue(&self, write: writer::Write) {
        let job = writer::Job { write, done: None };
        if self.inner.jobs.try_send(job).is_err() {
            self.inner.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Connects to the ledger's database (creating a SQLite file and its
/// directory when missing) and brings its schema up to date; nothing else.
/// Reports read through this while a gateway writes.
pub async fn connect(config: &LedgerConfig) -> Result<(Backend, AnyPool), LedgerError> {
    let url = config.url.as_str();
    let failed = |message: String| LedgerError::Open {
        url: crate::redact::url(url),
        message,
    };
    let (backend, connect_url) = connect_url(url).map_err(failed)?;
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        // SQLite takes one writer at a time anyway; reports read through
        // their own connection.
        .max_connections(match backend {
            Backend::Sqlite => 2,
            Backend::Postgres => 4,
        })
        // Also how long opening waits for an unreachable server.
        .acquire_timeout(
            Duration::from_millis(u64::from(config.write_timeout_ms)).max(Duration::from_secs(1)),
        )
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                         PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON",
                    )
                    .await?;
                }
                Ok(())
            })
        })
        .connect(&connect_url)
        .await
        .map_err(|e| failed(e.to_string()))?;
    // Gateways opening a new database at the same moment race to create
    // its tables; the loser's transaction rolls back, and a second look
    // finds them made.
    if migrate(&pool).await.is_err() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        migrate(&pool).await.map_err(|e| failed(e.to_string()))?;
    }
    Ok((backend, pool))
}

/// The backend and the URL to connect with: a SQLite file is created (with
/// its directory) when missing.
fn connect_url(url: &str) -> Result<(Backend, String), String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((Backend::Postgres, url.to_owned()));
    }
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Err("not a sqlite:// or postgres:// URL".into());
    };
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err("no file name".into());
    }
    if let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the directory {}: {e}", dir.display()))?;
    }
    let query = if query.contains("mode=") {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    Ok((Backend::Sqlite, format!("sqlite://{path}?{query}")))
}

/// `ledger.gateway_name`, or the host name.
fn gateway_name(config: &LedgerConfig) -> String {
    if !config.gateway_name.is_empty() {
        return config.gateway_name.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "sonora".to_owned())
}

/// A client as stored: a hash of its address (or a caller's number), so
/// the ledger keeps nothing personal while one client's conversations can
/// still be grouped.
pub fn client_hash(client: &str) -> String {
    // FNV-1a: stable across versions and processes.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in client.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Closes the conversations a gateway of this name left open as
/// `interrupted` (it was killed while they ran), and gives back what they
/// held against their budgets.
async fn close_interrupted(pool: &AnyPool, gateway: &str) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let at_ms = now_ms();
    // First a write: SQLite takes its write lock before the holds are read.
    sqlx::query(
        "UPDATE conversations SET ended_ms = $1, end_reason = $2 \
         WHERE gateway = $3 AND ended_ms IS NULL",
    )
    .bind(at_ms)
    .bind(INTERRUPTED)
    .bind(gateway)
    .execute(&mut *tx)
    .await?;
    let holds = sqlx::query(
        "SELECT held_micro_usd, hold FROM conversations \
         WHERE gateway = $1 AND ended_ms = $2 AND end_reason = $3 AND held_micro_usd > 0",
    )
    .bind(gateway)
    .bind(at_ms)
    .bind(INTERRUPTED)
    .fetch_all(&mut *tx)
    .await?;
    let mut changes = budget::Changes::default();
    for row in &holds {
        let held: i64 = row.try_get("held_micro_usd")?;
        let hold: String = row.try_get("hold")?;
        changes.release(&budget::parse_hold(&hold), u64::try_from(held).unwrap_or(0));
    }
    if !changes.is_empty() {
        changes.apply(&mut tx).await?;
        sqlx::query(
            "UPDATE conversations SET held_micro_usd = 0 \
             WHERE gateway = $1 AND ended_ms = $2 AND end_reason = $3",
        )
        .bind(gateway)
        .bind(at_ms)
        .bind(INTERRUPTED)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Runs the migrations not yet recorded, each in its own transaction.
async fn migrate(pool: &AnyPool) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    conn.execute(
        "CREATE TABLE IF NOT EXISTS ledger_migrations (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            applied_ms BIGINT NOT NULL
        )",
    )
    .await?;
    for &(version, name, sql) in schema::MIGRATIONS {
        let mut tx = conn.begin().await?;
        let done = sqlx::query("SELECT version FROM ledger_migrations WHERE version = $1")
            .bind(version)
            .fetch_optional(&mut *tx)
            .await?;
        if done.is_some() {
            continue;
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        // Two gateways migrating one new database at once: the second's
        // insert fails on the key and its transaction rolls back.
        sqlx::query(
            "INSERT INTO ledger_migrations (version, name, applied_ms) VALUES ($1, $2, $3)",
        )
        .bind(version)
        .bind(name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    // The newest version this build knows must be the database's newest.
    let newest: i64 = sqlx::query("SELECT MAX(version) FROM ledger_migrations")
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    let known = schema::MIGRATIONS.last().map_or(0, |m| m.0);
    if newest > known {
        return Err(sqlx::Error::Protocol(format!(
            "the ledger's schema is version {newest}, newer than this build's {known}: upgrade sonora"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
