// Over 600 lines: the clients' handshakes, wheel and reader share one hand-written frame codec, a tenth of it tests.
//! The load benchmarks' honest clients, cheap enough that the gateway, not
//! the load generator, is what the machine waits on: each client is a bare
//! TCP socket speaking just enough WebSocket (RFC 6455) by hand, every audio
//! frame is the same pre-masked bytes, one timer wheel sends for every
//! client, and a client's replies wake only its own small reader task.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio::net::{TcpSocket, TcpStream};

pub(super) const OP_TEXT: u8 = 1;
pub(super) const OP_BINARY: u8 = 2;
pub(super) const OP_CLOSE: u8 = 8;
pub(super) const OP_PING: u8 = 9;
pub(super) const OP_PONG: u8 = 10;
/// Any key will do: the server unmasks whatever key a frame carries.
const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x88];
/// A client whose unsent bytes pass this is not being read: it gives up.
const MAX_PENDING_BYTES: usize = 1 << 20;
/// A client that hears nothing for this long gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// No round trip is waiting for its reply.
const NO_TURN: u64 = u64::MAX;

/// What one client saw.
#[derive(Debug, Default)]
pub(super) struct ClientReport {
    pub(super) ready: bool,
    pub(super) round_trips_us: Vec<u64>,
    pub(super) bytes_in: u64,
    pub(super) errors: Vec<String>,
}

/// How the honest clients talk: frame length, the echo's turn length, and
/// whether they are phone calls (Twilio Media Streams: μ-law in JSON text
/// frames on `/twilio/stream`) rather than the web page's `/ws`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Talk {
    pub(super) frame_ms: u64,
    pub(super) turn_ms: u64,
    pub(super) phone: bool,
}

/// A masked client frame with FIN set.
pub(super) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

/// Server frames as they arrive, parsed where they lie.
#[derive(Debug, Default)]
struct Frames {
    buf: Vec<u8>,
    start: usize,
}

impl Frames {
    /// Waits for more bytes and appends them; `false` at the end of the stream.
    async fn fill(&mut self, stream: &TcpStream) -> std::io::Result<bool> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(4096);
        loop {
            stream.readable().await?;
            match stream.try_read_buf(&mut self.buf) {
                Ok(n) => return Ok(n > 0),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next whole frame, consumed: its opcode and where its payload is.
    fn next(&mut self) -> Option<(u8, Range<usize>)> {
        let bytes = self.buf.get(self.start..)?;
        let [first, second, ..] = *bytes else {
            return None;
        };
        let (len, mut header): (u64, usize) = match second & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        if second & 0x80 != 0 {
            header += 4;
        }
        let end = header.checked_add(usize::try_from(len).ok()?)?;
        if bytes.len() < end {
            return None;
        }
        let range = self.start + header..self.start + end;
        self.start += end;
        Some((first & 0x0f, range))
    }

    fn text(&self, range: Range<usize>) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.bytes(range))
    }

    fn bytes(&self, range: Range<usize>) -> &[u8] {
        self.buf.get(range).unwrap_or_default()
    }
}

/// Writes all of `bytes`, waiting for room.
async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A client with its `ready`, about to stream.
#[derive(Debug)]
pub(super) struct Connected {
    stream: Arc<TcpStream>,
    frames: Frames,
}

