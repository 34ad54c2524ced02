//! A conversation with an engine under test: audio frames sent at real-time
//! pace, the engine's events collected with their arrival time, and the
//! questions tests ask of them.

#![allow(
    clippy::unwrap_used,
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    reason = "a test helper that fails must fail the test; not every binary uses every helper"
)]

use std::time::{Duration, Instant};

use sonora::engine::{
    ConversationOptions, Engine, EngineEvent, EngineInput, ErrorKind, Role, Stage, StartError,
    TurnEndReason,
};
use tokio::sync::mpsc;

/// The longest any step waits.
pub const GUARD: Duration = Duration::from_secs(120);

/// A conversation under test: events collected with their arrival time.
pub struct Talk {
    pub input: mpsc::Sender<EngineInput>,
    events: mpsc::UnboundedReceiver<(Instant, EngineEvent)>,
    pub seen: Vec<(Instant, EngineEvent)>,
    pub started: Instant,
}

impl Talk {
    pub fn start(engine: &dyn Engine) -> Self {
        Self::start_in(engine, "es")
    }

    pub fn start_in(engine: &dyn Engine, language: &str) -> Self {
        let session = engine
            .start(ConversationOptions {
                language: language.into(),
                voice: String::new(),
                history: Vec::new(),
            })
            .unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let mut from_engine = session.events;
        // Read events as they come, as every client does.
        tokio::spawn(async move {
            while let Some(event) = from_engine.recv().await {
                if tx.send((Instant::now(), event)).is_err() {
                    return;
                }
            }
        });
        Self {
            input: session.input,
            events,
            seen: Vec::new(),
            started: Instant::now(),
        }
    }

    pub fn collect(&mut self) {
        while let Ok(item) = self.events.try_recv() {
            self.seen.push(item);
        }
    }

    /// Sends `ms` of audio in 20 ms frames at real-time pace; `sample(i)`
    /// gives sample `i` of the frame sequence.
    pub async fn speak(&mut self, ms: u64, mut frame: impl FnMut(u64) -> Vec<i16>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for k in 0..ms / 20 {
            tick.tick().await;
            self.input.send(EngineInput::Audio(frame(k))).await.unwrap();
            self.collect();
        }
    }

    pub async fn tone(&mut self, ms: u64) {
        self.speak(ms, tone_frame).await;
    }

    pub async fn quiet(&mut self, ms: u64) {
        self.speak(ms, |_| vec![-3; 320]).await;
    }

    /// Waits until `pred` holds for some event seen, quiet audio flowing.
    pub async fn until(&mut self, what: &str, pred: impl Fn(&EngineEvent) -> bool) {
        let deadline = Instant::now() + GUARD;
        while !self.seen.iter().any(|(_, e)| pred(e)) {
            assert!(
                Instant::now() < deadline,
                "no {what}; seen: {:?}",
                self.kinds()
            );
            self.quiet(100).await;
        }
    }

