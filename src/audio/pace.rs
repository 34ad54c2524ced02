//! A live stream's pace: decoded audio may not outrun the wall clock by
//! more than a burst.

use std::time::Instant;

use super::DecodeError;

/// A live stream's pace: a token bucket in audio time. It starts full with
/// `burst_ms` of audio and refills at `speed_permille` / 1000 audio seconds
/// per wall-clock second, so decoded audio can never outrun the clock by
/// more than the burst, and one pushed chunk never decodes more than it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealtimeLimit {
    /// Sustained audio speed in thousandths of real time (2000: 2×).
    pub speed_permille: u32,
    /// Audio that may arrive at once beyond that, in milliseconds.
    pub burst_ms: u32,
}

impl Default for RealtimeLimit {
    /// 2× real time with a 10 s burst: far beyond what a browser or a phone
    /// sends after a network stall, far below what a flood needs.
    fn default() -> Self {
        Self {
            speed_permille: 2_000,
            burst_ms: 10_000,
        }
    }
}

/// The token bucket of a [`RealtimeLimit`], in microseconds of audio.
#[derive(Debug)]
pub(super) struct AudioBudget {
    limit: RealtimeLimit,
    tokens_us: u64,
    refilled_at: Instant,
    started_at: Instant,
    audio_us: u64,
}

impl AudioBudget {
    pub(super) fn new(limit: RealtimeLimit) -> Self {
        let now = Instant::now();
        Self {
            limit,
            tokens_us: u64::from(limit.burst_ms) * 1000,
            refilled_at: now,
            started_at: now,
            audio_us: 0,
        }
    }

    /// Takes `audio_us` of audio from the bucket, or says how far ahead of
    /// the clock the stream would be.
    pub(super) fn take(&mut self, audio_us: u64) -> Result<(), DecodeError> {
        if audio_us > self.tokens_us {
            let now = Instant::now();
            let elapsed_us = now.duration_since(self.refilled_at).as_micros() as u64;
            let earned = elapsed_us.saturating_mul(u64::from(self.limit.speed_permille)) / 1000;
            self.tokens_us = self
                .tokens_us
                .saturating_add(earned)
                .min(u64::from(self.limit.burst_ms) * 1000);
            self.refilled_at = now;
        }
        if audio_us > self.tokens_us {
            return Err(DecodeError::TooFast {
                audio_ms: (self.audio_us + audio_us) / 1000,
                wall_ms: self.started_at.elapsed().as_millis() as u64,
                limit: self.limit,
            });
        }
        self.tokens_us -= audio_us;
        self.audio_us += audio_us;
        Ok(())
    }
}