/// Opens a conversation from `source` and waits for its `ready` (a call:
/// its token from the webhook, then the stream's `connected` and `start`).
pub(super) async fn connect(
    addr: SocketAddr,
    source: IpAddr,
    phone: Option<u64>,
) -> anyhow::Result<Connected> {
    let token = match phone {
        Some(call) => Some(call_token(addr, source, call).await?),
        None => None,
    };
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await.context("connect")?;
    // As browsers do, without Nagle's delay.
    stream.set_nodelay(true)?;
    let path = if token.is_some() {
        "/twilio/stream"
    } else {
        "/ws"
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: c29ub3JhIGJlbmNoIGtleQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    write_all(&stream, request.as_bytes()).await?;
    let mut frames = Frames::default();
    let head_end = loop {
        if let Some(at) = frames.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if frames.buf.len() > 16 * 1024 || !frames.fill(&stream).await? {
            bail!("no upgrade response");
        }
    };
    let head = String::from_utf8_lossy(&frames.buf[..head_end]);
    if !head.starts_with("HTTP/1.1 101") {
        let status = head.lines().next().unwrap_or_default().to_owned();
        bail!("upgrade refused: {status}");
    }
    frames.start = head_end;
    if let (Some(token), Some(call)) = (token, phone) {
        let connected = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
        let start = serde_json::json!({"event": "start", "streamSid": format!("MZ{call}"),
            "start": {"streamSid": format!("MZ{call}"), "callSid": format!("CA{call}"),
                "customParameters": {"token": token},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}});
        write_all(&stream, &client_frame(OP_TEXT, connected.as_bytes())).await?;
        write_all(
            &stream,
            &client_frame(OP_TEXT, start.to_string().as_bytes()),
        )
        .await?;
        // A call has no `ready`: it is up once `start` is in.
        return Ok(Connected {
            stream: Arc::new(stream),
            frames,
        });
    }
    let hello = r#"{"type":"hello","version":1,"audio":{"format":"pcm16","rate":16000}}"#;
    write_all(&stream, &client_frame(OP_TEXT, hello.as_bytes())).await?;
    loop {
        while let Some((opcode, range)) = frames.next() {
            match opcode {
                OP_TEXT => {
                    let text = frames.text(range);
                    if text.contains("\"ready\"") {
                        return Ok(Connected {
                            stream: Arc::new(stream),
                            frames,
                        });
                    }
                    if text.contains("\"error\"") {
                        bail!("refused: {text}");
                    }
                }
                OP_CLOSE => bail!("closed before ready: {}", close_reason(&frames, range)),
                _ => {}
            }
        }
        if !frames.fill(&stream).await? {
            bail!("closed before ready");
        }
    }
}

/// A call's token: `POST /twilio/voice` (the bench's gateway takes
/// unsigned webhooks) and the token in its TwiML.
async fn call_token(addr: SocketAddr, source: IpAddr, call: u64) -> anyhow::Result<String> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(addr).await.context("connect")?;
    let body = format!("CallSid=CA{call}&From=%2B5110000{call}&To=%2B5115550000");
    let request = format!(
        "POST /twilio/voice HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    write_all(&stream, request.as_bytes()).await?;
    let mut frames = Frames::default();
    while frames.fill(&stream).await? {
        if frames.buf.len() > 64 * 1024 {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&frames.buf);
    answer
        .split("name=\"token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no call token: {}", answer.lines().next().unwrap_or("")))
}

fn close_reason(frames: &Frames, range: Range<usize>) -> String {
    let reason = range.start.saturating_add(2)..range.end;
    if reason.start > reason.end {
        return "no reason".into();
    }
    frames.text(reason).into_owned()
}

/// When the frame that completed the current turn went out, in µs since
/// the run's epoch: written by the wheel, taken by the reader; whether the
/// client said `stop`; and the payload of the last ping the server sent (8
/// bytes, as a number), which the wheel answers with a pong before its
/// next frame (the reader never writes: the two would interleave frames).
#[derive(Debug)]
struct Turn(AtomicU64, std::sync::atomic::AtomicBool, AtomicU64);

/// Reads one client's replies until its `end`: round trips, bytes, errors.
async fn read_replies(
    stream: Arc<TcpStream>,
    mut frames: Frames,
    turn: Arc<Turn>,
    epoch: Instant,
    phone: bool,
) -> ClientReport {
    let mut report = ClientReport {
        ready: true,
        ..ClientReport::default()
    };
    loop {
        while let Some((opcode, range)) = frames.next() {
            match opcode {
                OP_BINARY => {
                    report.bytes_in += range.len() as u64;
                    let sent_us = turn.0.swap(NO_TURN, Ordering::Relaxed);
                    if sent_us != NO_TURN {
                        let now_us = epoch.elapsed().as_micros() as u64;
                        report.round_trips_us.push(now_us.saturating_sub(sent_us));
                    }
                }
                OP_TEXT if phone => {
                    // A call's reply audio comes as `media` messages.
                    let text = frames.text(range.clone());
                    if text.contains("\"event\":\"media\"") {
                        report.bytes_in += range.len() as u64;
                        let sent_us = turn.0.swap(NO_TURN, Ordering::Relaxed);
                        if sent_us != NO_TURN {
                            let now_us = epoch.elapsed().as_micros() as u64;
                            report.round_trips_us.push(now_us.saturating_sub(sent_us));
                        }
                    }
                }
                OP_TEXT => {
                    let text = frames.text(range);
                    if text.contains("\"type\":\"error\"") {
                        report.errors.push(text.into_owned());
                    } else if text.contains("\"type\":\"end\"") {
                        if !text.contains("client_stopped") {
                            report.errors.push(text.chars().take(200).collect());
                        }
                        return report;
                    }
                }
                OP_PING => {
                    if let Ok(payload) = <[u8; 8]>::try_from(frames.bytes(range)) {
                        turn.2.store(u64::from_be_bytes(payload), Ordering::Relaxed);
                    }
                }
                OP_CLOSE => {
                    let reason = close_reason(&frames, range);
                    if !(phone && turn.1.load(Ordering::Relaxed)) {
                        report.errors.push(format!("closed early: {reason}"));
                    }
                    return report;
                }
                _ => {}
            }
        }
        match tokio::time::timeout(READ_TIMEOUT, frames.fill(&stream)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                // A call ends by closing after its `stop`.
                if !(phone && turn.1.load(Ordering::Relaxed)) {
                    report.errors.push("connection lost".into());
                }
                return report;
            }
            Ok(Err(e)) => {
                report.errors.push(format!("connection lost: {e}"));
                return report;
            }
            Err(_) => {
                report.errors.push("nothing heard for 30 s".into());
                return report;
            }
        }
    }
}

