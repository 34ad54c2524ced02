//! The web gateway over real sockets with a scripted engine: every protocol
//! error code, admission, origins, auth, slow readers, shutdown, and the
//! HTTP endpoints.

#![allow(
    clippy::unwrap_used,
    reason = "a test helper that fails must fail the test"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::gateway::{Frame, metric, start};
use serde_json::json;
use sonora::config::Config;
use sonora::engine::scripted::{ScriptedEngine, Step};
use sonora::engine::{
    ConversationOptions, Engine, EngineEvent, EngineSession, ErrorKind, Pcm, StartError, Voice,
};

fn echo() -> Option<Arc<dyn Engine>> {
    Some(Arc::new(ScriptedEngine::echo_turns(400, 200)))
}

fn ready() -> EngineEvent {
    EngineEvent::Ready {
        engine: "scripted".into(),
        model: "script".into(),
        voice: "tone".into(),
    }
}

/// An engine that offers two voices.
struct Voiced(ScriptedEngine);

impl Engine for Voiced {
    fn name(&self) -> &'static str {
        "voiced"
    }
    fn voices(&self) -> Vec<Voice> {
        vec![Voice::new("a", "A", "es"), Voice::new("b", "B", "en")]
    }
    fn start(&self, options: ConversationOptions) -> Result<EngineSession, StartError> {
        self.0.start(options)
    }
}

/// An engine that cannot start conversations.
struct Broken;

impl Engine for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn start(&self, _: ConversationOptions) -> Result<EngineSession, StartError> {
        Err(StartError::Unavailable("no capacity left upstream".into()))
    }
}

#[tokio::test]
async fn a_pcm_conversation_gets_ready_audio_usage_latency_and_end() {
    let gateway = start(&Config::default(), echo()).await;
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    let ready = client.until(|f| f.is("ready")).await;
    let ready = ready.last().unwrap().json();
    assert_eq!(ready["version"], 1);
    assert_eq!(ready["engine"], "scripted");
    assert_eq!(ready["output"]["rate"], 24_000);
    assert_eq!(ready["input"], "pcm16/16000");
    // 0.5 s of audio: one 400 ms turn, answered with 200 ms of tone.
    for _ in 0..25 {
        client.send_pcm(&[100i16; 320]).await;
    }
    let frames = client.until(|f| f.is("turn_end")).await;
    let audio = common::gateway::audio_samples(&frames);
    assert_eq!(audio, 24_000 / 5, "200 ms of reply at 24 kHz");
    let latency = frames
        .iter()
        .position(|f| f.is("latency"))
        .expect("latency");
    let first_audio = frames
        .iter()
        .position(|f| matches!(f, Frame::Audio(_)))
        .unwrap();
    assert!(latency < first_audio, "{frames:?}");
    assert!(frames.iter().any(|f| f.is("speech")));
    client.send_json(json!({"type": "stop"})).await;
    let rest = client.until(|f| f.is("end")).await;
    let end = rest.last().unwrap().json();
    assert_eq!(end["reason"], "client_stopped");
    assert_eq!(end["summary"]["turns"], 1);
    assert!(rest.iter().any(|f| f.is("usage")) || frames.iter().any(|f| f.is("usage")));
    assert_eq!(
        client.next().await,
        Frame::Closed(Some((1000, "client_stopped".into())))
    );

    let text = gateway.metrics_when_active(0.0).await;
    assert_eq!(metric(&text, "sonora_sessions_total"), 1.0);
    assert_eq!(metric(&text, "sonora_sessions_active"), 0.0);
    assert_eq!(metric(&text, "sonora_audio_in_seconds_total"), 0.5);
    assert_eq!(metric(&text, "sonora_audio_out_seconds_total"), 0.2);
    assert_eq!(metric(&text, "sonora_turn_latency_seconds_count"), 1.0);
    assert_eq!(
        metric(
            &text,
            "sonora_sessions_closed_total{reason=\"client_stopped\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn malformed_frames_are_errors_and_the_session_goes_on() {
    let engine: Arc<dyn Engine> = Arc::new(Voiced(ScriptedEngine::echo_turns(400, 200)));
    let gateway = start(&Config::default(), Some(engine)).await;
    let mut client = gateway.client().await;
    // Before hello.
    client.send_binary(vec![0; 640]).await;
    assert_eq!(client.error_code().await, "hello_first");
    client
        .send_json(json!({"type": "text", "text": "hola"}))
        .await;
    assert_eq!(client.error_code().await, "hello_first");
    // Broken hellos, each refused with its code, then a good one.
    let cases = [
        ("{not json", "bad_json"),
        ("[1]", "bad_json"),
        (r#"{"kind":"hello"}"#, "bad_message"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (
            r#"{"type":"hello","version":9,"audio":{"format":"pcm16","rate":16000}}"#,
            "unsupported_version",
        ),
        (
            r#"{"type":"hello","version":1,"audio":{"format":"aac"}}"#,
            "unsupported_audio",
        ),
        (
            r#"{"type":"hello","version":1,"audio":{"format":"pcm16","rate":1}}"#,
            "unsupported_audio",
        ),
        (
            r#"{"type":"hello","version":1,"audio":{"format":"webm"},"voice":"zz"}"#,
            "unknown_voice",
        ),
    ];
    for (text, code) in cases {
        client.send_text(text).await;
        assert_eq!(client.error_code().await, code, "{text}");
    }
    client
        .send_json(json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 16000}, "voice": "b"}))
        .await;
    client.until(|f| f.is("ready")).await;
    // After hello.
    client.hello_pcm().await;
    assert_eq!(client.error_code().await, "duplicate_hello");
    client
        .send_json(json!({"type": "text", "text": "  "}))
        .await;
    assert_eq!(client.error_code().await, "bad_text");
    client.send_text("{oops").await;
    assert_eq!(client.error_code().await, "bad_json");
    client
        .send_json(json!({"type": "tool_result", "result": 1}))
        .await;
    assert_eq!(client.error_code().await, "bad_message");
    // Still usable: a turn is answered.
    for _ in 0..25 {
        client.send_pcm(&[100i16; 320]).await;
    }
    client.until(|f| f.is("turn_end")).await;
    let text = gateway.metrics().await;
    assert_eq!(
        metric(&text, "sonora_protocol_errors_total{code=\"bad_json\"}"),
        3.0
    );
    assert_eq!(
        metric(&text, "sonora_protocol_errors_total{code=\"hello_first\"}"),
        2.0
    );
}

