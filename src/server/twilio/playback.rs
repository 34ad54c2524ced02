//! What a caller is to hear: reply audio resampled to 8 kHz and encoded as
//! μ-law, eSpeak NG's 8 kHz speech, the marks between replies, and the
//! pacing that sends it as 20 ms frames at real time, never more than a
//! lead ahead of the caller's ear.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::RATE_HZ;
use crate::audio::{StreamResampler, g711};
use crate::engine::Pcm;

/// One outbound `media` message: 20 ms.
const FRAME_BYTES: usize = 160;
const FRAME: Duration = Duration::from_millis(20);
/// Most μ-law audio waiting to be sent: 60 s (a long reply sent faster
/// than real time); past it the oldest is dropped and counted.
const MAX_QUEUED_BYTES: usize = 60 * 8_000;

/// Something due for Twilio.
pub(super) enum Due {
    /// A 20 ms μ-law frame.
    Media(Vec<u8>),
    /// A mark to echo once what came before it is heard.
    Mark(String),
}

#[derive(Default)]
pub(super) struct Playback {
    bytes: VecDeque<u8>,
    /// (bytes sent when it is due, name).
    marks: VecDeque<(u64, String)>,
    /// Bytes ever queued and sent (dropped ones count as sent).
    queued: u64,
    sent: u64,
    /// When the audio already sent will have been played out.
    played_until: Option<Instant>,
    /// Reply audio at the engine's rate → 8 kHz.
    resampler: Option<(u32, StreamResampler)>,
    resampled: Vec<i16>,
    ulaw: Vec<u8>,
}

impl Playback {
    /// Nothing waits to be sent.
    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// When everything sent so far will have been heard.
    pub(super) fn played_until(&self) -> Instant {
        self.played_until.unwrap_or_else(Instant::now)
    }

    /// Whether the caller is hearing something, or something waits.
    pub(super) fn sounding(&self) -> bool {
        !self.bytes.is_empty() || self.played_until.is_some_and(|t| t > Instant::now())
    }

    /// When the next frame may go, when one waits.
    pub(super) fn next_send(&self, lead: Duration) -> Option<Instant> {
        let played = self.played_until();
        (!self.bytes.is_empty()).then(|| played.checked_sub(lead).unwrap_or(played))
    }

    /// Reply audio at any rate.
    pub(super) fn push_reply(&mut self, pcm: &Pcm) -> Result<(), String> {
        let rate = pcm.rate_hz;
        if self.resampler.as_ref().is_none_or(|(r, _)| *r != rate) {
            self.resampler = Some((rate, StreamResampler::new(rate, RATE_HZ)?));
        }
        self.resampled.clear();
        if let Some((_, resampler)) = self.resampler.as_mut() {
            resampler.push(&pcm.samples, &mut self.resampled);
        }
        self.queue_resampled();
        Ok(())
    }

    /// Speech already at 8 kHz.
    pub(super) fn push_8k(&mut self, samples: &[i16]) {
        self.ulaw.clear();
        g711::encode_into(samples, &mut self.ulaw);
        let ulaw = std::mem::take(&mut self.ulaw);
        self.queue(&ulaw);
        self.ulaw = ulaw;
    }

    /// A reply is over: its tail, then a mark named `name`.
    pub(super) fn end_reply(&mut self, name: String) {
        if let Some((_, mut resampler)) = self.resampler.take() {
            self.resampled.clear();
            resampler.finish(&mut self.resampled);
            self.queue_resampled();
        }
        self.marks.push_back((self.queued, name));
    }

    /// Barge-in: nothing more of what was queued is sent.
    pub(super) fn clear(&mut self) {
        self.sent += self.bytes.len() as u64;
        self.bytes.clear();
        self.marks.clear();
        self.resampler = None;
        self.played_until = Some(Instant::now());
    }

    /// The frames and marks due at `now`, the caller's ear at most `lead`
    /// behind the last.
    pub(super) fn due(&mut self, now: Instant, lead: Duration) -> Vec<Due> {
        let mut due = Vec::new();
        while !self.bytes.is_empty() && self.played_until() <= now + lead {
            let n = self.bytes.len().min(FRAME_BYTES);
            let mut frame: Vec<u8> = self.bytes.drain(..n).collect();
            // A short last frame is padded with silence (0xFF, never 0x00).
            frame.resize(FRAME_BYTES, 0xFF);
            self.sent += n as u64;
            self.played_until = Some(self.played_until().max(now) + FRAME);
            due.push(Due::Media(frame));
            while let Some((at, _)) = self.marks.front()
                && *at <= self.sent
            {
                if let Some((_, name)) = self.marks.pop_front() {
                    due.push(Due::Mark(name));
                }
            }
        }
        due
    }

    fn queue_resampled(&mut self) {
        self.ulaw.clear();
        g711::encode_into(&self.resampled, &mut self.ulaw);
        let ulaw = std::mem::take(&mut self.ulaw);
        self.queue(&ulaw);
        self.ulaw = ulaw;
    }

    fn queue(&mut self, ulaw: &[u8]) {
        self.bytes.extend(ulaw);
        self.queued += ulaw.len() as u64;
        let over = self.bytes.len().saturating_sub(MAX_QUEUED_BYTES);
        if over > 0 {
            self.bytes.drain(..over);
            self.sent += over as u64;
        }
    }
}
