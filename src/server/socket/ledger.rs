//! What a connection tells the ledger: the conversation's start (before
//! the engine starts: one the ledger cannot record does not start) and
//! what the client is told when the ledger or a budget refuses; the rest
//! goes through `server::record`. Without a ledger every call here does
//! nothing and succeeds.

use axum::extract::ws::Message;

use super::super::metrics::Refusal;
use super::super::protocol::{ErrorCode, ProtocolError, ServerMessage};
use super::super::record::{PendingUsage, Record};
use super::{CLOSE_POLICY, CLOSE_TRY_AGAIN, Connection, Exit, Running};
use crate::engine::pool::Instance;
use crate::engine::{ConversationOptions, EngineEvent};
use crate::ledger::{Account, Admission, LedgerError, Refusal as BudgetRefusal, Started};
use crate::session::{ClientOutput, CloseReason};
use crate::usage::UsageDelta;

/// Whether `output` waits behind a usage delta the ledger is committing
/// (see [`PendingUsage`]): the next delta (each record carries the budgets
/// the one before settled) and the end, whose total is what the ledger
/// holds. Reply audio, transcripts and the rest go on meanwhile.
pub(super) fn held(pending: &PendingUsage<ClientOutput>, output: &ClientOutput) -> bool {
    pending.committing()
        && matches!(
            output,
            ClientOutput::Event(EngineEvent::Usage(_)) | ClientOutput::Closed { .. }
        )
}

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

    /// A usage delta from the conversation: handed to the ledger, and shown
    /// once the ledger holds it (at once without a ledger).
    pub(super) async fn on_usage(
        &mut self,
        running: &mut Running,
        delta: UsageDelta,
    ) -> Option<Exit> {
        match running.record.begin_usage(&delta) {
            Some(commit) => {
                running.usage.begin(delta, commit);
                None
            }
            None => self.show_usage(running, delta, Ok(())).await,
        }
    }

    /// The ledger answered on the delta it was committing: it is shown,
    /// then what waited behind it (the next delta begins); one flush.
    pub(super) async fn on_usage_settled(
        &mut self,
        running: &mut Running,
        (delta, settled): (UsageDelta, Result<Option<Account>, LedgerError>),
    ) -> Option<Exit> {
        let recorded = running.record.settle_usage(&delta, settled);
        if let Some(exit) = self.show_usage(running, delta, recorded).await {
            return Some(exit);
        }
        while !running.usage.committing()
            && let Some(output) = running.usage.next_held()
        {
            if let Some(exit) = self.on_output(running, output).await {
                return Some(exit);
            }
        }
        if running.client_gone || self.flush().await {
            return None;
        }
        self.write_failed(running)
    }

    /// The connection is done: the delta being committed is waited for
    /// (within the ledger's write timeout) and what waited behind it
    /// recorded, shown to no one.
    pub(super) async fn settle_pending_usage(
        &mut self,
        record: &mut Record,
        pending: &mut PendingUsage<ClientOutput>,
    ) {
        if let Some((delta, settled)) = pending.finish().await
            && let Err(e) = record.settle_usage(&delta, settled)
        {
            self.log(&format!("usage not recorded: {e}"));
            self.shared.metrics.error(ErrorCode::LedgerUnavailable);
        }
        while let Some(output) = pending.next_held() {
            if let ClientOutput::Event(EngineEvent::Usage(delta)) = output {
                let _ = self.record_usage(record, delta).await;
            }
        }
    }

    /// A usage delta the ledger holds (`Ok`) is shown with the total; one
    /// it could not record is not, and a paid one ends the conversation.
    async fn show_usage(
        &mut self,
        running: &mut Running,
        delta: UsageDelta,
        recorded: Result<(), LedgerError>,
    ) -> Option<Exit> {
        if let Err(e) = recorded {
            self.log(&format!("usage not recorded: {e}"));
            self.shared.metrics.error(ErrorCode::LedgerUnavailable);
            // Not shown: the ledger does not hold it. A paid conversation
            // stops rather than spend unrecorded money.
            if delta.cost_micro_usd > 0 {
                return self.ledger_failed(running).await;
            }
            return None;
        }
        self.shared.metrics.usage(&delta);
        let text = ServerMessage::Usage {
            delta: &delta,
            total: running.record.total(),
            budget: running.record.budget(),
        }
        .to_text();
        if running.record.exhausted() {
            return self.budget_spent(running, text).await;
        }
        if running.client_gone || self.feed(Message::Text(text.into())).await {
            return None;
        }
        self.write_failed(running)
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
