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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsrConfig {
    pub beam_size: usize,
    /// CPU threads for one call (0: CTranslate2's default).
    pub threads: usize,
}

impl Default for AsrConfig {
    fn default() -> Self {
        Self {
            beam_size: 5,
            threads: 0,
        }
    }
}

/// A loaded Whisper model.
pub(super) struct Asr {
    whisper: ct2rs::Whisper,
    config: AsrConfig,
}

impl std::fmt::Debug for Asr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asr")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Asr {
    /// Loads the model in `dir`, naming what is missing when it cannot.
    pub(super) fn load(dir: &Path, config: AsrConfig) -> Result<Self, String> {
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
        let ct2_config = ct2rs::Config {
            compute_type: ct2rs::ComputeType::INT8,
            num_threads_per_replica: config.threads,
            ..ct2rs::Config::default()
        };
        let whisper = ct2rs::Whisper::new(dir, ct2_config)
            .map_err(|e| format!("cannot load the speech model in {}: {e}", dir.display()))?;
        Ok(Self { whisper, config })
    }

    /// Transcribes 16 kHz mono speech in `language` (e.g. `es`, `en`).
    pub(super) fn transcribe(&self, pcm: &[i16], language: &str) -> Result<String, String> {
        if pcm.is_empty() {
            return Ok(String::new());
        }
        let samples: Vec<f32> = pcm.iter().map(|&s| f32::from(s) / 32768.0).collect();
        // Cap the output by the audio length: ~6 tokens a second of speech is
        // generous, and a cap stops the rare repetition loop early.
        let seconds = pcm.len() / crate::audio::ENGINE_RATE_HZ as usize + 1;
        let options = ct2rs::WhisperOptions {
            beam_size: self.config.beam_size,
            max_length: (16 + seconds * 8).min(448),
            ..ct2rs::WhisperOptions::default()
        };
        let language = whisper_language(language);
        let parts = self
            .whisper
            .generate(&samples, Some(language), false, &options)
            .map_err(|e| format!("speech recognition failed: {e}"))?;
        Ok(parts
            .join(" ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "))
    }
}

/// Whisper's language code for a BCP-47 tag: `es-419` → `es`.
pub(super) fn whisper_language(tag: &str) -> &str {
    tag.split(['-', '_']).next().unwrap_or(tag)
}
