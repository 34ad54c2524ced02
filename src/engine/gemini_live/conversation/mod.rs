//! One conversation across connections. The loop reads the conversation's
//! input, the connection's messages, tool results and the connection being
//! opened: the first, a resumed one after `goAway` (opened in the
//! background while audio still goes to the old connection, switched to at
//! once when ready, so no audio is lost or held), or a replacement after a
//! loss (resumed with the latest handle, or fresh with the conversation as
//! text when there is none yet). User audio that arrives while no
//! connection is open waits in a bounded backlog.

mod events;

use crate::engine::Role;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::connect::{self, Failure, Opening, Verdict};
use super::cost::Costing;
use super::wire::{self, ClientMessage};
use super::{INPUT_RATE_HZ, Shared};
use crate::engine::cloud::{self, Backlog, Connections, Events, Opener, Retries, Step, backoff};
use crate::engine::cloud::{CLOSE_LIMIT, SEND_WAIT};
use crate::engine::text_history::History;
use crate::engine::tool_runner::{ToolDone, ToolRunner};
use crate::engine::wss::{Conn, Received};
use crate::engine::{ConversationOptions, EngineEvent, EngineInput, ErrorKind, TurnEndReason};

/// Seconds of user audio kept while no connection is open.
const BACKLOG_SECONDS: u32 = 5;
/// Most audio in one message (100 ms).
const MAX_CHUNK: usize = INPUT_RATE_HZ as usize / 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    First,
    /// After `goAway`: the old connection still works.
    Resume,
    /// After a loss: no connection meanwhile.
    Reconnect,
}

/// The turn in progress: the user's words and the model's reply to them.
#[derive(Debug, Default)]
struct Turn {
    id: u64,
    user: String,
    assistant: String,
    /// The model produced something (audio, transcript, a tool call).
    output: bool,
    audio: bool,
    calls: u32,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    options: ConversationOptions,
    input: mpsc::Receiver<EngineInput>,
    events: mpsc::Sender<EngineEvent>,
) {
    let ConversationOptions {
        voice,
        language,
        history,
    } = options;
    let settings = &shared.settings;
    let (tools, tool_rx) = ToolRunner::new(shared.tools.clone());
    let mut driver = Driver {
        costing: Costing::new(&settings.model, &settings.prices),
        shared: shared.clone(),
        voice,
        language,
        events: Events::new(events),
        history: History::from_messages(&history),
        tools,
        calls: HashMap::new(),
        conn: None,
        generation: 0,
        pending: None,
        backlog: Backlog::new(INPUT_RATE_HZ, BACKLOG_SECONDS),
        handle: None,
        go_away: None,
        turn_ids: 0,
        turn: None,
        stale_turn_complete: false,
        retries: Retries::new(settings.max_retries),
        retried_once: false,
        awaiting: None,
        lost_at: None,
        closing_since: None,
    };
    cloud::run(&mut driver, input, tool_rx).await;
}

struct Driver {
    shared: Arc<Shared>,
    voice: String,
    language: String,
    events: Events,
    costing: Costing,
    history: History,
    tools: ToolRunner,
    /// Tool calls not answered yet (the registry's and the client's): id to
    /// name and the connection generation that asked.
    calls: HashMap<String, (String, u32)>,
    conn: Option<Conn>,
    /// Counts connections: a tool result goes back only to the one that asked.
    generation: u32,
    pending: Option<Opener<Purpose, Failure>>,
    /// User audio waiting for a connection.
    backlog: Backlog,
    /// The latest resumable session handle.
    handle: Option<String>,
    /// After `goAway`: when to open the resumed connection even if the
    /// conversation is not quiet.
    go_away: Option<Instant>,
    turn_ids: u64,
    turn: Option<Turn>,
    /// A turn was ended here (barge-in) before the service's `turnComplete`
    /// for it, which is then skipped.
    stale_turn_complete: bool,
    /// Reconnections since the last completed reply.
    retries: Retries,
    /// The one retry of a "not implemented" refusal is used.
    retried_once: bool,
    /// Since when a reply is due (the user's last words, a tool result).
    awaiting: Option<Instant>,
    /// When the connection was lost, for the reconnection's gap.
    lost_at: Option<Instant>,
    closing_since: Option<Instant>,
}

impl cloud::Driver for Driver {
    type Purpose = Purpose;
    type Error = Failure;
    const SERVICE: &'static str = "Gemini Live";
    /// Housekeeping: stall, resumption and close checks.
    const TICK: Duration = Duration::from_millis(250);

    fn events(&self) -> &Events {
        &self.events
    }

