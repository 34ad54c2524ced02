//! Nova Sonic's model ids and their built-in prices.

use crate::usage::{PriceTable, Rates};

/// Nova 2 Sonic, the default model.
pub const MODEL_2: &str = "amazon.nova-2-sonic-v1:0";
/// The default model: Nova 2 Sonic.
pub const DEFAULT_MODEL: &str = MODEL_2;
/// Nova Sonic v1, still accepted.
pub const MODEL_V1: &str = "amazon.nova-sonic-v1:0";

/// Whether `model` (an id or an ARN) is Nova Sonic v1, which takes no typed
/// text and no turn-detection setting.
pub fn is_v1(model: &str) -> bool {
    model.contains(MODEL_V1)
}

/// The built-in on-demand rates.
///
/// - `amazon.nova-sonic-v1:0`: $0.0034 / $0.0136 / $0.00006 / $0.00024 per
///   1K speech-in / speech-out / text-in / text-out tokens, as hard-coded in
///   the AWS workshop sample meter (`meter.jsx`). Confirmed.
/// - `amazon.nova-2-sonic-v1:0`: $0.003 / $0.012 / $0.00033 / $0.00275 per
///   1K tokens. **UNCONFIRMED**: third-party sources only; the AWS pricing
///   page copies available lacked the Sonic table. Override from config
///   once confirmed (see [`rates_confirmed`]).
pub fn builtin_prices() -> PriceTable {
    PriceTable::default()
        .with_override(
            MODEL_V1,
            Rates {
                speech_in: 3_400,
                speech_out: 13_600,
                text_in: 60,
                text_out: 240,
            },
        )
        .with_override(
            MODEL_2,
            Rates {
                speech_in: 3_000,
                speech_out: 12_000,
                text_in: 330,
                text_out: 2_750,
            },
        )
}

/// Whether the built-in rates for `model` come from an AWS source.
/// False for Nova 2 Sonic (unconfirmed rates) and for models without
/// built-in rates.
pub fn rates_confirmed(model: &str) -> bool {
    model == MODEL_V1
}
