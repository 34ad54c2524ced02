//! One conversation with the local engine: its audio through the voice
//! detector, speculative recognition at the first pause, the turn-end
//! model's verdict, the replies queued one at a time, and barge-in.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::reply::{
    EarlyRecognition, History, ReplyJob, ReplyProgress, Turn, TurnInput, recognise, remember,
};
use super::vad::{Segmenter, VadEvent};
use super::{MAX_PENDING_TURNS, SAMPLES_PER_MS, Shared, turn};
use crate::engine::{ConversationOptions, EngineEvent, EngineInput, ErrorKind, TurnEndReason};
use crate::tts;
use crate::usage::UsageDelta;

#[derive(Debug)]
struct ActiveReply {
    turn_id: u64,
    task: JoinHandle<()>,
    progress: Arc<ReplyProgress>,
}

pub(super) struct Conversation {
    shared: Arc<Shared>,
    options: ConversationOptions,
    voice: String,
    events: mpsc::Sender<EngineEvent>,
    segmenter: Segmenter,
    /// Input audio received so far, in ms: the conversation's clock.
    clock_ms: Arc<AtomicU64>,
    unreported_in_ms: u64,
    next_turn: u64,
    /// The user turn being spoken now.
    speaking: Option<u64>,
    /// Speculative recognition of the current turn: (samples, task).
    early: Option<(usize, EarlyRecognition)>,
    /// The turn-end model judging the current pause.
    turn_check: Option<turn::TurnCheck>,
    /// Bumped whenever speculative recognition becomes stale.
    early_generation: Arc<AtomicU64>,
    queue: VecDeque<Turn>,
    reply: Option<ActiveReply>,
    /// When the last finished reply stops playing on the client.
    played_until_ms: u64,
    /// The turn of that reply.
    played_turn: u64,
    history: History,
}

impl Conversation {
    pub(super) fn new(
        shared: Arc<Shared>,
        options: ConversationOptions,
        events: mpsc::Sender<EngineEvent>,
    ) -> Self {
        let voice = tts::voice_for(&shared.tts.voice, &options.voice, &options.language);
        Self {
            segmenter: Segmenter::new(shared.vad),
            shared,
            options,
            voice,
            events,
            clock_ms: Arc::new(AtomicU64::new(0)),
            unreported_in_ms: 0,
            next_turn: 1,
            speaking: None,
            early: None,
            turn_check: None,
            early_generation: Arc::new(AtomicU64::new(0)),
            queue: VecDeque::new(),
            reply: None,
            played_until_ms: 0,
            played_turn: 0,
            history: History::default(),
        }
    }

    pub(super) async fn run(mut self, mut input: mpsc::Receiver<EngineInput>) {
        let ready = EngineEvent::Ready {
            engine: "local".into(),
            model: self.shared.model.clone(),
            voice: self.voice.clone(),
        };
        if self.events.send(ready).await.is_err() {
            return;
        }
        let mut closing = false;
        loop {
            if self.reply.is_none() {
                if let Some(turn) = self.queue.pop_front() {
                    self.start_reply(turn);
                } else if closing {
                    break;
                }
            }
            tokio::select! {
                message = input.recv(), if !closing => match message {
                    Some(EngineInput::Audio(frame)) => self.on_audio(&frame).await,
                    Some(EngineInput::Text(text)) => {
                        if self.queue.len() >= MAX_PENDING_TURNS {
                            self.refuse_turn().await;
                        } else {
                            let id = self.take_turn_id();
                            self.queue.push_back(Turn { id, input: TurnInput::Text(text) });
                        }
                    }
                    Some(EngineInput::ToolResult { id, .. }) => {
                        let message = format!("tool result {id:?}: the local engine calls no tools");
                        self.emit(EngineEvent::Error { kind: ErrorKind::BadInput, message }).await;
                    }
                    Some(EngineInput::Close) | None => {
                        closing = true;
                        let mut vad_events = Vec::new();
                        self.segmenter.flush(&mut vad_events);
                        for event in vad_events {
                            self.on_vad(event).await;
                        }
                        self.report_input_usage().await;
                    }
                },
                (generation, verdict) = turn::verdict(&mut self.turn_check) => {
                    self.on_turn_verdict(generation, verdict).await;
                }
                () = wait_reply(&mut self.reply) => {
                    if let Some(done) = self.reply.take() {
                        self.finished(&done);
                    }
                }
            }
            if self.events.is_closed() {
                break;
            }
        }
        if let Some(reply) = self.reply.take() {
            reply.task.abort();
        }
        self.cancel_recognition();
        self.report_input_usage().await;
        self.emit(EngineEvent::Closed).await;
    }

