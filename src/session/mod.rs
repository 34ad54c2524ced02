//! One conversation: client ⇄ decoder ⇄ engine, in one task.
//!
//! [`Conversation::spawn`] starts a task that decodes client audio, queues it
//! for the engine (bounded in time, oldest dropped first), forwards engine
//! events to the client (cleared on barge-in; a client that lets reply
//! audio wait too long, or pile up past a memory cap, is closed), watches
//! for silence, idleness and stalled engines, measures
//! per-turn latency, and always ends with one [`ClientOutput::Closed`].

mod counters;
mod queues;
mod task;

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

pub use counters::{Counters, CountersSnapshot};

use crate::audio::{AudioFormat, DecoderLimits, DecoderStats, RealtimeLimit, StreamDecoder};
use crate::config::Config;
use crate::engine::{EngineEvent, EngineSession};
use crate::usage::UsageDelta;

/// Capacity of [`ConversationHandle::input`], in messages; its bytes are
/// bounded by [`SessionLimits::input_budget_bytes`] too.
pub const INPUT_CAPACITY: usize = 64;
/// After `Closed`, how long the conversation waits for the engine's tasks
/// to end (its event channel to close) before giving up on them.
pub const ENGINE_LINGER_MS: u64 = 30_000;

/// Capacity of [`ConversationHandle::output`], in messages. The last slot is
/// kept for [`ClientOutput::Closed`], and reply audio is handed over only
/// when the channel is empty (then up to 200 ms of it at once), so barge-in
/// can still clear the rest.
pub const OUTPUT_CAPACITY: usize = 32;

/// Bounds and timeouts of one conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// User audio waiting to go to the engine; the oldest is dropped past it.
    pub uplink_queue_ms: u64,
    /// How long reply audio may wait for the client; past it the client is
    /// too slow and the conversation closes. A healthy client takes a long
    /// reply as fast as the engine makes it, so waiting, not length, counts.
    pub downlink_queue_ms: u64,
    /// Reply audio waiting for the client, in bytes: past it the client is
    /// too slow, however recent the audio (the memory bound).
    pub downlink_max_bytes: usize,
    /// The client sent audio bytes but no PCM came out for this long: close.
    pub no_audio_timeout_ms: u64,
    /// No client input at all for this long: close.
    pub idle_timeout_ms: u64,
    /// An engine that does not accept a frame in this time counts one stall.
    pub engine_send_timeout_ms: u64,
    /// After Stop, how long to wait for the engine's `Closed`; it also bounds
    /// the final hand-over of queued events to the client.
    pub close_grace_ms: u64,
    /// Longest conversation; it then closes as for Stop, with `MaxDuration`.
    pub max_duration_ms: u64,
    /// Client input waiting for the conversation, in bytes: a sender waits
    /// while this much is queued.
    pub input_budget_bytes: usize,
    pub decoder: DecoderLimits,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            uplink_queue_ms: 5_000,
            downlink_queue_ms: 10_000,
            // 87 s of 24 kHz reply audio: a long reply made all at once fits.
            downlink_max_bytes: 4 * 1024 * 1024,
            no_audio_timeout_ms: 5_000,
            idle_timeout_ms: 120_000,
            engine_send_timeout_ms: 200,
            close_grace_ms: 10_000,
            max_duration_ms: 3_600_000,
            input_budget_bytes: 256 * 1024,
            decoder: DecoderLimits::default(),
        }
    }
}

