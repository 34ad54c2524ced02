//! The models' prices in nano-dollars per token (USD per million tokens ×
//! 1,000), paid tier. Not read from Google's own page: both rows are
//! third-party quotes and unconfirmed — `gemini-2.5-flash-native-audio-
//! preview-12-2025` from BerriAI/litellm#32113 quoting
//! ai.google.dev/gemini-api/docs/pricing (2026-07-04), `gemini-3.1-flash-
//! live-preview` from truefoundry/models#445 (March 2026) and futureagi
//! (May 2026). Check them on ai.google.dev/gemini-api/docs/pricing before
//! billing; `gemini_live.*_usd_per_1k` replace any of them. No cached-input
//! rate is published for the Live API, so cached tokens cost the full rate.

use crate::config::GeminiLiveConfig;
use crate::usage::{PriceTable, Rates};

/// `(text in, audio in, text out, audio out)`.
type Row = (u64, u64, u64, u64);

const MODELS: [(&str, Row); 2] = [
    (
        "gemini-2.5-flash-native-audio-preview-12-2025",
        (500, 3_000, 2_000, 12_000),
    ),
    ("gemini-3.1-flash-live-preview", (750, 3_000, 4_500, 12_000)),
];

/// The built-in prices (see the module notes on where they come from).
pub fn builtin_prices() -> PriceTable {
    MODELS.iter().fold(
        PriceTable::default(),
        |table, &(model, (text_in, speech_in, text_out, speech_out))| {
            table.with_override(
                model,
                Rates {
                    speech_in,
                    speech_out,
                    text_in,
                    text_out,
                },
            )
        },
    )
}

/// The rates stamped on each ledger row.
pub fn stamp(table: &PriceTable, model: &str) -> String {
    let rates = table.rates(model).copied().unwrap_or_default();
    format!("{model} {} cached_at_full_rate", rates.stamp())
}

/// The built-in prices with the configured ones in their place (each price
/// set above 0 replaces one rate of the configured model; the
/// configuration checked them).
pub(super) fn from_config(config: &GeminiLiveConfig, model: &str) -> PriceTable {
    let table = builtin_prices();
    let nano = |usd_per_1k: f64| -> Option<u64> {
        (usd_per_1k > 0.0)
            .then(|| PriceTable::from_usd_per_1k(usd_per_1k, 0.0, 0.0, 0.0).ok())
            .flatten()
            .map(|r| r.speech_in)
    };
    let mut rates = table.rates(model).copied().unwrap_or_default();
    let mut changed = false;
    for (slot, usd) in [
        (&mut rates.speech_in, config.speech_in_usd_per_1k),
        (&mut rates.speech_out, config.speech_out_usd_per_1k),
        (&mut rates.text_in, config.text_in_usd_per_1k),
        (&mut rates.text_out, config.text_out_usd_per_1k),
    ] {
        if let Some(n) = nano(usd) {
            *slot = n;
            changed = true;
        }
    }
    if changed {
        table.with_override(model, rates)
    } else {
        table
    }
}
