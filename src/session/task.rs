//! The conversation task: one `select!` loop over the client, the engine,
//! the two queues and one timer, then a bounded hand-over of what is left
//! and the `Closed` message.
//!
//! The loop polls in a fixed order (`biased`) so that runs under paused time
//! are repeatable: timers first (each one fires once), then sends to the
//! client and the engine (they drain the queues), then engine events, and
//! client input last, so a burst from the client is queued, and trimmed, as
//! a whole before it goes out.
//!
//! A wake-up for the engine's events takes all it has said by then, and one
//! for the client's channel hands over a batch of reply audio, so a busy
//! gateway wakes once for several frames rather than once a frame.

mod decode;
mod downlink;
mod watchdog;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::mpsc::error::{SendError, TryRecvError};
use tokio::sync::mpsc::{self, Permit, PermitIterator};
use tokio::time::Instant;

use self::watchdog::{Watchdog, after};

use super::queues::{Downlink, SAMPLES_PER_MS, Uplink};
use super::{
    ClientInput, ClientOutput, CloseReason, ConversationSummary, Counters, ENGINE_LINGER_MS,
    Queued, SessionLimits, Warning,
};
use crate::audio::StreamDecoder;
use crate::engine::{EngineEvent, EngineInput, EngineSession};
use crate::usage::UsageDelta;

/// Raw PCM chunks at least this big (half a second at 16 kHz) are converted
/// on a blocking thread. Compressed chunks always are: how much audio a few
/// bytes of Opus carry is only known once they are decoded, so decoding
/// never holds a runtime worker. The conversation waits either way.
const BLOCKING_PCM_BYTES: usize = 16 * 1024;
/// Most texts and tool results waiting for the engine, and their bytes;
/// more means the engine is not taking input.
const MAX_UPLINK_MESSAGES: usize = 256;
const MAX_UPLINK_MESSAGE_BYTES: usize = 64 * 1024;
/// Most items waiting for the client, whatever their kind.
const MAX_DOWNLINK_ITEMS: usize = 1024;
/// Most reply audio handed to the client at once: the client's channel
/// holds at most this much that barge-in can no longer clear.
const AUDIO_BATCH_MS: u64 = 200;
/// Most engine events taken in one wake-up. Client input is taken one
/// message a wake-up: each goes to the engine as soon as it can.
const EVENT_BATCH: usize = 32;

pub(super) struct Io {
    pub(super) input: mpsc::Receiver<Queued>,
    pub(super) output: mpsc::Sender<ClientOutput>,
    pub(super) engine: EngineSession,
    pub(super) shutdown: Arc<Notify>,
    /// Why the shutdown came, when not the server's.
    pub(super) close_reason: Arc<std::sync::OnceLock<CloseReason>>,
    /// Told once the engine has really ended (see `ConversationHandle`).
    pub(super) engine_ended: tokio::sync::oneshot::Sender<()>,
}

pub(super) struct Task {
    io: Io,
    state: State,
}

/// How the conversation ends.
struct Ending {
    reason: CloseReason,
    message: String,
}

impl Ending {
    fn new(reason: CloseReason, message: impl Into<String>) -> Option<Self> {
        Some(Self {
            reason,
            message: message.into(),
        })
    }
}

/// Where the conversation is.
enum Phase {
    /// Client input is read and passed on.
    Talking,
    /// Stop, end of input, shutdown or the maximum length: client input is
    /// no longer read, the uplink is flushed, then the engine's `Closed` is
    /// awaited until the watchdog's close grace passes.
    Closing(Closing),
}

/// Why a conversation is closing.
struct Closing {
    reason: CloseReason,
    /// A decoder complaint about the end of the stream, kept for the message.
    note: Option<String>,
}

impl Closing {
    fn end(&self, extra: Option<String>) -> Option<Ending> {
        let mut message = match self.reason {
            CloseReason::Shutdown => "the server is shutting down".to_owned(),
            CloseReason::MaxDuration => "the conversation reached its maximum length".to_owned(),
            CloseReason::LedgerUnavailable => {
                "the cost of this conversation cannot be recorded, so it cannot go on".to_owned()
            }
            _ => "the client stopped".to_owned(),
        };
        for part in self.note.iter().chain(extra.as_ref()) {
            message.push_str("; ");
            message.push_str(part);
        }
        Ending::new(self.reason, message)
    }
}

/// How far the engine's input has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineInputState {
    /// The engine takes input.
    Accepting,
    /// `Close` went to the engine: nothing follows it.
    CloseSent,
    /// The engine dropped its input: nothing more can reach it.
    Refused,
}

