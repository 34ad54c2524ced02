//! The ledger under a running gateway: every cost a client is shown is in
//! the ledger first, a conversation the ledger cannot record does not
//! start, and a paid one whose cost cannot be recorded stops.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

mod common;

use common::postgres::Postgres;
use common::scratch::Scratch;

use std::sync::Arc;

use common::gateway::{Frame, start};
use serde_json::Value;
use sonora::config::{Config, LedgerConfig};
use sonora::engine::scripted::{ScriptedEngine, Step};
use sonora::engine::{EngineEvent, TurnEndReason};
use sonora::ledger::keys::{KeyLimits, Period};
use sonora::ledger::report;
use sonora::ledger::{Account, Admission, Ledger, Refusal, UsageRecord};
use sonora::usage::UsageDelta;

/// A ledger file in a directory of its own, removed with the guard.
fn sqlite(name: &str) -> (Scratch, LedgerConfig) {
    let dir = Scratch::new(&format!("ledger-test-{name}"));
    let config = LedgerConfig {
        url: format!("sqlite://{}", dir.join("ledger.db").display()),
        gateway_name: "test".into(),
        store_transcripts: true,
        time_zone: common::midday_zone().to_owned(),
        ..LedgerConfig::default()
    };
    (dir, config)
}

/// The tests' `ledger.time_zone`: one where it is now about noon.
fn zone() -> jiff::tz::TimeZone {
    jiff::tz::TimeZone::get(common::midday_zone()).unwrap()
}

fn ready() -> EngineEvent {
    EngineEvent::Ready {
        engine: "scripted".into(),
        model: "paid".into(),
        voice: "tone".into(),
    }
}

fn paid(cost: u64) -> EngineEvent {
    EngineEvent::Usage(UsageDelta {
        speech_in_tokens: 10 * cost,
        speech_out_tokens: 20 * cost,
        cost_micro_usd: cost,
        speech_cost_micro_usd: cost,
        ..UsageDelta::default()
    })
}

/// Turns of one second of audio, each answered, ended and costed.
fn paid_turns(costs: &[u64]) -> Vec<Step> {
    let mut script = vec![Step::Emit(ready())];
    for (i, cost) in costs.iter().enumerate() {
        let turn_id = i as u64 + 1;
        script.push(Step::AwaitAudioMs(1_000));
        script.push(Step::Emit(EngineEvent::SpeechEnded { turn_id }));
        script.push(Step::Emit(EngineEvent::TurnEnd {
            turn_id,
            reason: TurnEndReason::Completed,
        }));
        script.push(Step::Emit(paid(*cost)));
    }
    script.push(Step::AwaitClose);
    script.push(Step::Emit(EngineEvent::Closed));
    script
}

async fn one_second(client: &mut common::gateway::Client) {
    for _ in 0..50 {
        client.send_pcm(&[0i16; 320]).await;
    }
}

fn usage_total(frame: &Frame) -> u64 {
    frame.json()["total"]["cost_micro_usd"].as_u64().unwrap()
}

/// A gateway on `engine` writing to `ledger`, and a client whose
/// conversation is ready, with its id.
async fn conversing(
    ledger: &Ledger,
    engine: Arc<ScriptedEngine>,
) -> (common::gateway::Running, common::gateway::Client, String) {
    let gateway = start(&Config::default(), Some(engine)).await;
    gateway.server.set_ledger(ledger.clone()).unwrap();
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    let frames = client.until(|f| f.is("ready")).await;
    let id = frames.last().unwrap().json()["session"]
        .as_str()
        .unwrap()
        .to_owned();
    (gateway, client, id)
}

