//! Usage and cost: per-modality, per-direction deltas in integer units.
//!
//! Engines report what a conversation used as deltas; money is integer
//! micro-dollars so sums never drift.
//!
//! Prices are integer nano-dollars per token, which is exact for every
//! published Nova Sonic rate. A [`UsageMeter`] turns Nova Sonic
//! `usageEvent`s into deltas, keeps the exact running cost in nano-dollars
//! and hands out micro-dollar cost shares whose sum always equals the
//! rounded total.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What one engine event added to a conversation's usage. Always a delta.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageDelta {
    pub speech_in_tokens: u64,
    pub speech_out_tokens: u64,
    pub text_in_tokens: u64,
    pub text_out_tokens: u64,
    /// User audio the engine consumed, in milliseconds.
    pub audio_in_ms: u64,
    /// Reply audio the engine produced, in milliseconds.
    pub audio_out_ms: u64,
    /// Characters of user text (transcripts or typed) the engine read.
    pub text_in_chars: u64,
    /// Characters of reply text the engine produced.
    pub text_out_chars: u64,
    pub cost_micro_usd: u64,
    /// The speech tokens' share of the cost (each modality rounded on its
    /// own, so the two may differ from `cost_micro_usd` by 1).
    #[serde(default)]
    pub speech_cost_micro_usd: u64,
    /// The text tokens' share of the cost.
    #[serde(default)]
    pub text_cost_micro_usd: u64,
}

impl UsageDelta {
    /// Adds another delta field by field (saturating).
    pub fn add(&mut self, other: &Self) {
        self.speech_in_tokens = self.speech_in_tokens.saturating_add(other.speech_in_tokens);
        self.speech_out_tokens = self
            .speech_out_tokens
            .saturating_add(other.speech_out_tokens);
        self.text_in_tokens = self.text_in_tokens.saturating_add(other.text_in_tokens);
        self.text_out_tokens = self.text_out_tokens.saturating_add(other.text_out_tokens);
        self.audio_in_ms = self.audio_in_ms.saturating_add(other.audio_in_ms);
        self.audio_out_ms = self.audio_out_ms.saturating_add(other.audio_out_ms);
        self.text_in_chars = self.text_in_chars.saturating_add(other.text_in_chars);
        self.text_out_chars = self.text_out_chars.saturating_add(other.text_out_chars);
        self.cost_micro_usd = self.cost_micro_usd.saturating_add(other.cost_micro_usd);
        self.speech_cost_micro_usd = self
            .speech_cost_micro_usd
            .saturating_add(other.speech_cost_micro_usd);
        self.text_cost_micro_usd = self
            .text_cost_micro_usd
            .saturating_add(other.text_cost_micro_usd);
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Nova Sonic v1 model id.
pub const NOVA_SONIC_V1: &str = "amazon.nova-sonic-v1:0";
/// Nova 2 Sonic model id.
pub const NOVA_2_SONIC: &str = "amazon.nova-2-sonic-v1:0";

/// Nano-dollars in one micro-dollar.
const NANO_PER_MICRO: u128 = 1_000;
/// Largest accepted configured rate, in USD per 1,000 tokens.
const MAX_USD_PER_1K: f64 = 1.0;
/// How far `usd_per_1k * 1e6` may sit from an integer and still count as exact.
const NANO_TOLERANCE: f64 = 1e-6;

/// What a token carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Speech,
    Text,
}

/// Which way a token went, seen from the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Input,
    Output,
}

/// The four token kinds, with their names in a `usageEvent`.
const KINDS: [(Modality, Direction, &str, &str); 4] = [
    (Modality::Speech, Direction::Input, "input", "speechTokens"),
    (Modality::Text, Direction::Input, "input", "textTokens"),
    (
        Modality::Speech,
        Direction::Output,
        "output",
        "speechTokens",
    ),
    (Modality::Text, Direction::Output, "output", "textTokens"),
];

/// Prices of one model, in nano-dollars per token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rates {
    pub speech_in: u64,
    pub speech_out: u64,
    pub text_in: u64,
    pub text_out: u64,
}

impl Rates {
    /// Nano-dollars per token of one kind.
    pub fn per_token(&self, modality: Modality, direction: Direction) -> u64 {
        match (modality, direction) {
            (Modality::Speech, Direction::Input) => self.speech_in,
            (Modality::Speech, Direction::Output) => self.speech_out,
            (Modality::Text, Direction::Input) => self.text_in,
            (Modality::Text, Direction::Output) => self.text_out,
        }
    }
}

