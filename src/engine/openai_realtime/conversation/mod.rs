//! One conversation across sessions. The loop reads the conversation's
//! input, the session's events, tool results and the session being opened
//! (first, after a loss, or the hand-off before the session limit, made at
//! a quiet moment with the conversation replayed as text). User audio that
//! arrives while no session is open waits in a bounded backlog.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::connect::{self, Conn, Opening};
use super::cost::Costing;
use super::wire::{self, ClientEvent};
use super::{RATE_HZ, Shared};
use crate::audio::StreamResampler;
use crate::engine::text_history::History;
use crate::engine::tool_runner::{ToolDone, ToolRunner};
use crate::engine::wss::{self, ConnectError};
use crate::engine::{EngineEvent, EngineInput, ErrorKind, Role, TurnEndReason};

/// User audio kept while no session is open (24 kHz samples: 5 s).
const MAX_BACKLOG: usize = 5 * RATE_HZ as usize;
/// Control events (text, tool results) kept while no session is open.
const MAX_QUEUED: usize = 64;
/// The latest user audio, replayed into a hand-off's new session (300 ms).
const REPLAY: usize = RATE_HZ as usize * 3 / 10;
/// Wait for the service to take one event.
const SEND_WAIT: Duration = Duration::from_secs(2);
/// After `Close`, the longest wait for the reply in progress.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);
/// After `Close`, how long with nothing going on before the session ends
/// (the service may still be about to hear the end of the last words).
const CLOSE_QUIET: Duration = Duration::from_millis(1_500);
/// Housekeeping: silence while the user is mute, stall, hand-off and close.
const TICK: Duration = Duration::from_millis(50);
/// No user audio for this long means the user is mute: silence is sent in
/// its place, so the service's voice detection hears the end of a turn.
const MUTE_AFTER: Duration = Duration::from_millis(100);
/// Backoff before the second and later reconnections.
const BACKOFF: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(3),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    First,
    Reconnect,
    HandOff,
}

#[derive(Debug)]
struct Pending {
    purpose: Purpose,
    started: Instant,
    /// The user turn when it started: a hand-off's history lacks later ones.
    turn: u64,
    ready: oneshot::Receiver<Result<Conn, ConnectError>>,
}

/// The reply in progress.
#[derive(Debug)]
struct Reply {
    turn: u64,
    calls: u32,
    audio: bool,
    transcript: String,
}

/// Reply audio the user may still be hearing: the client plays it from its
/// first frame at real-time pace.
#[derive(Debug)]
struct Playing {
    item_id: String,
    turn: u64,
    first_at: Instant,
    samples: u64,
}

impl Playing {
    fn ms(&self) -> u64 {
        self.samples * 1000 / u64::from(RATE_HZ)
    }

    /// How much the user has heard by `now`, at most all of it.
    fn heard_ms(&self, now: Instant) -> u64 {
        let elapsed = u64::try_from(now.duration_since(self.first_at).as_millis()).unwrap_or(0);
        elapsed.min(self.ms())
    }
}

enum Step {
    Go,
    Stop,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    voice: String,
    language: String,
    history: Vec<(Role, String)>,
    input: mpsc::Receiver<EngineInput>,
    events: mpsc::Sender<EngineEvent>,
) {
    let settings = &shared.settings;
    let resampler = match StreamResampler::new(16_000, RATE_HZ) {
        Ok(r) => r,
        Err(e) => {
            let _ = events
                .send(EngineEvent::Error {
                    kind: ErrorKind::Fatal,
                    message: format!("resampler: {e}"),
                })
                .await;
            return;
        }
    };
    let (tools, tool_rx) = ToolRunner::new(shared.tools.clone());
    let mut driver = Driver {
        costing: Costing::new(
            &settings.model,
            &settings.transcription_model,
            &settings.prices,
        ),
        shared: shared.clone(),
        voice,
        language,
        events,
        history: History::from_messages(&history),
        tools,
        resampler,
        resampled: Vec::new(),
        conn: None,
        generation: 0,
        pending: None,
        backlog: VecDeque::new(),
        queued: Vec::new(),
        recent: VecDeque::new(),
        dropped_samples: 0,
        turn: 0,
        items: VecDeque::new(),
        user_speaking: false,
        reply: None,
        playing: None,
        cut_item: None,
        retries: 0,
        awaiting: None,
        closing_since: None,
        audio_at: Instant::now(),
        activity_at: Instant::now(),
    };
    driver.main(input, tool_rx).await;
}

