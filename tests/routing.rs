//! Several engine instances behind one gateway, each an OpenAI Realtime
//! engine against an in-suite service (WebSocket over TLS): conversations
//! fill the instances in priority order, a client arriving when all are
//! full waits and is told its place, and starts when a place frees; an
//! instance whose service throttles gets no new conversations while it
//! cools down; and a conversation whose instance fails goes on with
//! another at a turn boundary, carrying the conversation as text.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

mod common;
#[path = "common/openai.rs"]
mod openai;
#[path = "common/talk.rs"]
mod talk;

use std::sync::Arc;
use std::time::Duration;

use common::gateway::{self, Client, Frame, metric};
use openai::{Plan, Service, Turn};
use serde_json::{Value, json};
use sonora::config::Config;
use sonora::engine::openai_realtime::OpenAiRealtimeEngine;
use sonora::engine::pool::{InstanceSpec, Pool, PoolSettings};

const QUESTION: &str = "¿Cuál es el horario de la biblioteca?";
const ANSWER: &str = "La biblioteca abre de lunes a viernes de ocho a veintidós horas.";
const FOLLOW_UP: &str = "¿Y los sábados?";
const FOLLOW_UP_ANSWER: &str = "Los sábados abre de nueve a trece horas.";

fn instance(name: &str, service: &Service, max_concurrent: u32, priority: i32) -> InstanceSpec {
    let mut settings = openai::settings(service);
    settings.max_retries = 0;
    InstanceSpec {
        name: name.to_owned(),
        engine: Arc::new(OpenAiRealtimeEngine::new(settings, None).unwrap()),
        max_concurrent,
        priority,
    }
}

fn settings() -> PoolSettings {
    PoolSettings {
        queue_max: 2,
        queue_timeout: Duration::from_secs(60),
        failover: true,
        failure_cooldown: Duration::from_secs(30),
    }
}

fn answering(turns: Vec<(&'static str, &'static str)>) -> Plan {
    Plan {
        refuse: None,
        turns: turns
            .into_iter()
            .map(|(heard, text)| Turn::Answer {
                heard,
                text,
                reply_ms: 600,
            })
            .collect(),
    }
}

async fn serve(pool: Pool) -> gateway::Running {
    let mut config = Config::default();
    config.engine.kind = sonora::config::EngineKind::OpenaiRealtime;
    let running = gateway::start(&config, None).await;
    running.server.set_pool(pool).unwrap();
    running
}

async fn hello(running: &gateway::Running) -> Client {
    let mut client = running.client().await;
    client.hello_pcm().await;
    client
}

/// The `ready` (after any `queued`), as JSON.
async fn ready(client: &mut Client) -> Value {
    let frames = client.until(|f| f.is("ready")).await;
    frames.last().unwrap().json().clone()
}

async fn queued(client: &mut Client) -> (u64, u64) {
    let frame = client.next().await;
    assert!(frame.is("queued"), "{frame:?}");
    let j = frame.json();
    (
        j["position"].as_u64().unwrap(),
        j["waiting"].as_u64().unwrap(),
    )
}

/// One user turn in real time: 0.8 s of speech, then quiet; the frames up
/// to its `turn_end`.
async fn turn(client: &mut Client) -> Vec<Frame> {
    gateway::spoken_turn(client, talk::tone_frame).await
}

fn said(frames: &[Frame], role: &str) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.is("transcript") && f.json()["role"] == role && f.json()["stage"] == "final")
        .map(|f| f.json()["text"].as_str().unwrap().to_owned())
        .collect()
}