async fn what_the_client_is_shown_the_ledger_holds_first(config: LedgerConfig) {
    let ledger = Ledger::open(&config).await.unwrap();
    let engine = Arc::new(ScriptedEngine::new(paid_turns(&[1_500, 2_500])));
    let (gateway, mut client, id) = conversing(&ledger, engine).await;
    for expected in [1_500, 4_000] {
        one_second(&mut client).await;
        let frames = client.until(|f| f.is("usage")).await;
        let shown = usage_total(frames.last().unwrap());
        assert_eq!(shown, expected);
        // Already in the ledger when the client sees it.
        let rows = report::conversations(ledger.pool(), 0, i64::MAX)
            .await
            .unwrap();
        let row = rows.iter().find(|r| r.conversation == id).unwrap();
        assert!(row.cost_micro_usd >= shown as i64, "{row:?}");
    }
    client.send_json(serde_json::json!({"type": "stop"})).await;
    let frames = client.until(|f| f.is("end")).await;
    let end = frames.last().unwrap().json();
    assert_eq!(end["summary"]["usage"]["cost_micro_usd"], 4_000);
    // The end is recorded once the connection is done.
    let row = common::ended_row(&ledger, &id).await;
    assert_eq!(row.end_reason.as_deref(), Some("client_stopped"));
    assert_eq!((row.turns, row.cost_micro_usd), (2, 4_000));
    assert_eq!(
        (row.engine.as_str(), row.model.as_str()),
        ("scripted", "paid")
    );
    assert_eq!(row.speech_out_tokens, 20 * 4_000);
    let check = report::check(ledger.pool(), &zone()).await.unwrap();
    assert!(check.mismatches.is_empty(), "{:?}", check.mismatches);
    assert_eq!(check.usage_rows, 2);
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("\nsonora_ledger_up 1\n"), "{metrics}");
    assert!(
        metrics.contains("\nsonora_ledger_records_failed_total 0\n"),
        "{metrics}"
    );
    // Turns are recorded with their latency.
    let turns: Vec<Value> = sqlx::query("SELECT turn, outcome FROM turns WHERE conversation = $1")
        .bind(id.as_str())
        .fetch_all(ledger.pool())
        .await
        .unwrap()
        .iter()
        .map(|row| {
            use sqlx::Row as _;
            serde_json::json!([row.get::<i64, _>(0), row.get::<String, _>(1)])
        })
        .collect();
    assert_eq!(turns.len(), 2, "{turns:?}");
}

