//! Turn spans from a conversation's engine events.
//!
//! A turn opens when the user's speech ends (`SpeechEnded`), or with the first
//! reply when there was no speech (typed text). It records the time to the
//! first reply audio and to the first reply audio that is not silence, and
//! how long the reply took (`TurnEnd`). Engines report usage during and
//! after the reply, so the turn stays open after `TurnEnd` for the usage that
//! follows it, and closes at the next event of another kind, at the next
//! turn or when the conversation ends. Usage reported while no turn is open
//! goes to the next one.

use tokio::time::Instant;
use tracing::Span;
use tracing::field::Empty;

use super::SPAN_TARGET;
use crate::engine::EngineEvent;
use crate::usage::UsageDelta;

/// A reply sample above this magnitude (about -40 dBFS) is not silence.
const VOICE_THRESHOLD: u16 = 328;

/// Follows one conversation's engine events and keeps its turn spans. Made
/// inside the conversation's span (see `super::conversation_span`), which
/// becomes the parent of its turns; outside any span the turns are roots.
#[derive(Debug)]
pub struct ConversationTrace {
    conversation: Span,
    turn: Option<Turn>,
    /// Usage reported while no turn was open.
    pending: UsageDelta,
}

#[derive(Debug)]
struct Turn {
    span: Span,
    /// What the span records, kept for the log line.
    id: Option<u64>,
    first_byte_ms: Option<u64>,
    first_voice_ms: Option<u64>,
    reply_ms: Option<u64>,
    interrupted: bool,
    /// When the user's speech ended; `None` for a turn opened by its reply.
    speech_ended: Option<Instant>,
    opened: Instant,
    first_audio: bool,
    first_voice: bool,
    /// `TurnEnd` came: only usage still belongs to this turn.
    ended: bool,
    usage: UsageDelta,
}

impl Default for ConversationTrace {
    fn default() -> Self {
        Self::new()
    }
}

impl ConversationTrace {
    /// A trace whose turns are children of the current span.
    pub fn new() -> Self {
        Self {
            conversation: Span::current(),
            turn: None,
            pending: UsageDelta::default(),
        }
    }

    /// One engine event, as the conversation received it at `now`.
    pub fn on_event(&mut self, event: &EngineEvent, now: Instant) {
        match event {
            EngineEvent::Ready {
                engine,
                model,
                voice,
            } => {
                let span = &self.conversation;
                span.record("engine", engine.as_str());
                span.record("model", model.as_str());
                span.record("voice", voice.as_str());
                // Entered as well as named: the JSON log lists the entered
                // spans, and the conversation's task does not run inside it.
                span.in_scope(|| {
                    tracing::info!(target: SPAN_TARGET, parent: span, "conversation ready");
                });
            }
            EngineEvent::SpeechEnded { turn_id } => {
                self.close_turn();
                self.open_turn(Some(*turn_id), Some(now), now);
            }
            EngineEvent::Audio(pcm) => {
                if self.turn.as_ref().is_none_or(|turn| turn.ended) {
                    self.close_turn();
                    self.open_turn(None, None, now);
                }
                if let Some(turn) = &mut self.turn {
                    turn.on_audio(&pcm.samples, now);
                }
            }
            EngineEvent::TurnEnd { .. } => {
                if self.turn.as_ref().is_none_or(|turn| turn.ended) {
                    self.close_turn();
                    self.open_turn(None, None, now);
                }
                if let Some(turn) = &mut self.turn {
                    turn.ended = true;
                    let ms = ms_between(turn.opened, now);
                    turn.reply_ms = Some(ms);
                    turn.span.record("turn.reply_ms", ms);
                }
            }
            EngineEvent::Usage(delta) => match &mut self.turn {
                Some(turn) => turn.usage.add(delta),
                None => self.pending.add(delta),
            },
            EngineEvent::Interrupted { .. } => {
                if let Some(turn) = &mut self.turn {
                    turn.interrupted = true;
                    turn.span.record("turn.interrupted", true);
                }
            }
            _ => {
                if self.turn.as_ref().is_some_and(|turn| turn.ended) {
                    self.close_turn();
                }
            }
        }
    }

