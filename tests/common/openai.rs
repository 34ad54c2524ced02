//! An OpenAI Realtime-compatible test service: a real WebSocket server over
//! TLS (a certificate made at start) that speaks the GA event shapes. It
//! checks the key in the handshake and the session's settings, runs a
//! voice detection of its own on the appended 24 kHz audio (loud 10 ms
//! blocks are speech, 500 ms of quiet ends a turn), and answers each user
//! turn as its script says: a reply (tone audio, transcript, usage counted
//! the way the service counts it), a tool call, a failed response, an error
//! event, or a dropped or closed connection. Everything a connection
//! received is logged for the test to check.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::result_large_err,
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    reason = "a test helper that fails must fail the test; the handshake callback's error type is tungstenite's"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};

use crate::common::tls::{nth_or, refusal, with_log};
use crate::common::{base64, unbase64};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub const KEY: &str = "sk-test-sonora";
const RATE: usize = 24_000;
/// A 10 ms block louder than this (RMS) is speech.
const LOUD: f64 = 800.0;
/// Quiet that ends a user turn.
const SILENCE_MS: u64 = 500;

/// What the service does for one user turn.
#[derive(Debug, Clone)]
pub enum Turn {
    /// The user is heard as `heard`; the reply is `reply_ms` of tone with `text`.
    Answer {
        heard: &'static str,
        text: &'static str,
        reply_ms: u64,
    },
    /// A response that calls a tool; once its output is back, `then`.
    Tool {
        heard: &'static str,
        name: &'static str,
        arguments: &'static str,
        text: &'static str,
        reply_ms: u64,
    },
    /// A response that fails with this error code.
    Fail {
        heard: &'static str,
        code: &'static str,
    },
    /// An `error` event, then an answer.
    ErrorThenAnswer {
        code: &'static str,
        text: &'static str,
        reply_ms: u64,
    },
    /// The connection drops (no close frame) once the user finished.
    Drop { heard: &'static str },
    /// The session ends at its time limit (close 1001) once the user finished.
    Expire { heard: &'static str },
    /// Malformed messages, then an answer.
    Garbage { text: &'static str, reply_ms: u64 },
}

/// How a connection goes.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Refuse the handshake with this HTTP status.
    pub refuse: Option<u16>,
    /// The turns of this connection, in order; the last repeats.
    pub turns: Vec<Turn>,
}

/// What one connection received.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub authorization: String,
    pub model: String,
    pub session: Option<Value>,
    /// Every event but the audio appends.
    pub events: Vec<Value>,
    pub appended_ms: u64,
    /// The usage objects the service sent, in order.
    pub usage: Vec<Value>,
    pub transcription_usage: Vec<Value>,
    pub refused: Option<u16>,
}

impl Connection {
    pub fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["type"] == kind).collect()
    }
}

pub type Log = crate::common::tls::Log<Connection>;

pub struct Service {
    pub addr: SocketAddr,
    pub url: String,
    pub ca_file: PathBuf,
    pub log: Arc<Mutex<Log>>,
    _listening: crate::common::tls::Listening,
}

/// The engine's settings for `service`: its URL, certificate and key, and
/// short timeouts.
pub fn settings(service: &Service) -> sonora::engine::openai_realtime::OpenAiRealtimeSettings {
    let config = sonora::config::OpenAiRealtimeConfig {
        endpoint_url: service.url.clone(),
        ca_file: service.ca_file.display().to_string(),
        api_key: KEY.into(),
        ..sonora::config::OpenAiRealtimeConfig::default()
    };
    let mut settings =
        sonora::engine::openai_realtime::OpenAiRealtimeSettings::from_config(&config);
    settings.connect_timeout = std::time::Duration::from_secs(5);
    settings.stall_timeout = std::time::Duration::from_secs(5);
    settings
}

impl Service {
    /// Starts on 127.0.0.1:0; connection `i` follows `plans[i]`, the last repeating.
    pub async fn start(plans: Vec<Plan>) -> Self {
        let (listening, log) = crate::common::tls::listen_planned("openai", plans, serve).await;
        let addr = listening.addr;
        Self {
            addr,
            url: format!("wss://127.0.0.1:{}/v1/realtime", addr.port()),
            ca_file: listening.ca_file.clone(),
            log,
            _listening: listening,
        }
    }

