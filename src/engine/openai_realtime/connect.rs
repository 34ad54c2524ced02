//! Opening a session: the WebSocket, `session.created`, the session's
//! settings (`session.update`, answered by `session.updated` or an error),
//! and the conversation so far as text items.

use crate::engine::Role;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::wire::{self, ClientEvent, ServerEvent};
use super::{RATE_HZ, Shared, TurnDetection};
use crate::engine::wss::{self, Conn, ConnectError, Received};

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
        let mut conn = Conn::new(socket);
        let wait = settings.connect_timeout;
        expect(&mut conn, wait, |e| {
            matches!(e, ServerEvent::SessionCreated {})
        })
        .await?;
        let update = ClientEvent::SessionUpdate {
            session: session_config(&shared, &opening.voice, &opening.language),
        };
        send(&mut conn, &update, wait).await?;
        expect(&mut conn, wait, |e| {
            matches!(e, ServerEvent::SessionUpdated {})
        })
        .await?;
        for (role, text) in &opening.history {
            send(&mut conn, &ClientEvent::history(*role, text), wait).await?;
        }
        Ok(conn)
    }
    .await;
    shared.count_open(
        result.is_ok(),
        matches!(result, Err(ConnectError::Throttled(_))),
    );
    result
}

/// Sends one event, within `wait`.
pub(super) async fn send(
    conn: &mut Conn,
    event: &ClientEvent,
    wait: Duration,
) -> Result<(), ConnectError> {
    conn.send_text(event.to_text(), wait).await
}

/// Reads until an event `wanted` accepts; an `error` event or a close is
/// the failure it says.
async fn expect(
    conn: &mut Conn,
    wait: Duration,
    wanted: impl Fn(&ServerEvent) -> bool,
) -> Result<(), ConnectError> {
    let deadline = Instant::now() + wait;
    loop {
        let message = conn.next_until(deadline).await.ok_or_else(|| {
            ConnectError::Unavailable(format!(
                "the session was not ready within {} ms",
                wait.as_millis()
            ))
        })?;
        let bytes = match message {
            Received::Data(bytes) => bytes,
            Received::Closed(frame) => {
                return Err(ConnectError::Unavailable(wss::close_text(frame.as_ref())));
            }
            Received::Control => continue,
            Received::Lost(why) => return Err(ConnectError::Unavailable(why)),
        };
        let text = String::from_utf8_lossy(&bytes);
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
