//! One call's Media Stream: Twilio's `connected`, `start`, `media`, `dtmf`,
//! `mark` and `stop` in; `media` (μ-law 8 kHz, 20 ms frames, paced at real
//! time no more than `telephony.playback_lead_ms` ahead of what the caller
//! has heard), a `mark` after each reply and `clear` on barge-in out.
//!
//! The caller's μ-law is decoded to 8 kHz PCM for the conversation's
//! decoder, which resamples it to the engines' 16 kHz; reply audio is
//! resampled to 8 kHz through the same low-pass resampler (nothing above
//! the telephone band aliases into it) and encoded. The greeting and the
//! farewell are spoken with eSpeak NG (`local.tts_program`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use super::super::metrics::Refusal;
use super::super::record::{PendingUsage, Record};
use super::super::{Shared, sleep_until};
use super::RATE_HZ;
use super::messages::{Inbound, Start};
use super::playback::{Due, Playback};
use crate::audio::{AudioFormat, StreamDecoder, g711};
use crate::engine::pool::{Hold, Want};
use crate::engine::{ConversationOptions, EngineEvent};
use crate::ledger::{Account, Admission, LedgerError, Started};
use crate::session::{ClientInput, ClientOutput, CloseReason, Conversation, ConversationHandle};
use crate::usage::UsageDelta;

/// Close codes: done, refused.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TRY_AGAIN: u16 = 1013;

/// A call in progress.
pub(super) struct Call {
    socket: WebSocket,
    shared: Arc<Shared>,
    id: u64,
    stream_sid: String,
    /// `stream_sid` as a JSON string, quoted and escaped once.
    sid_json: String,
    conversation: String,
    /// What the caller is to hear.
    playback: Playback,
    /// Spoken by eSpeak NG (greeting, farewell): 8 kHz frames.
    speech: Option<mpsc::Receiver<Vec<i16>>>,
    /// The farewell is under way: the call ends once it has played.
    hanging_up: bool,
    /// What the ledger keeps of the call, once it is answered.
    record: Option<Record>,
    /// The usage delta the ledger is committing, and the deltas after it.
    usage: PendingUsage<UsageDelta>,
    /// Its place on an engine instance, until the call ends.
    hold: Option<Hold>,
}

impl Call {
    pub(super) async fn run(socket: WebSocket, shared: Arc<Shared>, id: u64) {
        let mut call = Self {
            socket,
            shared,
            id,
            stream_sid: String::new(),
            sid_json: String::new(),
            conversation: String::new(),
            playback: Playback::default(),
            speech: None,
            hanging_up: false,
            record: None,
            usage: PendingUsage::default(),
            hold: None,
        };
        let Some(start) = call.await_start().await else {
            return;
        };
        call.stream_sid = start.stream_sid.clone();
        call.sid_json = Value::from(start.stream_sid.as_str()).to_string();
        let redeemed = call.shared.calls.redeem(&start.token);
        let caller = match redeemed {
            Ok(redeemed) if redeemed.call_sid == start.call_sid => redeemed.caller,
            Ok(_) | Err(_) => {
                let why = redeemed.err().unwrap_or("the token is for another call");
                tracing::warn!(call = %start.call_sid, "call refused: {why}");
                call.shared.metrics.refused(Refusal::Unauthorized);
                call.close(CLOSE_POLICY, why).await;
                return;
            }
        };
        call.conversation = format!("call-{}", start.call_sid);
        let Some(handle) = call.start_conversation(&caller).await else {
            return;
        };
        let reason = call.converse(handle).await;
        call.shared.metrics.call_closed();
        call.shared.metrics.closed(call.id, reason);
    }

