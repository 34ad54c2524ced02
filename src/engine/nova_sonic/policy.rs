//! How often streams are opened.
//!
//! Every stream a conversation opens (its first, a reconnection after a
//! failure or a stall, the next stream of a rotation) goes through one
//! [`OpenPolicy`]: a backoff with jitter between failed tries and a cap on
//! opens per minute. All conversations of one engine share a [`Breaker`]:
//! when Bedrock throttles or refuses for quota, it opens for a cool-down
//! during which new conversations are refused and running ones open nothing;
//! then one stream that settles closes it, and another refusal opens it for
//! twice as long (up to [`MAX_DOUBLINGS`] doublings).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The window of the per-conversation cap on opens.
pub(crate) const OPEN_WINDOW: Duration = Duration::from_secs(60);
/// Jitter on the first reopen after a failure (otherwise immediate).
const FIRST_TRY_JITTER: Duration = Duration::from_millis(250);
/// Repeated trips double the cool-down at most this many times.
pub(crate) const MAX_DOUBLINGS: u32 = 3;
/// Running conversations spread their opens after a cool-down over up to a
/// quarter of it, at most this long.
const MAX_BREAKER_JITTER: Duration = Duration::from_secs(10);

const ORDER: Ordering = Ordering::Relaxed;

/// A small generator for jitter (splitmix64); no need for more.
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    /// Seeded from the clock and a process-wide counter, so conversations
    /// started together still spread out.
    pub(crate) fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::seeded(nanos ^ NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, ORDER))
    }

    pub(crate) fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, span]`, to the microsecond.
    pub(crate) fn upto(&mut self, span: Duration) -> Duration {
        let micros = span.as_micros().min(u128::from(u64::MAX)) as u64;
        if micros == 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(self.next_u64() % (micros + 1))
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Default)]
struct BreakerState {
    /// When it last tripped; `None` while closed.
    tripped_at: Option<Instant>,
    /// The end of the current cool-down.
    open_until: Option<Instant>,
    /// The current cool-down.
    cooldown: Duration,
    doublings: u32,
}

/// The circuit breaker shared by every conversation of one engine.
#[derive(Debug)]
pub(crate) struct Breaker {
    base: Duration,
    state: Mutex<BreakerState>,
    trips: AtomicU64,
}

impl Breaker {
    pub(crate) fn new(cooldown: Duration) -> Self {
        Self {
            base: cooldown,
            state: Mutex::new(BreakerState::default()),
            trips: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bedrock throttled or refused for quota at `now`. Opens the breaker
    /// unless it is already cooling down (one refusal storm is one trip);
    /// a trip after a cool-down that no success followed doubles it.
    /// Returns the new cool-down when this call tripped it.
    pub(crate) fn trip(&self, now: Instant) -> Option<Duration> {
        let mut state = self.lock();
        if state.open_until.is_some_and(|until| now < until) {
            return None;
        }
        state.doublings = match (state.tripped_at, state.open_until) {
            // Half-open: the last cool-down did not help.
            (Some(_), Some(until)) if now < until + state.cooldown => {
                (state.doublings + 1).min(MAX_DOUBLINGS)
            }
            // Closed, or half-open and quiet for a whole cool-down since.
            _ => 0,
        };
        state.cooldown = self.base * (1 << state.doublings);
        state.tripped_at = Some(now);
        state.open_until = Some(now + state.cooldown);
        self.trips.fetch_add(1, ORDER);
        Some(state.cooldown)
    }

    /// How long the cool-down still lasts, if it does.
    pub(crate) fn wait(&self, now: Instant) -> Option<Duration> {
        let state = self.lock();
        state
            .open_until
            .filter(|until| now < *until)
            .map(|until| until - now)
    }

    /// The spread of opens after a cool-down: a quarter of it, at most
    /// [`MAX_BREAKER_JITTER`].
    pub(crate) fn jitter_span(&self) -> Duration {
        let cooldown = self.lock().cooldown.max(self.base);
        (cooldown / 4).min(MAX_BREAKER_JITTER)
    }

    /// A stream opened at `opened_at` settled (the service sent something,
    /// or it stayed up). After the cool-down, one that was opened after the
    /// trip closes the breaker.
    pub(crate) fn success(&self, opened_at: Instant, now: Instant) {
        let mut state = self.lock();
        let (Some(tripped), Some(until)) = (state.tripped_at, state.open_until) else {
            return;
        };
        if now >= until && opened_at >= tripped {
            *state = BreakerState::default();
        }
    }

    pub(crate) fn trips(&self) -> u64 {
        self.trips.load(ORDER)
    }
}

/// Counts of opens, for `/metrics`; one set per engine.
#[derive(Debug, Default)]
pub(crate) struct OpenStats {
    /// Streams opened.
    opens: AtomicU64,
    /// Opens put off by the backoff or the breaker.
    postponed: AtomicU64,
    /// Opens refused by the per-conversation cap.
    capped: AtomicU64,
    /// New conversations refused while the breaker cooled down.
    refused: AtomicU64,
}

/// One of the [`OpenStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Count {
    Opened,
    Postponed,
    Capped,
    Refused,
}

