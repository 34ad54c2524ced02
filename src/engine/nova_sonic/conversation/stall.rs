//! The stall watch: a stream is stalled when a reply is due (the user's
//! turn was heard, text or a tool result was sent) and nothing came for
//! the stall timeout, or when it has refused user audio for that long.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(super) struct StallWatch {
    timeout: Duration,
    /// Since when a reply is due.
    reply_due: Option<Instant>,
    /// When the service last sent an event.
    last_output: Instant,
    /// Since when the current stream refuses audio.
    refusing_since: Option<Instant>,
}

impl StallWatch {
    pub(super) fn new(timeout: Duration, now: Instant) -> Self {
        Self {
            timeout,
            reply_due: None,
            last_output: now,
            refusing_since: None,
        }
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A reply is due from `now` on.
    pub(super) fn expect_reply(&mut self, now: Instant) {
        self.reply_due = Some(now);
    }

    /// The reply began (or was given up on).
    pub(super) fn answered(&mut self) {
        self.reply_due = None;
    }

    pub(super) fn reply_due(&self) -> bool {
        self.reply_due.is_some()
    }

    /// The service sent an event.
    pub(super) fn output(&mut self, now: Instant) {
        self.last_output = now;
    }

    /// How long since the service last sent an event.
    pub(super) fn quiet_for(&self, now: Instant) -> Duration {
        now.duration_since(self.last_output)
    }

    /// The stream took a frame of audio.
    pub(super) fn accepted(&mut self) {
        self.refusing_since = None;
    }

    /// The stream refused a frame of audio.
    pub(super) fn refused(&mut self, now: Instant) {
        self.refusing_since.get_or_insert(now);
    }

    /// Whether the stream is stalled at `now`; a refusal counts once.
    pub(super) fn stalled(&mut self, now: Instant) -> bool {
        let no_reply = self.reply_due.is_some_and(|since| {
            now.duration_since(since) >= self.timeout && self.quiet_for(now) >= self.timeout
        });
        let refusing = self
            .refusing_since
            .is_some_and(|since| now.duration_since(since) >= self.timeout);
        if no_reply || refusing {
            self.refusing_since = None;
        }
        no_reply || refusing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);
    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_due_reply_stalls_after_the_timeout_of_silence() {
        let mut watch = StallWatch::new(TIMEOUT, Instant::now());
        watch.expect_reply(Instant::now());
        tokio::time::advance(TIMEOUT - MS).await;
        assert!(!watch.stalled(Instant::now()));
        tokio::time::advance(MS).await;
        assert!(watch.stalled(Instant::now()));
        // Output meanwhile keeps it alive until it too is old.
        watch.output(Instant::now());
        tokio::time::advance(TIMEOUT - MS).await;
        assert!(!watch.stalled(Instant::now()));
        watch.answered();
        tokio::time::advance(TIMEOUT * 3).await;
        assert!(!watch.stalled(Instant::now()), "nothing was due");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_audio_stalls_after_the_timeout_and_counts_once() {
        let mut watch = StallWatch::new(TIMEOUT, Instant::now());
        watch.refused(Instant::now());
        tokio::time::advance(TIMEOUT / 2).await;
        // Later refusals do not move the start.
        watch.refused(Instant::now());
        tokio::time::advance(TIMEOUT / 2).await;
        assert!(watch.stalled(Instant::now()));
        assert!(!watch.stalled(Instant::now()), "counted once");
        watch.refused(Instant::now());
        watch.accepted();
        tokio::time::advance(TIMEOUT).await;
        assert!(!watch.stalled(Instant::now()), "taken again");
    }
}
