use serde_json::{Value, json};

use super::input::{BlockRole, Builder, Endpointing, Inference, Tool};
use super::models::{MODEL_2, builtin_prices};
use super::output::{Output, is_interruption_marker, parse_output};
use super::translate::Translator;
use crate::base64::{decode as base64_decode, encode as base64_encode};
use crate::engine::{EngineEvent, Role, Stage, TurnEndReason};
use crate::usage::UsageMeter;

fn json_of(input: &super::input::Input) -> Value {
    serde_json::from_slice(&input.to_bytes()).expect("valid JSON")
}

fn output(event: Value) -> Output {
    parse_output(event.to_string().as_bytes()).expect("parses")
}

fn translator() -> Translator {
    Translator::new(24_000, UsageMeter::new(MODEL_2, &builtin_prices()))
}

#[test]
fn setup_events_have_the_documented_shape() {
    let mut builder = Builder::new("p1");
    let start = json_of(&builder.session_start(Inference::default(), Some(Endpointing::Medium)));
    assert_eq!(
        start,
        json!({"event": {"sessionStart": {
            "inferenceConfiguration": {"maxTokens": 1024, "topP": 0.9, "temperature": 0.7},
            "turnDetectionConfiguration": {"endpointingSensitivity": "MEDIUM"}}}})
    );
    let v1 = json_of(&builder.session_start(Inference::default(), None));
    assert!(
        v1["event"]["sessionStart"]
            .get("turnDetectionConfiguration")
            .is_none()
    );

    let prompt = json_of(&builder.prompt_start("lupe", 24_000, &[]));
    let body = &prompt["event"]["promptStart"];
    assert_eq!(body["promptName"], "p1");
    assert_eq!(body["audioOutputConfiguration"]["voiceId"], "lupe");
    assert_eq!(body["audioOutputConfiguration"]["sampleRateHertz"], 24_000);
    assert_eq!(body["audioOutputConfiguration"]["encoding"], "base64");
    assert!(
        body.get("toolConfiguration").is_none(),
        "no tools, no tool configuration"
    );

    let schema = json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]});
    let tools = [Tool::new(
        "buscar_conocimiento",
        "Busca en la base de conocimiento",
        &schema,
    )];
    let prompt = json_of(&builder.prompt_start("carlos", 16_000, &tools));
    let tool = &prompt["event"]["promptStart"]["toolConfiguration"]["tools"][0]["toolSpec"];
    assert_eq!(tool["name"], "buscar_conocimiento");
    // The schema travels as a JSON-encoded string.
    let text = tool["inputSchema"]["json"].as_str().expect("a string");
    assert_eq!(serde_json::from_str::<Value>(text).expect("JSON"), schema);

    let (audio, name) = builder.audio_start(16_000);
    let audio = json_of(&audio);
    let start = &audio["event"]["contentStart"];
    assert_eq!(
        (start["type"].as_str(), start["role"].as_str()),
        (Some("AUDIO"), Some("USER"))
    );
    assert_eq!(start["interactive"], true);
    assert_eq!(start["contentName"], name.as_str());
    assert_eq!(start["audioInputConfiguration"]["sampleRateHertz"], 16_000);
}

#[test]
fn text_blocks_are_split_at_character_boundaries_and_names_never_repeat() {
    let mut builder = Builder::new("p");
    let text = "¿Dónde está la biblioteca? ".repeat(60); // multibyte, > 1 KB
    let events = builder.text_block(BlockRole::User, false, &text, 1024);
    let values: Vec<Value> = events.iter().map(json_of).collect();
    assert_eq!(values[0]["event"]["contentStart"]["role"], "USER");
    assert_eq!(values[0]["event"]["contentStart"]["interactive"], false);
    let pieces: Vec<&str> = values[1..values.len() - 1]
        .iter()
        .map(|v| v["event"]["textInput"]["content"].as_str().expect("text"))
        .collect();
    assert!(pieces.len() > 1);
    assert!(pieces.iter().all(|p| p.len() <= 1024));
    assert_eq!(pieces.concat(), text);
    assert!(
        values.last().expect("end")["event"]
            .get("contentEnd")
            .is_some()
    );
    let again = builder.text_block(BlockRole::Assistant, false, "hola", 1024);
    assert_ne!(
        json_of(&again[0])["event"]["contentStart"]["contentName"],
        values[0]["event"]["contentStart"]["contentName"]
    );
    // Quotes and newlines survive: no string templates.
    let tricky = builder.text_block(BlockRole::System, false, "di \"hola\"\ny {sal}", 1024);
    assert_eq!(
        json_of(&tricky[1])["event"]["textInput"]["content"],
        "di \"hola\"\ny {sal}"
    );
}

