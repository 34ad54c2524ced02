use super::cost::Costing;
use super::prices::{Prices, builtin_prices, from_config};
use super::wire::{self, ClientEvent, ServerEvent, TranscriptionUsage};
use super::*;
use crate::config::OpenAiRealtimeConfig;

fn settings(endpoint: &str) -> OpenAiRealtimeSettings {
    let config = OpenAiRealtimeConfig {
        endpoint_url: endpoint.to_owned(),
        api_key: "sk-test".to_owned(),
        ..OpenAiRealtimeConfig::default()
    };
    OpenAiRealtimeSettings::from_config(&config)
}

#[test]
fn the_url_carries_the_model_and_azure_takes_its_own_key_header() {
    let openai = settings("");
    assert_eq!(
        openai.url(),
        "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    );
    assert_eq!(
        openai.auth_header(),
        ("authorization", "Bearer sk-test".to_owned())
    );
    let azure = settings("wss://uni.openai.azure.com/openai/v1/realtime");
    assert_eq!(
        azure.url(),
        "wss://uni.openai.azure.com/openai/v1/realtime?model=gpt-realtime"
    );
    assert_eq!(azure.auth_header(), ("api-key", "sk-test".to_owned()));
    let given = settings("ws://127.0.0.1:9/v1/realtime?model=x&y=1");
    assert_eq!(given.url(), "ws://127.0.0.1:9/v1/realtime?model=x&y=1");
}

#[test]
fn server_events_are_read_by_type_and_unknown_ones_pass() {
    let audio = r#"{"type":"response.output_audio.delta","event_id":"e1","response_id":"r1","item_id":"i1","output_index":0,"content_index":0,"delta":"AAA="}"#;
    assert_eq!(
        wire::parse(audio),
        Some(ServerEvent::AudioDelta {
            response_id: "r1".into(),
            item_id: "i1".into(),
            delta: "AAA=".into()
        })
    );
    let call = r#"{"type":"response.function_call_arguments.done","call_id":"c1","name":"search_knowledge","arguments":"{\"query\":\"biblioteca\"}"}"#;
    assert!(matches!(
        wire::parse(call),
        Some(ServerEvent::FunctionCall { name, .. }) if name == "search_knowledge"
    ));
    assert_eq!(
        wire::parse(r#"{"type":"rate_limits.updated","rate_limits":[]}"#),
        Some(ServerEvent::Other)
    );
    // A known event with a field of the wrong type, and what is not an event.
    assert_eq!(
        wire::parse(r#"{"type":"response.output_audio.delta","item_id":5,"delta":"x"}"#),
        None
    );
    assert_eq!(wire::parse("[1,2]"), None);
    assert_eq!(wire::parse("not json"), None);
    let error = r#"{"type":"error","error":{"type":"invalid_request_error","code":"rate_limit_exceeded","message":"slow down"}}"#;
    match wire::parse(error) {
        Some(ServerEvent::Error { error }) => assert!(error.throttled()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn client_events_have_the_ga_shapes() {
    let truncate = ClientEvent::Truncate {
        item_id: "i1".into(),
        content_index: 0,
        audio_end_ms: 640,
    };
    let value: serde_json::Value = serde_json::from_str(&truncate.to_text()).expect("json");
    assert_eq!(
        value,
        serde_json::json!({"type": "conversation.item.truncate", "item_id": "i1", "content_index": 0, "audio_end_ms": 640})
    );
    let output = ClientEvent::tool_output("c1", &serde_json::json!({"ok": true}));
    let value: serde_json::Value = serde_json::from_str(&output.to_text()).expect("json");
    assert_eq!(value["item"]["type"], "function_call_output");
    assert_eq!(value["item"]["output"], "{\"ok\":true}");
    let text = ClientEvent::user_text("hola");
    let value: serde_json::Value = serde_json::from_str(&text.to_text()).expect("json");
    assert_eq!(value["item"]["content"][0]["type"], "input_text");
    let respond: serde_json::Value =
        serde_json::from_str(&ClientEvent::respond().to_text()).expect("json");
    assert_eq!(
        respond,
        serde_json::json!({"type": "response.create", "response": {}})
    );
}

#[test]
fn cached_input_is_billed_at_its_own_rate_and_transcription_on_top() {
    let prices = builtin_prices();
    let mut costing = Costing::new("gpt-realtime", "gpt-4o-mini-transcribe", &prices);
    assert!(costing.priced());
    let usage: wire::Usage = serde_json::from_value(serde_json::json!({
        "total_tokens": 1550, "input_tokens": 1200, "output_tokens": 350,
        "input_token_details": {"text_tokens": 1000, "audio_tokens": 200, "image_tokens": 0,
            "cached_tokens": 800, "cached_tokens_details": {"text_tokens": 800, "audio_tokens": 0}},
        "output_token_details": {"text_tokens": 50, "audio_tokens": 300}
    }))
    .expect("usage");
    let delta = costing.response(&usage);
    // Text in: 200 × 4,000 + 800 × 400 n$; audio in 200 × 32,000; text out
    // 50 × 16,000; audio out 300 × 64,000.
    assert_eq!(delta.cost_micro_usd, 27_520);
    assert_eq!(delta.speech_cost_micro_usd, 25_600);
    assert_eq!(delta.text_cost_micro_usd, 1_920);
    assert_eq!(delta.text_in_tokens, 1000);
    assert_eq!(delta.speech_in_tokens, 200);
    assert_eq!(delta.speech_out_tokens, 300);
    let transcription: TranscriptionUsage = serde_json::from_value(serde_json::json!({
        "type": "tokens", "input_tokens": 60, "output_tokens": 12, "total_tokens": 72,
        "input_token_details": {"text_tokens": 10, "audio_tokens": 50}
    }))
    .expect("transcription usage");
    let extra = costing.transcription(&transcription).expect("priced");
    // 60 × 1,250 + 12 × 5,000 n$, and no tokens of the speech model.
    assert_eq!(extra.cost_micro_usd, 135);
    assert_eq!(extra.speech_in_tokens + extra.text_out_tokens, 0);
    assert_eq!(costing.totals().cost_micro_usd, 27_655);
    let duration: TranscriptionUsage =
        serde_json::from_value(serde_json::json!({"type": "duration", "seconds": 2.5}))
            .expect("duration usage");
    assert_eq!(costing.transcription(&duration), None);
}

#[test]
fn many_small_responses_round_to_the_exact_total() {
    let prices = builtin_prices();
    let mut costing = Costing::new("gpt-realtime-mini", "", &prices);
    let usage = wire::Usage {
        input_tokens: 7,
        output_tokens: 3,
        input_token_details: wire::InputDetails {
            text_tokens: 4,
            audio_tokens: 3,
            cached_tokens: 2,
            cached_tokens_details: wire::CachedDetails::default(),
        },
        output_token_details: wire::OutputDetails {
            text_tokens: 1,
            audio_tokens: 2,
        },
    };
    let mut sum = 0;
    for _ in 0..1000 {
        sum += costing.response(&usage).cost_micro_usd;
    }
    // Per response: text 2 × 600 + cached text 2 × 60 + audio 3 × 10,000 +
    // out 1 × 2,400 + 2 × 20,000 = 73,720 n$; 1,000 of them = 73,720 µ$.
    assert_eq!(sum, 73_720);
    assert_eq!(costing.totals().cost_micro_usd, 73_720);
}

#[test]
fn dated_snapshots_take_their_family_prices_and_overrides_replace_one_rate() {
    let prices = builtin_prices();
    assert_eq!(
        Prices::find(&prices.standard, "gpt-realtime-2025-08-28"),
        prices.standard.rates("gpt-realtime")
    );
    assert_eq!(Prices::find(&prices.standard, "gpt-realtime-2025-08"), None);
    let config = OpenAiRealtimeConfig {
        speech_out_usd_per_1k: 0.05,
        cached_text_in_usd_per_1k: 0.0002,
        ..OpenAiRealtimeConfig::default()
    };
    let prices = from_config(&config);
    let rates = prices
        .standard
        .rates("gpt-realtime")
        .copied()
        .expect("rates");
    assert_eq!(rates.speech_out, 50_000);
    assert_eq!(rates.speech_in, 32_000);
    let cached = prices
        .cached
        .rates("gpt-realtime")
        .copied()
        .expect("cached");
    assert_eq!((cached.text_in, cached.speech_in), (200, 400));
    assert!(prices.stamp("gpt-realtime").contains("cached_text_in=200"));
}

#[test]
fn an_engine_needs_a_key_and_offers_its_voices() {
    let mut no_key = settings("");
    no_key.api_key.clear();
    assert!(OpenAiRealtimeEngine::new(no_key, None).is_err());
    let engine = OpenAiRealtimeEngine::new(settings(""), None).expect("engine");
    assert_eq!(engine.name(), "openai-realtime");
    assert!(engine.voices().iter().any(|v| v.id == "marin"));
    assert!(engine.paid());
    assert_eq!(engine.busy(), None);
}
