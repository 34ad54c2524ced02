//! A Bedrock-compatible test endpoint: a real HTTP/2 server over TLS (a
//! certificate made at start) that speaks the AWS event-stream framing of
//! `InvokeModelWithBidirectionalStream`. Signed envelopes are unwrapped, not
//! verified. A scripted model hears turns with an energy detector, answers
//! with transcripts, paced audio and usage, calls tools and waits for their
//! results, and can be told to fail: throttling, a model timeout, a reset
//! stream, a malformed event, a stall, refused credentials.

#![allow(
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    reason = "a test helper: not every test uses every part"
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder, write_message_to};
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

/// Loud enough to be speech (RMS of one 512-sample frame).
const SPEECH_RMS: f64 = 1_000.0;
/// Speech that ends a turn, then this much quiet.
const MIN_SPEECH_MS: u64 = 200;
const END_SILENCE_MS: u64 = 500;

/// What one connection (one call) does.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Turns answered in order; past the last, heard speech is ignored.
    pub turns: Vec<Turn>,
    pub fail: Option<Fail>,
    /// End the stream with `modelTimeoutException` at this age.
    pub max_age: Option<Duration>,
    /// How long the "service" takes to set a session up after `sessionStart`
    /// before it answers (events sent meanwhile wait).
    pub setup_delay: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Turn {
    /// What the model "heard" (the USER FINAL transcript).
    pub user: String,
    /// The reply; `{tool}` is replaced by the tool result at `tool.pointer`.
    pub reply: String,
    pub reply_audio_ms: u64,
    pub tool: Option<ToolStep>,
}

#[derive(Debug, Clone)]
pub struct ToolStep {
    pub name: String,
    pub input: Value,
    /// JSON pointer into the result, spoken in the reply.
    pub pointer: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// `throttlingException` right after the response starts.
    Throttle,
    /// HTTP 403 `UnrecognizedClientException` instead of a response.
    Auth,
    /// RST_STREAM after part of the first reply's audio.
    ResetInReply,
    /// A chunk that is not JSON before the first reply's audio.
    MalformedInReply,
    /// After the first USER transcript, nothing more.
    StallAfterTranscript,
}

impl Script {
    /// Answers `turns` and nothing else.
    pub fn answering(turns: Vec<Turn>) -> Self {
        Self {
            turns,
            ..Self::default()
        }
    }

    /// Fails as `fail` says (on the first reply, where that applies).
    pub fn failing(fail: Fail, turns: Vec<Turn>) -> Self {
        Self {
            turns,
            fail: Some(fail),
            ..Self::default()
        }
    }
}

impl Sent {
    /// The exact cost of these tokens at `rates`, rounded half-up to micro-dollars.
    pub fn cost_micro_usd(&self, rates: &sonora::usage::Rates) -> u64 {
        let nano = u128::from(self.speech_in) * u128::from(rates.speech_in)
            + u128::from(self.speech_out) * u128::from(rates.speech_out)
            + u128::from(self.text_in) * u128::from(rates.text_in)
            + u128::from(self.text_out) * u128::from(rates.text_out);
        u64::try_from((nano + 500) / 1_000).unwrap_or(u64::MAX)
    }
}

impl Turn {
    pub fn new(user: &str, reply: &str, reply_audio_ms: u64) -> Self {
        Self {
            user: user.into(),
            reply: reply.into(),
            reply_audio_ms,
            tool: None,
        }
    }
}

/// What one connection received and sent.
#[derive(Debug, Default, Clone)]
pub struct Connection {
    /// Every input event in order; `audioInput` content replaced by its sample count.
    pub events: Vec<Value>,
    /// All user audio received, 16-bit samples.
    pub audio: Vec<i16>,
    /// Every event arrived in a signed envelope.
    pub signed: bool,
    /// Text blocks received: (role, interactive, text).
    pub texts: Vec<(String, bool, String)>,
    /// Tool results received: (toolUseId, result JSON).
    pub tool_results: Vec<(String, Value)>,
    pub opened_at: Option<Instant>,
    /// When the first and last audioInput arrived.
    pub first_audio_at: Option<Instant>,
    pub last_audio_at: Option<Instant>,
    pub ended_by_client: bool,
    pub barge_ins: u32,
}

/// Token deltas sent, summed over all connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub speech_in: u64,
    pub speech_out: u64,
    pub text_in: u64,
    pub text_out: u64,
}

