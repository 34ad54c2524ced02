//! What a conversation tells the ledger, whatever carried it (`/ws` or a
//! phone call): each usage delta (committed before anyone is shown it, and
//! settled against the conversation's budgets), each turn with its latency
//! and, with `ledger.store_transcripts`, what was said, and the end.
//! Without a ledger every call here does nothing and succeeds.

use std::sync::Arc;

use super::protocol::Budget;
use crate::engine::pool::{Instance, Started};
use crate::engine::{Role, Stage, TurnEndReason};
use crate::ledger::{Account, Ledger, LedgerError, TurnRecord, UsageRecord};
use crate::usage::UsageDelta;

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
        if let Some(instance) = &self.counted {
            instance.count(&delta);
        }
        let Some(ledger) = &self.ledger else {
            self.total.add(&delta);
            return Ok(());
        };
        let mut total = self.total;
        total.add(&delta);
        let usage = UsageRecord {
            conversation: self.conversation.clone(),
            stream: delta.upstream.map_or(0, |upstream| upstream.stream),
            sequence: self.sequence,
            prices: self.prices.clone(),
            delta,
            account: self.account.clone(),
        };
        self.sequence += 1;
        if let Some(mut account) = ledger.usage(usage).await? {
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
