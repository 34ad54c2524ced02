//! The local offline engine, Sonora's default: voice activity detection
//! (earshot) → speech recognition (Whisper via CTranslate2) → an answer from
//! the knowledge base → speech synthesis (eSpeak NG). No network, no account.
//!
//! It speaks the same events as a cloud engine: the user's turn boundaries,
//! transcripts, speculative then final reply text, reply audio, barge-in when
//! the user talks over the reply, and usage in seconds and characters.

mod asr;
pub mod chat;
mod gate;
mod mel;
mod reply;
mod turn;
mod vad;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use self::asr::{AsrConfig, MODEL_FILES};
pub use self::vad::VadConfig;

use self::asr::Asr;
use self::chat::{ChatClient, ChatConfig};
use self::reply::{
    EarlyRecognition, History, ReplyJob, ReplyProgress, Turn, TurnInput, recognise, remember,
};
use self::vad::{Segmenter, VadEvent};
use super::{
    ConversationOptions, Engine, EngineEvent, EngineInput, EngineSession, ErrorKind, TurnEndReason,
    Voice,
};
use crate::config::LocalConfig;
use crate::knowledge::{KnowledgeBase, Lexicon};
use crate::tts::{self, TtsConfig};
use crate::usage::UsageDelta;

const SAMPLES_PER_MS: u64 = crate::audio::ENGINE_RATE_HZ as u64 / 1000;

/// User turns waiting for their reply, besides the one being answered.
/// Turns arrive at the speed of the network, replies are made one at a
/// time: past this, a new turn is refused with a `busy` error.
pub const MAX_PENDING_TURNS: usize = 2;

/// Characters of the knowledge base's questions given to the recogniser
/// as the text before the audio (about 160 tokens, Whisper's prompt cap
/// here; more questions than fit are left out whole).
pub const PROMPT_CHARS: usize = 600;

/// Everything one local engine shares between its conversations.
#[derive(Debug)]
struct Shared {
    asr: Asr,
    /// The words known to be right: the recogniser's hypotheses are weighed
    /// by them, and (the flag) near misses of the base's words corrected.
    lexicon: Option<(Lexicon, bool)>,
    /// One recognition at a time: each uses every core, so two at once
    /// only make both late.
    asr_gate: Arc<tokio::sync::Semaphore>,
    knowledge: Arc<KnowledgeBase>,
    tts: TtsConfig,
    vad: VadConfig,
    chat: Option<ChatClient>,
    model: String,
    /// The turn-end model and the probability above which a pause ends the turn.
    turn: Option<(Arc<turn::TurnDetector>, f32)>,
}

/// The local engine: load once, start many conversations.
#[derive(Debug, Clone)]
pub struct LocalEngine {
    shared: Arc<Shared>,
}

/// Where the local engine's parts come from.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSettings {
    pub model_dir: PathBuf,
    pub knowledge_dir: PathBuf,
    pub asr: AsrConfig,
    pub vad: VadConfig,
    pub tts: TtsConfig,
    /// The words known to be right, which the recogniser's hypotheses are
    /// weighed by and its near misses corrected to; none: the likeliest
    /// hypothesis as it is.
    pub words: Option<KnownWords>,
    /// An OpenAI-compatible chat endpoint to answer with, if configured.
    pub chat: Option<ChatConfig>,
    /// The turn-end model, if configured (`local.turn_model`).
    pub turn: Option<turn::TurnSettings>,
}

/// Where the words known to be right come from (see [`Lexicon`]), and
/// whether near misses of the base's words are corrected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownWords {
    /// One word a line; none: only the knowledge base's words.
    pub word_list: Option<PathBuf>,
    pub correct: bool,
}

impl LocalSettings {
    pub fn from_config(config: &LocalConfig) -> Self {
        Self {
            model_dir: PathBuf::from(&config.model_dir),
            knowledge_dir: PathBuf::from(&config.knowledge_dir),
            asr: AsrConfig {
                beam_size: config.asr_beam_size as usize,
                threads: config.asr_threads as usize,
                vocabulary: None,
                margin_ms: config.asr_margin_ms,
            },
            words: Some(KnownWords {
                word_list: (!config.word_list.is_empty()).then(|| PathBuf::from(&config.word_list)),
                correct: config.correct_words,
            }),
            vad: VadConfig {
                threshold: config.vad_threshold as f32,
                hangover_ms: config.vad_hangover_ms.into(),
                preroll_ms: config.vad_preroll_ms.into(),
                pause_ms: config.vad_pause_ms.into(),
                quiet_db: config.vad_quiet_db as f32,
                ..VadConfig::default()
            },
            tts: TtsConfig {
                program: PathBuf::from(&config.tts_program),
                voice: config.tts_voice.clone(),
                rate_wpm: config.tts_rate_wpm,
                output_rate_hz: config.output_rate_hz,
            },
            chat: (!config.chat_url.is_empty()).then(|| ChatConfig {
                url: config.chat_url.clone(),
                model: config.chat_model.clone(),
                api_key: config.chat_api_key.clone(),
                timeout: std::time::Duration::from_millis(config.chat_timeout_ms.into()),
                max_tokens: 200,
            }),
            turn: (!config.turn_model.is_empty()).then(|| turn::TurnSettings {
                model: PathBuf::from(&config.turn_model),
                library: PathBuf::from(&config.onnxruntime_library),
                threshold: config.turn_threshold as f32,
            }),
        }
    }
}

