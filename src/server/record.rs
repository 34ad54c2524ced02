//! What a conversation tells the ledger, whatever carried it (`/ws` or a
//! phone call): each usage delta (committed before anyone is shown it, and
//! settled against the conversation's budgets), each turn with its latency
//! and, with `ledger.store_transcripts`, what was said, and the end.
//! Without a ledger every call here does nothing and succeeds.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::protocol::Budget;
use crate::engine::pool::{Instance, Started};
use crate::engine::{Role, Stage, TurnEndReason};
use crate::ledger::{Account, Ledger, LedgerError, TurnRecord, UsageRecord};
use crate::usage::UsageDelta;

/// A usage delta's commit in the ledger: the budgets it settled against.
pub(super) type UsageCommit =
    Pin<Box<dyn Future<Output = Result<Option<Account>, LedgerError>> + Send + Sync>>;

/// A usage delta on its way into the ledger, and what waits behind it. The
/// loop that carries a conversation's audio does not wait for the commit
/// (a slow or stalled disk must not stall the conversation, nor make its
/// client look too slow): it polls [`PendingUsage::settled`] beside its
/// other work, and only what must follow the delta waits, in order.
pub(super) struct PendingUsage<T> {
    commit: Option<(UsageDelta, UsageCommit)>,
    held: VecDeque<T>,
}

impl<T> Default for PendingUsage<T> {
    fn default() -> Self {
        Self {
            commit: None,
            held: VecDeque::new(),
        }
    }
}

impl<T> PendingUsage<T> {
    pub(super) fn committing(&self) -> bool {
        self.commit.is_some()
    }

    pub(super) fn begin(&mut self, delta: UsageDelta, commit: UsageCommit) {
        self.commit = Some((delta, commit));
    }

    /// Keeps `item` until the delta being committed is settled.
    pub(super) fn hold(&mut self, item: T) {
        self.held.push_back(item);
    }

    pub(super) fn next_held(&mut self) -> Option<T> {
        self.held.pop_front()
    }

    /// The ledger's answer on the delta being committed; pending while
    /// there is none. Cancel-safe: an unfinished commit stays in place.
    pub(super) async fn settled(&mut self) -> (UsageDelta, Result<Option<Account>, LedgerError>) {
        let Some((delta, commit)) = self.commit.as_mut() else {
            return std::future::pending().await;
        };
        let settled = commit.as_mut().await;
        let delta = *delta;
        self.commit = None;
        (delta, settled)
    }

    /// The conversation is over: the delta being committed, if any, once
    /// the ledger has answered (within its write timeout).
    pub(super) async fn finish(
        &mut self,
    ) -> Option<(UsageDelta, Result<Option<Account>, LedgerError>)> {
        let (delta, commit) = self.commit.take()?;
        Some((delta, commit.await))
    }
}

/// Longest text kept per turn and role.
const MAX_TURN_TEXT_CHARS: usize = 4_000;

/// The ledger's share of a running conversation.
#[derive(Debug)]
pub(super) struct Record {
    ledger: Option<Ledger>,
    conversation: String,
    /// The engine's price table, stamped on each usage row.
    prices: String,
    /// The next usage delta's sequence number.
    sequence: u64,
    /// The latest turn's latency, until its `turn_end`.
    pub(super) latency_ms: Option<u64>,
    /// What was said in the current turn (final transcripts).
    user_text: String,
    reply_text: String,
    /// The conversation's budgets, when any limits it.
    account: Option<Account>,
    /// The budget's end was reported.
    told_spent: bool,
    /// The usage the ledger holds (all of it, without a ledger).
    total: UsageDelta,
    /// The instance whose cost this conversation's usage adds to (one
    /// engine on its own: a routed conversation's relay counts it).
    counted: Option<Arc<Instance>>,
}

impl Record {
    pub(super) fn new(
        ledger: Option<Ledger>,
        conversation: &str,
        prices: String,
        account: Option<Account>,
    ) -> Self {
        Self {
            ledger,
            conversation: conversation.to_owned(),
            prices,
            sequence: 0,
            latency_ms: None,
            user_text: String::new(),
            reply_text: String::new(),
            account,
            told_spent: false,
            total: UsageDelta::default(),
            counted: None,
        }
    }

    /// The engine started: when another instance than the one placed on
    /// took it, its prices apply; one engine on its own has its cost
    /// counted here.
    pub(super) fn started_on(&mut self, placed: &Arc<Instance>, started: &Started, routed: bool) {
        if !Arc::ptr_eq(&started.instance, placed) {
            self.prices = started.instance.engine().prices();
        }
        if !routed {
            self.counted = Some(Arc::clone(&started.instance));
        }
    }

