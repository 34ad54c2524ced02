use crate::engine::Role;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::connect::{Failure, Opening, Verdict};
use super::cost::Costing;
use super::wire::{self, ClientMessage, UsageMetadata};
use super::*;
use crate::config::{GeminiLiveConfig, ToolsConfig};

fn config() -> GeminiLiveConfig {
    GeminiLiveConfig {
        api_key: "AIza-test".into(),
        ..GeminiLiveConfig::default()
    }
}

fn usage(value: serde_json::Value) -> UsageMetadata {
    serde_json::from_value(value).expect("usage")
}

#[test]
fn the_key_goes_in_its_header_and_a_token_replaces_it() {
    let settings = GeminiLiveSettings::from_config(&config());
    assert_eq!(settings.endpoint_url, DEFAULT_ENDPOINT);
    assert_eq!(settings.model, "gemini-3.1-flash-live-preview");
    assert_eq!(
        settings.auth_header(),
        Some(("x-goog-api-key", "AIza-test".to_owned()))
    );
    let bearer = GeminiLiveSettings::from_config(&GeminiLiveConfig {
        access_token: " ya29.token ".into(),
        model: "models/gemini-2.5-flash-native-audio-preview-12-2025".into(),
        ..config()
    });
    assert_eq!(
        bearer.auth_header(),
        Some(("authorization", "Bearer ya29.token".to_owned()))
    );
    assert_eq!(
        bearer.model,
        "gemini-2.5-flash-native-audio-preview-12-2025"
    );
}

