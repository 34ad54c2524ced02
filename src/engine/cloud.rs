//! What the engines that hold a conversation over a service's WebSocket
//! (Gemini Live, OpenAI Realtime) share: the conversation's loop, the
//! connection being opened in the background, the backoff between tries,
//! and the events sent up to the conversation.
//!
//! Each engine's driver says what its service's messages mean; this module
//! only runs the loop: the conversation's input, the connection's messages,
//! a connection being opened, finished tool calls and a housekeeping tick,
//! until the driver says stop.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::cooldown::Cooldown;
use super::tool_runner::ToolDone;
use super::wss::{Conn, ConnectError, Received, Tls};
use super::{EngineEvent, EngineInput, EngineStat, ErrorKind, StartError};
use crate::tools::Tools;

/// What every conversation of one engine shares: its settings `S`, TLS,
/// tools, the cool-down after throttling, the count of connections opened,
/// and the engine's own numbers `T`.
#[derive(Debug)]
pub(crate) struct Shared<S, T> {
    pub(crate) settings: S,
    pub(crate) tls: Tls,
    pub(crate) tools: Option<Tools>,
    pub(crate) stats: T,
    cooling: Cooldown,
    /// How long a throttling answer keeps new conversations away.
    cooldown: Duration,
    connects: AtomicU64,
    connect_failures: AtomicU64,
}

impl<S, T: Default> Shared<S, T> {
    /// `cooldown`: how long a throttling answer keeps new conversations away.
    pub(crate) fn new(tls: Tls, cooldown: Duration, settings: S, tools: Option<Tools>) -> Self {
        Self {
            settings,
            tls,
            tools,
            stats: T::default(),
            cooling: Cooldown::default(),
            cooldown,
            connects: AtomicU64::default(),
            connect_failures: AtomicU64::default(),
        }
    }
}

impl<S, T> Shared<S, T> {
    /// The service throttled or its quota is used up: new conversations
    /// are refused for a while.
    pub(crate) fn cool_down(&self) {
        self.cooling.throttled(self.cooldown);
    }

    /// Counts an attempt to open a connection; a throttled one cools the
    /// engine down as well.
    pub(crate) fn count_open(&self, opened: bool, throttled: bool) {
        let counter = if opened {
            &self.connects
        } else {
            &self.connect_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if throttled {
            self.cool_down();
        }
    }

    /// The refusal of a new conversation to `service` while it cools down.
    pub(crate) fn refusal(&self, service: &str) -> Option<StartError> {
        self.cooling.refusal(service)
    }

    /// How long new conversations are still refused.
    pub(crate) fn busy(&self) -> Option<Duration> {
        self.cooling.remaining()
    }

    /// The numbers every cloud engine shows, after `own`.
    pub(crate) fn stats(&self, own: Vec<EngineStat>) -> Vec<EngineStat> {
        let mut all = vec![
            EngineStat::counter(
                "connects_total",
                "Connections opened to the service (first, reconnection, hand-off).",
                &self.connects,
            ),
            EngineStat::counter(
                "connect_failures_total",
                "Connections to the service that could not be opened.",
                &self.connect_failures,
            ),
        ];
        all.extend(own);
        all.extend(self.cooling.stats());
        all
    }
}

/// What the loop does after a step.
pub(crate) enum Step {
    Go,
    Stop,
}

/// Backoff before each reconnection: the first at once.
const BACKOFF: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// The wait before try number `tries` (1 for the first) of a run of them.
pub(crate) fn backoff(tries: u32) -> Duration {
    BACKOFF[(tries.max(1) as usize - 1).min(BACKOFF.len() - 1)]
}

/// Reconnections since the last completed reply, within a limit.
#[derive(Debug)]
pub(crate) struct Retries {
    done: u32,
    max: u32,
}

impl Retries {
    pub(crate) fn new(max: u32) -> Self {
        Self { done: 0, max }
    }

    /// The wait before one more try, or `None` once `max` tries are used.
    pub(crate) fn next(&mut self) -> Option<Duration> {
        self.done += 1;
        (self.done <= self.max).then(|| backoff(self.done))
    }

    /// A reply came through: the next loss starts a fresh run of tries.
    pub(crate) fn reset(&mut self) {
        self.done = 0;
    }
}

/// A connection being opened in the background: the conversation goes on
/// (on the old connection, if there is one) until it is ready.
#[derive(Debug)]
pub(crate) struct Opener<P, E> {
    /// What the connection is for.
    pub(crate) purpose: P,
    pub(crate) started: Instant,
    ready: oneshot::Receiver<Result<Conn, E>>,
}

impl<P, E: Send + 'static> Opener<P, E> {
    /// Starts `opening` on its own task.
    pub(crate) fn spawn(
        purpose: P,
        opening: impl Future<Output = Result<Conn, E>> + Send + 'static,
    ) -> Self {
        let (tx, ready) = oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(opening.await);
        });
        Self {
            purpose,
            started: Instant::now(),
            ready,
        }
    }
}