    async fn on_input(&mut self, message: EngineInput) -> Step {
        match message {
            EngineInput::Audio(samples) => {
                if let Some(conn) = self.conn.as_mut() {
                    if let Err(failure) = send_audio(conn, &samples).await {
                        return self.lost(failure).await;
                    }
                } else {
                    self.backlog.hold(&samples);
                }
            }
            EngineInput::Text(text) => {
                self.begin_turn();
                self.history.push(Role::User, &text);
                self.send(&ClientMessage::text(&text)).await;
                self.awaiting = Some(Instant::now());
            }
            EngineInput::ToolResult { id, json } => {
                self.tools.finished(&id);
                self.answer_call(&id, &json).await;
            }
            EngineInput::Close => {
                self.closing_since = Some(Instant::now());
                if self.quiet() {
                    return Step::Stop;
                }
            }
        }
        Step::Go
    }

    fn ready(&self) -> EngineEvent {
        EngineEvent::Ready {
            engine: "gemini-live".into(),
            model: self.shared.settings.model.clone(),
            voice: self.voice.clone(),
        }
    }

    async fn on_message(&mut self, message: Received) -> Step {
        let parsed = match message {
            Received::Data(bytes) => wire::parse(&bytes),
            Received::Closed(frame) => {
                return self.lost(Failure::from_close(frame.as_ref())).await;
            }
            Received::Control => return Step::Go,
            Received::Lost(why) => return self.lost(Failure::retry(why)).await,
        };
        let Some(message) = parsed else {
            self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("unreadable Gemini Live message ignored");
            return Step::Go;
        };
        self.on_server(message).await
    }

    fn priced(&self) -> bool {
        self.costing.priced()
    }

    async fn on_opened(&mut self, ready: Result<Conn, Failure>) -> Step {
        let Some(pending) = self.pending.take() else {
            return Step::Go;
        };
        let now = Instant::now();
        let mut conn = match ready {
            Ok(conn) => conn,
            Err(failure) => return self.on_open_failed(pending.purpose, failure).await,
        };
        self.generation += 1;
        let backlog = self.backlog.take();
        if let Err(failure) = send_audio(&mut conn, &backlog).await {
            self.conn = Some(conn);
            return self.lost(failure).await;
        }
        let old = self.conn.replace(conn);
        match pending.purpose {
            Purpose::First => {}
            Purpose::Resume => {
                self.go_away = None;
                if let Some(old) = old {
                    cloud::close_in_background(old);
                }
                // A reply the old connection was still giving is cut: the
                // resumed session does not go on with it.
                self.abandon_turn().await;
                self.shared
                    .stats
                    .resumptions
                    .fetch_add(1, Ordering::Relaxed);
                let prepared_ms = now.duration_since(pending.started).as_secs_f64() * 1000.0;
                tracing::info!(
                    generation = self.generation,
                    prepared_ms,
                    "Gemini Live resumed"
                );
                self.events.rotated(self.generation, 0.0).await;
            }
            Purpose::Reconnect => {
                self.shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                let since = self.lost_at.take().unwrap_or(pending.started);
                self.events
                    .rotated(
                        self.generation,
                        now.duration_since(since).as_secs_f64() * 1000.0,
                    )
                    .await;
            }
        }
        Step::Go
    }

    fn open_first(&mut self) {
        self.open(Purpose::First, Duration::ZERO);
    }

    async fn on_tool_done(&mut self, done: ToolDone) -> Step {
        self.tools.finished(&done.id);
        self.answer_call(&done.id, &done.result).await;
        Step::Go
    }

    fn closing(&self) -> bool {
        self.closing_since.is_some()
    }

    async fn on_tick(&mut self) -> Step {
        let now = Instant::now();
        let settings = &self.shared.settings;
        if let Some(since) = self.closing_since
            && now.duration_since(since) >= CLOSE_LIMIT
        {
            return Step::Stop;
        }
        if let Some(since) = self.awaiting
            && self.conn.is_some()
            && now.duration_since(since) >= settings.stall_timeout
        {
            let why = format!("no reply within {} ms", settings.stall_timeout.as_millis());
            return self.lost(Failure::retry(why)).await;
        }
        if let Some(force_at) = self.go_away
            && self.pending.is_none()
            && self.closing_since.is_none()
            && (self.quiet() || now >= force_at)
        {
            self.open(Purpose::Resume, Duration::ZERO);
        }
        Step::Go
    }

    fn connections(&mut self) -> Connections<'_, Purpose, Failure> {
        (&mut self.conn, &mut self.pending)
    }

    fn dropped_ms(&self) -> u64 {
        self.backlog.dropped_ms()
    }

    fn cost_micro_usd(&self) -> u64 {
        self.costing.totals().cost_micro_usd
    }
}

