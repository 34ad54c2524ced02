use std::path::PathBuf;
use std::sync::atomic::AtomicU32;

use super::report::{check, conversations};
use super::*;

/// A fresh directory under the system's temporary one, removed when
/// dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

fn temp_dir() -> TempDir {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "sonora-ledger-{}-{}-{n}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

fn config(dir: &std::path::Path, gateway: &str) -> LedgerConfig {
    LedgerConfig {
        url: format!("sqlite://{}/sub/ledger.db", dir.display()),
        gateway_name: gateway.to_owned(),
        ..LedgerConfig::default()
    }
}

fn start(id: &str) -> Started {
    Started {
        id: id.to_owned(),
        key_id: None,
        client: client_hash("192.0.2.7"),
        channel: "web",
        engine: "nova-sonic".to_owned(),
        language: "es".to_owned(),
        voice: "lupe".to_owned(),
        reserve_micro_usd: 0,
    }
}

fn delta(tokens: u64, cost: u64) -> UsageDelta {
    UsageDelta {
        speech_in_tokens: tokens,
        speech_out_tokens: 2 * tokens,
        cost_micro_usd: cost,
        speech_cost_micro_usd: cost,
        audio_in_ms: 1_000,
        ..UsageDelta::default()
    }
}

fn usage(conversation: &str, stream: u64, sequence: u64, delta: UsageDelta) -> UsageRecord {
    UsageRecord {
        conversation: conversation.to_owned(),
        stream,
        sequence,
        prices: "test-prices".to_owned(),
        delta,
        account: None,
    }
}

async fn all(ledger: &Ledger) -> Vec<report::ConversationRow> {
    conversations(ledger.pool(), 0, i64::MAX)
        .await
        .expect("report")
}

#[tokio::test]
async fn a_conversation_its_usage_and_its_end_are_recorded_exactly() {
    let dir = temp_dir();
    let ledger = Ledger::open(&config(&dir, "gw-a")).await.expect("opens");
    assert!(dir.join("sub/ledger.db").exists());
    assert_eq!(ledger.backend(), Backend::Sqlite);
    ledger.started(start("c1")).await.expect("started");
    ledger.ready("c1", "nova-east", "amazon.nova-2-sonic-v1:0", "lupe");
    ledger
        .usage(usage("c1", 0, 0, delta(100, 1_234)))
        .await
        .expect("usage");
    ledger
        .usage(usage("c1", 1, 0, delta(50, 766)))
        .await
        .expect("usage");
    // The same delta again (a retry) is stored once.
    ledger
        .usage(usage("c1", 1, 0, delta(50, 766)))
        .await
        .expect("usage");
    ledger
        .ended("c1", "client_stopped", 2)
        .await
        .expect("ended");
    let rows = all(&ledger).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.conversation, "c1");
    assert_eq!(row.gateway, "gw-a");
    assert_eq!(row.model, "amazon.nova-2-sonic-v1:0");
    // Ready names the instance that serves it.
    assert_eq!(row.engine, "nova-east");
    assert_eq!(row.end_reason.as_deref(), Some("client_stopped"));
    assert_eq!(row.turns, 2);
    assert_eq!(row.speech_in_tokens, 150);
    assert_eq!(row.speech_out_tokens, 300);
    assert_eq!(row.cost_micro_usd, 2_000);
    assert_eq!(row.audio_in_ms, 2_000);
    // The client address is not stored, only a stable hash of it.
    assert!(!row.client.contains("192.0.2.7"));
    assert_eq!(row.client, client_hash("192.0.2.7"));
    assert_eq!(row.channel, "web");
    let report = check(ledger.pool(), &jiff::tz::TimeZone::UTC)
        .await
        .expect("check");
    assert_eq!(report.conversations, 1);
    assert_eq!(report.usage_rows, 2);
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    assert!(ledger.healthy());
    assert_eq!(ledger.stats().failed.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn check_finds_totals_that_disagree_with_their_rows() {
    let dir = temp_dir();
    let ledger = Ledger::open(&config(&dir, "gw")).await.expect("opens");
    ledger.started(start("c1")).await.expect("started");
    ledger
        .usage(usage("c1", 0, 0, delta(10, 99)))
        .await
        .expect("usage");
    sqlx::query("UPDATE conversations SET cost_micro_usd = cost_micro_usd + 1")
        .execute(ledger.pool())
        .await
        .expect("tamper");
    let report = check(ledger.pool(), &jiff::tz::TimeZone::UTC)
        .await
        .expect("check");
    assert_eq!(report.mismatches.len(), 1, "{:?}", report.mismatches);
    assert!(report.mismatches[0].contains("cost_micro_usd is 100"));
}

#[tokio::test]
async fn a_bad_record_fails_alone_and_the_ledger_stays_healthy() {
    let dir = temp_dir();
    let ledger = Ledger::open(&config(&dir, "gw")).await.expect("opens");
    ledger.started(start("c1")).await.expect("started");
    // Queued together: a usage row for a conversation never started
    // (refused by its foreign key), a good one, and a repeated start.
    let (bad, good, again) = tokio::join!(
        ledger.usage(usage("nobody", 0, 0, delta(1, 1))),
        ledger.usage(usage("c1", 0, 0, delta(1, 5))),
        ledger.started(start("c1")),
    );
    assert!(matches!(bad, Err(LedgerError::Unavailable(_))), "{bad:?}");
    good.expect("the good record is committed");
    assert!(again.is_err());
    assert_eq!(all(&ledger).await[0].cost_micro_usd, 5);
    assert!(ledger.healthy());
    assert!(ledger.stats().failed.load(Ordering::Relaxed) >= 2);
}

#[tokio::test]
async fn conversations_left_open_are_closed_as_interrupted_by_the_same_gateway() {
    let dir = temp_dir();
    {
        let ledger = Ledger::open(&config(&dir, "gw-a")).await.expect("opens");
        ledger.started(start("a1")).await.expect("started");
        ledger
            .usage(usage("a1", 0, 0, delta(10, 42)))
            .await
            .expect("usage");
        let other = Ledger::open(&config(&dir, "gw-b")).await.expect("opens");
        other.started(start("b1")).await.expect("started");
        // Neither ends: as if both gateways were killed.
    }
    let reopened = Ledger::open(&config(&dir, "gw-a")).await.expect("reopens");
    let rows = all(&reopened).await;
    let a1 = rows.iter().find(|r| r.conversation == "a1").expect("a1");
    assert_eq!(a1.end_reason.as_deref(), Some(INTERRUPTED));
    assert!(a1.ended_ms.is_some());
    assert_eq!(a1.cost_micro_usd, 42);
    // Another gateway's conversation may still be running: left alone.
    let b1 = rows.iter().find(|r| r.conversation == "b1").expect("b1");
    assert_eq!(b1.end_reason, None);
    // Opening again migrates nothing twice.
    let count: i64 = sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) FROM ledger_migrations")
        .fetch_one(reopened.pool())
        .await
        .expect("count")
        .try_get(0)
        .expect("column");
    assert_eq!(count, schema::MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn transcripts_are_kept_only_when_asked() {
    for store in [false, true] {
        let dir = temp_dir();
        let mut config = config(&dir, "gw");
        config.store_transcripts = store;
        let ledger = Ledger::open(&config).await.expect("opens");
        ledger.started(start("c1")).await.expect("started");
        ledger.turn(TurnRecord {
            conversation: "c1".into(),
            turn: 1,
            latency_ms: Some(640),
            outcome: "completed".into(),
            user_text: Some("¿A qué hora abre la biblioteca?".into()),
            reply_text: Some("A las ocho.".into()),
        });
        // Committed in order with what follows it.
        ledger
            .ended("c1", "client_stopped", 1)
            .await
            .expect("ended");
        let row = sqlx::query("SELECT latency_ms, user_text FROM turns")
            .fetch_one(ledger.pool())
            .await
            .expect("turn row");
        let latency: Option<i64> = row.try_get("latency_ms").expect("latency");
        let text: Option<String> = row.try_get("user_text").expect("text");
        assert_eq!(latency, Some(640));
        assert_eq!(text.is_some(), store);
    }
}

#[tokio::test]
async fn bad_urls_are_clear_errors() {
    let mut config = LedgerConfig {
        url: "sqlite://".into(),
        ..LedgerConfig::default()
    };
    let error = Ledger::open(&config).await.expect_err("no file");
    assert!(error.to_string().contains("no file name"), "{error}");
    config.url = "postgres://sonora:secret@127.0.0.1:1/none".into();
    config.write_timeout_ms = 100;
    let error = Ledger::open(&config).await.expect_err("nothing listens");
    let text = error.to_string();
    assert!(!text.contains("secret"), "{text}");
    assert!(
        text.starts_with("cannot open the ledger postgres://"),
        "{text}"
    );
}

#[tokio::test]
async fn check_holds_each_stream_to_the_totals_its_engine_reported() {
    let dir = temp_dir();
    let ledger = Ledger::open(&config(&dir, "gw")).await.expect("opens");
    ledger.started(start("c1")).await.expect("started");
    let reported = |speech_in: u64| crate::usage::Upstream {
        stream: 0,
        reported: Some(crate::usage::Tokens {
            speech_in,
            speech_out: 0,
            text_in: 0,
            text_out: 0,
        }),
    };
    let in_only = |tokens: u64, upstream| UsageDelta {
        speech_in_tokens: tokens,
        cost_micro_usd: tokens,
        speech_cost_micro_usd: tokens,
        upstream: Some(upstream),
        ..UsageDelta::default()
    };
    // Stream 0: 10 then 5, reported as 10 then 15: consistent.
    for (sequence, (tokens, total)) in [(10, 10), (5, 15)].into_iter().enumerate() {
        let record = usage("c1", 0, sequence as u64, in_only(tokens, reported(total)));
        ledger.usage(record).await.expect("usage");
    }
    // Stream 1: 7, reported as 9: two tokens the engine never sent a delta for.
    let upstream = crate::usage::Upstream {
        stream: 1,
        ..reported(9)
    };
    ledger
        .usage(usage("c1", 1, 2, in_only(7, upstream)))
        .await
        .expect("usage");
    let report = check(ledger.pool(), &jiff::tz::TimeZone::UTC)
        .await
        .expect("check");
    assert_eq!(report.mismatches.len(), 1, "{:?}", report.mismatches);
    assert!(
        report.mismatches[0].contains("stream 1") && report.mismatches[0].contains("[9, 0, 0, 0]"),
        "{:?}",
        report.mismatches
    );
}

#[tokio::test]
async fn check_holds_budgets_to_their_conversations() {
    let dir = temp_dir();
    let ledger = Ledger::open(&config(&dir, "gw")).await.expect("opens");
    let limits = keys::KeyLimits {
        budget: Some((10_000, keys::Period::Month)),
        max_sessions: None,
    };
    let (key, _) = ledger.create_key("k", &limits).await.expect("key");
    let mut started = start("c1");
    started.key_id = Some(key.id.clone());
    started.reserve_micro_usd = 1_000;
    let Admission::Admitted(account) = ledger.started(started).await.expect("started") else {
        panic!("admitted");
    };
    let mut record = usage("c1", 0, 0, delta(10, 400));
    record.account = account;
    let account = ledger.usage(record).await.expect("usage").expect("account");
    // 400 taken from the hold, which is topped up to a turn again.
    assert_eq!(account.hold.micro_usd, 1_000);
    assert_eq!(account.standing.remaining_micro_usd, Some(9_600));
    assert!(!account.standing.exhausted);
    let zone = jiff::tz::TimeZone::get("America/Lima").expect("zone");
    let report = check(ledger.pool(), &zone).await.expect("check");
    assert!(report.mismatches.is_empty(), "{:?}", report.mismatches);
    assert_eq!(
        ledger
            .key_spent(&key, now_ms(), &zone)
            .await
            .expect("spent"),
        400
    );
    sqlx::query("UPDATE budgets SET spent_micro_usd = 1, reserved_micro_usd = 7")
        .execute(ledger.pool())
        .await
        .expect("tamper");
    let report = check(ledger.pool(), &zone).await.expect("check");
    assert_eq!(report.mismatches.len(), 2, "{:?}", report.mismatches);
    ledger
        .ended("c1", "client_stopped", 1)
        .await
        .expect("ended");
}