#[test]
fn audio_tool_results_and_closing_events() {
    let mut builder = Builder::new("p");
    let samples = [0i16, 1, -1, i16::MAX, i16::MIN, 1234];
    let audio = json_of(&builder.audio_input("a", &samples));
    let content = audio["event"]["audioInput"]["content"]
        .as_str()
        .expect("base64");
    let bytes = base64_decode(content).expect("decodes");
    let back: Vec<i16> = crate::audio::samples_from_le(&bytes).collect();
    assert_eq!(back, samples);

    let result = builder.tool_result("tu-1", &json!("las 14:00"));
    let values: Vec<Value> = result.iter().map(json_of).collect();
    let start = &values[0]["event"]["contentStart"];
    assert_eq!(start["type"], "TOOL");
    assert_eq!(start["toolResultInputConfiguration"]["toolUseId"], "tu-1");
    let content = values[1]["event"]["toolResult"]["content"]
        .as_str()
        .expect("string");
    assert_eq!(
        serde_json::from_str::<Value>(content).expect("JSON"),
        json!({"result": "las 14:00"})
    );

    let [prompt_end, session_end] = builder.prompt_and_session_end();
    assert_eq!(
        (prompt_end.name(), session_end.name()),
        ("promptEnd", "sessionEnd")
    );
    assert_eq!(json_of(&session_end), json!({"event": {"sessionEnd": {}}}));
}