/// Model id to [`Rates`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    models: BTreeMap<String, Rates>,
}

impl PriceTable {
    /// The built-in on-demand rates.
    ///
    /// - `amazon.nova-sonic-v1:0`: $0.0034 / $0.0136 / $0.00006 / $0.00024 per
    ///   1K speech-in / speech-out / text-in / text-out tokens, as hard-coded in
    ///   the AWS workshop sample meter (`meter.jsx`). Confirmed.
    /// - `amazon.nova-2-sonic-v1:0`: $0.003 / $0.012 / $0.00033 / $0.00275 per
    ///   1K tokens. **UNCONFIRMED**: third-party sources only; the AWS pricing
    ///   page copies available lacked the Sonic table. Override from config
    ///   once confirmed (see [`PriceTable::is_confirmed`]).
    pub fn builtin() -> Self {
        Self::default()
            .with_override(
                NOVA_SONIC_V1,
                Rates {
                    speech_in: 3_400,
                    speech_out: 13_600,
                    text_in: 60,
                    text_out: 240,
                },
            )
            .with_override(
                NOVA_2_SONIC,
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
    pub fn is_confirmed(model: &str) -> bool {
        model == NOVA_SONIC_V1
    }

    /// Sets (or replaces) the rates of `model`.
    #[must_use]
    pub fn with_override(mut self, model: &str, rates: Rates) -> Self {
        self.models.insert(model.to_owned(), rates);
        self
    }

    pub fn rates(&self, model: &str) -> Option<&Rates> {
        self.models.get(model)
    }

    /// Builds [`Rates`] from configured USD-per-1,000-token prices.
    ///
    /// Rejects negative, non-finite and absurd (above $1 per 1K tokens)
    /// values, and values that are not a whole number of nano-dollars per
    /// token (`usd_per_1k * 1e6` must be within 1e-6 of an integer).
    pub fn from_usd_per_1k(
        speech_in: f64,
        speech_out: f64,
        text_in: f64,
        text_out: f64,
    ) -> Result<Rates, String> {
        Ok(Rates {
            speech_in: nano_per_token("speech input", speech_in)?,
            speech_out: nano_per_token("speech output", speech_out)?,
            text_in: nano_per_token("text input", text_in)?,
            text_out: nano_per_token("text output", text_out)?,
        })
    }
}

/// Converts USD per 1,000 tokens into whole nano-dollars per token.
fn nano_per_token(what: &str, usd_per_1k: f64) -> Result<u64, String> {
    if !usd_per_1k.is_finite() {
        return Err(format!("{what} rate is not a finite number: {usd_per_1k}"));
    }
    if usd_per_1k < 0.0 {
        return Err(format!(
            "{what} rate is negative: ${usd_per_1k} per 1K tokens"
        ));
    }
    if usd_per_1k > MAX_USD_PER_1K {
        return Err(format!(
            "{what} rate ${usd_per_1k} per 1K tokens is above the ${MAX_USD_PER_1K} sanity limit"
        ));
    }
    let nano = usd_per_1k * 1e6;
    let whole = nano.round();
    if (nano - whole).abs() > NANO_TOLERANCE {
        return Err(format!(
            "{what} rate ${usd_per_1k} per 1K tokens is not a whole number of nano-dollars per token ({nano} n$)"
        ));
    }
    // In range: 0 <= whole <= 1e6, so the conversion is exact.
    Ok(whole as u64)
}

/// Token counts of the four kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tokens {
    speech_in: u64,
    speech_out: u64,
    text_in: u64,
    text_out: u64,
}

impl Tokens {
    fn get(&self, modality: Modality, direction: Direction) -> u64 {
        match (modality, direction) {
            (Modality::Speech, Direction::Input) => self.speech_in,
            (Modality::Speech, Direction::Output) => self.speech_out,
            (Modality::Text, Direction::Input) => self.text_in,
            (Modality::Text, Direction::Output) => self.text_out,
        }
    }