#[derive(Debug, Default)]
pub struct Log {
    pub connections: Vec<Connection>,
    pub sent: Sent,
}

/// The running endpoint.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub url: String,
    pub ca_file: PathBuf,
    pub log: Arc<Mutex<Log>>,
    _listening: crate::common::tls::Listening,
}

impl Endpoint {
    /// Starts on 127.0.0.1:0. Connection `i` follows `scripts[i]`, the last
    /// script repeating.
    pub async fn start(scripts: Vec<Script>) -> Self {
        let log = Arc::new(Mutex::new(Log::default()));
        let scripts = Arc::new(scripts);
        let shared = log.clone();
        let listening = crate::common::tls::listen("bedrock", &[b"h2"], move |tls| {
            let (log, scripts) = (shared.clone(), scripts.clone());
            async move {
                let Ok(mut h2) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = h2.accept().await {
                    let index = {
                        let mut log = log.lock().expect("log");
                        log.connections.push(Connection {
                            opened_at: Some(Instant::now()),
                            ..Connection::default()
                        });
                        log.connections.len() - 1
                    };
                    let script = crate::common::tls::nth(&scripts, index);
                    tokio::spawn(serve_call(request, respond, script, index, log.clone()));
                }
            }
        })
        .await;
        let addr = listening.addr;
        Self {
            addr,
            url: format!("https://127.0.0.1:{}", addr.port()),
            ca_file: listening.ca_file.clone(),
            log,
            _listening: listening,
        }
    }

    pub fn connections(&self) -> Vec<Connection> {
        self.log.lock().expect("log").connections.clone()
    }

    pub fn sent(&self) -> Sent {
        self.log.lock().expect("log").sent
    }
}