    /// The conversation moved to another engine instance: its row names
    /// that one, and its usage is costed at that one's prices.
    pub(super) fn moved(&mut self, engine: &str, model: &str, voice: &str, prices: String) {
        if let Some(ledger) = &self.ledger {
            ledger.ready(&self.conversation, engine, model, voice);
        }
        self.prices = prices;
    }

    /// The usage recorded so far.
    pub(super) fn total(&self) -> &UsageDelta {
        &self.total
    }

    /// What is left of the budget, for the client.
    pub(super) fn budget(&self) -> Option<Budget> {
        let remaining = self.account.as_ref()?.standing.remaining_micro_usd?;
        Some(Budget {
            remaining_micro_usd: remaining,
        })
    }

    /// Whether the budget just ran out (`true` once).
    pub(super) fn exhausted(&mut self) -> bool {
        let spent = self
            .account
            .as_ref()
            .is_some_and(|account| account.standing.exhausted);
        if spent && !self.told_spent {
            self.told_spent = true;
            return true;
        }
        false
    }

    /// Records one usage delta and settles it against the budgets; once
    /// the ledger holds it, it counts in [`Record::total`]. A delta the
    /// ledger could not take is not counted (nobody may be shown it).
    pub(super) async fn usage(&mut self, delta: UsageDelta) -> Result<(), LedgerError> {
        match self.begin_usage(&delta) {
            Some(commit) => {
                let settled = commit.await;
                self.settle_usage(&delta, settled)
            }
            None => Ok(()),
        }
    }

    /// Hands one usage delta to the ledger and returns its commit, to be
    /// awaited while the conversation goes on and then given to
    /// [`Record::settle_usage`] before the next delta begins (each record
    /// carries the budgets the one before settled). Without a ledger the
    /// delta counts at once and there is nothing to wait for.
    pub(super) fn begin_usage(&mut self, delta: &UsageDelta) -> Option<UsageCommit> {
        if let Some(instance) = &self.counted {
            instance.count(delta);
        }
        let Some(ledger) = &self.ledger else {
            self.total.add(delta);
            return None;
        };
        let usage = UsageRecord {
            conversation: self.conversation.clone(),
            stream: delta.upstream.map_or(0, |upstream| upstream.stream),
            sequence: self.sequence,
            prices: self.prices.clone(),
            delta: *delta,
            account: self.account.clone(),
        };
        self.sequence += 1;
        let ledger = ledger.clone();
        Some(Box::pin(async move { ledger.usage(usage).await }))
    }

    /// What the ledger answered on a delta from [`Record::begin_usage`]:
    /// once it holds the delta, the delta counts and its budgets apply.
    pub(super) fn settle_usage(
        &mut self,
        delta: &UsageDelta,
        settled: Result<Option<Account>, LedgerError>,
    ) -> Result<(), LedgerError> {
        let mut total = self.total;
        total.add(delta);
        if let Some(mut account) = settled? {
            account.apply_conversation_cap(total.cost_micro_usd);
            self.account = Some(account);
        }
        self.total = total;
        Ok(())
    }

    /// A transcript: final ones are kept for the turn's record.
    pub(super) fn heard(&mut self, role: Role, stage: Stage, text: &str) {
        if stage != Stage::Final || self.ledger.is_none() {
            return;
        }
        let kept = match role {
            Role::User => &mut self.user_text,
            Role::Assistant => &mut self.reply_text,
        };
        if kept.chars().count() >= MAX_TURN_TEXT_CHARS {
            return;
        }
        if !kept.is_empty() {
            kept.push(' ');
        }
        kept.extend(text.chars().take(MAX_TURN_TEXT_CHARS));
    }

    /// Records a finished turn (not waited for).
    pub(super) fn turn(&mut self, turn: u64, reason: TurnEndReason) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        let outcome = match reason {
            TurnEndReason::Completed => "completed",
            TurnEndReason::Interrupted => "interrupted",
            TurnEndReason::Empty => "empty",
            TurnEndReason::Error => "error",
        };
        let text = |kept: &mut String| Some(std::mem::take(kept)).filter(|t| !t.is_empty());
        ledger.turn(TurnRecord {
            conversation: self.conversation.clone(),
            turn,
            latency_ms: self.latency_ms.take(),
            outcome: outcome.to_owned(),
            user_text: text(&mut self.user_text),
            reply_text: text(&mut self.reply_text),
        });
    }

    /// Records the end; returns once it is committed.
    pub(super) async fn end(&self, reason: &str, turns: u32) -> Result<(), LedgerError> {
        match &self.ledger {
            Some(ledger) => ledger.ended(&self.conversation, reason, turns).await,
            None => Ok(()),
        }
    }
}
