//! Opening a session: the WebSocket, `session.created`, the session's
//! settings (`session.update`, answered by `session.updated` or an error),
//! and the conversation so far as text items.

use crate::engine::Role;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::wire::{self, ClientEvent, ServerEvent};
use super::{RATE_HZ, Shared, TurnDetection};
use crate::engine::wss::{self, ConnectError, Socket};

/// One open session.
pub(super) struct Conn {
    pub(super) sink: SplitSink<Socket, Message>,
    pub(super) stream: SplitStream<Socket>,
    pub(super) opened_at: Instant,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("opened_at", &self.opened_at)
            .finish_non_exhaustive()
    }
}

/// What a new session is opened with.
#[derive(Debug, Clone)]
pub(super) struct Opening {
    pub(super) voice: String,
    pub(super) language: String,
    pub(super) history: Vec<(Role, String)>,
    /// Wait this long first (backoff after a failure).
    pub(super) delay: Duration,
}

/// Opens a session ready for audio, within the connect timeout for each step.
pub(super) async fn open(shared: Arc<Shared>, opening: Opening) -> Result<Conn, ConnectError> {
    tokio::time::sleep(opening.delay).await;
    let settings = &shared.settings;
    let result = async {
        let socket = wss::connect(
            &settings.url(),
            &[settings.auth_header()],
            &shared.tls,
            settings.connect_timeout,
        )
        .await?;
        let (mut sink, mut stream) = socket.split();
        let wait = settings.connect_timeout;
        expect(&mut stream, wait, |e| {
            matches!(e, ServerEvent::SessionCreated {})
        })
        .await?;
        let update = ClientEvent::SessionUpdate {
            session: session_config(&shared, &opening.voice, &opening.language),
        };
        send(&mut sink, &update, wait).await?;
        expect(&mut stream, wait, |e| {
            matches!(e, ServerEvent::SessionUpdated {})
        })
        .await?;
        for (role, text) in &opening.history {
            send(&mut sink, &ClientEvent::history(*role, text), wait).await?;
        }
        Ok(Conn {
            sink,
            stream,
            opened_at: Instant::now(),
        })
    }
    .await;
    let stats = &shared.stats;
    match &result {
        Ok(_) => stats.connects.fetch_add(1, Ordering::Relaxed),
        Err(_) => stats.connect_failures.fetch_add(1, Ordering::Relaxed),
    };
    if matches!(result, Err(ConnectError::Throttled(_))) {
        shared.cool_down();
    }
    result
}

/// Sends one event, within `wait`.
pub(super) async fn send(
    sink: &mut SplitSink<Socket, Message>,
    event: &ClientEvent,
    wait: Duration,
) -> Result<(), ConnectError> {
    match tokio::time::timeout(wait, sink.send(Message::text(event.to_text()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ConnectError::Unavailable(format!("sending: {e}"))),
        Err(_) => Err(ConnectError::Unavailable(format!(
            "the service took no data for {} ms",
            wait.as_millis()
        ))),
    }
}

/// Reads until an event `wanted` accepts; an `error` event or a close is
/// the failure it says.
async fn expect(
    stream: &mut SplitStream<Socket>,
    wait: Duration,
    wanted: impl Fn(&ServerEvent) -> bool,
) -> Result<(), ConnectError> {
    let deadline = Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| {
                ConnectError::Unavailable(format!(
                    "the session was not ready within {} ms",
                    wait.as_millis()
                ))
            })?;
        let text = match message {
            Some(Ok(Message::Text(text))) => text.to_string(),
            Some(Ok(Message::Binary(bytes))) => String::from_utf8_lossy(&bytes).into_owned(),
            Some(Ok(Message::Close(frame))) => {
                return Err(ConnectError::Unavailable(wss::close_text(frame.as_ref())));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ConnectError::Unavailable(e.to_string())),
            None => return Err(ConnectError::Unavailable("connection closed".into())),
        };
        match wire::parse(&text) {
            Some(ServerEvent::Error { error }) => {
                let said = format!("{}: {}", error.code(), error.message);
                return Err(if error.throttled() {
                    ConnectError::Throttled(said)
                } else if error.code().contains("api_key") || error.kind.contains("auth") {
                    ConnectError::Auth(said)
                } else {
                    ConnectError::Refused(said)
                });
            }
            Some(event) if wanted(&event) => return Ok(()),
            _ => {}
        }
    }
}

/// The `session.update` body: audio both ways at 24 kHz, the service's voice
/// detection with barge-in, the user's words transcribed, the tools.
fn session_config(shared: &Shared, voice: &str, language: &str) -> Value {
    let settings = &shared.settings;
    let turn_detection = match settings.turn_detection {
        TurnDetection::ServerVad { silence_ms } => json!({
            "type": "server_vad",
            "silence_duration_ms": silence_ms,
            "create_response": true,
            "interrupt_response": true,
        }),
        TurnDetection::SemanticVad => json!({
            "type": "semantic_vad",
            "create_response": true,
            "interrupt_response": true,
        }),
    };
    let mut input = json!({
        "format": {"type": "audio/pcm", "rate": RATE_HZ},
        "turn_detection": turn_detection,
    });
    let primary = language
        .split('-')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !settings.transcription_model.is_empty() {
        let mut transcription = json!({"model": settings.transcription_model});
        if primary.len() == 2 {
            transcription["language"] = json!(primary);
        }
        input["transcription"] = transcription;
    }
    let mut instructions = settings.system_prompt.clone();
    if !language.is_empty() {
        instructions.push_str(&format!(
            "\n\nThe conversation's language (BCP 47): {language}."
        ));
    }
    let tools: Vec<Value> = shared
        .tools
        .as_ref()
        .map(|tools| {
            tools
                .specs()
                .into_iter()
                .map(|spec| {
                    json!({
                        "type": "function",
                        "name": spec.name,
                        "description": spec.description,
                        "parameters": spec.schema,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut session = json!({
        "type": "realtime",
        "model": settings.model,
        "instructions": instructions,
        "output_modalities": ["audio"],
        "audio": {
            "input": input,
            "output": {"format": {"type": "audio/pcm", "rate": RATE_HZ}, "voice": voice},
        },
    });
    if !tools.is_empty() {
        session["tools"] = Value::Array(tools);
        session["tool_choice"] = json!("auto");
    }
    session
}