    /// Reads up to `start` (within `server.hello_timeout_ms`).
    async fn await_start(&mut self) -> Option<Start> {
        let wait = Duration::from_millis(u64::from(self.shared.config.server.hello_timeout_ms));
        let deadline = Instant::now() + wait;
        loop {
            let frame = match timeout(deadline - Instant::now(), self.socket.recv()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(_) => return None,
                Err(_) => {
                    self.close(CLOSE_POLICY, "no start message in time").await;
                    return None;
                }
            };
            let Message::Text(text) = frame else {
                continue;
            };
            let Ok(message) = serde_json::from_str::<Value>(&text) else {
                self.close(CLOSE_POLICY, "a message that is not JSON").await;
                return None;
            };
            match message["event"].as_str() {
                Some("start") => {}
                Some("stop") => return None,
                _ => continue,
            }
            return match Start::parse(&message) {
                Ok(start) => Some(start),
                Err(why) => {
                    self.close(CLOSE_POLICY, why).await;
                    None
                }
            };
        }
    }

    /// The ledger's record and the engine's session; `None` after refusing.
    async fn start_conversation(&mut self, caller: &str) -> Option<ConversationHandle> {
        let pool = self.shared.engine.get().cloned()?;
        let config = &self.shared.config;
        let options = ConversationOptions {
            language: config.engine.language.clone(),
            voice: config.engine.voice.clone(),
            history: Vec::new(),
        };
        let want = Want {
            engine: String::new(),
            voice: options.voice.clone(),
        };
        // A caller cannot be told a place in a queue: a call takes a place
        // now or is refused.
        let Some(slot) = pool.place_now(&want) else {
            tracing::warn!(conversation = %self.conversation, "call refused: every engine is full");
            self.shared.metrics.refused(Refusal::EngineBusy);
            self.close(CLOSE_TRY_AGAIN, "engine_busy").await;
            return None;
        };
        let placed = Arc::clone(slot.instance());
        let engine = placed.engine();
        let mut account = None;
        if let Some(ledger) = self.shared.ledger.get() {
            let reserve = if engine.paid() {
                config.ledger.turn_reserve_micro_usd()
            } else {
                0
            };
            let start = Started {
                id: self.conversation.clone(),
                key_id: None,
                client: caller.to_owned(),
                channel: "phone",
                engine: placed.name().to_owned(),
                language: options.language.clone(),
                voice: options.voice.clone(),
                reserve_micro_usd: reserve,
            };
            match ledger.started(start).await {
                Ok(Admission::Admitted(admitted)) => account = admitted,
                Ok(Admission::Refused(refusal)) => {
                    tracing::warn!(conversation = %self.conversation, "call refused: {}", refusal.message());
                    self.shared.metrics.refused(Refusal::BudgetExceeded);
                    self.close(CLOSE_POLICY, "budget_exceeded").await;
                    return None;
                }
                Err(e) => {
                    // Also a second use of the call's token on another
                    // gateway: the call is already recorded.
                    tracing::warn!(conversation = %self.conversation, "call refused: {e}");
                    self.shared.metrics.refused(Refusal::LedgerUnavailable);
                    self.close(CLOSE_TRY_AGAIN, "ledger_unavailable").await;
                    return None;
                }
            }
        }
        self.record = Some(Record::new(
            self.shared.ledger.get().cloned(),
            &self.conversation,
            engine.prices(),
            account,
        ));
        let started = match pool.start(slot, &want, options) {
            Ok(started) => started,
            Err(e) => {
                tracing::warn!(conversation = %self.conversation, "the engine could not take a call: {e}");
                self.shared.metrics.refused(Refusal::EngineBusy);
                self.record_end("engine_unavailable", 0).await;
                self.close(CLOSE_TRY_AGAIN, "engine unavailable").await;
                return None;
            }
        };
        let format = AudioFormat::Pcm16 {
            rate_hz: RATE_HZ,
            channels: 1,
        };
        let decoder = StreamDecoder::new(Some(format), self.shared.limits.decoder);
        if let Some(record) = self.record.as_mut() {
            record.started_on(&placed, &started, pool.routed());
        }
        self.hold = Some(started.hold);
        let handle = Conversation::spawn(started.session, Some(decoder), self.shared.limits);
        self.shared
            .metrics
            .opened(self.id, Arc::clone(&handle.counters));
        self.shared.metrics.call_opened();
        tracing::info!(conversation = %self.conversation, "call answered");
        let greeting = config.telephony.greeting.clone();
        self.say(&greeting);
        Some(handle)
    }

