//! One conversation across sessions. The loop reads the conversation's
//! input, the session's events, tool results and the session being opened
//! (first, after a loss, or the hand-off before the session limit, made at
//! a quiet moment with the conversation replayed as text). User audio that
//! arrives while no session is open waits in a bounded backlog.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::connect::{self, Opening};
use super::cost::Costing;
use super::wire::{self, ClientEvent};
use super::{RATE_HZ, Shared};
use crate::audio::StreamResampler;
use crate::engine::cloud::{self, Backlog, Connections, Events, Opener, Retries, Step};
use crate::engine::cloud::{CLOSE_LIMIT, SEND_WAIT};
use crate::engine::text_history::History;
use crate::engine::tool_runner::{ToolDone, ToolRunner};
use crate::engine::wss::{self, Conn, ConnectError, Received};
use crate::engine::{ConversationOptions, EngineEvent, EngineInput, ErrorKind, TurnEndReason};

/// Seconds of user audio kept while no connection is open.
const BACKLOG_SECONDS: u32 = 5;
/// Control events (text, tool results) kept while no session is open.
const MAX_QUEUED: usize = 64;
/// The latest user audio, replayed into a hand-off's new session (300 ms).
const REPLAY: usize = RATE_HZ as usize * 3 / 10;
/// After `Close`, how long with nothing going on before the session ends
/// (the service may still be about to hear the end of the last words).
const CLOSE_QUIET: Duration = Duration::from_millis(1_500);
/// No user audio for this long means the user is mute: silence is sent in
/// its place, so the service's voice detection hears the end of a turn.
const MUTE_AFTER: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    First,
    Reconnect,
    /// To the user turn `turn`: a hand-off's history lacks later ones.
    HandOff {
        turn: u64,
    },
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
        conn: None,
        pending: None,
        generation: 0,
        retries: Retries::new(settings.max_retries),
        resampler,
        resampled: Vec::new(),
        backlog: Backlog::new(RATE_HZ, BACKLOG_SECONDS),
        recent: VecDeque::new(),
        queued: Vec::new(),
        turn: 0,
        items: VecDeque::new(),
        user_speaking: false,
        reply: None,
        playing: None,
        cut_item: None,
        awaiting: None,
        closing_since: None,
        audio_at: Instant::now(),
        activity_at: Instant::now(),
        history: History::from_messages(&history),
        tools,
        costing: Costing::new(
            &settings.model,
            &settings.transcription_model,
            &settings.prices,
        ),
        voice,
        language,
        events: Events::new(events),
        shared: shared.clone(),
    };
    cloud::run(&mut driver, input, tool_rx).await;
}

struct Driver {
    /// The open session and the one being opened.
    conn: Option<Conn>,
    pending: Option<Opener<Purpose, ConnectError>>,
    /// Counts sessions: a tool result goes back only to the one that asked.
    generation: u32,
    /// Reconnections since the last completed reply.
    retries: Retries,
    /// User audio, resampled for the service.
    resampler: StreamResampler,
    resampled: Vec<i16>,
    /// User audio waiting for a session.
    backlog: Backlog,
    /// The latest user audio sent.
    recent: VecDeque<i16>,
    /// Control events waiting for a session.
    queued: Vec<ClientEvent>,
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
    /// Since when a reply is due (the user finished, a result went back).
    awaiting: Option<Instant>,
    closing_since: Option<Instant>,
    /// When user audio (or silence in its place) was last sent.
    audio_at: Instant,
    /// When the user or the service last did something.
    activity_at: Instant,
    /// What the conversation was started with.
    history: History,
    tools: ToolRunner,
    costing: Costing,
    voice: String,
    language: String,
    events: Events,
    shared: Arc<Shared>,
}

impl cloud::Driver for Driver {
    type Purpose = Purpose;
    type Error = ConnectError;
    const SERVICE: &'static str = "OpenAI Realtime";
    /// Housekeeping: silence while the user is mute, stall, hand-off and close.
    const TICK: Duration = Duration::from_millis(50);

    fn ready(&self) -> EngineEvent {
        EngineEvent::Ready {
            engine: "openai-realtime".into(),
            model: self.shared.settings.model.clone(),
            voice: self.voice.clone(),
        }
    }

    fn open_first(&mut self) {
        self.open(Purpose::First, Duration::ZERO);
    }

