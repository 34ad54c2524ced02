// Over 600 lines: every write kind and its transaction stay together, so the order of a batch is read in one place.
//! The ledger's one writer: takes what is queued (up to [`MAX_BATCH`]
//! records at once), writes it in one transaction, then tells each waiting
//! caller. A failed or timed-out transaction fails every record in it and
//! marks the ledger unhealthy until a later one commits.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::Any;
use sqlx::{Connection as _, Row as _, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::budget::{self, Account, Changes, Hold, Refusal, Scope, Standing};
use super::keys::Period;
use super::{Admission, Budgets, Inner, LedgerError, Started, TurnRecord, UsageRecord, int};
use crate::usage::UsageDelta;

/// Most records in one transaction.
const MAX_BATCH: usize = 256;
/// The writer gathers records while the next comes within `GATHER_GAP`
/// of the last, for at most `GATHER_MAX`: the most a `usage` message waits
/// for company, bought back many times over in commits under load (at 1000
/// conversations, 0.75 → 0.55 ms of gateway CPU per conversation-second).
const GATHER_GAP: Duration = Duration::from_millis(2);
const GATHER_MAX: Duration = Duration::from_millis(20);

/// One record to write.
#[derive(Debug)]
pub(super) enum Write {
    Started {
        start: Started,
        client: String,
        gateway: String,
        at_ms: i64,
    },
    Ready {
        conversation: String,
        engine: String,
        model: String,
        voice: String,
    },
    Usage {
        record: UsageRecord,
        at_ms: i64,
    },
    Turn {
        record: TurnRecord,
        at_ms: i64,
    },
    Ended {
        conversation: String,
        reason: String,
        turns: u32,
        at_ms: i64,
    },
}

/// What a committed record did.
#[derive(Debug, Clone)]
pub(super) enum Done {
    Written,
    /// A conversation's start: admitted (with its account when something
    /// limits it) or refused, then not recorded.
    Admission(Admission),
    /// A usage delta settled against the conversation's budgets.
    Settled(Option<Account>),
}

#[derive(Debug)]
pub(super) struct Job {
    pub(super) write: Write,
    /// Told once the record is committed, or why it is not.
    pub(super) done: Option<oneshot::Sender<Result<Done, LedgerError>>>,
}

impl Job {
    /// A start that checks budgets or a key's conversations: alone in its
    /// transaction, which a refusal rolls back.
    fn admits(&self, budgets: &Budgets) -> bool {
        matches!(&self.write, Write::Started { start, .. }
            if start.key_id.is_some() || budgets.global_daily_micro_usd.is_some())
    }
}

pub(super) async fn run(
    pool: AnyPool,
    ledger: Weak<Inner>,
    mut queue: mpsc::Receiver<Job>,
    timeout: Duration,
    budgets: Budgets,
) {
    let writer = Writer {
        pool,
        timeout,
        budgets,
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(job) = queue.recv().await {
        batch.push(job);
        // What else keeps arriving shares the transaction: one commit (and
        // one disk flush) for many records under load, and no wait beyond
        // one short gap for a record alone.
        let window = tokio::time::Instant::now() + GATHER_MAX;
        while batch.len() < MAX_BATCH {
            let next = (tokio::time::Instant::now() + GATHER_GAP).min(window);
            match tokio::time::timeout_at(next, queue.recv()).await {
                Ok(Some(job)) => batch.push(job),
                Ok(None) | Err(_) => break,
            }
        }
        // Admissions each in their own transaction; the rest together.
        let (alone, together): (Vec<Job>, Vec<Job>) =
            batch.drain(..).partition(|job| job.admits(&writer.budgets));
        for job in alone {
            writer.finish(&ledger, vec![job]).await;
        }
        if !together.is_empty() {
            writer.finish(&ledger, together).await;
        }
    }
}

struct Writer {
    pool: AnyPool,
    timeout: Duration,
    budgets: Budgets,
}

impl Writer {
    /// Writes `jobs` in one transaction (each on its own if that fails, so
    /// one bad record fails alone) and tells their callers.
    async fn finish(&self, ledger: &Weak<Inner>, jobs: Vec<Job>) {
        let mut results = vec![self.write_timed(&jobs).await];
        if results[0].is_err() && jobs.len() > 1 {
            results.clear();
            for job in &jobs {
                results.push(self.write_timed(std::slice::from_ref(job)).await);
            }
        }
        if let Some(inner) = ledger.upgrade() {
            account(&inner, jobs.len(), &results);
        }
        let shared = results.len() == 1;
        for (i, job) in jobs.into_iter().enumerate() {
            let result = if shared { &results[0] } else { &results[i] };
            let Some(done) = job.done else {
                continue;
            };
            let result = match result {
                Ok(dones) => Ok(dones
                    .get(if shared { i } else { 0 })
                    .cloned()
                    .unwrap_or(Done::Written)),
                Err(e) => Err(e.clone()),
            };
            let _ = done.send(result);
        }
    }

    async fn write_timed(&self, jobs: &[Job]) -> Result<Vec<Done>, LedgerError> {
        match tokio::time::timeout(self.timeout, self.write_batch(jobs)).await {
            Ok(Ok(dones)) => Ok(dones),
            Ok(Err(e)) => Err(LedgerError::Unavailable(e.to_string())),
            Err(_) => Err(LedgerError::Unavailable(format!(
                "a write took longer than {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn write_batch(&self, jobs: &[Job]) -> Result<Vec<Done>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut tx = begin(&mut conn, self.budgets.sqlite).await?;
        let now_ms = super::now_ms();
        let mut changes = Changes::default();
        let mut pending = Vec::with_capacity(jobs.len());
        for (tag, job) in jobs.iter().enumerate() {
            let step = match &job.write {
                Write::Started {
                    start,
                    client,
                    gateway,
                    at_ms,
                } => {
                    insert_conversation(&mut tx, start, client, gateway, *at_ms).await?;
                    self.admit(&mut tx, tag, start, now_ms, &mut changes)
                        .await?
                }
                Write::Usage { record, at_ms } => {
                    let new = write_usage(&mut tx, record, *at_ms).await?;
                    // The period is the usage row's: reports and the
                    // budgets agree at midnight too.
                    self.settle(tag, record, new, *at_ms, &mut changes)
                }
                Write::Ended {
                    conversation,
                    reason,
                    turns,
                    at_ms,
                } => {
                    end_conversation(&mut tx, conversation, reason, *turns, *at_ms, &mut changes)
                        .await?;
                    Step::Done(Done::Written)
                }
                Write::Ready {
                    conversation,
                    engine,
                    model,
                    voice,
                } => {
                    sqlx::query(
                        "UPDATE conversations SET engine = $1, model = $2, voice = $3 WHERE id = $4",
                    )
                    .bind(engine.as_str())
                    .bind(model.as_str())
                        .bind(voice.as_str())
                        .bind(conversation.as_str())
                        .execute(&mut *tx)
                        .await?;
                    Step::Done(Done::Written)
                }
                Write::Turn { record, at_ms } => {
                    write_turn(&mut tx, record, *at_ms).await?;
                    Step::Done(Done::Written)
                }
            };
            pending.push(step);
        }
        let outcomes = if changes.is_empty() {
            Default::default()
        } else {
            changes.apply(&mut tx).await?
        };
        let mut dones = Vec::with_capacity(pending.len());
        let mut refused = false;
        for (tag, step) in pending.into_iter().enumerate() {
            let done = match step {
                Step::Done(done) => done,
                Step::Refused(refusal) => {
                    refused = true;
                    Done::Admission(Admission::Refused(refusal))
                }
                Step::Hold {
                    conversation,
                    mut account,
                    want,
                    admission,
                } => {
                    let outcome = outcomes.get(&tag);
                    let granted = outcome.is_none_or(|o| o.granted);
                    if admission && !granted {
                        refused = true;
                        let (scope, _) = outcome
                            .and_then(|o| o.refused_by.clone())
                            .unwrap_or_default();
                        let period = account
                            .scopes
                            .iter()
                            .find(|s| s.name == scope)
                            .map_or(Period::Total, |s| s.period);
                        dones.push(Done::Admission(Admission::Refused(Refusal::Budget {
                            scope,
                            period,
                        })));
                        continue;
                    }
                    if !granted {
                        account.hold.micro_usd = account.hold.micro_usd.saturating_sub(want);
                    }
                    let remaining = match outcome.and_then(|o| o.remaining_micro_usd) {
                        Some(remaining) => Some(remaining),
                        None => account.standing.remaining_micro_usd,
                    };
                    account.standing = Standing {
                        remaining_micro_usd: remaining,
                        exhausted: account.standing.exhausted || !granted,
                    };
                    sqlx::query(
                        "UPDATE conversations SET held_micro_usd = $1, hold = $2 WHERE id = $3",
                    )
                    .bind(int(account.hold.micro_usd))
                    .bind(account.hold_text())
                    .bind(conversation.as_str())
                    .execute(&mut *tx)
                    .await?;
                    if admission {
                        Done::Admission(Admission::Admitted(Some(account)))
                    } else {
                        Done::Settled(Some(account))
                    }
                }
            };
            dones.push(done);
        }
        if refused {
            // Only an admission is refused, and it is alone: nothing of it
            // is kept.
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok(dones)
    }

    /// The limits of a starting conversation, and its first hold.
    async fn admit(
        &self,
        tx: &mut Transaction<'_, Any>,
        tag: usize,
        start: &Started,
        now_ms: i64,
        changes: &mut Changes,
    ) -> Result<Step, sqlx::Error> {
        let mut scopes = Vec::new();
        if let Some(limit) = self.budgets.global_daily_micro_usd {
            scopes.push(Scope {
                name: budget::GLOBAL.to_owned(),
                limit_micro_usd: limit,
                period: Period::Day,
            });
        }
        if let Some(key) = &start.key_id {
            let row = sqlx::query(
                "SELECT budget_micro_usd, budget_period, max_sessions FROM api_keys WHERE id = $1",
            )
            .bind(key.as_str())
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(row) = row {
                let budget: Option<i64> = row.try_get("budget_micro_usd")?;
                let period: Option<String> = row.try_get("budget_period")?;
                let max_sessions: Option<i64> = row.try_get("max_sessions")?;
                if let Some(max) = max_sessions {
                    // The key's row locked (a no-op update) while its
                    // running conversations are counted: admissions on one
                    // key take turns, in every gateway.
                    sqlx::query("UPDATE api_keys SET max_sessions = max_sessions WHERE id = $1")
                        .bind(key.as_str())
                        .execute(&mut **tx)
                        .await?;
                    let running: i64 = sqlx::query(
                        "SELECT COUNT(*) FROM conversations WHERE key_id = $1 AND ended_ms IS NULL",
                    )
                    .bind(key.as_str())
                    .fetch_one(&mut **tx)
                    .await?
                    .try_get(0)?;
                    if running > max {
                        let max = u64::try_from(max).unwrap_or(0);
                        return Ok(Step::Refused(Refusal::Sessions { max }));
                    }
                }
                if let (Some(budget), Some(period)) =
                    (budget, period.as_deref().and_then(Period::parse))
                {
                    scopes.push(Scope {
                        name: format!("key:{key}"),
                        limit_micro_usd: u64::try_from(budget).unwrap_or(0),
                        period,
                    });
                }
            }
        }
        scopes.sort_by(|a, b| a.name.cmp(&b.name));
        let reserve = start.reserve_micro_usd;
        let mut account = Account {
            scopes,
            reserve_micro_usd: reserve,
            conversation_micro_usd: self.budgets.conversation_micro_usd,
            hold: Hold::default(),
            standing: Standing::default(),
        };
        account.apply_conversation_cap(0);
        if account.scopes.is_empty() {
            let account = account.limited().then_some(account);
            return Ok(Step::Done(Done::Admission(Admission::Admitted(account))));
        }
        let periods: Vec<String> = account
            .scopes
            .iter()
            .map(|scope| scope.period_at(now_ms, &self.budgets.zone))
            .collect();
        changes.ask(tag, &account, &periods, reserve);
        account.hold = Hold {
            micro_usd: reserve,
            periods,
        };
        Ok(Step::Hold {
            conversation: start.id.clone(),
            account,
            want: reserve,
            admission: true,
        })
    }

    /// Takes a recorded delta out of its conversation's hold and asks for
    /// the hold to be topped up.
    fn settle(
        &self,
        tag: usize,
        record: &UsageRecord,
        new: bool,
        now_ms: i64,
        changes: &mut Changes,
    ) -> Step {
        let Some(account) = &record.account else {
            return Step::Done(Done::Settled(None));
        };
        let mut account = account.clone();
        let spent = record.delta.cost_micro_usd;
        if !new || account.scopes.is_empty() || spent == 0 {
            if new {
                account.standing.remaining_micro_usd = account
                    .standing
                    .remaining_micro_usd
                    .map(|r| r.saturating_sub(spent));
            }
            return Step::Done(Done::Settled(Some(account)));
        }
        let (hold, want) = changes.settle(tag, &account, spent, now_ms, &self.budgets.zone);
        account.hold = hold;
        Step::Hold {
            conversation: record.conversation.clone(),
            account,
            want,
            admission: false,
        }
    }
}

/// A record's step before the budget rows are changed.
enum Step {
    Done(Done),
    Refused(Refusal),
    /// A hold asked for; its outcome is known once the rows are changed.
    Hold {
        conversation: String,
        account: Account,
        /// What was asked for on top of what is still held.
        want: u64,
        admission: bool,
    },
}

/// A transaction that takes SQLite's write lock at once, so a conditional
/// update never meets another gateway's write half-way.
async fn begin<'c>(
    conn: &'c mut sqlx::pool::PoolConnection<Any>,
    sqlite: bool,
) -> Result<Transaction<'c, Any>, sqlx::Error> {
    if sqlite {
        conn.begin_with("BEGIN IMMEDIATE").await
    } else {
        conn.begin().await
    }
}

/// Counts what was written and lost, and whether the ledger is healthy:
/// it is while any write commits.
fn account(inner: &Inner, jobs: usize, results: &[Result<Vec<Done>, LedgerError>]) {
    let stats = &inner.stats;
    let per_result = if results.len() == 1 { jobs as u64 } else { 1 };
    let mut any_ok = false;
    for result in results {
        match result {
            Ok(_) => {
                any_ok = true;
                stats.written.fetch_add(per_result, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.failed.fetch_add(per_result, Ordering::Relaxed);
                tracing::error!("{}", crate::redact::urls_in(&e.to_string()));
            }
        }
    }
    let was = inner.healthy.swap(any_ok, Ordering::Relaxed);
    if any_ok && !was {
        tracing::warn!("the ledger is writable again");
    }
}

async fn write_turn(
    tx: &mut Transaction<'_, Any>,
    record: &TurnRecord,
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO turns \
         (conversation, turn, ended_ms, latency_ms, outcome, user_text, reply_text) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (conversation, turn) DO NOTHING",
    )
    .bind(record.conversation.as_str())
    .bind(int(record.turn))
    .bind(at_ms)
    .bind(record.latency_ms.map(int))
    .bind(record.outcome.as_str())
    .bind(record.user_text.as_deref())
    .bind(record.reply_text.as_deref())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_conversation(
    tx: &mut Transaction<'_, Any>,
    start: &Started,
    client: &str,
    gateway: &str,
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO conversations \
         (id, gateway, key_id, client, channel, engine, voice, language, started_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(start.id.as_str())
    .bind(gateway)
    .bind(start.key_id.as_deref())
    .bind(client)
    .bind(start.channel)
    .bind(start.engine.as_str())
    .bind(start.voice.as_str())
    .bind(start.language.as_str())
    .bind(at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Closes a conversation (once) and gives back what it held.
async fn end_conversation(
    tx: &mut Transaction<'_, Any>,
    conversation: &str,
    reason: &str,
    turns: u32,
    at_ms: i64,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    let open = sqlx::query(
        "SELECT held_micro_usd, hold FROM conversations WHERE id = $1 AND ended_ms IS NULL",
    )
    .bind(conversation)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(open) = open else {
        return Ok(());
    };
    let held: i64 = open.try_get("held_micro_usd")?;
    let hold: String = open.try_get("hold")?;
    changes.release(&budget::parse_hold(&hold), u64::try_from(held).unwrap_or(0));
    sqlx::query(
        "UPDATE conversations SET ended_ms = $1, end_reason = $2, turns = $3, \
         held_micro_usd = 0 WHERE id = $4 AND ended_ms IS NULL",
    )
    .bind(at_ms)
    .bind(reason)
    .bind(i64::from(turns))
    .bind(conversation)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The usage row, then (only when it is new) its conversation's totals;
/// `true` when it was new.
async fn write_usage(
    tx: &mut Transaction<'_, Any>,
    record: &UsageRecord,
    at_ms: i64,
) -> Result<bool, sqlx::Error> {
    let d = &record.delta;
    let reported = record.delta.upstream.and_then(|u| u.reported);
    let inserted = sqlx::query(
        "INSERT INTO usage (conversation, stream, sequence, recorded_ms, prices, \
         reported_speech_in_tokens, reported_speech_out_tokens, reported_text_in_tokens, \
         reported_text_out_tokens, \
         audio_in_ms, audio_out_ms, speech_in_tokens, speech_out_tokens, \
         text_in_tokens, text_out_tokens, speech_cost_micro_usd, text_cost_micro_usd, \
         cost_micro_usd) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         ON CONFLICT (conversation, stream, sequence) DO NOTHING",
    )
    .bind(record.conversation.as_str())
    .bind(int(record.stream))
    .bind(int(record.sequence))
    .bind(at_ms)
    .bind(record.prices.as_str())
    .bind(reported.map(|t| int(t.speech_in)))
    .bind(reported.map(|t| int(t.speech_out)))
    .bind(reported.map(|t| int(t.text_in)))
    .bind(reported.map(|t| int(t.text_out)));
    let inserted = bind_totals(inserted, d)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }
    let totals = sqlx::query(
        "UPDATE conversations SET \
         audio_in_ms = audio_in_ms + $1, audio_out_ms = audio_out_ms + $2, \
         speech_in_tokens = speech_in_tokens + $3, speech_out_tokens = speech_out_tokens + $4, \
         text_in_tokens = text_in_tokens + $5, text_out_tokens = text_out_tokens + $6, \
         speech_cost_micro_usd = speech_cost_micro_usd + $7, \
         text_cost_micro_usd = text_cost_micro_usd + $8, \
         cost_micro_usd = cost_micro_usd + $9 \
         WHERE id = $10",
    );
    bind_totals(totals, d)
        .bind(record.conversation.as_str())
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

/// Binds a delta's nine totals, in the order both the usage row and the
/// conversation's totals list them.
fn bind_totals<'q>(
    query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    d: &UsageDelta,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    [
        d.audio_in_ms,
        d.audio_out_ms,
        d.speech_in_tokens,
        d.speech_out_tokens,
        d.text_in_tokens,
        d.text_out_tokens,
        d.speech_cost_micro_usd,
        d.text_cost_micro_usd,
        d.cost_micro_usd,
    ]
    .into_iter()
    .fold(query, |query, value| query.bind(int(value)))
}