    fn slot(&mut self, modality: Modality, direction: Direction) -> &mut u64 {
        match (modality, direction) {
            (Modality::Speech, Direction::Input) => &mut self.speech_in,
            (Modality::Speech, Direction::Output) => &mut self.speech_out,
            (Modality::Text, Direction::Input) => &mut self.text_in,
            (Modality::Text, Direction::Output) => &mut self.text_out,
        }
    }

    fn saturating_add(&self, other: &Self) -> Self {
        let mut out = *self;
        for (m, d, _, _) in KINDS {
            let slot = out.slot(m, d);
            *slot = slot.saturating_add(other.get(m, d));
        }
        out
    }

    /// `self - earlier` per field, or `None` if any field went down.
    fn checked_sub(&self, earlier: &Self) -> Option<Self> {
        let mut out = Self::default();
        for (m, d, _, _) in KINDS {
            *out.slot(m, d) = self.get(m, d).checked_sub(earlier.get(m, d))?;
        }
        Some(out)
    }

    /// Exact cost in nano-dollars.
    fn cost_nano(&self, rates: &Rates) -> u128 {
        KINDS
            .iter()
            .map(|&(m, d, _, _)| u128::from(self.get(m, d)) * u128::from(rates.per_token(m, d)))
            .fold(0u128, u128::saturating_add)
    }

    /// Exact cost of one modality's tokens in nano-dollars.
    fn modality_cost_nano(&self, rates: &Rates, modality: Modality) -> u128 {
        KINDS
            .iter()
            .filter(|&&(m, _, _, _)| m == modality)
            .map(|&(m, d, _, _)| u128::from(self.get(m, d)) * u128::from(rates.per_token(m, d)))
            .fold(0u128, u128::saturating_add)
    }
}

impl fmt::Display for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "speech in {}, text in {}, speech out {}, text out {}",
            self.speech_in, self.text_in, self.speech_out, self.text_out
        )
    }
}

/// What [`UsageMeter::ingest`] made of one `usageEvent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// Tokens of this event, with its share of the cost in `cost_micro_usd`.
    Delta(UsageDelta),
    /// Counted like [`Ingested::Delta`], but the event's deltas and running
    /// totals disagree (or the totals went backwards); the deltas were
    /// trusted and `warning` says by how much they disagree.
    Mismatch { delta: UsageDelta, warning: String },
    /// No recognisable token fields: nothing was counted.
    Unknown { reason: String },
}

impl Ingested {
    /// The counted delta, if anything was counted.
    pub fn delta(&self) -> Option<&UsageDelta> {
        match self {
            Self::Delta(delta) | Self::Mismatch { delta, .. } => Some(delta),
            Self::Unknown { .. } => None,
        }
    }
}

/// Per-stream bookkeeping: the engine's running totals restart with each
/// upstream stream.
#[derive(Debug, Clone, Copy, Default)]
struct StreamState {
    /// Sum of the deltas counted on this stream.
    summed: Tokens,
    /// The last running total the engine reported on this stream.
    last_total: Option<Tokens>,
}

/// Usage and cost of one conversation, across all its upstream streams.
#[derive(Debug, Clone)]
pub struct UsageMeter {
    model: String,
    rates: Option<Rates>,
    tokens: Tokens,
    cost_nano: u128,
    /// Rounded micro-dollar total already handed out in deltas.
    reported_micro: u64,
    /// Exact cost per modality (speech, text) and what was handed out of each.
    modality_nano: [u128; 2],
    modality_reported: [u64; 2],
    stream: StreamState,
    /// The stream before `stream` while it is still closing (rotation).
    previous: Option<StreamState>,
}