#[tokio::test]
async fn engine_errors_warnings_and_bad_audio_have_codes() {
    // engine_unavailable
    let gateway = start(&Config::default(), Some(Arc::new(Broken))).await;
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    assert_eq!(client.error_code().await, "engine_unavailable");
    assert!(matches!(
        client.next().await,
        Frame::Closed(Some((1011, _)))
    ));

    // engine_error (not fatal), then engine_stall and uplink_dropped while
    // the engine stops reading for 1.5 s.
    let script = vec![
        Step::Emit(ready()),
        Step::Emit(EngineEvent::Error {
            kind: ErrorKind::Transient,
            message: "upstream hiccup".into(),
        }),
        Step::Stall(Duration::from_millis(1_500)),
    ];
    let gateway = start(
        &Config::default(),
        Some(Arc::new(ScriptedEngine::new(script))),
    )
    .await;
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    let frames = client.until(|f| f.is("error")).await;
    let error = frames.last().unwrap().json();
    assert_eq!(
        (error["code"].as_str(), error["fatal"].as_bool()),
        (Some("engine_error"), Some(false))
    );
    // 7 s of audio at once: the 5 s uplink overflows while the engine stalls.
    for _ in 0..350 {
        client.send_pcm(&[0i16; 320]).await;
    }
    let mut codes = Vec::new();
    while !(codes.contains(&"engine_stall".to_owned())
        && codes.contains(&"uplink_dropped".to_owned()))
    {
        codes.push(client.error_code().await);
    }

    // bad_audio: a WebM hello followed by bytes that are not WebM.
    let gateway = start(&Config::default(), echo()).await;
    let mut client = gateway.client().await;
    client
        .send_json(json!({"type": "hello", "version": 1, "audio": {"format": "webm"}}))
        .await;
    client.until(|f| f.is("ready")).await;
    client
        .send_binary(b"RIFF\x24\x00\x00\x00WAVEfmt this is not webm at all".to_vec())
        .await;
    assert_eq!(client.error_code().await, "bad_audio");
    let end = client.until(|f| f.is("end")).await;
    assert_eq!(end.last().unwrap().json()["reason"], "bad_audio");
}