struct State {
    limits: SessionLimits,
    counters: Arc<Counters>,
    decoder: Option<StreamDecoder>,
    /// Scratch buffer for decoded PCM.
    pcm: Vec<i16>,
    uplink: Uplink,
    downlink: Downlink,
    watchdog: Watchdog,
    phase: Phase,
    engine_input: EngineInputState,
    /// The engine's event stream is still open.
    engine_open: bool,
    /// The client still reads its output.
    client_open: bool,
    audio_in_samples: u64,
    /// The turn whose speech ended last, and when.
    speech_ended_at: Option<(u64, Instant)>,
    turns: u32,
    latency_ms: Vec<u64>,
    usage: UsageDelta,
    /// Turn spans, latency and usage per turn for logs and traces.
    trace: crate::telemetry::ConversationTrace,
}

/// What woke the loop.
enum Wake<'a> {
    Timer,
    Shutdown,
    Output(Result<PermitIterator<'a, ClientOutput>, SendError<()>>),
    EngineSend(Result<Permit<'a, EngineInput>, SendError<()>>),
    Event(Option<EngineEvent>),
    Input(Option<Queued>),
}

/// Slots in the client's channel. One slot is always left for `Closed`,
/// and reply audio goes only into an empty channel (then a batch of it, up
/// to [`AUDIO_BATCH_MS`]): queued audio stays in the downlink, where
/// barge-in can still clear it.
async fn output_slots(
    output: &mpsc::Sender<ClientOutput>,
    audio: bool,
) -> Result<PermitIterator<'_, ClientOutput>, SendError<()>> {
    let wanted = if audio { output.max_capacity() } else { 2 };
    output.reserve_many(wanted).await
}

impl Task {
    pub(super) fn new(
        io: Io,
        decoder: Option<StreamDecoder>,
        limits: SessionLimits,
        counters: Arc<Counters>,
    ) -> Self {
        let state = State {
            limits,
            counters,
            decoder,
            pcm: Vec::new(),
            uplink: Uplink::new(limits.uplink_queue_ms),
            downlink: Downlink::default(),
            watchdog: Watchdog::new(limits, Instant::now()),
            phase: Phase::Talking,
            engine_input: EngineInputState::Accepting,
            engine_open: true,
            client_open: true,
            audio_in_samples: 0,
            speech_ended_at: None,
            turns: 0,
            latency_ms: Vec::new(),
            usage: UsageDelta::default(),
            trace: crate::telemetry::ConversationTrace::new(),
        };
        Self { io, state }
    }

    pub(super) async fn run(mut self) -> ConversationSummary {
        let ending = self.converse().await;
        self.finish(ending).await
    }

    async fn converse(&mut self) -> Ending {
        let Self { io, state } = self;
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        // Made once, not at every wake-up (each made and dropped a waiter).
        let shutdown = io.shutdown.notified();
        tokio::pin!(shutdown);
        loop {
            let deadline = state.watchdog.next_deadline(state.downlink.oldest_audio());
            // The timer is moved only to an earlier deadline, or once it has
            // fired: a later one (most frames push the idle deadline on)
            // waits for the armed timer, whose wake-up finds nothing due and
            // re-arms it here. That saves re-filing the timer every frame.
            if let Some(deadline) = deadline
                && (deadline < timer.deadline() || timer.is_elapsed())
                && timer.deadline() != deadline
            {
                timer.as_mut().reset(deadline);
            }
            let talking = matches!(state.phase, Phase::Talking);
            let accepting = state.engine_input == EngineInputState::Accepting;
            let wake = tokio::select! {
                biased;
                () = &mut timer, if deadline.is_some() => Wake::Timer,
                () = &mut shutdown, if talking => Wake::Shutdown,
                permits = output_slots(&io.output, state.downlink.front_is_audio()),
                    if state.client_open && !state.downlink.is_empty() => Wake::Output(permits),
                permit = io.engine.input.reserve(),
                    if accepting && !state.uplink.is_empty() => Wake::EngineSend(permit),
                event = io.engine.events.recv(), if state.engine_open => Wake::Event(event),
                input = io.input.recv(), if talking => Wake::Input(input),
            };
            let now = Instant::now();
            let ending = match wake {
                Wake::Timer => state.on_timer(now),
                Wake::Shutdown => {
                    let reason = io.close_reason.get().copied();
                    state.begin_close(reason.unwrap_or(CloseReason::Shutdown), now)
                }
                Wake::Output(Ok(permits)) => {
                    state.hand_over(permits);
                    None
                }
                Wake::Output(Err(_)) => state.client_gone(now),
                Wake::EngineSend(Ok(permit)) => {
                    state.sent_to_engine(permit, now);
                    None
                }
                Wake::EngineSend(Err(_)) => {
                    state.engine_refuses();
                    None
                }
                Wake::Event(event) => {
                    // With whatever else the engine has said by now.
                    let mut ending = state.on_event(event, now);
                    for _ in 1..EVENT_BATCH {
                        if ending.is_some() || !state.engine_open {
                            break;
                        }
                        match io.engine.events.try_recv() {
                            Ok(event) => ending = state.on_event(Some(event), now),
                            Err(TryRecvError::Disconnected) => ending = state.on_event(None, now),
                            Err(TryRecvError::Empty) => break,
                        }
                    }
                    ending
                }
                Wake::Input(None) => state.begin_close(CloseReason::ClientStopped, now),
                Wake::Input(Some(queued)) => state.take_input(queued, now).await,
            };
            if let Some(ending) = ending {
                return ending;
            }
        }
    }

