//! The Nova Sonic engine through the real AWS SDK against the
//! Bedrock-compatible test endpoint (HTTP/2, TLS, event-stream framing):
//! a Spanish turn with exact cost, barge-in, tools, throttling, a model
//! timeout, a reset, a malformed event, a stall, refused credentials, a
//! rotation past a shortened connection limit, and the pacing of stream
//! opens: a failing next stream, and the breaker throttling trips.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

#[path = "common/bedrock.rs"]
mod bedrock;
mod common;
#[path = "common/talk.rs"]
mod talk;

use std::time::{Duration, Instant};

use bedrock::{Endpoint, Fail, Script, ToolStep, Turn};
use serde_json::json;
use sonora::config::NovaSonicConfig;
use sonora::config::ToolsConfig;
use sonora::engine::nova_sonic::{NovaSonicEngine, NovaSonicSettings, StaticCredentials};
use sonora::engine::{
    ConversationOptions, Engine, EngineEvent, EngineInput, ErrorKind, Role, Stage, StartError,
    TurnEndReason,
};
use sonora::tools::Tools;
use talk::{GUARD, Talk, is_turn_end, turn_ends};

async fn engine(
    endpoint: &Endpoint,
    tools: Option<Tools>,
    tweak: impl FnOnce(&mut NovaSonicSettings),
) -> NovaSonicEngine {
    let config = NovaSonicConfig {
        endpoint_url: endpoint.url.clone(),
        ca_file: endpoint.ca_file.display().to_string(),
        // Named, so no lookup along the AWS chain (the instance metadata
        // service) slows the test down.
        region: "us-east-1".into(),
        ..NovaSonicConfig::default()
    };
    let mut settings = NovaSonicSettings::from_config(&config);
    settings.client.credentials = Some(StaticCredentials {
        access_key_id: "AKIDSONORATEST".into(),
        secret_access_key: "not-a-real-secret".into(),
        session_token: None,
    });
    settings.stall_timeout = Duration::from_millis(1_500);
    // Throttling trips the breaker: a short cool-down keeps the retry tests
    // on their 0, 1 and 3 s spacing.
    settings.breaker_cooldown = Duration::from_millis(250);
    tweak(&mut settings);
    NovaSonicEngine::connect(settings, tools).await.unwrap()
}

fn names(connection: &bedrock::Connection) -> Vec<String> {
    connection
        .events
        .iter()
        .filter_map(|e| e["event"].as_object()?.keys().next().cloned())
        .collect()
}