#[test]
fn server_messages_are_read_from_text_and_binary_frames() {
    let text = r#"{"serverContent":{"modelTurn":{"parts":[{"inlineData":{"mimeType":"audio/pcm;rate=24000","data":"AAABAA=="}}]},"outputTranscription":{"text":"Hola"}},"usageMetadata":{"promptTokenCount":5}}"#;
    let message = wire::parse(text.as_bytes()).expect("text frame");
    let content = message.server_content.expect("content");
    let blob = content.model_turn.expect("model turn").parts[0]
        .inline_data
        .clone()
        .expect("audio");
    assert_eq!(blob.pcm_rate_hz(), Some(24_000));
    assert_eq!(content.output_transcription.expect("said").text, "Hola");
    assert_eq!(message.usage_metadata.expect("usage").prompt_token_count, 5);
    // The same JSON in a binary frame is the same message.
    let binary: Vec<u8> = br#"{"setupComplete":{}}"#.to_vec();
    assert!(
        wire::parse(&binary)
            .expect("binary")
            .setup_complete
            .is_some()
    );
    let calls = wire::parse(
        br#"{"toolCall":{"functionCalls":[{"id":"f1","name":"current_datetime","args":{}}]}}"#,
    )
    .expect("tool call");
    assert_eq!(
        calls.tool_call.expect("calls").function_calls[0].name,
        "current_datetime"
    );
    let handle = wire::parse(br#"{"sessionResumptionUpdate":{"newHandle":"h1","resumable":true}}"#)
        .expect("update")
        .session_resumption_update
        .expect("handle");
    assert!(handle.resumable && handle.new_handle == "h1");
    let go_away = wire::parse(br#"{"goAway":{"timeLeft":"1.5s"}}"#)
        .expect("goAway")
        .go_away
        .expect("goAway");
    assert_eq!(
        go_away.time_left(),
        Some(std::time::Duration::from_millis(1_500))
    );
    // Unknown fields pass; wrong types, non-objects and non-JSON do not.
    assert!(wire::parse(br#"{"somethingNew":{"x":1}}"#).is_some());
    assert_eq!(
        wire::parse(br#"{"serverContent":{"interrupted":"yes"}}"#),
        None
    );
    assert_eq!(wire::parse(b"[1,2]"), None);
    assert_eq!(wire::parse(b"\xff\xfe not json"), None);
    let video = wire::Blob {
        mime_type: "video/mp4".into(),
        data: String::new(),
    };
    assert_eq!(video.pcm_rate_hz(), None);
}

#[test]
fn client_messages_have_one_key_each() {
    let audio: serde_json::Value =
        serde_json::from_str(&ClientMessage::audio(&[1, -1]).to_text()).expect("json");
    assert_eq!(
        audio,
        json!({"realtimeInput": {"audio": {"data": "AQD//w==", "mimeType": "audio/pcm;rate=16000"}}})
    );
    let text: serde_json::Value =
        serde_json::from_str(&ClientMessage::text("hola").to_text()).expect("json");
    assert_eq!(text, json!({"realtimeInput": {"text": "hola"}}));
    let response: serde_json::Value =
        serde_json::from_str(&ClientMessage::tool_response("f1", "lookup", &json!(42)).to_text())
            .expect("json");
    assert_eq!(
        response,
        json!({"toolResponse": {"functionResponses": [{"id": "f1", "name": "lookup", "response": {"result": 42}}]}})
    );
    let history = ClientMessage::history(&[
        (Role::User, "hola".into()),
        (Role::Assistant, "buenas".into()),
    ]);
    let history: serde_json::Value = serde_json::from_str(&history.to_text()).expect("json");
    assert_eq!(history["clientContent"]["turns"][1]["role"], "model");
    assert_eq!(history["clientContent"]["turnComplete"], false);
}

#[test]
fn the_setup_names_the_model_voice_language_tools_and_handle() {
    let settings = GeminiLiveSettings::from_config(&config());
    let tools = Tools::new(&ToolsConfig::default(), None).expect("tools");
    let engine = GeminiLiveEngine::new(settings, Some(tools)).expect("engine");
    let mut opening = Opening {
        voice: "Kore".into(),
        language: "es".into(),
        handle: None,
        history: vec![(Role::User, "hola".into())],
        delay: std::time::Duration::ZERO,
    };
    let setup = connect::setup(&engine.shared, &opening);
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
        .expect("prompt");
    assert!(instruction.contains("universidad") && instruction.ends_with("(BCP 47): es."));
    let names: Vec<&str> = setup["tools"][0]["functionDeclarations"]
        .as_array()
        .expect("declarations")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert!(names.contains(&"current_datetime"), "{names:?}");
    assert_eq!(setup["sessionResumption"], json!({}));
    assert_eq!(
        setup["historyConfig"]["initialHistoryInClientContent"],
        true
    );
    assert_eq!(
        setup["contextWindowCompression"],
        json!({"slidingWindow": {}})
    );
    assert_eq!(setup["inputAudioTranscription"], json!({}));
    opening.handle = Some("h7".into());
    let resumed = connect::setup(&engine.shared, &opening);
    assert_eq!(resumed["sessionResumption"], json!({"handle": "h7"}));
    assert!(resumed.get("historyConfig").is_none());
}

fn close(code: u16, reason: &str) -> Failure {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    };
    Failure::from_close(Some(&frame))
}

#[test]
fn close_codes_say_whether_to_retry() {
    assert_eq!(
        close(1007, "Request contains an invalid argument.").verdict,
        Verdict::Fatal
    );
    assert_eq!(
        close(1008, "models/x is not found for API version v1beta").verdict,
        Verdict::Fatal
    );
    assert_eq!(
        close(
            1008,
            "Operation is not implemented, or supported, or enabled."
        )
        .verdict,
        Verdict::RetryOnce
    );
    assert_eq!(
        close(
            1011,
            "You exceeded your current quota, please check your plan."
        )
        .verdict,
        Verdict::Throttled
    );
    assert_eq!(
        close(1011, "The service is currently unavailable.").verdict,
        Verdict::Retry
    );
    assert_eq!(
        close(1011, "Deadline expired before operation could complete.").verdict,
        Verdict::Retry
    );
    assert_eq!(Failure::from_close(None).verdict, Verdict::Retry);
    let said = close(1007, "API key not valid.");
    assert!(said.message.contains("1007") && said.message.contains("API key not valid"));
}

#[test]
fn usage_is_billed_from_the_modality_lists_with_omitted_zeros() {
    let mut costing = Costing::new(DEFAULT_MODEL, &builtin_prices());
    assert!(costing.priced());
    // No TEXT in the response list (zero, omitted); the prompt total is 40
    // tokens above its list, which is not billed as text.
    let billed = costing.turn(&usage(json!({
        "promptTokenCount": 1_240, "cachedContentTokenCount": 200,
        "responseTokenCount": 300, "thoughtsTokenCount": 20, "toolUsePromptTokenCount": 10,
        "totalTokenCount": 1_570,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 400}, {"modality": "AUDIO", "tokenCount": 800}],
        "cacheTokensDetails": [{"modality": "TEXT", "tokenCount": 200}],
        "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 300}]
    })));
    assert!(billed.mismatch);
    let delta = billed.delta;
    assert_eq!(
        (
            delta.text_in_tokens,
            delta.speech_in_tokens,
            delta.text_out_tokens,
            delta.speech_out_tokens
        ),
        (410, 800, 20, 300)
    );
    // 410 × 750 + 800 × 3,000 + 20 × 4,500 + 300 × 12,000 n$ = 6,397,500 n$.
    assert_eq!(delta.cost_micro_usd, 6_398);
    assert_eq!(delta.speech_cost_micro_usd, 6_000);
    assert_eq!(delta.text_cost_micro_usd, 398);
    // A list that adds up, and a turn with no response list at all.
    let billed = costing.turn(&usage(json!({
        "promptTokenCount": 100, "responseTokenCount": 0,
        "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 100}]
    })));
    assert!(!billed.mismatch);
    assert_eq!(billed.delta.speech_in_tokens, 100);
    assert_eq!(billed.delta.text_in_tokens, 0);
    // 6,397,500 + 300,000 n$, rounded once.
    assert_eq!(costing.totals().cost_micro_usd, 6_698);
}

#[test]
fn a_total_without_its_list_is_billed_at_the_dearer_rate() {
    let mut costing = Costing::new(DEFAULT_MODEL, &builtin_prices());
    let billed = costing.turn(&usage(
        json!({"promptTokenCount": 10, "responseTokenCount": 5}),
    ));
    assert!(billed.mismatch);
    assert_eq!(billed.delta.speech_in_tokens, 10);
    assert_eq!(billed.delta.speech_out_tokens, 5);
    let mut unpriced = Costing::new("gemini-unknown", &builtin_prices());
    assert!(!unpriced.priced());
    let delta = unpriced
        .turn(&usage(json!({"promptTokenCount": 10,
            "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 10}]})))
        .delta;
    assert_eq!((delta.speech_in_tokens, delta.cost_micro_usd), (10, 0));
}

#[test]
fn configured_prices_replace_one_rate_of_the_model() {
    let builtin = builtin_prices();
    let native = builtin
        .rates("gemini-2.5-flash-native-audio-preview-12-2025")
        .copied()
        .expect("2.5");
    assert_eq!(
        (
            native.text_in,
            native.speech_in,
            native.text_out,
            native.speech_out
        ),
        (500, 3_000, 2_000, 12_000)
    );
    let settings = GeminiLiveSettings::from_config(&GeminiLiveConfig {
        speech_out_usd_per_1k: 0.015,
        text_in_usd_per_1k: 0.0008,
        ..config()
    });
    let rates = settings
        .prices
        .rates(DEFAULT_MODEL)
        .copied()
        .expect("rates");
    assert_eq!(
        (
            rates.text_in,
            rates.speech_in,
            rates.text_out,
            rates.speech_out
        ),
        (800, 3_000, 4_500, 15_000)
    );
    assert!(stamp(&settings.prices, DEFAULT_MODEL).contains("speech_out=15000"));
}

#[test]
fn an_engine_needs_a_credential_and_a_listed_voice() {
    let mut none = GeminiLiveSettings::from_config(&config());
    none.credential = None;
    assert!(GeminiLiveEngine::new(none, None).is_err());
    let mut odd = GeminiLiveSettings::from_config(&config());
    odd.voice = "Lupe".into();
    assert!(GeminiLiveEngine::new(odd, None).is_err());
    let engine =
        GeminiLiveEngine::new(GeminiLiveSettings::from_config(&config()), None).expect("engine");
    assert_eq!(engine.name(), "gemini-live");
    assert_eq!(engine.voices().len(), 8);
    assert!(engine.voices().iter().all(|v| v.language == "mul"));
    assert_eq!(voice_named("kore"), Some("Kore"));
    assert!(engine.paid());
    assert_eq!(engine.busy(), None);
}
