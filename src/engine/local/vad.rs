//! Voice activity detection: 16 kHz PCM in, speech segments out.
//!
//! earshot scores 16 ms frames; a segment opens after a few voiced frames
//! (with pre-roll so the first syllable is kept) and closes after a hangover
//! of silence. A shorter pause first yields `Paused`, so recognition can
//! start early and be kept if the speaker does not resume.
//!
//! earshot's score falls below the threshold only 110–210 ms after the last
//! energetic frame of a phrase. The frames' own energy ends speech sooner: a
//! frame near the noise floor and far below the segment's loudest frame is
//! quiet, and a quiet frame counts as silence whatever its score.

use std::collections::VecDeque;

/// earshot's frame: 256 samples = 16 ms at 16 kHz.
const FRAME_SAMPLES: usize = 256;
const FRAME_MS: u64 = 16;
const SAMPLES_PER_MS: usize = crate::audio::ENGINE_RATE_HZ as usize / 1000;
/// The detector adapts to the noise floor over its first frames and scores
/// a sudden noise onset as voice: no segment may open in this time.
const WARM_UP_MS: u64 = 160;
/// Audio kept after the last speaking frame when a segment is cut.
const TAIL_MS: usize = 150;
/// Silence before the turn-end model's verdict may close a segment: a
/// phrase's pause at a comma lasts ~300 ms, and recognition, started at the
/// first pause, takes longer than this anyway.
const END_MIN_SILENCE_MS: u64 = 350;
/// A quiet frame is also this far (power, 25 dB) below the segment's loudest.
const BELOW_PEAK: f32 = 0.003_162;
/// Outside speech the noise floor follows louder frames by this share of the
/// difference each frame (about a second to settle); quieter frames lower it
/// at once, in speech too.
const FLOOR_RISE: f32 = 0.05;
/// The floor never goes under the power of a one-step signal, so digital
/// silence is quiet and the ratio stays finite.
const MIN_FLOOR: f32 = 1.0;

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
    /// A frame whose power is less than this many dB over the noise floor
    /// (and 25 dB under the segment's loudest frame) counts as silence even
    /// when the detector still scores it voiced; 0 turns this off.
    pub quiet_db: f32,
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
            quiet_db: 9.0,
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
    /// Length of `speech` at the last speaking frame.
    speech_end: usize,
    /// Length of the audio the last `Paused` carried.
    paused_len: usize,
    paused_reported: bool,
    voiced_since_pause: bool,
    /// The turn-end model called the pause the end, before
    /// [`END_MIN_SILENCE_MS`]: the segment closes when the silence gets there.
    end_requested: bool,
    /// Audio seen, capped at the warm-up length.
    seen_ms: u64,
    /// Noise floor: mean square of the quietest recent frames.
    floor: f32,
    /// Mean square of the segment's loudest voiced frame.
    peak: f32,
    /// `quiet_db` as a power ratio (0: off).
    quiet_ratio: f32,
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
            paused_len: 0,
            paused_reported: false,
            voiced_since_pause: false,
            end_requested: false,
            seen_ms: 0,
            floor: f32::INFINITY,
            peak: 0.0,
            quiet_ratio: if config.quiet_db > 0.0 {
                10f32.powf(config.quiet_db / 10.0)
            } else {
                0.0
            },
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
    /// the segment closes as the hangover would have closed it, unless
    /// speech went on since; now if the silence has lasted
    /// [`END_MIN_SILENCE_MS`] (or the hangover, if shorter), else when it
    /// has. Returns whether it closed now.
    pub(super) fn end_at_pause(&mut self, events: &mut Vec<VadEvent>) -> bool {
        if self.in_speech && self.paused_reported && !self.voiced_since_pause {
            if self.silence_run_ms >= self.end_min_silence_ms() {
                self.close(events);
                return true;
            }
            self.end_requested = true;
        }
        false
    }

    fn end_min_silence_ms(&self) -> u64 {
        END_MIN_SILENCE_MS.min(self.config.hangover_ms)
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
        let power = mean_square(frame);
        if power < self.floor {
            self.floor = power.max(MIN_FLOOR);
        } else if !self.in_speech {
            self.floor += (power - self.floor) * FLOOR_RISE;
        }
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
                self.peak = power;
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
            self.peak = self.peak.max(power);
        }
        if voiced && !self.quiet(power) {
            self.silence_run_ms = 0;
            self.speech_end = self.speech.len();
            if self.paused_reported {
                self.voiced_since_pause = true;
                events.push(VadEvent::Resumed);
            }
            self.paused_reported = false;
            self.end_requested = false;
        } else {
            self.silence_run_ms += FRAME_MS;
        }
        let length_ms = (self.speech.len() / SAMPLES_PER_MS) as u64;
        let end_due = self.end_requested && self.silence_run_ms >= self.end_min_silence_ms();
        if end_due
            || self.silence_run_ms >= self.config.hangover_ms
            || length_ms >= self.config.max_segment_ms
        {
            self.close(events);
        } else if self.silence_run_ms >= self.config.pause_ms && !self.paused_reported {
            self.paused_reported = true;
            self.voiced_since_pause = false;
            let audio = self.trimmed();
            self.paused_len = audio.len();
            events.push(VadEvent::Paused { audio });
        }
    }

    /// Whether a frame of this power is quiet: near the noise floor and far
    /// below the segment's loudest frame.
    fn quiet(&self, power: f32) -> bool {
        power < self.floor * self.quiet_ratio && power < self.peak * BELOW_PEAK
    }

    /// The segment with its trailing silence cut to a short tail.
    fn trimmed(&self) -> Vec<i16> {
        let end = (self.speech_end + TAIL_MS * SAMPLES_PER_MS).min(self.speech.len());
        self.speech[..end].to_vec()
    }

    fn close(&mut self, events: &mut Vec<VadEvent>) {
        let extended = !self.paused_reported || self.voiced_since_pause;
        // Not extended: exactly the audio the pause carried, so recognition
        // started on it stands.
        let audio = if extended {
            self.trimmed()
        } else {
            self.speech[..self.paused_len].to_vec()
        };
        self.in_speech = false;
        self.end_requested = false;
        self.speech.clear();
        self.preroll.clear();
        self.voiced_run_ms = 0;
        self.silence_run_ms = 0;
        events.push(VadEvent::Ended { audio, extended });
    }
}

