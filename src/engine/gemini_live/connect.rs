//! Opening a connection: the WebSocket, `setup` (sent once) answered by
//! `setupComplete`, and the conversation so far as text when a fresh
//! session replaces one that could not be resumed. Errors arrive as close
//! frames with a code and the service's words; [`Failure`] says what each
//! one means for the conversation.

use crate::engine::Role;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::Shared;
use super::wire::{self, ClientMessage};
use crate::engine::wss::{self, Conn, ConnectError, Received};

/// What a new connection is opened with.
#[derive(Debug, Clone)]
pub(super) struct Opening {
    pub(super) voice: String,
    pub(super) language: String,
    /// The latest resumable session handle: the new connection continues
    /// that session.
    pub(super) handle: Option<String>,
    /// Replayed as text when there is no handle.
    pub(super) history: Vec<(Role, String)>,
    /// Wait this long first (backoff after a failure).
    pub(super) delay: Duration,
}

/// What a failure means for the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Passing: reconnect (with backoff, a bounded number of times).
    Retry,
    /// The intermittent "not implemented" refusal: reconnect once, then give up.
    RetryOnce,
    /// The quota is used up or the service throttles: cool down and stop.
    Throttled,
    /// A refused key, an invalid request, a missing model: stop.
    Fatal,
}

/// Why a connection failed or ended, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Failure {
    pub(super) verdict: Verdict,
    pub(super) message: String,
}

impl Failure {
    pub(super) fn retry(message: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Retry,
            message: message.into(),
        }
    }

    /// What a close frame (or its absence) means: 1007 is an invalid
    /// request, 1008 a missing model or an intermittent "not implemented",
    /// a quota text (in 1011 or anywhere) is throttling, anything else
    /// (1011 unavailable or deadline expired, 1000, 1001) is passing.
    pub(super) fn from_close(frame: Option<&CloseFrame>) -> Self {
        let message = wss::close_text(frame);
        let Some(frame) = frame else {
            return Self::retry(message);
        };
        let reason = frame.reason.to_ascii_lowercase();
        let verdict = if reason.contains("quota") || reason.contains("resource_exhausted") {
            Verdict::Throttled
        } else {
            match u16::from(frame.code) {
                1007 => Verdict::Fatal,
                1008 if reason.contains("not implemented") => Verdict::RetryOnce,
                1008 => Verdict::Fatal,
                _ => Verdict::Retry,
            }
        };
        Self { verdict, message }
    }
}

impl From<ConnectError> for Failure {
    fn from(error: ConnectError) -> Self {
        let verdict = match &error {
            ConnectError::Auth(_) | ConnectError::Refused(_) => Verdict::Fatal,
            ConnectError::Throttled(_) => Verdict::Throttled,
            ConnectError::Unavailable(_) => Verdict::Retry,
        };
        Self {
            verdict,
            message: error.to_string(),
        }
    }
}

/// Opens a connection ready for audio, within the connect timeout.
pub(super) async fn open(shared: Arc<Shared>, opening: Opening) -> Result<Conn, Failure> {
    tokio::time::sleep(opening.delay).await;
    let settings = &shared.settings;
    let wait = settings.connect_timeout;
    let result: Result<Conn, Failure> = async {
        let headers: Vec<_> = settings.auth_header().into_iter().collect();
        let socket = wss::connect(&settings.endpoint_url, &headers, &shared.tls, wait).await?;
        let mut conn = Conn::new(socket);
        let setup = ClientMessage::Setup(setup(&shared, &opening));
        send(&mut conn, &setup, wait).await?;
        set_up(&mut conn, wait).await?;
        if opening.handle.is_none() && !opening.history.is_empty() {
            send(&mut conn, &ClientMessage::history(&opening.history), wait).await?;
        }
        Ok(conn)
    }
    .await;
    shared.count_open(
        result.is_ok(),
        matches!(&result, Err(f) if f.verdict == Verdict::Throttled),
    );
    result
}

/// Sends one message, within `wait`.
pub(super) async fn send(
    conn: &mut Conn,
    message: &ClientMessage,
    wait: Duration,
) -> Result<(), Failure> {
    Ok(conn.send_text(message.to_text(), wait).await?)
}

/// Reads until `setupComplete`; a close is the failure its code says.
async fn set_up(conn: &mut Conn, wait: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + wait;
    loop {
        let message = conn.next_until(deadline).await.ok_or_else(|| {
            Failure::retry(format!(
                "the setup was not accepted within {} ms",
                wait.as_millis()
            ))
        })?;
        let bytes = match message {
            Received::Data(bytes) => bytes,
            Received::Closed(frame) => return Err(Failure::from_close(frame.as_ref())),
            Received::Control => continue,
            Received::Lost(why) => {
                return Err(Failure::retry(format!("{why} during the setup")));
            }
        };
        if wire::parse(&bytes).is_some_and(|m| m.setup_complete.is_some()) {
            return Ok(());
        }
    }
}

/// The `setup` body: audio replies in the chosen voice, the prompt with the
/// conversation's language, the tools, both transcriptions, resumption and
/// the sliding context window (sessions longer than 15 minutes).
pub(super) fn setup(shared: &Shared, opening: &Opening) -> Value {
    let settings = &shared.settings;
    let mut instruction = settings.system_prompt.clone();
    if !opening.language.is_empty() {
        instruction.push_str(&format!(
            "\n\nThe conversation's language (BCP 47): {}.",
            opening.language
        ));
    }
    let declarations: Vec<Value> = shared
        .tools
        .as_ref()
        .map(|tools| {
            tools
                .specs()
                .into_iter()
                .map(|spec| {
                    let mut declaration =
                        json!({"name": spec.name, "description": spec.description});
                    // An object schema without properties is left out: the
                    // service refuses an empty OBJECT.
                    let empty = spec.schema["properties"]
                        .as_object()
                        .is_none_or(serde_json::Map::is_empty);
                    if !empty {
                        declaration["parameters"] = spec.schema;
                    }
                    declaration
                })
                .collect()
        })
        .unwrap_or_default();
    let resumption = match &opening.handle {
        Some(handle) => json!({"handle": handle}),
        None => json!({}),
    };
    let mut setup = json!({
        "model": format!("models/{}", settings.model),
        "generationConfig": {
            "responseModalities": ["AUDIO"],
            "speechConfig": {"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": opening.voice}}},
        },
        "systemInstruction": {"parts": [{"text": instruction}]},
        "inputAudioTranscription": {},
        "outputAudioTranscription": {},
        "sessionResumption": resumption,
        "contextWindowCompression": {"slidingWindow": {}},
    });
    if !declarations.is_empty() {
        setup["tools"] = json!([{"functionDeclarations": declarations}]);
    }
    if opening.handle.is_none() && !opening.history.is_empty() {
        // Gemini 3.1 takes `clientContent` only as initial history.
        setup["historyConfig"] = json!({"initialHistoryInClientContent": true});
    }
    setup
}
