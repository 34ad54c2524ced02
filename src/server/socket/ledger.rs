//! What a connection tells the ledger: the conversation's start (before
//! the engine starts: one the ledger cannot record does not start), each
//! usage delta (committed before the client sees it), each turn and the
//! end. Without a ledger every call here does nothing and succeeds.

use axum::extract::ws::Message;

use super::super::metrics::Refusal;
use super::super::protocol::{Budget, ErrorCode, ProtocolError};
use super::{CLOSE_POLICY, CLOSE_TRY_AGAIN, Connection, Exit, Running};
use crate::engine::{ConversationOptions, Engine, Role, Stage, TurnEndReason};
use crate::ledger::{
    Account, Admission, Refusal as BudgetRefusal, Started, TurnRecord, UsageRecord,
};
use crate::session::CloseReason;
use crate::usage::UsageDelta;

/// The reason of the close frame when the ledger refuses a conversation.
const LEDGER_REASON: &str =
    "ledger_unavailable: the cost of a conversation cannot be recorded now; try again later";

/// Longest text kept per turn and role.
const MAX_TURN_TEXT_CHARS: usize = 4_000;

/// The ledger's share of a running conversation.
#[derive(Debug)]
pub(super) struct Record {
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
    /// The client was told the budget is spent.
    told_spent: bool,
}

