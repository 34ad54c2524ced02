//! Conversations that survive a dropped connection: a TCP proxy between
//! client and gateway is cut in the middle of a reply, the client comes
//! back with its `resume` secret, and gets the rest of the reply and the
//! transcript, nothing twice; a window that passes ends the conversation
//! as `resume_expired` (in the ledger too); wrong secrets and impossible
//! `last_seq`s are refused without touching the conversation; and the web
//! page, in Chromium, comes back by itself.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::browser::{
    check_closed, check_page, line, one_browser, run_node, tone_frame, typed_question,
};
use common::gateway::{Client, Frame, metric, start};
use common::proxy::Proxy;
use serde_json::{Value, json};
use sonora::config::{Config, LedgerConfig};
use sonora::engine::scripted::{ScriptedEngine, Step};
use sonora::engine::{EngineEvent, Pcm, Role, TurnEndReason};
use sonora::ledger::Ledger;
use sonora::usage::UsageDelta;

/// Reply frames of 40 ms at 24 kHz; frame `i` holds the sample value `i + 1`.
const REPLY_FRAMES: usize = 50;
const FRAME_SAMPLES: usize = 960;

fn ready() -> EngineEvent {
    EngineEvent::Ready {
        engine: "scripted".into(),
        model: "paid".into(),
        voice: "tone".into(),
    }
}

/// One turn: after 400 ms of the user's audio, a 2 s reply paced over about
/// a second, its transcript, its cost and its end.
fn one_turn() -> Vec<Step> {
    let mut steps = vec![
        Step::Emit(ready()),
        Step::AwaitAudioMs(400),
        Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 }),
        line(Role::User, "¿Dónde está la biblioteca?", 1),
    ];
    for i in 0..REPLY_FRAMES {
        steps.push(Step::Emit(EngineEvent::Audio(Pcm {
            samples: vec![i as i16 + 1; FRAME_SAMPLES],
            rate_hz: 24_000,
        })));
        steps.push(Step::Sleep(Duration::from_millis(20)));
    }
    steps.extend([
        line(Role::Assistant, "En el edificio central, segundo piso.", 1),
        Step::Emit(EngineEvent::Usage(UsageDelta {
            cost_micro_usd: 1_234,
            ..UsageDelta::default()
        })),
        Step::Emit(EngineEvent::TurnEnd {
            turn_id: 1,
            reason: TurnEndReason::Completed,
        }),
    ]);
    steps
}

/// What a client has seen of its conversation, over every socket.
#[derive(Default)]
struct Seen {
    last_seq: u64,
    audio: Vec<i16>,
    messages: Vec<Value>,
}

impl Seen {
    /// Takes one frame, checking that it is the next of the conversation.
    fn take(&mut self, frame: &Frame) {
        match frame {
            Frame::Audio(samples) => {
                self.last_seq += 1;
                self.audio.extend_from_slice(samples);
            }
            Frame::Json(message) => {
                let seq = message["seq"].as_u64().expect("a numbered frame");
                assert_eq!(
                    seq,
                    self.last_seq + 1,
                    "frames in order, none twice: {message}"
                );
                self.last_seq = seq;
                self.messages.push(message.clone());
            }
            Frame::Closed(_) => {}
        }
    }

    fn of(&self, kind: &str) -> Vec<&Value> {
        self.messages.iter().filter(|m| m["type"] == kind).collect()
    }
}

async fn speak(client: &mut Client, ms: usize) {
    for _ in 0..ms / 20 {
        client.send_pcm(&[300i16; 320]).await;
    }
}

fn resume_hello(secret: &str, last_seq: u64) -> Value {
    json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 16000},
           "resume": secret, "last_seq": last_seq})
}

