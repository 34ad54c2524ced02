//! The wait for a place: conversations in arrival order, each placed as
//! soon as an instance that fits it has room and no one before it could
//! take that room. A place that frees, a waiter that leaves and a periodic
//! look (for cool-downs that end) all hand out places again.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{Admission, Inner, Slot, Want};

/// How often a waiter looks again without news (a cool-down may end).
const LOOK_AGAIN: Duration = Duration::from_millis(500);

#[derive(Default)]
pub(super) struct Queue {
    waiters: VecDeque<Arc<Waiter>>,
    next_id: u64,
}

impl Queue {
    pub(super) fn len(&self) -> usize {
        self.waiters.len()
    }
}

struct Waiter {
    id: u64,
    want: Want,
    placed: Mutex<Option<oneshot::Sender<Slot>>>,
    /// Its place in the queue, from 1.
    position: watch::Sender<usize>,
}

/// A conversation's place in the queue; dropping it leaves the queue.
pub struct Entry {
    pool: Arc<Inner>,
    id: u64,
    placed: oneshot::Receiver<Slot>,
    position: watch::Receiver<usize>,
    entered: Instant,
    deadline: Instant,
}

/// What a wait came to.
#[derive(Debug)]
pub enum Waited {
    /// Its place in the queue changed (from 1).
    Moved(usize),
    Placed(Slot),
    /// The wait passed `engine.queue_timeout_s`.
    TimedOut,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("position", &*self.position.borrow())
            .finish()
    }
}

impl Entry {
    /// Its place in the queue now, from 1.
    pub fn position(&self) -> usize {
        *self.position.borrow()
    }

    /// How many wait in all.
    pub fn waiting(&self) -> usize {
        self.pool.lock_queue().len()
    }

    /// Waits for news: a new place in the queue, a slot, or the end of the
    /// wait.
    pub async fn next(&mut self) -> Waited {
        loop {
            tokio::select! {
                placed = &mut self.placed => {
                    return match placed {
                        Ok(slot) => {
                            let counters = &self.pool.counters;
                            let waited = self.entered.elapsed().as_millis();
                            counters.waits.fetch_add(1, Ordering::Relaxed);
                            counters.wait_ms.fetch_add(
                                u64::try_from(waited).unwrap_or(u64::MAX),
                                Ordering::Relaxed,
                            );
                            Waited::Placed(slot)
                        }
                        // The sender is only dropped with the waiter, which
                        // leaves the queue only through this entry or a slot.
                        Err(_) => Waited::TimedOut,
                    };
                }
                changed = self.position.changed() => {
                    if changed.is_ok() {
                        return Waited::Moved(*self.position.borrow_and_update());
                    }
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    self.pool.counters.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                    return Waited::TimedOut;
                }
                () = tokio::time::sleep(LOOK_AGAIN) => self.pool.dispatch(),
            }
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let left = {
            let mut queue = self.pool.lock_queue();
            let before = queue.waiters.len();
            queue.waiters.retain(|w| w.id != self.id);
            queue.waiters.len() != before
        };
        if left {
            self.pool.dispatch();
        }
        // A slot handed over but never taken goes back with the receiver.
        self.placed.close();
        if let Ok(slot) = self.placed.try_recv() {
            drop(slot);
        }
    }
}

/// A place now, a place in the queue, or neither.
pub(super) fn enter(pool: &Arc<Inner>, want: &Want) -> Admission {
    let mut queue = pool.lock_queue();
    // Earlier arrivals go first: a newcomer is placed at once only when no
    // one waits.
    if queue.waiters.is_empty()
        && let Some(slot) = pool.place(want, &[])
    {
        return Admission::Placed(slot);
    }
    if queue.waiters.len() >= pool.settings.queue_max {
        pool.counters.queue_full.fetch_add(1, Ordering::Relaxed);
        return Admission::Full;
    }
    pool.counters.queued.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    let id = queue.next_id;
    queue.next_id += 1;
    let position = queue.waiters.len() + 1;
    let (position_tx, position_rx) = watch::channel(position);
    queue.waiters.push_back(Arc::new(Waiter {
        id,
        want: want.clone(),
        placed: Mutex::new(Some(tx)),
        position: position_tx,
    }));
    drop(queue);
    let now = Instant::now();
    let entry = Entry {
        pool: Arc::clone(pool),
        id,
        placed: rx,
        position: position_rx,
        entered: now,
        deadline: now + pool.settings.queue_timeout,
    };
    // Someone ahead may not fit the room there is; this one may.
    pool.dispatch();
    Admission::Queued(entry)
}

impl Inner {
    /// Hands out places to waiters in order, then tells the rest their new
    /// positions.
    pub(super) fn dispatch(self: &Arc<Self>) {
        let mut unclaimed = Vec::new();
        {
            let mut queue = self.lock_queue();
            if queue.waiters.is_empty() {
                return;
            }
            let mut index = 0;
            while index < queue.waiters.len() {
                let Some(slot) = self.place(&queue.waiters[index].want, &[]) else {
                    index += 1;
                    continue;
                };
                let waiter = queue.waiters.remove(index);
                let sender = waiter.and_then(|w| {
                    w.placed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take()
                });
                match sender {
                    Some(sender) => {
                        if let Err(slot) = sender.send(slot) {
                            unclaimed.push(slot);
                        }
                    }
                    None => unclaimed.push(slot),
                }
            }
            for (index, waiter) in queue.waiters.iter().enumerate() {
                waiter.position.send_if_modified(|position| {
                    let changed = *position != index + 1;
                    *position = index + 1;
                    changed
                });
            }
        }
        // Outside the lock: giving a slot back hands out places again.
        drop(unclaimed);
    }
}