    /// Lets the engine go, hands what is queued to the client within the
    /// grace period (nothing after a slow-client close), then sends `Closed`.
    async fn finish(self, ending: Ending) -> ConversationSummary {
        let Self { io, mut state } = self;
        let Io {
            input,
            output,
            engine,
            engine_ended,
            ..
        } = io;
        if state.engine_input != EngineInputState::CloseSent && state.engine_open {
            // Best effort: an engine that is gone or stalled is dropped anyway.
            let _ = engine.input.try_send(EngineInput::Close);
        }
        let crate::engine::EngineSession {
            input: engine_input,
            events: mut engine_events,
        } = engine;
        drop(engine_input);
        drop(input);
        if ending.reason == CloseReason::SlowClient || !state.client_open {
            state.downlink.clear();
            state.publish_downlink();
        }
        let deadline = after(Instant::now(), state.limits.close_grace_ms);
        while !state.downlink.is_empty() {
            let audio = state.downlink.front_is_audio();
            match tokio::time::timeout_at(deadline, output_slots(&output, audio)).await {
                Ok(Ok(permits)) => state.hand_over(permits),
                Ok(Err(_)) | Err(_) => {
                    state.downlink.clear();
                    state.publish_downlink();
                }
            }
        }
        let summary = state.summary();
        let reason = ending.reason.code();
        state.trace.ended(reason, summary.turns, &summary.usage);
        // The slot kept free by `output_slots` takes it without waiting; it
        // fails only when the client has dropped its receiver.
        let _ = output.try_send(ClientOutput::Closed {
            reason: ending.reason,
            message: ending.message,
            summary: Box::new(summary.clone()),
        });
        drop(output);
        // The conversation is over only when the engine is: until every one
        // of its tasks (and any upstream stream they hold) has ended, the
        // caller keeps its admission slot. What it still says is dropped.
        let counters = Arc::clone(&state.counters);
        tokio::spawn(async move {
            let linger = Duration::from_millis(ENGINE_LINGER_MS);
            let ended = tokio::time::timeout(linger, async {
                while engine_events.recv().await.is_some() {}
            })
            .await;
            if ended.is_err() {
                counters.add_engine_lingered();
            }
            let _ = engine_ended.send(());
        });
        summary
    }
}

impl State {
    /// One queued input; its share of the input budget is released once
    /// it has been taken in.
    async fn take_input(&mut self, queued: Queued, now: Instant) -> Option<Ending> {
        let Queued { input, _bytes } = queued;
        self.on_input(input, now).await
    }

    async fn on_input(&mut self, input: ClientInput, now: Instant) -> Option<Ending> {
        match input {
            ClientInput::Audio(bytes) => self.on_audio(bytes, now).await,
            ClientInput::Pcm(samples) => self.accept_pcm(&samples, now),
            ClientInput::Text(text) => {
                self.watchdog.activity(now);
                self.queue_message(EngineInput::Text(text), now)
            }
            ClientInput::ToolResult { id, json } => {
                self.watchdog.activity(now);
                self.queue_message(EngineInput::ToolResult { id, json }, now)
            }
            ClientInput::NewStream(format) => {
                if let Some(decoder) = self.decoder.as_mut() {
                    decoder.restart(format);
                }
                None
            }
            ClientInput::Stop => self.begin_close(CloseReason::ClientStopped, now),
        }
    }
}

