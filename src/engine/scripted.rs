//! A scripted engine for conversation tests and load benchmarks. Not a
//! product engine: it understands no speech and is never offered to users.
//!
//! It plays a fixed list of [`Step`]s (emit an event, sleep, wait for input)
//! and records what it received, so a test can drive a conversation through
//! exact timings and then check what reached the engine.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{ConversationOptions, Engine, EngineEvent, EngineInput, EngineSession, Pcm};
use crate::audio::ENGINE_RATE_HZ;
use crate::engine::TurnEndReason;
use crate::usage::UsageDelta;

/// Input audio samples per millisecond (16 kHz).
const INPUT_SAMPLES_PER_MS: u64 = ENGINE_RATE_HZ as u64 / 1000;
/// Rate of the reply tone of [`ScriptedEngine::echo_turns`].
const REPLY_RATE_HZ: u32 = 24_000;
/// Length of one reply frame of [`ScriptedEngine::echo_turns`].
const REPLY_FRAME_MS: u64 = 40;
const TONE_HZ: f32 = 440.0;
const TONE_AMPLITUDE: f32 = 8_000.0;

/// One instruction of a script.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Sends an event; `Closed` also ends the script and the engine.
    Emit(EngineEvent),
    /// Waits this long.
    Sleep(Duration),
    /// Waits until this many milliseconds of input audio (16 samples per ms)
    /// have arrived beyond what earlier `AwaitAudioMs` steps consumed, so
    /// audio that arrived during other steps counts once and is never lost.
    AwaitAudioMs(u64),
    /// Waits for one `EngineInput::Text` not consumed by an earlier step.
    AwaitText,
    /// Waits for `EngineInput::Close` or the input channel closing.
    AwaitClose,
    /// Stops reading input for this long, so the conversation's sends stall.
    Stall(Duration),
}

/// One input as it arrived, audio reduced to its length and first sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Arrival {
    Audio { samples: usize, first_sample: i16 },
    Text(String),
    ToolResult { id: String },
    Close,
}

/// What the engine received, over every conversation it started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Received {
    /// Input audio, in 16 kHz samples.
    pub audio_samples: u64,
    /// Input audio frames.
    pub audio_frames: u64,
    pub texts: Vec<String>,
    pub tool_results: Vec<(String, serde_json::Value)>,
    /// Whether an explicit `EngineInput::Close` arrived.
    pub closed: bool,
    /// Every input in arrival order (empty for [`ScriptedEngine::echo_turns`],
    /// which runs for long load tests).
    pub log: Vec<Arrival>,
    /// The options of each conversation started, in order.
    pub started: Vec<ConversationOptions>,
}

#[derive(Debug, Clone)]
enum Behaviour {
    Script(Vec<Step>),
    Echo { turn_ms: u64, reply_ms: u64 },
}

/// The scripted engine. See the module docs.
#[derive(Debug, Clone)]
pub struct ScriptedEngine {
    behaviour: Behaviour,
    received: Arc<Mutex<Received>>,
}

impl ScriptedEngine {
    /// An engine that plays `script` in every conversation. After the last
    /// step it waits for Close, emits `Closed` and ends.
    pub fn new(script: Vec<Step>) -> Self {
        Self {
            behaviour: Behaviour::Script(script),
            received: Arc::default(),
        }
    }

    /// An engine that emits `Ready`, then answers every `turn_ms` of received
    /// audio (at least 1 ms) with `SpeechEnded`, `reply_ms` of a 24 kHz tone in
    /// 40 ms `Audio` frames, `TurnEnd` and a `Usage` delta, until Close.
    pub fn echo_turns(turn_ms: u64, reply_ms: u64) -> Self {
        Self {
            behaviour: Behaviour::Echo {
                turn_ms: turn_ms.max(1),
                reply_ms,
            },
            received: Arc::default(),
        }
    }

    /// A snapshot of everything received so far.
    pub fn received(&self) -> Received {
        lock(&self.received).clone()
    }
}

impl Engine for ScriptedEngine {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn start(&self, options: ConversationOptions) -> Result<EngineSession, super::StartError> {
        lock(&self.received).started.push(options);
        let (session, input, events) = EngineSession::channel();
        let keep_log = matches!(self.behaviour, Behaviour::Script(_));
        let inbox = Inbox {
            input,
            received: Arc::clone(&self.received),
            keep_log,
            audio_credit_samples: 0,
            texts_pending: 0,
            close_seen: false,
            input_ended: false,
        };
        let behaviour = self.behaviour.clone();
        tokio::spawn(async move {
            let mut runner = Runner { inbox, events };
            match behaviour {
                Behaviour::Script(steps) => runner.play(steps).await,
                Behaviour::Echo { turn_ms, reply_ms } => runner.echo(turn_ms, reply_ms).await,
            }
        });
        Ok(session)
    }
}

fn lock(received: &Mutex<Received>) -> std::sync::MutexGuard<'_, Received> {
    // A panic while recording leaves a usable record.
    received.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The input side of the engine task: receives and records.