impl OpenStats {
    fn counter(&self, which: Count) -> &AtomicU64 {
        match which {
            Count::Opened => &self.opens,
            Count::Postponed => &self.postponed,
            Count::Capped => &self.capped,
            Count::Refused => &self.refused,
        }
    }

    pub(crate) fn add(&self, which: Count) {
        self.counter(which).fetch_add(1, ORDER);
    }

    pub(crate) fn get(&self, which: Count) -> u64 {
        self.counter(which).load(ORDER)
    }
}

/// What the policy says about opening a stream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Open,
    /// The breaker is cooling down: try again after this long.
    Wait(Duration),
    /// The conversation is at its cap of opens per minute; room again after
    /// this long.
    Capped(Duration),
}

/// The open policy of one conversation.
#[derive(Debug)]
pub(crate) struct OpenPolicy {
    /// The wait before the second try; each later one is three times longer.
    base: Duration,
    /// The longest wait before jitter.
    cap: Duration,
    per_window: usize,
    opens: VecDeque<Instant>,
    jitter: Jitter,
}

impl OpenPolicy {
    pub(crate) fn new(base: Duration, cap: Duration, per_minute: u32) -> Self {
        Self {
            base,
            cap: cap.max(base),
            per_window: per_minute.max(1) as usize,
            opens: VecDeque::new(),
            jitter: Jitter::new(),
        }
    }