    /// The conversation is over: recognition jobs still waiting for their
    /// turn are dropped, and one already queued on the blocking pool finds
    /// its generation stale and skips.
    fn cancel_recognition(&mut self) {
        turn::cancel(&mut self.turn_check);
        self.early_generation.fetch_add(1, Ordering::AcqRel);
        if let Some((_, task)) = self.early.take() {
            task.abort();
        }
        for turn in self.queue.drain(..) {
            if let TurnInput::Speech {
                early: Some(task), ..
            } = turn.input
            {
                task.abort();
            }
        }
    }

    /// A turn arrived while [`MAX_PENDING_TURNS`] wait: it is dropped.
    async fn refuse_turn(&mut self) {
        let message = format!(
            "still answering earlier questions ({} waiting): this one was not taken; ask again after the reply",
            self.queue.len()
        );
        self.emit(EngineEvent::Error {
            kind: ErrorKind::Busy,
            message,
        })
        .await;
    }

    /// A reply task ended on its own: its audio may still be playing.
    fn finished(&mut self, done: &ActiveReply) {
        self.played_until_ms = done.progress.playing_until_ms().unwrap_or(0);
        self.played_turn = done.turn_id;
    }

    fn take_turn_id(&mut self) -> u64 {
        let id = self.next_turn;
        self.next_turn += 1;
        id
    }

    async fn emit(&self, event: EngineEvent) {
        let _ = self.events.send(event).await;
    }

    async fn on_audio(&mut self, frame: &[i16]) {
        let ms = frame.len() as u64 / SAMPLES_PER_MS;
        self.clock_ms.fetch_add(ms, Ordering::AcqRel);
        self.unreported_in_ms += ms;
        let mut vad_events = Vec::new();
        self.segmenter.push(frame, &mut vad_events);
        for event in vad_events {
            self.on_vad(event).await;
        }
    }

    async fn on_vad(&mut self, event: VadEvent) {
        match event {
            VadEvent::Started => {
                self.barge_in().await;
                let id = self.take_turn_id();
                self.speaking = Some(id);
                self.emit(EngineEvent::SpeechStarted { turn_id: id }).await;
            }
            VadEvent::Paused { audio } => {
                let generation = self.early_generation.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::debug!(
                    generation,
                    audio_ms = audio.len() / 16,
                    "pause: recognition and turn check start"
                );
                if let Some((detector, _)) = &self.shared.turn {
                    let check =
                        turn::judge(detector, audio.clone(), &self.early_generation, generation);
                    turn::cancel(&mut self.turn_check);
                    self.turn_check = Some(check);
                }
                let wanted = Some((Arc::clone(&self.early_generation), generation));
                let len = audio.len();
                let task = tokio::spawn(recognise(
                    Arc::clone(&self.shared),
                    audio,
                    self.options.language.clone(),
                    wanted,
                ));
                if let Some((_, stale)) = self.early.replace((len, task)) {
                    stale.abort();
                }
            }
            VadEvent::Resumed => {
                turn::cancel(&mut self.turn_check);
                self.early_generation.fetch_add(1, Ordering::AcqRel);
                if let Some((_, task)) = self.early.take() {
                    task.abort();
                }
            }
            VadEvent::Ended { audio, extended } => {
                turn::cancel(&mut self.turn_check);
                let Some(id) = self.speaking.take() else {
                    return;
                };
                self.emit(EngineEvent::SpeechEnded { turn_id: id }).await;
                self.report_input_usage().await;
                let early = match self.early.take() {
                    Some((len, task)) if !extended && len == audio.len() => Some(task),
                    other => {
                        self.early_generation.fetch_add(1, Ordering::AcqRel);
                        if let Some((_, task)) = other {
                            task.abort();
                        }
                        None
                    }
                };
                if self.queue.len() >= MAX_PENDING_TURNS {
                    if let Some(task) = early {
                        task.abort();
                    }
                    self.refuse_turn().await;
                    return;
                }
                self.queue.push_back(Turn {
                    id,
                    input: TurnInput::Speech { audio, early },
                });
            }
        }
    }