    /// Speaks `text` to the caller (eSpeak NG), ahead of any reply.
    fn say(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        let local = &self.shared.config.local;
        let tts = crate::tts::TtsConfig {
            program: local.tts_program.clone().into(),
            voice: local.tts_voice.clone(),
            rate_wpm: local.tts_rate_wpm,
            output_rate_hz: RATE_HZ,
        };
        let voice = crate::tts::voice_for(&tts.voice, "", &self.shared.config.engine.language);
        let (frames, speech) = mpsc::channel(64);
        let text = text.to_owned();
        tokio::spawn(async move {
            if let Err(e) = crate::tts::speak(&tts, &voice, &text, &frames).await {
                tracing::warn!("the call's greeting could not be spoken: {e}");
            }
        });
        self.speech = Some(speech);
    }

    async fn converse(&mut self, mut handle: ConversationHandle) -> Option<CloseReason> {
        let mut turns = 0u32;
        let mut caller_gone = false;
        let mut shutdown = self.shared.shutdown.clone();
        let lead = Duration::from_millis(u64::from(self.shared.config.telephony.playback_lead_ms));
        let reason = loop {
            // The next frame may go once what was sent is within the lead.
            let next_send = self.playback.next_send(lead);
            tokio::select! {
                output = handle.output.recv() => {
                    let Some(output) = output else { break None };
                    match output {
                        ClientOutput::Closed { reason, .. } => break Some(reason),
                        ClientOutput::Event(event) => {
                            if let EngineEvent::TurnEnd { .. } = &event {
                                turns += 1;
                            }
                            self.on_event(&handle, event).await;
                        }
                        ClientOutput::Latency { ms, .. } => {
                            if let Some(record) = self.record.as_mut() {
                                record.latency_ms = Some(ms);
                            }
                        }
                        ClientOutput::Warning { .. } => {}
                    }
                }
                frame = self.socket.recv(), if !caller_gone => {
                    match self.on_frame(&handle, frame).await {
                        Flow::Go => {}
                        Flow::Gone => {
                            caller_gone = true;
                            let _ = handle.input.try_send(ClientInput::Stop);
                        }
                        Flow::HangUp => {
                            let farewell = self.shared.config.telephony.farewell.clone();
                            self.playback.clear();
                            self.hanging_up = true;
                            self.say(&farewell);
                        }
                    }
                }
                settled = self.usage.settled(), if self.usage.committing() => {
                    self.on_usage_settled(&handle, settled);
                }
                frame = recv_speech(&mut self.speech) => {
                    match frame {
                        Some(frame) => self.playback.push_8k(&frame),
                        None => self.speech = None,
                    }
                }
                () = sleep_until(next_send) => {
                    if !caller_gone && !self.send_due().await {
                        caller_gone = true;
                        let _ = handle.input.try_send(ClientInput::Stop);
                    }
                }
                _ = shutdown.changed() => {
                    handle.shutdown();
                }
            }
            if self.hanging_up && self.speech.is_none() && self.playback.is_empty() {
                // Let the farewell play out, then hang up.
                tokio::time::sleep_until(self.playback.played_until()).await;
                let _ = handle.input.try_send(ClientInput::Stop);
                self.close(CLOSE_NORMAL, "the caller hung up with the key")
                    .await;
                caller_gone = true;
                self.hanging_up = false;
            }
        };
        // What the ledger is committing, what waited behind it, and what
        // the engine still reports after the caller left: its cost was
        // spent, and is recorded.
        if let Some(settled) = self.usage.finish().await {
            self.on_usage_settled(&handle, settled);
        }
        while let Some(delta) = self.usage.next_held() {
            self.record_usage(&handle, delta).await;
        }
        while let Some(output) = handle.output.recv().await {
            if let ClientOutput::Event(EngineEvent::Usage(delta)) = output {
                self.shared.metrics.usage(&delta);
                self.record_usage(&handle, delta).await;
            }
        }
        let _ = handle.task.await;
        let ended = reason.map_or("caller_lost", CloseReason::as_str);
        self.record_end(ended, turns).await;
        let _ = handle.engine_ended.await;
        if !caller_gone {
            // No TwiML follows the stream: closing ends the call.
            self.close(CLOSE_NORMAL, ended).await;
        }
        tracing::info!(conversation = %self.conversation, reason = ended, "call ended");
        reason
    }

