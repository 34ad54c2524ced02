//! What the conversation says, as frames for the client: reply audio
//! resampled to the announced rate and appended to the pending binary frame
//! (no allocation per frame), every other output one text message, and the
//! `end` with its close frame.

use axum::extract::ws::Message;

use super::super::REPLY_RATE_HZ;
use super::super::protocol::{
    ErrorCode, MAX_OPEN_TOOL_CALLS, OutputFormat, ProtocolError, ServerMessage, VERSION,
};
use super::{CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_NORMAL, Connection, Exit, Running};
use crate::audio::{AudioFormat, StreamResampler};
use crate::engine::{EngineEvent, ErrorKind, Pcm};
use crate::session::{ClientOutput, CloseReason, ConversationSummary};

/// Reply audio gathered into one binary frame before it is handed to the
/// socket anyway: one second at 24 kHz.
const MAX_AUDIO_FRAME_BYTES: usize = 48_000;

impl Connection {
    /// One conversation output, fed to the socket but not flushed; `Some`
    /// when the connection is done.
    pub(super) async fn on_output(
        &mut self,
        running: &mut Running,
        output: ClientOutput,
    ) -> Option<Exit> {
        if super::ledger::held(&running.usage, &output) {
            running.usage.hold(output);
            return None;
        }
        let text = match output {
            ClientOutput::Event(EngineEvent::Audio(pcm)) => {
                if running.client_gone {
                    return None;
                }
                self.push_audio(running, &pcm);
                if self.audio.len() < MAX_AUDIO_FRAME_BYTES || self.feed_audio().await {
                    return None;
                }
                return self.write_failed(running);
            }
            ClientOutput::Event(EngineEvent::Ready {
                engine,
                model,
                voice,
            }) => {
                if let Some(ledger) = self.shared.ledger.get() {
                    ledger.ready(&self.conversation, &engine, &model, &voice);
                }
                let session = self.conversation.clone();
                let language = if running.hello.language.is_empty() {
                    &self.shared.config.engine.language
                } else {
                    &running.hello.language
                };
                let input = format_name(&running.hello.audio);
                running.ready = true;
                ServerMessage::Ready {
                    version: VERSION,
                    session: &session,
                    engine: &engine,
                    model: &model,
                    voice: &voice,
                    language,
                    input: &input,
                    output: OutputFormat {
                        format: "pcm16",
                        rate: REPLY_RATE_HZ,
                    },
                    budget: running.record.budget(),
                    resume: running.resume.as_ref().map(|slot| slot.secret.as_str()),
                }
                .to_text()
            }
            ClientOutput::Event(EngineEvent::Usage(delta)) => {
                return self.on_usage(running, delta).await;
            }
            ClientOutput::Event(mut event) => {
                match &mut event {
                    EngineEvent::TurnEnd { turn_id, reason } => {
                        running.turns = running.turns.saturating_add(1);
                        running.record.turn(*turn_id, *reason);
                    }
                    EngineEvent::Transcript {
                        role, text, stage, ..
                    } => running.record.heard(*role, *stage, text),
                    EngineEvent::ToolCall { id, .. }
                        if running.tool_calls.len() < MAX_OPEN_TOOL_CALLS =>
                    {
                        running.tool_calls.insert(id.clone());
                    }
                    EngineEvent::Moved {
                        engine,
                        model,
                        voice,
                        prices,
                        ..
                    } => running
                        .record
                        .moved(engine, model, voice, std::mem::take(prices)),
                    EngineEvent::Error { kind, message } => {
                        self.shared.metrics.error(match kind {
                            ErrorKind::Busy => ErrorCode::Busy,
                            _ => ErrorCode::EngineError,
                        });
                        self.log(&format!("engine error ({kind:?}): {message}"));
                        *message = safe_engine_message(*kind, message);
                    }
                    _ => {}
                }
                ServerMessage::event(&event)?.to_text()
            }
            ClientOutput::Latency { turn_id, ms } => {
                running.latency_ms.push(ms);
                running.record.latency_ms = Some(ms);
                self.shared.metrics.latency(ms);
                ServerMessage::Latency { turn: turn_id, ms }.to_text()
            }
            ClientOutput::Warning { code, message } => {
                let code = ErrorCode::for_warning(code);
                self.shared.metrics.error(code);
                ServerMessage::error(code, &message, false).to_text()
            }
            ClientOutput::Closed {
                reason,
                message,
                summary,
            } => {
                let message = match reason {
                    CloseReason::EngineError => {
                        self.log(&format!("ended by the engine: {message}"));
                        "the speech engine failed; the conversation cannot go on".to_owned()
                    }
                    _ => crate::redact::urls_in(&message),
                };
                return Some(self.end(running, reason, &message, &summary).await);
            }
        };
        if running.client_gone || self.feed(Message::Text(text.into())).await {
            return None;
        }
        self.write_failed(running)
    }

