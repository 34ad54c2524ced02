//! Nova Sonic output events → engine-neutral [`EngineEvent`]s.
//!
//! A user turn starts with the USER text block (the caller's transcript,
//! which also marks the end of their speech); assistant blocks that follow
//! belong to it. Barge-in arrives as the `{ "interrupted" : true }` text, as
//! a text block ending `INTERRUPTED`, or both: it is reported once. Usage
//! goes through [`UsageEvents`], so running totals are cross-checked and a
//! new stream never counts twice.

use std::collections::HashMap;

use super::input::BlockRole;
use super::output::{BlockKind, GenerationStage, Output, is_interruption_marker};
use super::usage_event::{Ingested, UsageEvents};
use crate::engine::{EngineEvent, Pcm, Role, Stage, TurnEndReason};
use crate::usage::UsageMeter;

#[derive(Debug, Clone, Copy)]
struct Block {
    kind: BlockKind,
    role: Option<BlockRole>,
    stage: Option<GenerationStage>,
}

/// The translation state of one conversation (across its streams).
#[derive(Debug)]
pub(crate) struct Translator {
    output_rate_hz: u32,
    usage: UsageEvents,
    blocks: HashMap<String, Block>,
    last_turn: u64,
    /// The turn assistant output belongs to, while it is open.
    open_turn: Option<u64>,
    /// The last turn reported as interrupted.
    interrupted: Option<u64>,
    /// Notes for the log: usage that did not add up, unknown events.
    pub(crate) notes: Vec<String>,
}

impl Translator {
    pub(crate) fn new(output_rate_hz: u32, meter: UsageMeter) -> Self {
        Self {
            output_rate_hz,
            usage: UsageEvents::new(meter),
            blocks: HashMap::new(),
            last_turn: 0,
            open_turn: None,
            interrupted: None,
            notes: Vec::new(),
        }
    }

    #[cfg(test)]
    pub(crate) fn meter(&self) -> &UsageMeter {
        self.usage.meter()
    }

    /// A new upstream stream begins (reconnect): block ids and the engine's
    /// running totals start over; turns go on.
    #[cfg(test)]
    pub(crate) fn begin_stream(&mut self) {
        self.blocks.clear();
        self.usage.begin_stream();
    }

    /// A new stream takes over while the old one closes (rotation): the old
    /// one's late usage goes through [`Translator::on_previous_usage`].
    pub(crate) fn begin_overlapping_stream(&mut self) {
        self.blocks.clear();
        self.usage.begin_overlapping_stream();
    }

    /// Usage reported by the stream being closed after a rotation.
    pub(crate) fn on_previous_usage(&mut self, event: &serde_json::Value) -> Vec<EngineEvent> {
        let ingested = self.usage.ingest_previous(event);
        let mut out = Vec::new();
        self.usage_events(ingested, &mut out);
        out
    }

    /// Whether an assistant reply is under way (or awaited after the user's turn).
    pub(crate) fn turn_open(&self) -> bool {
        self.open_turn.is_some()
    }

    /// Ends the open turn, if any (its stream failed): `TurnEnd` with `reason`.
    pub(crate) fn end_open_turn(&mut self, reason: TurnEndReason) -> Option<EngineEvent> {
        let turn = self.open_turn.take()?;
        Some(EngineEvent::TurnEnd {
            turn_id: turn,
            reason,
        })
    }

    /// Typed user text starts a turn: its transcript is the text itself.
    pub(crate) fn user_text(&mut self, text: &str) -> Vec<EngineEvent> {
        let turn = self.new_turn();
        vec![EngineEvent::Transcript {
            role: Role::User,
            text: text.to_owned(),
            stage: Stage::Final,
            turn_id: turn,
        }]
    }

    fn usage_events(&mut self, ingested: Ingested, out: &mut Vec<EngineEvent>) {
        match ingested {
            Ingested::Delta(delta) => {
                if !delta.is_empty() {
                    out.push(EngineEvent::Usage(delta));
                }
            }
            Ingested::Mismatch { delta, warning } => {
                self.notes.push(format!("usage: {warning}"));
                out.push(EngineEvent::Usage(delta));
            }
            Ingested::Unknown { reason } => {
                self.notes
                    .push(format!("usage event not counted: {reason}"));
            }
        }
    }

