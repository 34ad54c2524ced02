//! One `/ws` connection: waits for `hello` (`handshake`), runs a
//! conversation (`conversing`: the loop between the socket and the
//! conversation) and turns what the conversation says into frames
//! (`downlink`: messages, and reply audio batched into binary frames).
//!
//! Writes are fed to the socket and flushed once per batch: everything the
//! conversation has ready when the connection wakes goes out in one write.

mod conversing;
mod downlink;
mod handshake;
mod ledger;
mod queue;
mod replay;
mod resume;

pub(super) use resume::Resumable;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::BytesMut;
use futures_util::SinkExt;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite;
use tracing::Instrument;

use super::Shared;
use super::metrics::Refusal;
use super::protocol::{ErrorCode, Hello, MAX_TEXT_MESSAGE_BYTES, ProtocolError, ServerMessage};
use crate::audio::{StreamDecoder, StreamResampler};
use crate::engine::pool::{Admission, Hold, Want};
use crate::engine::{ConversationOptions, StartError};
use crate::session::{CloseReason, Conversation, ConversationHandle};

pub(super) const CLOSE_NORMAL: u16 = 1000;
pub(super) const CLOSE_GOING_AWAY: u16 = 1001;
pub(super) const CLOSE_POLICY: u16 = 1008;
pub(super) const CLOSE_TOO_BIG: u16 = 1009;
pub(super) const CLOSE_INTERNAL: u16 = 1011;
pub(super) const CLOSE_TRY_AGAIN: u16 = 1013;

/// The close reason when the engine sheds load (its service throttles).
pub(super) const ENGINE_BUSY_REASON: &str =
    "engine_busy: the speech service is throttling; try again shortly";

/// How long a closing server waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A refusal after the upgrade: close code and reason, nothing else.
pub(super) async fn refuse(mut socket: WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = timeout(
        Duration::from_secs(2),
        socket.send(Message::Close(Some(frame))),
    )
    .await;
}

/// Why the connection loop stopped.
enum Exit {
    /// The conversation ended and the client was told.
    Ended(CloseReason),
    /// The client went away or a write timed out.
    Lost(Option<CloseReason>),
}

pub(super) struct Connection {
    /// `None` while the conversation waits for its client to re-attach.
    socket: Option<WebSocket>,
    shared: Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    write_timeout: Duration,
    /// The connection's span, then its conversation's. Entered around the
    /// handshake, the start and every log line, but not around the
    /// per-frame loop: entering spans on every wake-up was a measurable
    /// share of the gateway's CPU, and that loop's logs enter it themselves.
    span: tracing::Span,
    /// The conversation's id: the `session` of `ready`, the ledger's key.
    conversation: String,
    /// The API key whose client token opened the conversation.
    key: Option<String>,
    /// Reply audio not yet handed to the socket: consecutive audio goes
    /// out as one binary frame. Its allocation is reused once the socket
    /// has copied the frame out.
    audio: BytesMut,
    /// Numbers the conversation's frames and keeps those a returning client
    /// may need; `None` until the conversation starts.
    replay: Option<replay::Replay>,
}

/// A running conversation and what the connection tracks of it.
struct Running {
    handle: ConversationHandle,
    hello: Hello,
    turns: u32,
    latency_ms: Vec<u64>,
    resampler: Option<(u32, StreamResampler)>,
    /// Resampled reply audio, reused from frame to frame.
    resampled: Vec<i16>,
    /// The client closed its side: outputs are drained, not written.
    client_gone: bool,
    /// `ready` went out.
    ready: bool,
    /// The client sent `stop`: what it sends after is dropped unread.
    stopped: bool,
    /// Tool calls sent to this client and not yet answered.
    tool_calls: HashSet<String>,
    /// What the ledger keeps of this conversation, its usage included.
    record: super::record::Record,
    /// The usage delta the ledger is committing, and what waits behind it.
    usage: super::record::PendingUsage<crate::session::ClientOutput>,
    /// How its client re-attaches, when the server keeps conversations for
    /// their clients (see `resume.rs`).
    resume: Option<resume::Slot>,
    /// Its place on an engine instance, until the connection ends.
    _hold: Hold,
}

impl Connection {
    pub(super) fn new(
        socket: WebSocket,
        shared: Arc<Shared>,
        id: u64,
        peer: SocketAddr,
        span: tracing::Span,
    ) -> Self {
        let write_timeout = Duration::from_millis(u64::from(shared.config.server.write_timeout_ms));
        Self {
            socket: Some(socket),
            shared,
            id,
            peer,
            write_timeout,
            span,
            conversation: String::new(),
            key: None,
            audio: BytesMut::new(),
            replay: None,
        }
    }

