//! Several engines at once, routed by capacity.
//!
//! A [`Pool`] holds engine [`Instance`]s in priority order, each with its
//! own limit of concurrent conversations. A new conversation takes a
//! [`Slot`] on the first instance that fits what it asked for (an engine, a
//! voice), has room, and is not cooling down (its service throttles, or it
//! failed to start a conversation a moment ago). When every fitting instance
//! is full, the conversation waits in a bounded queue (`queue`) and learns
//! its place as it changes. The slot is held until the conversation's
//! engine has ended.
//!
//! With instances configured, each conversation runs behind a relay
//! (`relay`) that counts its cost for its instance and, when the instance
//! fails, goes on with another one at a turn boundary, carrying the
//! conversation as text. Without instances, the pool is the one engine:
//! no limit of its own, no queue, no relay.

mod instance;
mod queue;
mod relay;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use instance::{Instance, InstanceCounters};
pub use queue::{Entry, Waited};

use super::cooldown::Cooldown;
use super::{ConversationOptions, Engine, EngineSession, EngineStat, StartError, Voice};

/// How the pool queues and fails over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Conversations that may wait when every fitting instance is full.
    pub queue_max: usize,
    /// Longest wait before a conversation is refused.
    pub queue_timeout: Duration,
    /// Whether a failed instance's conversations go on with another one.
    pub failover: bool,
    /// How long an instance that failed gets no new conversations.
    pub failure_cooldown: Duration,
}

impl PoolSettings {
    /// One engine on its own: no queue, no failover.
    pub fn single() -> Self {
        Self {
            queue_max: 0,
            queue_timeout: Duration::ZERO,
            failover: false,
            failure_cooldown: Duration::ZERO,
        }
    }
}

/// What makes an instance: its engine, its name, its limit and its place.
pub struct InstanceSpec {
    /// The name conversations, metrics and the ledger know it by.
    pub name: String,
    pub engine: Arc<dyn Engine>,
    /// Most conversations at once; 0 for no limit.
    pub max_concurrent: u32,
    /// Lower goes first; equal priorities keep their order.
    pub priority: i32,
}

impl std::fmt::Debug for InstanceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSpec")
            .field("name", &self.name)
            .field("kind", &self.engine.name())
            .field("max_concurrent", &self.max_concurrent)
            .field("priority", &self.priority)
            .finish()
    }
}

/// What a conversation asks of its instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Want {
    /// An instance name or an engine kind (`nova-sonic`); empty for any.
    pub engine: String,
    /// A voice the instance must offer; empty for its default.
    pub voice: String,
}

/// Why a conversation cannot be placed at all (as opposed to "not now").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("no engine is called {0:?}; choose one of {1}")]
    UnknownEngine(String, String),
    #[error("voice {0:?} is not offered{1}; choose one of {2} or leave it empty")]
    UnknownVoice(String, String, String),
}

/// A place on an instance, given back when dropped.
pub struct Slot {
    instance: Arc<Instance>,
    pool: Arc<Inner>,
}

impl Slot {
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.instance.active.fetch_sub(1, Ordering::AcqRel);
        self.pool.dispatch();
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Slot").field(&self.instance.name).finish()
    }
}

/// A started conversation: its engine ends, the instance it started on, and
/// what holds its place (keep it until the engine has ended).
#[derive(Debug)]
pub struct Started {
    pub session: EngineSession,
    pub instance: Arc<Instance>,
    pub hold: Hold,
}

/// Holds a conversation's place until dropped (nothing when a relay holds
/// it).
#[derive(Debug)]
pub struct Hold(#[allow(dead_code)] Option<Slot>);

/// How a conversation got in, or did not.
#[derive(Debug)]
pub enum Admission {
    Placed(Slot),
    /// Every fitting instance is full: wait with the entry.
    Queued(Entry),
    /// Every fitting instance is full and so is the queue.
    Full,
}

/// Numbers of the pool as a whole.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Conversations that had to wait.
    pub queued: AtomicU64,
    /// Conversations refused because the queue was full.
    pub queue_full: AtomicU64,
    /// Conversations that waited too long.
    pub queue_timeouts: AtomicU64,
    /// Waits that ended with a place, and their total length.
    pub waits: AtomicU64,
    pub wait_ms: AtomicU64,
    /// Conversations moved to another instance after a failure.
    pub failovers: AtomicU64,
}

