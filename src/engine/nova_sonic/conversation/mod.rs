//! One Nova Sonic conversation across upstream streams.
//!
//! The driver here owns the loop and hands each concern to its part: the
//! [`pump`] (user audio in 32 ms frames, silence while the user is mute,
//! the replay buffer), the [`stall`] watch, the tool runner
//! (`engine::tool_runner`: tools off the loop) and the [`handover`] (opening streams, the warm hand-off
//! before a stream's age limit, reconnection, closing). Every open goes
//! through the conversation's [`OpenPolicy`] and the engine's breaker. All
//! timing is on Tokio's clock, so tests run it under paused time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use self::pump::{AudioPump, SILENCE};
use self::stall::StallWatch;
use super::history::{History, MAX_PIECE_BYTES};
use super::input::{BlockRole, Builder};
use super::output::{BlockKind, Output};
use super::policy::OpenPolicy;
use super::stream::{Failure, SendError, StreamItem, Upstream};
use super::translate::Translator;
use super::{Shared, is_v1};
use crate::engine::tool_runner::{ToolDone, ToolRunner};
use crate::engine::{EngineEvent, EngineInput, ErrorKind, Role, Stage};
use crate::usage::UsageMeter;

mod handover;
mod pump;
mod stall;
#[cfg(test)]
mod tests;

/// The loop's tick: one audio frame.
const FRAME: Duration = Duration::from_millis(32);
/// Wait for room for a control event (block boundaries, text, tool results).
const CONTROL_WAIT: Duration = Duration::from_secs(2);
/// After `Close`, how long with nothing happening before the stream is ended.
const CLOSE_QUIET: Duration = Duration::from_millis(2_500);
/// After `Close`, the longest wait for a reply to finish.
const CLOSE_LIMIT: Duration = Duration::from_secs(60);
/// The longest wait for a closing stream to end after `sessionEnd`.
const END_WAIT: Duration = Duration::from_secs(5);
/// Events a prepared stream may send before it takes over.
const MAX_EARLY_EVENTS: usize = 256;
/// A stream the service answered that sent something, or stayed up this
/// long, has settled: it tells the breaker that Bedrock takes streams again.
const SETTLE: Duration = Duration::from_secs(2);

/// A stream with the names its events use.
#[derive(Debug)]
struct Stream {
    up: Upstream,
    builder: Builder,
    /// The audio block's content name, once it is open.
    audio: Option<String>,
    generation: u32,
    /// The service answered the call (`send()` returned).
    opened: bool,
    /// It sent an event or stayed up for [`SETTLE`].
    settled: bool,
    /// Events that arrived before this stream took over.
    early: Vec<StreamItem>,
}

#[derive(Debug, Default)]
struct Rotation {
    /// When the current stream passed `rotate_after`.
    armed_at: Option<Instant>,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    voice: String,
    history: Vec<(Role, String)>,
    input: mpsc::Receiver<EngineInput>,
    events: mpsc::Sender<EngineEvent>,
) {
    let settings = &shared.settings;
    let meter = UsageMeter::new(&settings.model, &settings.prices);
    let (tools, tool_rx) = ToolRunner::new(shared.tools.clone());
    let (drain_tx, drain_rx) = mpsc::channel(64);
    let now = Instant::now();
    let mut driver = Driver {
        translator: Translator::new(settings.output_rate_hz, meter),
        shared: shared.clone(),
        voice,
        events,
        history: History::carried(&history),
        current: None,
        next: None,
        generation: 0,
        rotation: Rotation::default(),
        pump: AudioPump::new(now),
        stall: StallWatch::new(settings.stall_timeout, now),
        retries: 0,
        reconnect_at: None,
        policy: OpenPolicy::new(
            settings.open_backoff,
            settings.open_backoff_max,
            settings.max_opens_per_minute,
        ),
        prepare_at: None,
        prepare_failures: 0,
        unanswered: None,
        closing_since: None,
        turn_ended_after_close: false,
        tools,
        drain_tx,
        dropped_frames: 0,
    };
    driver.main(input, tool_rx, drain_rx).await;
}