/// Something for the response writer.
enum Out {
    Event(Value),
    Raw(Bytes),
    Exception(&'static str, String),
    End,
    Reset,
}

fn frame(message: &Message) -> Bytes {
    let mut buf = Vec::new();
    write_message_to(message, &mut buf).expect("encode frame");
    Bytes::from(buf)
}

fn chunk_frame(payload_json: &[u8]) -> Bytes {
    let body = json!({ "bytes": base64(payload_json) }).to_string();
    frame(&Message::new_from_parts(
        vec![
            Header::new(":message-type", HeaderValue::String("event".into())),
            Header::new(":event-type", HeaderValue::String("chunk".into())),
            Header::new(
                ":content-type",
                HeaderValue::String("application/json".into()),
            ),
        ],
        body.into_bytes(),
    ))
}

fn exception_frame(name: &str, message: &str) -> Bytes {
    let body = json!({ "message": message }).to_string();
    frame(&Message::new_from_parts(
        vec![
            Header::new(":message-type", HeaderValue::String("exception".into())),
            Header::new(
                ":exception-type",
                HeaderValue::String(name.to_owned().into()),
            ),
            Header::new(
                ":content-type",
                HeaderValue::String("application/json".into()),
            ),
        ],
        body.into_bytes(),
    ))
}

async fn serve_call(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    script: Script,
    index: usize,
    log: Arc<Mutex<Log>>,
) {
    let mut body = request.into_body();
    let mut decoder = MessageFrameDecoder::new();
    let mut buf = BytesMut::new();
    let (in_tx, mut in_rx) = mpsc::channel::<Value>(1024);
    // Reader: envelopes → inner events → JSON.
    let reader_log = log.clone();
    tokio::spawn(async move {
        while let Some(Ok(data)) = body.data().await {
            let _ = body.flow_control().release_capacity(data.len());
            buf.extend_from_slice(&data);
            while let Ok(DecodedFrame::Complete(outer)) = decoder.decode_frame(&mut buf) {
                let signed = outer
                    .headers()
                    .iter()
                    .any(|h| h.name().as_str() == ":chunk-signature");
                let inner = if signed {
                    if outer.payload().is_empty() {
                        continue; // the closing empty envelope
                    }
                    let mut payload = BytesMut::from(&outer.payload()[..]);
                    match MessageFrameDecoder::new().decode_frame(&mut payload) {
                        Ok(DecodedFrame::Complete(inner)) => inner,
                        _ => continue,
                    }
                } else {
                    outer
                };
                {
                    let mut log = reader_log.lock().expect("log");
                    let c = &mut log.connections[index];
                    c.signed = signed && (c.events.is_empty() || c.signed);
                }
                let Ok(wrapper) = serde_json::from_slice::<Value>(inner.payload()) else {
                    continue;
                };
                let Some(bytes) = wrapper["bytes"].as_str().and_then(unbase64) else {
                    continue;
                };
                let Ok(event) = serde_json::from_slice::<Value>(&bytes) else {
                    continue;
                };
                if in_tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    });

    // Like the service: no response until sessionStart arrives.
    let Some(first) = in_rx.recv().await else {
        return;
    };
    if let Some(delay) = script.setup_delay {
        tokio::time::sleep(delay).await;
    }
    if script.fail == Some(Fail::Auth) {
        let response = http::Response::builder()
            .status(403)
            .header("content-type", "application/json")
            .header("x-amzn-errortype", "UnrecognizedClientException:http://internal.amazon.com/coral/com.amazon.coral.service/")
            .body(())
            .expect("response");
        if let Ok(mut send) = respond.send_response(response, false) {
            let body = json!({"message": "The security token included in the request is invalid."});
            let _ = send.send_data(Bytes::from(body.to_string()), true);
        }
        return;
    }
    let response = http::Response::builder()
        .status(200)
        .header("content-type", "application/vnd.amazon.eventstream")
        .body(())
        .expect("response");
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Out>();
    tokio::spawn(async move {
        while let Some(out) = out_rx.recv().await {
            let result = match out {
                Out::Event(event) => {
                    send.send_data(chunk_frame(event.to_string().as_bytes()), false)
                }
                Out::Raw(bytes) => send.send_data(chunk_frame(&bytes), false),
                Out::Exception(name, message) => {
                    let _ = send.send_data(exception_frame(name, &message), false);
                    send.send_data(Bytes::new(), true)
                }
                Out::End => send.send_data(Bytes::new(), true),
                Out::Reset => {
                    send.send_reset(h2::Reason::INTERNAL_ERROR);
                    Ok(())
                }
            };
            if result.is_err() {
                return;
            }
        }
    });
    if script.fail == Some(Fail::Throttle) {
        let _ = out_tx.send(Out::Exception(
            "throttlingException",
            "Too many requests, please wait before trying again.".into(),
        ));
        return;
    }
    if let Some(age) = script.max_age {
        let tx = out_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(age).await;
            let _ = tx.send(Out::Exception(
                "modelTimeoutException",
                "Model has timed out in processing the request".into(),
            ));
        });
    }
    let mut model = Model::new(script, index, log, out_tx);
    model.on_event(first);
    while let Some(event) = in_rx.recv().await {
        if !model.on_event(event) {
            break;
        }
    }
}

/// The scripted model of one connection.
struct Model {
    script: Script,
    index: usize,
    log: Arc<Mutex<Log>>,
    out: mpsc::UnboundedSender<Out>,
    prompt: String,
    blocks: HashMap<String, (String, String, bool)>,
    next_turn: usize,
    speech_ms: u64,
    quiet_ms: u64,
    /// Audio since the last turn (for input tokens).
    heard_ms: u64,
    speaking: Option<oneshot::Sender<()>>,
    speaking_done: Arc<std::sync::atomic::AtomicBool>,
    tool_waiters: HashMap<String, oneshot::Sender<Value>>,
    totals: Arc<Mutex<Sent>>,
    replies: u32,
}

impl Model {
    fn new(
        script: Script,
        index: usize,
        log: Arc<Mutex<Log>>,
        out: mpsc::UnboundedSender<Out>,
    ) -> Self {
        Self {
            script,
            index,
            log,
            out,
            prompt: String::new(),
            blocks: HashMap::new(),
            next_turn: 0,
            speech_ms: 0,
            quiet_ms: 0,
            heard_ms: 0,
            speaking: None,
            speaking_done: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            tool_waiters: HashMap::new(),
            totals: Arc::new(Mutex::new(Sent::default())),
            replies: 0,
        }
    }

    fn record(&self, event: Value) {
        let mut log = self.log.lock().expect("log");
        log.connections[self.index].events.push(event);
    }

