//! One `/ws` connection: waits for `hello`, runs a conversation, and
//! translates between the wire protocol and `session`.

mod handshake;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde_json::Value;
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use super::protocol::{
    self, ClientMessage, ErrorCode, Hello, MAX_OPEN_TOOL_CALLS, MAX_TEXT_MESSAGE_BYTES,
    ProtocolError, out,
};
use super::{OUTPUT_RATE_HZ, Shared};
use crate::audio::{AudioFormat, StreamDecoder, StreamResampler};
use crate::engine::{ConversationOptions, EngineEvent, ErrorKind, StartError};
use crate::session::{
    ClientInput, ClientOutput, CloseReason, Conversation, ConversationHandle, ConversationSummary,
};
use crate::usage::UsageDelta;

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

/// How often a running conversation gets a `stats` message.
const STATS_EVERY: Duration = Duration::from_secs(1);

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
    socket: WebSocket,
    shared: Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    write_timeout: Duration,
}

/// A running conversation and what the connection tracks of it.
struct Running {
    handle: ConversationHandle,
    hello: Hello,
    usage: UsageDelta,
    turns: u32,
    latency_ms: Vec<u64>,
    resampler: Option<(u32, StreamResampler)>,
    /// The client closed its side: outputs are drained, not written.
    client_gone: bool,
    /// `ready` went out.
    ready: bool,
    /// The client sent `stop`: what it sends after is dropped unread.
    stopped: bool,
    /// Tool calls sent to this client and not yet answered.
    tool_calls: HashSet<String>,
}

impl Connection {
    pub(super) fn new(socket: WebSocket, shared: Arc<Shared>, id: u64, peer: SocketAddr) -> Self {
        let write_timeout = Duration::from_millis(u64::from(shared.config.server.write_timeout_ms));
        Self {
            socket,
            shared,
            id,
            peer,
            write_timeout,
        }
    }

    pub(super) async fn run(mut self) {
        let Some(hello) = self.await_hello().await else {
            return;
        };
        // Named by the session id its `ready` gives the client.
        let language = match hello.language.as_str() {
            "" => self.shared.config.engine.language.as_str(),
            language => language,
        };
        let id = format!("{}-{}", self.id, self.peer.port());
        let span = crate::telemetry::conversation_span(&id, language);
        let Some(mut running) = self.start(hello).instrument(span.clone()).await else {
            return;
        };
        let counters = Arc::clone(&running.handle.counters);
        self.shared.metrics.opened(self.id, counters);
        let exit = self.converse(&mut running).instrument(span).await;
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
        while output.recv().await.is_some() {}
        let _ = task.await;
        let _ = engine_ended.await;
        self.shared.metrics.closed(self.id, reason);
    }