async fn stop(client: &mut Client) {
    client.send_json(json!({"type": "stop"})).await;
    client.until(|f| f.is("end")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_client_waits_for_a_place_told_its_position() {
    let service = Service::start(vec![answering(vec![(QUESTION, ANSWER)])]).await;
    let pool = Pool::new(
        vec![
            instance("openai-b", &service, 1, 1),
            instance("openai-a", &service, 1, 0),
        ],
        settings(),
    );
    let running = serve(pool).await;

    let mut first = hello(&running).await;
    assert_eq!(ready(&mut first).await["engine"], "openai-a");
    let mut second = hello(&running).await;
    assert_eq!(ready(&mut second).await["engine"], "openai-b");
    let mut third = hello(&running).await;
    assert_eq!(queued(&mut third).await, (1, 1));
    let mut fourth = hello(&running).await;
    assert_eq!(queued(&mut fourth).await, (2, 2));
    // Audio while waiting is dropped unheard, a flood of it too.
    third.send_pcm(&talk::tone_frame(0)).await;
    for _ in 0..200 {
        fourth.send_binary(vec![0x55; 16 * 1024]).await;
    }
    let text = running.metrics().await;
    assert_eq!(metric(&text, "sonora_engine_queue_waiting"), 2.0, "{text}");
    let info: Value = reqwest::get(running.url("/api/engine"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["queue"]["waiting"], 2, "{info}");
    let instances = info["instances"].as_array().unwrap();
    assert_eq!(instances[0]["name"], "openai-a");
    assert_eq!(instances[0]["active"], 1);
    assert_eq!(instances[0]["available"], false);

    // The first conversation ends: the third takes its place, and the
    // fourth moves up.
    let frames = turn(&mut first).await;
    assert_eq!(said(&frames, "assistant"), [ANSWER]);
    stop(&mut first).await;
    assert_eq!(ready(&mut third).await["engine"], "openai-a");
    assert_eq!(queued(&mut fourth).await, (1, 1));
    let frames = turn(&mut third).await;
    assert_eq!(said(&frames, "user"), [QUESTION]);
    // The fourth gives up: the queue is empty again.
    fourth.close_normally().await;
    stop(&mut second).await;
    stop(&mut third).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = running.metrics().await;
        let idle = metric(
            &text,
            "sonora_engine_instance_active{instance=\"openai-a\",kind=\"openai-realtime\"}",
        ) == 0.0;
        if (idle && metric(&text, "sonora_engine_queue_waiting") == 0.0)
            || tokio::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metric(&text, "sonora_engine_queue_waiting"), 0.0, "{text}");
    assert_eq!(metric(&text, "sonora_engine_queued_total"), 2.0, "{text}");
    assert_eq!(
        metric(&text, "sonora_engine_queue_wait_seconds_count"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "sonora_engine_instance_started_total{instance=\"openai-a\",kind=\"openai-realtime\"}"
        ),
        2.0,
        "{text}"
    );
    // Each instance's cost, by modality.
    assert!(
        metric(
            &text,
            "sonora_engine_instance_cost_micro_usd_total{instance=\"openai-a\",kind=\"openai-realtime\",modality=\"speech\"}"
        ) > 0.0,
        "{text}"
    );
    // Three conversations reached the service; the fourth never did.
    assert_eq!(service.connections().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_instance_gets_no_new_conversations_while_it_cools_down() {
    let throttled = Service::start(vec![Plan {
        refuse: Some(429),
        turns: vec![],
    }])
    .await;
    let backup = Service::start(vec![answering(vec![(QUESTION, ANSWER)])]).await;
    let pool = Pool::new(
        vec![
            instance("primary", &throttled, 0, 0),
            instance("backup", &backup, 0, 1),
        ],
        settings(),
    );
    let running = serve(pool).await;

    // The first conversation meets the throttling and goes on with the
    // backup before its first turn.
    let mut first = hello(&running).await;
    assert_eq!(ready(&mut first).await["engine"], "primary");
    let moved = first.until(|f| f.is("rotated")).await;
    assert_eq!(moved.last().unwrap().json()["engine"], "backup");
    let frames = turn(&mut first).await;
    assert_eq!(said(&frames, "assistant"), [ANSWER]);
    // While the primary cools down, new conversations go straight to the
    // backup: the throttling service hears of no one else.
    let mut second = hello(&running).await;
    assert_eq!(ready(&mut second).await["engine"], "backup");
    assert_eq!(throttled.connections().len(), 1);
    let text = running.metrics().await;
    let primary = "{instance=\"primary\",kind=\"openai-realtime\"}";
    assert_eq!(
        metric(&text, &format!("sonora_engine_instance_available{primary}")),
        0.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!("sonora_engine_instance_failed_total{primary}")
        ),
        1.0,
        "{text}"
    );
    stop(&mut first).await;
    stop(&mut second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_instance_hands_the_conversation_on_with_its_history() {
    // The first service answers once, drops the connection on the next
    // turn and refuses to take it back; the second answers.
    let failing = Service::start(vec![
        Plan {
            refuse: None,
            turns: vec![
                Turn::Answer {
                    heard: QUESTION,
                    text: ANSWER,
                    reply_ms: 600,
                },
                Turn::Drop { heard: FOLLOW_UP },
            ],
        },
        Plan {
            refuse: Some(500),
            turns: vec![],
        },
    ])
    .await;
    let backup = Service::start(vec![answering(vec![(FOLLOW_UP, FOLLOW_UP_ANSWER)])]).await;
    let pool = Pool::new(
        vec![
            instance("primary", &failing, 0, 0),
            instance("backup", &backup, 0, 1),
        ],
        settings(),
    );
    let running = serve(pool).await;

    let mut client = hello(&running).await;
    assert_eq!(ready(&mut client).await["engine"], "primary");
    let frames = turn(&mut client).await;
    assert_eq!(said(&frames, "assistant"), [ANSWER]);
    let first_turn = frames.last().unwrap().json()["turn"].as_u64().unwrap();
    // The next turn is cut short by the failure: it ends as an error, and
    // the conversation moves on.
    let frames = turn(&mut client).await;
    let end = frames.last().unwrap().json();
    assert_eq!(end["reason"], "error", "{frames:?}");
    let moved = client.until(|f| f.is("rotated")).await;
    let moved = moved.last().unwrap().json().clone();
    assert_eq!(moved["engine"], "backup", "{moved}");
    assert_eq!(moved["generation"], 1);
    assert_eq!(moved["voice"], "marin");
    // The user asks again, on the backup, which knows the conversation.
    let frames = turn(&mut client).await;
    assert_eq!(said(&frames, "assistant"), [FOLLOW_UP_ANSWER]);
    let later_turn = frames.last().unwrap().json()["turn"].as_u64().unwrap();
    assert!(
        later_turn > first_turn + 1,
        "{later_turn} after {first_turn}"
    );
    let carried: Vec<String> = backup.connections()[0]
        .of_type("conversation.item.create")
        .iter()
        .map(|e| {
            e["item"]["content"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert!(carried.iter().any(|t| t == QUESTION), "{carried:?}");
    assert!(carried.iter().any(|t| t == ANSWER), "{carried:?}");
    stop(&mut client).await;
    let text = running.metrics().await;
    assert_eq!(
        metric(&text, "sonora_engine_failovers_total"),
        1.0,
        "{text}"
    );
}

/// A directory holding `sonora.toml` with two OpenAI Realtime instances on
/// `service`, the second with `second_key`.
fn config_dir(service: &Service, tag: &str, second_key: &str) -> common::scratch::Scratch {
    let dir = common::scratch::Scratch::new(&format!("routing-{tag}"));
    let ca = service.ca_file.display().to_string();
    let config = format!(
        r#"
[engine]
kind = "openai-realtime"

[[engine.instances]]
name = "first"
kind = "openai-realtime"
max_concurrent = 2
endpoint_url = "{url}"
ca_file = "{ca}"
api_key = "{key}"

[[engine.instances]]
name = "second"
kind = "openai-realtime"
priority = 1
endpoint_url = "{url}"
ca_file = "{ca}"
api_key = "{second_key}"
voice = "cedar"
"#,
        url = service.url,
        key = openai::KEY,
    );
    std::fs::write(dir.join("sonora.toml"), config).unwrap();
    dir
}

/// `sonora doctor` on [`config_dir`]: its stdout and whether it passed.
async fn doctor(service: &Service, second_key: &str) -> (bool, String) {
    let dir = config_dir(service, &format!("doctor-{second_key}"), second_key);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
        .current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &dir)
        .args([
            "--config",
            "sonora.toml",
            "--set",
            "local.model_dir=no-model",
        ])
        .arg("doctor")
        .output()
        .await
        .unwrap();
    drop(dir);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success(), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sonora_serve_routes_over_the_instances_of_its_config_file() {
    use std::io::BufRead as _;
    let service = Service::start(vec![answering(vec![(QUESTION, ANSWER)])]).await;
    let dir = config_dir(&service, "serve", openai::KEY);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
        .current_dir(&dir)
        .args([
            "--config",
            "sonora.toml",
            "serve",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--ledger", "off"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .parse()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info: Value = reqwest::get(format!("http://{addr}/api/engine"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if info["ready"] == true || tokio::time::Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info["ready"], true, "{info}");
    let instances = info["instances"].as_array().unwrap();
    let names: Vec<&str> = instances
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "second"], "{info}");
    assert_eq!(instances[0]["max_concurrent"], 2);
    assert_eq!(instances[1]["max_concurrent"], Value::Null);
    assert_eq!(instances[0]["kind"], "openai-realtime");
    // A hello may name an instance; its own settings (the voice) apply.
    let mut client = Client::connect(addr).await;
    client
        .send_json(json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 16000}, "engine": "second"}))
        .await;
    let ready = ready(&mut client).await;
    assert_eq!(
        (ready["engine"].as_str(), ready["voice"].as_str()),
        (Some("second"), Some("cedar")),
        "{ready}"
    );
    let frames = turn(&mut client).await;
    assert_eq!(said(&frames, "assistant"), [ANSWER]);
    stop(&mut client).await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_naming_no_engine_here_is_told_the_choices() {
    let service = Service::start(vec![answering(vec![(QUESTION, ANSWER)])]).await;
    let pool = Pool::new(vec![instance("east", &service, 1, 0)], settings());
    let running = serve(pool).await;
    let mut client = running.client().await;
    let hello = |engine: Value| json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 16000}, "engine": engine});
    client.send_json(hello(json!("west"))).await;
    let error = client
        .until(|f| f.is("error"))
        .await
        .last()
        .unwrap()
        .json()
        .clone();
    assert_eq!(error["code"], "unknown_engine", "{error}");
    assert_eq!(error["fatal"], false, "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("east"),
        "{error}"
    );
    for bad in [json!(7), json!("x".repeat(300))] {
        client.send_json(hello(bad)).await;
        assert_eq!(client.error_code().await, "bad_message");
    }
    // The same socket may try again, by kind this time.
    client.send_json(hello(json!("openai-realtime"))).await;
    assert_eq!(ready(&mut client).await["engine"], "east");
    stop(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_opens_a_session_on_each_instance() {
    let service = Service::start(vec![answering(vec![(QUESTION, ANSWER)])]).await;
    let (passed, stdout) = doctor(&service, openai::KEY).await;
    assert!(passed, "{stdout}");
    assert!(
        stdout.contains(
            "ok      instance first (openai-realtime, at most 2): gpt-realtime took the key"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("instance second (openai-realtime, no limit)"),
        "{stdout}"
    );
    assert_eq!(service.connections().len(), 2);
    // A key the service refuses fails the check, naming the instance.
    let (passed, stdout) = doctor(&service, "sk-wrong").await;
    assert!(!passed, "{stdout}");
    assert!(stdout.contains("REFUSED instance second"), "{stdout}");
}
