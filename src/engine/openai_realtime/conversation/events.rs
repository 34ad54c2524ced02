//! The service's events as the conversation's: turns from its voice
//! detection, barge-in, transcripts, reply audio, tools, usage and errors.

use tokio::time::Instant;

use super::{Driver, Playing, Reply, Step};
use crate::engine::openai_realtime::RATE_HZ;
use crate::engine::openai_realtime::wire::{ApiError, ClientEvent, ResponseInfo, ServerEvent};
use crate::engine::{EngineEvent, ErrorKind, Pcm, Role, Stage, TurnEndReason};

/// User audio items remembered for their late transcripts.
const MAX_ITEMS: usize = 16;

impl Driver {
    pub(super) async fn on_event(&mut self, event: ServerEvent) -> Step {
        let now = Instant::now();
        match event {
            ServerEvent::SessionCreated {}
            | ServerEvent::SessionUpdated {}
            | ServerEvent::Other => {}
            ServerEvent::Error { error } => return self.on_error(&error).await,
            ServerEvent::SpeechStarted { item_id } => {
                self.barge_in(now).await;
                self.turn += 1;
                self.user_speaking = true;
                self.items.push_back((item_id, self.turn));
                if self.items.len() > MAX_ITEMS {
                    self.items.pop_front();
                }
                self.events
                    .emit(EngineEvent::SpeechStarted { turn_id: self.turn })
                    .await;
            }
            ServerEvent::SpeechStopped { .. } => {
                self.user_speaking = false;
                self.awaiting = Some(now);
                self.events
                    .emit(EngineEvent::SpeechEnded { turn_id: self.turn })
                    .await;
            }
            ServerEvent::InputTranscriptDelta { .. }
            | ServerEvent::InputTranscriptFailed { .. } => {}
            ServerEvent::InputTranscript {
                item_id,
                transcript,
                usage,
            } => {
                let turn_id = self
                    .items
                    .iter()
                    .find(|(id, _)| *id == item_id)
                    .map_or(self.turn, |(_, turn)| *turn);
                if !transcript.trim().is_empty() {
                    self.history.push(Role::User, &transcript);
                    self.events
                        .emit(EngineEvent::Transcript {
                            role: Role::User,
                            text: transcript.trim().to_owned(),
                            stage: Stage::Final,
                            turn_id,
                        })
                        .await;
                }
                if let Some(delta) = usage.and_then(|u| self.costing.transcription(&u))
                    && !delta.is_empty()
                {
                    self.events.emit(EngineEvent::Usage(delta)).await;
                }
            }
            ServerEvent::ResponseCreated { .. } => {
                self.awaiting = None;
                self.reply = Some(Reply {
                    turn: self.turn,
                    calls: 0,
                    audio: false,
                    transcript: String::new(),
                });
            }
            ServerEvent::AudioDelta { item_id, delta, .. } => {
                self.on_audio(item_id, &delta, now).await;
            }
            ServerEvent::TranscriptDelta { delta, .. } => {
                let Some(reply) = self.reply.as_mut() else {
                    return Step::Go;
                };
                reply.transcript.push_str(&delta);
                let (text, turn_id) = (reply.transcript.clone(), reply.turn);
                self.events
                    .reply_transcript(text, Stage::Speculative, turn_id)
                    .await;
            }
            ServerEvent::TranscriptDone { transcript, .. } => {
                let turn_id = self.reply.as_ref().map_or(self.turn, |r| r.turn);
                if !transcript.trim().is_empty() {
                    self.history.push(Role::Assistant, &transcript);
                    self.events
                        .reply_transcript(transcript.trim().to_owned(), Stage::Final, turn_id)
                        .await;
                }
            }
            ServerEvent::FunctionCall {
                call_id,
                name,
                arguments,
            } => {
                if let Some(reply) = self.reply.as_mut() {
                    reply.calls += 1;
                }
                let json = if arguments.trim().is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::from_str(&arguments)
                        .unwrap_or_else(|_| serde_json::json!({"unreadable_arguments": arguments}))
                };
                if !self.tools.run(&call_id, &name, &json, self.generation) {
                    self.events
                        .emit(EngineEvent::ToolCall {
                            id: call_id,
                            name,
                            json,
                        })
                        .await;
                }
            }
            ServerEvent::ResponseDone { response } => return self.on_response_done(response).await,
        }
        Step::Go
    }

    async fn on_audio(&mut self, item_id: String, delta: &str, now: Instant) {
        if self.cut_item.as_deref() == Some(item_id.as_str()) {
            return;
        }
        let Ok(bytes) = crate::base64::decode(delta) else {
            self.shared
                .stats
                .malformed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        let samples: Vec<i16> = crate::audio::samples_from_le(&bytes).collect();
        if samples.is_empty() {
            return;
        }
        let turn = self.reply.as_ref().map_or(self.turn, |r| r.turn);
        if let Some(reply) = self.reply.as_mut() {
            reply.audio = true;
        }
        match self.playing.as_mut() {
            Some(p) if p.item_id == item_id => {
                // Audio arriving after the earlier audio was all heard
                // starts playing when it arrives.
                if p.heard_ms(now) >= p.ms() {
                    let behind = std::time::Duration::from_millis(p.ms());
                    p.first_at = now.checked_sub(behind).unwrap_or(p.first_at);
                }
                p.samples += samples.len() as u64;
            }
            _ => {
                self.playing = Some(Playing {
                    item_id,
                    turn,
                    first_at: now,
                    samples: samples.len() as u64,
                });
            }
        }
        self.events
            .emit(EngineEvent::Audio(Pcm {
                rate_hz: RATE_HZ,
                samples,
            }))
            .await;
    }

    /// The user spoke over reply audio still playing: the client drops what
    /// is queued, and the service keeps only what was heard.
    async fn barge_in(&mut self, now: Instant) {
        let Some(playing) = self.playing.take() else {
            return;
        };
        let heard = playing.heard_ms(now);
        if heard >= playing.ms() {
            return;
        }
        self.send(&ClientEvent::Truncate {
            item_id: playing.item_id.clone(),
            content_index: 0,
            audio_end_ms: heard,
        })
        .await;
        tracing::debug!(
            heard_ms = heard,
            sent_ms = playing.ms(),
            "reply cut by the user"
        );
        self.cut_item = Some(playing.item_id);
        self.events
            .emit(EngineEvent::Interrupted {
                turn_id: playing.turn,
            })
            .await;
    }

    async fn on_response_done(&mut self, response: ResponseInfo) -> Step {
        if let Some(usage) = &response.usage {
            let delta = self.costing.response(usage);
            if !delta.is_empty() {
                self.events.emit(EngineEvent::Usage(delta)).await;
            }
        }
        let reply = self.reply.take().unwrap_or(Reply {
            turn: self.turn,
            calls: 0,
            audio: false,
            transcript: String::new(),
        });
        let reason = match response.status.as_str() {
            "cancelled" => Some(TurnEndReason::Interrupted),
            "failed" => {
                let error = response
                    .status_details
                    .as_ref()
                    .and_then(|d| d.error.clone())
                    .unwrap_or_default();
                if error.throttled() {
                    self.shared.cool_down();
                }
                self.events
                    .emit(EngineEvent::Error {
                        kind: ErrorKind::Transient,
                        message: format!(
                            "OpenAI Realtime could not answer: {} {}",
                            error.code(),
                            error.message
                        ),
                    })
                    .await;
                Some(TurnEndReason::Error)
            }
            // A reply that only called tools goes on once they answer.
            _ if reply.calls > 0 && !reply.audio => None,
            _ => {
                self.retries.reset();
                Some(TurnEndReason::Completed)
            }
        };
        if let Some(reason) = reason {
            self.events
                .emit(EngineEvent::TurnEnd {
                    turn_id: reply.turn,
                    reason,
                })
                .await;
        }
        if self.closing_since.is_some() && self.tools.idle() && reason.is_some() {
            return Step::Stop;
        }
        Step::Go
    }

    async fn on_error(&mut self, error: &ApiError) -> Step {
        let code = error.code();
        tracing::warn!(code, message = %error.message, "OpenAI Realtime error event");
        if error.throttled() {
            self.shared.cool_down();
        }
        if code == "session_expired" {
            return self.lost("the session expired".into()).await;
        }
        if code.contains("api_key") || error.kind.contains("authentication") {
            return self
                .events
                .fail(format!(
                    "OpenAI Realtime refused the key: {}",
                    error.message
                ))
                .await;
        }
        // Most errors leave the session usable (a truncate past the end,
        // nothing to cancel).
        self.events
            .emit(EngineEvent::Error {
                kind: ErrorKind::Transient,
                message: format!("OpenAI Realtime: {code}: {}", error.message),
            })
            .await;
        Step::Go
    }
}