    pub fn connections(&self) -> Vec<Connection> {
        self.log.lock().unwrap().connections.clone()
    }
}

async fn serve<S>(tls: S, plan: Plan, index: usize, log: Arc<Mutex<Log>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let refuse = plan.refuse;
    let seen = log.clone();
    let callback =
        move |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
            let authorization = request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let model = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("model=")))
                .unwrap_or_default()
                .to_owned();
            let status = if authorization != format!("Bearer {KEY}") {
                Some(401)
            } else {
                refuse
            };
            with_log(&seen, index, |c| {
                c.authorization = authorization;
                c.model = model;
                c.refused = status;
            });
            match status {
                None => Ok(response),
                Some(code) => Err(refusal(
                    code,
                    &json!({"error": {"message": "refused by the test service"}}),
                )),
            }
        };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
        return;
    };
    let mut state = State {
        plan,
        turn: 0,
        speaking: false,
        quiet_ms: 0,
        heard_ms: 0,
        speech_ms: 0,
        item: 0,
        waiting_tool: None,
        pending_answer: None,
        typed: false,
    };
    let _ = ws
        .send(text(
            json!({"type": "session.created", "session": {"type": "realtime"}}),
        ))
        .await;
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(body) = message else {
            continue;
        };
        let Ok(event) = serde_json::from_str::<Value>(&body) else {
            continue;
        };
        let kind = event["type"].as_str().unwrap_or_default().to_owned();
        if kind != "input_audio_buffer.append" {
            with_log(&log, index, |c| c.events.push(event.clone()));
        }
        let mut out = Vec::new();
        let mut end = End::No;
        match kind.as_str() {
            "session.update" => {
                let session = &event["session"];
                let ok = session["type"] == "realtime"
                    && session["audio"]["input"]["format"]["rate"] == 24_000
                    && session["audio"]["output"]["format"]["type"] == "audio/pcm";
                with_log(&log, index, |c| c.session = Some(session.clone()));
                out.push(if ok {
                    json!({"type": "session.updated", "session": session})
                } else {
                    json!({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value", "message": "bad session"}})
                });
            }
            "input_audio_buffer.append" => {
                let audio = event["audio"].as_str().unwrap_or_default();
                let bytes = unbase64(audio).unwrap_or_default();
                let samples: Vec<i16> = bytes
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]))
                    .collect();
                with_log(&log, index, |c| {
                    c.appended_ms += (samples.len() * 1000 / RATE) as u64;
                });
                end = state.hear(&samples, &mut out, &log, index);
            }
            "conversation.item.create" => {
                let item = &event["item"];
                if item["type"] == "function_call_output" {
                    if let Some((text, reply_ms)) = state.waiting_tool.take() {
                        state.pending_answer = Some((text, reply_ms));
                    }
                } else if item["role"] == "user" {
                    state.typed = true;
                }
            }
            "response.create" => {
                if let Some((text, reply_ms)) = state.pending_answer.take() {
                    state.answer(text, reply_ms, &mut out, &log, index);
                } else if state.typed {
                    state.typed = false;
                    end = state.respond("", &mut out, &log, index);
                } else {
                    state.answer("Reanudo la respuesta.", 400, &mut out, &log, index);
                }
            }
            _ => {}
        }
        for event in out {
            let message = match event {
                Value::String(raw) => Message::text(raw),
                event => text(event),
            };
            if ws.send(message).await.is_err() {
                return;
            }
        }
        match end {
            End::No => {}
            End::Drop => return,
            End::Expire => {
                let _ = ws.close(Some(limit_close())).await;
                return;
            }
        }
    }
}

enum End {
    No,
    Drop,
    Expire,
}

fn text(value: Value) -> Message {
    Message::text(value.to_string())
}

