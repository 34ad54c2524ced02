//! The optional OpenAI-compatible chat endpoint, against a real HTTP server
//! on 127.0.0.1 that records what it was sent.

#![allow(
    clippy::unwrap_used,
    reason = "a test helper that fails must fail the test"
)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sonora::engine::Role;
use sonora::engine::local::chat::{ChatClient, ChatConfig};
use sonora::knowledge::KnowledgeBase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Default)]
struct Seen {
    head: String,
    body: serde_json::Value,
}

/// Serves `status` and `body` to every request; `delay` before answering.
async fn server(
    status: u16,
    reply: &'static str,
    delay: Duration,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                let (head, body_start) = loop {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buf[..n]);
                    if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        break (String::from_utf8_lossy(&data[..i]).into_owned(), i + 4);
                    }
                };
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                while data.len() < body_start + length {
                    let n = socket.read(&mut buf).await.unwrap();
                    data.extend_from_slice(&buf[..n]);
                }
                let body = serde_json::from_slice(&data[body_start..body_start + length])
                    .unwrap_or_default();
                record.lock().unwrap().push(Seen { head, body });
                tokio::time::sleep(delay).await;
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    (url, seen)
}

fn knowledge() -> KnowledgeBase {
    KnowledgeBase::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("knowledge")).unwrap()
}

fn config(url: &str, timeout_ms: u64) -> ChatConfig {
    ChatConfig {
        url: url.into(),
        model: "modelo-de-prueba".into(),
        api_key: "clave".into(),
        timeout: Duration::from_millis(timeout_ms),
        max_tokens: 120,
    }
}

#[tokio::test]
async fn the_request_carries_the_knowledge_base_history_and_question() {
    let (url, seen) = server(
        200,
        r#"{"choices":[{"message":{"role":"assistant","content":"**Abre** a las 8."}}]}"#,
        Duration::ZERO,
    )
    .await;
    let client = ChatClient::new(config(&url, 2_000)).unwrap();
    let history = vec![
        (Role::User, "hola".to_owned()),
        (Role::Assistant, "¿en qué te ayudo?".to_owned()),
    ];
    let reply = client
        .reply(&knowledge(), "es", &history, "¿cuándo abre la biblioteca?")
        .await
        .unwrap();
    assert_eq!(reply, "Abre a las 8.");
    let seen = seen.lock().unwrap()[0].clone();
    assert!(
        seen.head.starts_with("POST /v1/chat/completions "),
        "{}",
        seen.head
    );
    assert!(
        seen.head
            .to_ascii_lowercase()
            .contains("authorization: bearer clave"),
        "{}",
        seen.head
    );
    assert_eq!(seen.body["model"], "modelo-de-prueba");
    let messages = seen.body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0]["role"], "system");
    assert!(
        messages[0]["content"]
            .as_str()
            .unwrap()
            .contains("biblioteca")
    );
    assert!(messages[0]["content"].as_str().unwrap().contains("español"));
    assert_eq!(messages[1]["content"], "hola");
    assert_eq!(messages[2]["role"], "assistant");
    assert_eq!(messages[3]["content"], "¿cuándo abre la biblioteca?");
}

#[tokio::test]
async fn failures_are_errors_that_say_what_happened() {
    let (url, _) = server(500, r#"{"error":"boom"}"#, Duration::ZERO).await;
    let err = ChatClient::new(config(&url, 2_000))
        .unwrap()
        .reply(&knowledge(), "es", &[], "hola")
        .await
        .unwrap_err();
    assert!(err.contains("500") && err.contains("boom"), "{err}");

    let (url, _) = server(200, r#"{"choices":[]}"#, Duration::from_secs(5)).await;
    let started = std::time::Instant::now();
    let err = ChatClient::new(config(&url, 300))
        .unwrap()
        .reply(&knowledge(), "es", &[], "hola")
        .await
        .unwrap_err();
    assert!(err.contains("no answer in time"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let (url, _) = server(200, r#"{"choices":[]}"#, Duration::ZERO).await;
    let err = ChatClient::new(config(&url, 2_000))
        .unwrap()
        .reply(&knowledge(), "es", &[], "hola")
        .await
        .unwrap_err();
    assert!(err.contains("no text"), "{err}");

    // Nothing listens on this port.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = ChatClient::new(config(&url, 2_000))
        .unwrap()
        .reply(&knowledge(), "es", &[], "hola")
        .await
        .unwrap_err();
    assert!(err.contains("cannot connect"), "{err}");
}

/// The local engine answers typed text through the chat endpoint, and from
/// the knowledge base (with a transient error event) when the endpoint is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_engine_answers_through_the_endpoint_and_falls_back() {
    use sonora::config::LocalConfig;
    use sonora::engine::local::{LocalEngine, LocalSettings};
    use sonora::engine::{ConversationOptions, Engine, EngineEvent, EngineInput, ErrorKind, Stage};

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if !root.join("models/whisper-base/model.bin").is_file() {
        eprintln!("\n\n*** SKIPPED: needs models/whisper-base (scripts/install-model) ***\n");
        return;
    }
    let (url, seen) = server(
        200,
        r#"{"choices":[{"message":{"content":"La biblioteca abre a las ocho."}}]}"#,
        Duration::ZERO,
    )
    .await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    for (endpoint, expect_chat) in [(url, true), (down, false)] {
        let mut local = LocalConfig {
            model_dir: root.join("models/whisper-base").display().to_string(),
            knowledge_dir: root.join("knowledge").display().to_string(),
            chat_url: endpoint,
            chat_model: "m".into(),
            ..LocalConfig::default()
        };
        local.chat_timeout_ms = 2_000;
        let engine = LocalEngine::load(&LocalSettings::from_config(&local)).unwrap();
        let options = ConversationOptions {
            language: "es".into(),
            voice: String::new(),
            history: Vec::new(),
        };
        let mut session = engine.start(options).unwrap();
        session
            .input
            .send(EngineInput::Text(
                "¿Cuál es el horario de la biblioteca?".into(),
            ))
            .await
            .unwrap();
        session.input.send(EngineInput::Close).await.unwrap();
        let mut events = Vec::new();
        while let Some(event) = session.events.recv().await {
            if event == EngineEvent::Closed {
                break;
            }
            events.push(event);
        }
        let spoken: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Transcript {
                    role: Role::Assistant,
                    stage: Stage::Final,
                    text,
                    ..
                } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        let errors = events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    EngineEvent::Error {
                        kind: ErrorKind::Transient,
                        ..
                    }
                )
            })
            .count();
        assert!(events.iter().any(|e| matches!(e, EngineEvent::Audio(_))));
        if expect_chat {
            assert_eq!(spoken, vec!["La biblioteca abre a las ocho."]);
            assert_eq!(errors, 0);
        } else {
            assert_eq!(spoken.len(), 1);
            assert!(
                spoken[0].contains("biblioteca") && spoken[0] != "La biblioteca abre a las ocho.",
                "{spoken:?}"
            );
            assert_eq!(errors, 1, "{events:?}");
        }
    }
    assert_eq!(seen.lock().unwrap().len(), 1);
}