    async fn on_opened(&mut self, ready: Result<Conn, ConnectError>) -> Step {
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
            Purpose::HandOff { turn } => {
                if !self.quiet(now) || self.turn != turn {
                    // Something happened meanwhile: the new session lacks it.
                    // Try again at the next quiet moment.
                    cloud::close_in_background(conn);
                    return Step::Go;
                }
                let mut conn = conn;
                let replay: Vec<i16> = self.recent.iter().copied().collect();
                if self.append(&mut conn, &replay).await.is_err() {
                    return Step::Go;
                }
                if let Some(old) = self.conn.replace(conn) {
                    cloud::close_in_background(old);
                }
                self.shared.stats.hand_offs.fetch_add(1, Ordering::Relaxed);
                let gap_ms = now.duration_since(pending.started).as_secs_f64() * 1000.0;
                tracing::info!(
                    generation = self.generation,
                    prepared_ms = gap_ms,
                    "OpenAI Realtime hand-off"
                );
                self.events.rotated(self.generation, 0.0).await;
            }
            Purpose::First | Purpose::Reconnect => {
                let mut conn = conn;
                let backlog = self.backlog.take();
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
                    self.events.rotated(self.generation, gap_ms).await;
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

    fn events(&self) -> &Events {
        &self.events
    }

    fn priced(&self) -> bool {
        self.costing.priced()
    }

    async fn on_message(&mut self, message: Received) -> Step {
        let bytes = match message {
            Received::Data(bytes) => bytes,
            Received::Closed(frame) => return self.lost(wss::close_text(frame.as_ref())).await,
            Received::Control => return Step::Go,
            Received::Lost(why) => return self.lost(why).await,
        };
        let text = String::from_utf8_lossy(&bytes);
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

    fn connections(&mut self) -> Connections<'_, Purpose, ConnectError> {
        (&mut self.conn, &mut self.pending)
    }

    fn closing(&self) -> bool {
        self.closing_since.is_some()
    }

    async fn on_input(&mut self, input: EngineInput) -> Step {
        self.input(input).await
    }

    fn dropped_ms(&self) -> u64 {
        self.backlog.dropped_ms()
    }

    async fn on_tool_done(&mut self, done: ToolDone) -> Step {
        self.tool_done(done).await
    }

    fn cost_micro_usd(&self) -> u64 {
        self.costing.totals().cost_micro_usd
    }

    async fn on_tick(&mut self) -> Step {
        self.tick().await
    }
}

impl Driver {
    /// Starts opening a session with the conversation so far.
    fn open(&mut self, purpose: Purpose, delay: Duration) {
        let opening = Opening {
            voice: self.voice.clone(),
            language: self.language.clone(),
            history: self.history.messages().to_vec(),
            delay,
        };
        self.pending = Some(Opener::spawn(
            purpose,
            connect::open(self.shared.clone(), opening),
        ));
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

    async fn on_open_failed(&mut self, purpose: Purpose, error: ConnectError) -> Step {
        tracing::warn!(?purpose, %error, "OpenAI Realtime session not opened");
        match (&error, purpose) {
            (ConnectError::Auth(_) | ConnectError::Refused(_), _) => {
                self.events.fail(format!("OpenAI Realtime: {error}")).await
            }
            (_, Purpose::HandOff { .. }) => Step::Go,
            _ => {
                let Some(delay) = self.retries.next() else {
                    return self
                        .events
                        .fail(format!("OpenAI Realtime could not be reached: {error}"))
                        .await;
                };
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
            self.events
                .emit(EngineEvent::TurnEnd {
                    turn_id: reply.turn,
                    reason: TurnEndReason::Error,
                })
                .await;
        }
        self.playing = None;
        self.user_speaking = false;
        self.events
            .emit(EngineEvent::Error {
                kind: ErrorKind::Transient,
                message: format!("OpenAI Realtime session lost ({why}); reconnecting"),
            })
            .await;
        if self
            .pending
            .as_ref()
            .is_some_and(|p| matches!(p.purpose, Purpose::HandOff { .. }))
        {
            self.pending = None;
        }
        if self.pending.is_none() {
            let Some(delay) = self.retries.next() else {
                return self
                    .events
                    .fail(format!("OpenAI Realtime session lost too often: {why}"))
                    .await;
            };
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
        if connect::send(conn, event, SEND_WAIT).await.is_err() {
            // The read side reports the loss.
            let _ = futures_util::SinkExt::close(&mut conn.sink).await;
        }
    }

    async fn append(&mut self, conn: &mut Conn, samples: &[i16]) -> Result<(), ConnectError> {
        // 100 ms per message at most, so no message is large.
        for chunk in samples.chunks(RATE_HZ as usize / 10) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
            let event = ClientEvent::Append {
                audio: crate::base64::encode(&bytes),
            };
            connect::send(conn, &event, SEND_WAIT).await?;
        }
        Ok(())
    }
}

mod events;
mod input;