impl SessionLimits {
    /// The limits the configuration sets; the rest keep their defaults.
    pub fn from_config(config: &Config) -> Self {
        Self {
            uplink_queue_ms: u64::from(config.audio.uplink_queue_ms),
            downlink_queue_ms: u64::from(config.audio.downlink_queue_ms),
            no_audio_timeout_ms: u64::from(config.audio.no_audio_timeout_ms),
            idle_timeout_ms: u64::from(config.server.idle_timeout_ms),
            max_duration_ms: u64::from(config.server.max_conversation_s) * 1000,
            // One of the largest messages waiting while another is decoded.
            input_budget_bytes: config.server.max_message_bytes,
            decoder: DecoderLimits {
                input_cap_bytes: config.audio.decoder_input_cap_bytes,
                max_block_bytes: config.audio.max_block_bytes,
                realtime: Some(RealtimeLimit {
                    speed_permille: (config.audio.max_realtime_factor * 1000.0).round() as u32,
                    burst_ms: config.audio.realtime_burst_ms,
                }),
            },
            ..Self::default()
        }
    }
}

/// Something the client sends.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientInput {
    /// Bytes in the format the conversation's decoder was built for, as
    /// the socket read them (no copy on the way to the decoder).
    Audio(Bytes),
    /// 16 kHz mono samples (terminal clients).
    Pcm(Vec<i16>),
    Text(String),
    ToolResult {
        id: String,
        json: serde_json::Value,
    },
    /// The client's audio starts again as a new stream of this format (a
    /// client that re-attached after a dropped connection): what the old
    /// stream left half-read is dropped.
    NewStream(AudioFormat),
    /// The client is done: finish and close.
    Stop,
}

impl ClientInput {
    /// Roughly the memory it holds, in bytes, for the input budget.
    fn size_bytes(&self) -> usize {
        match self {
            Self::Audio(bytes) => bytes.len(),
            Self::Pcm(samples) => 2 * samples.len(),
            Self::Text(text) => text.len(),
            Self::ToolResult { id, json } => id.len() + json_size_bytes(json),
            Self::NewStream(_) | Self::Stop => 0,
        }
    }
}

/// The length of a JSON value as text, without writing it anywhere.
fn json_size_bytes(json: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, json);
    count.0
}

/// One queued input and the share of the byte budget it holds until the
/// conversation has taken it.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) input: ClientInput,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The client's end of a conversation's input: a channel bounded both in
/// messages and in bytes ([`SessionLimits::input_budget_bytes`]). Cheap to
/// clone; dropping every sender counts as Stop.
#[derive(Debug, Clone)]
pub struct InputSender {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    budget_bytes: usize,
}

impl InputSender {
    fn new(tx: mpsc::Sender<Queued>, budget_bytes: usize) -> Self {
        let budget_bytes = budget_bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            tx,
            bytes: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
        }
    }

    fn permits(&self, input: &ClientInput) -> u32 {
        // A message larger than the whole budget waits for all of it.
        let bytes = input.size_bytes().min(self.budget_bytes);
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }

    /// Waits for room (in messages and bytes), then queues `input`.
    pub async fn send(&self, input: ClientInput) -> Result<(), SendError<ClientInput>> {
        let permits = self.permits(&input);
        let bytes = if permits == 0 {
            None
        } else if let Ok(permit) = Arc::clone(&self.bytes).try_acquire_many_owned(permits) {
            // The usual case, without a future to wait on.
            Some(permit)
        } else {
            match Arc::clone(&self.bytes).acquire_many_owned(permits).await {
                Ok(permit) => Some(permit),
                Err(_) => return Err(SendError(input)),
            }
        };
        self.tx
            .send(Queued {
                input,
                _bytes: bytes,
            })
            .await
            .map_err(|e| SendError(e.0.input))
    }

    /// Queues `input` if there is room now.
    pub fn try_send(&self, input: ClientInput) -> Result<(), TrySendError<ClientInput>> {
        let permits = self.permits(&input);
        let bytes = if permits == 0 {
            None
        } else {
            match Arc::clone(&self.bytes).try_acquire_many_owned(permits) {
                Ok(permit) => Some(permit),
                Err(_) if self.tx.is_closed() => return Err(TrySendError::Closed(input)),
                Err(_) => return Err(TrySendError::Full(input)),
            }
        };
        self.tx
            .try_send(Queued {
                input,
                _bytes: bytes,
            })
            .map_err(|e| match e {
                TrySendError::Full(q) => TrySendError::Full(q.input),
                TrySendError::Closed(q) => TrySendError::Closed(q.input),
            })
    }

    /// Whether the conversation no longer reads its input.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}
