//! The models' prices in nano-dollars per token (USD per million tokens ×
//! 1,000), as OpenAI publishes them: developers.openai.com/api/docs/models/
//! `gpt-realtime-1.5`, `gpt-realtime-2`, `gpt-realtime-2.1`,
//! `gpt-realtime-2.1-mini` (read October 2026; `gpt-realtime` at the
//! `-1.5` rates and `gpt-realtime-mini` at the `-2.1-mini` rates per the
//! same pages' comparisons), and `gpt-4o-transcribe`,
//! `gpt-4o-mini-transcribe` (read November 2026). Cached input is billed at
//! its own rate; `openai_realtime.*_usd_per_1k` replace any of them.

use crate::config::OpenAiRealtimeConfig;
use crate::usage::{PriceTable, Rates};

/// A speech model's rates: full-price tokens and cached input tokens (the
/// cached table sets only `speech_in` and `text_in`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prices {
    pub standard: PriceTable,
    pub cached: PriceTable,
    /// Transcription models (the user's words), billed apart.
    pub transcription: PriceTable,
}

/// `(text in, cached text in, text out, audio in, cached audio in, audio out)`.
type Row = (u64, u64, u64, u64, u64, u64);

const SPEECH_MODELS: [(&str, Row); 6] = [
    ("gpt-realtime", (4_000, 400, 16_000, 32_000, 400, 64_000)),
    (
        "gpt-realtime-1.5",
        (4_000, 400, 16_000, 32_000, 400, 64_000),
    ),
    ("gpt-realtime-2", (4_000, 400, 24_000, 32_000, 400, 64_000)),
    (
        "gpt-realtime-2.1",
        (4_000, 400, 24_000, 32_000, 400, 64_000),
    ),
    ("gpt-realtime-mini", (600, 60, 2_400, 10_000, 300, 20_000)),
    (
        "gpt-realtime-2.1-mini",
        (600, 60, 2_400, 10_000, 300, 20_000),
    ),
];

/// `(input, output)`: the pages give one input rate for audio and text.
const TRANSCRIPTION_MODELS: [(&str, (u64, u64)); 2] = [
    ("gpt-4o-transcribe", (2_500, 10_000)),
    ("gpt-4o-mini-transcribe", (1_250, 5_000)),
];

/// The published prices.
pub fn builtin_prices() -> Prices {
    let mut prices = Prices::default();
    for (model, (text_in, text_cached, text_out, audio_in, audio_cached, audio_out)) in
        SPEECH_MODELS
    {
        prices.standard = prices.standard.with_override(
            model,
            Rates {
                speech_in: audio_in,
                speech_out: audio_out,
                text_in,
                text_out,
            },
        );
        prices.cached = prices.cached.with_override(
            model,
            Rates {
                speech_in: audio_cached,
                text_in: text_cached,
                ..Rates::default()
            },
        );
    }
    for (model, (input, output)) in TRANSCRIPTION_MODELS {
        prices.transcription = prices.transcription.with_override(
            model,
            Rates {
                speech_in: input,
                text_in: input,
                text_out: output,
                speech_out: 0,
            },
        );
    }
    prices
}

impl Prices {
    /// A model's rates with a dated snapshot's name (`gpt-realtime-2025-08-28`)
    /// falling back to its family's.
    pub fn find<'a>(table: &'a PriceTable, model: &str) -> Option<&'a Rates> {
        table.rates(model).or_else(|| table.rates(undated(model)))
    }

    /// The rates stamped on each ledger row.
    pub fn stamp(&self, model: &str) -> String {
        let standard = Self::find(&self.standard, model)
            .copied()
            .unwrap_or_default();
        let cached = Self::find(&self.cached, model).copied().unwrap_or_default();
        format!(
            "{model} {} cached_speech_in={} cached_text_in={}",
            standard.stamp(),
            cached.speech_in,
            cached.text_in
        )
    }
}

/// The model name without a trailing `-YYYY-MM-DD`.
fn undated(model: &str) -> &str {
    let bytes = model.as_bytes();
    if bytes.len() > 11 {
        let tail = &model[model.len() - 11..];
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if tail.starts_with('-')
            && digits(&tail[1..5])
            && &tail[5..6] == "-"
            && digits(&tail[6..8])
            && &tail[8..9] == "-"
            && digits(&tail[9..11])
        {
            return &model[..model.len() - 11];
        }
    }
    model
}

/// The published prices with the configured ones in their place (each price
/// set above 0 replaces one rate; the configuration checked them).
pub(super) fn from_config(config: &OpenAiRealtimeConfig) -> Prices {
    let mut prices = builtin_prices();
    let nano = |usd_per_1k: f64| -> Option<u64> {
        (usd_per_1k > 0.0)
            .then(|| PriceTable::from_usd_per_1k(usd_per_1k, 0.0, 0.0, 0.0).ok())
            .flatten()
            .map(|r| r.speech_in)
    };
    let model = config.model.as_str();
    let mut standard = Prices::find(&prices.standard, model)
        .copied()
        .unwrap_or_default();
    let mut cached = Prices::find(&prices.cached, model)
        .copied()
        .unwrap_or_default();
    let mut changed = false;
    for (slot, usd) in [
        (&mut standard.speech_in, config.speech_in_usd_per_1k),
        (&mut standard.speech_out, config.speech_out_usd_per_1k),
        (&mut standard.text_in, config.text_in_usd_per_1k),
        (&mut standard.text_out, config.text_out_usd_per_1k),
        (&mut cached.speech_in, config.cached_speech_in_usd_per_1k),
        (&mut cached.text_in, config.cached_text_in_usd_per_1k),
    ] {
        if let Some(n) = nano(usd) {
            *slot = n;
            changed = true;
        }
    }
    if changed {
        prices.standard = prices.standard.with_override(model, standard);
        prices.cached = prices.cached.with_override(model, cached);
    }
    let transcriber = config.transcription_model.trim();
    let mut rates = Prices::find(&prices.transcription, transcriber)
        .copied()
        .unwrap_or_default();
    let given_in = nano(config.transcription_in_usd_per_1k);
    let given_out = nano(config.transcription_out_usd_per_1k);
    if let Some(n) = given_in {
        rates.speech_in = n;
        rates.text_in = n;
    }
    if let Some(n) = given_out {
        rates.text_out = n;
    }
    if given_in.is_some() || given_out.is_some() {
        prices.transcription = prices.transcription.with_override(transcriber, rates);
    }
    prices
}