const QUESTION: &str = "¿Cuál es el horario de la biblioteca?";
const ANSWER: &str = "La biblioteca abre de lunes a viernes de ocho a veintidós horas.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spanish_turn_brings_transcripts_audio_and_an_exact_cost() {
    let endpoint = Endpoint::start(vec![Script::answering(vec![Turn::new(
        QUESTION, ANSWER, 1_200,
    )])])
    .await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start(&engine);
    talk.tone(800).await;
    // Nothing more from the "microphone": the engine must stream silence
    // for the endpoint to hear the end of the turn.
    talk.idle_until("the turn's end", is_turn_end).await;
    talk.close().await;

    let events: Vec<&EngineEvent> = talk.events().collect();
    assert!(
        matches!(events[0], EngineEvent::Ready { voice, model, .. } if voice == "lupe" && model == "amazon.nova-2-sonic-v1:0")
    );
    assert_eq!(talk.transcripts(Role::User, Stage::Final), [QUESTION]);
    assert_eq!(
        talk.transcripts(Role::Assistant, Stage::Speculative),
        [ANSWER]
    );
    assert_eq!(talk.transcripts(Role::Assistant, Stage::Final), [ANSWER]);
    assert_eq!(talk.turn_ends(), [TurnEndReason::Completed]);
    let audio: usize = talk
        .events()
        .map(|e| match e {
            EngineEvent::Audio(p) => {
                assert_eq!(p.rate_hz, 24_000);
                p.samples.len()
            }
            _ => 0,
        })
        .sum();
    assert_eq!(audio, 12 * 2_400, "1.2 s of reply audio at 24 kHz");
    assert!(
        talk.errors(ErrorKind::Transient).is_empty(),
        "{:?}",
        talk.kinds()
    );

    // Usage: every delta the endpoint sent, counted once, priced exactly.
    let sent = endpoint.sent();
    let mut counted = sonora::usage::UsageDelta::default();
    for e in talk.events() {
        if let EngineEvent::Usage(d) = e {
            counted.add(d);
        }
    }
    assert_eq!(
        (
            counted.speech_in_tokens,
            counted.speech_out_tokens,
            counted.text_in_tokens,
            counted.text_out_tokens
        ),
        (sent.speech_in, sent.speech_out, sent.text_in, sent.text_out)
    );
    assert!(sent.speech_in > 0 && sent.speech_out > 0 && sent.text_in > 0 && sent.text_out > 0);
    let rates = *sonora::engine::nova_sonic::builtin_prices()
        .rates("amazon.nova-2-sonic-v1:0")
        .unwrap();
    assert_eq!(counted.cost_micro_usd, sent.cost_micro_usd(&rates));

    // On the wire: signed envelopes, setup before audio, 32 ms frames,
    // silence while mute, and the closing triple last.
    let connections = endpoint.connections();
    assert_eq!(connections.len(), 1);
    let c = &connections[0];
    assert!(c.signed, "every event in a signed envelope");
    let names = names(c);
    assert_eq!(&names[..2], ["sessionStart", "promptStart"]);
    assert_eq!(
        c.events[1]["event"]["promptStart"]["audioOutputConfiguration"]["voiceId"],
        "lupe"
    );
    assert_eq!(c.texts[0].0, "SYSTEM");
    assert!(c.texts[0].2.contains("universidad"));
    let first_audio = names.iter().position(|n| n == "audioInput").unwrap();
    assert!(names[..first_audio].contains(&"contentStart".to_owned()));
    assert!(
        c.events
            .iter()
            .filter(|e| e["event"]["audioInput"].is_object())
            .all(|e| e["event"]["audioInput"]["samples"] == 512)
    );
    assert!(
        c.audio.len() > 16 * 800 + 16 * 1_000,
        "silence streamed after the speech: {} samples",
        c.audio.len()
    );
    assert_eq!(
        &names[names.len() - 3..],
        ["contentEnd", "promptEnd", "sessionEnd"]
    );
    assert!(c.ended_by_client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaking_over_the_reply_interrupts_it_once() {
    let endpoint = Endpoint::start(vec![Script {
        turns: vec![
            Turn::new(QUESTION, ANSWER, 6_000),
            Turn::new("Gracias, eso es todo.", "De nada. ¡Hasta luego!", 600),
        ],
        ..Script::default()
    }])
    .await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start(&engine);
    talk.tone(800).await;
    talk.until("reply audio", |e| matches!(e, EngineEvent::Audio(_)))
        .await;
    talk.tone(600).await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;

    let interruptions: Vec<u64> = talk
        .events()
        .filter_map(|e| match e {
            EngineEvent::Interrupted { turn_id } => Some(*turn_id),
            _ => None,
        })
        .collect();
    assert_eq!(
        interruptions,
        [1],
        "one barge-in, on the first turn: {:?}",
        talk.kinds()
    );
    assert_eq!(
        talk.turn_ends(),
        [TurnEndReason::Interrupted, TurnEndReason::Completed]
    );
    assert_eq!(endpoint.connections()[0].barge_ins, 1);
    // The marker is never shown as text.
    assert!(
        talk.transcripts(Role::Assistant, Stage::Final)
            .iter()
            .all(|t| !t.contains("interrupted"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_run_off_the_loop_and_their_results_go_back() {
    let endpoint = Endpoint::start(vec![Script {
        turns: vec![
            Turn {
                tool: Some(ToolStep {
                    name: "current_datetime".into(),
                    input: json!({}),
                    pointer: "/date".into(),
                }),
                ..Turn::new("¿Qué día es hoy?", "Hoy es {tool}.", 800)
            },
            Turn {
                tool: Some(ToolStep {
                    name: "transfer_to_agent".into(),
                    input: json!({"reason": "beca"}),
                    pointer: "/ticket".into(),
                }),
                ..Turn::new(
                    "Quiero hablar con una persona.",
                    "Su número de caso es {tool}.",
                    800,
                )
            },
        ],
        ..Script::default()
    }])
    .await;
    let tools = Tools::new(&ToolsConfig::default(), None).unwrap();
    let engine = engine(&endpoint, Some(tools), |_| {}).await;
    let mut talk = Talk::start(&engine);
    talk.tone(800).await;
    talk.until("the first turn's end", is_turn_end).await;
    // A tool the engine does not have goes to the client, whose answer goes back.
    talk.tone(800).await;
    talk.until("a client tool call", |e| {
        matches!(e, EngineEvent::ToolCall { .. })
    })
    .await;
    let (id, name) = talk
        .events()
        .find_map(|e| match e {
            EngineEvent::ToolCall { id, name, .. } => Some((id.clone(), name.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(name, "transfer_to_agent");
    talk.input
        .send(EngineInput::ToolResult {
            id,
            json: json!({"ticket": "A-1234"}),
        })
        .await
        .unwrap();
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;

    let c = &endpoint.connections()[0];
    // The tools were offered in promptStart.
    let offered = c.events[1]["event"]["promptStart"]["toolConfiguration"]["tools"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        offered
            .iter()
            .any(|t| t["toolSpec"]["name"] == "current_datetime")
    );
    assert_eq!(c.tool_results.len(), 2, "{:?}", c.tool_results);
    let date = c.tool_results[0].1["date"].as_str().unwrap().to_owned();
    assert_eq!(c.tool_results[0].1["time_zone"], "America/Lima");
    let finals = talk.transcripts(Role::Assistant, Stage::Final);
    assert_eq!(
        finals,
        [
            format!("Hoy es {date}."),
            "Su número de caso es A-1234.".to_owned()
        ]
    );
    // Only the client's tool was shown to the client.
    let calls = talk
        .events()
        .filter(|e| matches!(e, EngineEvent::ToolCall { .. }))
        .count();
    assert_eq!(calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_reconnects_and_the_conversation_goes_on() {
    let endpoint = Endpoint::start(vec![
        Script::failing(Fail::Throttle, vec![]),
        Script::answering(vec![Turn::new(QUESTION, ANSWER, 600)]),
    ])
    .await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start(&engine);
    talk.quiet(300).await;
    talk.tone(800).await;
    talk.until("the turn's end", is_turn_end).await;
    talk.close().await;
    let transient = talk.errors(ErrorKind::Transient);
    assert_eq!(transient.len(), 1, "{transient:?}");
    assert!(
        transient[0].contains("throttlingException"),
        "{}",
        transient[0]
    );
    assert!(talk.errors(ErrorKind::Fatal).is_empty());
    assert_eq!(talk.transcripts(Role::Assistant, Stage::Final), [ANSWER]);
    assert_eq!(endpoint.connections().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_timeout_resumes_with_the_history() {
    let endpoint = Endpoint::start(vec![
        Script {
            turns: vec![Turn::new(QUESTION, ANSWER, 600)],
            max_age: Some(Duration::from_millis(3_000)),
            ..Script::default()
        },
        Script::answering(vec![Turn::new(
            "¿Y los sábados?",
            "Los sábados abre de nueve a trece.",
            600,
        )]),
    ])
    .await;
    // Rotation off: the connection limit is hit, not avoided.
    let engine = engine(&endpoint, None, |s| {
        s.rotate_after = Duration::from_secs(400)
    })
    .await;
    let mut talk = Talk::start(&engine);
    talk.tone(800).await;
    talk.until("the first turn's end", is_turn_end).await;
    talk.until("the timeout", |e| {
        matches!(
            e,
            EngineEvent::Error {
                kind: ErrorKind::Transient,
                ..
            }
        )
    })
    .await;
    talk.quiet(500).await;
    talk.tone(800).await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;

    assert!(talk.errors(ErrorKind::Transient)[0].contains("modelTimeoutException"));
    assert_eq!(
        talk.transcripts(Role::Assistant, Stage::Final),
        [ANSWER, "Los sábados abre de nueve a trece."]
    );
    let connections = endpoint.connections();
    assert_eq!(connections.len(), 2);
    let history: Vec<(&str, &str)> = connections[1]
        .texts
        .iter()
        .map(|(r, _, t)| (r.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        history[1..],
        [("USER", QUESTION), ("ASSISTANT", ANSWER)],
        "{history:?}"
    );
    assert_eq!(history[0].0, "SYSTEM");
    assert!(
        connections[1]
            .texts
            .iter()
            .all(|(_, interactive, _)| !interactive)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_is_replaced_and_the_turn_reported() {
    let endpoint = Endpoint::start(vec![
        Script::failing(Fail::ResetInReply, vec![Turn::new(QUESTION, ANSWER, 2_000)]),
        Script::answering(vec![Turn::new("¿Me lo repites?", ANSWER, 600)]),
    ])
    .await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start(&engine);
    talk.tone(800).await;
    talk.until("the cut turn's end", is_turn_end).await;
    talk.quiet(300).await;
    talk.tone(800).await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;
    assert_eq!(
        talk.turn_ends(),
        [TurnEndReason::Error, TurnEndReason::Completed]
    );
    assert_eq!(
        talk.errors(ErrorKind::Transient).len(),
        1,
        "{:?}",
        talk.kinds()
    );
    assert_eq!(endpoint.connections().len(), 2);
    assert_eq!(
        endpoint.connections()[1].texts[1],
        ("USER".into(), false, QUESTION.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_skipped_and_nothing_else_is_lost() {
    let endpoint = Endpoint::start(vec![Script::failing(
        Fail::MalformedInReply,
        vec![Turn::new(QUESTION, ANSWER, 800)],
    )])
    .await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start(&engine);
    talk.tone(800).await;
    talk.until("the turn's end", is_turn_end).await;
    talk.close().await;
    let transient = talk.errors(ErrorKind::Transient);
    assert_eq!(transient.len(), 1);
    assert!(transient[0].contains("malformed"), "{}", transient[0]);
    assert_eq!(talk.transcripts(Role::Assistant, Stage::Final), [ANSWER]);
    assert_eq!(talk.turn_ends(), [TurnEndReason::Completed]);
    assert_eq!(endpoint.connections().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_replaced_and_the_question_asked_again() {
    let endpoint = Endpoint::start(vec![
        Script::failing(
            Fail::StallAfterTranscript,
            vec![Turn::new(QUESTION, ANSWER, 600)],
        ),
        Script::answering(vec![Turn::new(QUESTION, ANSWER, 600)]),
    ])
    .await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start(&engine);
    talk.tone(800).await;
    talk.until("the answer", |e| {
        matches!(
            e,
            EngineEvent::Transcript {
                role: Role::Assistant,
                stage: Stage::Final,
                ..
            }
        )
    })
    .await;
    talk.close().await;
    let transient = talk.errors(ErrorKind::Transient);
    assert!(transient[0].contains("Stalled"), "{transient:?}");
    let connections = endpoint.connections();
    assert_eq!(connections.len(), 2);
    // Asked again as typed text (the audio was already heard).
    let asked = connections[1].texts.last().unwrap();
    assert_eq!(asked, &("USER".to_owned(), true, QUESTION.to_owned()));
    assert_eq!(talk.transcripts(Role::Assistant, Stage::Final), [ANSWER]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_fatal_and_never_retried() {
    let endpoint = Endpoint::start(vec![Script::failing(Fail::Auth, vec![])]).await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start(&engine);
    let fatal = talk.fatal_end().await;
    assert!(fatal.contains("UnrecognizedClientException"), "{fatal}");
    assert!(talk.errors(ErrorKind::Transient).is_empty());
    assert_eq!(endpoint.connections().len(), 1);
}

/// Quiet frames numbered by their value (1…), so the endpoint's audio shows
/// which frames arrived.
fn marker_frame(k: u64) -> Vec<i16> {
    vec![(k + 1) as i16; 320]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_hands_off_before_the_limit_with_history_and_no_lost_audio() {
    const SECOND: &str = "¿Y los sábados?";
    const SECOND_ANSWER: &str = "Los sábados abre de nueve a trece.";
    let endpoint = Endpoint::start(vec![
        Script {
            turns: vec![Turn::new(QUESTION, ANSWER, 1_000)],
            // The shortened connection limit.
            max_age: Some(Duration::from_secs(10)),
            ..Script::default()
        },
        Script {
            turns: vec![Turn::new(SECOND, SECOND_ANSWER, 600)],
            max_age: Some(Duration::from_secs(10)),
            ..Script::default()
        },
    ])
    .await;
    let engine = engine(&endpoint, None, |s| {
        s.rotate_after = Duration::from_secs(1);
        s.handoff_wait = Duration::from_secs(1);
    })
    .await;
    let mut talk = Talk::start(&engine);
    talk.tone(800).await;
    // Numbered quiet frames through the hand-off.
    let markers = 200;
    talk.speak(markers * 20, marker_frame).await;
    talk.until("the rotation", |e| matches!(e, EngineEvent::Rotated { .. }))
        .await;
    talk.tone(800).await;
    talk.until("the second turn's end", turn_ends(2)).await;
    talk.close().await;

    let rotations: Vec<(u32, f64)> = talk
        .events()
        .filter_map(|e| match e {
            EngineEvent::Rotated { generation, gap_ms } => Some((*generation, *gap_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(rotations[0].0, 2);
    let gap_ms = rotations.iter().map(|r| r.1).fold(0.0, f64::max);
    assert_eq!(
        talk.transcripts(Role::Assistant, Stage::Final),
        [ANSWER, SECOND_ANSWER]
    );
    assert!(
        talk.errors(ErrorKind::Transient).is_empty(),
        "{:?}",
        talk.kinds()
    );
    let connections = endpoint.connections();
    assert_eq!(connections.len(), rotations.len() + 1);
    let history: Vec<(&str, &str)> = connections[1]
        .texts
        .iter()
        .map(|(r, _, t)| (r.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        history,
        [
            ("SYSTEM", history[0].1),
            ("USER", QUESTION),
            ("ASSISTANT", ANSWER)
        ]
    );
    for c in &connections[..connections.len() - 1] {
        assert!(c.ended_by_client, "each old stream was closed properly");
    }
    // Every numbered frame reached one stream or the other.
    let mut count = vec![0usize; markers as usize + 2];
    for c in &connections {
        for &s in &c.audio {
            if (1..=markers as i16).contains(&s) {
                count[s as usize] += 1;
            }
        }
    }
    let lost: Vec<usize> = (1..=markers as usize).filter(|&v| count[v] < 320).collect();
    let old_end = connections[0].last_audio_at.unwrap();
    let new_start = connections[1].first_audio_at.unwrap();
    let wire_gap_ms = new_start.saturating_duration_since(old_end).as_millis();
    println!(
        "rotation: {} hand-offs, largest gap {gap_ms:.2} ms (hand-off time, engine); first hand-off: {wire_gap_ms} ms between the old stream's last audio and the new one's first on the wire (endpoint; includes the 32 ms frame cadence); numbered frames lost: {}",
        rotations.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "frames lost in the hand-off: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_text_is_answered_and_english_gets_an_english_voice() {
    const TYPED: &str = "What time does the library close?";
    const REPLY: &str = "The library closes at ten p.m.";
    let endpoint = Endpoint::start(vec![Script::answering(vec![Turn::new("", REPLY, 600)])]).await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start_in(&engine, "en-US");
    talk.input
        .send(EngineInput::Text(TYPED.into()))
        .await
        .unwrap();
    talk.idle_until("the turn's end", is_turn_end).await;
    talk.close().await;
    assert!(
        matches!(talk.events().next(), Some(EngineEvent::Ready { voice, .. }) if voice == "tiffany")
    );
    assert_eq!(talk.transcripts(Role::User, Stage::Final), [TYPED]);
    assert_eq!(talk.transcripts(Role::Assistant, Stage::Final), [REPLY]);
    let c = &endpoint.connections()[0];
    assert_eq!(
        c.events[1]["event"]["promptStart"]["audioOutputConfiguration"]["voiceId"],
        "tiffany"
    );
    assert_eq!(
        c.texts.last().unwrap(),
        &("USER".to_owned(), true, TYPED.to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_throttling_gives_up_after_three_tries() {
    let endpoint = Endpoint::start(vec![Script::failing(Fail::Throttle, vec![])]).await;
    let engine = engine(&endpoint, None, |_| {}).await;
    let mut talk = Talk::start(&engine);
    talk.idle_until("Closed", |e| matches!(e, EngineEvent::Closed))
        .await;
    assert_eq!(
        talk.errors(ErrorKind::Transient).len(),
        3,
        "{:?}",
        talk.kinds()
    );
    let fatal = talk.fatal_end().await;
    assert!(
        fatal.contains("4 times") && fatal.contains("throttlingException"),
        "{fatal}"
    );
    // The first try and three more, after 0, 1 and 3 s.
    let connections = endpoint.connections();
    assert_eq!(connections.len(), 4);
    let opened: Vec<Instant> = connections.iter().map(|c| c.opened_at.unwrap()).collect();
    assert!(opened[3].duration_since(opened[1]) >= Duration::from_millis(3_900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_stream_throttled_every_time_is_retried_with_backoff_while_the_current_serves() {
    let endpoint = Endpoint::start(vec![
        Script::answering(vec![Turn::new(QUESTION, ANSWER, 600)]),
        // Every stream after the first: the rotation's next stream.
        Script::failing(Fail::Throttle, vec![]),
    ])
    .await;
    let cooldown = Duration::from_millis(1_500);
    let engine = engine(&endpoint, None, |s| {
        s.rotate_after = Duration::from_secs(1);
        s.handoff_wait = Duration::ZERO;
        s.breaker_cooldown = cooldown;
    })
    .await;
    let mut talk = Talk::start(&engine);
    // The rotation is armed after 1 s and wants a next stream on every tick.
    talk.quiet(6_000).await;
    talk.tone(800).await;
    talk.idle_until("the turn's end", is_turn_end).await;
    talk.close().await;

    // The current stream kept serving.
    assert_eq!(talk.transcripts(Role::Assistant, Stage::Final), [ANSWER]);
    assert_eq!(talk.turn_ends(), [TurnEndReason::Completed]);
    assert!(
        talk.errors(ErrorKind::Fatal).is_empty() && talk.errors(ErrorKind::Transient).is_empty(),
        "{:?}",
        talk.kinds()
    );
    assert!(
        !talk
            .events()
            .any(|e| matches!(e, EngineEvent::Rotated { .. }))
    );
    // A handful of tries, not one per 32 ms tick (about 250 in this time).
    let connections = endpoint.connections();
    let tries = connections.len() - 1;
    println!(
        "next stream tried {tries} times in {:.1} s",
        talk.started.elapsed().as_secs_f64()
    );
    assert!((1..=6).contains(&tries), "{tries} tries");
    assert_eq!(
        talk::stat(&engine, "stream_opens_total"),
        connections.len() as u64
    );
    assert!(talk::stat(&engine, "breaker_trips_total") >= 1);
    assert!(talk::stat(&engine, "stream_opens_postponed_total") >= 1);
    // Each try after the first waited out the cool-down of the trip before it.
    for pair in connections[1..].windows(2) {
        let gap = pair[1]
            .opened_at
            .unwrap()
            .duration_since(pair[0].opened_at.unwrap());
        assert!(gap >= cooldown, "{gap:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_trips_the_breaker_and_new_conversations_wait_out_the_cooldown() {
    let endpoint = Endpoint::start(vec![
        Script::failing(Fail::Throttle, vec![]),
        Script::answering(vec![Turn::new(QUESTION, ANSWER, 600)]),
    ])
    .await;
    let cooldown = Duration::from_millis(3_000);
    let engine = engine(&endpoint, None, |s| s.breaker_cooldown = cooldown).await;
    assert_eq!(engine.busy(), None);
    let mut first = Talk::start(&engine);
    first
        .idle_until("the throttling", |e| {
            matches!(
                e,
                EngineEvent::Error {
                    kind: ErrorKind::Transient,
                    ..
                }
            )
        })
        .await;
    // Refused while the breaker cools down, with the time left.
    let left = engine.busy().expect("busy after throttling");
    assert!(left <= cooldown, "{left:?}");
    let refused = engine.start(ConversationOptions {
        language: "es".into(),
        voice: String::new(),
        history: Vec::new(),
    });
    let error = refused.expect_err("refused while busy");
    let StartError::Busy {
        retry_after,
        message,
    } = &error
    else {
        panic!("refused as busy, not {error:?}");
    };
    assert!(*retry_after <= cooldown, "{retry_after:?}");
    assert!(message.contains("throttling"), "{message}");
    assert_eq!(talk::stat(&engine, "breaker_trips_total"), 1);
    assert_eq!(talk::stat(&engine, "breaker_open"), 1);
    assert_eq!(talk::stat(&engine, "conversations_refused_total"), 1);

    // After the cool-down a new conversation is taken and answered.
    let deadline = Instant::now() + GUARD;
    while engine.busy().is_some() {
        assert!(Instant::now() < deadline, "still busy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(talk::stat(&engine, "breaker_open"), 0);
    let mut second = Talk::start(&engine);
    second.tone(800).await;
    second.idle_until("the turn's end", is_turn_end).await;
    assert_eq!(second.transcripts(Role::Assistant, Stage::Final), [ANSWER]);
    // The first conversation came back after the cool-down too.
    let deadline = Instant::now() + GUARD;
    while endpoint.connections().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the first conversation never reopened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.close().await;
    first.close().await;
    assert!(
        first.errors(ErrorKind::Fatal).is_empty(),
        "{:?}",
        first.kinds()
    );

    let connections = endpoint.connections();
    assert_eq!(connections.len(), 3);
    let tripped = connections[0].opened_at.unwrap();
    for c in &connections[1..] {
        let after = c.opened_at.unwrap().duration_since(tripped);
        assert!(
            after >= cooldown,
            "a stream opened {after:?} after the trip"
        );
    }
    assert_eq!(talk::stat(&engine, "breaker_trips_total"), 1);
    assert_eq!(talk::stat(&engine, "stream_opens_total"), 3);
}
