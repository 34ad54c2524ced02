//! Voice activity detection: 16 kHz PCM in, speech segments out.
//!
//! earshot scores 16 ms frames; a segment opens after a few voiced frames
//! (with pre-roll so the first syllable is kept) and closes after a hangover
//! of silence. A shorter pause first yields `Paused`, so recognition can
//! start early and be kept if the speaker does not resume.

use std::collections::VecDeque;

/// earshot's frame: 256 samples = 16 ms at 16 kHz.
const FRAME_SAMPLES: usize = 256;
const FRAME_MS: u64 = 16;
const SAMPLES_PER_MS: usize = crate::audio::ENGINE_RATE_HZ as usize / 1000;
/// The detector adapts to the noise floor over its first frames and scores
/// a sudden noise onset as voice: no segment may open in this time.
const WARM_UP_MS: u64 = 160;

/// Segmentation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadConfig {
    /// Score (0–1) at or above which a frame is voiced.
    pub threshold: f32,
    /// Silence that ends a segment.
    pub hangover_ms: u64,
    /// Audio kept from before the onset.
    pub preroll_ms: u64,
    /// Voiced time needed to open a segment (filters clicks).
    pub onset_ms: u64,
    /// Silence after which `Paused` is reported (early recognition).
    pub pause_ms: u64,
    /// A segment this long is closed even without silence. It bounds what
    /// one turn holds (480 KB at 15 s): part of a conversation's memory budget.
    pub max_segment_ms: u64,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            hangover_ms: 600,
            preroll_ms: 150,
            onset_ms: 64,
            pause_ms: 150,
            max_segment_ms: 15_000,
        }
    }
}

/// What the segmenter saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum VadEvent {
    /// Speech began.
    Started,
    /// A pause within speech, long enough to start recognising: the audio
    /// so far (pre-roll included, trailing silence trimmed).
    Paused { audio: Vec<i16> },
    /// Speech went on after a `Paused`: recognition of the pause is stale.
    Resumed,
    /// Speech ended: the whole segment (pre-roll included, trailing silence
    /// trimmed to a short tail). `extended` is false when no voiced frame came
    /// after the last `Paused`, so its audio equals that pause's audio.
    Ended { audio: Vec<i16>, extended: bool },
}

/// Streaming segmenter around one earshot detector.
pub(super) struct Segmenter {
    config: VadConfig,
    detector: Box<earshot::Detector>,
    frame: Vec<i16>,
    /// Recent audio while not in speech, for the pre-roll.
    preroll: VecDeque<i16>,
    speech: Vec<i16>,
    in_speech: bool,
    voiced_run_ms: u64,
    silence_run_ms: u64,
    /// Length of `speech` at the last voiced frame.
    speech_end: usize,
    paused_reported: bool,
    voiced_since_pause: bool,
    /// Audio seen, capped at the warm-up length.
    seen_ms: u64,
}

impl std::fmt::Debug for Segmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segmenter")
            .field("config", &self.config)
            .field("in_speech", &self.in_speech)
            .finish_non_exhaustive()
    }
}

impl Segmenter {
    pub(super) fn new(config: VadConfig) -> Self {
        Self {
            config,
            detector: earshot::Detector::default_boxed(),
            frame: Vec::with_capacity(FRAME_SAMPLES),
            preroll: VecDeque::new(),
            speech: Vec::new(),
            in_speech: false,
            voiced_run_ms: 0,
            silence_run_ms: 0,
            speech_end: 0,
            paused_reported: false,
            voiced_since_pause: false,
            seen_ms: 0,
        }
    }

    /// Feeds 16 kHz mono samples; events are appended to `events`.
    pub(super) fn push(&mut self, samples: &[i16], events: &mut Vec<VadEvent>) {
        for &s in samples {
            self.frame.push(s);
            if self.frame.len() == FRAME_SAMPLES {
                let frame = std::mem::replace(&mut self.frame, Vec::with_capacity(FRAME_SAMPLES));
                self.process(&frame, events);
            }
        }
    }

    /// The turn-end model judged the pause reported last to end the turn:
    /// the segment closes now, as the hangover would have closed it, unless
    /// speech went on since. Returns whether it closed.
    pub(super) fn end_at_pause(&mut self, events: &mut Vec<VadEvent>) -> bool {
        if self.in_speech && self.paused_reported && !self.voiced_since_pause {
            self.close(events);
            return true;
        }
        false
    }

    /// End of input: closes an open segment.
    pub(super) fn flush(&mut self, events: &mut Vec<VadEvent>) {
        if self.in_speech {
            let frame = std::mem::take(&mut self.frame);
            self.speech.extend_from_slice(&frame);
            self.close(events);
        }
        self.frame.clear();
    }

