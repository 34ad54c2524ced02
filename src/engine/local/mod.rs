//! The local offline engine, Sonora's default: voice activity detection
//! (earshot) → speech recognition (Whisper via CTranslate2) → an answer from
//! the knowledge base → speech synthesis (eSpeak NG). No network, no account.
//!
//! It speaks the same events as a cloud engine: the user's turn boundaries,
//! transcripts, speculative then final reply text, reply audio, barge-in when
//! the user talks over the reply, and usage in seconds and characters.

mod asr;
pub mod chat;
mod conversation;
mod gate;
mod mel;
mod reply;
mod turn;
mod vad;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use self::asr::{AsrConfig, MODEL_FILES};
pub use self::vad::VadConfig;

use self::asr::Asr;
use self::chat::{ChatClient, ChatConfig};
use self::conversation::Conversation;
use self::reply::recognise;
use super::{ConversationOptions, Engine, EngineSession, EngineStat, Voice};
use crate::config::LocalConfig;
use crate::knowledge::{KnowledgeBase, Lexicon};
use crate::tts::TtsConfig;

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
    stats: Stats,
}

/// The local engine's numbers for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    /// Recognitions run (a retry is part of its recognition).
    recognitions: AtomicU64,
    /// Recognitions decoded again (a wider window, then no prompt) because
    /// the first transcript was far shorter than the speech.
    recognitions_retried: AtomicU64,
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
                stats: Stats::default(),
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

    fn stats(&self) -> Vec<EngineStat> {
        let stats = &self.shared.stats;
        vec![
            EngineStat::counter(
                "recognitions_total",
                "Speech recognitions the local engine ran (speculative ones included).",
                &stats.recognitions,
            ),
            EngineStat::counter(
                "recognitions_retried_total",
                "Recognitions decoded again (a wider window, then without the prompt) because the first transcript was far shorter than the speech.",
                &stats.recognitions_retried,
            ),
        ]
    }

    fn start(&self, options: ConversationOptions) -> Result<EngineSession, super::StartError> {
        let (session, input, events) = EngineSession::channel();
        let conversation = Conversation::new(Arc::clone(&self.shared), options, events);
        tokio::spawn(conversation.run(input));
        Ok(session)
    }
}