impl Record {
    pub(super) fn new(prices: String, account: Option<Account>) -> Self {
        Self {
            prices,
            sequence: 0,
            latency_ms: None,
            user_text: String::new(),
            reply_text: String::new(),
            account,
            told_spent: false,
        }
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

    /// A transcript: final ones are kept for the turn's record.
    pub(super) fn heard(&mut self, role: Role, stage: Stage, text: &str) {
        if stage != Stage::Final {
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
}

impl Connection {
    /// Admits and records the start; `None` (after refusing the client)
    /// when a budget or the key's limit refuses it or the ledger cannot
    /// record it.
    pub(super) async fn record_start(
        &mut self,
        options: &ConversationOptions,
        engine: &dyn Engine,
        token: &str,
    ) -> Option<Record> {
        let Some(ledger) = self.shared.ledger.get() else {
            return Some(Record::new(engine.prices(), None));
        };
        let reserve = if engine.paid() {
            self.shared.config.ledger.turn_reserve_micro_usd()
        } else {
            0
        };
        let start = Started {
            id: self.conversation.clone(),
            key_id: self.key.clone(),
            client: crate::ledger::client_hash(&self.peer.ip().to_string()),
            channel: "web",
            engine: engine.name().to_owned(),
            language: options.language.clone(),
            voice: options.voice.clone(),
            reserve_micro_usd: reserve,
        };
        let e = match ledger.started(start).await {
            Ok(Admission::Admitted(account)) => return Some(Record::new(engine.prices(), account)),
            Ok(Admission::Refused(refusal)) => {
                if matches!(refusal, BudgetRefusal::Sessions { .. }) {
                    // Worth trying again soon: the token still works.
                    self.release_token(token).await;
                }
                self.refuse(&refusal).await;
                return None;
            }
            Err(e) => e,
        };
        self.log(&format!("conversation refused: {e}"));
        self.shared.metrics.refused(Refusal::LedgerUnavailable);
        let error = ProtocolError::new(
            ErrorCode::LedgerUnavailable,
            "the gateway cannot record the cost of a conversation now; try again later",
        );
        self.send_error(&error, true).await;
        self.close(CLOSE_TRY_AGAIN, LEDGER_REASON).await;
        None
    }

    /// Gives back the client token of a conversation that did not start
    /// for a passing reason (none without keys).
    pub(super) async fn release_token(&mut self, token: &str) {
        let (Some(ledger), Some(_)) = (self.shared.ledger.get(), &self.key) else {
            return;
        };
        if let Err(e) = ledger.release_token(token).await {
            self.log(&format!("a client token could not be given back: {e}"));
        }
    }

    /// Refuses a conversation a budget or its key's limit has no room for.
    async fn refuse(&mut self, refusal: &BudgetRefusal) {
        let message = refusal.message();
        self.log(&format!("conversation refused: {message}"));
        let (refused, code, close, reason) = match refusal {
            BudgetRefusal::Budget { .. } => (
                Refusal::BudgetExceeded,
                ErrorCode::BudgetExceeded,
                CLOSE_POLICY,
                "budget_exceeded",
            ),
            BudgetRefusal::Sessions { .. } => (
                Refusal::KeyBusy,
                ErrorCode::KeyBusy,
                CLOSE_TRY_AGAIN,
                "key_busy",
            ),
        };
        self.shared.metrics.refused(refused);
        self.send_error(&ProtocolError::new(code, message), true)
            .await;
        self.close(close, reason).await;
    }

    /// Records one usage delta (`total`: the conversation's with it) and
    /// settles it against the budgets; `true` once the ledger holds it (or
    /// there is no ledger).
    pub(super) async fn record_usage(
        &mut self,
        record: &mut Record,
        delta: UsageDelta,
        total: &UsageDelta,
    ) -> bool {
        let Some(ledger) = self.shared.ledger.get() else {
            return true;
        };
        let usage = UsageRecord {
            conversation: self.conversation.clone(),
            stream: delta.upstream.map_or(0, |upstream| upstream.stream),
            sequence: record.sequence,
            prices: record.prices.clone(),
            delta,
            account: record.account.clone(),
        };
        record.sequence += 1;
        match ledger.usage(usage).await {
            Ok(account) => {
                if let Some(mut account) = account {
                    account.apply_conversation_cap(total.cost_micro_usd);
                    record.account = Some(account);
                }
                true
            }
            Err(e) => {
                self.log(&format!("usage not recorded: {e}"));
                self.shared.metrics.error(ErrorCode::LedgerUnavailable);
                false
            }
        }
    }

    /// A paid delta could not be recorded: the client is told, and the
    /// conversation ends once the reply in progress is done.
    pub(super) async fn ledger_failed(&mut self, running: &mut Running) -> Option<Exit> {
        running
            .handle
            .shutdown
            .trigger_with(CloseReason::LedgerUnavailable);
        let error = ProtocolError::new(
            ErrorCode::LedgerUnavailable,
            "the cost of this conversation cannot be recorded; it ends after this reply",
        );
        if running.client_gone || self.send_error(&error, false).await {
            return None;
        }
        Some(self.write_failed(running))
    }

    /// The budget has no room for another turn: after `usage` (the
    /// message showing the delta that spent it), the client is told, and
    /// the conversation ends once the reply in progress is done.
    pub(super) async fn budget_spent(
        &mut self,
        running: &mut Running,
        usage: String,
    ) -> Option<Exit> {
        running
            .handle
            .shutdown
            .trigger_with(CloseReason::BudgetExceeded);
        self.log("the budget is spent: the conversation ends after this reply");
        if running.client_gone {
            return None;
        }
        let error = ProtocolError::new(
            ErrorCode::BudgetExceeded,
            "the budget has no room for another turn; the conversation ends after this reply",
        );
        if self.feed(Message::Text(usage.into())).await && self.send_error(&error, false).await {
            return None;
        }
        Some(self.write_failed(running))
    }

    /// Records a finished turn (not waited for).
    pub(super) fn record_turn(&self, record: &mut Record, turn: u64, reason: TurnEndReason) {
        let Some(ledger) = self.shared.ledger.get() else {
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
            latency_ms: record.latency_ms.take(),
            outcome: outcome.to_owned(),
            user_text: text(&mut record.user_text),
            reply_text: text(&mut record.reply_text),
        });
    }

    /// Records the end.
    pub(super) async fn record_end(&mut self, reason: &str, turns: u32) {
        let Some(ledger) = self.shared.ledger.get() else {
            return;
        };
        if let Err(e) = ledger.ended(&self.conversation, reason, turns).await {
            self.log(&format!(
                "the end of the conversation was not recorded: {e}"
            ));
        }
    }
}
