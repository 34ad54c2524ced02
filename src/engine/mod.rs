//! Engines and the engine-neutral event model.
//!
//! An engine turns a conversation's [`EngineInput`] (16 kHz mono user audio,
//! typed text, tool results) into [`EngineEvent`]s (transcripts, reply audio,
//! barge-in, usage). Everything outside `engine::*` speaks only these types.

pub(crate) mod cloud;
pub(crate) mod cooldown;
pub mod gemini_live;
pub mod local;
pub mod nova_sonic;
pub mod openai_realtime;
pub mod pool;
pub mod scripted;
pub(crate) mod text_history;
pub(crate) mod tool_runner;
pub(crate) mod wss;

use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::usage::UsageDelta;

/// The system prompt of the cloud engines when none is configured: a
/// Spanish-first help desk.
pub const DEFAULT_SYSTEM_PROMPT: &str = "Eres el asistente de voz de la mesa de ayuda de una \
universidad. Responde en el idioma en que te hablen (por defecto, en español), con frases \
cortas y naturales para ser escuchadas: dos o tres oraciones como máximo. Usa la herramienta \
search_knowledge antes de responder preguntas sobre servicios, horarios o trámites, y \
current_datetime cuando la respuesta dependa de la fecha o la hora. Si no sabes algo, dilo \
y ofrece derivar la consulta.";

/// Channel capacity between a conversation and its engine, in messages.
/// Audio frames are 20–40 ms, so 64 is one to three seconds.
pub const CHANNEL_CAPACITY: usize = 64;

/// Something sent to an engine.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineInput {
    /// 16 kHz mono s16 user audio, ~20–40 ms per frame.
    Audio(Vec<i16>),
    /// Typed user text.
    Text(String),
    /// The result of a [`EngineEvent::ToolCall`].
    ToolResult { id: String, json: serde_json::Value },
    /// The client is done: finish the current turn and close.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Text that may still change (planned reply text, partial recognition).
    Speculative,
    /// Text as it stands: recognised, or actually spoken.
    Final,
}

/// Reply audio: mono s16 at `rate_hz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pcm {
    pub rate_hz: u32,
    #[serde(skip)]
    pub samples: Vec<i16>,
}

impl Pcm {
    pub fn duration_ms(&self) -> u64 {
        self.samples.len() as u64 * 1000 / u64::from(self.rate_hz.max(1))
    }
}

/// Why a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnEndReason {
    /// The assistant finished speaking.
    Completed,
    /// The user spoke over the assistant.
    Interrupted,
    /// Nothing to answer (e.g. speech that was not recognised).
    Empty,
    /// The engine failed during the turn.
    Error,
}

/// How bad an engine error is, and so what the conversation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Passing fault; the engine already retried or will.
    Transient,
    /// The conversation cannot go on.
    Fatal,
    /// The input was wrong (format, size, protocol): fix the client.
    BadInput,
    /// The engine refused this input for now (it is still answering earlier
    /// turns); the conversation goes on.
    Busy,
}

/// Something an engine reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EngineEvent {
    Ready {
        engine: String,
        model: String,
        voice: String,
    },
    Transcript {
        role: Role,
        text: String,
        stage: Stage,
        turn_id: u64,
    },
    /// Reply audio, usually 24 kHz.
    Audio(Pcm),
    /// Barge-in: the client must drop queued reply audio now.
    Interrupted {
        turn_id: u64,
    },
    ToolCall {
        id: String,
        name: String,
        json: serde_json::Value,
    },
    Usage(UsageDelta),
    TurnEnd {
        turn_id: u64,
        reason: TurnEndReason,
    },
    /// Voice activity: the user started speaking (a USER turn begins).
    SpeechStarted {
        turn_id: u64,
    },
    /// Voice activity: the user stopped speaking (the USER turn boundary);
    /// latency is measured from here to the first reply audio.
    SpeechEnded {
        turn_id: u64,
    },
    /// The engine replaced its upstream stream without a gap.
    Rotated {
        generation: u32,
        /// How long the hand-off kept user audio from going upstream, in
        /// milliseconds (frames arriving meanwhile wait, none are lost).
        gap_ms: f64,
    },
    /// The conversation went on with another engine instance after its
    /// own failed, at a turn boundary, carrying the conversation as text.
    Moved {
        /// The instance now serving it.
        engine: String,
        model: String,
        voice: String,
        /// Its price table, stamped on usage from now on.
        prices: String,
        /// Moves so far.
        generation: u32,
        /// From the failure to the new engine's readiness, in milliseconds.
        gap_ms: f64,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
    Closed,
}