struct Inbox {
    input: mpsc::Receiver<EngineInput>,
    received: Arc<Mutex<Received>>,
    keep_log: bool,
    audio_credit_samples: u64,
    texts_pending: usize,
    close_seen: bool,
    input_ended: bool,
}

impl Inbox {
    fn record(&mut self, input: Option<EngineInput>) {
        let Some(input) = input else {
            self.input_ended = true;
            return;
        };
        let mut received = lock(&self.received);
        let arrival = match input {
            EngineInput::Audio(samples) => {
                self.audio_credit_samples += samples.len() as u64;
                received.audio_samples += samples.len() as u64;
                received.audio_frames += 1;
                Arrival::Audio {
                    samples: samples.len(),
                    first_sample: samples.first().copied().unwrap_or_default(),
                }
            }
            EngineInput::Text(text) => {
                self.texts_pending += 1;
                received.texts.push(text.clone());
                Arrival::Text(text)
            }
            EngineInput::ToolResult { id, json } => {
                received.tool_results.push((id.clone(), json));
                Arrival::ToolResult { id }
            }
            EngineInput::Close => {
                self.close_seen = true;
                received.closed = true;
                Arrival::Close
            }
        };
        if self.keep_log {
            received.log.push(arrival);
        }
    }

    /// Whether no more input can come.
    fn finished(&self) -> bool {
        self.close_seen || self.input_ended
    }

    /// Runs `work` to completion while receiving input.
    async fn while_receiving<F: Future>(&mut self, work: F) -> F::Output {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                input = self.input.recv(), if !self.input_ended => self.record(input),
            }
        }
    }

    /// Receives until `ready` holds (true) or no more input can come (false).
    async fn until(&mut self, ready: impl Fn(&Self) -> bool) -> bool {
        loop {
            if ready(self) {
                return true;
            }
            if self.finished() {
                return false;
            }
            let input = self.input.recv().await;
            self.record(input);
        }
    }

    /// Waits for `samples` more samples of audio credit and consumes them.
    async fn take_audio(&mut self, samples: u64) -> bool {
        let ready = self
            .until(|inbox| inbox.audio_credit_samples >= samples)
            .await;
        if ready {
            self.audio_credit_samples -= samples;
        }
        ready
    }

    async fn take_text(&mut self) -> bool {
        let ready = self.until(|inbox| inbox.texts_pending > 0).await;
        if ready {
            self.texts_pending -= 1;
        }
        ready
    }

    async fn until_closed(&mut self) {
        self.until(Self::finished).await;
    }
}

struct Runner {
    inbox: Inbox,
    events: mpsc::Sender<EngineEvent>,
}

impl Runner {
    /// Sends `event` while receiving input; false once the conversation is gone.
    async fn emit(&mut self, event: EngineEvent) -> bool {
        let events = &self.events;
        self.inbox.while_receiving(events.send(event)).await.is_ok()
    }

    /// Waits for Close, then reports `Closed`.
    async fn close(&mut self) {
        self.inbox.until_closed().await;
        self.emit(EngineEvent::Closed).await;
    }

    async fn play(&mut self, steps: Vec<Step>) {
        for step in steps {
            let go_on = match step {
                Step::Emit(EngineEvent::Closed) => {
                    self.emit(EngineEvent::Closed).await;
                    return;
                }
                Step::Emit(event) => {
                    if !self.emit(event).await {
                        return;
                    }
                    true
                }
                Step::Sleep(duration) => {
                    self.inbox
                        .while_receiving(tokio::time::sleep(duration))
                        .await;
                    true
                }
                Step::AwaitAudioMs(ms) => self.inbox.take_audio(ms * INPUT_SAMPLES_PER_MS).await,
                Step::AwaitText => self.inbox.take_text().await,
                Step::AwaitClose => {
                    self.inbox.until_closed().await;
                    true
                }
                Step::Stall(duration) => {
                    tokio::time::sleep(duration).await;
                    true
                }
            };
            // A wait that no input can satisfy any more ends the script.
            if !go_on {
                break;
            }
        }
        self.close().await;
    }

    async fn echo(&mut self, turn_ms: u64, reply_ms: u64) {
        let ready = EngineEvent::Ready {
            engine: "scripted".into(),
            model: "echo".into(),
            voice: "tone".into(),
        };
        if !self.emit(ready).await {
            return;
        }
        let reply = tone_frames(reply_ms);
        let usage = UsageDelta {
            audio_in_ms: turn_ms,
            audio_out_ms: reply_ms,
            ..UsageDelta::default()
        };
        let mut turn_id = 0;
        while self.inbox.take_audio(turn_ms * INPUT_SAMPLES_PER_MS).await {
            turn_id += 1;
            // One event at a time: a long reply is not copied up front.
            let audio = reply.iter().cloned().map(EngineEvent::Audio);
            let events = std::iter::once(EngineEvent::SpeechEnded { turn_id })
                .chain(audio)
                .chain([
                    EngineEvent::TurnEnd {
                        turn_id,
                        reason: TurnEndReason::Completed,
                    },
                    EngineEvent::Usage(usage),
                ]);
            for event in events {
                if !self.emit(event).await {
                    return;
                }
            }
        }
        self.close().await;
    }
}

