//! The conversation's clocks in one place: what the client and the engine
//! last did, the one deadline the loop sleeps until, and the alarm that
//! passing it raises (an engine that takes nothing, the close grace, bytes
//! that decode to nothing, the maximum length, idleness, a client that
//! lets reply audio wait).

use std::time::Duration;

use tokio::time::Instant;

use super::{Ending, Phase, State};
use crate::session::{CloseReason, SessionLimits, Warning};

/// Every clock of one conversation.
#[derive(Debug)]
pub(super) struct Watchdog {
    limits: SessionLimits,
    /// The last speech, typed text, tool result or reply: what keeps a
    /// conversation from being idle (bytes alone do not).
    last_activity: Instant,
    /// When the conversation reaches its maximum length.
    ends_at: Instant,
    /// Client audio bytes that have not produced any PCM yet.
    starving: Option<Starving>,
    /// The head of the uplink waiting for the engine.
    send_wait: Option<SendWait>,
    /// When the close grace period ends, once closing.
    close_by: Option<Instant>,
}

#[derive(Debug)]
struct Starving {
    since: Instant,
    /// When the last of those bytes came.
    last: Instant,
    bytes: u64,
    /// The stream decoded audio before these bytes.
    proven: bool,
}

/// Bytes of a stream that decoded audio before count against
/// `no_audio_timeout_ms` only while they keep coming: one that pauses after
/// a piece its decoder holds (a resampler's partial block, half a page) is
/// not starving. A stream that never decoded anything gets no such grace.
const STILL_SENDING: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct SendWait {
    since: Instant,
    /// This wait was already counted (and reported) as a stall.
    counted: bool,
}

/// What a passed deadline means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alarm {
    /// The oldest reply audio waited `downlink_queue_ms` for the client.
    SlowClient { waited: Duration },
    /// The engine accepted nothing for `uplink_queue_ms`: close.
    EngineStalled { waited: Duration },
    /// The engine accepted nothing for `engine_send_timeout_ms`: one stall,
    /// counted and reported once per wait.
    EngineSlow,
    /// The engine did not close within the grace period.
    CloseGrace,
    /// Audio bytes decoded to no audio for `no_audio_timeout_ms`.
    NoAudio { bytes: u64, over: Duration },
    /// The conversation reached its maximum length.
    MaxDuration,
    /// No speech, text or reply for `idle_timeout_ms`.
    Idle,
}