/// A gateway on `config` (and `ledger`) playing [`one_turn`], and a client
/// through a proxy with its conversation's `ready`.
async fn conversing(
    config: &Config,
    ledger: Option<Ledger>,
) -> (common::gateway::Running, Proxy, Client, Value) {
    let engine = ScriptedEngine::new(one_turn());
    let gateway = start(config, Some(Arc::new(engine))).await;
    if let Some(ledger) = ledger {
        gateway.server.set_ledger(ledger).unwrap();
    }
    let proxy = Proxy::to(gateway.addr).await;
    let mut client = proxy.client(gateway.addr).await;
    client.hello_pcm().await;
    let ready = client.until(|f| f.is("ready")).await;
    let ready = ready.last().unwrap().json().clone();
    (gateway, proxy, client, ready)
}

#[tokio::test]
async fn a_reply_cut_in_the_middle_arrives_whole_after_the_client_comes_back() {
    let engine = ScriptedEngine::new(one_turn());
    let gateway = start(&Config::default(), Some(Arc::new(engine))).await;
    let proxy = Proxy::to(gateway.addr).await;
    let mut client = proxy.client(gateway.addr).await;
    client.hello_pcm().await;
    let mut seen = Seen::default();
    let ready = client.next().await;
    seen.take(&ready);
    assert!(ready.is("ready"), "{ready:?}");
    let secret = ready.json()["resume"].as_str().unwrap().to_owned();
    assert!(secret.len() >= 32, "a secret worth the name: {secret}");
    speak(&mut client, 500).await;
    // A quarter of the reply arrives, then the network drops.
    while seen.audio.len() < REPLY_FRAMES * FRAME_SAMPLES / 4 {
        seen.take(&client.next().await);
    }
    proxy.cut();
    let before_cut = seen.audio.len();
    // The conversation waits for its client, with the engine going on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "sonora_sessions_detached"), 1.0);
    assert_eq!(metric(&metrics, "sonora_sessions_active"), 1.0);

    // The frames read off the old socket before the cut may be fewer than
    // the server wrote: what the client says it has is what counts.
    let mut client = gateway.client().await;
    client.send_json(resume_hello(&secret, seen.last_seq)).await;
    loop {
        let frame = client.next().await;
        assert!(!matches!(frame, Frame::Closed(_)), "closed: {frame:?}");
        seen.take(&frame);
        if frame.is("turn_end") {
            break;
        }
    }
    let resumed = seen.of("resumed");
    assert_eq!(resumed.len(), 1, "{:?}", seen.messages);
    assert_eq!(resumed[0]["skipped"], 0);
    assert_eq!(resumed[0]["skipped_audio_ms"], 0);
    assert_eq!(resumed[0]["session"], seen.messages[0]["session"]);
    assert!(resumed[0]["replayed"].as_u64().unwrap() > 0);
    // Every sample of the reply, in order, none twice.
    let expected: Vec<i16> = (0..REPLY_FRAMES)
        .flat_map(|i| vec![i as i16 + 1; FRAME_SAMPLES])
        .collect();
    assert!(before_cut < expected.len());
    assert_eq!(seen.audio.len(), expected.len());
    assert!(
        seen.audio == expected,
        "the reply arrived whole and in order"
    );
    // The transcript goes on where it was: each line once.
    let lines: Vec<&str> = seen
        .of("transcript")
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            "¿Dónde está la biblioteca?",
            "En el edificio central, segundo piso."
        ]
    );
    assert_eq!(seen.of("usage")[0]["total"]["cost_micro_usd"], 1_234);

    // The same conversation goes on: it hears the client and ends as asked.
    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "sonora_sessions_detached"), 0.0);
    assert_eq!(metric(&metrics, "sonora_resumes_total"), 1.0);
    client.send_json(json!({"type": "stop"})).await;
    loop {
        let frame = client.next().await;
        seen.take(&frame);
        if frame.is("end") {
            break;
        }
    }
    let end = seen.of("end")[0].clone();
    assert_eq!(end["reason"], "client_stopped");
    assert_eq!(end["summary"]["usage"]["cost_micro_usd"], 1_234);
    assert_eq!(end["summary"]["turns"], 1);
}

