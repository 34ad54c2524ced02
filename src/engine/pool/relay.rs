//! A routed conversation's relay: it passes input and events between the
//! conversation and its instance's engine, holds the instance's place,
//! counts the cost for it, and keeps the conversation as text. When the
//! engine fails (a fatal error, or its events end unasked), the turn in
//! progress ends as an error and the conversation goes on with the next
//! instance that has room, with the history, the user told by a `Moved`.
//! Turn numbers carry on across engines.
//!
//! Both directions move one item at a time through `reserve`, so neither a
//! slow engine nor a slow conversation can wedge the other.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Inner, Instance, Slot, Want};
use crate::engine::text_history::History;
use crate::engine::{
    ConversationOptions, EngineEvent, EngineInput, EngineSession, ErrorKind, Stage, TurnEndReason,
};

/// Starts the relay for a conversation that started on `slot`'s instance;
/// returns the conversation's ends.
pub(super) fn spawn(
    pool: &Arc<Inner>,
    slot: Slot,
    want: Want,
    options: ConversationOptions,
    session: EngineSession,
) -> EngineSession {
    let (outer, input, events) = EngineSession::channel();
    let mut history = History::default();
    for (role, text) in &options.history {
        history.push(*role, text);
    }
    let relay = Relay {
        pool: Arc::clone(pool),
        slot,
        want,
        options,
        engine_input: Some(session.input),
        engine_events: session.events,
        old_events: None,
        old_instance: None,
        input,
        events,
        pending_in: None,
        out: VecDeque::new(),
        history,
        turn: None,
        turn_offset: 0,
        last_turn: 0,
        tried: Vec::new(),
        moves: 0,
        failed_at: None,
        ready_sent: false,
        closing: false,
        dead: false,
    };
    tokio::spawn(relay.run());
    outer
}

/// What woke the relay, beyond an item passed on.
enum Woke {
    /// An item went on its way.
    Moved,
    Engine(Option<EngineEvent>),
    /// A failed engine's event.
    Old(Option<EngineEvent>),
    Input(Option<EngineInput>),
}

struct Relay {
    pool: Arc<Inner>,
    slot: Slot,
    want: Want,
    options: ConversationOptions,
    /// `None` once the conversation closed its input.
    engine_input: Option<mpsc::Sender<EngineInput>>,
    engine_events: mpsc::Receiver<EngineEvent>,
    /// A failed engine's last events: only its usage still counts.
    old_events: Option<mpsc::Receiver<EngineEvent>>,
    /// The failed engine's instance, whose cost that usage is, and how
    /// many moves came before it (its streams' numbering).
    old_instance: Option<(Arc<Instance>, u32)>,
    input: mpsc::Receiver<EngineInput>,
    events: mpsc::Sender<EngineEvent>,
    pending_in: Option<EngineInput>,
    out: VecDeque<EngineEvent>,
    history: History,
    /// The turn in progress (the engine's number), if any.
    turn: Option<u64>,
    /// Added to the engine's turn numbers: they restart with each engine.
    turn_offset: u64,
    /// The highest turn number the conversation has seen.
    last_turn: u64,
    /// Instances that failed this conversation.
    tried: Vec<String>,
    moves: u32,
    /// When the engine failed, until the next one is ready.
    failed_at: Option<Instant>,
    ready_sent: bool,
    /// The conversation closed its input: no failover any more.
    closing: bool,
    /// No engine serves the conversation any more.
    dead: bool,
}