#[tokio::test]
async fn a_chunk_over_the_decoder_cap_is_refused_and_the_stream_goes_on() {
    // A cap below the block size (the configuration check forbids this; the
    // server itself must still cope): a big block's pieces are refused.
    let mut config = Config::default();
    config.audio.decoder_input_cap_bytes = 64 * 1024;
    config.audio.max_block_bytes = 1024 * 1024;
    let gateway = start(&config, echo()).await;
    let mut client = gateway.client().await;
    client
        .send_json(json!({"type": "hello", "version": 1, "audio": {"format": "webm"}}))
        .await;
    client.until(|f| f.is("ready")).await;
    let webm = std::fs::read(common::root().join("tests/fixtures/chrome_5s.webm")).unwrap();
    // The whole recording: its last Cluster is still open.
    client.send_binary(webm).await;
    // Then a 200 KiB SimpleBlock in 10 KiB pieces.
    let mut block = vec![0xA3, 0x10, 0x03, 0x20, 0x00];
    block.extend(vec![0u8; 200 * 1024]);
    for piece in block.chunks(10 * 1024) {
        client.send_binary(piece.to_vec()).await;
    }
    let frames = client.until(|f| f.is("error")).await;
    let error = frames.last().unwrap().json();
    assert_eq!(error["code"], "chunk_refused", "{error}");
    assert_eq!(error["fatal"], false);
    let text = gateway.metrics().await;
    assert!(
        metric(&text, "sonora_decoder_bytes_refused_total") >= 10.0 * 1024.0,
        "{text}"
    );
    assert_eq!(metric(&text, "sonora_sessions_active"), 1.0);
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let mut config = Config::default();
    config.server.max_message_bytes = 64 * 1024;
    let gateway = start(&config, echo()).await;
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    client.send_binary(vec![0u8; 100 * 1024]).await;
    assert_eq!(client.error_code().await, "message_too_large");
    let closed = client.until(|f| matches!(f, Frame::Closed(_))).await;
    assert!(
        matches!(closed.last(), Some(Frame::Closed(Some((1009, _))))),
        "{closed:?}"
    );
}

#[tokio::test]
async fn frames_the_socket_library_refuses_are_still_told_and_closed_with_1009() {
    let mut config = Config::default();
    config.server.max_message_bytes = 16 * 1024;
    let gateway = start(&config, echo()).await;
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    // Over twice the limit: the socket library itself refuses the frame.
    client.send_binary(vec![0u8; 40 * 1024]).await;
    assert_eq!(client.error_code().await, "message_too_large");
    let closed = client.until(|f| matches!(f, Frame::Closed(_))).await;
    assert!(
        matches!(closed.last(), Some(Frame::Closed(Some((1009, _))))),
        "{closed:?}"
    );
}

