//! Hostile clients against a real `sonora serve` process on the local
//! engine with default settings: each attack runs from its own loopback
//! address (127.0.0.2, …) while an honest conversation from 127.0.0.1 must
//! still get its spoken answer, `/healthz` keeps answering, and the
//! process's memory stays within the per-conversation budget documented in
//! docs/architecture.md. Needs the speech model and espeak-ng
//! (scripts/setup); without them the tests say so loudly and skip.

#![allow(
    clippy::unwrap_used,
    reason = "a test helper that fails must fail the test"
)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::gateway::{Client, Frame};
use common::{model_present, root, spoken};
use serde_json::json;
use sonora::audio::crafted::{
    OPUS_SILENCE_20MS, ogg_empty_packets_page, ogg_header, webm_cluster, webm_header,
};

/// The documented worst case of one conversation with default settings.
const BUDGET_BYTES: u64 = 10_700_000; // 10.2 MiB
/// Room for the honest conversation, allocator slack and thread stacks.
const SLACK_BYTES: u64 = 48 * 1024 * 1024;

fn attacker(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A `sonora serve` process on 127.0.0.1 with the local engine.
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Gateway {
    /// Starts the gateway with extra `SONORA_*` settings and waits until
    /// the engine is loaded.
    async fn start(settings: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sonora"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(root())
            .envs(settings.iter().copied())
            // No ledger: what is measured here is the conversations alone
            // (tests/ledger.rs has the ledger under load).
            .env("SONORA_LEDGER_URL", "off")
            // Fewer malloc arenas: the peak memory then shows what the
            // conversations hold, not how many threads once allocated.
            .env("MALLOC_ARENA_MAX", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let gateway = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = reqwest::get(format!("http://{addr}/readyz")).await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return gateway;
            }
            assert!(Instant::now() < deadline, "the gateway never got ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resident memory now and at its peak, in bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap()
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Forgets the peak so far (`/proc/PID/clear_refs` with 5), so the
    /// next reading shows the peak of what follows.
    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Probes `/healthz` every 50 ms until stopped; the answer times in ms.
struct Probe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<f64>>,
}

impl Probe {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            let url = format!("http://{addr}/healthz");
            let mut times = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let start = Instant::now();
                let answer =
                    tokio::time::timeout(Duration::from_secs(5), client.get(&url).send()).await;
                let ok = matches!(answer, Ok(Ok(ref r)) if r.status() == 200);
                times.push(if ok {
                    start.elapsed().as_secs_f64() * 1000.0
                } else {
                    f64::INFINITY
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            times
        });
        Self { stop, task }
    }

    /// Stops probing; every probe must have answered, and slow answers
    /// (over 100 ms) must be rare (a loaded 2-core machine is not quiet).
    async fn check(self) {
        self.stop.store(true, Ordering::Relaxed);
        let mut times = self.task.await.unwrap();
        times.sort_by(f64::total_cmp);
        let slow = times.iter().filter(|&&t| t > 100.0).count();
        let worst = times.last().copied().unwrap_or(0.0);
        eprintln!(
            "healthz: {} probes, median {:.1} ms, max {worst:.1} ms, {slow} over 100 ms",
            times.len(),
            times[times.len() / 2]
        );
        assert!(worst < 1_000.0, "/healthz took {worst} ms");
        assert!(
            slow * 50 <= times.len().max(50),
            "{slow} of {} probes over 100 ms",
            times.len()
        );
    }
}

fn question() -> Vec<i16> {
    let dir = common::scratch::Scratch::new("hostile");
    let path = dir.join("q.wav");
    spoken("¿Cuál es el horario de la biblioteca?", &path);
    sonora::audio::wav::read(&path).unwrap().samples
}

/// An honest client from 127.0.0.1: speaks the question in real time, goes
/// on streaming silence, and must hear a spoken answer.
async fn honest(addr: SocketAddr) {
    let speech = question();
    let mut client = Client::connect_from(addr, attacker(1)).await;
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    let silence = [0i16; 320];
    let mut frames = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut sent = 0;
    loop {
        pace.tick().await;
        let frame = speech.chunks(320).nth(sent).unwrap_or(&silence);
        client.send_pcm(frame).await;
        sent += 1;
        while let Ok(frame) = tokio::time::timeout(Duration::ZERO, client.next()).await {
            let last = &frames[frames.len().saturating_sub(3)..];
            assert!(
                !matches!(frame, Frame::Closed(_)),
                "closed: … {last:?} {frame:?}"
            );
            frames.push(frame);
        }
        if frames.iter().any(|f| f.is("turn_end")) {
            break;
        }
        assert!(Instant::now() < deadline, "no answer in 90 s: {frames:?}");
    }
    let said: Vec<_> = frames
        .iter()
        .filter(|f| f.is("transcript"))
        .map(Frame::json)
        .filter(|j| j["role"] == "assistant" && j["stage"] == "final")
        .collect();
    let audio = common::gateway::audio_samples(&frames);
    assert!(!said.is_empty(), "no answer: {frames:?}");
    assert!(audio > 24_000, "less than 1 s of reply audio");
    client.send_json(json!({"type": "stop"})).await;
    let end = client.until(|f| f.is("end")).await;
    assert_eq!(end.last().unwrap().json()["reason"], "client_stopped");
}

/// Starts a gateway, warms it up with one honest conversation, then runs
/// `attack` beside another honest one and checks the peak memory growth
/// against `conversations` budgets.
async fn under_attack<F, A>(settings: &[(&str, &str)], conversations: u64, attack: A) -> Gateway
where
    A: FnOnce(SocketAddr) -> F,
    F: std::future::Future<Output = ()>,
{
    let gateway = Gateway::start(settings).await;
    // The peak of one honest conversation (speech recognition's working
    // memory included) is the baseline: what grows past it is the attack's.
    honest(gateway.addr).await;
    let (_, before) = gateway.memory();
    gateway.reset_peak();
    let probe = Probe::start(gateway.addr);
    tokio::join!(honest(gateway.addr), attack(gateway.addr));
    probe.check().await;
    let (_, peak) = gateway.memory();
    let growth = peak.saturating_sub(before);
    eprintln!(
        "memory: peak {} MiB with one honest conversation, {} MiB under attack, growth {:.1} MiB for {conversations} hostile conversations",
        before >> 20,
        peak >> 20,
        growth as f64 / 1048576.0
    );
    assert!(
        growth <= conversations * BUDGET_BYTES + SLACK_BYTES,
        "memory grew by {growth} bytes"
    );
    gateway
}

/// Reads until `end`, skipping everything else; its reason and message.
async fn end_of(client: &mut Client) -> (String, String) {
    let mut frames = Vec::new();
    loop {
        let frame = client.next().await;
        let done = frame.is("end");
        assert!(
            !matches!(frame, Frame::Closed(_)),
            "closed before end: {frames:?} {frame:?}"
        );
        frames.push(frame);
        if done {
            break;
        }
    }
    let end = frames.last().unwrap().json();
    (
        end["reason"].as_str().unwrap().to_owned(),
        end["message"].as_str().unwrap().to_owned(),
    )
}

async fn hello(client: &mut Client, audio: serde_json::Value) {
    client
        .send_json(json!({"type": "hello", "version": 1, "audio": audio, "language": "es"}))
        .await;
    client.until(|f| f.is("ready")).await;
}

/// Sends binary frames until the server stops taking them; how many went.
async fn flood(client: &mut Client, frames: impl Iterator<Item = Vec<u8>>) -> usize {
    use futures_util::SinkExt;
    let mut sent = 0;
    for frame in frames {
        let send = client
            .ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                frame.into(),
            ));
        match tokio::time::timeout(Duration::from_secs(5), send).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concealment_floods_end_as_bad_audio() {
    if !model_present() {
        return;
    }
    let gateway = under_attack(&[], 3, |addr| async move {
        let webm = async |n: u8, blocks: usize| {
            let mut client = Client::connect_from(addr, attacker(n)).await;
            hello(&mut client, json!({"format": "webm"})).await;
            client.send_binary(webm_header()).await;
            // 200 blocks of 256 empty frames in 1,400 bytes, again and again.
            let cluster = webm_cluster(blocks, 256, &[]);
            flood(&mut client, std::iter::repeat_n(cluster, 50)).await;
            end_of(&mut client).await
        };
        let ogg = async |n: u8| {
            let mut client = Client::connect_from(addr, attacker(n)).await;
            hello(&mut client, json!({"format": "ogg"})).await;
            client.send_binary(ogg_header()).await;
            flood(&mut client, (0..400).map(ogg_empty_packets_page)).await;
            end_of(&mut client).await
        };
        let (a, b, c) = tokio::join!(webm(2, 200), webm(3, 1), ogg(4));
        for (reason, message) in [a, b, c] {
            assert_eq!(reason, "bad_audio", "{message}");
            assert!(message.contains("in a row"), "{message}");
        }
    })
    .await;
    let text = gateway.metrics().await;
    assert!(
        common::gateway::metric(&text, "sonora_decoder_packets_corrupt_total") > 0.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_faster_than_real_time_ends_the_stream() {
    if !model_present() {
        return;
    }
    under_attack(&[], 2, |addr| async move {
        let pcm = async {
            let mut client = Client::connect_from(addr, attacker(2)).await;
            hello(&mut client, json!({"format": "pcm16", "rate": 16000})).await;
            // 64 KiB frames, 2 s of audio each, as fast as the socket goes.
            flood(&mut client, std::iter::repeat_n(vec![0u8; 65_536], 40)).await;
            end_of(&mut client).await
        };
        let webm = async {
            let mut client = Client::connect_from(addr, attacker(3)).await;
            hello(&mut client, json!({"format": "webm"})).await;
            client.send_binary(webm_header()).await;
            // Valid 20 ms packets (CELT silence), 64 a block: 12.8 s a cluster.
            let cluster = webm_cluster(10, 64, &OPUS_SILENCE_20MS);
            flood(&mut client, std::iter::repeat_n(cluster, 20)).await;
            end_of(&mut client).await
        };
        let (a, b) = tokio::join!(pcm, webm);
        for (reason, message) in [a, b] {
            assert_eq!(reason, "bad_audio", "{message}");
            assert!(message.contains("faster than real time"), "{message}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_after_stop_still_gets_its_end() {
    if !model_present() {
        return;
    }
    under_attack(&[], 1, |addr| async move {
        let mut client = Client::connect_from(addr, attacker(2)).await;
        hello(&mut client, json!({"format": "pcm16", "rate": 16000})).await;
        client.send_pcm(&[0; 320]).await;
        client.send_json(json!({"type": "stop"})).await;
        // Far more than the input channel holds: dropped unread.
        for _ in 0..300 {
            client.send_pcm(&[0; 1_600]).await;
        }
        let (reason, _) = end_of(&mut client).await;
        assert_eq!(reason, "client_stopped");
        assert!(
            matches!(client.next().await, Frame::Closed(Some((1000, _)))),
            "a normal close follows the end"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_abuse_gets_clear_errors_and_nothing_else() {
    if !model_present() {
        return;
    }
    under_attack(&[], 3, |addr| async move {
        // A tool result nobody asked for, then a flood of typed questions.
        let mut client = Client::connect_from(addr, attacker(2)).await;
        hello(&mut client, json!({"format": "pcm16", "rate": 16000})).await;
        client
            .send_json(json!({"type": "tool_result", "id": "call-1", "result": {"ok": true}}))
            .await;
        assert_eq!(client.error_code().await, "unknown_tool_call");
        for i in 0..30 {
            let text = format!("¿Dónde está la biblioteca central? ({i})");
            client.send_json(json!({"type": "text", "text": text})).await;
        }
        let mut busy = 0;
        while busy < 20 {
            assert_eq!(client.error_code().await, "busy");
            busy += 1;
        }
        client.send_json(json!({"type": "stop"})).await;
        end_of(&mut client).await;

        // A text frame over 64 KiB closes the socket with 1009.
        let mut client = Client::connect_from(addr, attacker(3)).await;
        hello(&mut client, json!({"format": "pcm16", "rate": 16000})).await;
        let padding = "a".repeat(100 * 1024);
        client
            .send_json(json!({"type": "text", "text": padding}))
            .await;
        assert_eq!(client.error_code().await, "message_too_large");
        assert!(matches!(
            client.next().await,
            Frame::Closed(Some((1009, _)))
        ));

        // An odd PCM rate (an FFT resampler per session) is refused.
        let mut client = Client::connect_from(addr, attacker(4)).await;
        client
            .send_json(json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 47_999}}))
            .await;
        assert_eq!(client.error_code().await, "unsupported_audio");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickles_go_idle_and_long_conversations_end() {
    if !model_present() {
        return;
    }
    let settings = [
        // Long enough for an honest answer on a busy machine.
        ("SONORA_SERVER_IDLE_TIMEOUT_MS", "15000"),
        ("SONORA_SERVER_MAX_CONVERSATION_S", "30"),
    ];
    under_attack(&settings, 2, |addr| async move {
        // Two bytes of PCM every half second: bytes, but no speech.
        let trickle = async {
            let mut client = Client::connect_from(addr, attacker(2)).await;
            hello(&mut client, json!({"format": "pcm16", "rate": 16000})).await;
            let started = Instant::now();
            loop {
                client.send_binary(vec![0, 0]).await;
                if let Ok(frame) =
                    tokio::time::timeout(Duration::from_millis(500), client.next()).await
                    && frame.is("end")
                {
                    assert_eq!(frame.json()["reason"], "idle");
                    return started.elapsed();
                }
            }
        };
        // Typed text every 3 s keeps a conversation alive, up to its length.
        let talker = async {
            let mut client = Client::connect_from(addr, attacker(3)).await;
            hello(&mut client, json!({"format": "pcm16", "rate": 16000})).await;
            let started = Instant::now();
            let mut last_text = Instant::now();
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            loop {
                pace.tick().await;
                client.send_pcm(&[0; 320]).await;
                if last_text.elapsed() > Duration::from_secs(3) {
                    last_text = Instant::now();
                    client
                        .send_json(json!({"type": "text", "text": "hola"}))
                        .await;
                }
                while let Ok(frame) = tokio::time::timeout(Duration::ZERO, client.next()).await {
                    if frame.is("end") {
                        assert_eq!(frame.json()["reason"], "max_duration", "{frame:?}");
                        return started.elapsed();
                    }
                }
            }
        };
        let (idle, long) = tokio::join!(trickle, talker);
        assert!(idle < Duration::from_secs(25), "idle after {idle:?}");
        assert!(long >= Duration::from_secs(29), "ended after {long:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_every_path_at_once_stays_within_the_memory_budget() {
    if !model_present() {
        return;
    }
    const ATTACKERS: u8 = 10;
    under_attack(&[], u64::from(ATTACKERS), |addr| async move {
        let attack = async |n: u8| {
            let mut client = Client::connect_from(addr, attacker(10 + n)).await;
            hello(&mut client, json!({"format": "webm"})).await;
            client.send_binary(webm_header()).await;
            let started = Instant::now();
            // Never reads: reply audio piles up toward it too.
            while started.elapsed() < Duration::from_secs(8) {
                // A cluster whose one block is the largest allowed, sent in
                // 255 KiB pieces: the decoder holds a whole block each time.
                let mut block = webm_cluster(1, 1, &vec![0x55; 250 * 1024]);
                block.extend(webm_cluster(1, 1, &vec![0xAA; 250 * 1024]));
                let pieces: Vec<Vec<u8>> = block.chunks(255 * 1024).map(<[u8]>::to_vec).collect();
                if flood(&mut client, pieces.into_iter()).await == 0 {
                    break;
                }
                let text = format!("¿{}", "biblioteca ".repeat(360));
                let message = json!({"type": "text", "text": text}).to_string();
                use futures_util::SinkExt;
                let send = client
                    .ws
                    .send(tokio_tungstenite::tungstenite::Message::Text(
                        message.into(),
                    ));
                if tokio::time::timeout(Duration::from_secs(5), send)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        };
        let mut all = Vec::new();
        for n in 0..ATTACKERS {
            all.push(attack(n));
        }
        futures_util::future::join_all(all).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_slots_rebinding_and_slowloris_leave_honest_clients_alone() {
    if !model_present() {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let settings = [("SONORA_SERVER_HEADER_READ_TIMEOUT_MS", "2000")];
    let gateway = under_attack(&settings, 4, |addr| async move {
        let connect = async |n: u8| {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(attacker(n), 0)).unwrap();
            socket.connect(addr).await.unwrap()
        };
        // One address tries to hold eight conversations: four get in.
        let hold = async {
            let mut held = Vec::new();
            let mut refused = 0;
            for _ in 0..8 {
                let mut client = Client::connect_from(addr, attacker(2)).await;
                client.hello_pcm().await;
                match client.next().await {
                    Frame::Json(v) if v["type"] == "ready" => held.push(client),
                    Frame::Closed(Some((1013, reason))) if reason.starts_with("client_busy") => {
                        refused += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!((held.len(), refused), (4, 4));
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        // Half-sent request heads are closed by the server, not kept.
        let slowloris = async {
            let mut half_open = Vec::new();
            for _ in 0..100 {
                let mut tcp = connect(3).await;
                tcp.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                    .await
                    .unwrap();
                half_open.push(tcp);
            }
            for mut tcp in half_open {
                let mut buf = [0u8; 256];
                let read = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf)).await;
                assert!(
                    matches!(read, Ok(Ok(0) | Err(_))),
                    "a half-sent head was kept open: {read:?}"
                );
            }
        };
        // Another host name (DNS rebinding) gets 421, whatever the path.
        let rebinding = async {
            for path in ["/", "/metrics", "/api/engine", "/ws"] {
                let mut tcp = connect(4).await;
                let port = addr.port();
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: evil.example:{port}\r\nOrigin: http://evil.example:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                );
                tcp.write_all(request.as_bytes()).await.unwrap();
                let mut answer = vec![0u8; 64];
                let n = tcp.read(&mut answer).await.unwrap();
                let head = String::from_utf8_lossy(&answer[..n]).to_string();
                assert!(head.starts_with("HTTP/1.1 421"), "{path}: {head}");
            }
        };
        tokio::join!(hold, slowloris, rebinding);
    })
    .await;
    let text = gateway.metrics().await;
    let refused = |reason: &str| {
        common::gateway::metric(
            &text,
            &format!("sonora_sessions_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(refused("client_busy"), 4.0, "{text}");
    assert!(refused("host") >= 4.0, "{text}");
}