    /// The client cannot be written to: a resumable conversation waits for
    /// it to come back (`None`); any other stops now.
    pub(super) fn write_failed(&mut self, running: &mut Running) -> Option<Exit> {
        if self.detach(running) {
            return None;
        }
        running.client_gone = true;
        running.handle.shutdown();
        Some(Exit::Lost(Some(CloseReason::SlowClient)))
    }

    /// Appends reply audio, at the announced rate, to the pending frame.
    fn push_audio(&mut self, running: &mut Running, pcm: &Pcm) {
        let samples = match &mut running.resampler {
            _ if pcm.rate_hz == REPLY_RATE_HZ => &pcm.samples,
            Some((rate, resampler)) if *rate == pcm.rate_hz => {
                running.resampled.clear();
                resampler.push(&pcm.samples, &mut running.resampled);
                &running.resampled
            }
            slot => {
                running.resampled.clear();
                if let Ok(mut resampler) = StreamResampler::new(pcm.rate_hz, REPLY_RATE_HZ) {
                    resampler.push(&pcm.samples, &mut running.resampled);
                    *slot = Some((pcm.rate_hz, resampler));
                }
                &running.resampled
            }
        };
        // Sized once and filled in place: a loop the compiler vectorizes.
        let start = self.audio.len();
        self.audio.resize(start + samples.len() * 2, 0);
        for (bytes, sample) in self.audio[start..].chunks_exact_mut(2).zip(samples) {
            bytes.copy_from_slice(&sample.to_le_bytes());
        }
    }

    /// The conversation closed: `error` for bad audio, `end`, close frame.
    async fn end(
        &mut self,
        running: &Running,
        reason: CloseReason,
        message: &str,
        summary: &ConversationSummary,
    ) -> Exit {
        if running.client_gone {
            return Exit::Ended(reason);
        }
        if reason == CloseReason::BadAudio {
            let error = ProtocolError::new(ErrorCode::BadAudio, message);
            self.send_error(&error, true).await;
        }
        // With a ledger, the total shown is what the ledger holds: a delta
        // it could not record was never shown, and is not here either.
        let recorded;
        let total = *running.record.total();
        let summary = if self.shared.ledger.get().is_some() && summary.usage != total {
            recorded = ConversationSummary {
                usage: total,
                ..summary.clone()
            };
            &recorded
        } else {
            summary
        };
        let end = ServerMessage::End {
            reason,
            message,
            summary,
        };
        self.send_message(&end).await;
        let code = match reason {
            CloseReason::Shutdown => CLOSE_GOING_AWAY,
            CloseReason::LedgerUnavailable => super::CLOSE_TRY_AGAIN,
            CloseReason::BudgetExceeded => super::CLOSE_POLICY,
            CloseReason::EngineError | CloseReason::EngineStalled => CLOSE_INTERNAL,
            _ => CLOSE_NORMAL,
        };
        self.close(code, reason.as_str()).await;
        Exit::Ended(reason)
    }
}

/// What a client is told of an engine error: the engine's own words only
/// for input it refused (they speak of the client's input); otherwise a
/// short safe message, since the full text (in the server log) may name an
/// account, a role or an internal address.
fn safe_engine_message(kind: ErrorKind, message: &str) -> String {
    match kind {
        ErrorKind::BadInput | ErrorKind::Busy => crate::redact::urls_in(message),
        ErrorKind::Transient => {
            "the speech engine had a passing fault and is recovering; the conversation goes on"
                .to_owned()
        }
        ErrorKind::Fatal => "the speech engine failed; the conversation cannot go on".to_owned(),
    }
}

fn format_name(format: &AudioFormat) -> String {
    match format {
        AudioFormat::Pcm16 { rate_hz, .. } => format!("pcm16/{rate_hz}"),
        other => other.name().to_owned(),
    }
}
