//! What a connection tells the ledger: the conversation's start (before
//! the engine starts: one the ledger cannot record does not start), each
//! usage delta (committed before the client sees it), each turn and the
//! end. Without a ledger every call here does nothing and succeeds.

use super::super::metrics::Refusal;
use super::super::protocol::{ErrorCode, ProtocolError};
use super::{CLOSE_TRY_AGAIN, Connection, Exit, Running};
use crate::engine::{ConversationOptions, Role, Stage, TurnEndReason};
use crate::ledger::{Started, TurnRecord, UsageRecord};
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
}

impl Record {
    pub(super) fn new(prices: String) -> Self {
        Self {
            prices,
            sequence: 0,
            latency_ms: None,
            user_text: String::new(),
            reply_text: String::new(),
        }
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
    /// Records the start; `false` (after refusing the client) when the
    /// ledger cannot.
    pub(super) async fn record_start(
        &mut self,
        options: &ConversationOptions,
        engine: &str,
    ) -> bool {
        let Some(ledger) = self.shared.ledger.get() else {
            return true;
        };
        let start = Started {
            id: self.conversation.clone(),
            key_id: self.key.clone(),
            client: self.peer.ip(),
            engine: engine.to_owned(),
            language: options.language.clone(),
            voice: options.voice.clone(),
        };
        let Err(e) = ledger.started(start).await else {
            return true;
        };
        self.log(&format!("conversation refused: {e}"));
        self.shared.metrics.refused(Refusal::LedgerUnavailable);
        let error = ProtocolError::new(
            ErrorCode::LedgerUnavailable,
            "the gateway cannot record the cost of a conversation now; try again later",
        );
        self.send_error(&error, true).await;
        self.close(CLOSE_TRY_AGAIN, LEDGER_REASON).await;
        false
    }

    /// Records one usage delta; `true` once the ledger holds it (or there
    /// is no ledger).
    pub(super) async fn record_usage(&mut self, record: &mut Record, delta: UsageDelta) -> bool {
        let Some(ledger) = self.shared.ledger.get() else {
            return true;
        };
        let usage = UsageRecord {
            conversation: self.conversation.clone(),
            stream: 0,
            sequence: record.sequence,
            prices: record.prices.clone(),
            delta,
        };
        record.sequence += 1;
        match ledger.usage(usage).await {
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