struct Driver {
    shared: Arc<Shared>,
    voice: String,
    events: mpsc::Sender<EngineEvent>,
    translator: Translator,
    history: History,
    current: Option<Stream>,
    next: Option<Stream>,
    generation: u32,
    rotation: Rotation,
    pump: AudioPump,
    stall: StallWatch,
    /// Reconnections in the current turn.
    retries: u32,
    /// A reconnection (or the first open) is due at this time.
    reconnect_at: Option<Instant>,
    /// Backoff, cap and breaker for every stream this conversation opens.
    policy: OpenPolicy,
    /// No next stream is prepared before this time (a prepare failed, or
    /// the breaker or the cap holds opens back).
    prepare_at: Option<Instant>,
    /// Prepared streams that failed since the last hand-off.
    prepare_failures: u32,
    /// A user message the failed stream never answered: asked again.
    unanswered: Option<String>,
    closing_since: Option<Instant>,
    turn_ended_after_close: bool,
    tools: ToolRunner,
    drain_tx: mpsc::Sender<StreamItem>,
    dropped_frames: u64,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// What the loop does after a step.
enum Step {
    Go,
    Stop,
}

async fn next_item(stream: &mut Option<Stream>) -> Option<StreamItem> {
    match stream {
        Some(s) => s.up.events.recv().await,
        None => std::future::pending().await,
    }
}

impl Driver {
    async fn main(
        &mut self,
        mut input: mpsc::Receiver<EngineInput>,
        mut tool_rx: mpsc::Receiver<ToolDone>,
        mut drain_rx: mpsc::Receiver<StreamItem>,
    ) {
        self.emit(EngineEvent::Ready {
            engine: "nova-sonic".into(),
            model: self.shared.settings.model.clone(),
            voice: self.voice.clone(),
        })
        .await;
        let mut stopped = matches!(self.reconnect().await, Step::Stop);
        let mut tick = tokio::time::interval(FRAME);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut input_open = true;
        while !stopped {
            let step = tokio::select! {
                message = input.recv(), if input_open => match message {
                    Some(message) => self.on_input(message).await,
                    None => {
                        input_open = false;
                        self.on_input(EngineInput::Close).await
                    }
                },
                item = next_item(&mut self.current) => self.on_item(item).await,
                item = next_item(&mut self.next) => {
                    self.on_next_item(item);
                    Step::Go
                }
                Some(done) = tool_rx.recv() => {
                    self.on_tool_result(&done.id, done.generation, &done.result).await
                }
                Some(item) = drain_rx.recv() => {
                    self.on_drained(item).await;
                    Step::Go
                }
                _ = tick.tick() => self.on_tick().await,
            };
            stopped = matches!(step, Step::Stop);
        }
        // Late usage from streams still closing.
        let deadline = Instant::now() + Duration::from_millis(300);
        while let Ok(Some(item)) = tokio::time::timeout_at(deadline, drain_rx.recv()).await {
            self.on_drained(item).await;
        }
        for note in self.translator.notes.drain(..) {
            tracing::warn!("nova-sonic: {note}");
        }
        if self.dropped_frames > 0 {
            tracing::warn!(
                dropped_frames = self.dropped_frames,
                "nova-sonic: audio frames refused by a stalled stream"
            );
        }
        self.emit(EngineEvent::Closed).await;
    }

    async fn emit(&self, event: EngineEvent) {
        let _ = self.events.send(event).await;
    }

    async fn on_input(&mut self, message: EngineInput) -> Step {
        match message {
            EngineInput::Audio(samples) => self.on_audio(&samples),
            EngineInput::Text(text) => {
                let text = text.trim().to_owned();
                if text.is_empty() {
                    return Step::Go;
                }
                if is_v1(&self.shared.settings.model) {
                    let message =
                        "Nova Sonic v1 takes no typed text; speak, or use amazon.nova-2-sonic-v1:0"
                            .into();
                    self.emit(EngineEvent::Error {
                        kind: ErrorKind::BadInput,
                        message,
                    })
                    .await;
                    return Step::Go;
                }
                for event in self.translator.user_text(&text) {
                    self.emit(event).await;
                }
                self.history.push(BlockRole::User, &text);
                self.pump.heard();
                if let Some(stream) = self.current.as_mut()
                    && stream.audio.is_some()
                {
                    let events =
                        stream
                            .builder
                            .text_block(BlockRole::User, true, &text, MAX_PIECE_BYTES);
                    for event in &events {
                        let _ = stream.up.send(event, CONTROL_WAIT).await;
                    }
                }
                self.stall.expect_reply(Instant::now());
            }
            EngineInput::ToolResult { id, json } => {
                // A client-side tool answered.
                let generation = self.current.as_ref().map_or(0, |s| s.generation);
                return self.on_tool_result(&id, generation, &json).await;
            }
            EngineInput::Close => {
                if self.closing_since.is_none() {
                    self.closing_since = Some(Instant::now());
                }
            }
        }
        Step::Go
    }

    fn on_audio(&mut self, samples: &[i16]) {
        self.pump.push(samples, Instant::now());
        while let Some(frame) = self.pump.next_frame() {
            self.send_frame(&frame);
        }
    }

    /// One frame to the current stream; while there is none (reconnecting)
    /// the replay buffer keeps it.
    fn send_frame(&mut self, frame: &[i16]) {
        let Some(stream) = self.current.as_mut() else {
            return;
        };
        let Some(audio) = &stream.audio else {
            return;
        };
        let event = stream.builder.audio_input(audio, frame);
        match stream.up.try_send(&event) {
            Ok(()) => self.stall.accepted(),
            Err(SendError::Full) => {
                self.dropped_frames += 1;
                self.stall.refused(Instant::now());
            }
            Err(SendError::Closed) => {}
        }
    }