pub(super) fn after(start: Instant, ms: u64) -> Instant {
    // Limits are plain integers; an absurd one means "never".
    start
        .checked_add(Duration::from_millis(ms))
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 86_400))
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Watchdog {
    pub(super) fn new(limits: SessionLimits, now: Instant) -> Self {
        Self {
            limits,
            last_activity: now,
            ends_at: after(now, limits.max_duration_ms),
            starving: None,
            send_wait: None,
            close_by: None,
        }
    }

    /// Speech, text, a tool result or a reply: the conversation is alive.
    pub(super) fn activity(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// Audio bytes arrived and decoded to nothing (yet).
    pub(super) fn starving(&mut self, now: Instant, bytes: u64, proven: bool) {
        let starving = self.starving.get_or_insert(Starving {
            since: now,
            last: now,
            bytes: 0,
            proven,
        });
        starving.last = now;
        starving.bytes += bytes;
    }

    /// Audio came out of the decoder.
    pub(super) fn fed(&mut self) {
        self.starving = None;
    }

    /// Whether the uplink holds something: a wait begins when it stops
    /// being empty and ends when it is empty again.
    pub(super) fn uplink(&mut self, empty: bool, now: Instant) {
        if empty {
            self.send_wait = None;
        } else if self.send_wait.is_none() {
            self.send_wait = Some(SendWait {
                since: now,
                counted: false,
            });
        }
    }

    /// The engine took something: a new wait (and stall episode) begins.
    pub(super) fn engine_took(&mut self) {
        self.send_wait = None;
    }

    /// The close grace period starts.
    pub(super) fn closing(&mut self, now: Instant) {
        self.close_by = Some(after(now, self.limits.close_grace_ms));
    }

    /// When the loop must wake next, given when the oldest reply audio
    /// still waiting for the client was queued.
    pub(super) fn next_deadline(&self, oldest_reply: Option<Instant>) -> Option<Instant> {
        let limits = &self.limits;
        let mut deadline = None;
        if let Some(queued) = oldest_reply {
            deadline = earliest(deadline, after(queued, limits.downlink_queue_ms));
        }
        if let Some(wait) = &self.send_wait {
            if !wait.counted {
                deadline = earliest(deadline, after(wait.since, limits.engine_send_timeout_ms));
            }
            deadline = earliest(deadline, after(wait.since, limits.uplink_queue_ms));
        }
        if let Some(close_by) = self.close_by {
            return earliest(deadline, close_by);
        }
        if let Some(starving) = &self.starving {
            deadline = earliest(deadline, after(starving.since, limits.no_audio_timeout_ms));
        }
        deadline = earliest(deadline, self.ends_at);
        earliest(deadline, after(self.last_activity, limits.idle_timeout_ms))
    }

    /// The first alarm due at `now`, if any. An `EngineSlow` is raised once
    /// per wait; the others stand until the conversation acts on them.
    pub(super) fn check(&mut self, now: Instant, oldest_reply: Option<Instant>) -> Option<Alarm> {
        let limits = self.limits;
        if let Some(queued) = oldest_reply
            && now >= after(queued, limits.downlink_queue_ms)
        {
            let waited = now.duration_since(queued);
            return Some(Alarm::SlowClient { waited });
        }
        if let Some(wait) = &mut self.send_wait {
            if now >= after(wait.since, limits.uplink_queue_ms) {
                let waited = now.duration_since(wait.since);
                return Some(Alarm::EngineStalled { waited });
            }
            if !wait.counted && now >= after(wait.since, limits.engine_send_timeout_ms) {
                wait.counted = true;
                return Some(Alarm::EngineSlow);
            }
        }
        if let Some(close_by) = self.close_by {
            return (now >= close_by).then_some(Alarm::CloseGrace);
        }
        if let Some(starving) = &self.starving
            && now >= after(starving.since, limits.no_audio_timeout_ms)
        {
            if starving.proven && now.duration_since(starving.last) > STILL_SENDING {
                self.starving = None;
            } else {
                let over = now.duration_since(starving.since);
                let bytes = starving.bytes;
                return Some(Alarm::NoAudio { bytes, over });
            }
        }
        if now >= self.ends_at {
            return Some(Alarm::MaxDuration);
        }
        if now >= after(self.last_activity, limits.idle_timeout_ms) {
            return Some(Alarm::Idle);
        }
        None
    }
}

impl State {
    /// A watchdog deadline passed.
    pub(super) fn on_timer(&mut self, now: Instant) -> Option<Ending> {
        let limits = self.limits;
        let alarm = self.watchdog.check(now, self.downlink.oldest_audio())?;
        match alarm {
            Alarm::SlowClient { waited } => {
                let message = format!(
                    "the client is not reading: reply audio waited {} ms (limit {} ms), {} ms of it waiting",
                    waited.as_millis(),
                    limits.downlink_queue_ms,
                    self.downlink.queued_ms()
                );
                Ending::new(CloseReason::SlowClient, message)
            }
            Alarm::EngineStalled { waited } => {
                let message = format!(
                    "the engine accepted no input for {} ms ({} ms of audio waiting)",
                    waited.as_millis(),
                    self.uplink.queued_ms()
                );
                Ending::new(CloseReason::EngineStalled, message)
            }
            Alarm::EngineSlow => {
                self.counters.add_engine_send_stall();
                let message = format!(
                    "the engine has not accepted input for {} ms",
                    limits.engine_send_timeout_ms
                );
                self.warn(Warning::EngineStall, message, now)
            }
            Alarm::CloseGrace => {
                let extra = format!(
                    "the engine did not close within {} ms",
                    limits.close_grace_ms
                );
                match &self.phase {
                    Phase::Closing(closing) => closing.end(Some(extra)),
                    Phase::Talking => Ending::new(CloseReason::EngineError, extra),
                }
            }
            Alarm::NoAudio { bytes, over } => {
                let message = format!(
                    "no audio decoded from the last {bytes} bytes received over {} ms",
                    over.as_millis()
                );
                Ending::new(CloseReason::NoAudio, message)
            }
            Alarm::MaxDuration => self.begin_close(CloseReason::MaxDuration, now),
            Alarm::Idle => {
                let message = format!(
                    "no speech or text from the client for {} ms",
                    limits.idle_timeout_ms
                );
                Ending::new(CloseReason::Idle, message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            engine_send_timeout_ms: 200,
            uplink_queue_ms: 5_000,
            downlink_queue_ms: 10_000,
            no_audio_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            close_grace_ms: 1_000,
            max_duration_ms: 120_000,
            ..SessionLimits::default()
        }
    }

    fn ms(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn an_engine_wait_warns_once_then_stalls() {
        let t0 = Instant::now();
        let mut watchdog = Watchdog::new(limits(), t0);
        watchdog.uplink(false, t0);
        assert_eq!(watchdog.next_deadline(None), Some(ms(t0, 200)));
        assert_eq!(watchdog.check(ms(t0, 199), None), None);
        assert_eq!(watchdog.check(ms(t0, 200), None), Some(Alarm::EngineSlow));
        assert_eq!(watchdog.check(ms(t0, 201), None), None, "once per wait");
        assert_eq!(watchdog.next_deadline(None), Some(ms(t0, 5_000)));
        let stalled = watchdog.check(ms(t0, 5_000), None);
        let waited = Duration::from_secs(5);
        assert_eq!(stalled, Some(Alarm::EngineStalled { waited }));
        // The engine takes the frame: a new wait is a new episode.
        watchdog.engine_took();
        watchdog.uplink(false, ms(t0, 5_001));
        assert_eq!(watchdog.next_deadline(None), Some(ms(t0, 5_201)));
    }

    #[test]
    fn reply_audio_is_judged_by_how_long_it_waited() {
        let t0 = Instant::now();
        let mut watchdog = Watchdog::new(limits(), t0);
        let queued = ms(t0, 3_000);
        assert_eq!(watchdog.next_deadline(Some(queued)), Some(ms(t0, 13_000)));
        assert_eq!(watchdog.check(ms(t0, 12_999), Some(queued)), None);
        let waited = Duration::from_secs(10);
        assert_eq!(
            watchdog.check(ms(t0, 13_000), Some(queued)),
            Some(Alarm::SlowClient { waited })
        );
    }

    #[test]
    fn closing_watches_only_the_grace_and_the_queues() {
        let t0 = Instant::now();
        let mut watchdog = Watchdog::new(limits(), t0);
        watchdog.starving(t0, 100, false);
        watchdog.closing(ms(t0, 10));
        assert_eq!(watchdog.next_deadline(None), Some(ms(t0, 1_010)));
        assert_eq!(watchdog.check(ms(t0, 1_009), None), None);
        assert_eq!(watchdog.check(ms(t0, 1_010), None), Some(Alarm::CloseGrace));
    }

    #[test]
    fn a_stream_that_pauses_on_a_held_piece_is_not_starving() {
        let t0 = Instant::now();
        let mut watchdog = Watchdog::new(limits(), t0);
        // The last piece before a pause decoded to nothing yet.
        watchdog.starving(t0, 40, true);
        assert_eq!(watchdog.check(ms(t0, 5_000), None), None);
        assert_eq!(watchdog.next_deadline(None), Some(ms(t0, 60_000)));
        // Bytes that keep coming and never decode still end it.
        for at in (6_000..=11_000).step_by(500) {
            watchdog.starving(ms(t0, at), 40, true);
        }
        assert!(matches!(
            watchdog.check(ms(t0, 11_000), None),
            Some(Alarm::NoAudio { bytes: 440, .. })
        ));
    }

    #[test]
    fn silence_idleness_and_the_maximum_length() {
        let t0 = Instant::now();
        let mut watchdog = Watchdog::new(limits(), t0);
        watchdog.starving(t0, 100, false);
        watchdog.starving(ms(t0, 1_000), 50, false);
        let over = Duration::from_secs(5);
        assert_eq!(
            watchdog.check(ms(t0, 5_000), None),
            Some(Alarm::NoAudio { bytes: 150, over })
        );
        watchdog.fed();
        assert_eq!(watchdog.check(ms(t0, 59_999), None), None);
        assert_eq!(watchdog.check(ms(t0, 60_000), None), Some(Alarm::Idle));
        watchdog.activity(ms(t0, 100_000));
        assert_eq!(watchdog.next_deadline(None), Some(ms(t0, 120_000)));
        assert_eq!(
            watchdog.check(ms(t0, 120_000), None),
            Some(Alarm::MaxDuration)
        );
    }
}
