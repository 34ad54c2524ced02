//! The time a cloud engine refuses new conversations after its service
//! throttled or reported its quota used up (running ones go on), and the
//! counts of both.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{EngineStat, StartError, StatKind};

#[derive(Debug, Default)]
pub(crate) struct Cooldown {
    until: Mutex<Option<Instant>>,
    /// Throttling or quota answers from the service.
    throttled: AtomicU64,
    /// New conversations refused while cooling down.
    refused: AtomicU64,
}

impl Cooldown {
    /// The service throttled or its quota is used up: counted, and new
    /// conversations refused for `length`.
    pub(crate) fn throttled(&self, length: Duration) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        self.start(length);
    }

    /// The refusal of a new conversation to `service` while it cools down.
    pub(crate) fn refusal(&self, service: &str) -> Option<StartError> {
        let wait = self.remaining()?;
        self.refused.fetch_add(1, Ordering::Relaxed);
        Some(StartError::Busy {
            retry_after: wait,
            message: format!(
                "{service} is throttling: no new conversations for {:.1} s",
                wait.as_secs_f64()
            ),
        })
    }

    /// `throttled_total`, `conversations_refused_total` and `cooling_down`
    /// for `/metrics`.
    pub(crate) fn stats(&self) -> [EngineStat; 3] {
        let counter = EngineStat::counter;
        [
            counter(
                "throttled_total",
                "Throttling or quota answers from the service.",
                &self.throttled,
            ),
            counter(
                "conversations_refused_total",
                "New conversations refused while the engine cooled down after throttling.",
                &self.refused,
            ),
            EngineStat {
                name: "cooling_down",
                help: "1 while new conversations are refused after throttling.",
                kind: StatKind::Gauge,
                value: u64::from(self.remaining().is_some()),
            },
        ]
    }

    /// Refuses new conversations for `length` from now (or longer, if an
    /// earlier cool-down ends later).
    pub(crate) fn start(&self, length: Duration) {
        let until = Instant::now() + length;
        if let Ok(mut current) = self.until.lock() {
            *current = Some(current.map_or(until, |t| t.max(until)));
        }
    }

    /// How long new conversations are still refused.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        let now = Instant::now();
        let until = (*self.until.lock().ok()?)?;
        (until > now).then(|| until - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_longest_cool_down_wins_and_it_ends() {
        let cooldown = Cooldown::default();
        assert_eq!(cooldown.remaining(), None);
        cooldown.start(Duration::from_secs(30));
        cooldown.start(Duration::from_secs(5));
        assert_eq!(cooldown.remaining(), Some(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(cooldown.remaining(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_says_how_long_and_is_counted() {
        let cooldown = Cooldown::default();
        assert!(cooldown.refusal("X").is_none());
        cooldown.throttled(Duration::from_secs(10));
        let Some(StartError::Busy {
            retry_after,
            message,
        }) = cooldown.refusal("X")
        else {
            panic!("no refusal while cooling down");
        };
        assert_eq!(retry_after, Duration::from_secs(10));
        assert_eq!(message, "X is throttling: no new conversations for 10.0 s");
        let values: Vec<(&str, u64)> = cooldown.stats().iter().map(|s| (s.name, s.value)).collect();
        assert_eq!(
            values,
            [
                ("throttled_total", 1),
                ("conversations_refused_total", 1),
                ("cooling_down", 1)
            ]
        );
    }
}