#[test]
fn base64_matches_the_standard_vectors() {
    let vectors = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (plain, encoded) in vectors {
        assert_eq!(base64_encode(plain.as_bytes()), encoded);
        assert_eq!(base64_decode(encoded).expect("decodes"), plain.as_bytes());
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(base64_decode(&base64_encode(&all)).expect("decodes"), all);
    assert!(base64_decode("Zm9v!").is_err());
    assert!(base64_decode("Z").is_err());
}

fn content_start(id: &str, kind: &str, role: &str, stage: Option<&str>) -> Value {
    let mut body = json!({"sessionId": "s", "promptName": "p", "completionId": "c", "contentId": id, "type": kind, "role": role});
    if let Some(stage) = stage {
        body["additionalModelFields"] =
            Value::String(json!({"generationStage": stage}).to_string());
    }
    json!({"event": {"contentStart": body}})
}

fn text(id: &str, content: &str) -> Value {
    json!({"event": {"textOutput": {"contentId": id, "content": content}}})
}

fn content_end(id: &str, kind: &str, reason: &str) -> Value {
    json!({"event": {"contentEnd": {"contentId": id, "type": kind, "stopReason": reason}}})
}

fn audio(id: &str, samples: &[i16]) -> Value {
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    json!({"event": {"audioOutput": {"contentId": id, "content": base64_encode(&bytes)}}})
}

fn usage(delta: [u64; 4], total: [u64; 4]) -> Value {
    json!({"event": {"usageEvent": {"details": {
        "delta": {"input": {"speechTokens": delta[0], "textTokens": delta[1]}, "output": {"speechTokens": delta[2], "textTokens": delta[3]}},
        "total": {"input": {"speechTokens": total[0], "textTokens": total[1]}, "output": {"speechTokens": total[2], "textTokens": total[3]}}}}}})
}

fn run(translator: &mut Translator, events: Vec<Value>) -> Vec<EngineEvent> {
    events
        .into_iter()
        .flat_map(|e| translator.on_output(output(e)))
        .collect()
}

#[test]
fn a_spanish_turn_becomes_engine_events_in_order() {
    let mut t = translator();
    let events = run(
        &mut t,
        vec![
            json!({"event": {"completionStart": {"sessionId": "s", "promptName": "p", "completionId": "c"}}}),
            content_start("u", "TEXT", "USER", Some("FINAL")),
            text("u", "¿Cuál es el horario de la biblioteca?"),
            content_end("u", "TEXT", "END_TURN"),
            content_start("s1", "TEXT", "ASSISTANT", Some("SPECULATIVE")),
            text("s1", "La biblioteca abre de ocho a nueve."),
            content_end("s1", "TEXT", "END_TURN"),
            content_start("a1", "AUDIO", "ASSISTANT", None),
            audio("a1", &[1, 2, 3]),
            content_end("a1", "AUDIO", "END_TURN"),
            usage([100, 50, 40, 10], [100, 50, 40, 10]),
            content_start("f1", "TEXT", "ASSISTANT", Some("FINAL")),
            text("f1", "La biblioteca abre de ocho a nueve."),
            content_end("f1", "TEXT", "END_TURN"),
            json!({"event": {"completionEnd": {"stopReason": "END_TURN"}}}),
        ],
    );
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            serde_json::to_value(e).expect("serializes")["type"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "speech_ended",
            "transcript",
            "transcript",
            "audio",
            "usage",
            "transcript",
            "turn_end"
        ]
    );
    assert!(matches!(
        &events[1],
        EngineEvent::Transcript {
            role: Role::User,
            stage: Stage::Final,
            turn_id: 1,
            ..
        }
    ));
    assert!(matches!(
        &events[2],
        EngineEvent::Transcript {
            role: Role::Assistant,
            stage: Stage::Speculative,
            turn_id: 1,
            ..
        }
    ));
    assert!(
        matches!(&events[3], EngineEvent::Audio(pcm) if pcm.rate_hz == 24_000 && pcm.samples == [1, 2, 3])
    );
    assert!(matches!(
        &events[5],
        EngineEvent::Transcript {
            role: Role::Assistant,
            stage: Stage::Final,
            turn_id: 1,
            ..
        }
    ));
    assert_eq!(
        events[6],
        EngineEvent::TurnEnd {
            turn_id: 1,
            reason: TurnEndReason::Completed
        }
    );
    let EngineEvent::Usage(delta) = &events[4] else {
        panic!("usage")
    };
    assert_eq!(
        (
            delta.speech_in_tokens,
            delta.text_in_tokens,
            delta.speech_out_tokens,
            delta.text_out_tokens
        ),
        (100, 50, 40, 10)
    );
    // Nova 2 rates: 100 × 3000 + 50 × 330 + 40 × 12000 + 10 × 2750 nano-dollars.
    assert_eq!(
        t.meter().cost_nano_usd(),
        300_000 + 16_500 + 480_000 + 27_500
    );
    assert!(t.notes.is_empty(), "{:?}", t.notes);
}

#[test]
fn barge_in_from_either_signal_is_reported_once() {
    let mut t = translator();
    let events = run(
        &mut t,
        vec![
            content_start("u", "TEXT", "USER", Some("FINAL")),
            text("u", "hola"),
            content_start("a", "AUDIO", "ASSISTANT", None),
            audio("a", &[5; 4]),
            content_start("f", "TEXT", "ASSISTANT", Some("FINAL")),
            text("f", "{ \"interrupted\" : true }"),
            content_end("f", "TEXT", "INTERRUPTED"),
            content_start("u2", "TEXT", "USER", Some("FINAL")),
            text("u2", "otra pregunta"),
        ],
    );
    let interrupted: Vec<&EngineEvent> = events
        .iter()
        .filter(|e| matches!(e, EngineEvent::Interrupted { .. }))
        .collect();
    assert_eq!(interrupted, [&EngineEvent::Interrupted { turn_id: 1 }]);
    assert!(events.contains(&EngineEvent::TurnEnd {
        turn_id: 1,
        reason: TurnEndReason::Interrupted
    }));
    // The marker is never shown as text, and the next question is turn 2.
    assert!(!events.iter().any(
        |e| matches!(e, EngineEvent::Transcript { text, .. } if text.contains("interrupted"))
    ));
    assert!(events.iter().any(|e| matches!(
        e,
        EngineEvent::Transcript {
            turn_id: 2,
            role: Role::User,
            ..
        }
    )));
    assert!(is_interruption_marker("{\"interrupted\":true}"));
    assert!(!is_interruption_marker("interrumpido"));
}