    /// The turn-end model's verdict on a pause: a finished turn ends now,
    /// without waiting out the hangover, if nothing was said since.
    async fn on_turn_verdict(&mut self, generation: u64, verdict: Result<Option<f32>, String>) {
        let Some((_, threshold)) = &self.shared.turn else {
            return;
        };
        let current = self.early_generation.load(Ordering::Acquire) == generation;
        tracing::debug!(generation, current, ?verdict, "turn-end verdict");
        match verdict {
            Ok(Some(probability)) if current && probability > *threshold => {
                let mut vad_events = Vec::new();
                if self.segmenter.end_at_pause(&mut vad_events) {
                    for event in vad_events {
                        self.on_vad(event).await;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "turn-end model failed: the hangover decides"),
        }
    }

    /// The user started speaking: if a reply is being spoken or still
    /// playing on the client, it is cut off.
    async fn barge_in(&mut self) {
        let now = self.clock_ms.load(Ordering::Acquire);
        // A reply task that already finished (its TurnEnd is out) is only
        // still playing; collect it as such.
        if self.reply.as_ref().is_some_and(|r| r.task.is_finished())
            && let Some(done) = self.reply.take()
        {
            self.finished(&done);
        }
        let speaking = self
            .reply
            .as_ref()
            .is_some_and(|r| r.progress.playing_until_ms().is_some());
        if speaking {
            let Some(reply) = self.reply.take() else {
                return;
            };
            reply.task.abort();
            let turn_id = reply.turn_id;
            self.emit(EngineEvent::Interrupted { turn_id }).await;
            // What was already said still counts, and stays in the history.
            let texts = reply.progress.texts.lock().ok().and_then(|mut t| t.take());
            let (heard, answer) = texts.unwrap_or_default();
            remember(&self.history, &heard, &answer);
            let usage = UsageDelta {
                audio_out_ms: reply.progress.audio_ms.load(Ordering::Acquire),
                text_in_chars: heard.chars().count() as u64,
                text_out_chars: answer.chars().count() as u64,
                ..UsageDelta::default()
            };
            self.emit(EngineEvent::Usage(usage)).await;
            self.emit(EngineEvent::TurnEnd {
                turn_id,
                reason: TurnEndReason::Interrupted,
            })
            .await;
        } else if now < self.played_until_ms {
            self.played_until_ms = 0;
            let turn_id = self.played_turn;
            self.emit(EngineEvent::Interrupted { turn_id }).await;
        }
    }

    async fn report_input_usage(&mut self) {
        if self.unreported_in_ms > 0 {
            let usage = UsageDelta {
                audio_in_ms: std::mem::take(&mut self.unreported_in_ms),
                ..UsageDelta::default()
            };
            self.emit(EngineEvent::Usage(usage)).await;
        }
    }

    fn start_reply(&mut self, turn: Turn) {
        let progress = Arc::new(ReplyProgress {
            started_at_ms: AtomicU64::new(u64::MAX),
            audio_ms: AtomicU64::new(0),
            texts: std::sync::Mutex::new(None),
        });
        let job = ReplyJob {
            shared: Arc::clone(&self.shared),
            language: self.options.language.clone(),
            voice: self.voice.clone(),
            events: self.events.clone(),
            clock_ms: Arc::clone(&self.clock_ms),
            progress: Arc::clone(&progress),
            history: Arc::clone(&self.history),
        };
        let turn_id = turn.id;
        let task = tokio::spawn(job.run(turn));
        self.reply = Some(ActiveReply {
            turn_id,
            task,
            progress,
        });
    }
}

/// Resolves when the active reply task ends; pends forever when there is none.
async fn wait_reply(reply: &mut Option<ActiveReply>) {
    match reply.as_mut() {
        Some(active) => {
            let _ = (&mut active.task).await;
        }
        None => std::future::pending().await,
    }
}
