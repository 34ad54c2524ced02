//! The OpenAI Realtime engine against the in-suite service (WebSocket over
//! TLS, the GA event shapes): a Spanish turn with an exact cost, barge-in
//! cut where the user stopped hearing, tools from the registry and from the
//! client, the warm hand-off before the session limit with the
//! conversation replayed and usage summed, and the service's failures:
//! a refused key, throttling at the handshake and in a response, an error
//! event, malformed messages, a dropped connection and the session limit.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

mod common;
#[path = "common/openai.rs"]
mod openai;
#[path = "common/talk.rs"]
mod talk;

use std::time::Duration;

use openai::{Plan, Service, Turn};
use serde_json::{Value, json};
use sonora::config::ToolsConfig;
use sonora::engine::openai_realtime::{OpenAiRealtimeEngine, OpenAiRealtimeSettings};
use sonora::engine::{
    ConversationOptions, Engine, EngineEvent, EngineInput, ErrorKind, Role, Stage, StartError,
    TurnEndReason,
};
use sonora::tools::Tools;
use talk::{Talk, is_turn_end, turn_ends};

const QUESTION: &str = "¿Cuál es el horario de la biblioteca?";
const ANSWER: &str = "La biblioteca abre de lunes a viernes de ocho a veintidós horas.";

fn engine(
    service: &Service,
    tools: Option<Tools>,
    tweak: impl FnOnce(&mut OpenAiRealtimeSettings),
) -> OpenAiRealtimeEngine {
    let mut settings = openai::settings(service);
    tweak(&mut settings);
    OpenAiRealtimeEngine::new(settings, tools).unwrap()
}

fn plan(turns: Vec<Turn>) -> Plan {
    Plan {
        refuse: None,
        turns,
    }
}

fn answer(heard: &'static str, text: &'static str, reply_ms: u64) -> Turn {
    Turn::Answer {
        heard,
        text,
        reply_ms,
    }
}

/// A user turn: speech, then enough quiet for the service to hear its end.
async fn say(talk: &mut Talk, ms: u64) {
    talk.tone(ms).await;
    talk.quiet(600).await;
}

/// Exact cost in micro-dollars of what the service reported, at the
/// published `gpt-realtime` and `gpt-4o-mini-transcribe` prices (nano-dollars
/// per token), rounded once.
fn expected_cost(connections: &[openai::Connection]) -> u64 {
    let mut nano: u64 = 0;
    for connection in connections {
        for usage in &connection.usage {
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            let input = &usage["input_token_details"];
            let cached_text = n(&input["cached_tokens_details"]["text_tokens"]);
            let cached_audio = n(&input["cached_tokens_details"]["audio_tokens"]);
            nano += (n(&input["text_tokens"]) - cached_text) * 4_000
                + cached_text * 400
                + (n(&input["audio_tokens"]) - cached_audio) * 32_000
                + cached_audio * 400
                + n(&usage["output_token_details"]["text_tokens"]) * 16_000
                + n(&usage["output_token_details"]["audio_tokens"]) * 64_000;
        }
        for usage in &connection.transcription_usage {
            nano += usage["input_tokens"].as_u64().unwrap() * 1_250
                + usage["output_tokens"].as_u64().unwrap() * 5_000;
        }
    }
    (nano + 500) / 1_000
}