    fn new_turn(&mut self) -> u64 {
        self.last_turn += 1;
        self.open_turn = Some(self.last_turn);
        self.last_turn
    }

    /// The turn assistant output goes to, opening one when the model speaks
    /// without a user turn (it spoke first, or answered typed text).
    fn assistant_turn(&mut self) -> u64 {
        match self.open_turn {
            Some(turn) => turn,
            None => self.new_turn(),
        }
    }

    fn interrupt(&mut self, turn: u64, out: &mut Vec<EngineEvent>) {
        if self.interrupted != Some(turn) {
            self.interrupted = Some(turn);
            out.push(EngineEvent::Interrupted { turn_id: turn });
        }
    }

    pub(crate) fn on_output(&mut self, output: Output) -> Vec<EngineEvent> {
        let mut out = Vec::new();
        match output {
            Output::ContentStart {
                content_id,
                kind,
                role,
                stage,
            } => {
                if kind == BlockKind::Text && role == Some(BlockRole::User) {
                    let turn = self.new_turn();
                    out.push(EngineEvent::SpeechEnded { turn_id: turn });
                }
                self.blocks.insert(content_id, Block { kind, role, stage });
            }
            Output::TextOutput {
                content_id,
                content,
            } => {
                let block = self.blocks.get(&content_id).copied();
                let role = block.and_then(|b| b.role);
                if role == Some(BlockRole::User) {
                    let turn = self.open_turn.unwrap_or_else(|| self.new_turn());
                    out.push(EngineEvent::Transcript {
                        role: Role::User,
                        text: content,
                        stage: Stage::Final,
                        turn_id: turn,
                    });
                } else if is_interruption_marker(&content) {
                    let turn = self.assistant_turn();
                    self.interrupt(turn, &mut out);
                } else if !content.trim().is_empty() {
                    let stage = match block.and_then(|b| b.stage) {
                        Some(GenerationStage::Speculative) => Stage::Speculative,
                        _ => Stage::Final,
                    };
                    let turn = self.assistant_turn();
                    out.push(EngineEvent::Transcript {
                        role: Role::Assistant,
                        text: content,
                        stage,
                        turn_id: turn,
                    });
                }
            }
            Output::AudioOutput { samples, .. } => {
                self.assistant_turn();
                out.push(EngineEvent::Audio(Pcm {
                    rate_hz: self.output_rate_hz,
                    samples,
                }));
            }
            Output::ToolUse {
                tool_use_id,
                tool_name,
                input,
                ..
            } => {
                self.assistant_turn();
                out.push(EngineEvent::ToolCall {
                    id: tool_use_id,
                    name: tool_name,
                    json: input,
                });
            }
            Output::ContentEnd {
                content_id,
                kind,
                stop_reason,
            } => {
                let block = self.blocks.remove(&content_id);
                let kind = kind.or(block.map(|b| b.kind));
                let assistant_text = kind == Some(BlockKind::Text)
                    && block.is_none_or(|b| b.role == Some(BlockRole::Assistant));
                if assistant_text {
                    let turn = self.open_turn;
                    match (stop_reason.as_deref(), turn) {
                        (Some("INTERRUPTED"), Some(turn)) => {
                            self.interrupt(turn, &mut out);
                            out.push(EngineEvent::TurnEnd {
                                turn_id: turn,
                                reason: TurnEndReason::Interrupted,
                            });
                            self.open_turn = None;
                        }
                        (Some("END_TURN"), Some(turn))
                            if block.and_then(|b| b.stage)
                                != Some(GenerationStage::Speculative) =>
                        {
                            let reason = if self.interrupted == Some(turn) {
                                TurnEndReason::Interrupted
                            } else {
                                TurnEndReason::Completed
                            };
                            out.push(EngineEvent::TurnEnd {
                                turn_id: turn,
                                reason,
                            });
                            self.open_turn = None;
                        }
                        _ => {}
                    }
                }
            }
            Output::Usage(event) => {
                let ingested = self.usage.ingest(&event);
                self.usage_events(ingested, &mut out);
            }
            Output::CompletionStart | Output::CompletionEnd { .. } => {}
            Output::Other(name) => self.notes.push(format!("unknown event {name}")),
        }
        out
    }
}