#[tokio::test]
async fn a_client_that_does_not_come_back_ends_as_resume_expired() {
    let dir = common::scratch::Scratch::new("resume-test");
    let ledger = Ledger::open(&LedgerConfig {
        url: format!("sqlite://{}", dir.join("ledger.db").display()),
        gateway_name: "test".into(),
        ..LedgerConfig::default()
    })
    .await
    .unwrap();
    let mut config = Config::default();
    config.server.resume_window_ms = 600;
    let (gateway, proxy, mut client, ready) = conversing(&config, Some(ledger.clone())).await;
    let secret = ready["resume"].as_str().unwrap().to_owned();
    let session = ready["session"].as_str().unwrap().to_owned();

    // A wrong secret, and a frame the conversation never sent, are
    // refused; the conversation is not touched.
    let mut stranger = gateway.client().await;
    stranger.send_json(resume_hello("not-the-secret", 0)).await;
    assert_eq!(stranger.error_code().await, "resume_failed");
    assert!(matches!(
        stranger.next().await,
        Frame::Closed(Some((1008, _)))
    ));
    let mut confused = gateway.client().await;
    confused.send_json(resume_hello(&secret, 1_000_000)).await;
    assert_eq!(confused.error_code().await, "resume_failed");
    speak(&mut client, 500).await;
    client.until(|f| f.is("speech")).await;

    // The client goes away for good.
    proxy.cut();
    let metrics = gateway.metrics_when_active(0.0).await;
    assert_eq!(metric(&metrics, "sonora_sessions_active"), 0.0, "{metrics}");
    assert!(
        metrics.contains("sonora_sessions_closed_total{reason=\"resume_expired\"} 1"),
        "{metrics}"
    );
    let row = common::ended_row(&ledger, &session).await;
    assert_eq!(row.end_reason.as_deref(), Some("resume_expired"));
    // The reply made while the client was away was paid for, and recorded.
    assert_eq!(row.cost_micro_usd, 1_234);

    // Too late: the secret names nothing now.
    let mut late = gateway.client().await;
    late.send_json(resume_hello(&secret, 1)).await;
    assert_eq!(late.error_code().await, "resume_failed");
}

/// A socket that says it is re-attaching (`/ws?resume`).
async fn resuming(addr: std::net::SocketAddr) -> Client {
    let url = format!("ws://{addr}/ws?resume");
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .unwrap();
    Client { ws }
}

#[tokio::test]
async fn a_full_server_still_takes_back_a_returning_client() {
    let mut config = Config::default();
    config.server.max_sessions = 1;
    let (gateway, proxy, _client, ready) = conversing(&config, None).await;
    let secret = ready["resume"].as_str().unwrap().to_owned();
    proxy.cut();

    // The one place is the conversation's: a newcomer is refused at once,
    // and so is one that says it is returning but is not.
    let refused = |frame: Frame| match frame {
        Frame::Closed(Some((1013, reason))) => assert!(reason.contains("busy"), "{reason}"),
        other => panic!("{other:?}"),
    };
    refused(gateway.client().await.next().await);
    let mut pretender = resuming(gateway.addr).await;
    pretender.hello_pcm().await;
    refused(pretender.next().await);

    // The conversation's own client gets back in, and goes on.
    let mut back = resuming(gateway.addr).await;
    back.send_json(resume_hello(&secret, 1)).await;
    back.until(|f| f.is("resumed")).await;
    speak(&mut back, 500).await;
    let frames = back.until(|f| f.is("turn_end")).await;
    assert_eq!(
        common::gateway::audio_samples(&frames),
        REPLY_FRAMES * FRAME_SAMPLES
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "sonora_resumes_total"), 1.0);
    assert_eq!(
        metric(&metrics, "sonora_sessions_refused_total{reason=\"busy\"}"),
        2.0
    );
}