#[test]
fn tool_use_and_a_new_stream() {
    let mut t = translator();
    let events = run(
        &mut t,
        vec![
            content_start("u", "TEXT", "USER", Some("FINAL")),
            text("u", "¿qué hora es?"),
            content_start("t", "TOOL", "TOOL", None),
            json!({"event": {"toolUse": {"contentId": "t", "toolUseId": "tu-9", "toolName": "fecha_y_hora", "content": "{\"zona\":\"America/Lima\"}"}}}),
            content_end("t", "TOOL", "TOOL_USE"),
            usage([10, 0, 0, 0], [10, 0, 0, 0]),
        ],
    );
    assert!(events.contains(&EngineEvent::ToolCall {
        id: "tu-9".into(),
        name: "fecha_y_hora".into(),
        json: json!({"zona": "America/Lima"})
    }));
    // After rotation the engine's totals restart: nothing counted twice.
    t.begin_stream();
    let after = run(&mut t, vec![usage([5, 0, 0, 0], [5, 0, 0, 0])]);
    assert!(matches!(&after[..], [EngineEvent::Usage(d)] if d.speech_in_tokens == 5));
    assert_eq!(t.meter().totals().speech_in_tokens, 15);
    assert!(t.notes.is_empty(), "{:?}", t.notes);
}