struct State {
    plan: Plan,
    turn: usize,
    speaking: bool,
    quiet_ms: u64,
    /// User audio heard so far (all of it counts as context).
    heard_ms: u64,
    speech_ms: u64,
    item: u32,
    waiting_tool: Option<(&'static str, u64)>,
    pending_answer: Option<(&'static str, u64)>,
    typed: bool,
}

impl State {
    fn hear(
        &mut self,
        samples: &[i16],
        out: &mut Vec<Value>,
        log: &Mutex<Log>,
        index: usize,
    ) -> End {
        let mut end = End::No;
        for block in samples.chunks(RATE / 100) {
            let energy = block.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>();
            let rms = (energy / block.len().max(1) as f64).sqrt();
            self.heard_ms += 10;
            if rms > LOUD {
                self.quiet_ms = 0;
                self.speech_ms += 10;
                if !self.speaking {
                    self.speaking = true;
                    self.item += 1;
                    out.push(json!({"type": "input_audio_buffer.speech_started",
                        "audio_start_ms": self.heard_ms, "item_id": format!("item_u{}", self.item)}));
                }
            } else if self.speaking {
                self.quiet_ms += 10;
                if self.quiet_ms >= SILENCE_MS {
                    self.speaking = false;
                    let item_id = format!("item_u{}", self.item);
                    out.push(json!({"type": "input_audio_buffer.speech_stopped",
                        "audio_end_ms": self.heard_ms, "item_id": item_id}));
                    out.push(json!({"type": "input_audio_buffer.committed", "item_id": item_id}));
                    let heard = self.heard_text();
                    end = self.respond(heard, out, log, index);
                    if !matches!(end, End::No) {
                        return end;
                    }
                }
            }
        }
        end
    }

    fn current(&self) -> Turn {
        nth_or(&self.plan.turns, self.turn, || Turn::Answer {
            heard: "hola",
            text: "Hola.",
            reply_ms: 300,
        })
    }

    fn heard_text(&self) -> &'static str {
        match self.current() {
            Turn::Answer { heard, .. }
            | Turn::Tool { heard, .. }
            | Turn::Fail { heard, .. }
            | Turn::Drop { heard }
            | Turn::Expire { heard } => heard,
            Turn::ErrorThenAnswer { .. } | Turn::Garbage { .. } => "hola",
        }
    }

    /// The user's transcript, then what the turn's script says.
    fn respond(
        &mut self,
        heard: &str,
        out: &mut Vec<Value>,
        log: &Mutex<Log>,
        index: usize,
    ) -> End {
        let turn = self.current();
        self.turn += 1;
        if !heard.is_empty() {
            let usage = json!({"type": "tokens", "input_tokens": 40, "output_tokens": 9, "total_tokens": 49,
                "input_token_details": {"text_tokens": 0, "audio_tokens": 40}});
            with_log(log, index, |c| c.transcription_usage.push(usage.clone()));
            out.push(
                json!({"type": "conversation.item.input_audio_transcription.completed",
                "item_id": format!("item_u{}", self.item), "content_index": 0,
                "transcript": heard, "usage": usage}),
            );
        }
        match turn {
            Turn::Answer { text, reply_ms, .. } => self.answer(text, reply_ms, out, log, index),
            Turn::Tool {
                name,
                arguments,
                text,
                reply_ms,
                ..
            } => {
                let id = format!("resp_{}", self.turn);
                out.push(json!({"type": "response.created", "response": {"id": id, "status": "in_progress"}}));
                out.push(
                    json!({"type": "response.output_item.added", "response_id": id,
                    "item": {"id": format!("item_f{}", self.turn), "type": "function_call"}}),
                );
                out.push(json!({"type": "response.function_call_arguments.done", "response_id": id,
                    "call_id": format!("call_{}", self.turn), "name": name, "arguments": arguments}));
                let usage = self.usage(0, 12);
                with_log(log, index, |c| c.usage.push(usage.clone()));
                out.push(json!({"type": "response.done", "response": {"id": id, "status": "completed", "usage": usage}}));
                self.waiting_tool = Some((text, reply_ms));
            }
            Turn::Fail { code, .. } => {
                let id = format!("resp_{}", self.turn);
                out.push(json!({"type": "response.created", "response": {"id": id}}));
                out.push(json!({"type": "response.done", "response": {"id": id, "status": "failed",
                    "status_details": {"type": "failed", "error": {"type": "requests", "code": code}}}}));
            }
            Turn::ErrorThenAnswer {
                code,
                text,
                reply_ms,
            } => {
                out.push(json!({"type": "error", "error": {"type": "server_error", "code": code, "message": "something went wrong"}}));
                self.answer(text, reply_ms, out, log, index);
            }
            Turn::Drop { .. } => return End::Drop,
            Turn::Expire { .. } => return End::Expire,
            Turn::Garbage { text, reply_ms } => {
                out.push(Value::String("{not json".into()));
                out.push(json!({"type": "response.output_audio.delta", "item_id": 7, "delta": []}));
                out.push(
                    json!({"type": "response.output_audio.delta", "item_id": "x", "delta": "@@@@"}),
                );
                out.push(Value::String("x".repeat(200_000)));
                self.answer(text, reply_ms, out, log, index);
            }
        }
        End::No
    }

    /// Usage as the service counts it: all user audio so far is context
    /// (1 token per 100 ms), instructions are text (cached from the second
    /// response on), reply audio 1 token per 50 ms.
    fn usage(&self, reply_ms: u64, text_out: u64) -> Value {
        let audio_in = self.heard_ms / 100;
        let text_in = 300 + 20 * self.turn as u64;
        let cached_text = if self.turn > 1 { 256 } else { 0 };
        let audio_out = reply_ms / 50;
        json!({"total_tokens": audio_in + text_in + audio_out + text_out,
            "input_tokens": audio_in + text_in, "output_tokens": audio_out + text_out,
            "input_token_details": {"text_tokens": text_in, "audio_tokens": audio_in, "image_tokens": 0,
                "cached_tokens": cached_text,
                "cached_tokens_details": {"text_tokens": cached_text, "audio_tokens": 0, "image_tokens": 0}},
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out}})
    }