#[tokio::test]
async fn a_closed_socket_or_stop_ends_at_once_and_a_zero_window_keeps_nothing() {
    // A close frame is a client leaving, not a network dropping.
    let gateway = start(
        &Config::default(),
        Some(Arc::new(ScriptedEngine::new(one_turn()))),
    )
    .await;
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    client.close_normally().await;
    let metrics = gateway.metrics_when_active(0.0).await;
    assert_eq!(metric(&metrics, "sonora_sessions_active"), 0.0, "{metrics}");
    assert_eq!(metric(&metrics, "sonora_sessions_detached"), 0.0);

    // With no window, a dropped connection ends its conversation and
    // `ready` offers no secret; frames are still numbered.
    let mut config = Config::default();
    config.server.resume_window_ms = 0;
    let gateway = start(&config, Some(Arc::new(ScriptedEngine::new(one_turn())))).await;
    let proxy = Proxy::to(gateway.addr).await;
    let mut client = proxy.client(gateway.addr).await;
    client.hello_pcm().await;
    let ready = client.until(|f| f.is("ready")).await;
    let ready = ready.last().unwrap().json();
    assert_eq!(ready["seq"], 1);
    assert!(ready.get("resume").is_none(), "{ready}");
    proxy.cut();
    let metrics = gateway.metrics_when_active(0.0).await;
    assert_eq!(metric(&metrics, "sonora_sessions_active"), 0.0, "{metrics}");
}

/// The page's connection is cut in the middle of a reply (a TCP proxy sits
/// between Chromium and the gateway): the page says it is reconnecting,
/// re-attaches by itself, and gets the rest of the reply and the transcript,
/// nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_comes_back_by_itself_when_its_connection_drops_mid_reply() {
    let Some(_one_browser) = one_browser(None).await else {
        return;
    };
    let question = "¿A qué hora abre la biblioteca?";
    let answer = "Abre a las ocho de la mañana.";
    let mut script = typed_question(question);
    // 2 s of reply over about 2 s, the transcript after it.
    for _ in 0..20 {
        script.push(Step::Emit(tone_frame()));
        script.push(Step::Sleep(Duration::from_millis(100)));
    }
    script.push(line(Role::Assistant, answer, 1));
    script.push(Step::Emit(EngineEvent::TurnEnd {
        turn_id: 1,
        reason: TurnEndReason::Completed,
    }));
    let engine = ScriptedEngine::new(script);
    let mut config = Config::default();
    // The page is served through the proxy's port.
    config.server.allowed_hosts = vec!["127.0.0.1".into()];
    let gateway = start(&config, Some(Arc::new(engine.clone()))).await;
    let proxy = Proxy::to(gateway.addr).await;
    let url = format!("http://{}", proxy.addr);
    let run =
        tokio::task::spawn_blocking(move || run_node("resume.mjs", &[&url, question], "resume"));
    // Once the question is in and half a second of the reply has gone out,
    // the network drops.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while engine.received().texts.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no question came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.cut();
    let result = match run.await.unwrap() {
        Ok(result) => result,
        Err(failure) => panic!("{failure}\nserver metrics:\n{}", gateway.metrics().await),
    };
    eprintln!("resume: {result}");
    let away = result["seenWhileAway"].as_str().unwrap_or_default();
    assert!(away.contains("reconectando"), "{result:#}");
    assert_eq!(result["resumes"], 1, "{result:#}");
    // The whole reply, once: 2 s at 24 kHz.
    assert_eq!(result["received"], 48_000, "{result:#}");
    assert_eq!(result["receivedSamples"], 48_000, "{result:#}");
    let lines: Vec<(String, String)> = result["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let field = |name: &str| l[name].as_str().unwrap_or_default().to_owned();
            (field("role"), field("text"))
        })
        .collect();
    assert_eq!(
        lines,
        [
            ("user".to_owned(), question.to_owned()),
            ("assistant".to_owned(), answer.to_owned()),
        ],
        "{result:#}"
    );
    assert_eq!(result["statusAfter"], "", "{result:#}");
    assert_eq!(result["end"]["reason"], "client_stopped", "{result:#}");
    let metrics = gateway.metrics().await;
    assert_eq!(metric(&metrics, "sonora_resumes_total"), 1.0);
    check_page(&result);
    check_closed(&result, false);
}
