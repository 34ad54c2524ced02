//! The time a cloud engine refuses new conversations after its service
//! throttled or reported its quota used up (running ones go on).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Default)]
pub(crate) struct Cooldown {
    until: Mutex<Option<Instant>>,
}

impl Cooldown {
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
}
