//! A response's usage as exact per-modality cost: input tokens less the
//! cached ones at the full rates, cached ones at the cached rates, output
//! at the output rates; the transcription model's tokens at its own rates
//! (cost only: its tokens are not the speech model's).

use super::prices::Prices;
use super::wire::{TranscriptionUsage, Usage};
use crate::usage::{Rates, Tokens, UsageDelta, UsageMeter};

#[derive(Debug)]
pub(super) struct Costing {
    meter: UsageMeter,
    cached: Rates,
    transcription: Option<Rates>,
}

impl Costing {
    pub(super) fn new(model: &str, transcription_model: &str, prices: &Prices) -> Self {
        let standard = Prices::find(&prices.standard, model).copied();
        // The meter looks the model up by name: give it the rates found for
        // a dated snapshot too.
        let table = match standard {
            Some(rates) => prices.standard.clone().with_override(model, rates),
            None => prices.standard.clone(),
        };
        Self {
            meter: UsageMeter::new(model, &table),
            cached: Prices::find(&prices.cached, model)
                .copied()
                .unwrap_or_default(),
            transcription: Prices::find(&prices.transcription, transcription_model).copied(),
        }
    }

    /// Whether the speech model has prices (otherwise cost stays 0).
    pub(super) fn priced(&self) -> bool {
        self.meter.priced()
    }

    /// The delta for one `response.done`'s usage.
    pub(super) fn response(&mut self, usage: &Usage) -> UsageDelta {
        let input = &usage.input_token_details;
        let mut cached_text = input.cached_tokens_details.text_tokens;
        let mut cached_audio = input.cached_tokens_details.audio_tokens;
        if cached_text + cached_audio == 0 && input.cached_tokens > 0 {
            // No split given: text first (the instructions and history are
            // cached before any audio is).
            cached_text = input.cached_tokens.min(input.text_tokens);
            cached_audio = (input.cached_tokens - cached_text).min(input.audio_tokens);
        }
        let cached_text = cached_text.min(input.text_tokens);
        let cached_audio = cached_audio.min(input.audio_tokens);
        let full = Tokens {
            speech_in: input.audio_tokens - cached_audio,
            text_in: input.text_tokens - cached_text,
            speech_out: usage.output_token_details.audio_tokens,
            text_out: usage.output_token_details.text_tokens,
        };
        let mut delta = self.meter.count(&full);
        let cached = Tokens {
            speech_in: cached_audio,
            text_in: cached_text,
            ..Tokens::default()
        };
        if cached != Tokens::default() {
            delta.add(&self.meter.count_at(&cached, &self.cached));
        }
        delta
    }

    /// The delta for the transcription of one user turn, if it is priced by
    /// tokens (a duration-priced model's cost is not known here).
    pub(super) fn transcription(&mut self, usage: &TranscriptionUsage) -> Option<UsageDelta> {
        let rates = self.transcription?;
        let TranscriptionUsage::Tokens {
            input_tokens,
            output_tokens,
            input_token_details,
        } = *usage
        else {
            return None;
        };
        let billed = match input_token_details {
            Some(details) => Tokens {
                speech_in: details.audio_tokens,
                text_in: details.text_tokens,
                text_out: output_tokens,
                speech_out: 0,
            },
            None => Tokens {
                speech_in: input_tokens,
                text_out: output_tokens,
                ..Tokens::default()
            },
        };
        Some(self.meter.charge(&billed, &rates))
    }

    pub(super) fn totals(&self) -> UsageDelta {
        self.meter.totals()
    }
}
