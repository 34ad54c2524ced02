//! A Gemini Live-compatible test service: a real WebSocket server over TLS
//! (a certificate made at start) that speaks the Live API's message shapes.
//! It checks the key (or token) in the handshake and the `setup` (sent
//! once, first), runs a voice detection of its own on the appended 16 kHz
//! audio (loud 10 ms blocks are speech, 500 ms of quiet ends a turn), and
//! answers each user turn as its script says: a reply (the user's
//! transcript, tone audio with its transcript, `turnComplete` once the
//! reply has had time to play, usage counted per turn with zero modalities
//! left out, a new session handle), a tool call, a `goAway`, or a close
//! with a code and reason. Speech over a reply still playing interrupts
//! it. Everything a connection received is logged for the test to check.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    reason = "a test helper that fails must fail the test"
)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::tls::{nth_or, refusal, with_log};
use crate::common::{base64, unbase64};

pub const KEY: &str = "AIza-test-sonora";
pub const TOKEN: &str = "ya29.test-sonora";
pub const PATH: &str =
    "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
const RATE_IN: usize = 16_000;
const RATE_OUT: usize = 24_000;
/// A 10 ms block louder than this (RMS) is speech.
const LOUD: f64 = 800.0;
/// Quiet that ends a user turn.
const SILENCE_MS: u64 = 500;
/// Prompt tokens the service counts in its total but in no modality.
pub const PROMPT_GAP: u64 = 37;

/// What the service does for one user turn.
#[derive(Debug, Clone)]
pub enum Turn {
    /// The user is heard as `heard`; the reply is `reply_ms` of tone with `text`.
    Answer {
        heard: &'static str,
        text: &'static str,
        reply_ms: u64,
    },
    /// A tool call; once its response is back, the reply.
    Tool {
        heard: &'static str,
        name: &'static str,
        args: &'static str,
        text: &'static str,
        reply_ms: u64,
    },
    /// An answer, then `goAway` once the turn is complete.
    AnswerThenGoAway {
        heard: &'static str,
        text: &'static str,
        reply_ms: u64,
    },
    /// The connection is closed with this code and reason once the user finished.
    Close { code: u16, reason: &'static str },
}

/// How a connection goes.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Refuse the handshake with this HTTP status.
    pub refuse: Option<u16>,
    /// The turns of this connection, in order; the last repeats.
    pub turns: Vec<Turn>,
    /// Send every message as a binary frame.
    pub binary: bool,
    /// Send `voiceActivity` at the start and end of the user's speech.
    pub vad_signals: bool,
}

impl Plan {
    pub fn turns(turns: Vec<Turn>) -> Self {
        Self {
            turns,
            ..Self::default()
        }
    }
}

/// What one connection received and sent.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub path: String,
    pub api_key: String,
    pub authorization: String,
    pub refused: Option<u16>,
    pub setup: Option<Value>,
    /// Every message but the audio.
    pub messages: Vec<Value>,
    pub appended_samples: u64,
    /// MIME types the audio came with.
    pub mime_types: Vec<String>,
    /// The usage objects the service sent, in order.
    pub usage: Vec<Value>,
    /// The resumable handles the service gave, in order.
    pub handles: Vec<String>,
    /// The close the service sent, if it closed.
    pub closed_with: Option<u16>,
}

impl Connection {
    pub fn with_key(&self, key: &str) -> Vec<&Value> {
        self.messages
            .iter()
            .filter(|m| m.get(key).is_some())
            .collect()
    }

    pub fn appended_ms(&self) -> u64 {
        self.appended_samples * 1000 / RATE_IN as u64
    }
}

pub type Log = crate::common::tls::Log<Connection>;

pub struct Service {
    pub url: String,
    pub ca_file: PathBuf,
    pub log: Arc<Mutex<Log>>,
    _listening: crate::common::tls::Listening,
}

impl Service {
    /// Starts on 127.0.0.1:0; connection `i` follows `plans[i]`, the last repeating.
    pub async fn start(plans: Vec<Plan>) -> Self {
        let (listening, log) = crate::common::tls::listen_planned("gemini", plans, serve).await;
        Self {
            url: format!("wss://127.0.0.1:{}{PATH}", listening.addr.port()),
            ca_file: listening.ca_file.clone(),
            log,
            _listening: listening,
        }
    }