struct Inner {
    instances: Vec<Arc<Instance>>,
    settings: PoolSettings,
    /// Whether conversations run behind a relay (instances configured).
    relayed: bool,
    queue: Mutex<queue::Queue>,
    counters: PoolCounters,
}

/// The engines conversations are placed on. See the module docs.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("instances", &self.inner.instances)
            .field("settings", &self.inner.settings)
            .finish()
    }
}

impl Pool {
    /// One engine, named by its kind: no limit, no queue, no relay.
    pub fn single(engine: Arc<dyn Engine>) -> Self {
        let spec = InstanceSpec {
            name: engine.name().to_owned(),
            engine,
            max_concurrent: 0,
            priority: 0,
        };
        Self::build(vec![spec], PoolSettings::single(), false)
    }

    /// Configured instances, tried in priority order.
    pub fn new(specs: Vec<InstanceSpec>, settings: PoolSettings) -> Self {
        Self::build(specs, settings, true)
    }

    fn build(mut specs: Vec<InstanceSpec>, settings: PoolSettings, relayed: bool) -> Self {
        specs.sort_by_key(|s| s.priority);
        let instances = specs
            .into_iter()
            .map(|spec| {
                Arc::new(Instance {
                    name: spec.name,
                    engine: spec.engine,
                    max_concurrent: spec.max_concurrent,
                    priority: spec.priority,
                    active: AtomicU32::new(0),
                    cooldown: Cooldown::default(),
                    counters: InstanceCounters::default(),
                })
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                instances,
                settings,
                relayed,
                queue: Mutex::new(queue::Queue::default()),
                counters: PoolCounters::default(),
            }),
        }
    }

    /// The instances in the order they are tried.
    pub fn instances(&self) -> &[Arc<Instance>] {
        &self.inner.instances
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.inner.settings
    }

    pub fn counters(&self) -> &PoolCounters {
        &self.inner.counters
    }

    /// Whether the pool is configured instances (names are instance names)
    /// rather than one engine.
    pub fn routed(&self) -> bool {
        self.inner.relayed
    }

    /// Conversations waiting now.
    pub fn waiting(&self) -> usize {
        self.inner.lock_queue().len()
    }

    /// The voices a hello may name: every instance's, each once.
    pub fn voices(&self) -> Vec<Voice> {
        let mut voices: Vec<Voice> = Vec::new();
        for instance in self.instances() {
            for voice in instance.engine.voices() {
                if !voices.iter().any(|v| v.id == voice.id) {
                    voices.push(voice);
                }
            }
        }
        voices
    }

    /// Whether some instance could ever take `want`: the engine exists and
    /// offers the voice.
    pub fn check(&self, want: &Want) -> Result<(), Mismatch> {
        let named: Vec<&Arc<Instance>> = self
            .instances()
            .iter()
            .filter(|i| want.engine.is_empty() || want.engine == i.name || want.engine == i.kind())
            .collect();
        if named.is_empty() {
            let known: Vec<&str> = self.instances().iter().map(|i| i.name()).collect();
            return Err(Mismatch::UnknownEngine(
                want.engine.clone(),
                known.join(", "),
            ));
        }
        if named.iter().any(|i| i.offers(&want.voice)) {
            return Ok(());
        }
        let mut known: Vec<String> = Vec::new();
        for instance in &named {
            for voice in instance.engine.voices() {
                if !known.contains(&voice.id) {
                    known.push(voice.id);
                }
            }
        }
        let on = if want.engine.is_empty() {
            String::new()
        } else {
            format!(" by {}", want.engine)
        };
        Err(Mismatch::UnknownVoice(
            want.voice.clone(),
            on,
            known.join(", "),
        ))
    }

    /// A place now on the first fitting instance with room, or a place in
    /// the queue, or neither.
    pub fn enter(&self, want: &Want) -> Admission {
        queue::enter(&self.inner, want)
    }

    /// A place now on the first fitting instance with room, queue or not
    /// (for a caller who cannot wait).
    pub fn place_now(&self, want: &Want) -> Option<Slot> {
        self.inner.place(want, &[])
    }

    /// Starts a conversation on `slot`'s instance. An instance that
    /// refuses (busy, unavailable) cools down and the next one with room
    /// is tried; the error is the last instance's.
    pub fn start(
        &self,
        slot: Slot,
        want: &Want,
        options: ConversationOptions,
    ) -> Result<Started, StartError> {
        let mut slot = slot;
        let mut tried: Vec<String> = Vec::new();
        loop {
            let instance = Arc::clone(&slot.instance);
            match self.inner.start_on(&instance, &options) {
                Ok(session) => {
                    return Ok(if self.inner.relayed {
                        let session =
                            relay::spawn(&self.inner, slot, want.clone(), options, session);
                        Started {
                            session,
                            instance,
                            hold: Hold(None),
                        }
                    } else {
                        Started {
                            session,
                            instance,
                            hold: Hold(Some(slot)),
                        }
                    });
                }
                Err(error) => {
                    tried.push(instance.name.clone());
                    drop(slot);
                    let next = if self.inner.relayed {
                        self.inner.place(want, &tried)
                    } else {
                        None
                    };
                    match next {
                        Some(next) => slot = next,
                        None => return Err(error),
                    }
                }
            }
        }
    }

    /// Engine numbers of every instance, for `/metrics`.
    pub fn stats(&self) -> Vec<(Arc<Instance>, Vec<EngineStat>)> {
        self.instances()
            .iter()
            .map(|i| (Arc::clone(i), i.engine.stats()))
            .collect()
    }
}

