//! Usage and cost: per-modality, per-direction deltas in integer units.
//!
//! Engines report what a conversation used as deltas; money is integer
//! micro-dollars so sums never drift.
//!
//! Prices are integer nano-dollars per token, which is exact for every
//! published rate. A [`UsageMeter`] counts [`Tokens`] as an engine reads
//! them from its service, keeps the exact running cost in nano-dollars and
//! hands out micro-dollar cost shares whose sum always equals the rounded
//! total. Reading a service's own usage reports is the engine's business.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

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
    /// Where the delta came from, when the engine says (never sent to
    /// clients, never summed): the ledger keeps it to check the deltas of
    /// each upstream stream against the totals the engine reported.
    #[serde(skip)]
    pub upstream: Option<Upstream>,
}

/// The upstream stream a delta came from and that stream's running totals
/// as the service reported them with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Upstream {
    /// Counts from 0 with each new upstream stream of a conversation.
    pub stream: u64,
    /// The service's running totals for the stream, when it sent them.
    pub reported: Option<Tokens>,
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

    /// No tokens, audio, text or cost (where it came from aside).
    pub fn is_empty(&self) -> bool {
        Self {
            upstream: None,
            ..*self
        } == Self::default()
    }
}

/// A positive amount of dollars in whole micro-dollars; refuses what is
/// not a plain amount or is finer than a micro-dollar.
pub fn micro_usd(usd: f64) -> Result<u64, String> {
    if !usd.is_finite() || usd <= 0.0 || usd > 1e9 {
        return Err(format!("must be a positive amount of dollars, not {usd}"));
    }
    let micro = (usd * 1e6).round();
    if (usd * 1e6 - micro).abs() > 1e-3 {
        return Err(format!("{usd} is finer than a micro-dollar"));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked above"
    )]
    Ok(micro as u64)
}

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

/// The four token kinds.
pub const KINDS: [(Modality, Direction); 4] = [
    (Modality::Speech, Direction::Input),
    (Modality::Text, Direction::Input),
    (Modality::Speech, Direction::Output),
    (Modality::Text, Direction::Output),
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
    /// The rates in one line, as a ledger row names its price table.
    pub fn stamp(&self) -> String {
        format!(
            "nano-usd/token speech_in={} speech_out={} text_in={} text_out={}",
            self.speech_in, self.speech_out, self.text_in, self.text_out
        )
    }

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
pub struct Tokens {
    pub speech_in: u64,
    pub speech_out: u64,
    pub text_in: u64,
    pub text_out: u64,
}

impl Tokens {
    pub fn get(&self, modality: Modality, direction: Direction) -> u64 {
        match (modality, direction) {
            (Modality::Speech, Direction::Input) => self.speech_in,
            (Modality::Speech, Direction::Output) => self.speech_out,
            (Modality::Text, Direction::Input) => self.text_in,
            (Modality::Text, Direction::Output) => self.text_out,
        }
    }

    pub fn slot(&mut self, modality: Modality, direction: Direction) -> &mut u64 {
        match (modality, direction) {
            (Modality::Speech, Direction::Input) => &mut self.speech_in,
            (Modality::Speech, Direction::Output) => &mut self.speech_out,
            (Modality::Text, Direction::Input) => &mut self.text_in,
            (Modality::Text, Direction::Output) => &mut self.text_out,
        }
    }

    pub fn saturating_add(&self, other: &Self) -> Self {
        let mut out = *self;
        for (m, d) in KINDS {
            let slot = out.slot(m, d);
            *slot = slot.saturating_add(other.get(m, d));
        }
        out
    }

    /// `self - earlier` per field, or `None` if any field went down.
    pub fn checked_sub(&self, earlier: &Self) -> Option<Self> {
        let mut out = Self::default();
        for (m, d) in KINDS {
            *out.slot(m, d) = self.get(m, d).checked_sub(earlier.get(m, d))?;
        }
        Some(out)
    }

    /// Exact cost in nano-dollars.
    pub fn cost_nano(&self, rates: &Rates) -> u128 {
        KINDS
            .iter()
            .map(|&(m, d)| u128::from(self.get(m, d)) * u128::from(rates.per_token(m, d)))
            .fold(0u128, u128::saturating_add)
    }

    /// Exact cost of one modality's tokens in nano-dollars.
    fn modality_cost_nano(&self, rates: &Rates, modality: Modality) -> u128 {
        KINDS
            .iter()
            .filter(|&&(m, _)| m == modality)
            .map(|&(m, d)| u128::from(self.get(m, d)) * u128::from(rates.per_token(m, d)))
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

/// Usage and cost of one conversation.
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
        }
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Adds `counted` to the conversation and returns it as a delta carrying
    /// its share of the rounded cost.
    pub fn count(&mut self, counted: &Tokens) -> UsageDelta {
        let rates = self.rates;
        self.record(counted, counted, rates.as_ref())
    }

    /// Like [`count`](Self::count), at other rates than the model's (a
    /// service's discounted cached input): the tokens join the totals, their
    /// cost is at `rates`. An unpriced meter stays unpriced.
    pub fn count_at(&mut self, counted: &Tokens, rates: &Rates) -> UsageDelta {
        let rates = self.rates.map(|_| *rates);
        self.record(counted, counted, rates.as_ref())
    }

    /// Adds the cost of `billed` at `rates` without counting its tokens (a
    /// service the engine uses besides the model, such as a transcription
    /// model billed on its own): the delta carries cost and no tokens.
    pub fn charge(&mut self, billed: &Tokens, rates: &Rates) -> UsageDelta {
        let rates = self.rates.map(|_| *rates);
        self.record(&Tokens::default(), billed, rates.as_ref())
    }

    fn record(&mut self, counted: &Tokens, billed: &Tokens, rates: Option<&Rates>) -> UsageDelta {
        self.tokens = self.tokens.saturating_add(counted);
        let mut modality_share = [0u64; 2];
        if let Some(rates) = rates {
            self.cost_nano = self.cost_nano.saturating_add(billed.cost_nano(rates));
            for (i, modality) in [Modality::Speech, Modality::Text].into_iter().enumerate() {
                let nano = &mut self.modality_nano[i];
                *nano = nano.saturating_add(billed.modality_cost_nano(rates, modality));
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

    /// Sum so far, with the rounded cost in `cost_micro_usd`.
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

    /// Tokens of one kind so far.
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

#[cfg(test)]
mod tests;