    /// False once the stream is over.
    fn on_event(&mut self, event: Value) -> bool {
        let Some((name, body)) = event["event"].as_object().and_then(|o| o.iter().next()) else {
            return true;
        };
        let (name, body) = (name.clone(), body.clone());
        match name.as_str() {
            "promptStart" => {
                self.prompt = body["promptName"].as_str().unwrap_or_default().to_owned();
                self.record(event);
            }
            "contentStart" => {
                let content = body["contentName"].as_str().unwrap_or_default().to_owned();
                let kind = body["type"].as_str().unwrap_or_default().to_owned();
                let role = body["role"].as_str().unwrap_or_default().to_owned();
                let interactive = body["interactive"].as_bool().unwrap_or(false);
                self.blocks.insert(content, (kind, role, interactive));
                self.record(event);
            }
            "textInput" => {
                let content = body["contentName"].as_str().unwrap_or_default();
                let text = body["content"].as_str().unwrap_or_default().to_owned();
                let (_, role, interactive) = self.blocks.get(content).cloned().unwrap_or_default();
                {
                    let mut log = self.log.lock().expect("log");
                    let c = &mut log.connections[self.index];
                    match c.texts.last_mut() {
                        Some(last)
                            if last.0 == role
                                && c.events.last().is_some_and(|e| {
                                    e["event"]["textInput"]["contentName"] == content
                                }) =>
                        {
                            last.2.push_str(&text);
                        }
                        _ => c.texts.push((role.clone(), interactive, text.clone())),
                    }
                }
                self.record(event);
                if interactive && role == "USER" {
                    self.reply(None);
                }
            }
            "audioInput" => {
                let samples = body["content"]
                    .as_str()
                    .and_then(unbase64)
                    .map(|b| {
                        b.chunks_exact(2)
                            .map(|c| i16::from_le_bytes([c[0], c[1]]))
                            .collect::<Vec<i16>>()
                    })
                    .unwrap_or_default();
                {
                    let mut log = self.log.lock().expect("log");
                    let c = &mut log.connections[self.index];
                    let now = Instant::now();
                    c.first_audio_at.get_or_insert(now);
                    c.last_audio_at = Some(now);
                    c.audio.extend_from_slice(&samples);
                    c.events
                        .push(json!({"event": {"audioInput": {"samples": samples.len()}}}));
                }
                self.hear(&samples);
            }
            "toolResult" => {
                let content = body["contentName"].as_str().unwrap_or_default();
                let result: Value = body["content"]
                    .as_str()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or(Value::Null);
                // The tool use id is on the block's contentStart.
                let id = {
                    let log = self.log.lock().expect("log");
                    log.connections[self.index]
                        .events
                        .iter()
                        .rev()
                        .find(|e| e["event"]["contentStart"]["contentName"] == content)
                        .and_then(|e| {
                            e["event"]["contentStart"]["toolResultInputConfiguration"]["toolUseId"]
                                .as_str()
                        })
                        .unwrap_or_default()
                        .to_owned()
                };
                {
                    let mut log = self.log.lock().expect("log");
                    log.connections[self.index]
                        .tool_results
                        .push((id.clone(), result.clone()));
                }
                self.record(event);
                if let Some(waiter) = self.tool_waiters.remove(&id) {
                    let _ = waiter.send(result);
                }
            }
            "sessionEnd" => {
                self.record(event);
                {
                    let mut log = self.log.lock().expect("log");
                    log.connections[self.index].ended_by_client = true;
                }
                let _ = self.out.send(Out::End);
                return false;
            }
            _ => self.record(event),
        }
        true
    }

    /// Energy detection over one audio event.
    fn hear(&mut self, samples: &[i16]) {
        if samples.is_empty() {
            return;
        }
        let ms = samples.len() as u64 * 1000 / 16_000;
        self.heard_ms += ms;
        let rms = (samples
            .iter()
            .map(|&s| f64::from(s) * f64::from(s))
            .sum::<f64>()
            / samples.len() as f64)
            .sqrt();
        if rms >= SPEECH_RMS {
            self.quiet_ms = 0;
            self.speech_ms += ms;
            let speaking = !self
                .speaking_done
                .load(std::sync::atomic::Ordering::Acquire);
            if speaking && self.speech_ms >= MIN_SPEECH_MS {
                // Barge-in.
                if let Some(stop) = self.speaking.take() {
                    let _ = stop.send(());
                    let mut log = self.log.lock().expect("log");
                    log.connections[self.index].barge_ins += 1;
                }
            }
        } else {
            self.quiet_ms += ms;
            if self.speech_ms >= MIN_SPEECH_MS && self.quiet_ms >= END_SILENCE_MS {
                self.speech_ms = 0;
                let turn = self.script.turns.get(self.next_turn).cloned();
                if let Some(turn) = turn {
                    self.next_turn += 1;
                    self.reply(Some(turn));
                }
            } else if self.quiet_ms >= END_SILENCE_MS {
                self.speech_ms = 0;
            }
        }
    }

