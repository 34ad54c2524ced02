//! Speech recognition with Whisper through CTranslate2 (INT8, beam search).
//!
//! Loaded once and shared; every call blocks for about a second, so callers
//! run it on the blocking pool. Only audio the VAD marked as speech comes
//! here: Whisper invents words for silence and noise.

use std::path::Path;

/// Files a faster-whisper (CTranslate2) model directory must hold.
pub const MODEL_FILES: [&str; 4] = [
    "model.bin",
    "config.json",
    "tokenizer.json",
    "preprocessor_config.json",
];

/// Recognition settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsrConfig {
    pub beam_size: usize,
    /// CPU threads for one call (0: CTranslate2's default).
    pub threads: usize,
    /// Text to expect, given to Whisper as the text before the audio:
    /// `None` for the knowledge base's questions, `Some("")` for none.
    pub vocabulary: Option<String>,
    /// Silence after the audio that the encoder hears, up to Whisper's
    /// 30 s window (the encoder's time grows with the window).
    pub margin_ms: u32,
}

impl Default for AsrConfig {
    fn default() -> Self {
        Self {
            beam_size: 3,
            threads: 0,
            vocabulary: None,
            margin_ms: 3_000,
        }
    }
}

/// Whisper's prompt allows 223 tokens of previous text; the prompt keeps
/// well under it (each token of it costs decoding time).
const MAX_PROMPT_TOKENS: usize = 160;

/// A loaded Whisper model.
pub(super) struct Asr {
    whisper: ct2rs::sys::Whisper,
    tokenizer: ct2rs::tokenizers::hf::Tokenizer,
    config: AsrConfig,
    /// `<|startofprev|>` and the vocabulary's tokens, or nothing.
    prompt: Vec<String>,
}

impl std::fmt::Debug for Asr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asr")
            .field("config", &self.config)
            .field("prompt_tokens", &self.prompt.len())
            .finish_non_exhaustive()
    }
}

impl Asr {
    /// Loads the model in `dir`, naming what is missing when it cannot.
    pub(super) fn load(dir: &Path, config: AsrConfig, vocabulary: &str) -> Result<Self, String> {
        let missing: Vec<&str> = MODEL_FILES
            .iter()
            .copied()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "speech model in {} is incomplete (missing {}): run scripts/install-model",
                dir.display(),
                missing.join(", ")
            ));
        }
        let ct2_config = ct2rs::sys::Config {
            compute_type: ct2rs::sys::ComputeType::INT8,
            num_threads_per_replica: config.threads,
            ..ct2rs::sys::Config::default()
        };
        let whisper = ct2rs::sys::Whisper::new(dir, ct2_config)
            .map_err(|e| format!("cannot load the speech model in {}: {e}", dir.display()))?;
        let mut tokenizer = ct2rs::tokenizers::hf::Tokenizer::new(dir)
            .map_err(|e| format!("cannot load the speech model's tokenizer: {e}"))?;
        tokenizer.disable_spacial_token();
        let prompt = vocabulary_prompt(&tokenizer, vocabulary)?;
        Ok(Self {
            whisper,
            tokenizer,
            config,
            prompt,
        })
    }

    /// Transcribes 16 kHz mono speech in `language` (e.g. `es`, `en`); at
    /// most Whisper's 30 s window is heard. The beam's finished hypotheses
    /// come back best first (one at beam 1), each with its mean log
    /// probability per token.
    pub(super) fn transcribe(
        &self,
        pcm: &[i16],
        language: &str,
        pass: Pass,
    ) -> Result<Vec<Hypothesis>, String> {
        if pcm.is_empty() {
            return Ok(vec![Hypothesis {
                text: String::new(),
                score: 0.0,
            }]);
        }
        let extra_ms = if pass == Pass::WiderWindow {
            WIDER_WINDOW_MS
        } else {
            0
        };
        let margin = (self.config.margin_ms + extra_ms) as usize
            * crate::audio::ENGINE_RATE_HZ as usize
            / 1000;
        // The encoder halves the frames: an even count.
        let frames = (super::mel::frames_for(pcm.len() + margin).div_ceil(2) * 2)
            .min(super::mel::WINDOW_FRAMES);
        let mut features = super::mel::whisper_features(pcm, frames);
        let view = ct2rs::sys::StorageView::new(
            &[1, super::mel::N_MELS, frames],
            &mut features,
            Default::default(),
        )
        .map_err(|e| format!("speech recognition failed: {e}"))?;
        let mut prompt = match pass {
            Pass::First | Pass::WiderWindow => self.prompt.clone(),
            Pass::AudioAlone => Vec::new(),
        };
        // Cap the output by the audio length: ~6 tokens a second of speech is
        // generous, and a cap stops the rare repetition loop early. The
        // length counts the prompt too.
        let seconds = pcm.len() / crate::audio::ENGINE_RATE_HZ as usize + 1;
        let beam_size = self.config.beam_size.max(1);
        let options = ct2rs::sys::WhisperOptions {
            beam_size,
            num_hypotheses: beam_size,
            return_scores: true,
            max_length: (prompt.len() + 4 + 16 + seconds * 8).min(448),
            ..ct2rs::sys::WhisperOptions::default()
        };
        prompt.extend([
            "<|startoftranscript|>".to_owned(),
            format!("<|{}|>", whisper_language(language)),
            "<|transcribe|>".to_owned(),
            "<|notimestamps|>".to_owned(),
        ]);
        let result = self
            .whisper
            .generate(&view, &[prompt], &options)
            .map_err(|e| format!("speech recognition failed: {e}"))?;
        let Some(result) = result.into_iter().next() else {
            return Ok(Vec::new());
        };
        let scores = result.scores.into_iter().chain(std::iter::repeat(0.0));
        result
            .sequences
            .into_iter()
            .zip(scores)
            .map(|(tokens, score)| {
                let text = ct2rs::Tokenizer::decode(&self.tokenizer, tokens)
                    .map_err(|e| format!("speech recognition failed: {e}"))?;
                Ok(Hypothesis {
                    text: text.split_whitespace().collect::<Vec<_>>().join(" "),
                    score,
                })
            })
            .collect()
    }

    /// Whether recognition is given a vocabulary as its previous text.
    pub(super) fn has_prompt(&self) -> bool {
        !self.prompt.is_empty()
    }
}

