//! The Gemini Live engine against the in-suite service (WebSocket over TLS,
//! the Live API's message shapes): a Spanish turn with an exact cost, the
//! service's voice activity and binary frames, barge-in, tools from the
//! registry and from the client, the move to a resumed connection after
//! `goAway` with no audio lost and usage summed, and the service's
//! failures: a close that is passing (reconnect with the handle), an
//! invalid request, an intermittent refusal retried once, a used-up quota
//! and a refused key.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

mod common;
#[path = "common/gemini.rs"]
mod gemini;
#[path = "common/talk.rs"]
mod talk;

use std::time::Duration;

use gemini::{Plan, Service, Turn};
use serde_json::{Value, json};
use sonora::config::{GeminiLiveConfig, ToolsConfig};
use sonora::engine::gemini_live::{GeminiLiveEngine, GeminiLiveSettings};
use sonora::engine::{
    ConversationOptions, Engine, EngineEvent, EngineInput, ErrorKind, Role, Stage, StartError,
    TurnEndReason,
};
use sonora::tools::Tools;
use talk::{GUARD, Talk, is_turn_end, tone_frame, turn_ends};

const QUESTION: &str = "¿Cuál es el horario de la biblioteca?";
const ANSWER: &str = "La biblioteca abre de lunes a viernes de ocho a veintidós horas.";

fn engine(
    service: &Service,
    tools: Option<Tools>,
    tweak: impl FnOnce(&mut GeminiLiveConfig),
) -> GeminiLiveEngine {
    let mut config = GeminiLiveConfig {
        endpoint_url: service.url.clone(),
        ca_file: service.ca_file.display().to_string(),
        api_key: gemini::KEY.into(),
        connect_timeout_ms: 5_000,
        stall_timeout_ms: 5_000,
        ..GeminiLiveConfig::default()
    };
    tweak(&mut config);
    GeminiLiveEngine::new(GeminiLiveSettings::from_config(&config), tools).unwrap()
}

fn answer(heard: &'static str, text: &'static str, reply_ms: u64) -> Turn {
    Turn::Answer {
        heard,
        text,
        reply_ms,
    }
}

/// User audio sent at real-time pace, counted.
#[derive(Default)]
struct Mic {
    samples: u64,
}

impl Mic {
    async fn send(&mut self, talk: &mut Talk, ms: u64, loud: bool) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for k in 0..ms / 20 {
            tick.tick().await;
            let frame = if loud { tone_frame(k) } else { vec![-3; 320] };
            self.samples += frame.len() as u64;
            talk.input.send(EngineInput::Audio(frame)).await.unwrap();
            talk.collect();
        }
    }

    /// A user turn: speech, then enough quiet for the service to hear its end.
    async fn say(&mut self, talk: &mut Talk, ms: u64) {
        self.send(talk, ms, true).await;
        self.send(talk, 600, false).await;
    }

    /// Speech and quiet as in [`Mic::say`], until the engine stops taking
    /// audio (it ends the conversation at the service's close).
    async fn say_until_closed(&mut self, talk: &mut Talk, ms: u64) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for k in 0..(ms + 600) / 20 {
            tick.tick().await;
            let frame = if k < ms / 20 {
                tone_frame(k)
            } else {
                vec![-3; 320]
            };
            if talk.input.send(EngineInput::Audio(frame)).await.is_err() {
                return;
            }
        }
    }

    /// Waits until `pred` holds for some event seen, quiet audio flowing.
    async fn until(&mut self, talk: &mut Talk, what: &str, pred: impl Fn(&EngineEvent) -> bool) {
        let deadline = std::time::Instant::now() + GUARD;
        while !talk.events().any(&pred) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {what}; seen: {:?}",
                talk.kinds()
            );
            self.send(talk, 100, false).await;
        }
    }
}