async fn no_conversation_starts_that_the_ledger_cannot_record(config: LedgerConfig) {
    let ledger = Ledger::open(&config).await.unwrap();
    sqlx::query("DROP TABLE turns")
        .execute(ledger.pool())
        .await
        .unwrap();
    sqlx::query("DROP TABLE usage")
        .execute(ledger.pool())
        .await
        .unwrap();
    sqlx::query("DROP TABLE conversations")
        .execute(ledger.pool())
        .await
        .unwrap();
    let engine = ScriptedEngine::new(paid_turns(&[1_000]));
    let gateway = start(&Config::default(), Some(Arc::new(engine))).await;
    gateway.server.set_ledger(ledger.clone()).unwrap();
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    let frames = client.until(|f| matches!(f, Frame::Closed(_))).await;
    let error = frames
        .iter()
        .find(|f| f.is("error"))
        .expect("an error")
        .json();
    assert_eq!(error["code"], "ledger_unavailable");
    assert_eq!(error["fatal"], true);
    assert!(!frames.iter().any(|f| f.is("ready")), "{frames:?}");
    match frames.last().unwrap() {
        Frame::Closed(Some((code, reason))) => {
            assert_eq!(*code, 1013);
            assert!(reason.starts_with("ledger_unavailable"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!ledger.healthy());
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("reason=\"ledger_unavailable\""),
        "{metrics}"
    );
    assert!(metrics.contains("\nsonora_ledger_up 0\n"), "{metrics}");
    // Ready no more: a load balancer sends new conversations elsewhere.
    let ready = reqwest::get(gateway.url("/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
}

async fn a_paid_conversation_whose_cost_cannot_be_recorded_stops(config: LedgerConfig) {
    let ledger = Ledger::open(&config).await.unwrap();
    let engine = ScriptedEngine::new(paid_turns(&[700, 900]));
    let gateway = start(&Config::default(), Some(Arc::new(engine))).await;
    gateway.server.set_ledger(ledger.clone()).unwrap();
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    one_second(&mut client).await;
    let frames = client.until(|f| f.is("usage")).await;
    assert_eq!(usage_total(frames.last().unwrap()), 700);
    // The disk "fills": usage rows can no longer be written.
    sqlx::query("DROP TABLE usage")
        .execute(ledger.pool())
        .await
        .unwrap();
    one_second(&mut client).await;
    let frames = client.until(|f| f.is("end")).await;
    assert!(!frames.iter().any(|f| f.is("usage")), "{frames:?}");
    let error = frames.iter().find(|f| f.is("error")).expect("told").json();
    assert_eq!(error["code"], "ledger_unavailable");
    let end = frames.last().unwrap().json();
    assert_eq!(end["reason"], "ledger_unavailable");
    // The end shows what the ledger holds, not the unrecorded cost.
    assert_eq!(end["summary"]["usage"]["cost_micro_usd"], 700);
    match client.next().await {
        Frame::Closed(Some((code, _))) => assert_eq!(code, 1013),
        other => panic!("{other:?}"),
    }
}

/// A Nova Sonic conversation's start, as a gateway records it.
fn started(id: &str, key: Option<&str>) -> sonora::ledger::Started {
    sonora::ledger::Started {
        id: id.to_owned(),
        key_id: key.map(str::to_owned),
        client: sonora::ledger::client_hash("127.0.0.1"),
        channel: "web",
        engine: "nova-sonic".into(),
        language: "es".into(),
        voice: "lupe".into(),
        reserve_micro_usd: 0,
    }
}

/// Many conversations writing at once: every delta counted exactly once,
/// totals equal to their rows, repeated writes ignored.
async fn concurrent_conversations_add_up_exactly(config: LedgerConfig) {
    let ledger = Ledger::open(&config).await.unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|c| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let id = format!("c{c}");
                ledger.started(started(&id, Some("k1"))).await.unwrap();
                for sequence in 0..25u64 {
                    let record = sonora::ledger::UsageRecord {
                        conversation: id.clone(),
                        stream: sequence / 10,
                        sequence,
                        prices: "p".into(),
                        delta: UsageDelta {
                            text_in_tokens: 3,
                            cost_micro_usd: sequence + 1,
                            text_cost_micro_usd: sequence + 1,
                            ..UsageDelta::default()
                        },
                        account: None,
                    };
                    ledger.usage(record.clone()).await.unwrap();
                    if sequence % 5 == 0 {
                        // A retry of the same delta changes nothing.
                        ledger.usage(record).await.unwrap();
                    }
                }
                ledger.ended(&id, "client_stopped", 25).await.unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let rows = report::conversations(ledger.pool(), 0, i64::MAX)
        .await
        .unwrap();
    assert_eq!(rows.len(), 40);
    for row in &rows {
        // 1 + 2 + … + 25
        assert_eq!(row.cost_micro_usd, 325, "{row:?}");
        assert_eq!(row.text_in_tokens, 75, "{row:?}");
        assert_eq!(row.key.as_deref(), Some("k1"));
    }
    let check = report::check(ledger.pool(), &zone()).await.unwrap();
    assert!(check.mismatches.is_empty(), "{:?}", check.mismatches);
    assert_eq!(check.usage_rows, 40 * 25);
    // Fewer transactions than records: the writer batches.
    let stats = ledger.stats();
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    let written = stats.written.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        batches < written,
        "{batches} transactions for {written} records"
    );
}

/// A gateway killed mid-conversation: the next start of the same name
/// closes its conversation as interrupted, with the cost it had.
async fn a_killed_gateways_conversations_end_interrupted(config: LedgerConfig) {
    let ledger = Ledger::open(&config).await.unwrap();
    ledger.started(started("left-open", None)).await.unwrap();
    let record = sonora::ledger::UsageRecord {
        conversation: "left-open".into(),
        stream: 0,
        sequence: 0,
        prices: "p".into(),
        delta: UsageDelta {
            cost_micro_usd: 4_321,
            ..UsageDelta::default()
        },
        account: None,
    };
    ledger.usage(record).await.unwrap();
    drop(ledger);
    let again = Ledger::open(&config).await.unwrap();
    let rows = report::conversations(again.pool(), 0, i64::MAX)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.conversation == "left-open").unwrap();
    assert_eq!(row.end_reason.as_deref(), Some(sonora::ledger::INTERRUPTED));
    assert_eq!(row.cost_micro_usd, 4_321);
}

/// A turn's cost in the budget scenarios, and what is held for one.
const TURN: u64 = 1_000;

/// A paid delta of one turn.
fn turn_usage(conversation: &str, sequence: u64, account: Option<Account>) -> UsageRecord {
    UsageRecord {
        conversation: conversation.to_owned(),
        stream: 0,
        sequence,
        prices: "p".into(),
        delta: UsageDelta {
            speech_out_tokens: 10,
            cost_micro_usd: TURN,
            speech_cost_micro_usd: TURN,
            ..UsageDelta::default()
        },
        account,
    }
}

/// A conversation that speaks turn after turn until its budget ends it;
/// its turns, or `None` when it was refused.
async fn spend_until_stopped(ledger: Ledger, id: String, key: Option<String>) -> Option<u64> {
    let mut start = started(&id, key.as_deref());
    start.reserve_micro_usd = TURN;
    let mut account = match ledger.started(start).await.unwrap() {
        Admission::Admitted(account) => account,
        Admission::Refused(refusal) => {
            assert!(matches!(refusal, Refusal::Budget { .. }), "{refusal:?}");
            return None;
        }
    };
    let mut turns = 0;
    loop {
        account = ledger.usage(turn_usage(&id, turns, account)).await.unwrap();
        turns += 1;
        tokio::task::yield_now().await;
        if account.as_ref().is_none_or(|a| a.standing.exhausted) {
            break;
        }
    }
    ledger.ended(&id, "budget_exceeded", 0).await.unwrap();
    Some(turns)
}

/// `spent`, `reserved` of a budget row.
async fn budget_row(ledger: &Ledger, scope: &str) -> (i64, i64) {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(spent_micro_usd), 0) AS BIGINT), \
         CAST(COALESCE(SUM(reserved_micro_usd), 0) AS BIGINT) FROM budgets WHERE scope = $1",
    )
    .bind(scope)
    .fetch_one(ledger.pool())
    .await
    .unwrap();
    use sqlx::Row as _;
    (row.try_get(0).unwrap(), row.try_get(1).unwrap())
}

