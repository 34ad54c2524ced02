//! One engine instance: its engine, limit and place in the order, the
//! conversations on it, its cool-down after failures, and its numbers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::Want;
use crate::engine::Engine;
use crate::engine::cooldown::Cooldown;
use crate::usage::UsageDelta;

/// One engine instance and its numbers.
pub struct Instance {
    pub(super) name: String,
    pub(super) engine: Arc<dyn Engine>,
    pub(super) max_concurrent: u32,
    pub(super) priority: i32,
    pub(super) active: AtomicU32,
    /// New conversations refused after a failure.
    pub(super) cooldown: Cooldown,
    pub(super) counters: InstanceCounters,
}

/// What `/metrics` shows of an instance.
#[derive(Debug, Default)]
pub struct InstanceCounters {
    /// Conversations started on it.
    pub started: AtomicU64,
    /// Conversations it refused to start (busy, unavailable, misconfigured).
    pub refused: AtomicU64,
    /// Conversations it failed while they ran.
    pub failed: AtomicU64,
    /// Conversations it took over from a failed instance.
    pub taken_over: AtomicU64,
    pub speech_cost_micro_usd: AtomicU64,
    pub text_cost_micro_usd: AtomicU64,
    pub cost_micro_usd: AtomicU64,
}

impl Instance {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its engine kind: `nova-sonic`.
    pub fn kind(&self) -> &'static str {
        self.engine.name()
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Its limit; `None` for no limit.
    pub fn max_concurrent(&self) -> Option<u32> {
        (self.max_concurrent > 0).then_some(self.max_concurrent)
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> &InstanceCounters {
        &self.counters
    }

    /// How long it still refuses new conversations: its own failure
    /// cool-down or its engine's (a throttling service).
    pub fn cooling(&self) -> Option<Duration> {
        let own = self.cooldown.remaining();
        let engine = self.engine.busy();
        match (own, engine) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether it would take a new conversation now.
    pub fn available(&self) -> bool {
        self.cooling().is_none() && self.has_room()
    }

    pub(super) fn has_room(&self) -> bool {
        self.max_concurrent == 0 || self.active() < self.max_concurrent
    }

    /// Whether it is the engine `want` names (by instance name or kind)
    /// and offers its voice.
    pub(super) fn fits(&self, want: &Want) -> bool {
        let engine_ok =
            want.engine.is_empty() || want.engine == self.name || want.engine == self.kind();
        engine_ok && self.offers(&want.voice)
    }

    pub(super) fn offers(&self, voice: &str) -> bool {
        if voice.is_empty() {
            return true;
        }
        let voices = self.engine.voices();
        voices.is_empty() || voices.iter().any(|v| v.id == voice)
    }

    /// Takes a place if there is room.
    pub(super) fn take(&self) -> bool {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
                (self.max_concurrent == 0 || active < self.max_concurrent).then_some(active + 1)
            })
            .is_ok()
    }

    /// Adds a usage delta's cost to its totals.
    pub(crate) fn count(&self, delta: &UsageDelta) {
        let c = &self.counters;
        c.cost_micro_usd
            .fetch_add(delta.cost_micro_usd, Ordering::Relaxed);
        c.speech_cost_micro_usd
            .fetch_add(delta.speech_cost_micro_usd, Ordering::Relaxed);
        c.text_cost_micro_usd
            .fetch_add(delta.text_cost_micro_usd, Ordering::Relaxed);
    }

    /// A failure: no new conversations for `cooldown`.
    pub(super) fn failed(&self, cooldown: Duration) {
        if !cooldown.is_zero() {
            self.cooldown.start(cooldown);
        }
    }
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("name", &self.name)
            .field("kind", &self.kind())
            .field("max_concurrent", &self.max_concurrent)
            .field("priority", &self.priority)
            .field("active", &self.active())
            .finish()
    }
}