/// Something the conversation tells the client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOutput {
    /// Every engine event except `Closed`, in order.
    Event(EngineEvent),
    /// A non-fatal problem.
    Warning { code: Warning, message: String },
    /// A user turn's latency as the conversation saw it: from the engine's
    /// `SpeechEnded` to the first reply audio after it. Comes just before
    /// that audio.
    Latency { turn_id: u64, ms: u64 },
    /// Always the last message. The summary is boxed so that the many
    /// queued events stay small.
    Closed {
        reason: CloseReason,
        message: String,
        summary: Box<ConversationSummary>,
    },
}

crate::names::named_enum! {
    /// Why a conversation ended.
    pub enum CloseReason {
        /// The client sent Stop or closed its input.
        ClientStopped = "client_stopped",
        /// The engine closed the conversation on its own.
        EngineClosed = "engine_closed",
        /// The engine failed.
        EngineError = "engine_error",
        /// The client's audio could not be decoded.
        BadAudio = "bad_audio",
        /// The client sent audio bytes that decoded to no audio for too long.
        NoAudio = "no_audio",
        /// The client sent nothing for too long.
        Idle = "idle",
        /// The client did not read reply audio fast enough.
        SlowClient = "slow_client",
        /// The engine accepted no input for too long.
        EngineStalled = "engine_stalled",
        /// The server is shutting down.
        Shutdown = "shutdown",
        /// The conversation reached `server.max_conversation_s`.
        MaxDuration = "max_duration",
        /// Its cost could not be recorded, so it could not go on.
        LedgerUnavailable = "ledger_unavailable",
        /// A budget had no room for another turn.
        BudgetExceeded = "budget_exceeded",
        /// The client's connection dropped and it did not come back within
        /// `server.resume_window_ms`.
        ResumeExpired = "resume_expired",
    }
}

impl CloseReason {
    /// Stable snake_case code, used on the wire (the same as `as_str`).
    pub fn code(&self) -> &'static str {
        self.as_str()
    }
}

crate::names::named_enum! {
    /// A non-fatal problem the conversation reports to the client; it goes on.
    pub enum Warning {
        /// An audio chunk was refused (the decoder's input cap, or no
        /// decoder): the chunk is lost.
        ChunkRefused = "chunk_refused",
        /// The engine fell behind: the oldest user audio was dropped.
        UplinkDropped = "uplink_dropped",
        /// The engine was slow to accept input.
        EngineStall = "engine_stall",
    }
}

/// What a conversation did, reported when it ends.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConversationSummary {
    /// `TurnEnd` events seen.
    pub turns: u32,
    /// Per answered turn: from `SpeechEnded` to the first reply audio after
    /// it, both as seen by the conversation.
    pub latency_ms: Vec<u64>,
    /// Sum of the engine's `Usage` deltas.
    pub usage: UsageDelta,
    pub counters: CountersSnapshot,
    /// The decoder's counters, when the conversation had a decoder.
    pub decoder: Option<DecoderStats>,
}

/// Asks one conversation to close as for a server shutdown: it flushes its
/// input to the engine, waits for the engine to close (within the grace
/// period), hands queued events to the client and ends with
/// `Closed { reason: Shutdown }`. Cheap to clone; triggering twice is the
/// same as once.
#[derive(Debug, Clone, Default)]
pub struct ShutdownTrigger(Arc<Notify>, Arc<std::sync::OnceLock<CloseReason>>);

impl ShutdownTrigger {
    pub fn trigger(&self) {
        // `notify_one` keeps a permit when the task is not waiting yet.
        self.0.notify_one();
    }

    /// The same close, ending with `reason` instead of `Shutdown` (the
    /// first reason given wins).
    pub fn trigger_with(&self, reason: CloseReason) {
        let _ = self.1.set(reason);
        self.trigger();
    }
}