/// One decoding of a recording. A transcript far shorter than its speech
/// is decoded again, each pass only if the one before also came back short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// The configured prompt and window.
    First,
    /// The same prompt, the window [`WIDER_WINDOW_MS`] longer: the encoder
    /// hears the audio anew, and the decoder attends to it differently.
    WiderWindow,
    /// No prompt: what the audio alone says (a long previous text can make
    /// Whisper skip the start of what it hears).
    AudioAlone,
}

/// How much longer [`Pass::WiderWindow`]'s window is.
const WIDER_WINDOW_MS: u32 = 1_000;

/// One transcript the beam search finished with.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Hypothesis {
    pub(super) text: String,
    /// Mean log probability of its tokens (higher is likelier).
    pub(super) score: f32,
}

/// `<|startofprev|>` and the tokens of ` vocabulary` (Whisper's previous
/// text starts with a space), cut to [`MAX_PROMPT_TOKENS`] at the end of a
/// sentence.
fn vocabulary_prompt(
    tokenizer: &ct2rs::tokenizers::hf::Tokenizer,
    vocabulary: &str,
) -> Result<Vec<String>, String> {
    let vocabulary = vocabulary.trim();
    if vocabulary.is_empty() {
        return Ok(Vec::new());
    }
    let mut tokens = ct2rs::Tokenizer::encode(tokenizer, &format!(" {vocabulary}"))
        .map_err(|e| format!("cannot tokenize the vocabulary: {e}"))?;
    tokens.retain(|t| !t.starts_with("<|"));
    if tokens.len() > MAX_PROMPT_TOKENS {
        tokens.truncate(MAX_PROMPT_TOKENS);
        // End on a whole sentence when there is one.
        if let Some(end) = tokens.iter().rposition(|t| t.ends_with(['?', '.', '!'])) {
            tokens.truncate(end + 1);
        }
    }
    tokens.insert(0, "<|startofprev|>".to_owned());
    Ok(tokens)
}

/// Whisper's language code for a BCP-47 tag: `es-419` → `es`.
pub(super) fn whisper_language(tag: &str) -> &str {
    tag.split(['-', '_']).next().unwrap_or(tag)
}