#[tokio::test]
async fn hello_timeout_and_auth_close_with_1008() {
    let mut config = Config::default();
    config.server.hello_timeout_ms = 300;
    config.server.auth_tokens = vec!["s3cret".into()];
    let gateway = start(&config, echo()).await;
    let mut client = gateway.client().await;
    assert_eq!(client.error_code().await, "hello_timeout");
    assert!(matches!(
        client.next().await,
        Frame::Closed(Some((1008, _)))
    ));

    let mut client = gateway.client().await;
    client.hello_pcm().await;
    assert_eq!(client.error_code().await, "unauthorized");
    assert!(matches!(
        client.next().await,
        Frame::Closed(Some((1008, _)))
    ));

    let mut client = gateway.client().await;
    client
        .send_json(
            json!({"type": "hello", "version": 1, "audio": {"format": "ogg"}, "token": "s3cret"}),
        )
        .await;
    client.until(|f| f.is("ready")).await;
    let text = gateway.metrics().await;
    assert_eq!(
        metric(
            &text,
            "sonora_sessions_refused_total{reason=\"unauthorized\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn past_max_sessions_a_socket_is_refused_with_1013() {
    let mut config = Config::default();
    config.server.max_sessions = 2;
    let gateway = start(&config, echo()).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = gateway.client().await;
        client.hello_pcm().await;
        client.until(|f| f.is("ready")).await;
        held.push(client);
    }
    let mut third = gateway.client().await;
    match third.next().await {
        Frame::Closed(Some((1013, reason))) => assert!(reason.contains("busy"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let text = gateway.metrics().await;
    assert_eq!(
        metric(&text, "sonora_sessions_refused_total{reason=\"busy\"}"),
        1.0
    );
    assert_eq!(metric(&text, "sonora_sessions_active"), 2.0);
    // A place frees up when a conversation ends.
    held[0].send_json(json!({"type": "stop"})).await;
    held[0].until(|f| f.is("end")).await;
    held[0].next().await;
    gateway.metrics_when_active(1.0).await;
    let mut again = gateway.client().await;
    again.hello_pcm().await;
    again.until(|f| f.is("ready")).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_bounded_memory() {
    let mut config = Config::default();
    config.server.write_timeout_ms = 1_000;
    config.audio.downlink_queue_ms = 2_000;
    // Two minutes of reply audio (5.8 MB) for the first 40 ms of speech.
    let engine: Arc<dyn Engine> = Arc::new(ScriptedEngine::echo_turns(40, 120_000));
    let gateway = start(&config, Some(engine)).await;
    let rss_before = rss_kib();
    let mut client = common::gateway::Client::connect_small(gateway.addr).await;
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    client.send_pcm(&[100i16; 640]).await;
    // Never read again; wait for the server to give up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = gateway.metrics().await;
        if metric(&text, "sonora_downlink_slow_client_closes_total") >= 1.0
            && metric(&text, "sonora_sessions_active") == 0.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never closed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    // The reply itself (5.8 MB, built by the test engine) is most of it.
    assert!(
        grown_mib < 16,
        "memory grew by {grown_mib} MiB for one slow reader"
    );
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn shutdown_ends_conversations_with_1001_and_stops_listening() {
    let script = vec![
        Step::Emit(ready()),
        Step::AwaitClose,
        Step::Emit(EngineEvent::Audio(Pcm {
            rate_hz: 24_000,
            samples: vec![7; 960],
        })),
        Step::Emit(EngineEvent::Closed),
    ];
    let mut gateway = start(
        &Config::default(),
        Some(Arc::new(ScriptedEngine::new(script))),
    )
    .await;
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    gateway.stop();
    // What the engine still had to say arrives before the end.
    let frames = client.until(|f| f.is("end")).await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Frame::Audio(s) if s.len() == 960))
    );
    assert_eq!(frames.last().unwrap().json()["reason"], "shutdown");
    assert_eq!(
        client.next().await,
        Frame::Closed(Some((1001, "shutdown".into())))
    );
    let served = tokio::time::timeout(Duration::from_secs(15), &mut gateway.task).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
    assert!(
        tokio::net::TcpStream::connect(gateway.addr).await.is_err(),
        "still listening"
    );
}

#[tokio::test]
async fn http_endpoints_ui_and_origin_checks() {
    let gateway = start(&Config::default(), None).await;
    let get = |path: &str| reqwest::get(gateway.url(path));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    // Not ready: a socket is refused with 1013 and a reason.
    let mut client = gateway.client().await;
    assert!(matches!(
        client.next().await,
        Frame::Closed(Some((1013, _)))
    ));
    gateway.server.set_engine(echo().unwrap()).unwrap();
    assert_eq!(get("/readyz").await.unwrap().status(), 200);

    let page = get("/").await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    for hook in [
        "data-testid=\"talk\"",
        "data-testid=\"transcript\"",
        "data-testid=\"metrics\"",
    ] {
        assert!(html.contains(hook), "{hook}");
    }
    for asset in [
        "/app.js",
        "/capture-worklet.js",
        "/playback-worklet.js",
        "/style.css",
        "/favicon.svg",
    ] {
        assert_eq!(get(asset).await.unwrap().status(), 200, "{asset}");
    }
    assert_eq!(get("/nope").await.unwrap().status(), 404);
    let info: serde_json::Value = get("/api/engine").await.unwrap().json().await.unwrap();
    assert_eq!(info["engine"], "scripted");
    assert_eq!(info["protocol"], 1);
    assert_eq!(info["token_url"], "");

    let metrics = get("/metrics").await.unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text().await.unwrap();
    for name in [
        "sonora_sessions_active",
        "sonora_sessions_total",
        "sonora_sessions_refused_total{reason=\"not_ready\"} 1",
        "sonora_audio_in_seconds_total",
        "sonora_audio_out_seconds_total",
        "sonora_decoder_bytes_refused_total",
        "sonora_decoder_packets_concealed_total",
        "sonora_uplink_dropped_seconds_total",
        "sonora_downlink_slow_client_closes_total",
        "sonora_turn_latency_seconds_bucket",
        "sonora_tokens_total{modality=\"speech\",direction=\"input\"}",
        "sonora_cost_usd_total",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }

    // A foreign browser origin may not open a conversation; our own may.
    let request = |origin: &str| {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{}/ws", gateway.addr),
            )
            .unwrap();
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        request
    };
    let refused = tokio_tungstenite::connect_async(request("http://evil.example")).await;
    assert!(refused.is_err(), "a foreign origin was let in");
    let own = tokio_tungstenite::connect_async(request(&format!("http://{}", gateway.addr))).await;
    assert!(own.is_ok(), "{own:?}");
}