    /// The conversation is over: closes the open turn, records the totals on
    /// the conversation's span and logs its end.
    pub fn ended(&mut self, reason: &str, turns: u32, usage: &UsageDelta) {
        self.close_turn();
        let span = &self.conversation;
        span.record("close.reason", reason);
        span.record("turns", turns);
        record_totals(span, usage);
        span.in_scope(|| {
            tracing::info!(
                target: SPAN_TARGET,
                parent: span,
                reason,
                turns,
                input_tokens = input_tokens(usage),
                output_tokens = output_tokens(usage),
                cost_micro_usd = usage.cost_micro_usd,
                "conversation ended"
            );
        });
    }

    fn open_turn(&mut self, turn_id: Option<u64>, speech_ended: Option<Instant>, now: Instant) {
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            parent: &self.conversation,
            "turn",
            turn.id = turn_id,
            turn.first_byte_ms = Empty,
            turn.first_voice_ms = Empty,
            turn.reply_ms = Empty,
            turn.interrupted = Empty,
            usage.speech_in_tokens = Empty,
            usage.speech_out_tokens = Empty,
            usage.text_in_tokens = Empty,
            usage.text_out_tokens = Empty,
            usage.input_tokens = Empty,
            usage.output_tokens = Empty,
            usage.cost_micro_usd = Empty,
        );
        self.turn = Some(Turn {
            span,
            id: turn_id,
            first_byte_ms: None,
            first_voice_ms: None,
            reply_ms: None,
            interrupted: false,
            speech_ended,
            opened: now,
            first_audio: false,
            first_voice: false,
            ended: false,
            usage: std::mem::take(&mut self.pending),
        });
    }

    /// Records the turn's usage on its span, logs it and closes it.
    fn close_turn(&mut self) {
        let Some(turn) = self.turn.take() else {
            return;
        };
        let (span, usage) = (&turn.span, &turn.usage);
        span.record("usage.speech_in_tokens", usage.speech_in_tokens);
        span.record("usage.speech_out_tokens", usage.speech_out_tokens);
        span.record("usage.text_in_tokens", usage.text_in_tokens);
        span.record("usage.text_out_tokens", usage.text_out_tokens);
        record_totals(span, usage);
        // The line carries the numbers itself, whichever spans a log shows.
        span.in_scope(|| {
            tracing::info!(
                target: SPAN_TARGET,
                parent: span,
                turn_id = turn.id,
                first_byte_ms = turn.first_byte_ms,
                first_voice_ms = turn.first_voice_ms,
                reply_ms = turn.reply_ms,
                interrupted = turn.interrupted,
                input_tokens = input_tokens(usage),
                output_tokens = output_tokens(usage),
                cost_micro_usd = usage.cost_micro_usd,
                "turn"
            );
        });
    }
}

/// Tokens in and out and the cost, on a conversation's or a turn's span.
fn record_totals(span: &Span, usage: &UsageDelta) {
    span.record("usage.input_tokens", input_tokens(usage));
    span.record("usage.output_tokens", output_tokens(usage));
    span.record("usage.cost_micro_usd", usage.cost_micro_usd);
}

impl Drop for ConversationTrace {
    fn drop(&mut self) {
        self.close_turn();
    }
}

impl Turn {
    fn on_audio(&mut self, samples: &[i16], now: Instant) {
        if self.first_voice {
            return;
        }
        let Some(start) = self.speech_ended else {
            return;
        };
        // The same moment the conversation measures its latency at.
        if !self.first_audio {
            self.first_audio = true;
            let ms = ms_between(start, now);
            self.first_byte_ms = Some(ms);
            self.span.record("turn.first_byte_ms", ms);
        }
        if samples.iter().any(|s| s.unsigned_abs() > VOICE_THRESHOLD) {
            self.first_voice = true;
            let ms = ms_between(start, now);
            self.first_voice_ms = Some(ms);
            self.span.record("turn.first_voice_ms", ms);
        }
    }
}

fn ms_between(start: Instant, end: Instant) -> u64 {
    u64::try_from(end.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

fn input_tokens(usage: &UsageDelta) -> u64 {
    usage.speech_in_tokens.saturating_add(usage.text_in_tokens)
}

fn output_tokens(usage: &UsageDelta) -> u64 {
    usage
        .speech_out_tokens
        .saturating_add(usage.text_out_tokens)
}
