//! The service's messages as the conversation's events: turns, transcripts,
//! reply audio, barge-in, tools, usage, session handles and `goAway`.
//!
//! A turn opens at the first thing heard or said after the last one ended:
//! the user's transcript, typed text, or the model's first output. It ends
//! at `turnComplete` (the user's words and the reply become final), or at
//! `interrupted` when the user speaks over the reply; the `turnComplete`
//! the service sends after an interruption is then skipped. The user's
//! words that arrive before `interrupted` belong to the interrupted turn.

use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{Driver, Step, Turn};
use crate::engine::gemini_live::wire::{FunctionCall, ServerContent, ServerMessage, UsageMetadata};
use crate::engine::{EngineEvent, Pcm, Role, Stage, TurnEndReason};

impl Driver {
    pub(super) async fn on_server(&mut self, message: ServerMessage) -> Step {
        if let Some(update) = &message.session_resumption_update
            && update.resumable
            && !update.new_handle.is_empty()
        {
            self.handle = Some(update.new_handle.clone());
        }
        if let Some(activity) = &message.voice_activity {
            self.on_voice_activity(&activity.voice_activity_type).await;
        }
        if let Some(calls) = message.tool_call {
            for call in calls.function_calls {
                self.on_call(call).await;
            }
        }
        if let Some(cancelled) = message.tool_call_cancellation {
            for id in cancelled.ids {
                self.tools.finished(&id);
                if self.calls.remove(&id).is_some() {
                    tracing::debug!(id, "tool call cancelled by the service");
                }
            }
        }
        let mut step = Step::Go;
        if let Some(content) = message.server_content {
            step = self.on_content(content).await;
        }
        if let Some(usage) = &message.usage_metadata {
            self.on_usage(usage).await;
        }
        if let Some(go_away) = &message.go_away {
            let left = go_away.time_left().unwrap_or_default();
            tracing::info!(
                time_left_ms = left.as_millis(),
                "Gemini Live connection ending (goAway)"
            );
            // At the next quiet moment, and at the latest halfway to the end.
            self.go_away = Some(Instant::now() + left / 2);
        }
        if matches!(step, Step::Go) && self.closing_since.is_some() && self.quiet() {
            return Step::Stop;
        }
        step
    }

    /// The turn in progress, opened if there is none.
    pub(super) fn begin_turn(&mut self) -> &mut Turn {
        if self.turn.is_none() {
            self.turn_ids += 1;
            self.turn = Some(Turn {
                id: self.turn_ids,
                ..Turn::default()
            });
        }
        self.turn.get_or_insert_with(Turn::default)
    }

    /// The model produced something: the turn (opened if need be) has output.
    fn model_output(&mut self) -> u64 {
        self.awaiting = None;
        self.stale_turn_complete = false;
        let turn = self.begin_turn();
        turn.output = true;
        turn.id
    }

    /// Final transcripts, the history, and the turn's end.
    pub(super) async fn finish_turn(&mut self, turn: Turn, reason: TurnEndReason) {
        for (role, text) in [
            (Role::User, turn.user.trim()),
            (Role::Assistant, turn.assistant.trim()),
        ] {
            if text.is_empty() {
                continue;
            }
            self.history.push(role, text);
            self.events
                .emit(EngineEvent::Transcript {
                    role,
                    text: text.to_owned(),
                    stage: Stage::Final,
                    turn_id: turn.id,
                })
                .await;
        }
        self.events
            .emit(EngineEvent::TurnEnd {
                turn_id: turn.id,
                reason,
            })
            .await;
    }

    /// The user spoke over the reply: the client drops the audio it queued
    /// (the service has no truncation; it keeps only what it sent).
    async fn barge_in(&mut self) {
        let Some(turn) = self.turn.take_if(|t| t.output) else {
            return;
        };
        self.events
            .emit(EngineEvent::Interrupted { turn_id: turn.id })
            .await;
        self.finish_turn(turn, TurnEndReason::Interrupted).await;
        self.stale_turn_complete = true;
    }

    /// The conversation moved to a resumed connection while a turn was open
    /// on the old one: that turn goes no further.
    pub(super) async fn abandon_turn(&mut self) {
        self.calls.clear();
        if let Some(turn) = self.turn.take() {
            if turn.audio {
                self.events
                    .emit(EngineEvent::Interrupted { turn_id: turn.id })
                    .await;
            }
            self.finish_turn(turn, TurnEndReason::Error).await;
        }
    }