impl Inner {
    /// Starts a conversation on `instance`, in its default voice when it
    /// lacks the one asked for. A refusal is counted and cools the
    /// instance down: as long as a throttling service asks, or
    /// `failure_cooldown` when it is unreachable or misconfigured.
    fn start_on(
        &self,
        instance: &Instance,
        options: &ConversationOptions,
    ) -> Result<EngineSession, StartError> {
        let mut options = options.clone();
        if !instance.offers(&options.voice) {
            options.voice.clear();
        }
        let counters = &instance.counters;
        match instance.engine.start(options) {
            Ok(session) => {
                counters.started.fetch_add(1, Ordering::Relaxed);
                Ok(session)
            }
            Err(error) => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                let cooldown = match &error {
                    StartError::Busy { retry_after, .. } => Some(*retry_after),
                    StartError::Unavailable(_) | StartError::Misconfigured(_) => {
                        Some(self.settings.failure_cooldown)
                    }
                    StartError::Unsupported(_) => None,
                };
                if let Some(cooldown) = cooldown {
                    instance.failed(cooldown);
                }
                Err(error)
            }
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, queue::Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place on the first instance that fits `want`, is not in `skip`,
    /// is not cooling down and has room. One engine on its own is never
    /// passed over: its `start` says why it refuses.
    fn place(self: &Arc<Self>, want: &Want, skip: &[String]) -> Option<Slot> {
        self.instances
            .iter()
            .filter(|i| i.fits(want) && !skip.contains(&i.name))
            .filter(|i| !self.relayed || i.cooling().is_none())
            .find(|i| i.take())
            .map(|instance| Slot {
                instance: Arc::clone(instance),
                pool: Arc::clone(self),
            })
    }
}

/// The pool as one engine, for callers that cannot wait (`sonora talk`):
/// a place now or [`StartError::Busy`].
impl Engine for Pool {
    fn name(&self) -> &'static str {
        self.instances().first().map_or("pool", |i| i.kind())
    }

    fn voices(&self) -> Vec<Voice> {
        Pool::voices(self)
    }

    fn start(&self, options: ConversationOptions) -> Result<EngineSession, StartError> {
        let want = Want {
            engine: String::new(),
            voice: options.voice.clone(),
        };
        let Some(slot) = self.inner.place(&want, &[]) else {
            let retry_after = self
                .instances()
                .iter()
                .filter_map(|i| i.cooling())
                .min()
                .unwrap_or(Duration::from_secs(1));
            return Err(StartError::Busy {
                retry_after,
                message: "every engine instance is full or cooling down; try again later".into(),
            });
        };
        let started = Pool::start(self, slot, &want, options)?;
        if let Hold(Some(slot)) = started.hold {
            // Without a relay nothing holds the place: one engine has no
            // limit of its own.
            drop(slot);
        }
        Ok(started.session)
    }

    fn busy(&self) -> Option<Duration> {
        if self.inner.settings.queue_max > 0 {
            return None;
        }
        self.instances()
            .iter()
            .map(|i| i.cooling())
            .try_fold(Duration::MAX, |shortest, cooling| {
                cooling.map(|c| shortest.min(c))
            })
    }

    fn prices(&self) -> String {
        self.instances()
            .first()
            .map_or_else(|| "free".to_owned(), |i| i.engine.prices())
    }

    fn paid(&self) -> bool {
        self.instances().iter().any(|i| i.engine.paid())
    }
}