/// One streaming client as the wheel sees it.
struct Streamer {
    stream: Arc<TcpStream>,
    turn: Arc<Turn>,
    /// Its first frame, in ms after the start.
    start_ms: u64,
    sent: u64,
    /// Bytes the socket did not take yet, sent before anything new.
    pending: Vec<u8>,
    done: bool,
    error: Option<String>,
}

impl Streamer {
    /// Sends `bytes` behind whatever is pending, without waiting.
    fn send(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        if self.pending.is_empty() {
            match self.stream.try_write(bytes) {
                Ok(n) => rest = &bytes[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return self.fail(format!("send: {e}")),
            }
        } else {
            self.pending.extend_from_slice(bytes);
            rest = &[];
            self.flush();
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() > MAX_PENDING_BYTES {
            self.fail("the server stopped reading".into());
        }
    }

    fn flush(&mut self) {
        match self.stream.try_write(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => self.fail(format!("send: {e}")),
        }
    }

    fn fail(&mut self, error: String) {
        self.error.get_or_insert(error);
        self.pending.clear();
        self.done = true;
    }
}

/// Streams `seconds` of real-time audio from every client, then `stop`,
/// and returns each client's report (in the order given).
pub(super) async fn stream(
    clients: Vec<(Connected, Duration)>,
    talk: Talk,
    seconds: u64,
) -> Vec<ClientReport> {
    let epoch = Instant::now();
    let mut streamers = Vec::with_capacity(clients.len());
    let mut readers = Vec::with_capacity(clients.len());
    for (connected, phase) in clients {
        let turn = Arc::new(Turn(
            AtomicU64::new(NO_TURN),
            std::sync::atomic::AtomicBool::new(false),
            AtomicU64::new(NO_TURN),
        ));
        let Connected { stream, frames } = connected;
        readers.push(tokio::spawn(read_replies(
            Arc::clone(&stream),
            frames,
            Arc::clone(&turn),
            epoch,
            talk.phone,
        )));
        streamers.push(Streamer {
            stream,
            turn,
            start_ms: phase.as_millis() as u64,
            sent: 0,
            pending: Vec::new(),
            done: false,
            error: None,
        });
    }
    run_wheel(&mut streamers, talk, seconds, epoch).await;
    let mut reports = Vec::with_capacity(readers.len());
    for (reader, streamer) in readers.into_iter().zip(streamers) {
        let mut report = reader.await.unwrap_or_else(|e| ClientReport {
            errors: vec![format!("client task failed: {e}")],
            ..ClientReport::default()
        });
        report.errors.extend(streamer.error);
        reports.push(report);
    }
    reports
}

/// The one timer for every client: each millisecond, the clients whose
/// frame falls on it send one (late ticks are caught up at once).
async fn run_wheel(streamers: &mut [Streamer], talk: Talk, seconds: u64, epoch: Instant) {
    let frame_ms = talk.frame_ms.max(1);
    // Quiet noise, never silence: it is what a microphone sends.
    let samples = (frame_ms * 16) as usize;
    let noise: Vec<u8> = (0..samples)
        .flat_map(|i| (((i * 7919) % 200) as i16 - 100).to_le_bytes())
        .collect();
    let (audio, stop) = if talk.phone {
        // The same noise as μ-law at 8 kHz, in Twilio's `media` message.
        let pcm: Vec<i16> = (0..samples / 2)
            .map(|i| ((i * 7919) % 200) as i16 - 100)
            .collect();
        let mut ulaw = Vec::new();
        crate::audio::g711::encode_into(&pcm, &mut ulaw);
        let media = serde_json::json!({"event": "media",
            "media": {"track": "inbound", "payload": crate::base64::encode(&ulaw)}});
        (
            client_frame(OP_TEXT, media.to_string().as_bytes()),
            client_frame(OP_TEXT, br#"{"event":"stop"}"#),
        )
    } else {
        (
            client_frame(OP_BINARY, &noise),
            client_frame(OP_TEXT, br#"{"type":"stop"}"#),
        )
    };
    let frames_per_turn = (talk.turn_ms / frame_ms).max(1);
    let total_frames = seconds * 1000 / frame_ms;
    let mut slots: Vec<Vec<usize>> = vec![Vec::new(); frame_ms as usize];
    for (i, streamer) in streamers.iter().enumerate() {
        slots[(streamer.start_ms % frame_ms) as usize].push(i);
    }
    let start = tokio::time::Instant::now();
    let mut live = streamers.len();
    let mut tick = 0u64;
    while live > 0 {
        let now_ms = start.elapsed().as_millis() as u64;
        while tick <= now_ms && live > 0 {
            for &i in &slots[(tick % frame_ms) as usize] {
                let streamer = &mut streamers[i];
                if streamer.done || tick < streamer.start_ms {
                    continue;
                }
                let ping = streamer.turn.2.swap(NO_TURN, Ordering::Relaxed);
                if ping != NO_TURN {
                    streamer.send(&client_frame(OP_PONG, &ping.to_be_bytes()));
                }
                streamer.send(&audio);
                streamer.sent += 1;
                if streamer.sent.is_multiple_of(frames_per_turn) {
                    let now_us = epoch.elapsed().as_micros() as u64;
                    streamer.turn.0.store(now_us, Ordering::Relaxed);
                }
                if streamer.sent >= total_frames {
                    streamer.turn.1.store(true, Ordering::Relaxed);
                    streamer.send(&stop);
                    streamer.done = true;
                }
                if streamer.done {
                    live -= 1;
                }
            }
            tick += 1;
        }
        tokio::time::sleep_until(start + Duration::from_millis(tick)).await;
    }
    // What the sockets did not take yet (a `stop` at the end, say).
    for streamer in streamers.iter_mut() {
        if streamer.error.is_none() && !streamer.pending.is_empty() {
            let pending = std::mem::take(&mut streamer.pending);
            if let Err(e) = write_all(&streamer.stream, &pending).await {
                streamer.error = Some(format!("send: {e}"));
            }
        }
    }
}

/// A client that could not start.
pub(super) fn failed(error: &anyhow::Error) -> ClientReport {
    ClientReport {
        errors: vec![format!("{error:#}")],
        ..ClientReport::default()
    }
}

/// Why a connection task ended without a client.
pub(super) fn lost(error: &tokio::task::JoinError) -> anyhow::Error {
    anyhow!("client task failed: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(frame: &[u8], header: usize) -> Vec<u8> {
        let key = &frame[header - 4..header];
        frame[header..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect()
    }

    #[test]
    fn client_frames_are_masked_with_each_length_form() {
        let short = client_frame(OP_TEXT, b"hola");
        assert_eq!(&short[..2], &[0x81, 0x84]);
        assert_eq!(unmask(&short, 6), b"hola");
        let medium = client_frame(OP_BINARY, &[7; 640]);
        assert_eq!(&medium[..4], &[0x82, 0xfe, 0x02, 0x80]);
        assert_eq!(unmask(&medium, 8), vec![7; 640]);
        let long = client_frame(OP_BINARY, &[1; 70_000]);
        assert_eq!(long[1], 0xff);
        assert_eq!(unmask(&long, 14).len(), 70_000);
    }

    #[test]
    fn server_frames_parse_whole_or_not_at_all() {
        let mut frames = Frames::default();
        // A text frame, then a binary one of 300 bytes cut short.
        frames.buf.extend_from_slice(&[0x81, 2, b'o', b'k']);
        frames.buf.extend_from_slice(&[0x82, 126, 0x01, 0x2c]);
        frames.buf.extend_from_slice(&[9; 200]);
        let (opcode, range) = frames.next().expect("the text frame");
        assert_eq!((opcode, frames.text(range).as_ref()), (OP_TEXT, "ok"));
        assert_eq!(frames.next(), None, "the binary frame is not whole yet");
        frames.buf.extend_from_slice(&[9; 100]);
        let (opcode, range) = frames.next().expect("the binary frame");
        assert_eq!((opcode, range.len()), (OP_BINARY, 300));
        assert_eq!(frames.next(), None);
        // A 64-bit length no memory could hold is never a frame.
        frames
            .buf
            .extend_from_slice(&[0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(frames.next(), None);
    }
}