    /// Waits without sending audio (the engine streams silence).
    pub async fn idle_until(&mut self, what: &str, pred: impl Fn(&EngineEvent) -> bool) {
        let deadline = tokio::time::Instant::now() + GUARD;
        while !self.seen.iter().any(|(_, e)| pred(e)) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(item)) => self.seen.push(item),
                _ => panic!("no {what}; seen: {:?}", self.kinds()),
            }
        }
    }

    /// Waits, sending nothing, for the conversation to end, and returns the
    /// one fatal error it ended with.
    pub async fn fatal_end(&mut self) -> String {
        self.idle_until("the end", |e| matches!(e, EngineEvent::Closed))
            .await;
        let mut fatal = self.errors(ErrorKind::Fatal);
        assert_eq!(fatal.len(), 1, "{:?}", self.kinds());
        fatal.remove(0)
    }

    pub async fn close(&mut self) {
        self.input.send(EngineInput::Close).await.unwrap();
        self.idle_until("Closed", |e| matches!(e, EngineEvent::Closed))
            .await;
    }

    pub fn kinds(&self) -> Vec<String> {
        self.seen
            .iter()
            .map(|(t, e)| {
                let ms = t.duration_since(self.started).as_millis();
                match e {
                    EngineEvent::Audio(p) => format!("{ms}:audio({})", p.samples.len()),
                    other => format!("{ms}:{other:?}"),
                }
            })
            .collect()
    }

    pub fn events(&self) -> impl Iterator<Item = &EngineEvent> {
        self.seen.iter().map(|(_, e)| e)
    }

    pub fn transcripts(&self, role: Role, stage: Stage) -> Vec<String> {
        self.events()
            .filter_map(|e| match e {
                EngineEvent::Transcript {
                    role: r,
                    stage: s,
                    text,
                    ..
                } if *r == role && *s == stage => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn errors(&self, kind: ErrorKind) -> Vec<String> {
        self.events()
            .filter_map(|e| match e {
                EngineEvent::Error { kind: k, message } if *k == kind => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn turn_ends(&self) -> Vec<TurnEndReason> {
        self.events()
            .filter_map(|e| match e {
                EngineEvent::TurnEnd { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    /// The turns that were interrupted, in order.
    pub fn interrupted_turns(&self) -> Vec<u64> {
        self.events()
            .filter_map(|e| match e {
                EngineEvent::Interrupted { turn_id } => Some(*turn_id),
                _ => None,
            })
            .collect()
    }

    /// One turn heard as `question` and answered with `answer` in
    /// `reply_samples` of 24 kHz audio, its text shown as it came.
    pub fn assert_answered(&self, question: &str, answer: &str, reply_samples: usize) {
        assert_eq!(self.transcripts(Role::User, Stage::Final), [question]);
        assert_eq!(self.transcripts(Role::Assistant, Stage::Final), [answer]);
        assert_eq!(
            self.transcripts(Role::Assistant, Stage::Speculative).last(),
            Some(&answer.to_owned())
        );
        assert_eq!(self.audio_samples(24_000), reply_samples);
        assert_eq!(self.turn_ends(), [TurnEndReason::Completed]);
    }

    /// Every turn completed, answered with `replies` in order.
    pub fn assert_completed(&self, replies: &[&str]) {
        assert_eq!(
            self.turn_ends(),
            vec![TurnEndReason::Completed; replies.len()]
        );
        assert_eq!(self.transcripts(Role::Assistant, Stage::Final), replies);
    }

    /// The one tool call that reached the client, `name` with `args`,
    /// answered with `result`.
    pub async fn answer_only_tool_call(
        &self,
        name: &str,
        args: serde_json::Value,
        result: serde_json::Value,
    ) {
        let calls = self.tool_calls();
        assert_eq!(calls.len(), 1, "one tool call reached the client");
        assert_eq!(calls[0].1, name);
        assert_eq!(calls[0].2, args);
        self.answer_tool(&calls[0].0, result).await;
    }

    /// What the usage events cost together, in millionths of a dollar.
    pub fn cost_micro_usd(&self) -> u64 {
        self.events()
            .filter_map(|e| match e {
                EngineEvent::Usage(delta) => Some(delta.cost_micro_usd),
                _ => None,
            })
            .sum()
    }

    /// How many reply samples came, each chunk at `rate_hz`.
    pub fn audio_samples(&self, rate_hz: u32) -> usize {
        self.events()
            .filter_map(|e| match e {
                EngineEvent::Audio(pcm) => {
                    assert_eq!(pcm.rate_hz, rate_hz);
                    Some(pcm.samples.len())
                }
                _ => None,
            })
            .sum()
    }

    /// The tool calls that reached the client: id, name and arguments.
    pub fn tool_calls(&self) -> Vec<(String, String, serde_json::Value)> {
        self.events()
            .filter_map(|e| match e {
                EngineEvent::ToolCall { id, name, json } => {
                    Some((id.clone(), name.clone(), json.clone()))
                }
                _ => None,
            })
            .collect()
    }

    /// Answers tool call `id` with `json`, as the client does.
    pub async fn answer_tool(&self, id: &str, json: serde_json::Value) {
        self.input
            .send(EngineInput::ToolResult {
                id: id.to_owned(),
                json,
            })
            .await
            .unwrap();
    }

    /// Where the first event `pred` accepts came, among all.
    pub fn position(&self, pred: impl Fn(&EngineEvent) -> bool) -> Option<usize> {
        self.events().position(pred)
    }
}

/// The value of the engine's number `name` (as `/metrics` shows it).
pub fn stat(engine: &dyn Engine, name: &str) -> u64 {
    engine
        .stats()
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.value)
        .unwrap_or_else(|| panic!("the engine has no number {name}"))
}

/// A throttled engine cooling down: it says it is busy, refuses a new
/// conversation as `Busy` and counts that refusal.
pub fn assert_cooling_down(engine: &dyn Engine) {
    assert!(engine.busy().is_some());
    let refused = engine.start(ConversationOptions {
        language: "es".into(),
        voice: String::new(),
        history: Vec::new(),
    });
    assert!(
        matches!(refused, Err(StartError::Busy { .. })),
        "{refused:?}"
    );
    assert_eq!(stat(engine, "conversations_refused_total"), 1);
}

/// 20 ms of a loud 300 Hz tone: speech to the endpoint's detector.
pub fn tone_frame(k: u64) -> Vec<i16> {
    (0..320)
        .map(|i| {
            let t = (k * 320 + i) as f64 / 16_000.0;
            ((t * 300.0 * std::f64::consts::TAU).sin() * 8_000.0) as i16
        })
        .collect()
}

pub fn is_turn_end(e: &EngineEvent) -> bool {
    matches!(e, EngineEvent::TurnEnd { .. })
}

pub fn turn_ends(n: usize) -> impl Fn(&EngineEvent) -> bool {
    let count = std::sync::atomic::AtomicUsize::new(0);
    move |e| {
        if is_turn_end(e) {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= n
        } else {
            false
        }
    }
}