    fn answer(
        &mut self,
        text: &str,
        reply_ms: u64,
        out: &mut Vec<Value>,
        log: &Mutex<Log>,
        index: usize,
    ) {
        let id = format!("resp_{}_{}", self.turn, out.len());
        let item = format!("item_a{}_{}", self.turn, out.len());
        out.push(
            json!({"type": "response.created", "response": {"id": id, "status": "in_progress"}}),
        );
        out.push(
            json!({"type": "response.output_item.added", "response_id": id,
            "item": {"id": item, "type": "message", "role": "assistant"}}),
        );
        let words: Vec<&str> = text.split(' ').collect();
        for (i, word) in words.iter().enumerate() {
            let delta = if i == 0 {
                (*word).to_owned()
            } else {
                format!(" {word}")
            };
            out.push(
                json!({"type": "response.output_audio_transcript.delta", "response_id": id,
                "item_id": item, "delta": delta}),
            );
        }
        // 100 ms blocks of a 440 Hz tone.
        let total = reply_ms as usize * RATE / 1000;
        let mut sent = 0;
        while sent < total {
            let n = (RATE / 10).min(total - sent);
            let bytes: Vec<u8> = (sent..sent + n)
                .map(|i| {
                    let t = i as f64 / RATE as f64;
                    ((t * 440.0 * std::f64::consts::TAU).sin() * 6000.0) as i16
                })
                .flat_map(i16::to_le_bytes)
                .collect();
            out.push(
                json!({"type": "response.output_audio.delta", "response_id": id, "item_id": item,
                "output_index": 0, "content_index": 0, "delta": base64(&bytes)}),
            );
            sent += n;
        }
        out.push(json!({"type": "response.output_audio.done", "response_id": id, "item_id": item}));
        out.push(
            json!({"type": "response.output_audio_transcript.done", "response_id": id,
            "item_id": item, "transcript": text}),
        );
        let usage = self.usage(reply_ms, words.len() as u64);
        with_log(log, index, |c| c.usage.push(usage.clone()));
        out.push(json!({"type": "response.done", "response": {"id": id, "status": "completed", "usage": usage}}));
    }
}

/// The closing frame a session-limit close sends.
pub fn limit_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Away,
        reason: "Your session hit the maximum duration of 60 minutes.".into(),
    }
}