    /// Answers a turn (heard speech) or typed text (`None`: the next turn's reply).
    fn reply(&mut self, turn: Option<Turn>) {
        let (turn, heard) = match turn {
            Some(turn) => (turn, true),
            None => {
                let Some(turn) = self.script.turns.get(self.next_turn).cloned() else {
                    return;
                };
                self.next_turn += 1;
                (turn, false)
            }
        };
        self.replies += 1;
        let first_reply = self.replies == 1;
        let (stop_tx, stop_rx) = oneshot::channel();
        self.speaking = Some(stop_tx);
        self.speaking_done
            .store(false, std::sync::atomic::Ordering::Release);
        let tool_rx = turn.tool.as_ref().map(|_| {
            let (tx, rx) = oneshot::channel();
            let id = format!("tooluse-{}-{}", self.index, self.replies);
            self.tool_waiters.insert(id.clone(), tx);
            (id, rx)
        });
        let speech_in = if heard { self.heard_ms * 25 / 1000 } else { 0 };
        self.heard_ms = 0;
        let ctx = Reply {
            out: self.out.clone(),
            prompt: self.prompt.clone(),
            turn,
            heard,
            fail: if first_reply { self.script.fail } else { None },
            speech_in,
            totals: self.totals.clone(),
            log: self.log.clone(),
            done: self.speaking_done.clone(),
            n: self.replies,
        };
        tokio::spawn(ctx.run(stop_rx, tool_rx));
    }
}

struct Reply {
    out: mpsc::UnboundedSender<Out>,
    prompt: String,
    turn: Turn,
    heard: bool,
    fail: Option<Fail>,
    speech_in: u64,
    totals: Arc<Mutex<Sent>>,
    log: Arc<Mutex<Log>>,
    done: Arc<std::sync::atomic::AtomicBool>,
    n: u32,
}

impl Reply {
    fn send(&self, name: &str, mut body: Value) {
        body["promptName"] = json!(self.prompt);
        body["sessionId"] = json!("test-session");
        body["completionId"] = json!(format!("completion-{}", self.n));
        let _ = self
            .out
            .send(Out::Event(json!({ "event": { name: body } })));
    }

    fn text_block(&self, id: &str, role: &str, stage: &str, text: &str, stop: &str) {
        self.send(
            "contentStart",
            json!({
                "contentId": id, "type": "TEXT", "role": role,
                "additionalModelFields": json!({"generationStage": stage}).to_string(),
                "textOutputConfiguration": {"mediaType": "text/plain"},
            }),
        );
        self.send(
            "textOutput",
            json!({"contentId": id, "content": text, "role": role}),
        );
        self.send(
            "contentEnd",
            json!({"contentId": id, "type": "TEXT", "stopReason": stop}),
        );
    }

    fn usage(&self, delta: Sent) {
        let total = {
            let mut totals = self.totals.lock().expect("totals");
            totals.speech_in += delta.speech_in;
            totals.speech_out += delta.speech_out;
            totals.text_in += delta.text_in;
            totals.text_out += delta.text_out;
            *totals
        };
        {
            let mut log = self.log.lock().expect("log");
            log.sent.speech_in += delta.speech_in;
            log.sent.speech_out += delta.speech_out;
            log.sent.text_in += delta.text_in;
            log.sent.text_out += delta.text_out;
        }
        let tokens = |s: Sent| {
            json!({
                "input": {"speechTokens": s.speech_in, "textTokens": s.text_in},
                "output": {"speechTokens": s.speech_out, "textTokens": s.text_out},
            })
        };
        self.send(
            "usageEvent",
            json!({
                "details": {"delta": tokens(delta), "total": tokens(total)},
                "totalInputTokens": total.speech_in + total.text_in,
                "totalOutputTokens": total.speech_out + total.text_out,
                "totalTokens": total.speech_in + total.text_in + total.speech_out + total.text_out,
            }),
        );
    }