    pub fn connections(&self) -> Vec<Connection> {
        self.log.lock().unwrap().connections.clone()
    }
}

type Ws<S> = tokio_tungstenite::WebSocketStream<S>;

async fn serve<S>(tls: S, plan: Plan, index: usize, log: Arc<Mutex<Log>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let refuse = plan.refuse;
    let seen = log.clone();
    // The error type is the handshake's, fixed by tungstenite.
    #[allow(
        clippy::result_large_err,
        reason = "tungstenite's handshake callback type"
    )]
    let callback = move |request: &Request,
                         response: Response|
          -> Result<Response, ErrorResponse> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (api_key, authorization) = (header("x-goog-api-key"), header("authorization"));
        let path = request.uri().path().to_owned();
        let status = if api_key != KEY && authorization != format!("Bearer {TOKEN}") {
            Some(401)
        } else if path != PATH {
            Some(404)
        } else {
            refuse
        };
        with_log(&seen, index, |c| {
            c.api_key = api_key;
            c.authorization = authorization;
            c.path = path;
            c.refused = status;
        });
        match status {
            None => Ok(response),
            Some(code) => Err(refusal(
                code,
                &json!({"error": {"code": code, "message": "API key not valid. Please pass a valid API key."}}),
            )),
        }
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
        return;
    };
    let mut state = State {
        binary: plan.binary,
        vad_signals: plan.vad_signals,
        plan,
        index,
        turn: 0,
        speaking: false,
        quiet_ms: 0,
        heard_ms: 0,
        playing: None,
        waiting_tool: None,
        calls: 0,
    };
    loop {
        let due = state.playing.as_ref().map(|p| p.until);
        let message = tokio::select! {
            message = ws.next() => message,
            () = sleep_until(due) => {
                let out = state.complete(&log);
                if !state.send(&mut ws, out).await {
                    return;
                }
                continue;
            }
        };
        let Some(Ok(message)) = message else {
            return;
        };
        let body = match message {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(bytes) => bytes.to_vec(),
            Message::Close(_) => return,
            _ => continue,
        };
        let Ok(message) = serde_json::from_slice::<Value>(&body) else {
            state
                .close(&mut ws, &log, 1007, "Invalid JSON payload received.")
                .await;
            return;
        };
        let audio = message["realtimeInput"].get("audio").cloned();
        if audio.is_none() {
            with_log(&log, index, |c| c.messages.push(message.clone()));
        }
        let first = with_log(&log, index, |c| c.setup.is_none());
        if let Some(setup) = message.get("setup") {
            let ok = first
                && setup["model"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("models/"))
                && setup["generationConfig"]["responseModalities"] == json!(["AUDIO"]);
            if !ok {
                state
                    .close(&mut ws, &log, 1007, "Request contains an invalid argument.")
                    .await;
                return;
            }
            with_log(&log, index, |c| c.setup = Some(setup.clone()));
            if !state
                .send(&mut ws, vec![json!({"setupComplete": {}})])
                .await
            {
                return;
            }
            continue;
        }
        if first {
            state
                .close(&mut ws, &log, 1007, "The first message must be setup.")
                .await;
            return;
        }
        let mut out = Vec::new();
        let mut end = None;
        if let Some(audio) = audio {
            let mime = audio["mimeType"].as_str().unwrap_or_default().to_owned();
            let bytes = unbase64(audio["data"].as_str().unwrap_or_default()).unwrap_or_default();
            let samples: Vec<i16> = bytes
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
            with_log(&log, index, |c| {
                c.appended_samples += samples.len() as u64;
                if c.mime_types.last() != Some(&mime) {
                    c.mime_types.push(mime);
                }
            });
            end = state.hear(&samples, &mut out, &log);
        } else if let Some(response) = message.get("toolResponse") {
            let answered = &response["functionResponses"][0];
            if let Some((id, name, text, reply_ms)) = state.waiting_tool.take()
                && answered["id"] == id.as_str()
                && answered["name"] == name
            {
                state.answer("", text, reply_ms, &mut out, false);
            }
        }
        if !state.send(&mut ws, out).await {
            return;
        }
        if let Some((code, reason)) = end {
            state.close(&mut ws, &log, code, reason).await;
            return;
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A reply the user may still be hearing, and what the service sends once
/// it has played.
struct Playing {
    until: Instant,
    reply_ms: u64,
    words: u64,
    go_away: bool,
}

struct State {
    plan: Plan,
    binary: bool,
    vad_signals: bool,
    index: usize,
    turn: usize,
    speaking: bool,
    quiet_ms: u64,
    /// User audio heard so far (all of it is context each turn).
    heard_ms: u64,
    playing: Option<Playing>,
    /// A tool call's id and name, and the reply once it is answered.
    waiting_tool: Option<(String, &'static str, &'static str, u64)>,
    calls: u32,
}

impl State {
    async fn send<S>(&self, ws: &mut Ws<S>, out: Vec<Value>) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        for message in out {
            let text = message.to_string();
            let frame = if self.binary {
                Message::binary(text.into_bytes())
            } else {
                Message::text(text)
            };
            if ws.send(frame).await.is_err() {
                return false;
            }
        }
        true
    }

    async fn close<S>(&self, ws: &mut Ws<S>, log: &Mutex<Log>, code: u16, reason: &'static str)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        with_log(log, self.index, |c| c.closed_with = Some(code));
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = ws.close(Some(frame)).await;
        // Let the close frame leave before the connection is dropped.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn current(&self) -> Turn {
        nth_or(&self.plan.turns, self.turn, || Turn::Answer {
            heard: "hola",
            text: "Hola.",
            reply_ms: 300,
        })
    }

    fn hear(
        &mut self,
        samples: &[i16],
        out: &mut Vec<Value>,
        log: &Mutex<Log>,
    ) -> Option<(u16, &'static str)> {
        for block in samples.chunks(RATE_IN / 100) {
            let energy = block.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>();
            let rms = (energy / block.len().max(1) as f64).sqrt();
            self.heard_ms += 10;
            if rms > LOUD {
                self.quiet_ms = 0;
                if !self.speaking {
                    self.speaking = true;
                    if self.vad_signals {
                        out.push(json!({"voiceActivity": {"voiceActivityType": "ACTIVITY_START"}}));
                    }
                    if self.playing.is_some() {
                        // Barge-in: the rest of the reply is dropped.
                        out.push(json!({"serverContent": {"interrupted": true}}));
                        out.extend(self.complete(log));
                    }
                }
            } else if self.speaking {
                self.quiet_ms += 10;
                if self.quiet_ms >= SILENCE_MS {
                    self.speaking = false;
                    if self.vad_signals {
                        out.push(json!({"voiceActivity": {"voiceActivityType": "ACTIVITY_END"}}));
                    }
                    if let Some(close) = self.respond(out) {
                        return Some(close);
                    }
                }
            }
        }
        None
    }

    /// What the turn's script says, once the user finished.
    fn respond(&mut self, out: &mut Vec<Value>) -> Option<(u16, &'static str)> {
        let turn = self.current();
        self.turn += 1;
        match turn {
            Turn::Answer {
                heard,
                text,
                reply_ms,
            } => self.answer(heard, text, reply_ms, out, false),
            Turn::AnswerThenGoAway {
                heard,
                text,
                reply_ms,
            } => {
                self.answer(heard, text, reply_ms, out, true);
            }
            Turn::Tool {
                heard,
                name,
                args,
                text,
                reply_ms,
            } => {
                transcribe(heard, out);
                self.calls += 1;
                let id = format!("call-{}-{}", self.index, self.calls);
                let args: Value = serde_json::from_str(args).unwrap();
                out.push(json!({"toolCall": {"functionCalls": [{"id": id, "name": name, "args": args}]}}));
                self.waiting_tool = Some((id, name, text, reply_ms));
            }
            Turn::Close { code, reason } => return Some((code, reason)),
        }
        None
    }

    /// The reply's audio and transcript; `turnComplete` follows once it has played.
    fn answer(
        &mut self,
        heard: &str,
        text: &str,
        reply_ms: u64,
        out: &mut Vec<Value>,
        go_away: bool,
    ) {
        transcribe(heard, out);
        out.push(json!({"sessionResumptionUpdate": {"newHandle": "", "resumable": false}}));
        let words: Vec<&str> = text.split(' ').collect();
        let total = reply_ms as usize * RATE_OUT / 1000;
        let chunks = total.div_ceil(RATE_OUT / 10).max(1);
        let mut sent = 0;
        for k in 0..chunks {
            let n = (RATE_OUT / 10).min(total - sent);
            let bytes: Vec<u8> = (sent..sent + n)
                .map(|i| {
                    let t = i as f64 / RATE_OUT as f64;
                    ((t * 440.0 * std::f64::consts::TAU).sin() * 6000.0) as i16
                })
                .flat_map(i16::to_le_bytes)
                .collect();
            sent += n;
            let mut content = json!({"modelTurn": {"parts": [{"inlineData":
                {"mimeType": "audio/pcm;rate=24000", "data": base64(&bytes)}}]}});
            // The transcript comes with the audio, a word per chunk, the
            // rest with the last one.
            let said: Vec<&str> = if k + 1 == chunks {
                words.iter().skip(k).copied().collect()
            } else {
                words.get(k).into_iter().copied().collect()
            };
            if !said.is_empty() {
                let lead = if k == 0 { "" } else { " " };
                content["outputTranscription"] =
                    json!({"text": format!("{lead}{}", said.join(" "))});
            }
            out.push(json!({"serverContent": content}));
        }
        out.push(json!({"serverContent": {"generationComplete": true}}));
        self.playing = Some(Playing {
            until: Instant::now() + Duration::from_millis(reply_ms),
            reply_ms,
            words: words.len() as u64,
            go_away,
        });
    }

    /// The turn's end: usage, `turnComplete`, a new handle (and `goAway`).
    fn complete(&mut self, log: &Mutex<Log>) -> Vec<Value> {
        let Some(playing) = self.playing.take() else {
            return Vec::new();
        };
        let usage = self.usage(playing.reply_ms, playing.words);
        let handle = format!("handle-{}-{}", self.index, self.turn);
        with_log(log, self.index, |c| {
            c.usage.push(usage.clone());
            c.handles.push(handle.clone());
        });
        let mut out = vec![
            json!({"serverContent": {"turnComplete": true}, "usageMetadata": usage}),
            json!({"sessionResumptionUpdate": {"newHandle": handle, "resumable": true}}),
        ];
        if playing.go_away {
            out.push(json!({"goAway": {"timeLeft": "20s"}}));
        }
        out
    }

    /// Usage as the service counts it, per turn: all user audio so far is
    /// context (25 tokens a second), the prompt is text, the reply audio 25
    /// tokens a second; no text output (left out of the list), a few
    /// thought tokens, the tool-use prompt on tool turns; the prompt total
    /// is above its list.
    fn usage(&self, reply_ms: u64, words: u64) -> Value {
        let audio_in = self.heard_ms / 40;
        let text_in = 300 + 20 * self.turn as u64;
        let audio_out = reply_ms / 40;
        let thoughts = words;
        let tool_use = if self.calls > 0 { 25 } else { 0 };
        let mut prompt_details = vec![json!({"modality": "TEXT", "tokenCount": text_in})];
        if audio_in > 0 {
            prompt_details.push(json!({"modality": "AUDIO", "tokenCount": audio_in}));
        }
        let prompt = text_in + audio_in + PROMPT_GAP;
        let mut usage = json!({
            "promptTokenCount": prompt,
            "responseTokenCount": audio_out,
            "thoughtsTokenCount": thoughts,
            "totalTokenCount": prompt + audio_out + thoughts + tool_use,
            "promptTokensDetails": prompt_details,
            "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": audio_out}],
        });
        if tool_use > 0 {
            usage["toolUsePromptTokenCount"] = json!(tool_use);
        }
        usage
    }
}

/// The user's words, a piece per word.
fn transcribe(heard: &str, out: &mut Vec<Value>) {
    for (i, word) in heard.split(' ').filter(|w| !w.is_empty()).enumerate() {
        let text = if i == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        out.push(json!({"serverContent": {"inputTranscription": {"text": text}}}));
    }
}
