//! Nova Sonic end to end: `sonora talk --engine nova-sonic` as a process and
//! the web gateway over a real WebSocket, both against the Bedrock-compatible
//! test endpoint through the real AWS SDK. The summary's cost must equal the
//! endpoint's usage deltas times the published rates, to the micro-dollar.
//! Throttling trips the engine's breaker and the gateway refuses new
//! conversations with 1013 `engine_busy`.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

#[path = "common/bedrock.rs"]
mod bedrock;
mod common;

use std::sync::Arc;
use std::time::Duration;

use bedrock::{Endpoint, Fail, Script, Sent, Turn};
use common::gateway::{self, metric};
use common::twilio::{
    AUTH_TOKEN, PUBLIC_URL, TwilioSocket, call_token, call_webhook, loudness, media, next_event,
    send_event, start_stream, twilio_signature, twilio_stream,
};
use sonora::config::{Config, EngineKind};
use sonora::engine::nova_sonic::{NovaSonicEngine, NovaSonicSettings, StaticCredentials};

const QUESTION: &str = "¿Dónde puedo imprimir mis documentos?";
const ANSWER: &str = "Puedes imprimir en la biblioteca central, primer piso.";

fn expected_micro_usd(sent: Sent) -> u64 {
    let rates = sonora::engine::nova_sonic::builtin_prices();
    sent.cost_micro_usd(rates.rates("amazon.nova-2-sonic-v1:0").unwrap())
}

/// 0.8 s of a loud tone (speech to the endpoint's detector), 16 kHz.
fn question() -> Vec<i16> {
    (0..12_800)
        .map(|i| ((i as f64 / 16_000.0 * 300.0 * std::f64::consts::TAU).sin() * 8_000.0) as i16)
        .collect()
}

