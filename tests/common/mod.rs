//! Helpers shared by the test binaries that use the real local engine.

#![allow(
    clippy::unwrap_used,
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    reason = "a test helper that fails must fail the test; not every binary uses every helper"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A time zone in which it is now about noon, the same for the whole test
/// binary: a daily or monthly budget cannot roll over while a test that
/// spends it runs (in the default zone, a run at midnight in Lima saw a
/// fresh day's budget mid-test).
pub fn midday_zone() -> &'static str {
    static ZONE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ZONE.get_or_init(|| {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let utc_hour = i64::try_from(seconds / 3_600 % 24).unwrap_or(0);
        // `Etc/GMT-N` is N hours ahead of UTC (the POSIX sign); -11..=12.
        match 12 - utc_hour {
            0 => "Etc/GMT".to_owned(),
            ahead if ahead > 0 => format!("Etc/GMT-{ahead}"),
            behind => format!("Etc/GMT+{}", -behind),
        }
    })
}

pub fn model_present() -> bool {
    let dir = root().join("models/whisper-base");
    let ok = [
        "model.bin",
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
    ]
    .iter()
    .all(|f| dir.join(f).is_file());
    let espeak = Command::new("espeak-ng")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok || !espeak {
        eprintln!(
            "\n\n*** SKIPPED: the local engine test needs models/whisper-base (scripts/install-model) \
             and espeak-ng (apt-get install espeak-ng) ***\n"
        );
    }
    ok && espeak
}

/// Speaks `text` in Spanish into a 16 kHz WAV with 0.4 s of silence around
/// it and light white noise.
pub fn spoken(text: &str, path: &Path) {
    spoken_at(text, 150, path);
}

/// [`spoken`] at `wpm` words a minute.
pub fn spoken_at(text: &str, wpm: u32, path: &Path) {
    let raw = path.with_extension("raw.wav");
    let status = Command::new("espeak-ng")
        .args(["-v", "es", "-s", &wpm.to_string(), "-w"])
        .arg(&raw)
        .arg(text)
        .status()
        .unwrap();
    assert!(status.success());
    let speech = sonora::audio::wav::read(&raw).unwrap();
    let mut resampler = sonora::audio::StreamResampler::new(speech.rate_hz, 16_000).unwrap();
    let mut pcm = vec![0i16; 6_400];
    resampler.push(&speech.samples, &mut pcm);
    resampler.finish(&mut pcm);
    pcm.extend(vec![0i16; 6_400]);
    let mut state = 12_345u64;
    for s in &mut pcm {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        *s = (i32::from(*s) + ((state >> 33) % 801) as i32 - 400).clamp(-32768, 32767) as i16;
    }
    sonora::audio::wav::write_mono(path, 16_000, &pcm).unwrap();
}

/// Lower case without Spanish accents, for keyword checks on transcripts.
pub fn folded(text: &str) -> String {
    text.to_lowercase()
        .replace(['á', 'à'], "a")
        .replace('é', "e")
        .replace('í', "i")
        .replace('ó', "o")
        .replace('ú', "u")
}

/// A gateway on 127.0.0.1:0, and a test's WebSocket client for it.
pub mod gateway {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use serde_json::Value;
    use sonora::config::Config;
    use sonora::engine::Engine;
    use sonora::server::Server;
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    /// Longest wait for any one frame before a test fails.
    pub const FRAME_WAIT: Duration = Duration::from_secs(120);

    pub struct Running {
        pub addr: SocketAddr,
        pub server: Server,
        stop: Option<oneshot::Sender<()>>,
        pub task: JoinHandle<std::io::Result<()>>,
    }

    impl Running {
        /// Like SIGTERM.
        pub fn stop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }

