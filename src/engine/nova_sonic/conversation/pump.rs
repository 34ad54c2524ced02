//! The audio pump: user audio re-framed to 32 ms for the current stream,
//! silence while the user is mute (so the service's idle timeouts never
//! fire), and the last seconds kept for replay into a new stream: only
//! what the old stream had not yet turned into a transcript.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::audio::ENGINE_RATE_HZ;

/// Samples per `audioInput`: 32 ms at 16 kHz.
pub(super) const FRAME_SAMPLES: usize = 512;
/// One frame of silence.
pub(super) const SILENCE: [i16; FRAME_SAMPLES] = [0; FRAME_SAMPLES];
/// Silence starts after this long without user audio.
const MUTE_AFTER: Duration = Duration::from_millis(200);
/// User audio kept for replay into a new stream.
const REPLAY_SAMPLES: usize = 3 * ENGINE_RATE_HZ as usize;

#[derive(Debug)]
pub(super) struct AudioPump {
    /// The last [`REPLAY_SAMPLES`] of user audio.
    recent: VecDeque<i16>,
    /// User samples received in all.
    samples_in: u64,
    /// `samples_in` when the last user transcript arrived: audio before it
    /// was heard and is never replayed.
    heard_upto: u64,
    /// User audio short of a whole frame.
    pending: Vec<i16>,
    last_user_audio: Instant,
}

impl AudioPump {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            recent: VecDeque::with_capacity(REPLAY_SAMPLES),
            samples_in: 0,
            heard_upto: 0,
            pending: Vec::with_capacity(FRAME_SAMPLES * 2),
            last_user_audio: now,
        }
    }

    /// User audio arrived; [`AudioPump::next_frame`] hands out whole frames.
    pub(super) fn push(&mut self, samples: &[i16], now: Instant) {
        self.last_user_audio = now;
        self.samples_in += samples.len() as u64;
        self.recent.extend(samples.iter().copied());
        let excess = self.recent.len().saturating_sub(REPLAY_SAMPLES);
        self.recent.drain(..excess);
        self.pending.extend_from_slice(samples);
    }

    /// The next whole frame of user audio, if one is waiting.
    pub(super) fn next_frame(&mut self) -> Option<[i16; FRAME_SAMPLES]> {
        let frame: [i16; FRAME_SAMPLES] = self.pending.get(..FRAME_SAMPLES)?.try_into().ok()?;
        self.pending.drain(..FRAME_SAMPLES);
        Some(frame)
    }

    /// Whether the user has been mute long enough that silence goes up
    /// instead; a partial frame left over is dropped then.
    pub(super) fn mute(&mut self, now: Instant) -> bool {
        let mute = now.duration_since(self.last_user_audio) >= MUTE_AFTER;
        if mute {
            self.pending.clear();
        }
        mute
    }

    /// A transcript (or typed text) covers everything received so far.
    pub(super) fn heard(&mut self) {
        self.heard_upto = self.samples_in;
    }

    /// The user audio no transcript covers yet, at most the last 3 s.
    pub(super) fn unheard(&self) -> Vec<i16> {
        let unheard = self.samples_in.saturating_sub(self.heard_upto);
        let replay = usize::try_from(unheard)
            .unwrap_or(usize::MAX)
            .min(self.recent.len());
        self.recent
            .iter()
            .skip(self.recent.len() - replay)
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn frames_are_whole_and_silence_follows_a_mute_user() {
        let t0 = Instant::now();
        let mut pump = AudioPump::new(t0);
        pump.push(&[1; 700], t0);
        assert_eq!(pump.next_frame(), Some([1; FRAME_SAMPLES]));
        assert_eq!(pump.next_frame(), None, "188 samples wait for more");
        pump.push(&[2; 400], t0);
        let frame = pump.next_frame().unwrap();
        assert_eq!((frame[187], frame[188]), (1, 2));
        tokio::time::advance(MUTE_AFTER - Duration::from_millis(1)).await;
        assert!(!pump.mute(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(pump.mute(Instant::now()));
        assert_eq!(pump.next_frame(), None, "the partial frame is dropped");
    }

    #[test]
    fn only_audio_no_transcript_covers_is_replayed_and_at_most_three_seconds() {
        let t0 = Instant::now();
        let mut pump = AudioPump::new(t0);
        pump.push(&[1; 1_000], t0);
        pump.heard();
        pump.push(&[2; 300], t0);
        assert_eq!(pump.unheard(), vec![2; 300]);
        pump.push(&[3; REPLAY_SAMPLES], t0);
        let unheard = pump.unheard();
        assert_eq!(unheard.len(), REPLAY_SAMPLES);
        assert!(unheard.iter().all(|s| *s == 3));
        pump.heard();
        assert!(pump.unheard().is_empty());
    }
}