impl LocalEngine {
    /// Loads the speech model and the knowledge base (blocking: call it at
    /// start-up, or on the blocking pool).
    pub fn load(settings: &LocalSettings) -> Result<Self, String> {
        let knowledge =
            Arc::new(KnowledgeBase::load(&settings.knowledge_dir).map_err(|e| e.to_string())?);
        let chat = settings.chat.clone().map(ChatClient::new).transpose()?;
        let vocabulary = settings
            .asr
            .vocabulary
            .clone()
            .unwrap_or_else(|| knowledge.questions_text(PROMPT_CHARS));
        let asr = Asr::load(&settings.model_dir, settings.asr.clone(), &vocabulary)?;
        let lexicon = settings
            .words
            .as_ref()
            .map(|w| (lexicon(&knowledge, w.word_list.as_deref()), w.correct));
        let model = settings.model_dir.file_name().map_or_else(
            || "whisper".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        // The turn-end model is optional: without it the hangover alone ends turns.
        let turn = settings.turn.as_ref().and_then(|t| {
            match turn::TurnDetector::load(&t.model, &t.library) {
                Ok(detector) => Some((Arc::new(detector), t.threshold)),
                Err(e) => {
                    tracing::warn!(error = %e, "turn-end model not loaded: turns end after the hangover");
                    None
                }
            }
        });
        Ok(Self {
            shared: Arc::new(Shared {
                turn,
                asr,
                lexicon,
                asr_gate: Arc::new(tokio::sync::Semaphore::new(1)),
                knowledge,
                tts: settings.tts.clone(),
                vad: settings.vad,
                chat,
                model,
            }),
        })
    }

    /// Transcribes 16 kHz mono speech on the blocking pool (for measurements).
    pub async fn transcribe(&self, audio: &[i16], language: &str) -> Result<String, String> {
        recognise(
            Arc::clone(&self.shared),
            audio.to_vec(),
            language.to_owned(),
            None,
        )
        .await
        .map(Option::unwrap_or_default)
    }

    /// Entries in the knowledge base.
    pub fn knowledge_entries(&self) -> usize {
        self.shared.knowledge.entries().len()
    }
}

/// The lexicon of `knowledge`, with the words of `word_list` if it can be
/// read (a missing list only narrows what is known to be right).
fn lexicon(knowledge: &KnowledgeBase, word_list: Option<&std::path::Path>) -> Lexicon {
    let words = word_list.map_or_else(String::new, |path| {
        std::fs::read_to_string(path).unwrap_or_else(|e| {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "word list not read: only the knowledge base's words are known to be right"
            );
            String::new()
        })
    });
    Lexicon::new(knowledge, &words)
}

impl Engine for LocalEngine {
    fn name(&self) -> &'static str {
        "local"
    }

    fn voices(&self) -> Vec<Voice> {
        let mut voices = vec![
            Voice::new("es", "Español (España)", "es-ES"),
            Voice::new("es+f3", "Español (España), voz femenina", "es-ES"),
            Voice::new("es-419", "Español (Latinoamérica)", "es-419"),
            Voice::new(
                "es-419+f3",
                "Español (Latinoamérica), voz femenina",
                "es-419",
            ),
            Voice::new("en-us", "English (US)", "en-US"),
            Voice::new("en-us+f3", "English (US), female voice", "en-US"),
            Voice::new("en-gb", "English (UK)", "en-GB"),
        ];
        let configured = &self.shared.tts.voice;
        if !configured.is_empty() && !voices.iter().any(|v| &v.id == configured) {
            voices.insert(0, Voice::new(configured, configured, ""));
        }
        voices
    }

    fn start(&self, options: ConversationOptions) -> Result<EngineSession, super::StartError> {
        let (session, input, events) = EngineSession::channel();
        let conversation = Conversation::new(Arc::clone(&self.shared), options, events);
        tokio::spawn(conversation.run(input));
        Ok(session)
    }
}

#[derive(Debug)]
struct ActiveReply {
    turn_id: u64,
    task: JoinHandle<()>,
    progress: Arc<ReplyProgress>,
}

struct Conversation {
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
    fn new(
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

    async fn run(mut self, mut input: mpsc::Receiver<EngineInput>) {
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
