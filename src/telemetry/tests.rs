use std::time::Duration;

use tokio::time::Instant;
use tracing_subscriber::layer::SubscriberExt;

use super::export::Queue;
use super::otlp::{AttrValue, OtlpLayer, SpanRecord};
use super::*;
use crate::engine::{EngineEvent, Pcm, Role, Stage, TurnEndReason};
use crate::usage::UsageDelta;

/// Runs `body` under a subscriber whose exported spans land in the returned list.
fn exported(body: impl FnOnce()) -> Vec<SpanRecord> {
    let (queue, mut rx) = Queue::detached(64);
    let subscriber = tracing_subscriber::registry().with(OtlpLayer::new(queue));
    tracing::subscriber::with_default(subscriber, body);
    let mut spans = Vec::new();
    while let Ok(span) = rx.try_recv() {
        spans.push(span);
    }
    spans
}

fn attr<'a>(span: &'a SpanRecord, key: &str) -> Option<&'a AttrValue> {
    span.attributes
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn int(span: &SpanRecord, key: &str) -> Option<i64> {
    match attr(span, key) {
        Some(AttrValue::Int(i)) => Some(*i),
        other => panic!("{key}: {other:?} in {span:?}"),
    }
}

fn text(span: &SpanRecord, key: &str) -> String {
    match attr(span, key) {
        Some(AttrValue::Str(s)) => s.clone(),
        other => panic!("{key}: {other:?} in {span:?}"),
    }
}

fn audio(samples: Vec<i16>) -> EngineEvent {
    EngineEvent::Audio(Pcm {
        rate_hz: 24_000,
        samples,
    })
}

fn usage(speech_in: u64, speech_out: u64, text_out: u64, cost: u64) -> EngineEvent {
    EngineEvent::Usage(UsageDelta {
        speech_in_tokens: speech_in,
        speech_out_tokens: speech_out,
        text_out_tokens: text_out,
        cost_micro_usd: cost,
        ..UsageDelta::default()
    })
}

fn ready() -> EngineEvent {
    EngineEvent::Ready {
        engine: "nova-sonic".into(),
        model: "amazon.nova-2-sonic-v1:0".into(),
        voice: "lupe".into(),
    }
}

fn turn_end(turn_id: u64) -> EngineEvent {
    EngineEvent::TurnEnd {
        turn_id,
        reason: TurnEndReason::Completed,
    }
}

#[test]
fn a_turn_records_first_byte_first_voice_reply_time_tokens_and_cost() {
    let t0 = Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    let spans = exported(|| {
        let conversation = conversation_span("7-40000", "es");
        let _inside = conversation.enter();
        let mut trace = ConversationTrace::new();
        trace.on_event(&ready(), at(0));
        // Usage before any turn (the user's speech) counts for the first.
        trace.on_event(&usage(40, 0, 0, 100), at(10));
        trace.on_event(&EngineEvent::SpeechEnded { turn_id: 1 }, at(1_000));
        trace.on_event(&audio(vec![0; 960]), at(1_120));
        trace.on_event(&audio(vec![3; 960]), at(1_150));
        trace.on_event(&audio(vec![0, 9_000, -9_000]), at(1_200));
        trace.on_event(&turn_end(1), at(1_900));
        // Engines report a reply's usage after its end.
        trace.on_event(&usage(0, 120, 30, 900), at(1_950));
        trace.on_event(&EngineEvent::SpeechEnded { turn_id: 2 }, at(4_000));
        trace.on_event(&audio(vec![5_000; 10]), at(4_300));
        trace.on_event(&EngineEvent::Interrupted { turn_id: 2 }, at(4_400));
        trace.ended("client_stopped", 2, &UsageDelta::default());
    });
    let names: Vec<&str> = spans.iter().map(|s| s.name).collect();
    assert_eq!(names, ["turn", "turn", "conversation"]);
    let (first, second, conversation) = (&spans[0], &spans[1], &spans[2]);
    assert_eq!(int(first, "turn.id"), Some(1));
    assert_eq!(int(first, "turn.first_byte_ms"), Some(120));
    assert_eq!(int(first, "turn.first_voice_ms"), Some(200));
    assert_eq!(int(first, "turn.reply_ms"), Some(900));
    assert_eq!(int(first, "usage.speech_in_tokens"), Some(40));
    assert_eq!(int(first, "usage.speech_out_tokens"), Some(120));
    assert_eq!(int(first, "usage.text_out_tokens"), Some(30));
    assert_eq!(int(first, "usage.input_tokens"), Some(40));
    assert_eq!(int(first, "usage.output_tokens"), Some(150));
    assert_eq!(int(first, "usage.cost_micro_usd"), Some(1_000));
    assert_eq!(text(first, "conversation.id"), "7-40000");
    assert_eq!(text(first, "engine"), "nova-sonic");
    assert_eq!(text(first, "model"), "amazon.nova-2-sonic-v1:0");
    assert_eq!(attr(first, "turn.interrupted"), None);
    // The second turn: voiced at once, interrupted, no usage of its own.
    assert_eq!(int(second, "turn.first_byte_ms"), Some(300));
    assert_eq!(int(second, "turn.first_voice_ms"), Some(300));
    assert_eq!(
        attr(second, "turn.interrupted"),
        Some(&AttrValue::Bool(true))
    );
    assert_eq!(int(second, "usage.cost_micro_usd"), Some(0));
    // One trace per conversation, turns under it.
    assert!(conversation.parent_span_id.is_none());
    for turn in [first, second] {
        assert_eq!(turn.trace_id, conversation.trace_id);
        assert_eq!(turn.parent_span_id, Some(conversation.span_id));
        assert!(turn.start_unix_nanos <= turn.end_unix_nanos);
    }
    assert_ne!(first.span_id, second.span_id);
    assert_eq!(text(conversation, "voice"), "lupe");
    assert_eq!(text(conversation, "language"), "es");
    assert_eq!(text(conversation, "close.reason"), "client_stopped");
    assert_eq!(int(conversation, "turns"), Some(2));
}