impl Relay {
    async fn run(mut self) {
        loop {
            let woke = tokio::select! {
                permit = self.events.reserve(), if !self.out.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(event) = self.out.pop_front() {
                            permit.send(event);
                        }
                        Woke::Moved
                    }
                    // The conversation is gone.
                    Err(_) => return,
                },
                event = self.engine_events.recv(), if self.out.is_empty() && !self.dead => {
                    Woke::Engine(event)
                }
                event = recv(&mut self.old_events), if self.out.is_empty() => Woke::Old(event),
                permit = reserve(&self.engine_input), if self.pending_in.is_some() => {
                    match permit {
                        Some(permit) => {
                            if let Some(input) = self.pending_in.take() {
                                permit.send(input);
                            }
                        }
                        // The engine stopped reading: its events say why.
                        None => self.pending_in = None,
                    }
                    Woke::Moved
                }
                input = self.input.recv(), if self.pending_in.is_none() && !self.closing => {
                    Woke::Input(input)
                }
                else => return,
            };
            match woke {
                Woke::Moved => {}
                Woke::Engine(event) => self.on_event(event),
                Woke::Old(Some(EngineEvent::Usage(mut delta))) => {
                    // The failed engine's streams, numbered as they were.
                    if let Some((old, moves)) = &self.old_instance {
                        restream(&mut delta, *moves);
                        old.count(&delta);
                    }
                    self.out.push_back(EngineEvent::Usage(delta));
                }
                Woke::Old(Some(_)) => {}
                Woke::Old(None) => self.old_events = None,
                Woke::Input(Some(EngineInput::Close)) => {
                    self.closing = true;
                    self.pending_in = Some(EngineInput::Close);
                }
                Woke::Input(Some(input)) => self.pending_in = Some(input),
                Woke::Input(None) => {
                    self.closing = true;
                    self.engine_input = None;
                }
            }
            if self.dead && self.out.is_empty() && self.old_events.is_none() {
                return;
            }
        }
    }

    fn on_event(&mut self, event: Option<EngineEvent>) {
        let Some(mut event) = event else {
            if self.closing {
                self.dead = true;
            } else {
                self.failed("the engine stopped".to_owned());
            }
            return;
        };
        match &mut event {
            EngineEvent::Error {
                kind: ErrorKind::Fatal,
                message,
            } if !self.closing => {
                let message = std::mem::take(message);
                self.failed(message);
                return;
            }
            EngineEvent::Ready {
                engine,
                model,
                voice,
            } => {
                if self.ready_sent {
                    let gap = self
                        .failed_at
                        .take()
                        .map_or(0.0, |at| at.elapsed().as_secs_f64() * 1000.0);
                    self.out.push_back(EngineEvent::Moved {
                        engine: self.slot.instance.name.clone(),
                        model: std::mem::take(model),
                        voice: std::mem::take(voice),
                        prices: self.slot.instance.engine.prices(),
                        generation: self.moves,
                        gap_ms: gap,
                    });
                    return;
                }
                self.ready_sent = true;
                self.failed_at = None;
                self.slot.instance.name.clone_into(engine);
            }
            EngineEvent::Usage(delta) => {
                restream(delta, self.moves);
                self.slot.instance.count(delta);
            }
            EngineEvent::Transcript {
                role,
                text,
                stage,
                turn_id,
            } => {
                if *stage == Stage::Final {
                    self.history.push(*role, text);
                }
                self.turn = Some(*turn_id);
            }
            EngineEvent::SpeechStarted { turn_id } | EngineEvent::SpeechEnded { turn_id } => {
                self.turn = Some(*turn_id);
            }
            EngineEvent::TurnEnd { .. } => self.turn = None,
            EngineEvent::Closed => self.dead = true,
            _ => {}
        }
        self.renumber(&mut event);
        self.out.push_back(event);
    }

    /// The conversation's turn number for the engine's.
    fn renumber(&mut self, event: &mut EngineEvent) {
        let turn = match event {
            EngineEvent::Transcript { turn_id, .. }
            | EngineEvent::Interrupted { turn_id }
            | EngineEvent::TurnEnd { turn_id, .. }
            | EngineEvent::SpeechStarted { turn_id }
            | EngineEvent::SpeechEnded { turn_id } => turn_id,
            _ => return,
        };
        *turn += self.turn_offset;
        self.last_turn = self.last_turn.max(*turn);
    }

    /// The engine failed: end the turn in progress, then go on with the
    /// next instance with room, or tell the conversation it cannot.
    fn failed(&mut self, message: String) {
        let instance = Arc::clone(&self.slot.instance);
        instance.counters.failed.fetch_add(1, Ordering::Relaxed);
        instance.failed(self.pool.settings.failure_cooldown);
        if let Some(turn_id) = self.turn.take() {
            let mut end = EngineEvent::TurnEnd {
                turn_id,
                reason: TurnEndReason::Error,
            };
            self.renumber(&mut end);
            self.out.push_back(end);
        }
        self.tried.push(instance.name.clone());
        if self.pool.settings.failover
            && !self.closing
            && let Some(()) = self.take_over()
        {
            tracing::warn!(
                from = %instance.name,
                to = %self.slot.instance.name,
                "an engine instance failed ({}); the conversation goes on with another",
                crate::redact::urls_in(&message)
            );
            return;
        }
        self.dead = true;
        self.engine_input = None;
        // What it still reports is not shown, but its usage was spent.
        self.retire_engine(None);
        self.out.push_back(EngineEvent::Error {
            kind: ErrorKind::Fatal,
            message,
        });
        self.out.push_back(EngineEvent::Closed);
    }

    /// Stops listening to the current engine for anything but its usage
    /// (a failed engine's late cost still counts); `next` is the new
    /// engine's events, if any. A failed engine still draining from an
    /// earlier move keeps draining in its own task.
    fn retire_engine(&mut self, next: Option<mpsc::Receiver<EngineEvent>>) {
        let next = next.unwrap_or_else(|| mpsc::channel(1).1);
        let old = std::mem::replace(&mut self.engine_events, next);
        let earlier = self.old_events.replace(old);
        let instance = Arc::clone(&self.slot.instance);
        let earlier_instance = self.old_instance.replace((instance, self.moves));
        if let (Some(mut events), Some((instance, moves))) = (earlier, earlier_instance) {
            let out = self.events.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if let EngineEvent::Usage(mut delta) = event {
                        restream(&mut delta, moves);
                        instance.count(&delta);
                        if out.send(EngineEvent::Usage(delta)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }

    /// Starts the conversation on the next instance with room.
    fn take_over(&mut self) -> Option<()> {
        // The engine asked for still binds; the voice may not exist there.
        let want = Want {
            engine: self.want.engine.clone(),
            voice: String::new(),
        };
        loop {
            let slot = self.pool.place(&want, &self.tried)?;
            let instance = Arc::clone(&slot.instance);
            let mut options = self.options.clone();
            options.history = self.history.messages().to_vec();
            match self.pool.start_on(&instance, &options) {
                Ok(session) => {
                    instance.counters.taken_over.fetch_add(1, Ordering::Relaxed);
                    self.pool.counters.failovers.fetch_add(1, Ordering::Relaxed);
                    self.retire_engine(Some(session.events));
                    self.engine_input = Some(session.input);
                    // The old place goes back only now: the failed
                    // instance is cooling down anyway.
                    self.slot = slot;
                    self.turn_offset = self.last_turn + 1;
                    self.moves += 1;
                    self.failed_at.get_or_insert_with(Instant::now);
                    return Some(());
                }
                Err(_) => self.tried.push(instance.name.clone()),
            }
        }
    }
}

/// Each engine numbers its upstream streams from 0: the ledger, which
/// checks each stream's deltas against its reported totals, sees the
/// `moves`-th engine's streams from `moves << 32`.
fn restream(delta: &mut crate::usage::UsageDelta, moves: u32) {
    if let Some(upstream) = delta.upstream.as_mut() {
        upstream.stream += u64::from(moves) << 32;
    }
}

async fn recv(events: &mut Option<mpsc::Receiver<EngineEvent>>) -> Option<EngineEvent> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn reserve(
    input: &Option<mpsc::Sender<EngineInput>>,
) -> Option<mpsc::Permit<'_, EngineInput>> {
    input.as_ref()?.reserve().await.ok()
}