    async fn on_event(&mut self, handle: &ConversationHandle, event: EngineEvent) {
        match event {
            EngineEvent::Audio(pcm) => {
                if self.hanging_up {
                    return;
                }
                if let Err(e) = self.playback.push_reply(&pcm) {
                    tracing::warn!("reply audio at {} Hz cannot be played: {e}", pcm.rate_hz);
                }
            }
            EngineEvent::Interrupted { .. } | EngineEvent::SpeechStarted { .. }
                if self.playback.sounding() =>
            {
                // Barge-in: the caller stops hearing the reply (or the
                // greeting) at once.
                self.playback.clear();
                self.speech = None;
                let clear = json!({"event": "clear", "streamSid": self.stream_sid});
                let _ = self.send_json(&clear).await;
            }
            EngineEvent::Transcript {
                role, stage, text, ..
            } => {
                if let Some(record) = self.record.as_mut() {
                    record.heard(role, stage, &text);
                }
            }
            EngineEvent::TurnEnd { turn_id, reason } => {
                if let Some(record) = self.record.as_mut() {
                    record.turn(turn_id, reason);
                }
                // The reply's tail, then a mark Twilio echoes once it is heard.
                self.playback.end_reply(format!("turn-{turn_id}"));
            }
            EngineEvent::Usage(delta) => self.on_usage(delta),
            EngineEvent::Moved {
                engine,
                model,
                voice,
                prices,
                ..
            } => {
                if let Some(record) = self.record.as_mut() {
                    record.moved(&engine, &model, &voice, prices);
                }
            }
            EngineEvent::ToolCall { id, .. } => {
                // A telephone runs no client tools.
                let json =
                    json!({"error": "unavailable", "message": "a phone call runs no client tools"});
                let _ = handle
                    .input
                    .send(ClientInput::ToolResult { id, json })
                    .await;
            }
            _ => {}
        }
    }