    pub(super) async fn run(mut self) {
        let connection = self.span.clone();
        let Some(mut hello) = self.await_hello().instrument(connection.clone()).await else {
            return;
        };
        if let Some(resume) = hello.resume.take() {
            self.resume(resume, hello.audio)
                .instrument(connection.clone())
                .await;
            return;
        }
        // Named by the session id its `ready` gives the client.
        let language = match hello.language.as_str() {
            "" => self.shared.config.engine.language.as_str(),
            language => language,
        };
        self.conversation = format!("{}-{}", self.shared.instance, self.id);
        let span = connection
            .in_scope(|| crate::telemetry::conversation_span(&self.conversation, language));
        let Some(mut running) = self.start(hello).instrument(span.clone()).await else {
            return;
        };
        let counters = Arc::clone(&running.handle.counters);
        self.shared.metrics.opened(self.id, counters);
        self.span = span;
        let exit = self.converse(&mut running).await;
        if let Some(slot) = running.resume.take() {
            self.forget(slot);
        }
        let reason = match exit {
            Exit::Ended(reason) => Some(reason),
            Exit::Lost(reason) => reason,
        };
        // The caller's admission slot is held until the conversation, and
        // every task of its engine, has really ended: a lost client must not
        // leave an engine (and a paid upstream stream) running outside the
        // limits.
        let ConversationHandle {
            input,
            mut output,
            task,
            shutdown,
            engine_ended,
            ..
        } = running.handle;
        drop(input);
        shutdown.trigger();
        // What the engine still reports is not shown to anyone, but its
        // cost was spent: the ledger still records it, after what it was
        // committing and what waited behind that.
        self.settle_pending_usage(&mut running.record, &mut running.usage)
            .await;
        while let Some(output) = output.recv().await {
            if let crate::session::ClientOutput::Event(crate::engine::EngineEvent::Usage(delta)) =
                output
            {
                let _ = self.record_usage(&mut running.record, delta).await;
            }
        }
        let _ = task.await;
        let ended = reason.map_or("client_lost", |reason| reason.as_str());
        self.record_end(&running.record, ended, running.turns).await;
        let _ = engine_ended.await;
        self.shared.metrics.closed(self.id, reason);
    }

    /// Hands one message to the socket, behind any pending reply audio,
    /// without flushing; `false` when the client is gone or too slow.
    async fn feed(&mut self, message: Message) -> bool {
        self.feed_audio().await && self.feed_now(message).await
    }

    /// Hands the pending reply audio to the socket as one binary frame.
    async fn feed_audio(&mut self) -> bool {
        if self.audio.is_empty() {
            return true;
        }
        let audio = self.audio.split().freeze();
        self.feed_now(Message::Binary(audio)).await
    }

    /// Numbers a frame of the conversation (and keeps it for a client that
    /// may return), then hands it to the socket, if there is one.
    async fn feed_now(&mut self, message: Message) -> bool {
        let message = match self.replay.as_mut() {
            Some(replay) => {
                let message = replay.number(message);
                let dropped = replay.take_dropped_ms();
                if dropped > 0 {
                    self.shared.metrics.resume_dropped(dropped);
                }
                message
            }
            None => message,
        };
        self.feed_raw(message).await
    }

    /// Hands a frame to the socket as it is; `true` while the client is
    /// away (the frame is kept for it).
    async fn feed_raw(&mut self, message: Message) -> bool {
        let Some(socket) = self.socket.as_mut() else {
            return true;
        };
        let fed = timeout(self.write_timeout, socket.feed(message)).await;
        self.written(fed)
    }

    /// Writes out everything fed so far, pending reply audio included.
    async fn flush(&mut self) -> bool {
        if !self.feed_audio().await {
            return false;
        }
        let Some(socket) = self.socket.as_mut() else {
            return true;
        };
        let flushed = timeout(self.write_timeout, SinkExt::flush(socket)).await;
        self.written(flushed)
    }