struct Driver {
    shared: Arc<Shared>,
    voice: String,
    language: String,
    events: mpsc::Sender<EngineEvent>,
    costing: Costing,
    history: History,
    tools: ToolRunner,
    resampler: StreamResampler,
    resampled: Vec<i16>,
    conn: Option<Conn>,
    /// Counts sessions: a tool result goes back only to the one that asked.
    generation: u32,
    pending: Option<Pending>,
    /// User audio waiting for a session.
    backlog: VecDeque<i16>,
    /// Control events waiting for a session.
    queued: Vec<ClientEvent>,
    /// The latest user audio sent.
    recent: VecDeque<i16>,
    dropped_samples: u64,
    /// The user turn: one per speech start or typed message.
    turn: u64,
    /// Recent user audio items and their turns (transcripts come late).
    items: VecDeque<(String, u64)>,
    /// Between the service's speech start and stop.
    user_speaking: bool,
    reply: Option<Reply>,
    playing: Option<Playing>,
    /// The reply item cut by barge-in: its late audio is dropped.
    cut_item: Option<String>,
    /// Reconnections since the last completed reply.
    retries: u32,
    /// Since when a reply is due (the user finished, a result went back).
    awaiting: Option<Instant>,
    closing_since: Option<Instant>,
    /// When user audio (or silence in its place) was last sent.
    audio_at: Instant,
    /// When the user or the service last did something.
    activity_at: Instant,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("generation", &self.generation)
            .field("turn", &self.turn)
            .finish_non_exhaustive()
    }
}

async fn next_message(
    conn: &mut Option<Conn>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match conn {
        Some(c) => c.stream.next().await,
        None => std::future::pending().await,
    }
}

async fn next_ready(pending: &mut Option<Pending>) -> Result<Conn, ConnectError> {
    match pending {
        Some(p) => (&mut p.ready)
            .await
            .unwrap_or_else(|_| Err(ConnectError::Unavailable("the opener stopped".into()))),
        None => std::future::pending().await,
    }
}

impl Driver {
    async fn main(
        &mut self,
        mut input: mpsc::Receiver<EngineInput>,
        mut tool_rx: mpsc::Receiver<ToolDone>,
    ) {
        self.emit(EngineEvent::Ready {
            engine: "openai-realtime".into(),
            model: self.shared.settings.model.clone(),
            voice: self.voice.clone(),
        })
        .await;
        if !self.costing.priced() {
            tracing::warn!(
                model = %self.shared.settings.model,
                "no prices for this OpenAI Realtime model: its cost is counted as 0"
            );
        }
        self.open(Purpose::First, Duration::ZERO);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut input_open = true;
        loop {
            let step = tokio::select! {
                message = input.recv(), if input_open && self.closing_since.is_none() => {
                    match message {
                        Some(message) => self.on_input(message).await,
                        None => {
                            input_open = false;
                            self.on_input(EngineInput::Close).await
                        }
                    }
                }
                message = next_message(&mut self.conn) => self.on_message(message).await,
                ready = next_ready(&mut self.pending) => self.on_ready(ready).await,
                Some(done) = tool_rx.recv() => self.on_tool_done(done).await,
                _ = tick.tick() => self.on_tick().await,
            };
            if matches!(step, Step::Stop) {
                break;
            }
        }
        if let Some(mut conn) = self.conn.take() {
            let _ = tokio::time::timeout(SEND_WAIT, conn.sink.close()).await;
        }
        if self.dropped_samples > 0 {
            tracing::warn!(
                dropped_ms = self.dropped_samples * 1000 / u64::from(RATE_HZ),
                "user audio dropped while no OpenAI Realtime session was open"
            );
        }
        let totals = self.costing.totals();
        tracing::debug!(
            cost_micro_usd = totals.cost_micro_usd,
            "OpenAI Realtime conversation over"
        );
        self.emit(EngineEvent::Closed).await;
    }