    /// One message from Twilio.
    async fn on_frame(
        &mut self,
        handle: &ConversationHandle,
        frame: Option<Result<Message, axum::Error>>,
    ) -> Flow {
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Binary(_))) => {
                return Flow::Go;
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Flow::Gone,
        };
        let Ok(message) = serde_json::from_str::<Inbound<'_>>(&text) else {
            tracing::warn!(conversation = %self.conversation, "a stream message that is not Twilio's was dropped");
            return Flow::Go;
        };
        match message.event.as_ref() {
            "media" => {
                let payload = message.media.map(|m| m.payload).unwrap_or_default();
                let Ok(ulaw) = crate::base64::decode(&payload) else {
                    tracing::warn!(conversation = %self.conversation, "a media payload that is not base64 was dropped");
                    return Flow::Go;
                };
                // Straight to the decoder's s16le, one pass.
                let mut bytes = Vec::with_capacity(2 * ulaw.len());
                g711::decode_le_into(&ulaw, &mut bytes);
                let _ = handle.input.send(ClientInput::Audio(bytes.into())).await;
                Flow::Go
            }
            "dtmf" => {
                let digit = message.dtmf.map(|d| d.digit).unwrap_or_default();
                let telephony = &self.shared.config.telephony;
                if !digit.is_empty() && digit == telephony.hangup_digit {
                    return Flow::HangUp;
                }
                if telephony.dtmf_as_text && digit.len() == 1 {
                    let text = format!("(El llamante marcó la tecla {digit}.)");
                    let _ = handle.input.send(ClientInput::Text(text)).await;
                }
                Flow::Go
            }
            "stop" => Flow::Gone,
            // `connected`, `mark` echoes and anything new.
            _ => Flow::Go,
        }
    }

    /// Sends the frames and marks that are due; `false` when the socket
    /// failed.
    async fn send_due(&mut self) -> bool {
        let lead = Duration::from_millis(u64::from(self.shared.config.telephony.playback_lead_ms));
        for due in self.playback.due(Instant::now(), lead) {
            let text = match due {
                // Written by hand: one allocation per frame, fifty a second.
                Due::Media(frame) => format!(
                    "{{\"event\":\"media\",\"streamSid\":{},\"media\":{{\"payload\":\"{}\"}}}}",
                    self.sid_json,
                    crate::base64::encode(&frame)
                ),
                Due::Mark(name) => {
                    json!({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
                        .to_string()
                }
            };
            if !self.send_text(text).await {
                return false;
            }
        }
        true
    }

    async fn send_json(&mut self, value: &Value) -> bool {
        self.send_text(value.to_string()).await
    }

    async fn send_text(&mut self, text: String) -> bool {
        let wait = Duration::from_millis(u64::from(self.shared.config.server.write_timeout_ms));
        let text = Message::Text(text.into());
        matches!(timeout(wait, self.socket.send(text)).await, Ok(Ok(())))
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code,
            reason: reason.chars().take(100).collect::<String>().into(),
        };
        let _ = timeout(
            Duration::from_secs(1),
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
    }

    /// A usage delta from the conversation: counted, and handed to the
    /// ledger once it has settled the one before; the call goes on
    /// meanwhile (a slow disk must not stall what the caller hears).
    fn on_usage(&mut self, delta: UsageDelta) {
        self.shared.metrics.usage(&delta);
        if self.usage.committing() {
            self.usage.hold(delta);
        } else {
            self.begin_usage(delta);
        }
    }

    fn begin_usage(&mut self, delta: UsageDelta) {
        if let Some(commit) = self.record.as_mut().and_then(|r| r.begin_usage(&delta)) {
            self.usage.begin(delta, commit);
        }
    }

    /// The ledger answered on a delta; the next one begins.
    fn on_usage_settled(
        &mut self,
        handle: &ConversationHandle,
        (delta, settled): (UsageDelta, Result<Option<Account>, LedgerError>),
    ) {
        if let Some(record) = self.record.as_mut() {
            let recorded = record.settle_usage(&delta, settled);
            self.usage_settled(handle, &delta, recorded);
        }
        if let Some(next) = self.usage.next_held() {
            self.begin_usage(next);
        }
    }

    /// Records a usage delta now (the call is over) and settles it.
    async fn record_usage(&mut self, handle: &ConversationHandle, delta: UsageDelta) {
        let Some(record) = self.record.as_mut() else {
            return;
        };
        let recorded = record.usage(delta).await;
        self.usage_settled(handle, &delta, recorded);
    }

    /// A paid call whose cost cannot be recorded, or whose budget is
    /// spent, ends after the reply.
    fn usage_settled(
        &mut self,
        handle: &ConversationHandle,
        delta: &UsageDelta,
        recorded: Result<(), LedgerError>,
    ) {
        match recorded {
            Ok(()) if self.record.as_mut().is_some_and(Record::exhausted) => {
                tracing::info!(conversation = %self.conversation, "the budget is spent: the call ends after this reply");
                handle.shutdown.trigger_with(CloseReason::BudgetExceeded);
            }
            Ok(()) => {}
            Err(e) => {
                tracing::error!(conversation = %self.conversation, "usage not recorded: {e}");
                if delta.cost_micro_usd > 0 {
                    handle.shutdown.trigger_with(CloseReason::LedgerUnavailable);
                }
            }
        }
    }

    async fn record_end(&mut self, reason: &str, turns: u32) {
        if let Some(record) = &self.record
            && let Err(e) = record.end(reason, turns).await
        {
            tracing::warn!(conversation = %self.conversation, "the end of the call was not recorded: {e}");
        }
    }
}

/// What a message from Twilio means for the call.
enum Flow {
    Go,
    Gone,
    HangUp,
}

async fn recv_speech(speech: &mut Option<mpsc::Receiver<Vec<i16>>>) -> Option<Vec<i16>> {
    match speech {
        Some(speech) => speech.recv().await,
        None => std::future::pending().await,
    }
}
