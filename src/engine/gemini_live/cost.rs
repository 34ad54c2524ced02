//! A turn's `usageMetadata` as exact per-modality cost, read from the
//! per-modality lists only: a modality left out has no tokens, and the
//! totals are never split by subtraction (the lists may not add up to
//! them). Audio and video input are billed at the audio rate, text,
//! image and document input at the text rate; thoughts are text output and
//! the tool-use prompt is input. Cached tokens are part of the prompt and,
//! with no cached rate published, cost the full rate. A total given
//! without its list is billed at the audio rate of its direction, the
//! dearer one, so a budget is never under-counted.

use super::wire::{ModalityCount, UsageMetadata};
use crate::usage::{PriceTable, Tokens, UsageDelta, UsageMeter};

#[derive(Debug)]
pub(super) struct Costing {
    meter: UsageMeter,
}

/// One turn's usage, costed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Billed {
    pub(super) delta: UsageDelta,
    /// The lists do not add up to the totals (or a list is missing): worth
    /// a counter, never a guess.
    pub(super) mismatch: bool,
}

impl Costing {
    pub(super) fn new(model: &str, prices: &PriceTable) -> Self {
        Self {
            meter: UsageMeter::new(model, prices),
        }
    }

    /// Whether the model has prices (otherwise cost stays 0).
    pub(super) fn priced(&self) -> bool {
        self.meter.priced()
    }

    pub(super) fn turn(&mut self, usage: &UsageMetadata) -> Billed {
        let mut tokens = Tokens::default();
        let mut mismatch = false;
        let mut add = |list: Option<&Vec<ModalityCount>>, total: u64, input: bool| match list {
            Some(list) if !list.is_empty() => {
                let mut sum = 0u64;
                for entry in list {
                    sum = sum.saturating_add(entry.token_count);
                    let audio = matches!(entry.modality.as_str(), "AUDIO" | "VIDEO");
                    let slot = match (input, audio) {
                        (true, true) => &mut tokens.speech_in,
                        (true, false) => &mut tokens.text_in,
                        (false, true) => &mut tokens.speech_out,
                        (false, false) => &mut tokens.text_out,
                    };
                    *slot = slot.saturating_add(entry.token_count);
                }
                mismatch |= sum != total;
            }
            _ if total > 0 => {
                mismatch = true;
                let slot = if input {
                    &mut tokens.speech_in
                } else {
                    &mut tokens.speech_out
                };
                *slot = slot.saturating_add(total);
            }
            _ => {}
        };
        add(
            usage.prompt_tokens_details.as_ref(),
            usage.prompt_token_count,
            true,
        );
        add(
            usage.response_tokens_details.as_ref(),
            usage.response_token_count,
            false,
        );
        // The tool-use prompt is text unless its list says otherwise.
        match &usage.tool_use_prompt_tokens_details {
            Some(list) if !list.is_empty() => {
                add(Some(list), usage.tool_use_prompt_token_count, true)
            }
            _ => {
                tokens.text_in = tokens
                    .text_in
                    .saturating_add(usage.tool_use_prompt_token_count)
            }
        }
        tokens.text_out = tokens.text_out.saturating_add(usage.thoughts_token_count);
        Billed {
            delta: self.meter.count(&tokens),
            mismatch,
        }
    }

    pub(super) fn totals(&self) -> UsageDelta {
        self.meter.totals()
    }
}