impl State {
    /// Queues 16 kHz PCM for the engine.
    fn accept_pcm(&mut self, pcm: &[i16], now: Instant) -> Option<Ending> {
        if pcm.is_empty() {
            return None;
        }
        self.watchdog.fed();
        self.audio_in_samples += pcm.len() as u64;
        self.counters
            .set_audio_in(self.audio_in_samples / SAMPLES_PER_MS);
        if self.engine_input != EngineInputState::Accepting {
            return None;
        }
        let overflow = self.uplink.push_pcm(pcm);
        self.uplink_changed(now);
        if !overflow {
            return None;
        }
        let message = format!(
            "the engine is behind: dropping the oldest audio beyond {} ms",
            self.limits.uplink_queue_ms
        );
        self.warn(Warning::UplinkDropped, message, now)
    }

    fn queue_message(&mut self, input: EngineInput, now: Instant) -> Option<Ending> {
        if self.engine_input != EngineInputState::Accepting {
            return None;
        }
        if self.uplink.messages() >= MAX_UPLINK_MESSAGES {
            let message = format!(
                "the engine is not taking input: {} messages waiting",
                self.uplink.messages()
            );
            return Ending::new(CloseReason::EngineStalled, message);
        }
        if self.uplink.message_bytes() >= MAX_UPLINK_MESSAGE_BYTES {
            let message = format!(
                "the engine is not taking input: {} bytes of messages waiting",
                self.uplink.message_bytes()
            );
            return Ending::new(CloseReason::EngineStalled, message);
        }
        self.uplink.push_message(input);
        self.uplink_changed(now);
        None
    }

    /// Starts the send-wait clock when the uplink stops being empty.
    fn uplink_changed(&mut self, now: Instant) {
        self.watchdog.uplink(self.uplink.is_empty(), now);
        self.publish_uplink();
    }

    fn sent_to_engine(&mut self, permit: Permit<'_, EngineInput>, now: Instant) {
        let Some(item) = self.uplink.pop() else {
            return;
        };
        if item == EngineInput::Close {
            self.engine_input = EngineInputState::CloseSent;
        }
        permit.send(item);
        self.watchdog.engine_took();
        self.uplink_changed(now);
    }

    /// The engine dropped its input: nothing more can reach it.
    fn engine_refuses(&mut self) {
        self.engine_input = EngineInputState::Refused;
        while self.uplink.pop().is_some() {}
        self.watchdog.uplink(true, Instant::now());
        self.publish_uplink();
    }

    /// Stop, end of input or shutdown: finishes the decoder, queues its last
    /// PCM and a Close for the engine, and waits for the engine to close.
    fn begin_close(&mut self, reason: CloseReason, now: Instant) -> Option<Ending> {
        if matches!(self.phase, Phase::Closing(_)) {
            return None;
        }
        let mut note = None;
        if let Some(decoder) = self.decoder.as_mut()
            && decoder.stats().bytes_in > 0
        {
            let mut pcm = std::mem::take(&mut self.pcm);
            let result = decoder.finish(&mut pcm);
            let decoded_any = decoder.stats().pcm_samples_out > 0;
            self.counters.set_decoder(decoder.stats());
            let ending = self.accept_pcm(&pcm, now);
            pcm.clear();
            self.pcm = pcm;
            if ending.is_some() {
                return ending;
            }
            match result {
                Ok(()) => {}
                Err(e) if decoded_any => note = Some(e.to_string()),
                Err(e) => return Ending::new(CloseReason::BadAudio, e.to_string()),
            }
        }
        if self.engine_input == EngineInputState::Accepting {
            self.uplink.push_message(EngineInput::Close);
            self.uplink_changed(now);
        }
        self.phase = Phase::Closing(Closing { reason, note });
        self.watchdog.closing(now);
        None
    }

    /// The client dropped its output: nothing more can reach it.
    fn client_gone(&mut self, now: Instant) -> Option<Ending> {
        self.client_open = false;
        self.downlink.clear();
        self.publish_downlink();
        self.begin_close(CloseReason::ClientStopped, now)
    }

    fn publish_uplink(&self) {
        self.counters.set_uplink_queued(self.uplink.queued_ms());
        self.counters.set_uplink_dropped(self.uplink.dropped_ms());
    }

    fn publish_downlink(&self) {
        self.counters.set_downlink_queued(self.downlink.queued_ms());
        self.counters
            .set_downlink_cleared(self.downlink.cleared_ms());
        self.counters.set_audio_out(self.downlink.sent_ms());
    }

    fn summary(&self) -> ConversationSummary {
        ConversationSummary {
            turns: self.turns,
            latency_ms: self.latency_ms.clone(),
            usage: self.usage,
            counters: self.counters.snapshot(),
            decoder: self.decoder.as_ref().map(|d| d.stats().clone()),
        }
    }
}
