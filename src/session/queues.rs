//! The two bounded queues of a conversation, accounted in time: the uplink
//! (user audio and messages waiting for the engine, oldest audio dropped
//! first) and the downlink (events waiting for the client, reply audio
//! cleared at once on barge-in, each audio item with the time it was
//! queued, by which a slow client is judged).

use std::collections::VecDeque;

use tokio::time::Instant;

use super::ClientOutput;
use crate::audio::ENGINE_RATE_HZ;
use crate::engine::{EngineEvent, EngineInput};

/// Input samples per millisecond (16 kHz).
pub(super) const SAMPLES_PER_MS: u64 = ENGINE_RATE_HZ as u64 / 1000;
/// Longest frame sent to the engine: 40 ms at 16 kHz.
pub(super) const FRAME_SAMPLES: usize = 40 * SAMPLES_PER_MS as usize;

/// What waits to go to the engine, in order: audio frames of at most 40 ms,
/// texts, tool results and the final Close.
#[derive(Debug)]
pub(super) struct Uplink {
    items: VecDeque<EngineInput>,
    queued_samples: u64,
    limit_samples: u64,
    /// Queued items that are not audio, and their bytes.
    messages: usize,
    message_bytes: usize,
    dropped_samples: u64,
    /// Whether audio was dropped since the queue last ran empty.
    overflowing: bool,
}

impl Uplink {
    pub(super) fn new(limit_ms: u64) -> Self {
        Self {
            items: VecDeque::new(),
            queued_samples: 0,
            limit_samples: limit_ms.saturating_mul(SAMPLES_PER_MS),
            messages: 0,
            message_bytes: 0,
            dropped_samples: 0,
            overflowing: false,
        }
    }

    /// Queues 16 kHz PCM in frames of at most 40 ms (topping up the last
    /// queued frame first), then drops the oldest frames past the limit.
    /// Returns true when this starts an overflow episode.
    pub(super) fn push_pcm(&mut self, mut pcm: &[i16]) -> bool {
        self.queued_samples += pcm.len() as u64;
        if let Some(EngineInput::Audio(last)) = self.items.back_mut() {
            let take = FRAME_SAMPLES.saturating_sub(last.len()).min(pcm.len());
            last.extend_from_slice(&pcm[..take]);
            pcm = &pcm[take..];
        }
        // Each frame is allocated once, whole: a client's 20 ms frame tops
        // up the 40 ms frame the one before it started, without growing it.
        self.items.extend(pcm.chunks(FRAME_SAMPLES).map(|chunk| {
            let mut frame = Vec::with_capacity(FRAME_SAMPLES);
            frame.extend_from_slice(chunk);
            EngineInput::Audio(frame)
        }));
        let mut dropped = false;
        while self.queued_samples > self.limit_samples {
            let Some(oldest) = self
                .items
                .iter()
                .position(|item| matches!(item, EngineInput::Audio(_)))
            else {
                break;
            };
            if let Some(EngineInput::Audio(frame)) = self.items.remove(oldest) {
                self.queued_samples -= frame.len() as u64;
                self.dropped_samples += frame.len() as u64;
                dropped = true;
            }
        }
        let started = dropped && !self.overflowing;
        self.overflowing |= dropped;
        started
    }

    /// Queues a text, tool result or Close behind the audio already queued.
    pub(super) fn push_message(&mut self, input: EngineInput) {
        self.messages += 1;
        self.message_bytes += message_bytes(&input);
        self.items.push_back(input);
    }

    pub(super) fn pop(&mut self) -> Option<EngineInput> {
        let item = self.items.pop_front()?;
        match &item {
            EngineInput::Audio(frame) => self.queued_samples -= frame.len() as u64,
            other => {
                self.messages -= 1;
                self.message_bytes -= message_bytes(other);
            }
        }
        if self.items.is_empty() {
            self.overflowing = false;
        }
        Some(item)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn messages(&self) -> usize {
        self.messages
    }

    pub(super) fn message_bytes(&self) -> usize {
        self.message_bytes
    }

    pub(super) fn queued_ms(&self) -> u64 {
        self.queued_samples / SAMPLES_PER_MS
    }

    pub(super) fn dropped_ms(&self) -> u64 {
        self.dropped_samples / SAMPLES_PER_MS
    }
}

/// The bytes a queued text or tool result holds (its text, or its id plus
/// a rough size of its JSON).
fn message_bytes(input: &EngineInput) -> usize {
    match input {
        EngineInput::Text(text) => text.len(),
        EngineInput::ToolResult { id, json } => id.len() + super::json_size_bytes(json),
        EngineInput::Audio(_) | EngineInput::Close => 0,
    }
}

/// What waits to go to the client, in order.
#[derive(Debug, Default)]
pub(super) struct Downlink {
    items: VecDeque<ClientOutput>,
    /// When each queued reply audio item was queued, oldest first.
    audio_queued_at: VecDeque<Instant>,
    /// Reply audio queued, in microseconds and in bytes of samples.
    queued_us: u64,
    queued_bytes: usize,
    cleared_us: u64,
    sent_us: u64,
}

fn audio_us(output: &ClientOutput) -> Option<u64> {
    match output {
        ClientOutput::Event(EngineEvent::Audio(pcm)) => {
            Some(pcm.samples.len() as u64 * 1_000_000 / u64::from(pcm.rate_hz.max(1)))
        }
        _ => None,
    }
}

fn audio_bytes(output: &ClientOutput) -> usize {
    match output {
        ClientOutput::Event(EngineEvent::Audio(pcm)) => 2 * pcm.samples.len(),
        _ => 0,
    }
}

impl Downlink {
    pub(super) fn push(&mut self, output: ClientOutput, now: Instant) {
        if let Some(us) = audio_us(&output) {
            self.queued_us += us;
            self.queued_bytes += audio_bytes(&output);
            self.audio_queued_at.push_back(now);
        }
        self.items.push_back(output);
    }