/// Mean square of a frame's samples.
fn mean_square(frame: &[i16]) -> f32 {
    let sum: i64 = frame.iter().map(|&s| i64::from(s) * i64::from(s)).sum();
    sum as f32 / frame.len().max(1) as f32
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

    /// Where (in ms of input) each `Paused` and the `Ended` came.
    fn event_times(samples: &[i16], quiet_db: f32) -> (Vec<u64>, Vec<u64>, Vec<VadEvent>) {
        let mut seg = Segmenter::new(VadConfig {
            quiet_db,
            ..VadConfig::default()
        });
        let (mut paused, mut ended, mut all) = (Vec::new(), Vec::new(), Vec::new());
        let mut events = Vec::new();
        for (i, piece) in samples.chunks(FRAME_SAMPLES).enumerate() {
            seg.push(piece, &mut events);
            let at = ((i + 1) * FRAME_SAMPLES / SAMPLES_PER_MS) as u64;
            for e in events.drain(..) {
                match e {
                    VadEvent::Paused { .. } => paused.push(at),
                    VadEvent::Ended { .. } => ended.push(at),
                    _ => {}
                }
                all.push(e);
            }
        }
        seg.flush(&mut all);
        (paused, ended, all)
    }

    #[test]
    fn quiet_frames_report_the_pause_sooner_than_the_detector_alone() {
        let mut speech = wav16k("espeak_es_16k.wav");
        speech.extend(vec![0i16; 16_000]);
        let noisy = mix(&speech, &noise(speech.len(), 400, 5));
        let (detector_paused, detector_ended, detector_events) = event_times(&noisy, 0.0);
        let (paused, ended, events) = event_times(&noisy, 9.0);
        let (Some(&before), Some(&after)) = (detector_paused.last(), paused.last()) else {
            panic!("no pause: {detector_events:?} / {events:?}");
        };
        // The detector's score lags the end of speech by 110–210 ms.
        assert!(
            after + 80 <= before,
            "pause at {after} ms, detector alone {before} ms"
        );
        assert_eq!(ended.len(), 1, "{events:?}");
        assert_eq!(detector_ended.len(), 1);
        assert!(ended[0] + 80 <= detector_ended[0]);
        // The turn's audio is the pause's, so recognition started there stands.
        let paused_audio = events.iter().rev().find_map(|e| match e {
            VadEvent::Paused { audio } => Some(audio.len()),
            _ => None,
        });
        let Some(VadEvent::Ended { audio, extended }) = events.last() else {
            panic!("{events:?}");
        };
        assert!(!extended);
        assert_eq!(paused_audio, Some(audio.len()));
        // Cut after the speech, not inside it: ~4.7 s of the file is speech.
        assert!(
            (4_300..=5_400).contains(&(audio.len() / 16)),
            "{} ms",
            audio.len() / 16
        );
    }

    #[test]
    fn a_soft_voice_over_a_quiet_room_is_still_one_whole_segment() {
        let speech: Vec<i16> = wav16k("espeak_es_16k.wav").iter().map(|s| s / 10).collect();
        let input = mix(&speech, &noise(speech.len(), 40, 9));
        let (_, _, events) = event_times(&input, 9.0);
        let ended: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                VadEvent::Ended { audio, .. } => Some(audio.len() / 16),
                _ => None,
            })
            .collect();
        assert_eq!(ended.len(), 1, "{events:?}");
        assert!(
            (3_500..=5_400).contains(&ended[0]),
            "segment of {} ms",
            ended[0]
        );
    }

    /// Feeds `input`, asking for the end of the turn at every pause after
    /// `from_ms`: each segment's audio length and when it closed, in ms
    /// after the last pause before it; and how many times the end was asked.
    fn ended_after_verdicts(input: &[i16], from_ms: usize) -> (Vec<(usize, usize)>, usize) {
        let mut seg = Segmenter::new(VadConfig::default());
        let (mut events, mut out) = (Vec::new(), Vec::new());
        let (mut paused_at, mut asked) = (0, 0);
        for (i, frame) in input.chunks(FRAME_SAMPLES).enumerate() {
            seg.push(frame, &mut events);
            let at = (i + 1) * FRAME_SAMPLES / SAMPLES_PER_MS;
            for e in std::mem::take(&mut events) {
                match e {
                    VadEvent::Paused { .. } if at > from_ms => {
                        paused_at = at;
                        asked += 1;
                        let mut now = Vec::new();
                        assert!(!seg.end_at_pause(&mut now), "closed at once: {now:?}");
                    }
                    VadEvent::Ended { audio, .. } => out.push((audio.len() / 16, at - paused_at)),
                    _ => {}
                }
            }
        }
        (out, asked)
    }

    #[test]
    fn a_turn_end_verdict_closes_only_after_enough_silence_and_not_if_speech_goes_on() {
        let mut speech = wav16k("espeak_es_16k.wav");
        // The file's own silence after the sentence cut off.
        let end = speech.iter().rposition(|s| s.unsigned_abs() > 200).unwrap();
        speech.truncate(end + 1);
        let quiet = |ms: usize| vec![0i16; 16 * ms];
        let with_noise = |a: Vec<i16>| mix(&a, &noise(a.len(), 400, 13));
        // The pause comes after 150 ms of silence; the verdict closes the
        // segment when the silence reaches 350 ms, before the 600 ms hangover.
        let mut input = speech.clone();
        input.extend(quiet(1_000));
        let (ended, _) = ended_after_verdicts(&with_noise(input), 4_000);
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert!(
            (180..=240).contains(&ended[0].1),
            "closed {} ms after the pause",
            ended[0].1
        );
        // Speech going on within 350 ms of silence (the sentence's faint
        // end and its start again): one segment holding both.
        let mut input = speech.clone();
        input.extend(&speech);
        input.extend(quiet(1_000));
        let (ended, asked) = ended_after_verdicts(&with_noise(input), 4_000);
        assert!(
            asked >= 2,
            "the end was asked at the sentences' junction too"
        );
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert!(ended[0].0 > speech.len() / 16 * 2, "{ended:?}");
    }
}
