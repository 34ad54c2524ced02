//! What a connection tells the ledger: the conversation's start (before
//! the engine starts: one the ledger cannot record does not start) and
//! what the client is told when the ledger or a budget refuses; the rest
//! goes through `server::record`. Without a ledger every call here does
//! nothing and succeeds.

use axum::extract::ws::Message;

use super::super::metrics::Refusal;
use super::super::protocol::{ErrorCode, ProtocolError};
use super::super::record::Record;
use super::{CLOSE_POLICY, CLOSE_TRY_AGAIN, Connection, Exit, Running};
use crate::engine::ConversationOptions;
use crate::engine::pool::Instance;
use crate::ledger::{Admission, Refusal as BudgetRefusal, Started};
use crate::session::CloseReason;
use crate::usage::UsageDelta;

/// The reason of the close frame when the ledger refuses a conversation.
const LEDGER_REASON: &str =
    "ledger_unavailable: the cost of a conversation cannot be recorded now; try again later";

impl Connection {
    /// Admits and records the start; `None` (after refusing the client)
    /// when a budget or the key's limit refuses it or the ledger cannot
    /// record it.
    pub(super) async fn record_start(
        &mut self,
        options: &ConversationOptions,
        instance: &Instance,
        token: &str,
    ) -> Option<Record> {
        let engine = instance.engine();
        let Some(ledger) = self.shared.ledger.get() else {
            return Some(Record::new(None, &self.conversation, engine.prices(), None));
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
            engine: instance.name().to_owned(),
            language: options.language.clone(),
            voice: options.voice.clone(),
            reserve_micro_usd: reserve,
        };
        let e = match ledger.started(start).await {
            Ok(Admission::Admitted(account)) => {
                let ledger = Some(ledger.clone());
                return Some(Record::new(
                    ledger,
                    &self.conversation,
                    engine.prices(),
                    account,
                ));
            }
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

    /// Records one usage delta and settles it against the budgets; `true`
    /// once the ledger holds it (or there is no ledger).
    pub(super) async fn record_usage(&mut self, record: &mut Record, delta: UsageDelta) -> bool {
        match record.usage(delta).await {
            Ok(()) => true,
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
        self.write_failed(running)
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
        self.write_failed(running)
    }

    /// Records the end.
    pub(super) async fn record_end(&mut self, record: &Record, reason: &str, turns: u32) {
        if let Err(e) = record.end(reason, turns).await {
            self.log(&format!(
                "the end of the conversation was not recorded: {e}"
            ));
        }
    }
}
