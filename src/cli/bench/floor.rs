//! The floor `bench serve` measures the gateway against: a bare echo over
//! WebSocket on the same async runtime, taking the same load. Each
//! connection is one task reading client frames straight off its socket
//! (no HTTP library, no WebSocket library, no channels, no conversation):
//! it unmasks each frame, counts the PCM, and every `turn_ms` of it writes
//! `reply_ms` of 24 kHz audio back in 200 ms binary frames with one write.
//! It answers `hello` with `ready` and `stop` with `end`, as the gateway
//! does, and nothing else. What the gateway spends beyond this is its own
//! work: the conversation, the engine, the ledger, the limits.
//!
//! Not a WebSocket server for anything but the load generator: the
//! handshake is not checked, and a frame it cannot parse ends the
//! connection.
//!
//! With `--library`, the same echo goes through the WebSocket library the
//! gateway uses (tokio-tungstenite, with the gateway's buffer sizes) over
//! the bare TCP stream: the two floors apart are what the library costs.
//!
//! With `--engine-task`, the echo's counting and answering move to a task
//! of their own per connection, handed each frame's PCM through a channel
//! and answering through another, as the gateway's engines run beside its
//! connections: the two floors apart are what one hand-over each way costs.

use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::client::{OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use crate::cli::Failure;

/// Reply audio per binary frame, as the gateway batches it.
const REPLY_FRAME_MS: u64 = 200;
const REPLY_RATE_HZ: u64 = 24_000;
/// Client frames larger than this end the connection.
const MAX_FRAME_BYTES: usize = 256 * 1024;

#[derive(Debug, Args)]
pub(crate) struct FloorArgs {
    /// Answer every TURN_MS of PCM ...
    #[arg(long, default_value_t = 2_000)]
    turn_ms: u64,
    /// ... with REPLY_MS of 24 kHz audio.
    #[arg(long, default_value_t = 1_000)]
    reply_ms: u64,
    /// Read and write frames with tokio-tungstenite instead of by hand.
    #[arg(long, conflicts_with = "engine_task")]
    library: bool,
    /// Count and answer in a task of its own per connection, behind a
    /// channel each way.
    #[arg(long)]
    engine_task: bool,
}

/// How the floor's echo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FloorKind {
    /// Frames read by hand, counted and answered in the connection's task.
    Bare,
    /// Frames read and written through tokio-tungstenite.
    Library,
    /// Frames read by hand, counted and answered in a task of their own.
    EngineTask,
}

impl FloorKind {
    /// The kind its two flags choose (they exclude each other).
    pub(super) fn from_flags(library: bool, engine_task: bool) -> Self {
        if library {
            Self::Library
        } else if engine_task {
            Self::EngineTask
        } else {
            Self::Bare
        }
    }

    /// The flag `bench floor` takes for this kind, if any.
    pub(super) fn flag(self) -> Option<&'static str> {
        match self {
            Self::Bare => None,
            Self::Library => Some("--library"),
            Self::EngineTask => Some("--engine-task"),
        }
    }

    pub(super) fn describe(self) -> &'static str {
        match self {
            Self::Bare => "bare WebSocket echo",
            Self::Library => "WebSocket echo through tokio-tungstenite",
            Self::EngineTask => "bare WebSocket echo, answered by a task of its own",
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Library => "library",
            Self::EngineTask => "engine_task",
        }
    }
}

/// Serves on a loopback port until killed; the first stdout line is
/// `listening on http://ADDR`, as `sonora serve` says it.
pub(crate) fn run(args: &FloorArgs) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let kind = FloorKind::from_flags(args.library, args.engine_task);
    runtime.block_on(serve(args.turn_ms, args.reply_ms, kind))?;
    Ok(())
}

async fn serve(turn_ms: u64, reply_ms: u64, kind: FloorKind) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    let reply = Arc::new(reply_frames(reply_ms));
    let turn_bytes = (turn_ms * 16_000 / 1000 * 2) as usize;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let reply = Arc::clone(&reply);
        tokio::spawn(async move {
            let _ = match kind {
                FloorKind::Library => with_library(stream, reply_ms, turn_bytes).await,
                FloorKind::Bare => connection(stream, Echo::here(reply, turn_bytes)).await,
                FloorKind::EngineTask => connection(stream, Echo::in_task(reply, turn_bytes)).await,
            };
        });
    }
}