/// Per-conversation choices an engine honours where it can.
/// A voice an engine offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Voice {
    /// What `ConversationOptions::voice` takes.
    pub id: String,
    /// A human name for menus.
    pub label: String,
    /// The language it speaks best, as a BCP 47 tag.
    pub language: String,
}

impl Voice {
    pub fn new(id: &str, label: &str, language: &str) -> Self {
        Self {
            id: id.to_owned(),
            label: label.to_owned(),
            language: language.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversationOptions {
    /// BCP-47 language, e.g. `es` or `en-US`.
    pub language: String,
    /// Engine voice name; empty for the engine's default.
    pub voice: String,
    /// The conversation so far, oldest first, when it goes on from another
    /// engine: cloud engines give it to their service as text.
    pub history: Vec<(Role, String)>,
}

/// The two ends of one engine conversation.
#[derive(Debug)]
pub struct EngineSession {
    pub input: mpsc::Sender<EngineInput>,
    pub events: mpsc::Receiver<EngineEvent>,
}

impl EngineSession {
    /// A pair of bounded channels: the session for the conversation and the
    /// other ends for the engine's task.
    pub fn channel() -> (Self, mpsc::Receiver<EngineInput>, mpsc::Sender<EngineEvent>) {
        let (input_tx, input_rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (events_tx, events_rx) = mpsc::channel(CHANNEL_CAPACITY);
        (
            Self {
                input: input_tx,
                events: events_rx,
            },
            input_rx,
            events_tx,
        )
    }
}

/// Whether an [`EngineStat`] only grows or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    Counter,
    Gauge,
}

/// One number an engine shows on `/metrics`, as `sonora_engine_{name}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStat {
    /// Snake case, without the `sonora_engine_` prefix.
    pub name: &'static str,
    pub help: &'static str,
    pub kind: StatKind,
    pub value: u64,
}

impl EngineStat {
    /// A counter read from `value`.
    pub fn counter(
        name: &'static str,
        help: &'static str,
        value: &std::sync::atomic::AtomicU64,
    ) -> Self {
        Self {
            name,
            help,
            kind: StatKind::Counter,
            value: value.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Why an engine did not start a conversation. Each kind says what the
/// caller does: tell the client to come back later, or close the
/// connection as a server fault, or as a request the engine cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The engine sheds load (its service throttles): refuse like a full
    /// server and let the client try again after `retry_after`.
    #[error("{message}")]
    Busy {
        retry_after: Duration,
        message: String,
    },
    /// The engine or its service cannot be reached or has no capacity just
    /// now: close as a server fault; a later conversation may work.
    #[error("{0}")]
    Unavailable(String),
    /// The engine's configuration keeps it from serving anyone (a missing
    /// model, no credentials): close as a server fault and fix the setup.
    #[error("{0}")]
    Misconfigured(String),
    /// The conversation asked for something this engine does not offer (a
    /// voice it lacks): the same request will fail again.
    #[error("{0}")]
    Unsupported(String),
}

/// A speech-to-speech engine. `start` is called inside a Tokio runtime and
/// spawns whatever tasks the conversation needs; it fails with a
/// [`StartError`] when the engine cannot serve this conversation, for
/// example while it is [`busy`](Engine::busy).
pub trait Engine: Send + Sync {
    /// Short name: `local`, `nova-sonic`.
    fn name(&self) -> &'static str;
    /// The voices a conversation may ask for; empty when any name goes.
    fn voices(&self) -> Vec<Voice> {
        Vec::new()
    }
    fn start(&self, options: ConversationOptions) -> Result<EngineSession, StartError>;
    /// `Some(wait)` while the engine refuses new conversations to shed load
    /// (its service is throttling): how long until it takes them again.
    /// Running conversations go on.
    fn busy(&self) -> Option<Duration> {
        None
    }
    /// Engine numbers for `/metrics`.
    fn stats(&self) -> Vec<EngineStat> {
        Vec::new()
    }
    /// The price table its usage is costed with, as stamped on each ledger
    /// row: the model and its rates. `free` for an engine that costs nothing.
    fn prices(&self) -> String {
        "free".to_owned()
    }
    /// Whether its conversations cost money: budgets hold a turn's worth
    /// for them before each turn.
    fn paid(&self) -> bool {
        false
    }
    /// Opens one session with its service and closes it, for `sonora
    /// doctor`: what answered, or why it did not. `None` for an engine
    /// that has no such check.
    fn probe(&self) -> Option<Probe<'_>> {
        None
    }
}

/// A check of an engine's service: what answered, or why it did not.
pub type Probe<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, ProbeError>> + Send + 'a>>;

/// Why a [`Probe`] failed: the service said no (credentials, a bad model:
/// fix the setup), or it could not be reached (the network, a server
/// fault, throttling: perhaps only from here, or only now).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unreached(String),
}