    pub(super) fn front_is_audio(&self) -> bool {
        self.items.front().and_then(audio_us).is_some()
    }

    /// The front item's reply audio, in microseconds (0 for other items).
    pub(super) fn front_audio_us(&self) -> u64 {
        self.items.front().and_then(audio_us).unwrap_or(0)
    }

    pub(super) fn pop(&mut self) -> Option<ClientOutput> {
        let item = self.items.pop_front()?;
        if let Some(us) = audio_us(&item) {
            self.queued_us -= us;
            self.queued_bytes -= audio_bytes(&item);
            self.sent_us += us;
            self.audio_queued_at.pop_front();
        }
        Some(item)
    }

    /// Barge-in: removes every queued reply audio item at once, keeping the
    /// other items in order.
    pub(super) fn clear_audio(&mut self) {
        self.items.retain(|item| audio_us(item).is_none());
        self.cleared_us += self.queued_us;
        self.queued_us = 0;
        self.queued_bytes = 0;
        self.audio_queued_at.clear();
    }

    /// Drops everything (the client is gone or too slow).
    pub(super) fn clear(&mut self) {
        self.items.clear();
        self.queued_us = 0;
        self.queued_bytes = 0;
        self.audio_queued_at.clear();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// When the oldest reply audio still queued was queued.
    pub(super) fn oldest_audio(&self) -> Option<Instant> {
        self.audio_queued_at.front().copied()
    }

    pub(super) fn queued_ms(&self) -> u64 {
        self.queued_us / 1000
    }

    pub(super) fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    pub(super) fn cleared_ms(&self) -> u64 {
        self.cleared_us / 1000
    }

    pub(super) fn sent_ms(&self) -> u64 {
        self.sent_us / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Pcm;

    fn frames(uplink: &mut Uplink) -> Vec<EngineInput> {
        std::iter::from_fn(|| uplink.pop()).collect()
    }

    #[test]
    fn uplink_cuts_40_ms_frames_and_tops_up_the_last_one() {
        let mut uplink = Uplink::new(5_000);
        assert!(!uplink.push_pcm(&[1; 1000]));
        assert!(!uplink.push_pcm(&[2; 300]));
        assert_eq!(uplink.queued_ms(), 81);
        let lengths: Vec<_> = frames(&mut uplink)
            .iter()
            .map(|item| match item {
                EngineInput::Audio(frame) => frame.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(lengths, [640, 640, 20]);
        assert_eq!(uplink.queued_ms(), 0);
    }

    #[test]
    fn uplink_drops_oldest_audio_but_keeps_messages() {
        let mut uplink = Uplink::new(80);
        uplink.push_pcm(&[1; 640]);
        uplink.push_message(EngineInput::Text("a".into()));
        uplink.push_pcm(&[2; 640]);
        assert!(
            uplink.push_pcm(&[3; 640]),
            "the first drop starts an episode"
        );
        assert!(
            !uplink.push_pcm(&[4; 640]),
            "later drops are the same episode"
        );
        assert_eq!((uplink.queued_ms(), uplink.dropped_ms()), (80, 80));
        assert_eq!(uplink.messages(), 1);
        let want = [
            EngineInput::Text("a".into()),
            EngineInput::Audio(vec![3; 640]),
            EngineInput::Audio(vec![4; 640]),
        ];
        assert_eq!(frames(&mut uplink), want);
        assert_eq!(uplink.messages(), 0);
        assert!(
            uplink.push_pcm(&[5; 4000]),
            "an empty queue ends the episode"
        );
    }

    fn audio(ms: u64) -> ClientOutput {
        ClientOutput::Event(EngineEvent::Audio(Pcm {
            rate_hz: 24_000,
            samples: vec![0; (ms * 24) as usize],
        }))
    }

    #[test]
    fn downlink_barge_in_clears_audio_and_keeps_other_items() {
        let mut downlink = Downlink::default();
        let now = Instant::now();
        let end = ClientOutput::Event(EngineEvent::SpeechEnded { turn_id: 1 });
        downlink.push(end.clone(), now);
        downlink.push(audio(40), now);
        downlink.push(
            ClientOutput::Event(EngineEvent::Rotated {
                generation: 2,
                gap_ms: 1.0,
            }),
            now,
        );
        let later = now + std::time::Duration::from_millis(5);
        downlink.push(audio(60), later);
        assert_eq!(downlink.queued_ms(), 100);
        assert_eq!(downlink.queued_bytes(), 2 * 100 * 24);
        assert_eq!(downlink.oldest_audio(), Some(now));
        assert!(!downlink.front_is_audio());
        assert_eq!(downlink.pop(), Some(end));
        assert!(downlink.front_is_audio());
        assert_eq!(downlink.pop(), Some(audio(40)));
        assert_eq!((downlink.queued_ms(), downlink.sent_ms()), (60, 40));
        assert_eq!(downlink.oldest_audio(), Some(later), "the next oldest");
        downlink.push(audio(20), later);
        downlink.clear_audio();
        assert_eq!((downlink.queued_ms(), downlink.cleared_ms()), (0, 80));
        assert_eq!(downlink.len(), 1);
        assert_eq!(
            (downlink.oldest_audio(), downlink.queued_bytes()),
            (None, 0)
        );
        let rotated = ClientOutput::Event(EngineEvent::Rotated {
            generation: 2,
            gap_ms: 1.0,
        });
        assert_eq!(downlink.pop(), Some(rotated));
        assert!(downlink.is_empty());
    }
}