/// Exact cost in micro-dollars of the usage the service sent, from its
/// per-modality lists at the `gemini-3.1-flash-live-preview` prices
/// (nano-dollars per token: text in 750, audio in 3,000, text out 4,500,
/// audio out 12,000), thoughts as text out, the tool-use prompt as text in,
/// rounded once. The prompt total's part in no list is not billed.
fn expected_cost(connections: &[gemini::Connection]) -> u64 {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let mut nano = 0;
    for usage in connections.iter().flat_map(|c| &c.usage) {
        for (list, text_rate, audio_rate) in [
            ("promptTokensDetails", 750, 3_000),
            ("responseTokensDetails", 4_500, 12_000),
        ] {
            for entry in usage[list].as_array().unwrap() {
                let rate = match entry["modality"].as_str().unwrap() {
                    "AUDIO" => audio_rate,
                    "TEXT" => text_rate,
                    other => panic!("unexpected modality {other}"),
                };
                nano += n(&entry["tokenCount"]) * rate;
            }
        }
        nano +=
            n(&usage["thoughtsTokenCount"]) * 4_500 + n(&usage["toolUsePromptTokenCount"]) * 750;
    }
    (nano + 500) / 1_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spanish_turn_brings_transcripts_audio_and_an_exact_cost() {
    let service = Service::start(vec![Plan::turns(vec![answer(QUESTION, ANSWER, 1_200)])]).await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    let mut mic = Mic::default();
    mic.say(&mut talk, 800).await;
    mic.until(&mut talk, "the turn's end", is_turn_end).await;
    talk.close().await;

    let events: Vec<&EngineEvent> = talk.events().collect();
    assert!(
        matches!(events[0], EngineEvent::Ready { engine, voice, model }
            if engine == "gemini-live" && voice == "Kore" && model == "gemini-3.1-flash-live-preview"),
        "{:?}",
        events[0]
    );
    talk.assert_answered(QUESTION, ANSWER, 1_200 * 24);
    // The service sent no voice activity: none is made up.
    assert_eq!(
        talk.position(|e| matches!(
            e,
            EngineEvent::SpeechStarted { .. } | EngineEvent::SpeechEnded { .. }
        )),
        None
    );
    assert!(matches!(events.last(), Some(EngineEvent::Closed)));

    let connections = service.connections();
    assert_eq!(connections.len(), 1);
    let c = &connections[0];
    assert_eq!(c.api_key, gemini::KEY);
    assert_eq!(c.authorization, "");
    let setup = c.setup.as_ref().unwrap();
    assert_eq!(setup["model"], "models/gemini-3.1-flash-live-preview");
    assert_eq!(
        setup["generationConfig"]["responseModalities"],
        json!(["AUDIO"])
    );
    assert_eq!(
        setup["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"],
        "Kore"
    );
    let instruction = setup["systemInstruction"]["parts"][0]["text"]
        .as_str()
        .unwrap();
    assert!(instruction.contains("universidad") && instruction.contains("(BCP 47): es."));
    assert_eq!(setup["inputAudioTranscription"], json!({}));
    assert_eq!(setup["outputAudioTranscription"], json!({}));
    assert_eq!(setup["sessionResumption"], json!({}));
    assert_eq!(
        setup["contextWindowCompression"],
        json!({"slidingWindow": {}})
    );
    assert_eq!(c.mime_types, ["audio/pcm;rate=16000"]);
    // 800 ms of speech, 600 ms of quiet and the quiet sent while waiting,
    // at 16 kHz as sent.
    assert!(
        (1_300..=3_500).contains(&c.appended_ms()),
        "{} ms appended",
        c.appended_ms()
    );
    assert_eq!(c.usage.len(), 1);
    assert_eq!(talk.cost_micro_usd(), expected_cost(&connections));
    assert!(talk.cost_micro_usd() > 0);
    let speech_in: u64 = talk
        .events()
        .filter_map(|e| match e {
            EngineEvent::Usage(d) => Some(d.speech_in_tokens),
            _ => None,
        })
        .sum();
    assert_eq!(
        speech_in,
        c.usage[0]["promptTokensDetails"][1]["tokenCount"]
            .as_u64()
            .unwrap()
    );
    assert_eq!(
        talk::stat(&engine, "usage_mismatches_total"),
        1,
        "the prompt total is above its list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voice_activity_marks_the_user_turn_and_binary_frames_are_read() {
    let service = Service::start(vec![Plan {
        binary: true,
        vad_signals: true,
        ..Plan::turns(vec![answer(QUESTION, ANSWER, 600)])
    }])
    .await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    let mut mic = Mic::default();
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the turn's end", is_turn_end).await;
    talk.close().await;

    let started = talk.position(|e| matches!(e, EngineEvent::SpeechStarted { turn_id: 1 }));
    let ended = talk.position(|e| matches!(e, EngineEvent::SpeechEnded { turn_id: 1 }));
    let audio = talk.position(|e| matches!(e, EngineEvent::Audio(_)));
    assert!(
        started.is_some() && started < ended && ended < audio,
        "{:?}",
        talk.kinds()
    );
    assert_eq!(talk.transcripts(Role::User, Stage::Final), [QUESTION]);
    assert_eq!(talk.transcripts(Role::Assistant, Stage::Final), [ANSWER]);
    assert_eq!(talk.turn_ends(), [TurnEndReason::Completed]);
    assert_eq!(talk.audio_samples(24_000), 600 * 24);
    assert_eq!(talk.cost_micro_usd(), expected_cost(&service.connections()));
    assert_eq!(talk::stat(&engine, "malformed_events_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaking_over_the_reply_interrupts_it() {
    let service = Service::start(vec![Plan::turns(vec![
        answer(QUESTION, ANSWER, 6_000),
        answer("Gracias.", "De nada.", 300),
    ])])
    .await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    let mut mic = Mic::default();
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "reply audio", |e| {
        matches!(e, EngineEvent::Audio(_))
    })
    .await;
    mic.send(&mut talk, 1_000, false).await;
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the second turn's end", turn_ends(2))
        .await;
    talk.close().await;

    assert_eq!(talk.interrupted_turns(), [1]);
    // The service's turnComplete for the interrupted turn ends nothing more.
    assert_eq!(
        talk.turn_ends(),
        [TurnEndReason::Interrupted, TurnEndReason::Completed],
        "{:?}",
        talk.kinds()
    );
    let interrupted = talk.position(|e| matches!(e, EngineEvent::Interrupted { .. }));
    let first_end = talk.position(is_turn_end);
    assert!(interrupted < first_end);
    assert_eq!(
        talk.transcripts(Role::User, Stage::Final),
        [QUESTION, "Gracias."]
    );
    assert_eq!(
        talk.transcripts(Role::Assistant, Stage::Final),
        [ANSWER, "De nada."]
    );
    let connections = service.connections();
    assert_eq!(connections.len(), 1);
    assert_eq!(
        connections[0].usage.len(),
        2,
        "the interrupted turn is billed too"
    );
    assert_eq!(talk.cost_micro_usd(), expected_cost(&connections));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_tools_run_here_and_other_tools_go_to_the_client() {
    let service = Service::start(vec![Plan::turns(vec![
        Turn::Tool {
            heard: "¿Qué día es hoy?",
            name: "current_datetime",
            args: "{}",
            text: "Hoy es lunes.",
            reply_ms: 400,
        },
        Turn::Tool {
            heard: "¿Está listo mi trámite?",
            name: "lookup_ticket",
            args: r#"{"id":"42"}"#,
            text: "Su trámite está listo.",
            reply_ms: 300,
        },
    ])])
    .await;
    let tools = Tools::new(&ToolsConfig::default(), None).unwrap();
    let engine = engine(&service, Some(tools), |_| {});
    let mut talk = Talk::start(&engine);
    let mut mic = Mic::default();
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the first turn's end", is_turn_end)
        .await;
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the client's tool call", |e| {
        matches!(e, EngineEvent::ToolCall { .. })
    })
    .await;
    talk.answer_only_tool_call(
        "lookup_ticket",
        json!({"id": "42"}),
        json!({"status": "listo"}),
    )
    .await;
    mic.until(&mut talk, "the second turn's end", turn_ends(2))
        .await;
    talk.close().await;

    talk.assert_completed(&["Hoy es lunes.", "Su trámite está listo."]);
    let connections = service.connections();
    let c = &connections[0];
    let declared: Vec<&str> = c.setup.as_ref().unwrap()["tools"][0]["functionDeclarations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(declared.contains(&"current_datetime"), "{declared:?}");
    let responses: Vec<&Value> = c
        .with_key("toolResponse")
        .into_iter()
        .map(|m| &m["toolResponse"]["functionResponses"][0])
        .collect();
    assert_eq!(responses.len(), 2);
    assert_eq!(responses[0]["id"], "call-0-1");
    assert_eq!(responses[0]["name"], "current_datetime");
    let clock = &responses[0]["response"];
    assert!(clock.is_object() && clock.get("error").is_none(), "{clock}");
    assert_eq!(
        *responses[1],
        json!({"id": "call-0-2", "name": "lookup_ticket", "response": {"status": "listo"}})
    );
    assert_eq!(talk.cost_micro_usd(), expected_cost(&connections));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_away_moves_to_a_resumed_connection_with_no_audio_lost() {
    let service = Service::start(vec![
        Plan::turns(vec![Turn::AnswerThenGoAway {
            heard: "Hola, soy Ana.",
            text: "Hola Ana, ¿en qué te ayudo?",
            reply_ms: 300,
        }]),
        Plan::turns(vec![answer(QUESTION, ANSWER, 300)]),
    ])
    .await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    let mut mic = Mic::default();
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the first turn's end", is_turn_end)
        .await;
    mic.until(&mut talk, "the move", |e| {
        matches!(e, EngineEvent::Rotated { .. })
    })
    .await;
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the second turn's end", turn_ends(2))
        .await;
    talk.close().await;

    // Every sample went to one connection or the other.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let appended = loop {
        let appended: u64 = service
            .connections()
            .iter()
            .map(|c| c.appended_samples)
            .sum();
        if appended >= mic.samples || std::time::Instant::now() > deadline {
            break appended;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(appended, mic.samples);
    let connections = service.connections();
    assert_eq!(connections.len(), 2);
    assert!(connections.iter().all(|c| c.appended_samples > 0));
    let handle = connections[0].handles.last().unwrap();
    assert_eq!(
        connections[1].setup.as_ref().unwrap()["sessionResumption"],
        json!({"handle": handle})
    );
    assert!(
        connections[1].with_key("clientContent").is_empty(),
        "a resumed session needs no history"
    );
    assert!(
        talk.events()
            .any(|e| matches!(e, EngineEvent::Rotated { generation: 2, gap_ms } if *gap_ms == 0.0)),
        "{:?}",
        talk.kinds()
    );
    assert!(
        talk.errors(ErrorKind::Transient).is_empty(),
        "{:?}",
        talk.kinds()
    );
    assert_eq!(
        talk.turn_ends(),
        [TurnEndReason::Completed, TurnEndReason::Completed]
    );
    assert_eq!(
        connections[1].usage.len(),
        1,
        "the second turn went to the new connection"
    );
    assert_eq!(talk.cost_micro_usd(), expected_cost(&connections));
    assert_eq!(talk::stat(&engine, "resumptions_total"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_service_is_reconnected_with_the_handle() {
    let service = Service::start(vec![
        Plan::turns(vec![
            answer("Hola.", "Hola, ¿qué tal?", 300),
            Turn::Close {
                code: 1011,
                reason: "The service is currently unavailable.",
            },
        ]),
        Plan::turns(vec![answer(QUESTION, ANSWER, 300)]),
    ])
    .await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    let mut mic = Mic::default();
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the first turn's end", is_turn_end)
        .await;
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the reconnection", |e| {
        matches!(e, EngineEvent::Rotated { .. })
    })
    .await;
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the answer on the new connection", turn_ends(2))
        .await;
    talk.close().await;

    let transient = talk.errors(ErrorKind::Transient);
    assert!(
        transient
            .iter()
            .any(|m| m.contains("1011") && m.contains("unavailable")),
        "{transient:?}"
    );
    assert!(talk.errors(ErrorKind::Fatal).is_empty());
    assert!(
        talk.events()
            .any(|e| matches!(e, EngineEvent::Rotated { generation: 2, gap_ms } if *gap_ms > 0.0))
    );
    let connections = service.connections();
    assert_eq!(connections.len(), 2);
    assert_eq!(connections[0].closed_with, Some(1011));
    assert_eq!(
        connections[1].setup.as_ref().unwrap()["sessionResumption"],
        json!({"handle": "handle-0-1"})
    );
    assert_eq!(
        talk.transcripts(Role::Assistant, Stage::Final),
        ["Hola, ¿qué tal?", ANSWER]
    );
    assert_eq!(talk.cost_micro_usd(), expected_cost(&connections));
    assert_eq!(talk::stat(&engine, "reconnects_total"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_request_is_fatal_and_not_implemented_is_retried_once() {
    let service = Service::start(vec![Plan::turns(vec![Turn::Close {
        code: 1007,
        reason: "Request contains an invalid argument.",
    }])])
    .await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    Mic::default().say_until_closed(&mut talk, 600).await;
    let fatal = talk.fatal_end().await;
    assert!(
        fatal.contains("1007") && fatal.contains("invalid argument"),
        "{fatal:?}"
    );
    assert_eq!(service.connections().len(), 1, "no retry");
    assert_eq!(engine.busy(), None);

    let service = Service::start(vec![Plan::turns(vec![Turn::Close {
        code: 1008,
        reason: "Operation is not implemented, or supported, or enabled.",
    }])])
    .await;
    let engine = self::engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    let mut mic = Mic::default();
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the reconnection", |e| {
        matches!(e, EngineEvent::Rotated { .. })
    })
    .await;
    mic.say_until_closed(&mut talk, 600).await;
    let fatal = talk.fatal_end().await;
    assert!(
        fatal.contains("again") && fatal.contains("1008"),
        "{fatal:?}"
    );
    assert_eq!(service.connections().len(), 2, "one retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_quota_is_fatal_and_cools_the_engine_down() {
    let service = Service::start(vec![Plan::turns(vec![Turn::Close {
        code: 1011,
        reason: "You exceeded your current quota, please check your plan and billing details.",
    }])])
    .await;
    let engine = engine(&service, None, |_| {});
    let mut talk = Talk::start(&engine);
    Mic::default().say_until_closed(&mut talk, 600).await;
    let fatal = talk.fatal_end().await;
    assert!(fatal.contains("quota"), "{fatal:?}");
    assert!(
        talk.errors(ErrorKind::Transient).is_empty(),
        "no reconnection"
    );
    assert_eq!(service.connections().len(), 1);
    talk::assert_cooling_down(&engine);
    assert_eq!(talk::stat(&engine, "throttled_total"), 1);
    assert_eq!(talk::stat(&engine, "cooling_down"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_is_fatal_and_a_token_is_sent_as_bearer() {
    let service = Service::start(vec![Plan::turns(vec![answer("Hola.", "Hola.", 300)])]).await;
    let engine = engine(&service, None, |c| c.api_key = "AIza-wrong".into());
    let mut talk = Talk::start(&engine);
    let fatal = talk.fatal_end().await;
    assert!(
        fatal.contains("credentials") && fatal.contains("401"),
        "{fatal:?}"
    );
    assert_eq!(service.connections()[0].refused, Some(401));
    assert_eq!(service.connections().len(), 1, "no retry");
    assert_eq!(engine.busy(), None, "a bad key is not throttling");

    let engine = self::engine(&service, None, |c| {
        c.api_key = "AIza-wrong".into();
        c.access_token = gemini::TOKEN.into();
    });
    let refused = engine.start(ConversationOptions {
        language: "es".into(),
        voice: "Lupe".into(),
        history: Vec::new(),
    });
    assert!(
        matches!(refused, Err(StartError::Unsupported(_))),
        "{refused:?}"
    );
    let mut talk = Talk::start(&engine);
    let mut mic = Mic::default();
    mic.say(&mut talk, 600).await;
    mic.until(&mut talk, "the turn's end", is_turn_end).await;
    talk.close().await;
    assert_eq!(talk.turn_ends(), [TurnEndReason::Completed]);
    let c = &service.connections()[1];
    assert_eq!(c.authorization, format!("Bearer {}", gemini::TOKEN));
    assert_eq!(c.api_key, "");
}