impl UsageMeter {
    /// A meter for `model`. A model missing from `prices` is still metered
    /// in tokens, but its cost stays 0 and [`UsageMeter::priced`] is false.
    pub fn new(model: &str, prices: &PriceTable) -> Self {
        Self {
            model: model.to_owned(),
            rates: prices.rates(model).copied(),
            tokens: Tokens::default(),
            cost_nano: 0,
            reported_micro: 0,
            modality_nano: [0; 2],
            modality_reported: [0; 2],
            stream: StreamState::default(),
            previous: None,
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// A new upstream stream began (rotation or reconnect): the engine's
    /// running totals restart at zero. The meter's own totals carry on.
    pub fn begin_stream(&mut self) {
        self.stream = StreamState::default();
    }

    /// A new stream began while the current one is still closing (a warm
    /// hand-off): the closing stream's late events go to
    /// [`UsageMeter::ingest_previous`] and are checked against its own totals.
    pub fn begin_overlapping_stream(&mut self) {
        self.previous = Some(std::mem::take(&mut self.stream));
    }

    /// [`UsageMeter::ingest`] for the stream that was current before
    /// [`UsageMeter::begin_overlapping_stream`].
    pub fn ingest_previous(&mut self, usage_event: &Value) -> Ingested {
        let previous = self.previous.take().unwrap_or_default();
        let current = std::mem::replace(&mut self.stream, previous);
        let ingested = self.ingest(usage_event);
        self.previous = Some(std::mem::replace(&mut self.stream, current));
        ingested
    }

    /// Counts one `usageEvent` (the object inside
    /// `{"event":{"usageEvent": …}}`).
    ///
    /// `details.delta` is what gets counted. When `details.total` is present
    /// too, this stream's summed deltas must equal it field by field;
    /// otherwise the deltas are still counted and a [`Ingested::Mismatch`]
    /// says by how much they differ. An event with totals but no delta is
    /// counted as the growth since this stream's previous total. Running
    /// totals that go down mean a new stream began without
    /// [`UsageMeter::begin_stream`]: the stream restarts, the totals count
    /// from zero, and the result is a [`Ingested::Mismatch`] saying so.
    pub fn ingest(&mut self, usage_event: &Value) -> Ingested {
        let details = usage_event.get("details");
        let delta = parse_tokens(details.and_then(|d| d.get("delta")), "delta");
        let total = parse_tokens(details.and_then(|d| d.get("total")), "total");
        let (delta, total) = match (delta, total) {
            (Ok(delta), Ok(total)) => (delta, total),
            (Err(reason), _) | (_, Err(reason)) => return Ingested::Unknown { reason },
        };
        if delta.is_none() && total.is_none() {
            return Ingested::Unknown {
                reason: unrecognised(usage_event),
            };
        }

        let mut warnings = Vec::new();
        if let (Some(total), Some(previous)) = (total, self.stream.last_total)
            && total.checked_sub(&previous).is_none()
        {
            warnings.push(format!(
                "running totals went down ({previous} -> {total}): a new upstream stream \
                 began without begin_stream; counting its totals from zero"
            ));
            self.begin_stream();
        }

        let counted = match (delta, total) {
            (Some(delta), _) => delta,
            (None, Some(total)) => {
                let previous = self.stream.last_total.unwrap_or_default();
                // Cannot fail: a decrease restarted the stream above.
                total.checked_sub(&previous).unwrap_or(total)
            }
            (None, None) => Tokens::default(),
        };
        self.stream.summed = self.stream.summed.saturating_add(&counted);
        if let Some(total) = total {
            if let Some(diff) = describe_difference(&self.stream.summed, &total) {
                warnings.push(format!(
                    "deltas disagree with running totals on this stream ({diff}); deltas trusted"
                ));
            }
            self.stream.last_total = Some(total);
        }

        let delta = self.count(&counted);
        if warnings.is_empty() {
            Ingested::Delta(delta)
        } else {
            Ingested::Mismatch {
                delta,
                warning: warnings.join("; "),
            }
        }
    }

    /// Adds `counted` to the conversation and returns it as a delta carrying
    /// its share of the rounded cost.
    fn count(&mut self, counted: &Tokens) -> UsageDelta {
        self.tokens = self.tokens.saturating_add(counted);
        let mut modality_share = [0u64; 2];
        if let Some(rates) = &self.rates {
            self.cost_nano = self.cost_nano.saturating_add(counted.cost_nano(rates));
            for (i, modality) in [Modality::Speech, Modality::Text].into_iter().enumerate() {
                let nano = &mut self.modality_nano[i];
                *nano = nano.saturating_add(counted.modality_cost_nano(rates, modality));
                let rounded = u64::try_from(round_micro(*nano)).unwrap_or(u64::MAX);
                modality_share[i] = rounded.saturating_sub(self.modality_reported[i]);
                self.modality_reported[i] = rounded;
            }
        }
        let rounded = self.cost_micro_usd();
        let share = rounded.saturating_sub(self.reported_micro);
        self.reported_micro = rounded;
        UsageDelta {
            speech_in_tokens: counted.speech_in,
            speech_out_tokens: counted.speech_out,
            text_in_tokens: counted.text_in,
            text_out_tokens: counted.text_out,
            cost_micro_usd: share,
            speech_cost_micro_usd: modality_share[0],
            text_cost_micro_usd: modality_share[1],
            ..UsageDelta::default()
        }
    }

    /// Exact cost so far, rounded half-up to micro-dollars.
    fn cost_micro_usd(&self) -> u64 {
        u64::try_from(round_micro(self.cost_nano)).unwrap_or(u64::MAX)
    }

    /// Sum over all streams, with the rounded cost in `cost_micro_usd`.
    pub fn totals(&self) -> UsageDelta {
        UsageDelta {
            speech_in_tokens: self.tokens.speech_in,
            speech_out_tokens: self.tokens.speech_out,
            text_in_tokens: self.tokens.text_in,
            text_out_tokens: self.tokens.text_out,
            cost_micro_usd: self.cost_micro_usd(),
            speech_cost_micro_usd: self.modality_reported[0],
            text_cost_micro_usd: self.modality_reported[1],
            ..UsageDelta::default()
        }
    }

    /// Tokens of one kind over all streams.
    pub fn tokens(&self, modality: Modality, direction: Direction) -> u64 {
        self.tokens.get(modality, direction)
    }

    /// Exact cost so far in nano-dollars.
    pub fn cost_nano_usd(&self) -> u128 {
        self.cost_nano
    }

    /// Whether the model has rates, i.e. whether the cost means anything.
    pub fn priced(&self) -> bool {
        self.rates.is_some()
    }
}

/// Nano-dollars rounded half-up to micro-dollars.
fn round_micro(nano: u128) -> u128 {
    (nano + NANO_PER_MICRO / 2) / NANO_PER_MICRO
}

/// Reads `details.delta` or `details.total`. `Ok(None)` when absent or when
/// it holds none of the documented fields; `Err` when a documented field
/// holds something other than a non-negative integer.
fn parse_tokens(block: Option<&Value>, name: &str) -> Result<Option<Tokens>, String> {
    let Some(block) = block else {
        return Ok(None);
    };
    let Some(block) = block.as_object() else {
        return Err(format!("details.{name} is not an object: {block}"));
    };
    let mut tokens = Tokens::default();
    let mut seen = false;
    for (modality, direction, side, field) in KINDS {
        let Some(side_value) = block.get(side) else {
            continue;
        };
        let Some(side_object) = side_value.as_object() else {
            return Err(format!(
                "details.{name}.{side} is not an object: {side_value}"
            ));
        };
        let Some(value) = side_object.get(field) else {
            continue;
        };
        let Some(count) = value.as_u64() else {
            return Err(format!(
                "details.{name}.{side}.{field} is not a non-negative integer: {value}"
            ));
        };
        *tokens.slot(modality, direction) = count;
        seen = true;
    }
    Ok(seen.then_some(tokens))
}

/// Per-field differences between summed deltas and running totals, if any.
fn describe_difference(summed: &Tokens, total: &Tokens) -> Option<String> {
    let parts: Vec<String> = KINDS
        .iter()
        .filter(|&&(m, d, _, _)| summed.get(m, d) != total.get(m, d))
        .map(|&(m, d, side, field)| {
            let (sum, tot) = (summed.get(m, d), total.get(m, d));
            let off = i128::from(sum) - i128::from(tot);
            format!("{side}.{field}: deltas sum to {sum}, total says {tot}, off by {off:+}")
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Why an event without documented token fields was not counted, naming
/// the fields it did have.
fn unrecognised(event: &Value) -> String {
    let mut seen = Vec::new();
    collect_fields(event, "", &mut seen);
    let seen = if seen.is_empty() {
        "none".to_owned()
    } else {
        seen.join(", ")
    };
    format!(
        "no details.delta/details.total speechTokens or textTokens; nothing counted; fields seen: {seen}"
    )
}

/// Dotted paths of the leaf fields of `value`, ids left out.
fn collect_fields(value: &Value, prefix: &str, out: &mut Vec<String>) {
    let Some(object) = value.as_object() else {
        return;
    };
    for (key, child) in object {
        if prefix.is_empty() && matches!(key.as_str(), "sessionId" | "promptName" | "completionId")
        {
            continue;
        }
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if child.is_object() {
            collect_fields(child, &path, out);
        } else {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests;