#[test]
fn broken_and_unknown_events() {
    assert!(parse_output(b"not json").is_err());
    assert!(parse_output(b"{\"nope\":1}").is_err());
    assert!(
        parse_output(br#"{"event":{"audioOutput":{"contentId":"a","content":"%%%"}}}"#).is_err()
    );
    assert!(
        parse_output(
            br#"{"event":{"toolUse":{"toolUseId":"x","toolName":"y","content":"{oops"}}}"#
        )
        .is_err()
    );
    let mut t = translator();
    let none = t.on_output(parse_output(br#"{"event":{"somethingNew":{}}}"#).expect("kept"));
    assert!(none.is_empty());
    assert_eq!(t.notes, ["unknown event somethingNew"]);
    // Old-style usage fields are reported, not counted.
    let old = t.on_output(output(
        json!({"event": {"usageEvent": {"inputTokenCount": 5}}}),
    ));
    assert!(old.is_empty());
    assert_eq!(t.notes.len(), 2);
}

#[test]
fn call_errors_are_classified_by_their_variant() {
    use aws_sdk_bedrockruntime::operation::invoke_model_with_bidirectional_stream::InvokeModelWithBidirectionalStreamError as E;
    use aws_sdk_bedrockruntime::types::error as x;
    use aws_smithy_types::error::ErrorMetadata;

    use super::stream::{FailureKind as K, call_kind};
    let cases = [
        (
            E::ThrottlingException(x::ThrottlingException::builder().build()),
            K::Throttled,
        ),
        (
            E::ServiceUnavailableException(x::ServiceUnavailableException::builder().build()),
            K::Transient,
        ),
        (
            E::InternalServerException(x::InternalServerException::builder().build()),
            K::Transient,
        ),
        (
            E::ModelStreamErrorException(x::ModelStreamErrorException::builder().build()),
            K::Transient,
        ),
        (
            E::ModelTimeoutException(x::ModelTimeoutException::builder().build()),
            K::Transient,
        ),
        (
            E::ModelNotReadyException(x::ModelNotReadyException::builder().build()),
            K::Transient,
        ),
        (
            E::ModelErrorException(x::ModelErrorException::builder().build()),
            K::Transient,
        ),
        (
            E::ValidationException(x::ValidationException::builder().build()),
            K::Invalid,
        ),
        (
            E::AccessDeniedException(x::AccessDeniedException::builder().build()),
            K::Refused,
        ),
        (
            E::ResourceNotFoundException(x::ResourceNotFoundException::builder().build()),
            K::Refused,
        ),
        (
            E::ServiceQuotaExceededException(x::ServiceQuotaExceededException::builder().build()),
            K::QuotaExceeded,
        ),
    ];
    for (error, kind) in &cases {
        assert_eq!(call_kind(error).1, *kind, "{error:?}");
    }
    let unlisted = E::generic(
        ErrorMetadata::builder()
            .code("UnrecognizedClientException")
            .message("The security token included in the request is invalid.")
            .build(),
    );
    assert_eq!(
        call_kind(&unlisted),
        ("UnrecognizedClientException", K::Refused)
    );
}

#[test]
fn stream_errors_are_classified_by_their_variant_and_whether_it_had_answered() {
    use aws_sdk_bedrockruntime::types::error::{
        self as x, InvokeModelWithBidirectionalStreamOutputError as E,
    };

    use super::stream::{FailureKind as K, stream_kind};
    let throttled = E::ThrottlingException(x::ThrottlingException::builder().build());
    assert_eq!(
        stream_kind(&throttled, false),
        ("throttlingException", K::Throttled)
    );
    for error in [
        E::ServiceUnavailableException(x::ServiceUnavailableException::builder().build()),
        E::InternalServerException(x::InternalServerException::builder().build()),
        E::ModelStreamErrorException(x::ModelStreamErrorException::builder().build()),
        E::ModelTimeoutException(x::ModelTimeoutException::builder().build()),
    ] {
        for answered in [false, true] {
            assert_eq!(stream_kind(&error, answered).1, K::Transient, "{error:?}");
        }
    }
    // The service dropping a conversation it served (idle timeout, reset,
    // instability) is passing; refusing a stream's setup is not.
    let validation = E::ValidationException(x::ValidationException::builder().build());
    assert_eq!(
        stream_kind(&validation, true),
        ("validationException", K::Transient)
    );
    assert_eq!(
        stream_kind(&validation, false),
        ("validationException", K::Invalid)
    );
    // The conditions the service names only in a validation message are
    // passing even before the first answer; other refusals are not.
    let with = |message: &str| {
        E::ValidationException(x::ValidationException::builder().message(message).build())
    };
    for message in [
        "System instability detected. Please retry your request.",
        "Timed out waiting for input events",
        "InternalErrorCode=531::RST_STREAM closed stream. HTTP/2 error code: NO_ERROR",
    ] {
        assert_eq!(
            stream_kind(&with(message), false).1,
            K::Transient,
            "{message}"
        );
    }
    let history = with("First message in chat history should not be Assistant");
    assert_eq!(stream_kind(&history, false).1, K::Invalid);
    assert_eq!(stream_kind(&history, true).1, K::Transient);
}

#[test]
fn only_throttling_and_passing_faults_are_retried_and_only_load_trips_the_breaker() {
    use super::stream::{Failure, FailureKind as K};
    let failure = |kind| Failure {
        code: "c".into(),
        message: "m".into(),
        kind,
    };
    let table = [
        (K::Throttled, true, true),
        (K::QuotaExceeded, false, true),
        (K::Transient, true, false),
        (K::Invalid, false, false),
        (K::Refused, false, false),
        (K::Misconfigured, false, false),
    ];
    for (kind, retry, overload) in table {
        assert_eq!(failure(kind).retry(), retry, "{kind:?}");
        assert_eq!(failure(kind).overload(), overload, "{kind:?}");
    }
    assert!(Failure::transient("Stalled", "m".into()).retry());
    assert_eq!(failure(K::Refused).to_string(), "c: m");
}