    fn written(
        &self,
        result: Result<Result<(), axum::Error>, tokio::time::error::Elapsed>,
    ) -> bool {
        match result {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                self.shared.metrics.write_timeout();
                false
            }
        }
    }

    /// Sends one message and everything before it; `false` when the client
    /// is gone or too slow.
    async fn send(&mut self, message: Message) -> bool {
        self.feed(message).await && self.flush().await
    }

    async fn send_message(&mut self, message: &ServerMessage<'_>) -> bool {
        self.send(Message::Text(message.to_text().into())).await
    }

    async fn send_error(&mut self, error: &ProtocolError, fatal: bool) -> bool {
        self.shared.metrics.error(error.code);
        let message = ServerMessage::error(error.code, &error.message, fatal);
        self.send_message(&message).await
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let reason: String = reason.chars().take(120).collect();
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if self.socket.is_none() || !self.send(Message::Close(Some(frame))).await {
            return;
        }
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        // Finish the closing handshake: read (and drop) what the client
        // still sends until its own close, so no unread bytes reset the
        // connection before the close frame is read.
        let _ = timeout(CLOSE_WAIT, async {
            while let Some(Ok(message)) = socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// `false` for a frame over `server.max_message_bytes` (or a text frame
    /// over [`MAX_TEXT_MESSAGE_BYTES`]), after telling the client and
    /// closing with 1009.
    async fn size_ok(&mut self, frame: &Option<Result<Message, axum::Error>>) -> bool {
        let max = self.shared.config.server.max_message_bytes;
        let (bytes, limit) = match frame {
            Some(Ok(Message::Text(text))) => (text.len(), max.min(MAX_TEXT_MESSAGE_BYTES)),
            Some(Ok(Message::Binary(bytes))) => (bytes.len(), max),
            _ => (0, max),
        };
        if bytes <= limit {
            return true;
        }
        let message = format!("a message of {bytes} bytes is over the {limit}-byte limit");
        let error = ProtocolError::new(ErrorCode::MessageTooLarge, message);
        self.send_error(&error, true).await;
        self.close(CLOSE_TOO_BIG, "message too large").await;
        false
    }

    /// A read error: an oversized frame is told before the close.
    async fn read_failed(&mut self, error: &axum::Error) {
        if is_too_large(error) {
            let limit = self.shared.config.server.max_message_bytes;
            let message = format!("a message was larger than the {limit}-byte limit");
            let error = ProtocolError::new(ErrorCode::MessageTooLarge, message.clone());
            self.send_error(&error, true).await;
            self.close(CLOSE_TOO_BIG, &message).await;
        }
    }

    /// Starts the engine and the conversation for an accepted hello, after
    /// a wait for a place on an engine instance if every one is full.
    async fn start(&mut self, hello: Hello) -> Option<Running> {
        let Some(pool) = self.shared.engine.get().cloned() else {
            self.close(CLOSE_TRY_AGAIN, "the engine is still loading")
                .await;
            return None;
        };
        let defaults = &self.shared.config.engine;
        let options = ConversationOptions {
            language: if hello.language.is_empty() {
                defaults.language.clone()
            } else {
                hello.language.clone()
            },
            voice: if hello.voice.is_empty() {
                defaults.voice.clone()
            } else {
                hello.voice.clone()
            },
            history: Vec::new(),
        };
        let want = Want {
            engine: hello.engine.clone(),
            voice: options.voice.clone(),
        };
        let slot = match pool.enter(&want) {
            Admission::Placed(slot) => slot,
            Admission::Queued(entry) => self.wait_for_place(entry, &hello.token).await?,
            Admission::Full => {
                let message =
                    "every engine that fits is full, and so is the queue; try again later";
                self.refuse_busy(Refusal::QueueFull, message, &hello.token)
                    .await;
                return None;
            }
        };
        let placed = Arc::clone(slot.instance());
        let mut record = self.record_start(&options, &placed, &hello.token).await?;
        let started = match pool.start(slot, &want, options) {
            Ok(started) => started,
            Err(StartError::Busy { message, .. }) => {
                // Shedding load: a refusal like a full server, not a failure.
                self.record_end(&record, ErrorCode::EngineBusy.as_str(), 0)
                    .await;
                self.refuse_busy(Refusal::EngineBusy, &message, &hello.token)
                    .await;
                return None;
            }
            Err(message) => {
                self.log(&format!("the engine could not start: {message}"));
                self.record_end(&record, ErrorCode::EngineUnavailable.as_str(), 0)
                    .await;
                self.release_token(&hello.token).await;
                let message = format!("the {} engine could not start", placed.name());
                let error = ProtocolError::new(ErrorCode::EngineUnavailable, message.clone());
                self.send_error(&error, true).await;
                self.close(CLOSE_INTERNAL, "engine unavailable").await;
                return None;
            }
        };
        record.started_on(&placed, &started, pool.routed());
        let session = started.session;
        let decoder = StreamDecoder::new(Some(hello.audio), self.shared.limits.decoder);
        let handle = Conversation::spawn(session, Some(decoder), self.shared.limits);
        let resume = self.shared.resumable.register(&self.shared.config.server);
        let kept = match resume {
            Some(_) => self.shared.config.server.resume_buffer_bytes,
            None => 0,
        };
        self.replay = Some(replay::Replay::new(kept));
        Some(Running {
            handle,
            hello,
            turns: 0,
            latency_ms: Vec::new(),
            resampler: None,
            resampled: Vec::new(),
            client_gone: false,
            ready: false,
            stopped: false,
            tool_calls: HashSet::new(),
            record,
            usage: super::record::PendingUsage::default(),
            resume,
            _hold: started.hold,
        })
    }

    /// A warning in the server log about this connection (its spans name
    /// it). Full texts (an engine's own error messages) go here, never to
    /// the client.
    fn log(&self, what: &str) {
        let what = crate::redact::urls_in(what);
        self.span.in_scope(|| tracing::warn!("{what}"));
    }
}

/// Whether a read failed on a frame or message over the socket library's
/// size limits (a message or frame over twice `server.max_message_bytes`,
/// or a control frame over 125 bytes).
fn is_too_large(error: &axum::Error) -> bool {
    use std::error::Error as _;
    use tungstenite::error::{Error, ProtocolError};
    matches!(
        error.source().and_then(|e| e.downcast_ref::<Error>()),
        Some(Error::Capacity(_) | Error::Protocol(ProtocolError::ControlFrameTooBig))
    )
}

/// The next frame of `socket`; never, without one.
async fn receive(socket: &mut Option<WebSocket>) -> Option<Result<Message, axum::Error>> {
    match socket {
        Some(socket) => socket.recv().await,
        None => std::future::pending().await,
    }
}

/// Completes once the server shuts down.
async fn shutting_down(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}
