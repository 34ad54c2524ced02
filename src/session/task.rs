//! The conversation task: one `select!` loop over the client, the engine,
//! the two queues and one timer, then a bounded hand-over of what is left
//! and the `Closed` message.
//!
//! The loop polls in a fixed order (`biased`) so that runs under paused time
//! are repeatable: timers first (each one fires once), then sends to the
//! client and the engine (they drain the queues), then engine events, and
//! client input last, so a burst from the client is queued, and trimmed, as
//! a whole before it goes out.

mod decode;
mod watchdog;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::mpsc::error::SendError;
use tokio::sync::mpsc::{self, Permit};
use tokio::time::Instant;

use super::queues::{Downlink, SAMPLES_PER_MS, Uplink};
use super::{
    ClientInput, ClientOutput, CloseReason, ConversationSummary, Counters, ENGINE_LINGER_MS,
    Queued, SessionLimits,
};
use crate::audio::StreamDecoder;
use crate::engine::{EngineEvent, EngineInput, EngineSession, ErrorKind};
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

pub(super) struct Io {
    pub(super) input: mpsc::Receiver<Queued>,
    pub(super) output: mpsc::Sender<ClientOutput>,
    pub(super) engine: EngineSession,
    pub(super) shutdown: Arc<Notify>,
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

/// A close in progress: the uplink is flushed, then the engine's `Closed`
/// is awaited until `deadline`.
struct Closing {
    reason: CloseReason,
    /// A decoder complaint about the end of the stream, kept for the message.
    note: Option<String>,
    deadline: Instant,
}

impl Closing {
    fn end(&self, extra: Option<String>) -> Option<Ending> {
        let mut message = match self.reason {
            CloseReason::Shutdown => "the server is shutting down".to_owned(),
            CloseReason::MaxDuration => "the conversation reached its maximum length".to_owned(),
            _ => "the client stopped".to_owned(),
        };
        for part in self.note.iter().chain(extra.as_ref()) {
            message.push_str("; ");
            message.push_str(part);
        }
        Ending::new(self.reason, message)
    }
}

/// Client audio bytes that have not produced any PCM yet.
struct Starving {
    since: Instant,
    bytes: u64,
}

struct State {
    limits: SessionLimits,
    counters: Arc<Counters>,
    decoder: Option<StreamDecoder>,
    /// Scratch buffer for decoded PCM.
    pcm: Vec<i16>,
    uplink: Uplink,
    downlink: Downlink,
    audio_in_samples: u64,
    /// The last speech, typed text, tool result or reply: what keeps a
    /// conversation from being idle (bytes alone do not).
    last_activity: Instant,
    /// When the conversation reaches its maximum length.
    ends_at: Instant,
    starving: Option<Starving>,
    /// Since when the head of the uplink has waited for the engine.
    send_waiting_since: Option<Instant>,
    /// Whether the current send wait was already counted as a stall.
    stall_counted: bool,
    closing: Option<Closing>,
    /// The engine still takes input.
    engine_accepts: bool,
    close_sent: bool,
    /// The engine's event stream is still open.
    engine_open: bool,
    /// The client still reads its output.
    client_open: bool,
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
    Output(Result<Permit<'a, ClientOutput>, SendError<()>>),
    EngineSend(Result<Permit<'a, EngineInput>, SendError<()>>),
    Event(Option<EngineEvent>),
    Input(Option<Queued>),
}

/// A slot in the client's channel. One slot is always left for `Closed`,
/// and reply audio goes only into an empty channel: queued audio stays in
/// the downlink, where barge-in can still clear it.
async fn output_slot(
    output: &mpsc::Sender<ClientOutput>,
    audio: bool,
) -> Result<Permit<'_, ClientOutput>, SendError<()>> {
    let wanted = if audio { output.max_capacity() } else { 2 };
    let mut permits = output.reserve_many(wanted).await?;
    permits.next().ok_or(SendError(()))
}

fn after(start: Instant, ms: u64) -> Instant {
    // Limits are plain integers; an absurd one means "never".
    start
        .checked_add(Duration::from_millis(ms))
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 86_400))
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
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
            audio_in_samples: 0,
            last_activity: Instant::now(),
            ends_at: after(Instant::now(), limits.max_duration_ms),
            starving: None,
            send_waiting_since: None,
            stall_counted: false,
            closing: None,
            engine_accepts: true,
            close_sent: false,
            engine_open: true,
            client_open: true,
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
        loop {
            let deadline = state.next_deadline();
            if let Some(deadline) = deadline
                && timer.deadline() != deadline
            {
                timer.as_mut().reset(deadline);
            }
            let wake = tokio::select! {
                biased;
                () = &mut timer, if deadline.is_some() => Wake::Timer,
                () = io.shutdown.notified(), if state.closing.is_none() => Wake::Shutdown,
                permit = output_slot(&io.output, state.downlink.front_is_audio()),
                    if state.client_open && !state.downlink.is_empty() => Wake::Output(permit),
                permit = io.engine.input.reserve(),
                    if state.engine_accepts && !state.uplink.is_empty() => Wake::EngineSend(permit),
                event = io.engine.events.recv(), if state.engine_open => Wake::Event(event),
                input = io.input.recv(), if state.closing.is_none() => Wake::Input(input),
            };
            let now = Instant::now();
            let ending = match wake {
                Wake::Timer => state.on_timer(now),
                Wake::Shutdown => state.begin_close(CloseReason::Shutdown, now),
                Wake::Output(Ok(permit)) => {
                    if let Some(item) = state.downlink.pop() {
                        permit.send(item);
                    }
                    state.publish_downlink();
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
                Wake::Event(event) => state.on_event(event, now),
                Wake::Input(None) => state.begin_close(CloseReason::ClientStopped, now),
                Wake::Input(Some(queued)) => {
                    // Its share of the input budget is released once taken in.
                    let Queued { input, _bytes } = queued;
                    state.on_input(input, now).await
                }
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
        if !state.close_sent && state.engine_open {
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
            match tokio::time::timeout_at(deadline, output_slot(&output, audio)).await {
                Ok(Ok(permit)) => {
                    if let Some(item) = state.downlink.pop() {
                        permit.send(item);
                    }
                }
                Ok(Err(_)) | Err(_) => state.downlink.clear(),
            }
            state.publish_downlink();
        }
        let summary = state.summary();
        let reason = ending.reason.code();
        state.trace.ended(reason, summary.turns, &summary.usage);
        // The slot kept free by `output_slot` takes it without waiting; it
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
    async fn on_input(&mut self, input: ClientInput, now: Instant) -> Option<Ending> {
        match input {
            ClientInput::Audio(bytes) => self.on_audio(bytes, now).await,
            ClientInput::Pcm(samples) => self.accept_pcm(&samples, now),
            ClientInput::Text(text) => {
                self.last_activity = now;
                self.queue_message(EngineInput::Text(text), now)
            }
            ClientInput::ToolResult { id, json } => {
                self.last_activity = now;
                self.queue_message(EngineInput::ToolResult { id, json }, now)
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
        self.starving = None;
        self.audio_in_samples += pcm.len() as u64;
        self.counters
            .set_audio_in(self.audio_in_samples / SAMPLES_PER_MS);
        if !self.engine_accepts {
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
        self.warn("uplink_dropped", message)
    }

    fn queue_message(&mut self, input: EngineInput, now: Instant) -> Option<Ending> {
        if !self.engine_accepts {
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
        if self.uplink.is_empty() {
            self.send_waiting_since = None;
        } else if self.send_waiting_since.is_none() {
            self.send_waiting_since = Some(now);
        }
        self.publish_uplink();
    }

    fn sent_to_engine(&mut self, permit: Permit<'_, EngineInput>, now: Instant) {
        let Some(item) = self.uplink.pop() else {
            return;
        };
        self.close_sent |= item == EngineInput::Close;
        permit.send(item);
        // The engine took something: a new wait (and stall episode) begins.
        self.send_waiting_since = None;
        self.stall_counted = false;
        self.uplink_changed(now);
    }

    /// The engine dropped its input: nothing more can reach it.
    fn engine_refuses(&mut self) {
        self.engine_accepts = false;
        while self.uplink.pop().is_some() {}
        self.send_waiting_since = None;
        self.publish_uplink();
    }

    /// Stop, end of input or shutdown: finishes the decoder, queues its last
    /// PCM and a Close for the engine, and waits for the engine to close.
    fn begin_close(&mut self, reason: CloseReason, now: Instant) -> Option<Ending> {
        if self.closing.is_some() {
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
        if self.engine_accepts {
            self.uplink.push_message(EngineInput::Close);
            self.uplink_changed(now);
        }
        self.closing = Some(Closing {
            reason,
            note,
            deadline: after(now, self.limits.close_grace_ms),
        });
        None
    }

    /// The client dropped its output: nothing more can reach it.
    fn client_gone(&mut self, now: Instant) -> Option<Ending> {
        self.client_open = false;
        self.downlink.clear();
        self.publish_downlink();
        self.begin_close(CloseReason::ClientStopped, now)
    }

    fn on_event(&mut self, event: Option<EngineEvent>, now: Instant) -> Option<Ending> {
        if let Some(event) = &event {
            self.trace.on_event(event, now);
        }
        let Some(event) = event else {
            self.engine_open = false;
            return match &self.closing {
                Some(closing) => closing.end(None),
                None => Ending::new(
                    CloseReason::EngineError,
                    "the engine stopped without closing the conversation",
                ),
            };
        };
        match &event {
            EngineEvent::Closed => {
                self.engine_open = false;
                return match &self.closing {
                    Some(closing) => closing.end(None),
                    None => Ending::new(
                        CloseReason::EngineClosed,
                        "the engine closed the conversation",
                    ),
                };
            }
            EngineEvent::SpeechEnded { turn_id } => {
                self.last_activity = now;
                self.speech_ended_at = Some((*turn_id, now));
            }
            EngineEvent::SpeechStarted { .. } | EngineEvent::Transcript { .. } => {
                self.last_activity = now;
            }
            EngineEvent::Audio(_) => {
                self.last_activity = now;
                if let Some((turn_id, ended)) = self.speech_ended_at.take() {
                    let ms = now.duration_since(ended).as_millis();
                    let ms = u64::try_from(ms).unwrap_or(u64::MAX);
                    self.latency_ms.push(ms);
                    if let Some(ending) = self.forward(ClientOutput::Latency { turn_id, ms }) {
                        return Some(ending);
                    }
                }
            }
            EngineEvent::TurnEnd { .. } => {
                self.last_activity = now;
                self.turns = self.turns.saturating_add(1);
            }
            EngineEvent::Usage(delta) => self.usage.add(delta),
            EngineEvent::Interrupted { .. } => {
                self.downlink.clear_audio();
                self.counters.add_interruption();
                self.publish_downlink();
            }
            EngineEvent::Error {
                kind: ErrorKind::Fatal,
                message,
            } => {
                let message = message.clone();
                return self
                    .forward(ClientOutput::Event(event))
                    .or_else(|| Ending::new(CloseReason::EngineError, message));
            }
            _ => {}
        }
        self.forward(ClientOutput::Event(event))
    }

    /// Queues an item for the client; closes a client that lets too much
    /// pile up.
    fn forward(&mut self, output: ClientOutput) -> Option<Ending> {
        if !self.client_open {
            return None;
        }
        self.downlink.push(output);
        self.publish_downlink();
        let limit_ms = self.limits.downlink_queue_ms;
        if self.downlink.queued_ms() > limit_ms {
            let message = format!(
                "the client is not reading: {} ms of reply audio waiting (limit {limit_ms} ms)",
                self.downlink.queued_ms()
            );
            return Ending::new(CloseReason::SlowClient, message);
        }
        if self.downlink.len() > MAX_DOWNLINK_ITEMS {
            let message = format!(
                "the client is not reading: {} messages waiting",
                self.downlink.len()
            );
            return Ending::new(CloseReason::SlowClient, message);
        }
        None
    }

    fn warn(&mut self, code: &'static str, message: String) -> Option<Ending> {
        self.forward(ClientOutput::Warning { code, message })
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
