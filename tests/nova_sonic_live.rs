//! A live smoke test against real Amazon Nova Sonic. Ignored by default; run
//! it with AWS credentials that may call the model:
//!
//! ```text
//! AWS_PROFILE=… AWS_REGION=us-east-1 cargo test --test nova_sonic_live -- --ignored --nocapture
//! ```
//!
//! It speaks the recorded Spanish fixture, waits for the reply and checks
//! that transcripts, audio and a priced usage came back.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

use std::time::{Duration, Instant};

use sonora::config::NovaSonicConfig;
use sonora::engine::nova_sonic::{NovaSonicEngine, NovaSonicSettings};
use sonora::engine::{ConversationOptions, Engine, EngineEvent, EngineInput, Role, Stage};
use sonora::usage::UsageDelta;

fn credentials_present() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
        || std::path::Path::new(&format!(
            "{}/.aws/credentials",
            std::env::var("HOME").unwrap_or_default()
        ))
        .is_file()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AWS credentials and network access to Bedrock"]
async fn a_spanish_question_gets_a_spoken_priced_answer() {
    assert!(
        credentials_present(),
        "no AWS credentials in the environment or ~/.aws"
    );
    let mut config = NovaSonicConfig::default();
    if let Ok(region) = std::env::var("AWS_REGION") {
        config.region = region;
    }
    let settings = NovaSonicSettings::from_config(&config);
    let engine = NovaSonicEngine::connect(settings, None).await.unwrap();
    let session = engine
        .start(ConversationOptions {
            language: "es".into(),
            voice: String::new(),
            history: Vec::new(),
        })
        .unwrap();
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/espeak_es_16k.wav");
    let wav = sonora::audio::wav::read(&path).unwrap();
    assert_eq!(wav.rate_hz, 16_000);

    let (input, mut events) = (session.input, session.events);
    let feeder = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(32));
        for frame in wav.samples.chunks(512) {
            tick.tick().await;
            if input
                .send(EngineInput::Audio(frame.to_vec()))
                .await
                .is_err()
            {
                return None;
            }
        }
        Some(input)
    });
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut usage = UsageDelta::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        if let EngineEvent::Usage(d) = &event {
            usage.add(d);
        }
        let done = matches!(event, EngineEvent::TurnEnd { .. } | EngineEvent::Closed);
        if !matches!(event, EngineEvent::Audio(_)) {
            println!("{:>6} ms {event:?}", started.elapsed().as_millis());
        }
        seen.push(event);
        if done {
            break;
        }
    }
    if let Ok(Some(input)) = feeder.await {
        let _ = input.send(EngineInput::Close).await;
    }
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        if let EngineEvent::Usage(d) = &event {
            usage.add(d);
        }
        if matches!(event, EngineEvent::Closed) {
            break;
        }
    }
    let user = seen.iter().any(|e| {
        matches!(
            e,
            EngineEvent::Transcript {
                role: Role::User,
                ..
            }
        )
    });
    let answer = seen.iter().any(|e| {
        matches!(
            e,
            EngineEvent::Transcript {
                role: Role::Assistant,
                stage: Stage::Final,
                ..
            }
        )
    });
    let audio: usize = seen
        .iter()
        .map(|e| match e {
            EngineEvent::Audio(p) => p.samples.len(),
            _ => 0,
        })
        .sum();
    println!("usage: {usage:?}");
    assert!(user, "the question was transcribed");
    assert!(answer, "an answer was spoken");
    assert!(audio > 24_000 / 2, "at least half a second of reply audio");
    assert!(usage.speech_in_tokens > 0 && usage.speech_out_tokens > 0);
    assert!(usage.cost_micro_usd > 0);
}