    fn process(&mut self, frame: &[i16], events: &mut Vec<VadEvent>) {
        let warm = self.seen_ms >= WARM_UP_MS;
        self.seen_ms = (self.seen_ms + FRAME_MS).min(WARM_UP_MS);
        let voiced = self.detector.predict_i16(frame) >= self.config.threshold && warm;
        if !self.in_speech {
            self.preroll.extend(frame.iter().copied());
            let keep = (self.config.preroll_ms + self.config.onset_ms) as usize * SAMPLES_PER_MS;
            while self.preroll.len() > keep {
                self.preroll.pop_front();
            }
            self.voiced_run_ms = if voiced {
                self.voiced_run_ms + FRAME_MS
            } else {
                0
            };
            if self.voiced_run_ms >= self.config.onset_ms {
                self.in_speech = true;
                self.speech = self.preroll.drain(..).collect();
                self.speech_end = self.speech.len();
                self.silence_run_ms = 0;
                self.paused_reported = false;
                self.voiced_since_pause = true;
                events.push(VadEvent::Started);
            }
            return;
        }
        self.speech.extend_from_slice(frame);
        if voiced {
            self.silence_run_ms = 0;
            self.speech_end = self.speech.len();
            if self.paused_reported {
                self.voiced_since_pause = true;
                events.push(VadEvent::Resumed);
            }
            self.paused_reported = false;
        } else {
            self.silence_run_ms += FRAME_MS;
        }
        let length_ms = (self.speech.len() / SAMPLES_PER_MS) as u64;
        if self.silence_run_ms >= self.config.hangover_ms || length_ms >= self.config.max_segment_ms
        {
            self.close(events);
        } else if self.silence_run_ms >= self.config.pause_ms && !self.paused_reported {
            self.paused_reported = true;
            self.voiced_since_pause = false;
            events.push(VadEvent::Paused {
                audio: self.trimmed(),
            });
        }
    }

    /// The segment with its trailing silence cut to a short tail.
    fn trimmed(&self) -> Vec<i16> {
        let tail = 100 * SAMPLES_PER_MS;
        let end = (self.speech_end + tail).min(self.speech.len());
        self.speech[..end].to_vec()
    }

    fn close(&mut self, events: &mut Vec<VadEvent>) {
        let audio = self.trimmed();
        let extended = !self.paused_reported || self.voiced_since_pause;
        self.in_speech = false;
        self.speech.clear();
        self.preroll.clear();
        self.voiced_run_ms = 0;
        self.silence_run_ms = 0;
        events.push(VadEvent::Ended { audio, extended });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav16k(name: &str) -> Vec<i16> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        crate::audio::wav::read(&path).unwrap().samples
    }

    /// Light white noise from a fixed LCG, at roughly `level` peak.
    fn noise(n: usize, level: i32, seed: u64) -> Vec<i16> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                ((state >> 33) as i32 % (2 * level + 1) - level) as i16
            })
            .collect()
    }

    fn mix(a: &[i16], b: &[i16]) -> Vec<i16> {
        a.iter().zip(b).map(|(x, y)| x.saturating_add(*y)).collect()
    }

    fn segments(samples: &[i16], chunk: usize) -> Vec<VadEvent> {
        let mut seg = Segmenter::new(VadConfig::default());
        let mut events = Vec::new();
        for piece in samples.chunks(chunk) {
            seg.push(piece, &mut events);
        }
        seg.flush(&mut events);
        events
    }

    #[test]
    fn one_sentence_is_one_segment_clean_and_noisy() {
        let speech = wav16k("espeak_es_16k.wav");
        for (label, input) in [
            ("clean", speech.clone()),
            ("noisy", mix(&speech, &noise(speech.len(), 600, 7))),
        ] {
            let events = segments(&input, 320);
            let ended: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    VadEvent::Ended { audio, .. } => Some(audio.len()),
                    _ => None,
                })
                .collect();
            assert_eq!(
                events.iter().filter(|e| **e == VadEvent::Started).count(),
                1,
                "{label}: {events:?}"
            );
            assert_eq!(ended.len(), 1, "{label}");
            // The sentence is ~4.7 s of the 5.5 s file.
            let ms = ended[0] / 16;
            assert!((3_500..=5_400).contains(&ms), "{label}: segment of {ms} ms");
        }
    }

    #[test]
    fn two_sentences_apart_are_two_segments_and_noise_alone_is_none() {
        let speech = wav16k("espeak_es_16k.wav");
        let mut input = speech.clone();
        input.extend(vec![0i16; 16_000 * 2]);
        input.extend(&speech);
        let noisy = mix(&input, &noise(input.len(), 600, 3));
        let events = segments(&noisy, 512);
        let ended = events
            .iter()
            .filter(|e| matches!(e, VadEvent::Ended { .. }))
            .count();
        assert_eq!(ended, 2, "{events:?}");
        assert!(segments(&noise(16_000 * 5, 600, 11), 320).is_empty());
        assert!(segments(&vec![0; 16_000 * 3], 320).is_empty());
    }

    #[test]
    fn pause_then_end_without_more_speech_is_not_extended() {
        let speech = wav16k("espeak_es_16k.wav");
        let events = segments(&speech, 160);
        let paused: Vec<&Vec<i16>> = events
            .iter()
            .filter_map(|e| match e {
                VadEvent::Paused { audio } => Some(audio),
                _ => None,
            })
            .collect();
        let Some(VadEvent::Ended { audio, extended }) = events.last() else {
            panic!("{events:?}");
        };
        assert!(!paused.is_empty());
        assert!(!extended);
        assert_eq!(paused.last().map(|a| a.len()), Some(audio.len()));
    }
}
