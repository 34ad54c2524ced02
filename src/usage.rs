//! Usage and cost: per-modality, per-direction deltas in integer units.
//!
//! Engines report what a conversation used as deltas; money is integer
//! micro-dollars so sums never drift.

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
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_add_up() {
        let mut total = UsageDelta::default();
        assert!(total.is_empty());
        let d = UsageDelta {
            speech_in_tokens: 3,
            audio_out_ms: 20,
            cost_micro_usd: 7,
            ..UsageDelta::default()
        };
        total.add(&d);
        total.add(&d);
        assert_eq!(total.speech_in_tokens, 6);
        assert_eq!(total.audio_out_ms, 40);
        assert_eq!(total.cost_micro_usd, 14);
    }
}