    /// The wait before try `attempt` after a failure (1: the first reopen):
    /// 0, base, 3·base, 9·base… at most the cap, plus up to half again as
    /// jitter (up to 250 ms on the first).
    pub(crate) fn backoff(&mut self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return self.jitter.upto(FIRST_TRY_JITTER);
        }
        let factor = 3u32.saturating_pow(attempt - 2);
        let wait = self.base.saturating_mul(factor).min(self.cap);
        wait + self.jitter.upto(wait / 2)
    }

    /// Whether a stream may open at `now`: the breaker first, then the cap.
    pub(crate) fn gate(&mut self, breaker: &Breaker, now: Instant) -> Gate {
        if let Some(wait) = breaker.wait(now) {
            let span = breaker.jitter_span();
            return Gate::Wait(wait + self.jitter.upto(span));
        }
        while self
            .opens
            .front()
            .is_some_and(|t| now.duration_since(*t) >= OPEN_WINDOW)
        {
            self.opens.pop_front();
        }
        if self.opens.len() >= self.per_window {
            let oldest = self.opens.front().copied().unwrap_or(now);
            let room = (oldest + OPEN_WINDOW).saturating_duration_since(now);
            return Gate::Capped(room + self.jitter.upto(self.base / 2));
        }
        Gate::Open
    }

    /// A stream was opened at `now`.
    pub(crate) fn opened(&mut self, now: Instant) {
        self.opens.push_back(now);
    }

    /// Opens counted in the window.
    pub(crate) fn recent_opens(&self) -> usize {
        self.opens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_grows_by_three_up_to_the_cap_with_jitter_on_top() {
        let mut policy = OpenPolicy::new(S, 30 * S, 20);
        for _ in 0..200 {
            assert!(policy.backoff(1) <= FIRST_TRY_JITTER);
            for (attempt, base) in [(2, 1), (3, 3), (4, 9), (5, 27), (6, 30), (20, 30)] {
                let wait = policy.backoff(attempt);
                let base = base * S;
                assert!(
                    wait >= base && wait <= base + base / 2,
                    "{attempt}: {wait:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads() {
        let mut jitter = Jitter::seeded(7);
        let draws: Vec<Duration> = (0..100).map(|_| jitter.upto(S)).collect();
        assert!(draws.iter().all(|d| *d <= S));
        assert!(draws.iter().any(|d| *d < S / 4) && draws.iter().any(|d| *d > S * 3 / 4));
        assert_eq!(jitter.upto(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_cap_counts_opens_in_the_last_minute() {
        let breaker = Breaker::new(30 * S);
        let mut policy = OpenPolicy::new(S, 30 * S, 3);
        let t0 = Instant::now();
        for k in 0..3 {
            assert_eq!(policy.gate(&breaker, t0 + k * S), Gate::Open);
            policy.opened(t0 + k * S);
        }
        let Gate::Capped(room) = policy.gate(&breaker, t0 + 10 * S) else {
            panic!("capped");
        };
        assert!(room >= 50 * S && room <= 51 * S, "{room:?}");
        assert_eq!(policy.gate(&breaker, t0 + 60 * S), Gate::Open);
        assert_eq!(policy.recent_opens(), 2);
    }

    #[test]
    fn the_breaker_cools_down_doubles_and_closes_on_a_settled_stream() {
        let breaker = Breaker::new(10 * S);
        let t0 = Instant::now();
        assert_eq!(breaker.wait(t0), None);
        assert_eq!(breaker.trip(t0), Some(10 * S));
        // More refusals from the same storm are one trip.
        assert_eq!(breaker.trip(t0 + S), None);
        assert_eq!(breaker.trips(), 1);
        assert_eq!(breaker.wait(t0 + 4 * S), Some(6 * S));
        // A stream from before the trip, or settling during the cool-down,
        // closes nothing.
        breaker.success(t0 - S, t0 + 11 * S);
        breaker.success(t0 + 2 * S, t0 + 5 * S);
        assert_eq!(breaker.wait(t0 + 10 * S), None, "half-open");
        // Refused again after the cool-down: twice as long.
        assert_eq!(breaker.trip(t0 + 12 * S), Some(20 * S));
        assert_eq!(breaker.trip(t0 + 33 * S), Some(40 * S));
        assert_eq!(breaker.trip(t0 + 74 * S), Some(80 * S));
        assert_eq!(breaker.trip(t0 + 155 * S), Some(80 * S), "at most 8 times");
        assert_eq!(breaker.jitter_span(), 10 * S);
        // One stream opened after the trip that settles closes it.
        breaker.success(t0 + 236 * S, t0 + 238 * S);
        assert_eq!(breaker.trip(t0 + 300 * S), Some(10 * S));
        // Quiet for a whole cool-down after it ended: back to the base.
        assert_eq!(breaker.trip(t0 + 330 * S), Some(10 * S));
        assert_eq!(breaker.trips(), 7);
    }

    #[test]
    fn a_cooling_breaker_makes_opens_wait_past_its_end() {
        let breaker = Breaker::new(8 * S);
        let mut policy = OpenPolicy::new(S, 30 * S, 20);
        let t0 = Instant::now();
        breaker.trip(t0);
        for _ in 0..50 {
            let Gate::Wait(wait) = policy.gate(&breaker, t0 + 2 * S) else {
                panic!("waits");
            };
            assert!(wait >= 6 * S && wait <= 8 * S, "{wait:?}");
        }
        assert_eq!(policy.gate(&breaker, t0 + 8 * S), Gate::Open);
    }
}