/// User audio kept while no connection is open: the latest `capacity`
/// samples, the older ones dropped and counted.
#[derive(Debug)]
pub(crate) struct Backlog {
    samples: std::collections::VecDeque<i16>,
    capacity: usize,
    rate_hz: u32,
    dropped: u64,
}

impl Backlog {
    /// Holds at most `seconds` of audio at `rate_hz`.
    pub(crate) fn new(rate_hz: u32, seconds: u32) -> Self {
        Self {
            samples: std::collections::VecDeque::new(),
            capacity: rate_hz as usize * seconds as usize,
            rate_hz,
            dropped: 0,
        }
    }

    pub(crate) fn hold(&mut self, samples: &[i16]) {
        self.samples.extend(samples);
        let excess = self.samples.len().saturating_sub(self.capacity);
        self.samples.drain(..excess);
        self.dropped += excess as u64;
    }

    /// Everything held, oldest first, for a new connection.
    pub(crate) fn take(&mut self) -> Vec<i16> {
        self.samples.drain(..).collect()
    }

    /// How much audio was dropped, in milliseconds.
    pub(crate) fn dropped_ms(&self) -> u64 {
        self.dropped * 1000 / u64::from(self.rate_hz)
    }
}

/// The events a driver sends up to the conversation.
#[derive(Debug, Clone)]
pub(crate) struct Events(mpsc::Sender<EngineEvent>);

impl Events {
    pub(crate) fn new(events: mpsc::Sender<EngineEvent>) -> Self {
        Self(events)
    }

    /// Sends `event`; a conversation that is gone takes nothing more.
    pub(crate) async fn emit(&self, event: EngineEvent) {
        let _ = self.0.send(event).await;
    }

    /// The conversation moved to connection `generation`, `gap_ms` after
    /// the old one stopped carrying it.
    pub(crate) async fn rotated(&self, generation: u32, gap_ms: f64) {
        self.emit(EngineEvent::Rotated { generation, gap_ms }).await;
    }

    /// The model's words so far in turn `turn_id`.
    pub(crate) async fn reply_transcript(&self, text: String, stage: super::Stage, turn_id: u64) {
        self.emit(EngineEvent::Transcript {
            role: super::Role::Assistant,
            text,
            stage,
            turn_id,
        })
        .await;
    }

    /// Ends the conversation with a fatal error.
    pub(crate) async fn fail(&self, message: String) -> Step {
        self.emit(EngineEvent::Error {
            kind: ErrorKind::Fatal,
            message,
        })
        .await;
        Step::Stop
    }
}

/// One engine's conversation, as the loop drives it.
pub(crate) trait Driver: Send {
    /// What a connection being opened is for (the first, a reconnection…).
    type Purpose: Send;
    /// Why a connection could not be opened.
    type Error: From<ConnectError> + Send + 'static;
    /// The service's name for logs ("Gemini Live").
    const SERVICE: &'static str;
    /// How often [`Driver::on_tick`] runs.
    const TICK: Duration;

    fn events(&self) -> &Events;
    /// `Ready`, sent before anything else.
    fn ready(&self) -> EngineEvent;
    /// The model's prices are known (otherwise its cost counts as 0).
    fn priced(&self) -> bool;
    /// Starts opening the first connection.
    fn open_first(&mut self);
    /// The conversation is closing: it reads no more input.
    fn closing(&self) -> bool;
    /// The open connection and the one being opened.
    fn connections(&mut self) -> Connections<'_, Self::Purpose, Self::Error>;
    fn on_input(&mut self, input: EngineInput) -> impl Future<Output = Step> + Send;
    fn on_message(&mut self, message: Received) -> impl Future<Output = Step> + Send;
    /// The opener finished: a connection, or why there is none.
    fn on_opened(&mut self, opened: Result<Conn, Self::Error>)
    -> impl Future<Output = Step> + Send;
    fn on_tool_done(&mut self, done: ToolDone) -> impl Future<Output = Step> + Send;
    fn on_tick(&mut self) -> impl Future<Output = Step> + Send;
    /// User audio dropped while no connection was open, in milliseconds.
    fn dropped_ms(&self) -> u64;
    /// What the conversation cost, in millionths of a dollar.
    fn cost_micro_usd(&self) -> u64;
}

/// The open connection and the one being opened, borrowed together.
pub(crate) type Connections<'a, P, E> = (&'a mut Option<Conn>, &'a mut Option<Opener<P, E>>);