    async fn on_voice_activity(&mut self, kind: &str) {
        match kind {
            "ACTIVITY_START" => {
                self.barge_in().await;
                let id = self.begin_turn().id;
                self.events
                    .emit(EngineEvent::SpeechStarted { turn_id: id })
                    .await;
            }
            "ACTIVITY_END" => {
                if let Some(turn) = self.turn.as_ref().filter(|t| !t.output) {
                    let turn_id = turn.id;
                    self.awaiting = Some(Instant::now());
                    self.events.emit(EngineEvent::SpeechEnded { turn_id }).await;
                }
            }
            _ => {}
        }
    }

    async fn on_call(&mut self, call: FunctionCall) {
        self.model_output();
        if let Some(turn) = self.turn.as_mut() {
            turn.calls += 1;
        }
        let args = if call.args.is_null() {
            serde_json::json!({})
        } else {
            call.args
        };
        self.calls
            .insert(call.id.clone(), (call.name.clone(), self.generation));
        if !self.tools.run(&call.id, &call.name, &args, self.generation) {
            self.events
                .emit(EngineEvent::ToolCall {
                    id: call.id,
                    name: call.name,
                    json: args,
                })
                .await;
        }
    }

    async fn on_content(&mut self, content: ServerContent) -> Step {
        if let Some(heard) = content.input_transcription
            && !heard.text.is_empty()
        {
            let turn = self.begin_turn();
            turn.user.push_str(&heard.text);
            if !turn.output {
                // The user is still talking; the reply is due after the last words.
                self.awaiting = Some(Instant::now());
            }
        }
        if let Some(model_turn) = content.model_turn {
            for part in model_turn.parts {
                if let Some(blob) = part.inline_data {
                    self.on_audio(&blob).await;
                }
            }
        }
        if let Some(said) = content.output_transcription
            && !said.text.is_empty()
        {
            let turn_id = self.model_output();
            if let Some(turn) = self.turn.as_mut() {
                turn.assistant.push_str(&said.text);
                let text = turn.assistant.trim().to_owned();
                self.events
                    .reply_transcript(text, Stage::Speculative, turn_id)
                    .await;
            }
        }
        if content.interrupted {
            self.barge_in().await;
        }
        if content.turn_complete {
            self.on_turn_complete().await;
        }
        Step::Go
    }

    async fn on_audio(&mut self, blob: &crate::engine::gemini_live::wire::Blob) {
        let malformed = || {
            self.shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
        };
        let Some(rate_hz) = blob.pcm_rate_hz() else {
            malformed();
            return;
        };
        let Ok(bytes) = crate::base64::decode(&blob.data) else {
            malformed();
            return;
        };
        let samples: Vec<i16> = crate::audio::samples_from_le(&bytes).collect();
        if samples.is_empty() {
            return;
        }
        self.model_output();
        if let Some(turn) = self.turn.as_mut() {
            turn.audio = true;
        }
        self.events
            .emit(EngineEvent::Audio(Pcm { rate_hz, samples }))
            .await;
    }

    async fn on_turn_complete(&mut self) {
        if self.stale_turn_complete {
            // The interrupted turn's own end: it was ended at the barge-in.
            self.stale_turn_complete = false;
            if self.turn.as_ref().is_none_or(|t| !t.output) {
                return;
            }
        }
        let Some(turn) = self.turn.take() else {
            return;
        };
        let calls_open = self.calls.values().any(|(_, g)| *g == self.generation);
        if turn.calls > 0 && !turn.audio && (calls_open || self.awaiting.is_some()) {
            // A turn that only called tools goes on once they answer.
            self.turn = Some(turn);
            return;
        }
        if !turn.output {
            // The service let the user's words go unanswered.
            self.awaiting = None;
            self.finish_turn(turn, TurnEndReason::Empty).await;
            return;
        }
        self.retries.reset();
        self.retried_once = false;
        self.awaiting = None;
        self.finish_turn(turn, TurnEndReason::Completed).await;
    }

    async fn on_usage(&mut self, usage: &UsageMetadata) {
        let billed = self.costing.turn(usage);
        if billed.mismatch {
            self.shared
                .stats
                .usage_mismatches
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                ?usage,
                "Gemini Live usage lists do not add up to the totals"
            );
        }
        if !billed.delta.is_empty() {
            self.events.emit(EngineEvent::Usage(billed.delta)).await;
        }
    }
}
