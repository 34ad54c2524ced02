//! The ledger's one writer: takes what is queued (up to [`MAX_BATCH`]
//! records at once), writes it in one transaction, then tells each waiting
//! caller. A failed or timed-out transaction fails every record in it and
//! marks the ledger unhealthy until a later one commits.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::Any;
use sqlx::{Connection as _, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::{Inner, LedgerError, Started, TurnRecord, UsageRecord, int};
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

#[derive(Debug)]
pub(super) struct Job {
    pub(super) write: Write,
    /// Told once the record is committed, or why it is not.
    pub(super) done: Option<oneshot::Sender<Result<(), LedgerError>>>,
}

pub(super) async fn run(
    pool: AnyPool,
    ledger: Weak<Inner>,
    mut queue: mpsc::Receiver<Job>,
    timeout: Duration,
) {
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
        let mut results = vec![write_timed(&pool, &batch, timeout).await];
        if results[0].is_err() && batch.len() > 1 {
            // One bad record must not fail the others: each on its own.
            results.clear();
            for job in &batch {
                results.push(write_timed(&pool, std::slice::from_ref(job), timeout).await);
            }
        }
        if let Some(inner) = ledger.upgrade() {
            account(&inner, &batch, &results);
        }
        let shared = results.len() == 1;
        for (i, job) in batch.drain(..).enumerate() {
            let result = if shared { &results[0] } else { &results[i] };
            if let Some(done) = job.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

/// Counts what was written and lost, and whether the ledger is healthy:
/// it is while any write commits.
fn account(inner: &Inner, batch: &[Job], results: &[Result<(), LedgerError>]) {
    let stats = &inner.stats;
    let per_result = if results.len() == 1 {
        batch.len() as u64
    } else {
        1
    };
    let mut any_ok = false;
    for result in results {
        match result {
            Ok(()) => {
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

async fn write_timed(pool: &AnyPool, batch: &[Job], timeout: Duration) -> Result<(), LedgerError> {
    match tokio::time::timeout(timeout, write_batch(pool, batch)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(LedgerError::Unavailable(e.to_string())),
        Err(_) => Err(LedgerError::Unavailable(format!(
            "a write took longer than {} ms",
            timeout.as_millis()
        ))),
    }
}

async fn write_batch(pool: &AnyPool, batch: &[Job]) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    for job in batch {
        write_one(&mut tx, &job.write).await?;
    }
    tx.commit().await
}

async fn write_one(tx: &mut Transaction<'_, Any>, write: &Write) -> Result<(), sqlx::Error> {
    match write {
        Write::Started {
            start,
            client,
            gateway,
            at_ms,
        } => {
            sqlx::query(
                "INSERT INTO conversations \
                 (id, gateway, key_id, client, engine, voice, language, started_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(start.id.as_str())
            .bind(gateway.as_str())
            .bind(start.key_id.as_deref())
            .bind(client.as_str())
            .bind(start.engine.as_str())
            .bind(start.voice.as_str())
            .bind(start.language.as_str())
            .bind(*at_ms)
            .execute(&mut **tx)
            .await?;
        }
        Write::Ready {
            conversation,
            model,
            voice,
        } => {
            sqlx::query("UPDATE conversations SET model = $1, voice = $2 WHERE id = $3")
                .bind(model.as_str())
                .bind(voice.as_str())
                .bind(conversation.as_str())
                .execute(&mut **tx)
                .await?;
        }
        Write::Usage { record, at_ms } => write_usage(tx, record, *at_ms).await?,
        Write::Turn { record, at_ms } => {
            sqlx::query(
                "INSERT INTO turns \
                 (conversation, turn, ended_ms, latency_ms, outcome, user_text, reply_text) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (conversation, turn) DO NOTHING",
            )
            .bind(record.conversation.as_str())
            .bind(int(record.turn))
            .bind(*at_ms)
            .bind(record.latency_ms.map(int))
            .bind(record.outcome.as_str())
            .bind(record.user_text.as_deref())
            .bind(record.reply_text.as_deref())
            .execute(&mut **tx)
            .await?;
        }
        Write::Ended {
            conversation,
            reason,
            turns,
            at_ms,
        } => {
            sqlx::query(
                "UPDATE conversations SET ended_ms = $1, end_reason = $2, turns = $3 \
                 WHERE id = $4 AND ended_ms IS NULL",
            )
            .bind(*at_ms)
            .bind(reason.as_str())
            .bind(i64::from(*turns))
            .bind(conversation.as_str())
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

/// The usage row, then (only when it is new) its conversation's totals.
async fn write_usage(
    tx: &mut Transaction<'_, Any>,
    record: &UsageRecord,
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    let d = &record.delta;
    let inserted = sqlx::query(
        "INSERT INTO usage (conversation, stream, sequence, recorded_ms, prices, \
         audio_in_ms, audio_out_ms, speech_in_tokens, speech_out_tokens, \
         text_in_tokens, text_out_tokens, speech_cost_micro_usd, text_cost_micro_usd, \
         cost_micro_usd) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
         ON CONFLICT (conversation, stream, sequence) DO NOTHING",
    )
    .bind(record.conversation.as_str())
    .bind(int(record.stream))
    .bind(int(record.sequence))
    .bind(at_ms)
    .bind(record.prices.as_str());
    let inserted = bind_totals(inserted, d)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if inserted == 0 {
        return Ok(());
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
    Ok(())
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