/// Runs `driver` until it stops, then closes its connection and sends
/// `Closed`.
pub(crate) async fn run<D: Driver>(
    driver: &mut D,
    mut input: mpsc::Receiver<EngineInput>,
    mut tools: mpsc::Receiver<ToolDone>,
) {
    let ready = driver.ready();
    if let EngineEvent::Ready { model, .. } = &ready
        && !driver.priced()
    {
        tracing::warn!(
            service = D::SERVICE,
            model,
            "no prices for this model: its cost is counted as 0"
        );
    }
    driver.events().emit(ready).await;
    driver.open_first();
    let mut tick = tokio::time::interval(D::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut input_open = true;
    loop {
        let reading = input_open && !driver.closing();
        let (conn, opener) = driver.connections();
        let step = tokio::select! {
            message = input.recv(), if reading => match message {
                Some(message) => driver.on_input(message).await,
                None => {
                    input_open = false;
                    driver.on_input(EngineInput::Close).await
                }
            },
            message = next_message(conn) => driver.on_message(message).await,
            opened = next_opened(opener) => driver.on_opened(opened).await,
            Some(done) = tools.recv() => driver.on_tool_done(done).await,
            _ = tick.tick() => driver.on_tick().await,
        };
        if matches!(step, Step::Stop) {
            break;
        }
    }
    if let Some(conn) = driver.connections().0.take() {
        conn.close(SEND_WAIT).await;
    }
    let dropped_ms = driver.dropped_ms();
    if dropped_ms > 0 {
        tracing::warn!(
            service = D::SERVICE,
            dropped_ms,
            "user audio dropped while no connection was open"
        );
    }
    tracing::debug!(
        service = D::SERVICE,
        cost_micro_usd = driver.cost_micro_usd(),
        "conversation over"
    );
    driver.events().emit(EngineEvent::Closed).await;
}

async fn next_message(conn: &mut Option<Conn>) -> Received {
    match conn {
        Some(conn) => Received::from(futures_util::StreamExt::next(&mut conn.stream).await),
        None => std::future::pending().await,
    }
}

async fn next_opened<P, E: From<ConnectError>>(
    opener: &mut Option<Opener<P, E>>,
) -> Result<Conn, E> {
    match opener {
        Some(opener) => (&mut opener.ready)
            .await
            .unwrap_or_else(|_| Err(ConnectError::Unavailable("the opener stopped".into()).into())),
        None => std::future::pending().await,
    }
}

/// Starts a conversation: `driver` gets the conversation's input and sends
/// its events, on a task of its own within the caller's span.
pub(crate) fn start<F, D>(driver: F) -> super::EngineSession
where
    F: FnOnce(mpsc::Receiver<EngineInput>, mpsc::Sender<EngineEvent>) -> D,
    D: Future<Output = ()> + Send + 'static,
{
    let (session, input, events) = super::EngineSession::channel();
    tokio::spawn(tracing::Instrument::in_current_span(driver(input, events)));
    session
}

/// Waits for the service to take one message, or to close.
pub(crate) const SEND_WAIT: Duration = Duration::from_secs(2);
/// After `Close`, the longest wait for the reply in progress.
pub(crate) const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// Closes `conn` on its own task (a connection replaced by another).
pub(crate) fn close_in_background(conn: Conn) {
    tokio::spawn(conn.close(SEND_WAIT));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_keeps_the_latest_audio_and_counts_the_rest() {
        let mut backlog = Backlog::new(1_000, 1);
        backlog.hold(&[1; 600]);
        backlog.hold(&[2; 600]);
        assert_eq!(backlog.dropped_ms(), 200);
        let held = backlog.take();
        assert_eq!(held.len(), 1_000);
        assert_eq!((held[0], held[399], held[400]), (1, 1, 2));
        assert!(backlog.take().is_empty());
    }

    #[test]
    fn retries_wait_longer_each_time_up_to_the_limit_and_start_again() {
        let mut retries = Retries::new(3);
        assert_eq!(retries.next(), Some(Duration::ZERO));
        assert_eq!(retries.next(), Some(Duration::from_secs(1)));
        assert_eq!(retries.next(), Some(Duration::from_secs(3)));
        assert_eq!(retries.next(), None);
        retries.reset();
        assert_eq!(retries.next(), Some(Duration::ZERO));
        assert_eq!(Retries::new(0).next(), None);
    }

    #[test]
    fn the_backoff_starts_at_once_and_stays_at_its_longest() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(3));
        assert_eq!(backoff(9), Duration::from_secs(3));
        assert_eq!(backoff(0), Duration::ZERO);
    }
}