/// The client's side of a running conversation.
#[derive(Debug)]
pub struct ConversationHandle {
    /// Client input. Dropping every sender counts as Stop.
    pub input: InputSender,
    /// Everything for the client, ending with `Closed`. The client must keep
    /// reading: reply audio that waits too long closes the conversation.
    pub output: mpsc::Receiver<ClientOutput>,
    /// Live counters, for metrics and for clients pacing their sends.
    pub counters: Arc<Counters>,
    /// Server shutdown for this conversation (see [`ShutdownTrigger`]).
    pub shutdown: ShutdownTrigger,
    /// The task; it returns the same summary as the `Closed` message.
    pub task: JoinHandle<ConversationSummary>,
    /// Completes once the engine has really ended too: every engine task is
    /// gone (its event channel closed), or [`ENGINE_LINGER_MS`] passed after
    /// `Closed`. A gateway holds the conversation's admission slot until then.
    pub engine_ended: oneshot::Receiver<()>,
}

impl ConversationHandle {
    /// Same as `self.shutdown.trigger()`.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }
}

/// Starts conversations. See the module docs.
#[derive(Debug)]
pub struct Conversation;

impl Conversation {
    /// Spawns the conversation task on the current Tokio runtime. `decoder`
    /// decodes [`ClientInput::Audio`]; without one, audio bytes are refused
    /// with a `chunk_refused` warning.
    pub fn spawn(
        engine: EngineSession,
        decoder: Option<StreamDecoder>,
        limits: SessionLimits,
    ) -> ConversationHandle {
        let (input_tx, input_rx) = mpsc::channel(INPUT_CAPACITY);
        let input_tx = InputSender::new(input_tx, limits.input_budget_bytes);
        let (ended_tx, ended_rx) = oneshot::channel();
        let (output_tx, output_rx) = mpsc::channel(OUTPUT_CAPACITY);
        let counters = Arc::new(Counters::default());
        let shutdown = ShutdownTrigger::default();
        let task = task::Task::new(
            task::Io {
                input: input_rx,
                output: output_tx,
                engine,
                shutdown: Arc::clone(&shutdown.0),
                close_reason: Arc::clone(&shutdown.1),
                engine_ended: ended_tx,
            },
            decoder,
            limits,
            Arc::clone(&counters),
        );
        ConversationHandle {
            input: input_tx,
            output: output_rx,
            counters,
            shutdown,
            // Not instrumented: entering a span on every wake-up costs more
            // than the frame's own work. The trace keeps the caller's span
            // (see `ConversationTrace::new`) and names it in what it logs.
            task: tokio::spawn(task.run()),
            engine_ended: ended_rx,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_match_their_serialized_names() {
        for reason in CloseReason::ALL {
            let json = serde_json::to_value(reason).expect("serializes");
            assert_eq!(json, reason.code());
        }
    }

    #[test]
    fn limits_follow_the_config() {
        let mut config = Config::default();
        // Engines send replies faster than real time: the gateway's default
        // lets a whole long reply wait for the client.
        assert_eq!(
            SessionLimits::from_config(&config),
            SessionLimits {
                downlink_queue_ms: 30_000,
                // A live stream keeps pace with the clock; files do not.
                decoder: DecoderLimits {
                    input_cap_bytes: 512 * 1024,
                    realtime: Some(RealtimeLimit::default()),
                    ..DecoderLimits::default()
                },
                ..SessionLimits::default()
            }
        );
        config.audio.uplink_queue_ms = 3_000;
        config.server.idle_timeout_ms = 30_000;
        config.audio.decoder_input_cap_bytes = 65_536;
        let limits = SessionLimits::from_config(&config);
        assert_eq!(limits.uplink_queue_ms, 3_000);
        assert_eq!(limits.idle_timeout_ms, 30_000);
        assert_eq!(limits.decoder.input_cap_bytes, 65_536);
        assert_eq!(limits.engine_send_timeout_ms, 200);
    }
}