    async fn run(
        self,
        mut stop: oneshot::Receiver<()>,
        tool: Option<(String, oneshot::Receiver<Value>)>,
    ) {
        let n = self.n;
        self.send("completionStart", json!({}));
        if self.heard {
            self.text_block(
                &format!("user-{n}"),
                "USER",
                "FINAL",
                &self.turn.user,
                "END_TURN",
            );
        }
        self.usage(Sent {
            speech_in: self.speech_in,
            text_in: 40 + (self.turn.user.len() as u64) / 4,
            ..Sent::default()
        });
        if self.fail == Some(Fail::StallAfterTranscript) {
            return;
        }
        let mut reply = self.turn.reply.clone();
        if let (Some(step), Some((id, rx))) = (&self.turn.tool, tool) {
            let tool_content = format!("tool-{n}");
            self.send("contentStart", json!({"contentId": tool_content, "type": "TOOL", "role": "TOOL", "toolUseOutputConfiguration": {"mediaType": "application/json"}}));
            self.send("toolUse", json!({"contentId": tool_content, "toolName": step.name, "toolUseId": id, "content": step.input.to_string()}));
            self.send(
                "contentEnd",
                json!({"contentId": tool_content, "type": "TOOL", "stopReason": "TOOL_USE"}),
            );
            let Ok(Ok(result)) = tokio::time::timeout(Duration::from_secs(20), rx).await else {
                self.done.store(true, std::sync::atomic::Ordering::Release);
                return;
            };
            let value = result.pointer(&step.pointer).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            reply = reply.replace("{tool}", &value.unwrap_or_else(|| "(nada)".into()));
            self.usage(Sent {
                text_in: 10,
                ..Sent::default()
            });
        }
        self.text_block(
            &format!("spec-{n}"),
            "ASSISTANT",
            "SPECULATIVE",
            &reply,
            "PARTIAL_TURN",
        );
        if self.fail == Some(Fail::MalformedInReply) {
            let _ = self.out.send(Out::Raw(Bytes::from_static(
                b"{\"event\": {\"textOutput\": ",
            )));
        }
        let audio_id = format!("audio-{n}");
        self.send("contentStart", json!({"contentId": audio_id, "type": "AUDIO", "role": "ASSISTANT",
            "audioOutputConfiguration": {"mediaType": "audio/lpcm", "sampleRateHertz": 24000, "sampleSizeBits": 16, "channelCount": 1, "encoding": "base64"}}));
        // 100 ms chunks at twice real time, a 440 Hz tone.
        let chunks = self.turn.reply_audio_ms.div_ceil(100);
        let mut interrupted = false;
        let mut sent_ms = 0;
        for i in 0..chunks {
            if self.fail == Some(Fail::ResetInReply) && i == chunks / 2 {
                let _ = self.out.send(Out::Reset);
                return;
            }
            let samples: Vec<u8> = (0..2400)
                .flat_map(|k| {
                    let t = (i * 2400 + k) as f64 / 24_000.0;
                    (((t * 440.0 * std::f64::consts::TAU).sin() * 6000.0) as i16).to_le_bytes()
                })
                .collect();
            self.send(
                "audioOutput",
                json!({"contentId": audio_id, "content": base64(&samples)}),
            );
            sent_ms += 100;
            tokio::select! {
                _ = &mut stop => { interrupted = true; break; }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        if interrupted {
            self.send(
                "contentEnd",
                json!({"contentId": audio_id, "type": "AUDIO", "stopReason": "INTERRUPTED"}),
            );
            let id = format!("final-{n}");
            self.send(
                "contentStart",
                json!({"contentId": id, "type": "TEXT", "role": "ASSISTANT",
                "additionalModelFields": json!({"generationStage": "FINAL"}).to_string()}),
            );
            self.send(
                "textOutput",
                json!({"contentId": id, "content": "{ \"interrupted\" : true }"}),
            );
            self.send(
                "contentEnd",
                json!({"contentId": id, "type": "TEXT", "stopReason": "INTERRUPTED"}),
            );
        } else {
            self.send(
                "contentEnd",
                json!({"contentId": audio_id, "type": "AUDIO", "stopReason": "END_TURN"}),
            );
            self.text_block(
                &format!("final-{n}"),
                "ASSISTANT",
                "FINAL",
                &reply,
                "END_TURN",
            );
        }
        self.usage(Sent {
            speech_out: sent_ms * 25 / 1000,
            text_out: 3 + (reply.len() as u64) / 4,
            ..Sent::default()
        });
        self.send(
            "completionEnd",
            json!({"stopReason": if interrupted { "INTERRUPTED" } else { "END_TURN" }}),
        );
        self.done.store(true, std::sync::atomic::Ordering::Release);
    }
}

pub use crate::common::{base64, unbase64};