/// One key whose budget fits ten turns, spent at once by twelve
/// conversations through two gateways (two ledgers, each with its own
/// writer and connections): each turn is held before it is spent, so
/// together they spend exactly ten turns, the rest are refused, and every
/// hold comes back. Likewise under `ledger.global_daily_usd`.
async fn budgets_hold_across_gateways(config: LedgerConfig) {
    let named = |name: &str, global: f64| LedgerConfig {
        gateway_name: name.into(),
        global_daily_usd: global,
        ..config.clone()
    };
    let a = Ledger::open(&named("gw-a", 0.0)).await.unwrap();
    let b = Ledger::open(&named("gw-b", 0.0)).await.unwrap();
    let limits = KeyLimits {
        budget: Some((10 * TURN, Period::Day)),
        max_sessions: None,
    };
    let (key, _) = a.create_key("budgeted", &limits).await.unwrap();
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let ledger = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(spend_until_stopped(
                ledger,
                format!("k{i}"),
                Some(key.id.clone()),
            ))
        })
        .collect();
    let mut turns = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Some(n) => turns += n,
            None => refused += 1,
        }
    }
    assert_eq!(turns, 10, "{refused} refused");
    assert!(refused >= 2, "{refused}");
    let scope = format!("key:{}", key.id);
    assert_eq!(budget_row(&a, &scope).await, (10 * TURN as i64, 0));
    // Spent up: the next conversation is refused at once.
    assert_eq!(
        spend_until_stopped(b.clone(), "late".into(), Some(key.id.clone())).await,
        None
    );

    // A key with two conversations at most: the third waits for one to end.
    let limits = KeyLimits {
        budget: None,
        max_sessions: Some(2),
    };
    let (two, _) = a.create_key("two at once", &limits).await.unwrap();
    for id in ["s1", "s2"] {
        let admission = a.started(started(id, Some(&two.id))).await.unwrap();
        assert!(matches!(admission, Admission::Admitted(_)), "{admission:?}");
    }
    let third = b.started(started("s3", Some(&two.id))).await.unwrap();
    assert_eq!(third, Admission::Refused(Refusal::Sessions { max: 2 }));
    a.ended("s1", "client_stopped", 0).await.unwrap();
    let third = b.started(started("s3", Some(&two.id))).await.unwrap();
    assert!(matches!(third, Admission::Admitted(_)), "{third:?}");

    // The service's daily cap holds for conversations with no key.
    let capped = Ledger::open(&named("gw-c", 0.003)).await.unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|i| tokio::spawn(spend_until_stopped(capped.clone(), format!("g{i}"), None)))
        .collect();
    let mut turns = 0;
    for task in tasks {
        turns += task.await.unwrap().unwrap_or(0);
    }
    assert_eq!(turns, 3);
    assert_eq!(budget_row(&capped, "global").await, (3 * TURN as i64, 0));

    // A gateway killed while its conversation held a turn: the next start
    // of the same name gives the hold back.
    let (roomy, _) = a
        .create_key(
            "roomy",
            &KeyLimits {
                budget: Some((100 * TURN, Period::Month)),
                max_sessions: None,
            },
        )
        .await
        .unwrap();
    let killed = Ledger::open(&named("gw-killed", 0.0)).await.unwrap();
    let mut start = started("held", Some(&roomy.id));
    start.reserve_micro_usd = TURN;
    let Admission::Admitted(Some(account)) = killed.started(start).await.unwrap() else {
        panic!("admitted with an account");
    };
    assert_eq!(account.hold.micro_usd, TURN);
    assert_eq!(account.standing.remaining_micro_usd, Some(100 * TURN));
    let roomy_scope = format!("key:{}", roomy.id);
    assert_eq!(budget_row(&a, &roomy_scope).await, (0, TURN as i64));
    drop(killed);
    let _restarted = Ledger::open(&named("gw-killed", 0.0)).await.unwrap();
    assert_eq!(budget_row(&a, &roomy_scope).await, (0, 0));
    let check = report::check(a.pool(), &zone()).await.unwrap();
    assert!(check.mismatches.is_empty(), "{:?}", check.mismatches);
}