    /// Sends one message within the write timeout; `false` when the client
    /// is gone or too slow.
    async fn send(&mut self, message: Message) -> bool {
        match timeout(self.write_timeout, self.socket.send(message)).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                self.shared.metrics.write_timeout();
                false
            }
        }
    }

    async fn send_json(&mut self, value: &Value) -> bool {
        self.send(Message::Text(value.to_string().into())).await
    }

    async fn send_error(&mut self, error: &ProtocolError, fatal: bool) -> bool {
        self.shared.metrics.error(error.code);
        self.send_json(&out::error(error.code, &error.message, fatal))
            .await
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let reason: String = reason.chars().take(120).collect();
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if !self.send(Message::Close(Some(frame))).await {
            return;
        }
        // Finish the closing handshake: read (and drop) what the client
        // still sends until its own close, so no unread bytes reset the
        // connection before the close frame is read.
        let _ = timeout(CLOSE_WAIT, async {
            while let Some(Ok(message)) = self.socket.recv().await {
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
        let text = error.to_string();
        if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
            let limit = self.shared.config.server.max_message_bytes;
            let message = format!("a message was larger than the {limit}-byte limit");
            let error = ProtocolError::new(ErrorCode::MessageTooLarge, message.clone());
            self.send_error(&error, true).await;
            self.close(CLOSE_TOO_BIG, &message).await;
        }
    }

    /// Starts the engine and the conversation for an accepted hello.
    async fn start(&mut self, hello: Hello) -> Option<Running> {
        let Some(engine) = self.shared.engine.get().cloned() else {
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
        };
        let session = match engine.start(options) {
            Ok(session) => session,
            Err(StartError::Busy { message, .. }) => {
                // Shedding load: a refusal like a full server, not a failure.
                self.shared
                    .metrics
                    .refused(super::metrics::Refusal::EngineBusy);
                let error = ProtocolError::new(ErrorCode::EngineBusy, message);
                self.send_error(&error, true).await;
                self.close(CLOSE_TRY_AGAIN, ENGINE_BUSY_REASON).await;
                return None;
            }
            Err(message) => {
                self.log(&format!("the engine could not start: {message}"));
                let message = format!("the {} engine could not start", engine.name());
                let error = ProtocolError::new(ErrorCode::EngineUnavailable, message.clone());
                self.send_error(&error, true).await;
                self.close(CLOSE_INTERNAL, "engine unavailable").await;
                return None;
            }
        };
        let decoder = StreamDecoder::new(Some(hello.audio), self.shared.limits.decoder);
        let handle = Conversation::spawn(session, Some(decoder), self.shared.limits);
        Some(Running {
            handle,
            hello,
            usage: UsageDelta::default(),
            turns: 0,
            latency_ms: Vec::new(),
            resampler: None,
            client_gone: false,
            ready: false,
            stopped: false,
            tool_calls: HashSet::new(),
        })
    }

    /// A warning in the server log about this connection (its spans name
    /// it). Full texts (an engine's own error messages) go here, never to
    /// the client.
    fn log(&self, what: &str) {
        let what = crate::redact::urls_in(what);
        tracing::warn!("{what}");
    }

    async fn converse(&mut self, running: &mut Running) -> Exit {
        let mut shutdown = self.shared.shutdown.clone();
        let mut shutdown_sent = false;
        let mut stats = tokio::time::interval_at(Instant::now() + STATS_EVERY, STATS_EVERY);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                output = running.handle.output.recv() => {
                    let Some(output) = output else {
                        return Exit::Lost(None);
                    };
                    if let Some(exit) = self.on_output(running, output).await {
                        return exit;
                    }
                }
                frame = self.socket.recv(), if !running.client_gone => {
                    if !self.on_frame(running, frame).await {
                        running.client_gone = true;
                        let _ = running.handle.input.try_send(ClientInput::Stop);
                    }
                }
                // `stats` only once the client has its `ready`.
                _ = stats.tick(), if !running.client_gone && running.ready => {
                    let snapshot = running.handle.counters.snapshot();
                    let message = out::stats(&snapshot, running.turns, &running.latency_ms);
                    if !self.send_json(&message).await {
                        return Exit::Lost(Some(CloseReason::SlowClient));
                    }
                }
                () = shutting_down(&mut shutdown), if !shutdown_sent => {
                    shutdown_sent = true;
                    running.handle.shutdown();
                }
            }
        }
    }

    /// One client frame; `false` when the client is gone.
    async fn on_frame(
        &mut self,
        running: &mut Running,
        frame: Option<Result<Message, axum::Error>>,
    ) -> bool {
        if !self.size_ok(&frame).await {
            return false;
        }
        let input = match frame {
            // After `stop` the conversation reads no more input: what the
            // client still sends is dropped, and its `end` still comes.
            Some(Ok(Message::Binary(_) | Message::Text(_))) if running.stopped => return true,
            Some(Ok(Message::Binary(bytes))) => ClientInput::Audio(bytes.to_vec()),
            Some(Ok(Message::Text(text))) => match protocol::parse_client(&text) {
                Ok(ClientMessage::Text(text)) => ClientInput::Text(text),
                Ok(ClientMessage::ToolResult { id, result }) => {
                    if !running.tool_calls.remove(&id) {
                        let shown: String = id.chars().take(64).collect();
                        let error = ProtocolError::new(
                            ErrorCode::UnknownToolCall,
                            format!(
                                "no open tool call has the id {shown:?}: a result is taken once, for a call this conversation sent"
                            ),
                        );
                        return self.send_error(&error, false).await;
                    }
                    ClientInput::ToolResult { id, json: result }
                }
                Ok(ClientMessage::Stop) => {
                    running.stopped = true;
                    ClientInput::Stop
                }
                Ok(ClientMessage::Hello(_)) => {
                    let error = ProtocolError::new(
                        ErrorCode::DuplicateHello,
                        "this conversation already has its hello; open a new socket for another",
                    );
                    return self.send_error(&error, false).await;
                }
                Err(error) => return self.send_error(&error, false).await,
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return true,
            Some(Ok(Message::Close(_))) | None => return false,
            Some(Err(e)) => {
                self.read_failed(&e).await;
                return false;
            }
        };
        // A full input channel holds this client back: that is the point.
        // A conversation that has ended takes no more input; its `end` is
        // on the way, so the client is not gone: the frame is dropped.
        let _ = running.handle.input.send(input).await;
        true
    }

    /// One conversation output; `Some` when the connection is done.
    async fn on_output(&mut self, running: &mut Running, output: ClientOutput) -> Option<Exit> {
        let message = match output {
            ClientOutput::Event(EngineEvent::Audio(pcm)) => {
                let samples = match &mut running.resampler {
                    _ if pcm.rate_hz == OUTPUT_RATE_HZ => pcm.samples,
                    Some((rate, resampler)) if *rate == pcm.rate_hz => {
                        let mut out = Vec::with_capacity(pcm.samples.len() * 2);
                        resampler.push(&pcm.samples, &mut out);
                        out
                    }
                    slot => {
                        let mut out = Vec::new();
                        if let Ok(mut resampler) = StreamResampler::new(pcm.rate_hz, OUTPUT_RATE_HZ)
                        {
                            resampler.push(&pcm.samples, &mut out);
                            *slot = Some((pcm.rate_hz, resampler));
                        }
                        out
                    }
                };
                let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
                Message::Binary(bytes.into())
            }
            ClientOutput::Event(EngineEvent::Ready {
                engine,
                model,
                voice,
            }) => {
                let session = format!("{}-{}", self.id, self.peer.port());
                let language = if running.hello.language.is_empty() {
                    self.shared.config.engine.language.clone()
                } else {
                    running.hello.language.clone()
                };
                let input = format_name(&running.hello.audio);
                running.ready = true;
                let ready = out::ready(
                    &session,
                    &engine,
                    &model,
                    &voice,
                    &language,
                    &input,
                    OUTPUT_RATE_HZ,
                );
                Message::Text(ready.to_string().into())
            }
            ClientOutput::Event(EngineEvent::Usage(delta)) => {
                running.usage.add(&delta);
                self.shared.metrics.usage(&delta);
                Message::Text(out::usage(&delta, &running.usage).to_string().into())
            }
            ClientOutput::Event(mut event) => {
                match &mut event {
                    EngineEvent::TurnEnd { .. } => {
                        running.turns = running.turns.saturating_add(1);
                    }
                    EngineEvent::ToolCall { id, .. }
                        if running.tool_calls.len() < MAX_OPEN_TOOL_CALLS =>
                    {
                        running.tool_calls.insert(id.clone());
                    }
                    EngineEvent::Error { kind, message } => {
                        self.shared.metrics.error(match kind {
                            ErrorKind::Busy => ErrorCode::Busy,
                            _ => ErrorCode::EngineError,
                        });
                        self.log(&format!("engine error ({kind:?}): {message}"));
                        *message = safe_engine_message(*kind, message);
                    }
                    _ => {}
                }
                let value = out::event(&event)?;
                Message::Text(value.to_string().into())
            }
            ClientOutput::Latency { turn_id, ms } => {
                running.latency_ms.push(ms);
                self.shared.metrics.latency(ms);
                let value = serde_json::json!({"type": "latency", "turn": turn_id, "ms": ms});
                Message::Text(value.to_string().into())
            }
            ClientOutput::Warning { code, message } => {
                let code = ErrorCode::for_warning(code);
                self.shared.metrics.error(code);
                Message::Text(out::error(code, &message, false).to_string().into())
            }
            ClientOutput::Closed {
                reason,
                message,
                summary,
            } => {
                let message = match reason {
                    CloseReason::EngineError => {
                        self.log(&format!("ended by the engine: {message}"));
                        "the speech engine failed; the conversation cannot go on".to_owned()
                    }
                    _ => crate::redact::urls_in(&message),
                };
                return Some(self.end(running, reason, &message, &summary).await);
            }
        };
        if running.client_gone {
            return None;
        }
        if self.send(message).await {
            None
        } else {
            // The client cannot be written to: stop the conversation now.
            running.client_gone = true;
            running.handle.shutdown();
            Some(Exit::Lost(Some(CloseReason::SlowClient)))
        }
    }

    /// The conversation closed: `error` for bad audio, `end`, close frame.
    async fn end(
        &mut self,
        running: &Running,
        reason: CloseReason,
        message: &str,
        summary: &ConversationSummary,
    ) -> Exit {
        if running.client_gone {
            return Exit::Ended(reason);
        }
        if reason == CloseReason::BadAudio {
            let error = ProtocolError::new(ErrorCode::BadAudio, message);
            self.send_error(&error, true).await;
        }
        self.send_json(&out::end(reason.code(), message, summary))
            .await;
        let code = match reason {
            CloseReason::Shutdown => CLOSE_GOING_AWAY,
            CloseReason::EngineError | CloseReason::EngineStalled => CLOSE_INTERNAL,
            _ => CLOSE_NORMAL,
        };
        self.close(code, reason.code()).await;
        Exit::Ended(reason)
    }
}

/// Completes once the server shuts down.
async fn shutting_down(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

/// What a client is told of an engine error: the engine's own words only
/// for input it refused (they speak of the client's input); otherwise a
/// short safe message, since the full text (in the server log) may name an
/// account, a role or an internal address.
fn safe_engine_message(kind: ErrorKind, message: &str) -> String {
    match kind {
        ErrorKind::BadInput | ErrorKind::Busy => crate::redact::urls_in(message),
        ErrorKind::Transient => {
            "the speech engine had a passing fault and is recovering; the conversation goes on"
                .to_owned()
        }
        ErrorKind::Fatal => "the speech engine failed; the conversation cannot go on".to_owned(),
    }
}

fn format_name(format: &AudioFormat) -> String {
    match format {
        AudioFormat::Pcm16 { rate_hz, .. } => format!("pcm16/{rate_hz}"),
        other => other.name().to_owned(),
    }
}
