//! What the engine says and how it reaches the client: events turned into
//! downlink items (latency before a turn's first audio, barge-in clearing
//! queued audio, a fatal error ending the conversation), the memory caps of
//! the downlink, and the hand-over into the client's channel (one item, or
//! a batch of reply audio into an empty channel).

use tokio::sync::mpsc::PermitIterator;
use tokio::time::Instant;

use super::{AUDIO_BATCH_MS, Ending, MAX_DOWNLINK_ITEMS, Phase, State};
use crate::engine::{EngineEvent, ErrorKind};
use crate::session::{ClientOutput, CloseReason, Warning};

impl State {
    pub(super) fn on_event(&mut self, event: Option<EngineEvent>, now: Instant) -> Option<Ending> {
        if let Some(event) = &event {
            self.trace.on_event(event, now);
        }
        let Some(event) = event else {
            self.engine_open = false;
            return match &self.phase {
                Phase::Closing(closing) => closing.end(None),
                Phase::Talking => Ending::new(
                    CloseReason::EngineError,
                    "the engine stopped without closing the conversation",
                ),
            };
        };
        match &event {
            EngineEvent::Closed => {
                self.engine_open = false;
                return match &self.phase {
                    Phase::Closing(closing) => closing.end(None),
                    Phase::Talking => Ending::new(
                        CloseReason::EngineClosed,
                        "the engine closed the conversation",
                    ),
                };
            }
            EngineEvent::SpeechEnded { turn_id } => {
                self.watchdog.activity(now);
                self.speech_ended_at = Some((*turn_id, now));
            }
            EngineEvent::SpeechStarted { .. } | EngineEvent::Transcript { .. } => {
                self.watchdog.activity(now);
            }
            EngineEvent::Audio(_) => {
                self.watchdog.activity(now);
                if let Some((turn_id, ended)) = self.speech_ended_at.take() {
                    let ms = now.duration_since(ended).as_millis();
                    let ms = u64::try_from(ms).unwrap_or(u64::MAX);
                    self.latency_ms.push(ms);
                    if let Some(ending) = self.forward(ClientOutput::Latency { turn_id, ms }, now) {
                        return Some(ending);
                    }
                }
            }
            EngineEvent::TurnEnd { .. } => {
                self.watchdog.activity(now);
                self.turns = self.turns.saturating_add(1);
            }
            EngineEvent::Usage(delta) => self.usage.add(delta),
            EngineEvent::Interrupted { .. } => {
                self.downlink.clear_audio();
                self.counters.add_interruption();
                self.publish_downlink();
            }
            EngineEvent::Error {
                kind: ErrorKind::Fatal,
                message,
            } => {
                let message = message.clone();
                return self
                    .forward(ClientOutput::Event(event), now)
                    .or_else(|| Ending::new(CloseReason::EngineError, message));
            }
            _ => {}
        }
        self.forward(ClientOutput::Event(event), now)
    }

    /// Queues an item for the client; closes a client that lets too much
    /// pile up (how long it lets reply audio wait is the watchdog's).
    pub(super) fn forward(&mut self, output: ClientOutput, now: Instant) -> Option<Ending> {
        if !self.client_open {
            return None;
        }
        self.downlink.push(output, now);
        self.publish_downlink();
        let limit_bytes = self.limits.downlink_max_bytes;
        if self.downlink.queued_bytes() > limit_bytes {
            let message = format!(
                "the client is not reading: {} ms of reply audio waiting, over the {limit_bytes}-byte limit",
                self.downlink.queued_ms()
            );
            return Ending::new(CloseReason::SlowClient, message);
        }
        if self.downlink.len() > MAX_DOWNLINK_ITEMS {
            let message = format!(
                "the client is not reading: {} messages waiting",
                self.downlink.len()
            );
            return Ending::new(CloseReason::SlowClient, message);
        }
        None
    }

    /// Hands the client what its free slots take: one item, or, when the
    /// channel was empty and reply audio is next, a batch of up to
    /// [`AUDIO_BATCH_MS`] of it. The last free slot stays for `Closed`.
    pub(super) fn hand_over(&mut self, mut permits: PermitIterator<'_, ClientOutput>) {
        let mut audio_us = 0;
        while permits.len() > 1 {
            let next_us = self.downlink.front_audio_us();
            if audio_us > 0 && (next_us == 0 || audio_us + next_us > AUDIO_BATCH_MS * 1000) {
                break;
            }
            let (Some(permit), Some(item)) = (permits.next(), self.downlink.pop()) else {
                break;
            };
            permit.send(item);
            if next_us == 0 {
                break;
            }
            audio_us += next_us;
        }
        self.publish_downlink();
    }

    pub(super) fn warn(&mut self, code: Warning, message: String, now: Instant) -> Option<Ending> {
        self.forward(ClientOutput::Warning { code, message }, now)
    }
}