#[tokio::test]
async fn sqlite_budgets_hold_across_gateways() {
    let (_dir, config) = sqlite("budgets");
    budgets_hold_across_gateways(config).await;
}

#[tokio::test]
async fn sqlite_what_the_client_is_shown_the_ledger_holds_first() {
    let (_dir, config) = sqlite("shown");
    what_the_client_is_shown_the_ledger_holds_first(config).await;
}

#[tokio::test]
async fn sqlite_no_conversation_starts_that_the_ledger_cannot_record() {
    let (_dir, config) = sqlite("refused");
    no_conversation_starts_that_the_ledger_cannot_record(config).await;
}

#[tokio::test]
async fn sqlite_a_paid_conversation_whose_cost_cannot_be_recorded_stops() {
    let (_dir, config) = sqlite("stops");
    a_paid_conversation_whose_cost_cannot_be_recorded_stops(config).await;
}

#[tokio::test]
async fn sqlite_concurrent_conversations_add_up_exactly() {
    let (_dir, config) = sqlite("concurrent");
    concurrent_conversations_add_up_exactly(config).await;
}

#[tokio::test]
async fn sqlite_a_killed_gateways_conversations_end_interrupted() {
    let (_dir, config) = sqlite("killed");
    a_killed_gateways_conversations_end_interrupted(config).await;
}

/// How long the slow-ledger tests hold the ledger's write lock.
const SLOW_LEDGER_LOCK: std::time::Duration = std::time::Duration::from_secs(2);

/// Another writer holding the ledger's write lock (as a stalled disk
/// would hold up its writes), and since when; `COMMIT` on it lets go.
async fn lock_ledger(url: &str) -> (sqlx::SqliteConnection, std::time::Instant) {
    use sqlx::Connection as _;
    let mut locker = sqlx::SqliteConnection::connect(url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .unwrap();
    (locker, std::time::Instant::now())
}

/// 200 ms of audio answered by a paid usage delta, then 200 ms of reply
/// audio and the turn's end.
fn slow_ledger_script() -> Vec<Step> {
    let reply = EngineEvent::Audio(sonora::engine::Pcm {
        rate_hz: 24_000,
        samples: vec![1_000; 960],
    });
    let mut script = vec![
        Step::Emit(ready()),
        Step::AwaitAudioMs(200),
        Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 }),
        Step::Emit(paid(1_000)),
    ];
    script.extend(std::iter::repeat_n(Step::Emit(reply), 5));
    script.extend([
        Step::Emit(EngineEvent::TurnEnd {
            turn_id: 1,
            reason: TurnEndReason::Completed,
        }),
        Step::AwaitClose,
        Step::Emit(EngineEvent::Closed),
    ]);
    script
}