/// The Nova Sonic engine of `config` with the test endpoint's credentials.
async fn test_engine(config: &Config) -> Arc<dyn sonora::engine::Engine> {
    let mut settings = NovaSonicSettings::from_config(&config.nova_sonic);
    // Named, so no lookup along the AWS chain slows the test down.
    settings.client.region = "us-east-1".into();
    settings.client.credentials = Some(StaticCredentials {
        access_key_id: "AKIDSONORATEST".into(),
        secret_access_key: "not-a-real-secret".into(),
        session_token: None,
    });
    Arc::new(NovaSonicEngine::connect(settings, None).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talk_against_the_test_endpoint_writes_transcripts_reply_and_exact_cost() {
    let endpoint = Endpoint::start(vec![Script::answering(vec![Turn::new(
        QUESTION, ANSWER, 1_500,
    )])])
    .await;
    let dir = common::scratch::Scratch::new("talk-nova");
    let (q, r, e) = (dir.join("q.wav"), dir.join("r.wav"), dir.join("e.jsonl"));
    sonora::audio::wav::write_mono(&q, 16_000, &question()).unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
        .current_dir(common::root())
        .args([
            "talk",
            "--engine",
            "nova-sonic",
            "--bedrock-endpoint",
            &endpoint.url,
            "--ca-file",
        ])
        .arg(&endpoint.ca_file)
        .arg("--input")
        .arg(&q)
        .arg("--output")
        .arg(&r)
        .arg("--events")
        .arg(&e)
        // The standard credential chain, from the environment only.
        .env("AWS_ACCESS_KEY_ID", "AKIDSONORATEST")
        .env("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
        .env("AWS_CONFIG_FILE", dir.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("talk finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "talk failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("you: {QUESTION}")), "{stdout}");
    assert!(stdout.contains(&format!("sonora: {ANSWER}")), "{stdout}");

    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let sent = endpoint.sent();
    assert_eq!(summary["tokens"]["speech_in"], sent.speech_in);
    assert_eq!(summary["tokens"]["speech_out"], sent.speech_out);
    assert_eq!(summary["tokens"]["text_in"], sent.text_in);
    assert_eq!(summary["tokens"]["text_out"], sent.text_out);
    assert!(sent.speech_out > 0 && sent.text_in > 0);
    assert_eq!(
        summary["cost_micro_usd"],
        expected_micro_usd(sent),
        "{summary}"
    );
    assert_eq!(summary["turns"], 1);
    assert_eq!(summary["close"], "client_stopped");

    let reply = sonora::audio::wav::read(&r).unwrap();
    assert_eq!(reply.rate_hz, 24_000);
    assert_eq!(reply.samples.len(), 15 * 2_400, "1.5 s of reply audio");
    let events = std::fs::read_to_string(&e).unwrap();
    let lines: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "transcript" && l["role"] == "user" && l["text"] == QUESTION)
    );
    assert!(lines.iter().any(|l| l["type"] == "transcript"
        && l["role"] == "assistant"
        && l["stage"] == "final"
        && l["text"] == ANSWER));
    assert!(lines.iter().any(|l| l["type"] == "usage"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_a_nova_sonic_conversation_with_cost_by_modality() {
    let endpoint = Endpoint::start(vec![Script::answering(vec![Turn::new(
        QUESTION, ANSWER, 1_000,
    )])])
    .await;
    let mut config = Config::default();
    config.engine.kind = EngineKind::NovaSonic;
    config.nova_sonic.endpoint_url = endpoint.url.clone();
    config.nova_sonic.ca_file = endpoint.ca_file.display().to_string();
    let mut running = gateway::start(&config, Some(test_engine(&config).await)).await;

    let mut client = running.client().await;
    client.hello_pcm().await;
    let ready = client.until(|f| f.is("ready")).await;
    let ready = ready.last().unwrap().json().clone();
    assert_eq!(ready["engine"], "nova-sonic", "{ready}");
    assert_eq!(ready["voice"], "lupe");
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for frame in question().chunks(320) {
        tick.tick().await;
        client.send_pcm(frame).await;
    }
    let frames = client.until(|f| f.is("turn_end")).await;
    gateway::assert_heard_and_answered(&frames, QUESTION, ANSWER);
    let audio = gateway::audio_samples(&frames);
    assert!(
        audio >= 20_000,
        "reply audio reached the client: {audio} samples"
    );
    client.send_json(serde_json::json!({"type": "stop"})).await;
    let rest = client.until(|f| f.is("end")).await;
    let end = rest.last().unwrap().json().clone();
    let sent = endpoint.sent();
    let usage = &end["summary"]["usage"];
    assert_eq!(usage["speech_out_tokens"], sent.speech_out, "{end}");
    assert_eq!(usage["cost_micro_usd"], expected_micro_usd(sent), "{end}");

    let text = running.metrics().await;
    let speech = metric(&text, "sonora_cost_micro_usd_total{modality=\"speech\"}");
    let total = metric(&text, "sonora_cost_usd_total");
    assert!(speech > 0.0, "{text}");
    assert!(
        (total * 1e6 - speech - metric(&text, "sonora_cost_micro_usd_total{modality=\"text\"}"))
            .abs()
            <= 1.0
    );
    assert_eq!(
        metric(
            &text,
            "sonora_tokens_total{modality=\"speech\",direction=\"output\"}"
        ),
        sent.speech_out as f64
    );
    running.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_makes_the_gateway_refuse_new_conversations_with_1013_engine_busy() {
    let endpoint = Endpoint::start(vec![
        Script::failing(Fail::Throttle, vec![]),
        Script::answering(vec![Turn::new(QUESTION, ANSWER, 600)]),
    ])
    .await;
    let mut config = Config::default();
    config.engine.kind = EngineKind::NovaSonic;
    config.nova_sonic.endpoint_url = endpoint.url.clone();
    config.nova_sonic.ca_file = endpoint.ca_file.display().to_string();
    // Long enough for the refusals below on a loaded machine.
    config.nova_sonic.breaker_cooldown_ms = 15_000;
    config.server.hello_timeout_ms = 60_000;
    config.validate(&sonora::cli::SETTING_CHECKS).unwrap();
    let mut running = gateway::start(&config, Some(test_engine(&config).await)).await;

    // A socket let in before the trip says hello only after it.
    let mut early = running.client().await;
    let mut first = running.client().await;
    first.hello_pcm().await;
    first.until(|f| f.is("ready")).await;
    // Its stream is throttled: the breaker trips.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut text = running.metrics().await;
    while metric(&text, "sonora_engine_breaker_trips_total") < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "no trip:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = running.metrics().await;
    }
    assert_eq!(metric(&text, "sonora_engine_breaker_open"), 1.0, "{text}");

    // A new socket is closed at once with 1013 and the reason.
    let mut late = running.client().await;
    match late.next().await {
        gateway::Frame::Closed(Some((code, reason))) => {
            assert_eq!(code, 1013);
            assert!(reason.starts_with("engine_busy"), "{reason}");
        }
        other => panic!("expected a 1013 close, got {other:?}"),
    }
    // The early socket's hello gets `engine_busy` and the same close.
    early.hello_pcm().await;
    let frames = early
        .until(|f| matches!(f, gateway::Frame::Closed(_)))
        .await;
    let error = frames
        .iter()
        .find(|f| f.is("error"))
        .unwrap()
        .json()
        .clone();
    assert_eq!(error["code"], "engine_busy", "{error}");
    assert_eq!(error["fatal"], true, "{error}");
    match frames.last().unwrap() {
        gateway::Frame::Closed(Some((code, reason))) => {
            assert_eq!(*code, 1013);
            assert!(reason.starts_with("engine_busy"), "{reason}");
        }
        other => panic!("expected a 1013 close, got {other:?}"),
    }

    let text = running.metrics().await;
    assert_eq!(
        metric(
            &text,
            "sonora_sessions_refused_total{reason=\"engine_busy\"}"
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "sonora_protocol_errors_total{code=\"engine_busy\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "sonora_engine_conversations_refused_total"),
        1.0
    );
    assert_eq!(metric(&text, "sonora_engine_breaker_trips_total"), 1.0);
    assert_eq!(metric(&text, "sonora_engine_stream_opens_total"), 1.0);
    running.stop();
}

/// `sonora serve` as a process until its first line says where it listens.
fn spawn_gateway(
    endpoint: &Endpoint,
    ledger: &str,
    dir: &std::path::Path,
) -> (std::process::Child, std::net::SocketAddr) {
    spawn_gateway_with(endpoint, ledger, dir, &["ledger.gateway_name=crash-test"])
}

/// The same with more `--set` settings.
fn spawn_gateway_with(
    endpoint: &Endpoint,
    ledger: &str,
    dir: &std::path::Path,
    settings: &[&str],
) -> (std::process::Child, std::net::SocketAddr) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
        .current_dir(common::root())
        .args(["serve", "--listen", "127.0.0.1:0", "--engine", "nova-sonic"])
        .args(["--bedrock-endpoint", &endpoint.url, "--ca-file"])
        .arg(&endpoint.ca_file)
        .args(["--ledger", ledger])
        .args(settings.iter().flat_map(|s| ["--set", s]))
        .env("AWS_ACCESS_KEY_ID", "AKIDSONORATEST")
        .env("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", dir.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

/// `kill -9` of a gateway mid-conversation loses no cost the client saw:
/// after a restart, `sonora usage` shows the conversation, closed as
/// `interrupted`, with at least that cost, and `--check` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_loses_no_cost_a_client_saw() {
    let endpoint = Endpoint::start(vec![Script::answering(vec![
        Turn::new(QUESTION, ANSWER, 1_000),
        Turn::new(QUESTION, ANSWER, 1_000),
    ])])
    .await;
    let dir = common::scratch::Scratch::new("crash");
    let ledger = format!("sqlite://{}", dir.join("ledger.db").display());
    let (mut gateway, addr) = spawn_gateway(&endpoint, &ledger, &dir);
    let mut client = gateway::Client::connect(addr).await;
    client.hello_pcm().await;
    let ready = client.until(|f| f.is("ready")).await;
    let id = ready.last().unwrap().json()["session"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for frame in question().chunks(320) {
        tick.tick().await;
        client.send_pcm(frame).await;
    }
    let frames = client.until(|f| f.is("usage")).await;
    let shown = frames.last().unwrap().json()["total"]["cost_micro_usd"]
        .as_i64()
        .unwrap();
    assert!(shown > 0);
    // Killed with the conversation running: no chance to record its end.
    gateway.kill().unwrap();
    gateway.wait().unwrap();

    // The next start of the same gateway closes what it left open.
    let (mut restarted, _) = spawn_gateway(&endpoint, &ledger, &dir);
    restarted.kill().unwrap();
    restarted.wait().unwrap();
    let usage = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
            .arg("usage")
            .args(args)
            .args(["--ledger", &ledger])
            .output()
            .unwrap()
    };
    let output = usage(&["--by", "conversation", "--format", "json"]);
    assert!(output.status.success(), "{output:?}");
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["conversation"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} in {rows}"));
    assert_eq!(row["end_reason"], "interrupted", "{row}");
    assert!(
        row["cost_micro_usd"].as_i64().unwrap() >= shown,
        "{row} vs {shown}"
    );
    assert_eq!(row["engine"], "nova-sonic");
    for field in ["key", "model", "turns"] {
        assert!(row.get(field).is_some(), "{field} in {row}");
    }
    let check = usage(&["--check"]);
    assert!(check.status.success(), "{check:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One conversation on a budgeted key, asking question after question
/// until the gateway stops it: what it was told.
#[derive(Debug, Default)]
struct Budgeted {
    /// The `session` of `ready`, when it started.
    id: Option<String>,
    /// The error code it was refused with, when it did not start.
    refused: Option<String>,
    turns: u32,
    /// The last `usage` message's total cost and remaining budget.
    shown_micro_usd: i64,
    remaining: Vec<i64>,
    end_reason: Option<String>,
    close_code: Option<u16>,
}

async fn spend_a_budget(addr: std::net::SocketAddr, secret: String) -> Budgeted {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/api/tokens"))
        .header("Authorization", format!("Bearer {secret}"))
        .send()
        .await
        .unwrap();
    let token: serde_json::Value = response.json().await.unwrap();
    let mut client = gateway::Client::connect(addr).await;
    let hello = serde_json::json!({"type": "hello", "version": 1, "language": "es",
        "audio": {"format": "pcm16", "rate": 16000}, "token": token["token"]});
    client.send_json(hello).await;
    let mut seen = Budgeted::default();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        // Until the conversation is ready (or refused), then one turn.
        let mut asked = seen.id.is_none();
        loop {
            if !asked {
                let silence = vec![0i16; 9_600];
                for frame in question().chunks(320).chain(silence.chunks(320)) {
                    tick.tick().await;
                    client.send_pcm(frame).await;
                }
                asked = true;
            }
            let frame = client.next().await;
            match &frame {
                gateway::Frame::Closed(close) => {
                    seen.close_code = close.as_ref().map(|c| c.0);
                    return seen;
                }
                f if f.is("ready") => {
                    seen.id = f.json()["session"].as_str().map(str::to_owned);
                    if let Some(left) = f.json()["budget"]["remaining_micro_usd"].as_i64() {
                        seen.remaining.push(left);
                    }
                    asked = false;
                }
                f if f.is("error") && seen.id.is_none() => {
                    seen.refused = f.json()["code"].as_str().map(str::to_owned);
                }
                f if f.is("end") => {
                    seen.end_reason = f.json()["reason"].as_str().map(str::to_owned)
                }
                f if f.is("usage") => {
                    let json = f.json();
                    seen.shown_micro_usd = json["total"]["cost_micro_usd"].as_i64().unwrap();
                    if let Some(left) = json["budget"]["remaining_micro_usd"].as_i64() {
                        seen.remaining.push(left);
                    }
                    // The reply's usage closes the turn.
                    if json["delta"]["speech_out_tokens"].as_i64() > Some(0) {
                        seen.turns += 1;
                        break;
                    }
                }
                _ => {}
            }
        }
    }
}

/// Two gateways on one PostgreSQL, one key whose budget fits about ten
/// turns, four conversations at once through both: together they spend no
/// more than one turn past the budget, each is told why it ended, a new one
/// is refused, and what the clients were shown, the ledger's report and
/// `--check` agree to the micro-dollar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_stop_a_key_within_a_turn_of_its_budget() {
    let Some(server) = common::postgres::Postgres::start() else {
        return;
    };
    let turns: Vec<Turn> = (0..12)
        .map(|_| Turn::new(QUESTION, ANSWER, 1_000))
        .collect();
    let endpoint = Endpoint::start(vec![Script::answering(turns)]).await;
    let dir = common::scratch::Scratch::new("budget");
    let ledger = server.database("budget");
    // What one turn costs: the endpoint's usage for one question and answer.
    let turn = expected_micro_usd(Sent {
        speech_in: 20,
        text_in: 40 + QUESTION.len() as u64 / 4,
        speech_out: 25,
        text_out: 3 + ANSWER.len() as u64 / 4,
    });
    let budget = 10 * turn;
    // A day that cannot end while the test runs.
    let zone = format!("ledger.time_zone={}", common::midday_zone());
    let sonora = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
            .args(["--set", &zone])
            .args(args)
            .args(["--ledger", &ledger])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let budget_usd = format!("{}.{:06}", budget / 1_000_000, budget % 1_000_000);
    let created = sonora(&[
        "keys",
        "create",
        "--name",
        "desk",
        "--budget-usd",
        &budget_usd,
        "--period",
        "day",
    ]);
    let created: serde_json::Value = serde_json::from_str(created.lines().last().unwrap()).unwrap();
    let secret = created["key"].as_str().unwrap().to_owned();
    let reserve = format!("ledger.turn_reserve_usd=0.{turn:06}");
    let gateways: Vec<_> = ["gw-a", "gw-b"]
        .iter()
        .map(|name| {
            let name = format!("ledger.gateway_name={name}");
            spawn_gateway_with(
                &endpoint,
                &ledger,
                &dir,
                &[&name, &reserve, &zone, "server.auth=keys"],
            )
        })
        .collect();
    let runs: Vec<_> = (0..4)
        .map(|i| tokio::spawn(spend_a_budget(gateways[i % 2].1, secret.clone())))
        .collect();
    let mut seen = Vec::new();
    for run in runs {
        seen.push(run.await.unwrap());
    }
    // Holds given back as those ended may leave room for a turn or two
    // more: later conversations take it, until one is refused.
    let mut late = Budgeted::default();
    for _ in 0..4 {
        late = spend_a_budget(gateways[0].1, secret.clone()).await;
        if late.id.is_none() {
            break;
        }
        seen.push(std::mem::take(&mut late));
    }
    let mut metered = 0.0;
    for (mut child, addr) in gateways {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metered += metric(&text, "sonora_cost_usd_total");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(late.refused.as_deref(), Some("budget_exceeded"), "{late:?}");
    assert_eq!(late.close_code, Some(1008), "{late:?}");

    let rows: serde_json::Value = serde_json::from_str(&sonora(&[
        "usage",
        "--by",
        "conversation",
        "--format",
        "json",
    ]))
    .unwrap();
    let rows = rows.as_array().unwrap();
    let spent: i64 = rows
        .iter()
        .map(|r| r["cost_micro_usd"].as_i64().unwrap())
        .sum();
    // The gateways' /metrics, the clients and the ledger agree.
    assert_eq!(
        (metered * 1e6).round() as i64,
        spent,
        "{metered} vs {spent}"
    );
    let turns: u32 = seen.iter().map(|s| s.turns).sum();
    // The dearest turn as the endpoint really priced it.
    let turn = seen
        .iter()
        .filter(|s| s.turns > 0)
        .map(|s| (s.shown_micro_usd + i64::from(s.turns) - 1) / i64::from(s.turns))
        .max()
        .unwrap();
    let budget = i64::try_from(budget).unwrap();
    assert!(
        spent <= budget + turn,
        "{spent} spent, budget {budget}, a turn {turn}: {seen:?}"
    );
    // They stopped because the budget was spent, not before.
    assert!(spent > budget - 4 * turn, "{spent} of {budget}: {seen:?}");
    assert!(turns >= 6, "{turns} turns: {seen:?}");
    for run in seen.iter().filter(|s| s.id.is_some()) {
        assert_eq!(
            run.end_reason.as_deref(),
            Some("budget_exceeded"),
            "{run:?}"
        );
        assert_eq!(run.close_code, Some(1008), "{run:?}");
        let id = run.id.as_deref().unwrap();
        let row = rows.iter().find(|r| r["conversation"] == id).unwrap();
        assert_eq!(
            row["cost_micro_usd"].as_i64(),
            Some(run.shown_micro_usd),
            "{row}"
        );
        assert_eq!(row["end_reason"], "budget_exceeded", "{row}");
        assert!(run.remaining.windows(2).all(|w| w[0] >= w[1]), "{run:?}");
        assert!(run.remaining.first() <= Some(&budget), "{run:?}");
    }
    for run in seen.iter().filter(|s| s.id.is_none()) {
        assert_eq!(run.refused.as_deref(), Some("budget_exceeded"), "{run:?}");
    }
    sonora(&["usage", "--check"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A gateway taking calls on the Nova Sonic test endpoint.
async fn phone_gateway() -> (Endpoint, gateway::Running) {
    let endpoint = Endpoint::start(vec![Script::answering(vec![
        Turn::new(QUESTION, ANSWER, 1_000),
        Turn::new(QUESTION, ANSWER, 3_000),
    ])])
    .await;
    let mut config = Config::default();
    config.engine.kind = EngineKind::NovaSonic;
    config.nova_sonic.endpoint_url = endpoint.url.clone();
    config.nova_sonic.ca_file = endpoint.ca_file.display().to_string();
    config.server.public_url = PUBLIC_URL.into();
    config.server.hello_timeout_ms = 1_000;
    config.telephony.twilio_auth_token = AUTH_TOKEN.into();
    config.telephony.greeting = "Hola.".into();
    let engine = test_engine(&config).await;
    let gateway = gateway::start(&config, Some(engine)).await;
    let dir = common::scratch::Scratch::new("phone");
    let ledger = sonora::config::LedgerConfig {
        url: format!("sqlite://{}", dir.join("ledger.db").display()),
        ..sonora::config::LedgerConfig::default()
    };
    let ledger = sonora::ledger::Ledger::open(&ledger).await.unwrap();
    gateway.server.set_ledger(ledger).unwrap();
    (endpoint, gateway)
}

/// Hostile streams: no start, a start that is not JSON, another audio
/// format, a token for another call are closed (1008) before any engine
/// work; garbage inside a running call is dropped and the call goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_phone_streams_are_closed_or_survived() {
    let (endpoint, gateway) = phone_gateway().await;
    let closed_with = |socket: TwilioSocket| async move {
        let mut socket = socket;
        loop {
            match next_event(&mut socket).await {
                Ok(_) => continue,
                Err(code) => return code,
            }
        }
    };
    // Silence after the upgrade: closed once the wait for start is over.
    let silent = twilio_stream(gateway.addr, true).await.unwrap();
    assert_eq!(closed_with(silent).await, Some(1008));
    // Not JSON.
    let mut garbage = twilio_stream(gateway.addr, true).await.unwrap();
    send_event(&mut garbage, serde_json::json!("{{{{")).await;
    use futures_util::SinkExt as _;
    garbage
        .send(tokio_tungstenite::tungstenite::Message::Text(
            "not json".into(),
        ))
        .await
        .unwrap();
    assert_eq!(closed_with(garbage).await, Some(1008));
    // Another audio format.
    let token = call_token(gateway.addr, "CA0101").await;
    let mut wrong = twilio_stream(gateway.addr, true).await.unwrap();
    send_event(
        &mut wrong,
        serde_json::json!({"event": "start", "streamSid": "MZ1",
        "start": {"streamSid": "MZ1", "callSid": "CA0101", "customParameters": {"token": token},
            "mediaFormat": {"encoding": "audio/l16", "sampleRate": 16000, "channels": 1}}}),
    )
    .await;
    assert_eq!(closed_with(wrong).await, Some(1008));
    // A token for another call.
    let token = call_token(gateway.addr, "CA0102").await;
    let mut other = twilio_stream(gateway.addr, true).await.unwrap();
    start_stream(&mut other, "CA0103", &token).await;
    assert_eq!(closed_with(other).await, Some(1008));
    assert_eq!(
        endpoint.connections().len(),
        0,
        "no engine work for any of them"
    );

    // Inside a call: bad base64, not JSON, an unknown event, a huge digit:
    // dropped; the call goes on and still answers.
    let token = call_token(gateway.addr, "CA0104").await;
    let mut call = twilio_stream(gateway.addr, true).await.unwrap();
    start_stream(&mut call, "CA0104", &token).await;
    for junk in [
        serde_json::json!({"event": "media", "media": {"payload": "***not base64***"}}),
        serde_json::json!({"event": "media", "media": {"payload": 7}}),
        serde_json::json!({"event": "dtmf", "dtmf": {"digit": "x".repeat(1000)}}),
        serde_json::json!({"event": "surprise"}),
    ] {
        send_event(&mut call, junk).await;
    }
    call.send(tokio_tungstenite::tungstenite::Message::Text("}{".into()))
        .await
        .unwrap();
    let tone: Vec<i16> = (0..6_400)
        .map(|i| ((f64::from(i) / 8_000.0 * 300.0 * std::f64::consts::TAU).sin() * 8_000.0) as i16)
        .chain(std::iter::repeat_n(0, 6_400))
        .collect();
    for (i, frame) in tone.chunks(160).enumerate() {
        send_event(&mut call, media(frame, i)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut marked = false;
    while let Ok(event) = next_event(&mut call).await {
        if event["event"] == "mark" {
            marked = true;
            break;
        }
    }
    assert!(marked, "the call answered after the junk");
}

/// A phone call through Twilio Media Streams on the Nova Sonic test
/// endpoint: a signed webhook gets TwiML with a one-time token, the signed
/// stream hears the greeting, asks in μ-law, hears the answer as paced
/// μ-law with a mark after it, and speaking over the answer clears it. A
/// bad signature and a reused token are refused before any engine work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_call_hears_the_greeting_asks_and_hears_the_answer() {
    let (endpoint, gateway) = phone_gateway().await;

    // The webhook: a bad signature is refused, a good one answered.
    let params = [
        ("CallSid", "CA0001"),
        ("From", "+51987654321"),
        ("To", "+5115550000"),
    ];
    let good = twilio_signature(AUTH_TOKEN, "https://voz.example.edu/twilio/voice", &params);
    let (status, _) = call_webhook(gateway.addr, "CA0001", "d3Jvbmc=").await;
    assert_eq!(status, 403);
    let (status, twiml) = call_webhook(gateway.addr, "CA0001", &good).await;
    assert_eq!(status, 200, "{twiml}");
    assert!(
        twiml.contains("<Connect><Stream url=\"wss://voz.example.edu/twilio/stream\">"),
        "{twiml}"
    );
    assert!(
        !twiml.contains("51987654321"),
        "the caller's number stays out: {twiml}"
    );
    let token = twiml
        .split("name=\"token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();

    // An unsigned stream is refused before the upgrade.
    assert_eq!(twilio_stream(gateway.addr, false).await.err(), Some(403));
    let mut socket = twilio_stream(gateway.addr, true).await.unwrap();
    start_stream(&mut socket, "CA0001", &token).await;

    // The greeting comes first, before the caller says anything.
    let first = next_event(&mut socket).await.unwrap();
    assert_eq!(first["event"], "media", "{first}");
    assert_eq!(first["streamSid"], "MZ0001");
    // All of it, paced, until the line goes quiet.
    let mut greeting = vec![first];
    while let Ok(event) =
        tokio::time::timeout(Duration::from_millis(400), next_event(&mut socket)).await
    {
        greeting.push(event.unwrap());
    }
    let spoken = greeting.iter().filter(|e| loudness(e) > 300.0).count();
    assert!(spoken >= 5, "{spoken} spoken frames of {}", greeting.len());
    // The question, as μ-law at 8 kHz paced like a phone, then quiet.
    let tone: Vec<i16> = (0..6_400)
        .map(|i| ((f64::from(i) / 8_000.0 * 300.0 * std::f64::consts::TAU).sin() * 8_000.0) as i16)
        .chain(std::iter::repeat_n(0, 6_400))
        .collect();
    let sender = {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<serde_json::Value>(1024);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for (i, frame) in tone.chunks(160).enumerate() {
            tx.send(media(frame, i)).await.unwrap();
        }
        drop(tx);
        let (mut sink, mut stream) = futures_util::StreamExt::split(socket);
        let task = tokio::spawn(async move {
            use futures_util::SinkExt as _;
            while let Some(event) = rx.recv().await {
                tick.tick().await;
                let text = tokio_tungstenite::tungstenite::Message::Text(event.to_string().into());
                sink.send(text).await.unwrap();
            }
            (sink, std::time::Instant::now())
        });
        // Everything the gateway sends until the answer's mark.
        let mut events = Vec::new();
        loop {
            let message = tokio::time::timeout(
                Duration::from_secs(20),
                futures_util::StreamExt::next(&mut stream),
            )
            .await
            .unwrap()
            .unwrap()
            .unwrap();
            let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
                continue;
            };
            let event: serde_json::Value = serde_json::from_str(&text).unwrap();
            let done = event["event"] == "mark";
            events.push((std::time::Instant::now(), event));
            if done {
                break;
            }
        }
        let (sink, asked) = task.await.unwrap();
        (events, asked, sink.reunite(stream).unwrap())
    };
    let (events, asked, mut socket) = sender;
    let audio: Vec<&serde_json::Value> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e["event"] == "media")
        .collect();
    // The answer's 1 s of 440 Hz is heard as loud 20 ms frames.
    let loud = audio.iter().filter(|e| loudness(e) > 1_000.0).count();
    assert!(
        (45..=55).contains(&loud),
        "{loud} loud frames of {}",
        audio.len()
    );
    assert!(events.iter().any(|(at, _)| *at > asked));
    let mark = &events.last().unwrap().1;
    assert_eq!(mark["mark"]["name"], "turn-1", "{mark}");
    // Paced: the answer's frames are not all sent at once.
    let loud_times: Vec<std::time::Instant> = events
        .iter()
        .filter(|(_, e)| e["event"] == "media" && loudness(e) > 1_000.0)
        .map(|(t, _)| *t)
        .collect();
    let spread = loud_times.last().unwrap().duration_since(loud_times[0]);
    assert!(
        spread >= Duration::from_millis(500),
        "{spread:?} for {} frames",
        loud_times.len()
    );

    // A second question, spoken over the 3 s answer: `clear`.
    for (i, frame) in tone.chunks(160).enumerate() {
        send_event(&mut socket, media(frame, 1_000 + i)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut cleared = false;
    let mut answer_started = false;
    for (i, frame) in tone.chunks(160).cycle().enumerate().take(500) {
        if answer_started {
            // Speaking again while the answer plays.
            send_event(&mut socket, media(frame, 2_000 + i)).await;
        }
        let event = tokio::time::timeout(Duration::from_millis(20), next_event(&mut socket)).await;
        let Ok(event) = event else { continue };
        let event = event.unwrap();
        if event["event"] == "media" && loudness(&event) > 1_000.0 {
            answer_started = true;
        }
        if event["event"] == "clear" {
            cleared = true;
            break;
        }
    }
    assert!(cleared, "barge-in clears the caller's playback");
    let text = gateway.metrics().await;
    assert_eq!(metric(&text, "sonora_calls_total"), 1.0);
    assert_eq!(metric(&text, "sonora_calls_active"), 1.0);
    send_event(
        &mut socket,
        serde_json::json!({"event": "stop", "streamSid": "MZ0001",
        "stop": {"accountSid": "AC0", "callSid": "CA0001"}}),
    )
    .await;
    drop(socket);

    // The same token again: refused, and no engine stream opened for it.
    let opened = endpoint.connections().len();
    let mut again = twilio_stream(gateway.addr, true).await.unwrap();
    start_stream(&mut again, "CA0001", &token).await;
    assert_eq!(next_event(&mut again).await.err(), Some(Some(1008)));
    assert_eq!(endpoint.connections().len(), opened);

    // The ledger has the call: channel phone, the caller only as a hash.
    let ledger = gateway.server.ledger().unwrap();
    let row = common::ended_row(ledger, "call-CA0001").await;
    assert_eq!(row.channel, "phone");
    assert_eq!(row.client, sonora::ledger::client_hash("tel:+51987654321"));
    assert_eq!(row.engine, "nova-sonic");
    assert!(row.cost_micro_usd > 0 && row.turns >= 1, "{row:?}");
}