        pub fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        pub async fn metrics(&self) -> String {
            reqwest::get(self.url("/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }

        /// The metrics once `sonora_sessions_active` is `active` (closing
        /// sockets finish their handshake first).
        pub async fn metrics_when_active(&self, active: f64) -> String {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let text = self.metrics().await;
                if metric(&text, "sonora_sessions_active") == active
                    || tokio::time::Instant::now() > deadline
                {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        pub async fn client(&self) -> Client {
            Client::connect(self.addr).await
        }
    }

    /// Reply audio samples among `frames`.
    pub fn audio_samples(frames: &[Frame]) -> usize {
        frames
            .iter()
            .map(|f| match f {
                Frame::Audio(s) => s.len(),
                _ => 0,
            })
            .sum()
    }

    /// `question` among the user's transcripts in `frames` and `answer`
    /// among the assistant's.
    pub fn assert_heard_and_answered(frames: &[Frame], question: &str, answer: &str) {
        let texts: Vec<(String, String)> = frames
            .iter()
            .filter(|f| f.is("transcript"))
            .map(|f| {
                let j = f.json();
                (
                    j["role"].as_str().unwrap().to_owned(),
                    j["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert!(
            texts.contains(&("user".into(), question.into())),
            "{texts:?}"
        );
        assert!(
            texts.contains(&("assistant".into(), answer.into())),
            "{texts:?}"
        );
    }

    /// One user turn in real time, 20 ms frames: 0.8 s of `speech(k)` for
    /// frame k, then 0.7 s of quiet; the frames up to its `turn_end`.
    pub async fn spoken_turn(client: &mut Client, speech: impl Fn(u64) -> Vec<i16>) -> Vec<Frame> {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
        for k in 0..75 {
            tick.tick().await;
            let frame = if k < 40 { speech(k) } else { vec![0; 320] };
            client.send_pcm(&frame).await;
        }
        client.until(|f| f.is("turn_end")).await
    }

    /// A metric's value from the text exposition (0 when absent).
    pub fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn start(config: &Config, engine: Option<Arc<dyn Engine>>) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::new(config);
        if let Some(engine) = engine {
            server.set_engine(engine).unwrap();
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.clone().serve(listener, async move {
            let _ = rx.await;
        }));
        Running {
            addr,
            server,
            stop: Some(tx),
            task,
        }
    }

    #[derive(Debug, Clone, PartialEq)]
    pub enum Frame {
        Json(Value),
        Audio(Vec<i16>),
        /// The server's close frame (code, reason), or `None` for a lost connection.
        Closed(Option<(u16, String)>),
    }

    impl Frame {
        pub fn kind(&self) -> Option<&str> {
            match self {
                Self::Json(v) => v["type"].as_str(),
                _ => None,
            }
        }

        pub fn is(&self, kind: &str) -> bool {
            self.kind() == Some(kind)
        }

        pub fn json(&self) -> &Value {
            match self {
                Self::Json(v) => v,
                other => panic!("expected JSON, got {other:?}"),
            }
        }
    }

    pub struct Client {
        pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    }

    impl Client {
        pub async fn connect(addr: SocketAddr) -> Self {
            let url = format!("ws://{addr}/ws");
            let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
                .await
                .unwrap();
            Self { ws }
        }

        /// A client connecting from `source` (any 127.x.y.z address is the
        /// loopback on Linux): a distinct client address for the server.
        pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Self {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(source, 0)).unwrap();
            Self::over(socket, addr).await
        }

        /// The WebSocket handshake over a socket set up by the caller.
        async fn over(socket: tokio::net::TcpSocket, addr: SocketAddr) -> Self {
            let stream = socket.connect(addr).await.unwrap();
            let (ws, _) = tokio_tungstenite::client_async(
                format!("ws://{addr}/ws"),
                MaybeTlsStream::Plain(stream),
            )
            .await
            .unwrap();
            Self { ws }
        }

        /// A client whose socket takes only a few KiB before the server
        /// must wait: a reader that stops is felt at once.
        pub async fn connect_small(addr: SocketAddr) -> Self {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            Self::over(socket, addr).await
        }

        pub async fn send_json(&mut self, value: Value) {
            self.ws
                .send(Message::Text(value.to_string().into()))
                .await
                .unwrap();
        }

        pub async fn send_text(&mut self, text: &str) {
            self.ws.send(Message::Text(text.into())).await.unwrap();
        }

        pub async fn send_binary(&mut self, bytes: Vec<u8>) {
            self.ws.send(Message::Binary(bytes.into())).await.unwrap();
        }

        pub async fn send_pcm(&mut self, samples: &[i16]) {
            let bytes = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
            self.send_binary(bytes).await;
        }

        pub async fn hello_pcm(&mut self) {
            let hello = serde_json::json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 16000}, "language": "es"});
            self.send_json(hello).await;
        }

        /// The next frame; pings are skipped.
        pub async fn next(&mut self) -> Frame {
            loop {
                let message = tokio::time::timeout(FRAME_WAIT, self.ws.next())
                    .await
                    .expect("a frame within the wait");
                return match message {
                    Some(Ok(Message::Text(text))) => {
                        Frame::Json(serde_json::from_str(&text).unwrap())
                    }
                    Some(Ok(Message::Binary(bytes))) => Frame::Audio(
                        bytes
                            .chunks_exact(2)
                            .map(|b| i16::from_le_bytes([b[0], b[1]]))
                            .collect(),
                    ),
                    Some(Ok(Message::Close(frame))) => {
                        Frame::Closed(frame.map(|f| (u16::from(f.code), f.reason.to_string())))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => Frame::Closed(None),
                };
            }
        }

        /// Frames up to and including the first one that matches.
        pub async fn until(&mut self, done: impl Fn(&Frame) -> bool) -> Vec<Frame> {
            let mut frames = Vec::new();
            loop {
                let frame = self.next().await;
                let end = done(&frame) || matches!(frame, Frame::Closed(_));
                frames.push(frame);
                if end {
                    assert!(done(frames.last().unwrap()), "closed early: {frames:?}");
                    return frames;
                }
            }
        }

        /// Reads until an `error` frame and returns its code.
        pub async fn error_code(&mut self) -> String {
            let frames = self.until(|f| f.is("error")).await;
            frames.last().unwrap().json()["code"]
                .as_str()
                .unwrap()
                .to_owned()
        }

        pub async fn close_normally(&mut self) {
            let _ = self
                .ws
                .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                }))
                .await;
        }
    }
}

/// The ledger's row of conversation `id`, once its end is recorded (5 s at
/// most).
pub async fn ended_row(
    ledger: &sonora::ledger::Ledger,
    id: &str,
) -> sonora::ledger::report::ConversationRow {
    for _ in 0..100 {
        let rows = sonora::ledger::report::conversations(ledger.pool(), 0, i64::MAX)
            .await
            .unwrap();
        if let Some(row) = rows
            .into_iter()
            .find(|r| r.conversation == id && r.ended_ms.is_some())
        {
            return row;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the end of {id} was never recorded");
}

mod base64;
pub mod browser;
pub use base64::{base64, unbase64};
pub mod postgres;
pub mod proxy;
pub mod scratch;
pub mod tls;
pub mod twilio;