/// A ledger that cannot write for a while (its file's write lock held by
/// another writer, as a stalled disk would hold it) holds up neither the
/// reply audio nor the client's audio: only the `usage` it has not yet
/// committed waits, and it is still shown only once the ledger holds it.
#[tokio::test]
async fn sqlite_a_slow_ledger_holds_up_neither_reply_audio_nor_the_client() {
    const LOCK_HELD: std::time::Duration = SLOW_LEDGER_LOCK;
    let (_dir, config) = sqlite("slow");
    let ledger = Ledger::open(&config).await.unwrap();
    let script = slow_ledger_script();
    let engine = Arc::new(ScriptedEngine::new(script));
    let (_gateway, mut client, id) = conversing(&ledger, engine.clone()).await;

    let (mut locker, locked_at) = lock_ledger(&config.url).await;
    for _ in 0..10 {
        client.send_pcm(&[0i16; 320]).await;
    }
    // The reply's audio comes while the ledger is still locked.
    let before = client.until(|f| matches!(f, Frame::Audio(_))).await;
    assert!(
        locked_at.elapsed() < LOCK_HELD,
        "reply audio waited {:?} for the ledger",
        locked_at.elapsed()
    );
    // And the client's audio still reaches the engine.
    for _ in 0..10 {
        client.send_pcm(&[0i16; 320]).await;
    }
    while engine.received().audio_samples < 16 * 400 {
        assert!(
            locked_at.elapsed() < LOCK_HELD,
            "the client's audio waited for the ledger: {:?}",
            engine.received()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let rest = client.until(|f| f.is("turn_end")).await;
    assert!(locked_at.elapsed() < LOCK_HELD, "turn_end waited");
    assert!(
        !before.iter().chain(&rest).any(|f| f.is("usage")),
        "usage shown before the ledger held it: {before:?} {rest:?}"
    );

    tokio::time::sleep(LOCK_HELD.saturating_sub(locked_at.elapsed())).await;
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    let frames = client.until(|f| f.is("usage")).await;
    assert_eq!(usage_total(frames.last().unwrap()), 1_000);
    let rows = report::conversations(ledger.pool(), 0, i64::MAX)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.conversation == id).unwrap();
    assert_eq!(row.cost_micro_usd, 1_000, "{row:?}");
    client.send_json(serde_json::json!({"type": "stop"})).await;
    let frames = client.until(|f| f.is("end")).await;
    let end = frames.last().unwrap().json();
    assert_eq!(end["summary"]["usage"]["cost_micro_usd"], 1_000);
}

/// The same on a phone call: while the ledger's file is locked, the
/// caller still hears the reply and the engine still hears the caller;
/// the call's cost is recorded once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_slow_ledger_holds_up_neither_side_of_a_phone_call() {
    use common::twilio::{
        AUTH_TOKEN, PUBLIC_URL, call_token, media, next_event, send_event, start_stream,
        twilio_stream,
    };
    let (_dir, ledger_config) = sqlite("slow-phone");
    let ledger = Ledger::open(&ledger_config).await.unwrap();
    let engine = Arc::new(ScriptedEngine::new(slow_ledger_script()));
    let mut config = Config::default();
    config.server.public_url = PUBLIC_URL.into();
    config.telephony.twilio_auth_token = AUTH_TOKEN.into();
    config.telephony.greeting = String::new();
    let gateway = start(&config, Some(engine.clone())).await;
    gateway.server.set_ledger(ledger.clone()).unwrap();
    let token = call_token(gateway.addr, "CA0001").await;
    let mut call = twilio_stream(gateway.addr, true).await.unwrap();
    start_stream(&mut call, "CA0001", &token).await;
    // The call is answered (its start is in the ledger) before the lock.
    while report::conversations(ledger.pool(), 0, i64::MAX)
        .await
        .unwrap()
        .is_empty()
    {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let (mut locker, locked_at) = lock_ledger(&ledger_config.url).await;
    for i in 0..20 {
        send_event(&mut call, media(&[0i16; 160], i)).await;
    }
    loop {
        let event = next_event(&mut call).await.unwrap();
        if event["event"] == "media" {
            break;
        }
    }
    assert!(
        locked_at.elapsed() < SLOW_LEDGER_LOCK,
        "the caller heard the reply only after {:?}",
        locked_at.elapsed()
    );
    // All 20 frames (the first shorter by the resampler's delay).
    while engine.received().audio_frames < 20 {
        assert!(
            locked_at.elapsed() < SLOW_LEDGER_LOCK,
            "the caller's audio waited for the ledger: {:?}",
            engine.received()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(SLOW_LEDGER_LOCK.saturating_sub(locked_at.elapsed())).await;
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    send_event(
        &mut call,
        serde_json::json!({"event": "stop", "streamSid": "MZ0001",
        "stop": {"accountSid": "AC0", "callSid": "CA0001"}}),
    )
    .await;
    for _ in 0..200 {
        let rows = report::conversations(ledger.pool(), 0, i64::MAX)
            .await
            .unwrap();
        if rows.iter().any(|r| r.ended_ms.is_some()) {
            assert_eq!(rows.len(), 1, "{rows:?}");
            assert_eq!(rows[0].cost_micro_usd, 1_000, "{rows:?}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the call's end was never recorded");
}

/// The same scenarios on a real PostgreSQL server started for this test,
/// one database each.
#[tokio::test]
async fn postgres_the_same_scenarios() {
    let Some(server) = Postgres::start() else {
        return;
    };
    let config = |db: &str| LedgerConfig {
        url: server.database(db),
        gateway_name: "test".into(),
        store_transcripts: true,
        time_zone: common::midday_zone().to_owned(),
        ..LedgerConfig::default()
    };
    // Two gateways opening one new database at once both get its schema.
    let shared = config("shared");
    let other = LedgerConfig {
        gateway_name: "other".into(),
        ..shared.clone()
    };
    let (a, b) = tokio::join!(Ledger::open(&shared), Ledger::open(&other));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.started(started("from-a", None)).await.unwrap();
    b.started(started("from-b", None)).await.unwrap();
    let rows = report::conversations(a.pool(), 0, i64::MAX).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    what_the_client_is_shown_the_ledger_holds_first(config("shown")).await;
    no_conversation_starts_that_the_ledger_cannot_record(config("refused")).await;
    a_paid_conversation_whose_cost_cannot_be_recorded_stops(config("stops")).await;
    concurrent_conversations_add_up_exactly(config("concurrent")).await;
    a_killed_gateways_conversations_end_interrupted(config("killed")).await;
    keys_buy_one_time_client_tokens(config("keys")).await;
    budgets_hold_across_gateways(config("budgets")).await;
}

async fn post_token(
    gateway: &common::gateway::Running,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(gateway.url("/api/tokens"))
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("Authorization", format!("Bearer {key}"));
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A hello with `token`; the frames up to `ready` or the close.
async fn hello_with(gateway: &common::gateway::Running, token: &str, voice: &str) -> Vec<Frame> {
    let mut client = gateway.client().await;
    let hello = serde_json::json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 16000}, "voice": voice, "token": token});
    client.send_json(hello).await;
    client
        .until(|f| f.is("ready") || matches!(f, Frame::Closed(_)))
        .await
}

fn refused_as_unauthorized(frames: &[Frame]) -> bool {
    frames
        .iter()
        .any(|f| f.is("error") && f.json()["code"] == "unauthorized")
        && matches!(frames.last(), Some(Frame::Closed(Some((1008, _)))))
}

/// Keys buy one-time client tokens; a conversation needs one and is
/// recorded under its key.
async fn keys_buy_one_time_client_tokens(config: LedgerConfig) {
    let ledger = Ledger::open(&config).await.unwrap();
    let limits = sonora::ledger::keys::KeyLimits::default();
    let (key, secret) = ledger.create_key("help desk", &limits).await.unwrap();
    assert!(secret.starts_with("sk_") && key.id.starts_with("key_"));
    let mut server_config = Config::default();
    server_config.server.auth = "keys".into();
    let engine = ScriptedEngine::new(paid_turns(&[]));
    let gateway = start(&server_config, Some(Arc::new(engine))).await;
    gateway.server.set_ledger(ledger.clone()).unwrap();

    assert_eq!(post_token(&gateway, None, "").await.0, 401);
    assert_eq!(post_token(&gateway, Some("sk_wrong"), "").await.0, 401);
    let (status, body) = post_token(&gateway, Some(&secret), "{\"engine\": 7}").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let (status, issued) = post_token(&gateway, Some(&secret), "").await;
    assert_eq!(status, 200, "{issued}");
    assert_eq!(issued["key"], key.id.as_str());
    let token = issued["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("ct_"));
    let expires = issued["expires_at"].as_i64().unwrap();
    let now = sonora::ledger::now_ms() / 1000;
    assert!(
        (now + 55..=now + 61).contains(&expires),
        "{expires} vs {now}"
    );

    // No token, a made-up one: refused.
    assert!(refused_as_unauthorized(&hello_with(&gateway, "", "").await));
    assert!(refused_as_unauthorized(
        &hello_with(&gateway, "ct_madeup", "").await
    ));
    // The token opens one conversation, recorded under its key ...
    let frames = hello_with(&gateway, &token, "").await;
    let ready = frames.last().unwrap();
    assert!(ready.is("ready"), "{frames:?}");
    let id = ready.json()["session"].as_str().unwrap().to_owned();
    let rows = report::conversations(ledger.pool(), 0, i64::MAX)
        .await
        .unwrap();
    let row = rows.iter().find(|r| r.conversation == id).unwrap();
    assert_eq!(row.key.as_deref(), Some(key.id.as_str()));
    // ... and only one.
    assert!(refused_as_unauthorized(
        &hello_with(&gateway, &token, "").await
    ));

    // A token limited to a voice gives that voice, and no other.
    let (_, limited) = post_token(&gateway, Some(&secret), "{\"voice\": \"tone\"}").await;
    let limited = limited["token"].as_str().unwrap().to_owned();
    assert!(refused_as_unauthorized(
        &hello_with(&gateway, &limited, "other").await
    ));
    let (_, limited) = post_token(&gateway, Some(&secret), "{\"voice\": \"tone\"}").await;
    let frames = hello_with(&gateway, limited["token"].as_str().unwrap(), "").await;
    assert!(frames.last().unwrap().is("ready"), "{frames:?}");
    // A token for another engine opens nothing here.
    let (_, other) = post_token(&gateway, Some(&secret), "{\"engine\": \"nova-sonic\"}").await;
    assert!(refused_as_unauthorized(
        &hello_with(&gateway, other["token"].as_str().unwrap(), "").await
    ));

    // A key with one conversation at a time: a second is refused with
    // key_busy, and its token, given back, opens one once the first ended.
    let one = KeyLimits {
        budget: None,
        max_sessions: Some(1),
    };
    let (_, one_secret) = ledger.create_key("one at a time", &one).await.unwrap();
    let (_, first) = post_token(&gateway, Some(&one_secret), "").await;
    let (_, second) = post_token(&gateway, Some(&one_secret), "").await;
    let second = second["token"].as_str().unwrap().to_owned();
    let mut holder = gateway.client().await;
    let hello = serde_json::json!({"type": "hello", "version": 1,
        "audio": {"format": "pcm16", "rate": 16000}, "token": first["token"]});
    holder.send_json(hello).await;
    holder.until(|f| f.is("ready")).await;
    let frames = hello_with(&gateway, &second, "").await;
    assert!(
        frames
            .iter()
            .any(|f| f.is("error") && f.json()["code"] == "key_busy"),
        "{frames:?}"
    );
    assert!(
        matches!(frames.last(), Some(Frame::Closed(Some((1013, _))))),
        "{frames:?}"
    );
    holder.close_normally().await;
    let mut opened = false;
    for _ in 0..50 {
        let frames = hello_with(&gateway, &second, "").await;
        if frames.last().is_some_and(|f| f.is("ready")) {
            opened = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(opened, "the token given back opens a conversation");

    // An expired token, and every token of a revoked key, are refused.
    let (_, expired) = post_token(&gateway, Some(&secret), "").await;
    sqlx::query("UPDATE client_tokens SET expires_ms = 0 WHERE used_ms IS NULL")
        .execute(ledger.pool())
        .await
        .unwrap();
    assert!(refused_as_unauthorized(
        &hello_with(&gateway, expired["token"].as_str().unwrap(), "").await
    ));
    let (_, unused) = post_token(&gateway, Some(&secret), "").await;
    assert!(ledger.revoke_key(&key.id).await.unwrap());
    assert!(!ledger.revoke_key(&key.id).await.unwrap());
    assert!(refused_as_unauthorized(
        &hello_with(&gateway, unused["token"].as_str().unwrap(), "").await
    ));
    assert_eq!(post_token(&gateway, Some(&secret), "").await.0, 401);
}

#[tokio::test]
async fn sqlite_keys_buy_one_time_client_tokens() {
    let (_dir, config) = sqlite("keys");
    keys_buy_one_time_client_tokens(config).await;
}

/// `sonora keys`: the secret once, then a JSON last line; never listed.
#[test]
fn the_keys_command_creates_lists_and_revokes() {
    let (_dir, config) = sqlite("keys-cli");
    let url = config.url;
    let sonora = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
            .args(args)
            .args(["--ledger", url.as_str()])
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, out, err) = sonora(&[
        "keys",
        "create",
        "--name",
        "kiosk",
        "--budget-usd",
        "2.5",
        "--period",
        "month",
        "--max-sessions",
        "3",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let (id, secret) = (last["id"].as_str().unwrap(), last["key"].as_str().unwrap());
    assert_eq!(last["name"], "kiosk");
    assert!(secret.starts_with("sk_"));
    let (code, out, _) = sonora(&["keys", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(id)
            && out.contains("$2.500000/month, $0.000000 spent")
            && out.contains("3 at once"),
        "{out}"
    );
    assert!(!out.contains(secret), "{out}");
    let (code, _, err) = sonora(&["keys", "create", "--name", "x", "--budget-usd", "1"]);
    assert_ne!(code, Some(0), "a budget needs its period: {err}");
    assert_eq!(sonora(&["keys", "revoke", id]).0, Some(0));
    assert!(sonora(&["keys", "list"]).1.contains("revoked"));
    let (code, _, err) = sonora(&["keys", "revoke", id]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no live key"), "{err}");
    let (code, out, _) = sonora(&["usage", "--check"]);
    assert_eq!(code, Some(0), "{out}");
}

/// Beyond the loopback, `serve` needs authentication or `--allow-anonymous`.
#[test]
fn serving_beyond_the_loopback_needs_authentication() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
        .args(["serve", "--listen", "0.0.0.0:0", "--ledger", "off"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("with no authentication"), "{err}");
    assert!(err.contains("--allow-anonymous"), "{err}");
}
