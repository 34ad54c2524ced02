//! Nova Sonic stream hand-over, warm against cold, in one run:
//! `cargo bench --bench rotation`.
//!
//! Both run the real engine and SDK against the Bedrock-compatible test
//! endpoint while numbered frames of user audio stream in real time:
//! - warm: the rotation (next stream opened in the background, switch when
//!   the assistant has finished), every ~2 s instead of 6 minutes;
//! - cold (the baseline): the stream is cut by a model timeout and the
//!   conversation reopens on a new one at once (a resume after the fact).
//!
//! The endpoint takes `SETUP_DELAY` to set up each stream after its
//! `sessionStart`, standing in for the service's session set-up (not
//! documented; an assumption): the warm hand-off pays it in the background,
//! the cold resume in the conversation.
//!
//! For each hand-over it prints the time between the old stream's last
//! audio event and the new stream's first as the endpoint saw them (the
//! 32 ms frame cadence included), the engine's own hand-off time, and how
//! many numbered frames never reached any stream.

#![allow(clippy::unwrap_used, reason = "a benchmark that fails must stop")]

#[path = "../tests/common/bedrock.rs"]
mod bedrock;
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bedrock::{Endpoint, Script, Turn};
use sonora::config::NovaSonicConfig;
use sonora::engine::nova_sonic::{NovaSonicEngine, NovaSonicSettings, StaticCredentials};
use sonora::engine::{ConversationOptions, Engine, EngineEvent, EngineInput};

const MARKERS: u64 = 400;
const SETUP_DELAY: Duration = Duration::from_millis(300);

struct Outcome {
    wire_gaps_ms: Vec<f64>,
    engine_gaps_ms: Vec<f64>,
    lost: usize,
}

async fn run(warm: bool) -> Outcome {
    let script = Script {
        turns: vec![Turn::new(
            "¿Cuál es el horario?",
            "De ocho a veintidós.",
            600,
        )],
        setup_delay: Some(SETUP_DELAY),
        ..Script::default()
    };
    // Cold: the first stream times out once; the next one lives on.
    let first = Script {
        max_age: (!warm).then_some(Duration::from_millis(3_000)),
        ..script.clone()
    };
    let endpoint = Endpoint::start(vec![first, script]).await;
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
        access_key_id: "AKIDSONORABENCH".into(),
        secret_access_key: "not-a-real-secret".into(),
        session_token: None,
    });
    settings.rotate_after = Duration::from_secs(if warm { 1 } else { 400 });
    settings.handoff_wait = Duration::from_secs(1);
    let engine = NovaSonicEngine::connect(settings, None).await.unwrap();
    let session = engine
        .start(ConversationOptions {
            language: "es".into(),
            voice: String::new(),
            history: Vec::new(),
        })
        .unwrap();
    let mut events = session.events;
    let collector = tokio::spawn(async move {
        let mut gaps = Vec::new();
        while let Some(event) = events.recv().await {
            match event {
                EngineEvent::Rotated { gap_ms, .. } => gaps.push(gap_ms),
                EngineEvent::Closed => break,
                _ => {}
            }
        }
        gaps
    });
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for k in 0..40u64 {
        tick.tick().await;
        let tone = (0..320)
            .map(|i| {
                let t = (k * 320 + i) as f64 / 16_000.0;
                ((t * 300.0 * std::f64::consts::TAU).sin() * 8_000.0) as i16
            })
            .collect();
        session.input.send(EngineInput::Audio(tone)).await.unwrap();
    }
    for k in 0..MARKERS {
        tick.tick().await;
        let frame = vec![(k + 1) as i16; 320];
        session.input.send(EngineInput::Audio(frame)).await.unwrap();
    }
    session.input.send(EngineInput::Close).await.unwrap();
    let engine_gaps_ms = collector.await.unwrap();

    let connections = endpoint.connections();
    let mut count = vec![0usize; MARKERS as usize + 1];
    for c in &connections {
        for &s in &c.audio {
            if (1..=MARKERS as i16).contains(&s) {
                count[s as usize] += 1;
            }
        }
    }
    let missing: Vec<usize> = (1..=MARKERS as usize).filter(|&v| count[v] < 320).collect();
    if !missing.is_empty() {
        eprintln!("missing frames: {missing:?}");
    }
    let lost = missing.len();
    let wire_gaps_ms = connections
        .windows(2)
        .filter_map(|w| {
            let (end, start) = (w[0].last_audio_at?, w[1].first_audio_at?);
            Some(start.saturating_duration_since(end).as_secs_f64() * 1e3)
        })
        .collect();
    Outcome {
        wire_gaps_ms,
        engine_gaps_ms,
        lost,
    }
}

fn summary(values: &[f64]) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    let all: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
    format!(
        "median {median:.1} ms, max {:.1} ms (n = {}: {})",
        v[v.len() - 1],
        v.len(),
        all.join(" ")
    )
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let rounds = 3;
    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        warm.push(runtime.block_on(run(true)));
        cold.push(runtime.block_on(run(false)));
    }
    let all = |o: &[Outcome], f: fn(&Outcome) -> &Vec<f64>| -> Vec<f64> {
        o.iter().flat_map(|x| f(x).iter().copied()).collect()
    };
    let (warm_wire, cold_wire) = (
        all(&warm, |o| &o.wire_gaps_ms),
        all(&cold, |o| &o.wire_gaps_ms),
    );
    let warm_engine = all(&warm, |o| &o.engine_gaps_ms);
    let lost = |o: &[Outcome]| o.iter().map(|x| x.lost).sum::<usize>();
    println!(
        "Nova Sonic hand-over, {rounds} conversations each, {MARKERS} numbered 20 ms frames each, {} ms stream set-up at the endpoint",
        SETUP_DELAY.as_millis()
    );
    println!(
        "warm rotation: wire gap {}; hand-off {}; frames lost {}",
        summary(&warm_wire),
        summary(&warm_engine),
        lost(&warm)
    );
    println!(
        "cold resume (baseline): wire gap {}; frames lost {}",
        summary(&cold_wire),
        lost(&cold)
    );
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!(
        "ratio cold/warm wire gap (median): {:.2}; goal: hand-off ≤ 50 ms and no frame lost: {}",
        median(&cold_wire) / median(&warm_wire),
        if warm_engine.iter().all(|g| *g <= 50.0) && lost(&warm) == 0 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!("({:.1} s)", started.elapsed().as_secs_f64());
}