    async fn emit(&self, event: EngineEvent) {
        let _ = self.events.send(event).await;
    }

    async fn fail(&self, message: String) -> Step {
        self.emit(EngineEvent::Error {
            kind: ErrorKind::Fatal,
            message,
        })
        .await;
        Step::Stop
    }

    /// Starts opening a session with the conversation so far.
    fn open(&mut self, purpose: Purpose, delay: Duration) {
        let opening = Opening {
            voice: self.voice.clone(),
            language: self.language.clone(),
            history: self.history.messages().to_vec(),
            delay,
        };
        let (tx, ready) = oneshot::channel();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _ = tx.send(connect::open(shared, opening).await);
        });
        self.pending = Some(Pending {
            purpose,
            started: Instant::now(),
            turn: self.turn,
            ready,
        });
    }

    /// Nothing is going on: no reply, no user speech, no tool running.
    fn quiet(&self, now: Instant) -> bool {
        let playing = self
            .playing
            .as_ref()
            .is_some_and(|p| p.heard_ms(now) < p.ms());
        self.reply.is_none()
            && self.awaiting.is_none()
            && !playing
            && !self.user_speaking
            && self.tools.idle()
    }

    async fn on_ready(&mut self, ready: Result<Conn, ConnectError>) -> Step {
        let Some(pending) = self.pending.take() else {
            return Step::Go;
        };
        let now = Instant::now();
        let conn = match ready {
            Ok(conn) => conn,
            Err(error) => return self.on_open_failed(pending.purpose, error).await,
        };
        self.generation += 1;
        match pending.purpose {
            Purpose::HandOff => {
                if !self.quiet(now) || self.turn != pending.turn {
                    // Something happened meanwhile: the new session lacks it.
                    // Try again at the next quiet moment.
                    tokio::spawn(close(conn));
                    return Step::Go;
                }
                let mut conn = conn;
                let replay: Vec<i16> = self.recent.iter().copied().collect();
                if self.append(&mut conn, &replay).await.is_err() {
                    return Step::Go;
                }
                if let Some(old) = self.conn.replace(conn) {
                    tokio::spawn(close(old));
                }
                self.shared.stats.hand_offs.fetch_add(1, Ordering::Relaxed);
                let gap_ms = now.duration_since(pending.started).as_secs_f64() * 1000.0;
                tracing::info!(
                    generation = self.generation,
                    prepared_ms = gap_ms,
                    "OpenAI Realtime hand-off"
                );
                self.emit(EngineEvent::Rotated {
                    generation: self.generation,
                    gap_ms: 0.0,
                })
                .await;
            }
            Purpose::First | Purpose::Reconnect => {
                let mut conn = conn;
                let backlog: Vec<i16> = self.backlog.drain(..).collect();
                if self.append(&mut conn, &backlog).await.is_err() {
                    return self.lost("the new session took no audio".into()).await;
                }
                let reconnect = pending.purpose == Purpose::Reconnect;
                self.conn = Some(conn);
                // What the user typed or a tool answered meanwhile.
                let queued = std::mem::take(&mut self.queued);
                let asks = queued
                    .iter()
                    .any(|e| matches!(e, ClientEvent::ResponseCreate { .. }));
                for event in &queued {
                    self.send(event).await;
                }
                if reconnect {
                    let gap_ms = now.duration_since(pending.started).as_secs_f64() * 1000.0;
                    self.emit(EngineEvent::Rotated {
                        generation: self.generation,
                        gap_ms,
                    })
                    .await;
                    // A user message the lost session never answered.
                    if self.awaiting.is_some() && !asks {
                        self.send(&ClientEvent::respond()).await;
                        self.awaiting = Some(now);
                    }
                }
            }
        }
        Step::Go
    }

    async fn on_open_failed(&mut self, purpose: Purpose, error: ConnectError) -> Step {
        tracing::warn!(?purpose, %error, "OpenAI Realtime session not opened");
        match (&error, purpose) {
            (ConnectError::Auth(_) | ConnectError::Refused(_), _) => {
                self.fail(format!("OpenAI Realtime: {error}")).await
            }
            (_, Purpose::HandOff) => Step::Go,
            _ => {
                self.retries += 1;
                if self.retries > self.shared.settings.max_retries {
                    return self
                        .fail(format!("OpenAI Realtime could not be reached: {error}"))
                        .await;
                }
                let delay = BACKOFF[(self.retries as usize - 1).min(BACKOFF.len() - 1)];
                self.open(purpose, delay.max(Duration::from_millis(200)));
                Step::Go
            }
        }
    }

    /// The session is gone: end the reply it was giving and open another.
    async fn lost(&mut self, why: String) -> Step {
        self.conn = None;
        if self.closing_since.is_some() {
            return Step::Stop;
        }
        tracing::warn!(reason = %why, "OpenAI Realtime session lost");
        if let Some(reply) = self.reply.take() {
            self.emit(EngineEvent::TurnEnd {
                turn_id: reply.turn,
                reason: TurnEndReason::Error,
            })
            .await;
        }
        self.playing = None;
        self.user_speaking = false;
        self.emit(EngineEvent::Error {
            kind: ErrorKind::Transient,
            message: format!("OpenAI Realtime session lost ({why}); reconnecting"),
        })
        .await;
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.purpose == Purpose::HandOff)
        {
            self.pending = None;
        }
        if self.pending.is_none() {
            self.retries += 1;
            if self.retries > self.shared.settings.max_retries {
                return self
                    .fail(format!("OpenAI Realtime session lost too often: {why}"))
                    .await;
            }
            let delay = BACKOFF[(self.retries as usize - 1).min(BACKOFF.len() - 1)];
            self.open(Purpose::Reconnect, delay);
        }
        Step::Go
    }

    /// Sends on the current session (a failure is a lost session, seen on
    /// the next read), or keeps the event for the next session.
    async fn send(&mut self, event: &ClientEvent) {
        let Some(conn) = self.conn.as_mut() else {
            if self.queued.len() == MAX_QUEUED {
                tracing::warn!("an event for the next OpenAI Realtime session was dropped");
                self.queued.remove(0);
            }
            self.queued.push(event.clone());
            return;
        };
        if connect::send(&mut conn.sink, event, SEND_WAIT)
            .await
            .is_err()
        {
            // The read side reports the loss.
            let _ = conn.sink.close().await;
        }
    }

    async fn append(&mut self, conn: &mut Conn, samples: &[i16]) -> Result<(), ConnectError> {
        // 100 ms per message at most, so no message is large.
        for chunk in samples.chunks(RATE_HZ as usize / 10) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
            let event = ClientEvent::Append {
                audio: crate::base64::encode(&bytes),
            };
            connect::send(&mut conn.sink, &event, SEND_WAIT).await?;
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> Step {
        let text = match message {
            Some(Ok(Message::Text(text))) => text.to_string(),
            Some(Ok(Message::Binary(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
            Some(Ok(Message::Close(frame))) => {
                return self.lost(wss::close_text(frame.as_ref())).await;
            }
            Some(Ok(_)) => return Step::Go,
            Some(Err(e)) => return self.lost(e.to_string()).await,
            None => return self.lost("connection closed".into()).await,
        };
        self.activity_at = Instant::now();
        let Some(event) = wire::parse(&text) else {
            self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                bytes = text.len(),
                "unreadable OpenAI Realtime event ignored"
            );
            return Step::Go;
        };
        self.on_event(event).await
    }
}

async fn close(mut conn: Conn) {
    let _ = tokio::time::timeout(SEND_WAIT, conn.sink.close()).await;
}

mod events;
mod input;