#[test]
fn after_its_end_a_turn_closes_at_the_next_other_event() {
    let t0 = Instant::now();
    let spans = exported(|| {
        let conversation = conversation_span("1-1", "en");
        let _inside = conversation.enter();
        let mut trace = ConversationTrace::new();
        trace.on_event(&EngineEvent::SpeechEnded { turn_id: 1 }, t0);
        trace.on_event(&turn_end(1), t0);
        let transcript = EngineEvent::Transcript {
            role: Role::User,
            text: "hola".into(),
            stage: Stage::Final,
            turn_id: 2,
        };
        trace.on_event(&transcript, t0);
        // Usage with no turn open waits for the next one: a typed question
        // answered without speech.
        trace.on_event(&usage(0, 0, 7, 5), t0);
        trace.on_event(&audio(vec![1_000; 4]), t0);
        trace.on_event(&turn_end(2), t0);
        trace.on_event(&usage(0, 3, 0, 1), t0);
    });
    // The trace itself was dropped: its open turn closed with it.
    let turns: Vec<&SpanRecord> = spans.iter().filter(|s| s.name == "turn").collect();
    assert_eq!(turns.len(), 2, "{spans:?}");
    assert_eq!(int(turns[0], "usage.output_tokens"), Some(0));
    let typed = turns[1];
    assert_eq!(attr(typed, "turn.id"), None);
    assert_eq!(
        attr(typed, "turn.first_byte_ms"),
        None,
        "no speech to measure from"
    );
    assert_eq!(int(typed, "usage.output_tokens"), Some(10));
    assert_eq!(int(typed, "usage.cost_micro_usd"), Some(6));
}

#[test]
fn a_full_queue_drops_and_counts() {
    let (queue, mut rx) = Queue::detached(2);
    let subscriber = tracing_subscriber::registry().with(OtlpLayer::new(queue.clone()));
    tracing::subscriber::with_default(subscriber, || {
        for n in 0..5 {
            let _span = conversation_span(&n.to_string(), "es");
        }
    });
    assert_eq!(queue.stats().dropped_spans, 3);
    let mut kept = 0;
    while rx.try_recv().is_ok() {
        kept += 1;
    }
    assert_eq!(kept, 2);
    drop(rx);
    queue.push(exported(|| drop(conversation_span("x", "es"))).remove(0));
    assert_eq!(
        queue.stats().dropped_spans,
        4,
        "a stopped exporter drops too"
    );
}

#[test]
fn log_filters_are_checked() {
    assert!(parse_filter("info").is_ok());
    assert!(parse_filter("warn,sonora=debug").is_ok());
    assert!(parse_filter(SERVER_FILTER).is_ok());
    let error = parse_filter("sonora=loud").expect_err("not a level");
    assert!(error.starts_with("not a log filter"), "{error}");
}

#[test]
fn a_bad_sonora_log_is_a_configuration_error() {
    let env = [(LOG_ENV.to_owned(), "sonora=[".to_owned())];
    let error = init(&Config::default(), &env, SERVER_FILTER).expect_err("rejected");
    assert_eq!(error.key(), Some(LOG_ENV));
    assert!(error.to_string().contains("(from env)"), "{error}");
}

#[test]
fn log_and_telemetry_settings_come_from_the_environment_and_are_checked() {
    let load = |env: &[(&str, &str)]| {
        crate::config::load(
            &crate::config::LoadOptions {
                env: env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..crate::config::LoadOptions::default()
            },
            &[],
        )
    };
    let config = load(&[
        ("SONORA_LOG_FORMAT", "json"),
        ("SONORA_TELEMETRY_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("SONORA_TELEMETRY_OTLP_QUEUE_SPANS", "16"),
    ])
    .expect("valid");
    assert_eq!(config.log.format, crate::config::LogFormat::Json);
    assert_eq!(config.telemetry.otlp_endpoint, "http://127.0.0.1:4318");
    assert_eq!(config.telemetry.otlp_queue_spans, 16);
    let bad = [
        ("SONORA_LOG_FORMAT", "xml", "log.format"),
        (
            "SONORA_TELEMETRY_OTLP_ENDPOINT",
            "127.0.0.1:4318",
            "telemetry.otlp_endpoint",
        ),
        (
            "SONORA_TELEMETRY_OTLP_TIMEOUT_MS",
            "10",
            "telemetry.otlp_timeout_ms",
        ),
        (
            "SONORA_TELEMETRY_OTLP_QUEUE_SPANS",
            "0",
            "telemetry.otlp_queue_spans",
        ),
    ];
    for (name, value, key) in bad {
        let error = load(&[(name, value)]).expect_err(name);
        assert_eq!(error.key(), Some(key), "{error}");
        assert!(error.to_string().contains(name), "{error}");
    }
}
