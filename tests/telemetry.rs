//! Logs and traces of a real `sonora serve` process. An OTLP/HTTP collector
//! in this test process parses every export request: a conversation on the
//! Nova Sonic test endpoint must arrive as a conversation span with one turn
//! span carrying the conversation's id, the latency its client was told and
//! the exact tokens and cost; spans still queued at shutdown are flushed; a
//! collector that hangs or fails slows no conversation, and what it costs is
//! counted. The JSON log lines name the conversation of every event in it.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

#[path = "common/bedrock.rs"]
mod bedrock;
mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bedrock::{Endpoint, Script, Sent, Turn};
use common::gateway::{Client, Frame};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const QUESTION: &str = "¿Dónde puedo imprimir mis documentos?";
const ANSWER: &str = "Puedes imprimir en la biblioteca central, primer piso.";

/// How the collector answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    /// HTTP 500 after reading the request.
    Fail,
    /// Reads the request, then never answers.
    Hang,
}

/// A small OTLP/HTTP trace collector: every request must be an OTLP/JSON
/// `ExportTraceServiceRequest`; its spans are kept.
#[derive(Clone)]
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<u32>>,
}

#[derive(Clone)]
struct CollectorState {
    answer: Answer,
    spans: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<u32>>,
}

impl Collector {
    async fn start(answer: Answer) -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(0));
        let state = CollectorState {
            answer,
            spans: Arc::clone(&spans),
            requests: Arc::clone(&requests),
        };
        let app = Router::new()
            .route("/v1/traces", post(export))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            spans,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }

    fn requests(&self) -> u32 {
        *self.requests.lock().unwrap()
    }

    /// The spans once `done` holds for them, within 20 s.
    async fn wait_for(&self, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(Instant::now() < deadline, "never came: {spans:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn export(
    State(state): State<CollectorState>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    assert_eq!(headers["content-type"], "application/json");
    let request: Value = serde_json::from_slice(&body).expect("OTLP/JSON");
    *state.requests.lock().unwrap() += 1;
    let mut spans = Vec::new();
    for resource in request["resourceSpans"].as_array().expect("resourceSpans") {
        let service = &resource["resource"]["attributes"][0];
        assert_eq!(service["key"], "service.name", "{request}");
        assert_eq!(service["value"]["stringValue"], "sonora");
        for scope in resource["scopeSpans"].as_array().expect("scopeSpans") {
            for span in scope["spans"].as_array().expect("spans") {
                assert_eq!(span["traceId"].as_str().unwrap().len(), 32, "{span}");
                assert_eq!(span["spanId"].as_str().unwrap().len(), 16, "{span}");
                let start: u64 = span["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
                let end: u64 = span["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
                assert!(start > 0 && start <= end, "{span}");
                spans.push(span.clone());
            }
        }
    }
    state.spans.lock().unwrap().extend(spans);
    match state.answer {
        Answer::Ok => (StatusCode::OK, "{}"),
        Answer::Fail => (StatusCode::INTERNAL_SERVER_ERROR, "no"),
        Answer::Hang => std::future::pending().await,
    }
}

/// A span attribute as JSON: strings as strings, integers as numbers.
fn attr(span: &Value, key: &str) -> Value {
    let found = span["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == key);
    let Some(value) = found.map(|a| &a["value"]) else {
        return Value::Null;
    };
    if let Some(int) = value["intValue"].as_str() {
        return json!(int.parse::<i64>().unwrap());
    }
    for kind in ["stringValue", "boolValue", "doubleValue"] {
        if !value[kind].is_null() {
            return value[kind].clone();
        }
    }
    panic!("unknown value {value}");
}

fn named<'a>(spans: &'a [Value], name: &str, conversation: &str) -> Vec<&'a Value> {
    spans
        .iter()
        .filter(|s| s["name"] == name && attr(s, "conversation.id") == conversation)
        .collect()
}

/// A `sonora serve` process; its stderr lines are kept.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("sonora-telemetry-{}", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_sonora"))
            .current_dir(common::root())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .env_remove("SONORA_LOG")
            .env("SONORA_LEDGER_URL", "off")
            .env("AWS_ACCESS_KEY_ID", "AKIDSONORATEST")
            .env("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
            .env("AWS_CONFIG_FILE", dir.join("no-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = Arc::clone(&stderr);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                kept.lock().unwrap().push(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = stdout.next_line().await.unwrap().unwrap_or_default();
        let addr = line
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = reqwest::get(format!("http://{addr}/readyz")).await;
            if ready.is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "the gateway never got ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            addr,
            stderr,
        }
    }

    /// SIGTERM, then the wait for the process to end; how long it took.
    async fn stop(&mut self) -> Duration {
        let pid = self.child.id().unwrap().to_string();
        let started = Instant::now();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the gateway stopped")
            .unwrap();
        assert!(exit.success(), "{exit:?}\n{}", self.stderr().join("\n"));
        // The reader has the last lines once the pipe is closed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        started.elapsed()
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The JSON log lines (the command line's own messages are text).
    fn json_logs(&self) -> Vec<Value> {
        self.stderr()
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// The counters logged when the span export stopped.
    fn export_summary(&self) -> Value {
        let logs = self.json_logs();
        let found = logs.iter().find(|l| l["message"] == "span export stopped");
        found
            .unwrap_or_else(|| panic!("no export summary in {:#?}", self.stderr()))
            .clone()
    }
}

/// 0.8 s of a loud tone (speech to the endpoint's detector), 16 kHz.
fn question() -> Vec<i16> {
    (0..12_800)
        .map(|i| ((i as f64 / 16_000.0 * 300.0 * std::f64::consts::TAU).sin() * 8_000.0) as i16)
        .collect()
}

fn expected_micro_usd(sent: Sent) -> u64 {
    let rates = sonora::engine::nova_sonic::builtin_prices();
    sent.cost_micro_usd(rates.rates("amazon.nova-2-sonic-v1:0").unwrap())
}

/// Connects and waits for `ready`; the conversation id it gives.
async fn open(addr: SocketAddr) -> (Client, String) {
    let mut client = Client::connect(addr).await;
    client.hello_pcm().await;
    let frames = client.until(|f| f.is("ready")).await;
    let id = frames.last().unwrap().json()["session"]
        .as_str()
        .unwrap()
        .to_owned();
    (client, id)
}

/// Ends a conversation with `stop`; the `end` message.
async fn finish(client: &mut Client) -> Value {
    client.send_json(json!({"type": "stop"})).await;
    let frames = client.until(|f| f.is("end")).await;
    frames.last().unwrap().json().clone()
}

/// Turns of the echo engine (200 ms of audio each); each turn's latency as
/// its client was told, checking every reply comes promptly.
async fn echo_turns(client: &mut Client, turns: usize) -> Vec<u64> {
    let mut latencies = Vec::new();
    for _ in 0..turns {
        let sent = Instant::now();
        client.send_pcm(&vec![1_000; 3_200]).await;
        let frames = client.until(|f| f.is("turn_end")).await;
        let took = sent.elapsed();
        assert!(took < Duration::from_secs(3), "a turn took {took:?}");
        let latency = frames.iter().find(|f| f.is("latency")).expect("latency");
        latencies.push(latency.json()["ms"].as_u64().unwrap());
    }
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_spans_reach_the_collector_with_latency_tokens_and_cost() {
    let collector = Collector::start(Answer::Ok).await;
    let endpoint = Endpoint::start(vec![Script::answering(vec![Turn::new(
        QUESTION, ANSWER, 1_000,
    )])])
    .await;
    let url = collector.url();
    let env = [
        ("SONORA_TELEMETRY_OTLP_ENDPOINT", url.as_str()),
        ("SONORA_TELEMETRY_OTLP_BATCH_MS", "100"),
    ];
    let ca_file = endpoint.ca_file.display().to_string();
    let args = [
        "--log-format",
        "json",
        "--engine",
        "nova-sonic",
        "--bedrock-endpoint",
        &endpoint.url,
        "--ca-file",
        &ca_file,
    ];
    let mut gateway = Gateway::start(&args, &env).await;

    let (mut client, id) = open(gateway.addr).await;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for frame in question().chunks(320) {
        tick.tick().await;
        client.send_pcm(frame).await;
    }
    let frames = client.until(|f| f.is("turn_end")).await;
    let latency = frames.iter().find(|f| f.is("latency")).expect("latency");
    let latency_ms = latency.json()["ms"].as_u64().unwrap();
    let first_audio = frames.iter().position(|f| matches!(f, Frame::Audio(_)));
    assert!(first_audio.is_some(), "reply audio: {frames:?}");
    let end = finish(&mut client).await;
    let sent = endpoint.sent();
    assert_eq!(
        end["summary"]["usage"]["speech_out_tokens"],
        sent.speech_out
    );

    // Exported while the gateway runs, in batches of at most 100 ms.
    let spans = collector
        .wait_for(|spans| named(spans, "conversation", &id).len() == 1)
        .await;
    let turns = named(&spans, "turn", &id);
    assert_eq!(turns.len(), 1, "{spans:#?}");
    let (turn, conversation) = (turns[0], named(&spans, "conversation", &id)[0]);
    assert_eq!(
        attr(turn, "turn.first_byte_ms"),
        json!(latency_ms),
        "{turn}"
    );
    let voice_ms = attr(turn, "turn.first_voice_ms")
        .as_u64()
        .expect("voiced reply");
    assert!(voice_ms >= latency_ms, "{turn}");
    assert!(attr(turn, "turn.reply_ms").as_u64().unwrap() >= voice_ms);
    assert_eq!(attr(turn, "usage.speech_in_tokens"), json!(sent.speech_in));
    assert_eq!(
        attr(turn, "usage.speech_out_tokens"),
        json!(sent.speech_out)
    );
    assert_eq!(attr(turn, "usage.text_in_tokens"), json!(sent.text_in));
    assert_eq!(attr(turn, "usage.text_out_tokens"), json!(sent.text_out));
    assert_eq!(
        attr(turn, "usage.output_tokens"),
        json!(sent.speech_out + sent.text_out)
    );
    assert!(sent.speech_out > 0 && sent.text_in > 0);
    let cost = expected_micro_usd(sent);
    assert!(cost > 0);
    assert_eq!(attr(turn, "usage.cost_micro_usd"), json!(cost), "{turn}");
    assert_eq!(attr(turn, "engine"), "nova-sonic");
    assert_eq!(attr(turn, "model"), "amazon.nova-2-sonic-v1:0");
    assert_eq!(turn["traceId"], conversation["traceId"]);
    assert_eq!(turn["parentSpanId"], conversation["spanId"]);
    assert_eq!(conversation["kind"], 2);
    assert_eq!(attr(conversation, "voice"), "lupe");
    assert_eq!(attr(conversation, "language"), "es");
    assert_eq!(attr(conversation, "close.reason"), "client_stopped");
    assert_eq!(attr(conversation, "turns"), json!(1));
    assert_eq!(attr(conversation, "usage.cost_micro_usd"), json!(cost));

    let elapsed = gateway.stop().await;
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
    let summary = gateway.export_summary();
    assert_eq!(summary["dropped_spans"], 0, "{summary}");
    assert_eq!(summary["failed_spans"], 0, "{summary}");
    assert!(
        summary["exported_spans"].as_u64().unwrap() >= 2,
        "{summary}"
    );
    // Every log line inside the conversation names it.
    let logs = gateway.json_logs();
    let in_conversation = |line: &&Value| {
        line["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(|s| s["name"] == "conversation"))
    };
    let lines: Vec<&Value> = logs.iter().filter(in_conversation).collect();
    let messages: Vec<&str> = lines
        .iter()
        .map(|l| l["message"].as_str().unwrap_or(""))
        .collect();
    for wanted in ["conversation ready", "turn", "conversation ended"] {
        assert!(messages.contains(&wanted), "{messages:?}");
    }
    for line in lines {
        let spans = line["spans"].as_array().unwrap();
        assert_eq!(spans[0]["name"], "connection", "{line}");
        assert!(spans[0]["client.address"].is_string(), "{line}");
        let conversation = spans.iter().find(|s| s["name"] == "conversation").unwrap();
        assert_eq!(conversation["conversation.id"], id.as_str(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_at_shutdown_are_flushed() {
    let collector = Collector::start(Answer::Ok).await;
    let url = collector.url();
    // Batches wait a minute: only the flush on shutdown can send them.
    let env = [
        ("SONORA_TELEMETRY_OTLP_ENDPOINT", url.as_str()),
        ("SONORA_TELEMETRY_OTLP_BATCH_MS", "60000"),
    ];
    let mut gateway = Gateway::start(&["--scripted-echo", "200:300"], &env).await;
    let (mut client, id) = open(gateway.addr).await;
    let latencies = echo_turns(&mut client, 3).await;
    finish(&mut client).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        collector.requests(),
        0,
        "nothing sent before the batch is due"
    );

    gateway.stop().await;
    let spans = collector.spans();
    let turns = named(&spans, "turn", &id);
    assert_eq!(turns.len(), 3, "{spans:#?}");
    let exported: Vec<Value> = turns
        .iter()
        .map(|t| attr(t, "turn.first_byte_ms"))
        .collect();
    assert_eq!(
        exported,
        latencies.iter().map(|ms| json!(ms)).collect::<Vec<_>>()
    );
    for (n, turn) in turns.iter().enumerate() {
        assert_eq!(attr(turn, "turn.id"), json!(n + 1));
        assert_eq!(
            attr(turn, "turn.first_voice_ms"),
            attr(turn, "turn.first_byte_ms")
        );
        assert_eq!(attr(turn, "engine"), "scripted");
    }
    assert_eq!(named(&spans, "conversation", &id).len(), 1);
    // Text logs by default, the conversation named on its lines.
    let stderr = gateway.stderr();
    let marker = format!("conversation.id={id}");
    let turn_lines = stderr
        .iter()
        .filter(|l| l.contains(&marker) && l.contains(": turn turn_id="))
        .count();
    assert_eq!(turn_lines, 3, "{stderr:#?}");
    assert!(stderr.iter().any(|l| l.contains("span export stopped")
        && l.contains("exported_spans=4")
        && l.contains("dropped_spans=0")));
}

/// A collector that hangs or fails: every turn is as prompt as ever, the
/// gateway still stops in time, and the cost is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_hangs_or_fails_slows_no_conversation() {
    for answer in [Answer::Hang, Answer::Fail] {
        let collector = Collector::start(answer).await;
        let url = collector.url();
        let env = [
            ("SONORA_TELEMETRY_OTLP_ENDPOINT", url.as_str()),
            ("SONORA_TELEMETRY_OTLP_BATCH_MS", "50"),
            ("SONORA_TELEMETRY_OTLP_TIMEOUT_MS", "60000"),
            ("SONORA_TELEMETRY_OTLP_QUEUE_SPANS", "2"),
        ];
        let args = ["--scripted-echo", "200:300", "--log-format", "json"];
        let mut gateway = Gateway::start(&args, &env).await;
        for _ in 0..3 {
            let (mut client, _) = open(gateway.addr).await;
            let latencies = echo_turns(&mut client, 6).await;
            assert!(
                latencies.iter().all(|&ms| ms < 1_000),
                "{answer:?}: {latencies:?}"
            );
            finish(&mut client).await;
        }
        // The collector has been asked; a request that hangs holds the rest.
        collector.wait_for(|spans| !spans.is_empty()).await;
        // `/metrics` counts what the export lost while it runs.
        let lost = |text: &str| {
            ["dropped", "failed"].iter().any(|what| {
                let name = format!("sonora_telemetry_spans_{what}_total ");
                text.lines()
                    .filter_map(|l| l.strip_prefix(&name))
                    .any(|n| n.trim().parse::<u64>().is_ok_and(|n| n > 0))
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let metrics = loop {
            let url = format!("http://{}/metrics", gateway.addr);
            let text = reqwest::get(url).await.unwrap().text().await.unwrap();
            if lost(&text) || tokio::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(lost(&metrics), "{answer:?}: {metrics}");
        assert!(
            metrics.contains("sonora_telemetry_spans_exported_total 0"),
            "{metrics}"
        );
        let elapsed = gateway.stop().await;
        assert!(
            elapsed < Duration::from_secs(12),
            "{answer:?}: stopping took {elapsed:?}"
        );
        let summary = gateway.export_summary();
        let count = |key: &str| summary[key].as_u64().unwrap();
        assert_eq!(count("exported_spans"), 0, "{summary}");
        match answer {
            // Queued behind the request that never ends: dropped.
            Answer::Hang => {
                assert!(collector.requests() <= 2, "{answer:?}: one held, one flush");
                assert!(
                    count("dropped_spans") > 0,
                    "{summary}\nrequests {}, spans {}\n{:#?}",
                    collector.requests(),
                    collector.spans().len(),
                    gateway.stderr()
                );
            }
            // Each batch refused: failed, and nothing waits long enough to drop.
            _ => {
                assert!(collector.requests() >= 2, "{answer:?}");
                assert!(count("failed_spans") > 0, "{summary}");
            }
        }
        let logs = gateway.json_logs();
        let warned = |l: &Value| {
            l["level"] == "WARN"
                && l["message"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("span export")
        };
        assert!(logs.iter().any(warned), "{answer:?}: {logs:#?}");
    }
}