fn history_items(connection: &openai::Connection) -> Vec<(String, String)> {
    connection
        .of_type("conversation.item.create")
        .into_iter()
        .filter(|e| e["item"]["type"] == "message")
        .map(|e| {
            (
                e["item"]["role"].as_str().unwrap().to_owned(),
                e["item"]["content"][0]["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spanish_turn_brings_transcripts_audio_and_an_exact_cost() {
    let service = Service::start(vec![plan(vec![answer(QUESTION, ANSWER, 1_200)])]).await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    say(&mut talk, 800).await;
    talk.until("the turn's end", is_turn_end).await;
    talk.close().await;

    let events: Vec<&EngineEvent> = talk.events().collect();
    assert!(
        matches!(events[0], EngineEvent::Ready { engine, voice, model } if engine == "openai-realtime" && voice == "marin" && model == "gpt-realtime"),
        "{:?}",
        events[0]
    );
    let started = events
        .iter()
        .position(|e| matches!(e, EngineEvent::SpeechStarted { turn_id: 1 }));
    let ended = events
        .iter()
        .position(|e| matches!(e, EngineEvent::SpeechEnded { turn_id: 1 }));
    assert!(started.is_some() && started < ended, "{:?}", talk.kinds());
    talk.assert_answered(QUESTION, ANSWER, 1_200 * 24);
    assert!(matches!(events.last(), Some(EngineEvent::Closed)));

    let connections = service.connections();
    assert_eq!(connections.len(), 1);
    let c = &connections[0];
    assert_eq!(c.authorization, format!("Bearer {}", openai::KEY));
    assert_eq!(c.model, "gpt-realtime");
    let session = c.session.as_ref().unwrap();
    assert_eq!(session["audio"]["output"]["voice"], "marin");
    assert_eq!(
        session["audio"]["input"]["turn_detection"]["type"],
        "server_vad"
    );
    assert_eq!(
        session["audio"]["input"]["transcription"],
        json!({"model": "gpt-4o-mini-transcribe", "language": "es"})
    );
    assert!(
        session["instructions"]
            .as_str()
            .unwrap()
            .contains("universidad")
    );
    // 800 ms of speech, 600 ms of quiet and the quiet sent while waiting,
    // resampled to 24 kHz (sent as 16 kHz it would count two thirds).
    assert!(
        (1_300..=3_000).contains(&c.appended_ms),
        "{} ms appended",
        c.appended_ms
    );
    assert_eq!(c.usage.len(), 1);
    assert_eq!(talk.cost_micro_usd(), expected_cost(&connections));
    assert!(talk.cost_micro_usd() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaking_over_the_reply_cuts_it_where_the_user_stopped_hearing() {
    let service = Service::start(vec![plan(vec![
        answer(QUESTION, ANSWER, 6_000),
        answer("Gracias.", "De nada.", 300),
    ])])
    .await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    say(&mut talk, 600).await;
    talk.until("reply audio", |e| matches!(e, EngineEvent::Audio(_)))
        .await;
    let first_audio = talk
        .seen
        .iter()
        .find(|(_, e)| matches!(e, EngineEvent::Audio(_)))
        .map(|(t, _)| *t)
        .unwrap();
    talk.quiet(1_000).await;
    let spoke_at = std::time::Instant::now();
    say(&mut talk, 600).await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;

    assert_eq!(talk.interrupted_turns(), [1]);
    let connections = service.connections();
    let truncates = connections[0].of_type("conversation.item.truncate");
    assert_eq!(truncates.len(), 1, "{:?}", connections[0].events);
    let cut = truncates[0];
    assert!(cut["item_id"].as_str().unwrap().starts_with("item_a"));
    assert_eq!(cut["content_index"], 0);
    let heard = cut["audio_end_ms"].as_u64().unwrap();
    let elapsed = u64::try_from((spoke_at - first_audio).as_millis()).unwrap();
    // Cut where the user was: after the quiet second, before the reply's end.
    assert!(
        heard >= 900 && heard <= elapsed + 500 && heard < 6_000,
        "cut at {heard} ms, the user spoke {elapsed} ms after the reply began"
    );
    assert_eq!(
        talk.turn_ends().last(),
        Some(&TurnEndReason::Completed),
        "{:?}",
        talk.kinds()
    );
    assert_eq!(
        talk.transcripts(Role::Assistant, Stage::Final)
            .last()
            .unwrap(),
        "De nada."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_tools_run_here_and_other_tools_go_to_the_client() {
    let service = Service::start(vec![plan(vec![
        Turn::Tool {
            heard: "¿Qué día es hoy?",
            name: "current_datetime",
            arguments: "{}",
            text: "Hoy es lunes.",
            reply_ms: 400,
        },
        Turn::Tool {
            heard: "¿Está listo mi trámite?",
            name: "lookup_ticket",
            arguments: r#"{"id":"42"}"#,
            text: "Su trámite está listo.",
            reply_ms: 300,
        },
    ])])
    .await;
    let tools = Tools::new(&ToolsConfig::default(), None).unwrap();
    let engine = engine(&service, Some(tools), |_| {});
    let mut talk = Talk::start(&engine);
    say(&mut talk, 600).await;
    talk.until("the first turn's end", is_turn_end).await;
    say(&mut talk, 600).await;
    talk.until("the client's tool call", |e| {
        matches!(e, EngineEvent::ToolCall { .. })
    })
    .await;
    talk.answer_only_tool_call(
        "lookup_ticket",
        json!({"id": "42"}),
        json!({"status": "listo"}),
    )
    .await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;

    talk.assert_completed(&["Hoy es lunes.", "Su trámite está listo."]);
    let connections = service.connections();
    let c = &connections[0];
    let tools: Vec<&str> = c.session.as_ref().unwrap()["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(tools.contains(&"current_datetime"), "{tools:?}");
    let outputs: Vec<&Value> = c
        .of_type("conversation.item.create")
        .into_iter()
        .filter(|e| e["item"]["type"] == "function_call_output")
        .collect();
    assert_eq!(outputs.len(), 2);
    assert_eq!(outputs[0]["item"]["call_id"], "call_1");
    let clock: Value =
        serde_json::from_str(outputs[0]["item"]["output"].as_str().unwrap()).unwrap();
    assert!(clock.is_object() && clock.get("error").is_none(), "{clock}");
    assert_eq!(outputs[1]["item"]["call_id"], "call_2");
    assert!(
        outputs[1]["item"]["output"]
            .as_str()
            .unwrap()
            .contains("listo")
    );
    assert_eq!(c.of_type("response.create").len(), 2);
    assert_eq!(talk.cost_micro_usd(), expected_cost(&connections));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hand_off_replays_the_conversation_and_sums_usage() {
    let service = Service::start(vec![
        plan(vec![answer(
            "Hola, soy Ana.",
            "Hola Ana, ¿en qué te ayudo?",
            300,
        )]),
        plan(vec![answer(QUESTION, ANSWER, 300)]),
    ])
    .await;
    let engine = engine(&service, None, |s| s.rotate_after = Duration::from_secs(1));
    let mut talk = Talk::start(&engine);
    say(&mut talk, 600).await;
    talk.until("the first turn's end", is_turn_end).await;
    talk.until("the hand-off", |e| matches!(e, EngineEvent::Rotated { .. }))
        .await;
    say(&mut talk, 600).await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;

    assert!(
        talk.events()
            .any(|e| matches!(e, EngineEvent::Rotated { generation: 2, gap_ms } if *gap_ms == 0.0))
    );
    assert!(talk.errors(ErrorKind::Transient).is_empty());
    let connections = service.connections();
    assert!(connections.len() >= 2);
    assert_eq!(
        history_items(&connections[1]),
        [
            ("user".to_owned(), "Hola, soy Ana.".to_owned()),
            (
                "assistant".to_owned(),
                "Hola Ana, ¿en qué te ayudo?".to_owned()
            )
        ]
    );
    assert_eq!(
        connections[1].usage.len(),
        1,
        "the second turn went to the new session"
    );
    assert_eq!(talk.cost_micro_usd(), expected_cost(&connections));
    assert!(talk::stat(&engine, "hand_offs_total") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_ends_the_conversation_with_a_clear_error() {
    let service = Service::start(vec![plan(vec![])]).await;
    let engine = engine(&service, None, |s| s.api_key = "sk-wrong".into());
    let mut talk = Talk::start(&engine);
    let fatal = talk.fatal_end().await;
    assert!(
        fatal.contains("credentials") && fatal.contains("401"),
        "{fatal:?}"
    );
    assert_eq!(service.connections()[0].refused, Some(401));
    assert_eq!(engine.busy(), None, "a bad key is not throttling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_cools_the_engine_down_for_new_conversations() {
    // At the handshake: the conversation cannot start, new ones are refused.
    let service = Service::start(vec![Plan {
        refuse: Some(429),
        turns: vec![],
    }])
    .await;
    let engine = engine(&service, None, |s| s.max_retries = 1);
    let mut talk = Talk::start(&engine);
    talk.idle_until("the end", |e| matches!(e, EngineEvent::Closed))
        .await;
    assert_eq!(talk.errors(ErrorKind::Fatal).len(), 1);
    assert_eq!(service.connections().len(), 2, "one retry");
    talk::assert_cooling_down(&engine);

    // In a response: that turn fails, the conversation goes on.
    let service = Service::start(vec![plan(vec![
        Turn::Fail {
            heard: QUESTION,
            code: "rate_limit_exceeded",
        },
        answer("¿Y ahora?", "Ahora sí.", 300),
    ])])
    .await;
    let engine = self::engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    say(&mut talk, 600).await;
    talk.until("the failed turn's end", is_turn_end).await;
    assert!(engine.busy().is_some());
    say(&mut talk, 600).await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;
    assert_eq!(
        talk.turn_ends(),
        [TurnEndReason::Error, TurnEndReason::Completed]
    );
    let transient = talk.errors(ErrorKind::Transient);
    assert!(
        transient.iter().any(|m| m.contains("rate_limit_exceeded")),
        "{transient:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_is_reopened_with_the_conversation_and_the_turn_answered() {
    for lost in [
        Turn::Drop {
            heard: "¿Hay wifi?",
        },
        Turn::Expire {
            heard: "¿Hay wifi?",
        },
    ] {
        let service = Service::start(vec![
            plan(vec![lost.clone()]),
            // The new session is given the conversation, then asked to answer.
            plan(vec![answer("", "Te respondo ahora.", 300)]),
        ])
        .await;
        let engine = engine(&service, None, |_| {});
        let mut talk = Talk::start(&engine);
        say(&mut talk, 600).await;
        talk.until("the answer on the new session", is_turn_end)
            .await;
        talk.close().await;
        assert!(
            talk.events()
                .any(|e| matches!(e, EngineEvent::Rotated { generation: 2, .. })),
            "{lost:?}: {:?}",
            talk.kinds()
        );
        assert_eq!(talk.transcripts(Role::User, Stage::Final), ["¿Hay wifi?"]);
        assert_eq!(
            talk.transcripts(Role::Assistant, Stage::Final),
            ["Te respondo ahora."]
        );
        assert_eq!(talk.turn_ends(), [TurnEndReason::Completed]);
        assert_eq!(talk.errors(ErrorKind::Fatal), Vec::<String>::new());
        let connections = service.connections();
        assert_eq!(
            history_items(&connections[1]),
            [("user".to_owned(), "¿Hay wifi?".to_owned())],
            "{lost:?}"
        );
        assert_eq!(connections[1].of_type("response.create").len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_events_and_malformed_messages_leave_the_conversation_going() {
    let service = Service::start(vec![plan(vec![
        Turn::ErrorThenAnswer {
            code: "server_error",
            text: "Aquí estoy.",
            reply_ms: 300,
        },
        Turn::Garbage {
            text: "Sigo aquí.",
            reply_ms: 300,
        },
    ])])
    .await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    say(&mut talk, 600).await;
    talk.until("the first turn's end", is_turn_end).await;
    say(&mut talk, 600).await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;
    assert_eq!(
        talk.turn_ends(),
        [TurnEndReason::Completed, TurnEndReason::Completed]
    );
    assert!(
        talk.errors(ErrorKind::Transient)
            .iter()
            .any(|m| m.contains("server_error"))
    );
    assert!(talk.errors(ErrorKind::Fatal).is_empty());
    // Not JSON, a wrong field type, bad base64 and a 200 KB non-event.
    assert!(talk::stat(&engine, "malformed_events_total") >= 3);
    assert_eq!(service.connections().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_text_is_answered_and_unknown_voices_are_refused() {
    let service = Service::start(vec![plan(vec![answer("", "Claro que sí.", 300)])]).await;
    let engine = engine(&service, None, |_| {});
    let refused = engine.start(ConversationOptions {
        language: "es".into(),
        voice: "lupe".into(),
        history: Vec::new(),
    });
    assert!(
        matches!(refused, Err(StartError::Unsupported(_))),
        "{refused:?}"
    );
    let mut talk = Talk::start(&engine);
    talk.input
        .send(EngineInput::Text("¿Me ayudas?".into()))
        .await
        .unwrap();
    talk.idle_until("the turn's end", is_turn_end).await;
    talk.close().await;
    assert_eq!(
        talk.transcripts(Role::Assistant, Stage::Final),
        ["Claro que sí."]
    );
    assert_eq!(
        history_items(&service.connections()[0]),
        [("user".to_owned(), "¿Me ayudas?".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talk_as_a_process_answers_with_the_exact_cost() {
    let service = Service::start(vec![plan(vec![answer(QUESTION, ANSWER, 1_500)])]).await;
    let dir = common::scratch::Scratch::new("talk-openai");
    let (q, r) = (dir.join("q.wav"), dir.join("r.wav"));
    // 0.8 s of a loud tone: speech to the service's detector. The file ends
    // there; the engine sends silence for the service to hear the end.
    let tone: Vec<i16> = (0..40).flat_map(talk::tone_frame).collect();
    sonora::audio::wav::write_mono(&q, 16_000, &tone).unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sonora"))
        .current_dir(common::root())
        .args(["talk", "--engine", "openai-realtime", "--set"])
        .arg(format!("openai_realtime.endpoint_url={}", service.url))
        .arg("--ca-file")
        .arg(&service.ca_file)
        .arg("--input")
        .arg(&q)
        .arg("--output")
        .arg(&r)
        .env("OPENAI_API_KEY", openai::KEY)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("talk finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "talk failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("you: {QUESTION}")), "{stdout}");
    assert!(stdout.contains(&format!("sonora: {ANSWER}")), "{stdout}");
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["turns"], 1, "{summary}");
    assert_eq!(summary["close"], "client_stopped");
    assert_eq!(
        summary["cost_micro_usd"],
        expected_cost(&service.connections()),
        "{summary}"
    );
    let reply = sonora::audio::wav::read(&r).unwrap();
    assert_eq!(reply.rate_hz, 24_000);
    assert_eq!(reply.samples.len(), 36_000, "1.5 s of reply audio");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_a_conversation_and_refuses_new_ones_while_throttled() {
    use common::gateway::{self, metric};
    let service = Service::start(vec![
        plan(vec![answer(QUESTION, ANSWER, 1_000)]),
        Plan {
            refuse: Some(429),
            turns: vec![],
        },
    ])
    .await;
    let mut config = sonora::config::Config::default();
    config.engine.kind = sonora::config::EngineKind::OpenaiRealtime;
    config.openai_realtime.endpoint_url = service.url.clone();
    config.openai_realtime.ca_file = service.ca_file.display().to_string();
    config.openai_realtime.api_key = openai::KEY.into();
    let engine: std::sync::Arc<dyn Engine> =
        std::sync::Arc::new(engine(&service, None, |s| s.max_retries = 0));
    let mut running = gateway::start(&config, Some(engine)).await;

    let mut client = running.client().await;
    client.hello_pcm().await;
    let ready = client.until(|f| f.is("ready")).await;
    let ready = ready.last().unwrap().json().clone();
    assert_eq!(ready["engine"], "openai-realtime", "{ready}");
    assert_eq!(ready["voice"], "marin");
    let frames = gateway::spoken_turn(&mut client, talk::tone_frame).await;
    gateway::assert_heard_and_answered(&frames, QUESTION, ANSWER);
    client.send_json(json!({"type": "stop"})).await;
    let rest = client.until(|f| f.is("end")).await;
    let end = rest.last().unwrap().json().clone();
    let usage = &end["summary"]["usage"];
    assert_eq!(
        usage["cost_micro_usd"],
        expected_cost(&service.connections()),
        "{end}"
    );
    let text = running.metrics().await;
    assert!(
        metric(&text, "sonora_cost_micro_usd_total{modality=\"speech\"}") > 0.0,
        "{text}"
    );

    // The next conversation's session is refused with 429: it ends, and
    // the engine refuses new ones with 1013 while it cools down.
    let mut second = running.client().await;
    second.hello_pcm().await;
    second
        .until(|f| matches!(f, gateway::Frame::Closed(_)))
        .await;
    let mut late = running.client().await;
    match late.next().await {
        gateway::Frame::Closed(Some((code, reason))) => {
            assert_eq!(code, 1013);
            assert!(reason.starts_with("engine_busy"), "{reason}");
        }
        other => panic!("expected a 1013 close, got {other:?}"),
    }
    let text = running.metrics().await;
    assert_eq!(
        metric(&text, "sonora_engine_throttled_total"),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "sonora_engine_cooling_down"), 1.0, "{text}");
    running.stop();
}