    async fn on_item(&mut self, item: Option<StreamItem>) -> Step {
        let item = item.unwrap_or(StreamItem::Ended);
        match item {
            StreamItem::Opened => {
                if let Some(stream) = self.current.as_mut() {
                    stream.opened = true;
                }
                Step::Go
            }
            StreamItem::Output(output) => {
                if let Some(stream) = self.current.as_mut()
                    && !stream.settled
                {
                    stream.settled = true;
                    let now = Instant::now();
                    self.shared.breaker.success(stream.up.opened_at, now);
                }
                self.on_output(output).await;
                self.maybe_hand_off().await;
                Step::Go
            }
            StreamItem::Malformed(reason) => {
                let message = format!("skipped a malformed event from Nova Sonic: {reason}");
                self.emit(EngineEvent::Error {
                    kind: ErrorKind::Transient,
                    message,
                })
                .await;
                Step::Go
            }
            StreamItem::Failed(failure) => self.on_failure(failure).await,
            StreamItem::Ended => {
                let failure =
                    Failure::transient("StreamEnded", "the service ended the stream".into());
                self.on_failure(failure).await
            }
        }
    }

    async fn on_output(&mut self, output: Output) {
        let now = Instant::now();
        self.stall.output(now);
        if let Output::ContentStart {
            kind: BlockKind::Audio,
            ..
        } = &output
            && self.rotation.armed_at.is_some()
            && self.next.is_none()
        {
            // The assistant is about to speak: the user is unlikely to be
            // mid-sentence. Prepare the next stream now.
            self.prepare_next();
        }
        let events = self.translator.on_output(output);
        for note in self.translator.notes.drain(..) {
            tracing::warn!("nova-sonic: {note}");
        }
        for event in events {
            match &event {
                EngineEvent::Transcript {
                    role: Role::User,
                    text,
                    ..
                } => {
                    self.history.push(BlockRole::User, text);
                    self.pump.heard();
                    self.stall.expect_reply(now);
                }
                EngineEvent::Transcript {
                    role: Role::Assistant,
                    text,
                    stage,
                    ..
                } => {
                    if *stage == Stage::Final {
                        self.history.push(BlockRole::Assistant, text);
                    }
                    self.stall.answered();
                }
                EngineEvent::Audio(_) | EngineEvent::Interrupted { .. } => {
                    self.stall.answered();
                }
                EngineEvent::TurnEnd { .. } => {
                    self.stall.answered();
                    self.retries = 0;
                    if self.closing_since.is_some() {
                        self.turn_ended_after_close = true;
                    }
                }
                EngineEvent::ToolCall { id, name, json } => {
                    self.stall.answered();
                    let generation = self.current.as_ref().map_or(0, |s| s.generation);
                    if self.tools.run(id, name, json, generation) {
                        continue;
                    }
                }
                _ => {}
            }
            self.emit(event).await;
        }
    }

    async fn on_tool_result(
        &mut self,
        id: &str,
        generation: u32,
        result: &serde_json::Value,
    ) -> Step {
        self.tools.finished(id);
        let Some(stream) = self.current.as_mut() else {
            return Step::Go;
        };
        if stream.generation != generation || stream.audio.is_none() {
            self.translator.notes.push(format!(
                "tool result {id} arrived after its stream was replaced"
            ));
            return Step::Go;
        }
        for event in stream.builder.tool_result(id, result) {
            if stream.up.send(&event, CONTROL_WAIT).await.is_err() {
                break;
            }
        }
        self.stall.expect_reply(Instant::now());
        Step::Go
    }

    async fn on_tick(&mut self) -> Step {
        let now = Instant::now();
        if let Some(at) = self.reconnect_at
            && now >= at
            && let Step::Stop = self.reconnect().await
        {
            return Step::Stop;
        }
        self.check_settled(now);
        // Silence while the user is mute.
        if self.pump.mute(now) {
            self.send_frame(&SILENCE);
        }
        // A stalled stream: no reply when one is due, or audio refused.
        if self.current.is_some() && self.stall.stalled(now) {
            let ms = self.stall.timeout().as_millis();
            let message = format!("nothing from the service for {ms} ms while a reply was due");
            return self
                .on_failure(Failure::transient("Stalled", message))
                .await;
        }
        self.rotation_tick(now);
        self.maybe_hand_off().await;
        // Closing: once the last reply is done and things are quiet.
        if let Some(since) = self.closing_since {
            let quiet = self.stall.quiet_for(now) >= CLOSE_QUIET
                && now.duration_since(since) >= CLOSE_QUIET;
            let done = self.assistant_done() && (self.turn_ended_after_close || quiet);
            if done || now.duration_since(since) >= CLOSE_LIMIT || self.current.is_none() {
                self.finish().await;
                return Step::Stop;
            }
        }
        Step::Go
    }
}