impl Driver {
    /// Starts opening a connection: resumed with the latest handle, or fresh
    /// with the conversation so far.
    fn open(&mut self, purpose: Purpose, delay: Duration) {
        let opening = Opening {
            voice: self.voice.clone(),
            language: self.language.clone(),
            handle: self.handle.clone(),
            history: self.history.messages().to_vec(),
            delay,
        };
        self.pending = Some(Opener::spawn(
            purpose,
            connect::open(self.shared.clone(), opening),
        ));
    }

    /// Nothing is going on that a switch of connection would cut: no turn
    /// (user words or a reply) and no tool call open.
    fn quiet(&self) -> bool {
        self.turn.is_none() && self.calls.is_empty()
    }

    async fn on_open_failed(&mut self, purpose: Purpose, failure: Failure) -> Step {
        tracing::warn!(?purpose, error = %failure.message, "Gemini Live connection not opened");
        if purpose == Purpose::Resume && self.conn.is_some() && failure.verdict == Verdict::Retry {
            // The old connection still works: try again in a moment.
            self.open(Purpose::Resume, backoff(2));
            return Step::Go;
        }
        self.on_failure(purpose, failure).await
    }

    /// What a failure leads to: another try, or the end of the conversation.
    async fn on_failure(&mut self, purpose: Purpose, failure: Failure) -> Step {
        let message = failure.message;
        match failure.verdict {
            Verdict::Fatal => self.events.fail(format!("Gemini Live: {message}")).await,
            Verdict::Throttled => {
                self.shared.cool_down();
                self.events
                    .fail(format!(
                        "Gemini Live is throttling or out of quota: {message}"
                    ))
                    .await
            }
            Verdict::RetryOnce if self.retried_once => {
                self.events
                    .fail(format!("Gemini Live refused again: {message}"))
                    .await
            }
            Verdict::RetryOnce | Verdict::Retry => {
                if failure.verdict == Verdict::RetryOnce {
                    self.retried_once = true;
                }
                let Some(delay) = self.retries.next() else {
                    return self
                        .events
                        .fail(format!("Gemini Live could not be reached: {message}"))
                        .await;
                };
                let purpose = if purpose == Purpose::First {
                    Purpose::First
                } else {
                    Purpose::Reconnect
                };
                self.open(purpose, delay);
                Step::Go
            }
        }
    }

    /// The connection is gone: end the turn it was in and open another.
    async fn lost(&mut self, failure: Failure) -> Step {
        self.conn = None;
        if self.closing_since.is_some() {
            return Step::Stop;
        }
        tracing::warn!(reason = %failure.message, "Gemini Live connection lost");
        self.lost_at = Some(Instant::now());
        self.awaiting = None;
        self.go_away = None;
        self.stale_turn_complete = false;
        if let Some(turn) = self.turn.take() {
            self.finish_turn(turn, TurnEndReason::Error).await;
        }
        self.calls.clear();
        let passing = matches!(failure.verdict, Verdict::Retry | Verdict::RetryOnce);
        if passing {
            self.events
                .emit(EngineEvent::Error {
                    kind: ErrorKind::Transient,
                    message: format!(
                        "Gemini Live connection lost ({}); reconnecting",
                        failure.message
                    ),
                })
                .await;
            if let Some(pending) = self.pending.as_mut() {
                // The resumption under way takes over, as a reconnection.
                pending.purpose = Purpose::Reconnect;
                return Step::Go;
            }
        }
        self.pending = None;
        self.on_failure(Purpose::Reconnect, failure).await
    }

    /// Sends on the current connection; a failure is a lost connection,
    /// seen on the next read.
    async fn send(&mut self, message: &ClientMessage) {
        if let Some(conn) = self.conn.as_mut()
            && connect::send(conn, message, SEND_WAIT).await.is_err()
        {
            let _ = futures_util::SinkExt::close(&mut conn.sink).await;
        }
    }

    /// Sends a call's result to the connection that asked for it; a call
    /// that was cancelled or whose connection is gone is dropped.
    async fn answer_call(&mut self, id: &str, result: &serde_json::Value) {
        let Some((name, generation)) = self.calls.remove(id) else {
            tracing::debug!(id, "result of a cancelled or unknown tool call dropped");
            return;
        };
        if generation != self.generation {
            tracing::debug!(id, "tool result for a replaced connection dropped");
            return;
        }
        self.send(&ClientMessage::tool_response(id, &name, result))
            .await;
        self.awaiting = Some(Instant::now());
    }
}

/// Sends user audio in messages of at most 100 ms.
async fn send_audio(conn: &mut Conn, samples: &[i16]) -> Result<(), Failure> {
    for chunk in samples.chunks(MAX_CHUNK) {
        connect::send(conn, &ClientMessage::audio(chunk), SEND_WAIT).await?;
    }
    Ok(())
}