/// `duration_ms` of a 440 Hz tone at 24 kHz, in 40 ms frames (the last may
/// be shorter).
fn tone_frames(duration_ms: u64) -> Vec<Pcm> {
    let total = (duration_ms * u64::from(REPLY_RATE_HZ) / 1000) as usize;
    let step = 2.0 * std::f32::consts::PI * TONE_HZ / REPLY_RATE_HZ as f32;
    let samples: Vec<i16> = (0..total)
        .map(|i| ((i as f32 * step).sin() * TONE_AMPLITUDE) as i16)
        .collect();
    let frame = (REPLY_FRAME_MS * u64::from(REPLY_RATE_HZ) / 1000) as usize;
    samples
        .chunks(frame)
        .map(|chunk| Pcm {
            rate_hz: REPLY_RATE_HZ,
            samples: chunk.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> ConversationOptions {
        ConversationOptions {
            language: "es".into(),
            voice: String::new(),
            history: Vec::new(),
        }
    }

    #[test]
    fn tone_frames_are_40_ms_at_24_khz() {
        let frames = tone_frames(100);
        let lengths: Vec<_> = frames.iter().map(|p| p.samples.len()).collect();
        assert_eq!(lengths, [960, 960, 480]);
        assert!(frames.iter().all(|p| p.rate_hz == 24_000));
        assert!(frames[0].samples.iter().any(|&s| s > 7_000));
    }

    #[tokio::test(start_paused = true)]
    async fn audio_credit_counts_audio_that_arrived_during_other_steps() {
        let engine = ScriptedEngine::new(vec![
            Step::Sleep(Duration::from_secs(1)),
            Step::AwaitAudioMs(80),
            Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 }),
            Step::AwaitText,
        ]);
        let mut session = engine.start(options()).expect("scripted engines start");
        for _ in 0..2 {
            session
                .input
                .send(EngineInput::Audio(vec![7; 640]))
                .await
                .expect("running");
        }
        session
            .input
            .send(EngineInput::Text("hi".into()))
            .await
            .expect("running");
        let first = session.events.recv().await;
        assert_eq!(first, Some(EngineEvent::SpeechEnded { turn_id: 1 }));
        session
            .input
            .send(EngineInput::Close)
            .await
            .expect("running");
        assert_eq!(session.events.recv().await, Some(EngineEvent::Closed));
        assert_eq!(session.events.recv().await, None);
        let received = engine.received();
        assert_eq!((received.audio_samples, received.audio_frames), (1280, 2));
        assert_eq!(received.texts, ["hi"]);
        assert!(received.closed);
        let audio = Arrival::Audio {
            samples: 640,
            first_sample: 7,
        };
        let want = [
            audio.clone(),
            audio,
            Arrival::Text("hi".into()),
            Arrival::Close,
        ];
        assert_eq!(received.log, want);
    }

    #[tokio::test(start_paused = true)]
    async fn close_ends_a_wait_that_can_no_longer_be_met() {
        let engine = ScriptedEngine::new(vec![
            Step::AwaitAudioMs(1_000),
            Step::Emit(EngineEvent::SpeechEnded { turn_id: 1 }),
        ]);
        let mut session = engine.start(options()).expect("scripted engines start");
        session
            .input
            .send(EngineInput::Close)
            .await
            .expect("running");
        assert_eq!(session.events.recv().await, Some(EngineEvent::Closed));
        assert_eq!(session.events.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn echo_answers_each_turn_until_close() {
        let engine = ScriptedEngine::echo_turns(200, 100);
        let mut session = engine.start(options()).expect("scripted engines start");
        assert!(matches!(
            session.events.recv().await,
            Some(EngineEvent::Ready { .. })
        ));
        // 400 ms of audio: two turns.
        for _ in 0..10 {
            session
                .input
                .send(EngineInput::Audio(vec![0; 640]))
                .await
                .expect("running");
        }
        session
            .input
            .send(EngineInput::Close)
            .await
            .expect("running");
        let mut events = Vec::new();
        while let Some(event) = session.events.recv().await {
            events.push(event);
        }
        let turn = |id| {
            let mut turn = vec![EngineEvent::SpeechEnded { turn_id: id }];
            turn.extend(tone_frames(100).into_iter().map(EngineEvent::Audio));
            turn.push(EngineEvent::TurnEnd {
                turn_id: id,
                reason: TurnEndReason::Completed,
            });
            turn.push(EngineEvent::Usage(UsageDelta {
                audio_in_ms: 200,
                audio_out_ms: 100,
                ..UsageDelta::default()
            }));
            turn
        };
        let mut want = turn(1);
        want.extend(turn(2));
        want.push(EngineEvent::Closed);
        assert_eq!(events, want);
        assert!(engine.received().log.is_empty());
    }
}
