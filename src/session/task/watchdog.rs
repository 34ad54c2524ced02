//! The conversation's watchdogs: the one deadline the loop sleeps until,
//! and what happens when it passes (engine stalls, the close grace, silent
//! bytes, the maximum length, idleness).

use tokio::time::Instant;

use super::{Ending, State, after, earliest};
use crate::session::CloseReason;

impl State {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let limits = &self.limits;
        let mut deadline = None;
        if let Some(since) = self.send_waiting_since {
            if !self.stall_counted {
                deadline = earliest(deadline, after(since, limits.engine_send_timeout_ms));
            }
            deadline = earliest(deadline, after(since, limits.uplink_queue_ms));
        }
        if let Some(closing) = &self.closing {
            return earliest(deadline, closing.deadline);
        }
        if let Some(starving) = &self.starving {
            deadline = earliest(deadline, after(starving.since, limits.no_audio_timeout_ms));
        }
        deadline = earliest(deadline, self.ends_at);
        earliest(deadline, after(self.last_activity, limits.idle_timeout_ms))
    }

    pub(super) fn on_timer(&mut self, now: Instant) -> Option<Ending> {
        let limits = self.limits;
        if let Some(since) = self.send_waiting_since {
            if now >= after(since, limits.uplink_queue_ms) {
                let message = format!(
                    "the engine accepted no input for {} ms ({} ms of audio waiting)",
                    now.duration_since(since).as_millis(),
                    self.uplink.queued_ms()
                );
                return Ending::new(CloseReason::EngineStalled, message);
            }
            if !self.stall_counted && now >= after(since, limits.engine_send_timeout_ms) {
                self.stall_counted = true;
                self.counters.add_engine_send_stall();
                let message = format!(
                    "the engine has not accepted input for {} ms",
                    limits.engine_send_timeout_ms
                );
                if let Some(ending) = self.warn("engine_stall", message) {
                    return Some(ending);
                }
            }
        }
        if let Some(closing) = &self.closing {
            if now >= closing.deadline {
                let extra = format!(
                    "the engine did not close within {} ms",
                    limits.close_grace_ms
                );
                return closing.end(Some(extra));
            }
            return None;
        }
        if let Some(starving) = &self.starving
            && now >= after(starving.since, limits.no_audio_timeout_ms)
        {
            let message = format!(
                "no audio decoded from the last {} bytes received over {} ms",
                starving.bytes,
                now.duration_since(starving.since).as_millis()
            );
            return Ending::new(CloseReason::NoAudio, message);
        }
        if now >= self.ends_at {
            return self.begin_close(CloseReason::MaxDuration, now);
        }
        if now >= after(self.last_activity, limits.idle_timeout_ms) {
            let message = format!(
                "no speech or text from the client for {} ms",
                limits.idle_timeout_ms
            );
            return Ending::new(CloseReason::Idle, message);
        }
        None
    }
}