/// Where the echo counts the PCM and decides to answer.
enum Echo {
    /// In the connection's task.
    Here {
        reply: Arc<Vec<u8>>,
        turn_bytes: usize,
        heard: usize,
    },
    /// In a task of its own: each frame's PCM goes to it, and each reply
    /// comes back, through a channel.
    Task {
        pcm: mpsc::Sender<Bytes>,
        replies: mpsc::Receiver<Arc<Vec<u8>>>,
    },
}

impl Echo {
    fn here(reply: Arc<Vec<u8>>, turn_bytes: usize) -> Self {
        Self::Here {
            reply,
            turn_bytes,
            heard: 0,
        }
    }

    /// Starts the echo's task; it ends when the connection drops its side.
    fn in_task(reply: Arc<Vec<u8>>, turn_bytes: usize) -> Self {
        let (pcm, mut heard_rx) = mpsc::channel::<Bytes>(32);
        let (replies_tx, replies) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut heard = 0;
            while let Some(frame) = heard_rx.recv().await {
                heard += frame.len();
                if heard >= turn_bytes {
                    heard -= turn_bytes;
                    if replies_tx.send(Arc::clone(&reply)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Self::Task { pcm, replies }
    }

    /// One frame's PCM: counted here (its reply added to `out`), or copied
    /// out of the read buffer and handed to the echo's task.
    async fn heard(&mut self, payload: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
        match self {
            Self::Here {
                reply,
                turn_bytes,
                heard,
            } => {
                *heard += payload.len();
                if *heard >= *turn_bytes {
                    *heard -= *turn_bytes;
                    out.extend_from_slice(reply);
                }
            }
            Self::Task { pcm, .. } => pcm
                .send(Bytes::copy_from_slice(payload))
                .await
                .context("the echo's task ended")?,
        }
        Ok(())
    }

    /// Reads more client bytes into `buf`, writing any reply the echo's
    /// task sends meanwhile; 0 at the end of the stream.
    async fn read(&mut self, stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<usize> {
        let Self::Task { replies, .. } = self else {
            return Ok(stream.read_buf(buf).await?);
        };
        loop {
            tokio::select! {
                read = stream.read_buf(buf) => return Ok(read?),
                reply = replies.recv() => {
                    let reply = reply.context("the echo's task ended")?;
                    stream.write_all(&reply).await?;
                }
            }
        }
    }
}

/// `reply_ms` of a quiet 24 kHz tone, in pieces of [`REPLY_FRAME_MS`].
fn reply_pieces(reply_ms: u64) -> Vec<Vec<u8>> {
    let samples = (reply_ms * REPLY_RATE_HZ / 1000) as usize;
    let pcm: Vec<u8> = (0..samples)
        .flat_map(|i| (((i % 48) as i16 - 24) * 40).to_le_bytes())
        .collect();
    let per_frame = (REPLY_FRAME_MS * REPLY_RATE_HZ / 1000) as usize * 2;
    pcm.chunks(per_frame).map(<[u8]>::to_vec).collect()
}

/// The reply as server frames, back to back.
fn reply_frames(reply_ms: u64) -> Vec<u8> {
    reply_pieces(reply_ms)
        .iter()
        .flat_map(|piece| server_frame(OP_BINARY, piece))
        .collect()
}

/// An unmasked frame, as a server sends it.
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= 0xffff => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// One client frame at the front of `buf`: its opcode, where its payload
/// is, and its whole length; `None` until it is all there. The payload is
/// unmasked in place.
fn client_frame(buf: &mut [u8]) -> anyhow::Result<Option<(u8, std::ops::Range<usize>, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let opcode = buf[0] & 0x0f;
    anyhow::ensure!(buf[1] & 0x80 != 0, "unmasked client frame");
    let (len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&buf[2..10]);
            (usize::try_from(u64::from_be_bytes(bytes))?, 10)
        }
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    anyhow::ensure!(len <= MAX_FRAME_BYTES, "a frame of {len} bytes");
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    for (i, byte) in buf[at..at + len].iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
    Ok(Some((opcode, at..at + len, at + len)))
}

async fn connection(mut stream: TcpStream, mut echo: Echo) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    // The request head; the upgrade is taken as asked.
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        anyhow::ensure!(buf.len() < 16 * 1024, "request head too long");
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    buf.drain(..head_end);
    stream
        .write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        )
        .await?;
    let mut out = Vec::new();
    loop {
        let mut start = 0;
        while let Some((opcode, payload, len)) = client_frame(&mut buf[start..])? {
            let payload = &buf[start + payload.start..start + payload.end];
            match opcode {
                OP_BINARY => echo.heard(payload, &mut out).await?,
                OP_TEXT if payload.windows(7).any(|w| w == b"\"hello\"") => {
                    out.extend(server_frame(OP_TEXT, br#"{"type":"ready"}"#));
                }
                OP_TEXT if payload.windows(6).any(|w| w == b"\"stop\"") => {
                    out.extend(server_frame(
                        OP_TEXT,
                        br#"{"type":"end","reason":"client_stopped"}"#,
                    ));
                    out.extend(server_frame(OP_CLOSE, &1000u16.to_be_bytes()));
                    stream.write_all(&out).await?;
                    return Ok(());
                }
                OP_PING => out.extend(server_frame(OP_PONG, payload)),
                OP_CLOSE => return Ok(()),
                _ => {}
            }
            start += len;
        }
        buf.drain(..start);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if echo.read(&mut stream, &mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// [`connection`] through tokio-tungstenite, configured as the gateway's
/// `/ws` is (its 4 KiB read and 16 KiB write buffers).
async fn with_library(stream: TcpStream, reply_ms: u64, turn_bytes: usize) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024);
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    let reply: Vec<bytes::Bytes> = reply_pieces(reply_ms)
        .into_iter()
        .map(bytes::Bytes::from)
        .collect();
    let mut heard = 0usize;
    while let Some(message) = ws.next().await {
        match message? {
            Message::Binary(payload) => {
                heard += payload.len();
                if heard >= turn_bytes {
                    heard -= turn_bytes;
                    for frame in &reply {
                        ws.feed(Message::Binary(frame.clone())).await?;
                    }
                    ws.flush().await?;
                }
            }
            Message::Text(text) if text.contains("\"hello\"") => {
                ws.send(Message::text(r#"{"type":"ready"}"#)).await?;
            }
            Message::Text(text) if text.contains("\"stop\"") => {
                ws.send(Message::text(r#"{"type":"end","reason":"client_stopped"}"#))
                    .await?;
                ws.close(None).await?;
                return Ok(());
            }
            Message::Close(_) => return Ok(()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_unmask_in_every_length_form() {
        for len in [5usize, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut bytes = super::super::client::client_frame(OP_BINARY, &payload);
            let whole = bytes.len();
            assert!(client_frame(&mut bytes[..whole - 1]).unwrap().is_none());
            let (opcode, range, used) = client_frame(&mut bytes).unwrap().unwrap();
            assert_eq!((opcode, used), (OP_BINARY, whole));
            assert_eq!(&bytes[range], &payload[..]);
        }
    }

    #[test]
    fn unmasked_and_oversized_frames_are_refused() {
        let mut unmasked = server_frame(OP_TEXT, b"hola");
        assert!(client_frame(&mut unmasked).is_err());
        let mut huge = vec![0x82, 0xff];
        huge.extend_from_slice(&(MAX_FRAME_BYTES as u64 + 1).to_be_bytes());
        assert!(client_frame(&mut huge).is_err());
    }

    #[test]
    fn a_reply_is_whole_200_ms_frames() {
        let frames = reply_frames(1_000);
        // 5 frames of 9,600 bytes, each with a 4-byte header.
        assert_eq!(frames.len(), 5 * (9_600 + 4));
        assert_eq!(&frames[..4], &[0x82, 126, 0x25, 0x80]);
    }
}
