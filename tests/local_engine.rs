//! The real local engine end to end: an eSpeak Spanish question with light
//! noise goes in, a transcript with the question's keywords and a spoken
//! answer from the knowledge base come out. Needs the speech model
//! (scripts/install-model) and espeak-ng; without them the tests say so
//! loudly and skip.

#![allow(
    clippy::unwrap_used,
    reason = "a test helper that fails must fail the test"
)]

mod common;

use std::process::Command;

use common::{folded, model_present, root, spoken};

fn talk(args: &[&str]) -> (String, String, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_sonora"))
        .current_dir(root())
        .arg("talk")
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn talk_answers_a_spoken_spanish_question_from_the_knowledge_base() {
    if !model_present() {
        return;
    }
    let dir = common::scratch::Scratch::new("talk");
    let question = dir.join("q.wav");
    spoken("¿Cuál es el horario de la biblioteca?", &question);
    let (reply, events) = (dir.join("r.wav"), dir.join("e.jsonl"));
    let (stdout, stderr, ok) = talk(&[
        "--input",
        question.to_str().unwrap(),
        "--output",
        reply.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert!(ok, "talk failed: {stderr}\n{stdout}");

    // The last stdout line is the JSON summary.
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["turns"], 1, "{summary}");
    assert_eq!(summary["cost_micro_usd"], 0);
    assert_eq!(summary["latency_ms"].as_array().unwrap().len(), 1);
    assert!(summary["tokens"]["speech_in"].is_u64());

    // Events in order: user transcript, assistant speculative text, audio, final text.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let position = |pred: &dyn Fn(&serde_json::Value) -> bool| lines.iter().position(pred);
    let user =
        position(&|e| e["type"] == "transcript" && e["role"] == "user").expect("user transcript");
    let speculative = position(&|e| {
        e["type"] == "transcript" && e["role"] == "assistant" && e["stage"] == "speculative"
    })
    .expect("assistant speculative text");
    let audio = position(&|e| e["type"] == "audio").expect("reply audio");
    let final_text = position(&|e| {
        e["type"] == "transcript" && e["role"] == "assistant" && e["stage"] == "final"
    })
    .expect("assistant final text");
    assert!(
        user < speculative && speculative < audio && audio < final_text,
        "{lines:?}"
    );
    assert!(
        lines
            .windows(2)
            .all(|w| w[0]["t_ms"].as_u64() <= w[1]["t_ms"].as_u64())
    );

    let heard = folded(lines[user]["text"].as_str().unwrap());
    assert!(heard.contains("biblioteca"), "heard {heard:?}");
    let answer = folded(lines[final_text]["text"].as_str().unwrap());
    assert!(answer.contains("biblioteca"), "answered {answer:?}");

    let wav = sonora::audio::wav::read(&reply).unwrap();
    assert_eq!(wav.rate_hz, 24_000);
    assert!(
        wav.duration_ms() > 1_000,
        "reply of {} ms",
        wav.duration_ms()
    );
    let peak = wav.samples.iter().map(|s| s.unsigned_abs()).max().unwrap();
    assert!(peak > 1_000, "reply audio is silent");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn talk_uses_another_knowledge_base_and_answers_several_turns() {
    if !model_present() {
        return;
    }
    let dir = common::scratch::Scratch::new("talk-kb");
    let kb = dir.join("kb");
    std::fs::create_dir_all(&kb).unwrap();
    std::fs::write(
        kb.join("faq.md"),
        "# Ejemplo\n\n## ¿Dónde está el comedor?\nEl comedor universitario está junto al gimnasio.\n\n\
         ## ¿Qué autobús llega al campus?\nLas líneas de autobús se anuncian en la parada principal.\n\n\
         ## ¿Cómo me apunto a un equipo deportivo?\nLas inscripciones deportivas se hacen en secretaría.\n",
    )
    .unwrap();
    let question = dir.join("q.wav");
    spoken("¿Dónde está el comedor universitario?", &question);
    let one = sonora::audio::wav::read(&question).unwrap();
    let mut two = one.samples.clone();
    two.extend(vec![0i16; 16_000]);
    two.extend(&one.samples);
    let twice = dir.join("twice.wav");
    sonora::audio::wav::write_mono(&twice, 16_000, &two).unwrap();
    let events = dir.join("e.jsonl");
    let (stdout, stderr, ok) = talk(&[
        "--knowledge",
        kb.to_str().unwrap(),
        "--input",
        twice.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert!(ok, "talk failed: {stderr}\n{stdout}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["turns"], 2, "{summary}\n{stdout}");
    let answers: Vec<String> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "transcript" && e["role"] == "assistant" && e["stage"] == "final")
        .map(|e| folded(e["text"].as_str().unwrap()))
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(
        answers.iter().all(|a| a.contains("gimnasio")),
        "{answers:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn talk_without_input_says_what_to_do() {
    let (_, stderr, ok) = talk(&[]);
    assert!(!ok);
    assert!(stderr.contains("--input"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// Speech that starts while the reply is being spoken interrupts it: the
/// engine says `Interrupted`, ends the turn as interrupted, still reports
/// the usage of what was said, and answers the new question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaking_over_the_reply_interrupts_it() {
    use sonora::engine::local::{LocalEngine, LocalSettings};
    use sonora::engine::{ConversationOptions, Engine, EngineEvent, EngineInput, TurnEndReason};

    if !model_present() {
        return;
    }
    let dir = common::scratch::Scratch::new("barge");
    let question = dir.join("q.wav");
    spoken("¿Cuál es el horario de la biblioteca?", &question);
    let speech = sonora::audio::wav::read(&question).unwrap().samples;
    let config = sonora::config::LocalConfig {
        model_dir: root().join("models/whisper-base").display().to_string(),
        knowledge_dir: root().join("knowledge").display().to_string(),
        ..Default::default()
    };
    let engine = LocalEngine::load(&LocalSettings::from_config(&config)).unwrap();
    let options = ConversationOptions {
        language: "es".into(),
        voice: String::new(),
        history: Vec::new(),
    };
    let session = engine.start(options).unwrap();
    // A client reads events while it speaks: the engine's event channel is
    // bounded, and a reader that stops would stall the engine by design.
    let input = session.input;
    let mut engine_events = session.events;
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = engine_events.recv().await {
            if seen_tx.send(event).is_err() {
                break;
            }
        }
    });
    let send = |samples: Vec<i16>| {
        let input = input.clone();
        async move {
            for frame in samples.chunks(320) {
                input
                    .send(EngineInput::Audio(frame.to_vec()))
                    .await
                    .unwrap();
            }
        }
    };
    let guard = std::time::Duration::from_secs(300);
    let conversation = async {
        let mut first = speech.clone();
        first.extend(vec![0i16; 16 * 900]);
        send(first).await;
        // Wait for the reply to start, then talk over it at once.
        let mut events = Vec::new();
        loop {
            let event = seen
                .recv()
                .await
                .expect("the engine closed before replying");
            let audio = matches!(event, EngineEvent::Audio(_));
            events.push(event);
            if audio {
                break;
            }
        }
        let mut second = speech.clone();
        second.extend(vec![0i16; 16 * 900]);
        send(second).await;
        input.send(EngineInput::Close).await.unwrap();
        while let Some(event) = seen.recv().await {
            if event == EngineEvent::Closed {
                break;
            }
            events.push(event);
        }
        events
    };
    let events = tokio::time::timeout(guard, conversation)
        .await
        .expect("the conversation finished within the hang guard");
    let interrupted = events
        .iter()
        .position(|e| matches!(e, EngineEvent::Interrupted { turn_id: 1 }))
        .expect("interrupted");
    // Either the reply was still being made (its turn ends as interrupted,
    // after `Interrupted`), or it was made and only still playing (its turn
    // ended as completed, before `Interrupted`).
    let (ended, reason) = events
        .iter()
        .enumerate()
        .find_map(|(i, e)| match e {
            EngineEvent::TurnEnd { turn_id: 1, reason } => Some((i, *reason)),
            _ => None,
        })
        .expect("turn 1 ended");
    match reason {
        TurnEndReason::Interrupted => assert!(interrupted < ended),
        TurnEndReason::Completed => assert!(ended < interrupted),
        other => panic!("turn 1 ended as {other:?}"),
    }
    let usage_out: u64 = events[..interrupted.max(ended)]
        .iter()
        .filter_map(|e| match e {
            EngineEvent::Usage(u) => Some(u.audio_out_ms),
            _ => None,
        })
        .sum();
    assert!(
        usage_out > 0,
        "the interrupted reply's audio is still counted"
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            EngineEvent::TurnEnd {
                turn_id: 2,
                reason: TurnEndReason::Completed
            }
        )),
        "the second question is answered: {events:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// With the turn-end model, a finished question ends the turn at its first
/// pause; without it, only the hangover does (here 3 s of silence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_end_model_ends_a_finished_question_before_the_hangover() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sonora::engine::local::{LocalEngine, LocalSettings};
    use sonora::engine::{ConversationOptions, Engine, EngineEvent, EngineInput};

    let turn_model = root().join("models/smart-turn/smart-turn-v3.2-cpu.onnx");
    let library = root().join("models/onnxruntime/libonnxruntime.so.1.32.0");
    if !model_present() || !turn_model.is_file() || !library.is_file() {
        eprintln!("\n*** SKIPPED: needs scripts/install-turn-model ***\n");
        return;
    }
    let dir = common::scratch::Scratch::new("turn-end");
    let question = dir.join("q.wav");
    spoken("¿Cuál es el horario de la biblioteca?", &question);
    let mut speech = sonora::audio::wav::read(&question).unwrap().samples;
    // Only the speech: the silence after it is fed at real time below.
    let end = speech.iter().rposition(|s| s.unsigned_abs() > 200).unwrap();
    speech.truncate(end + 1);

    // Silence fed (in 20 ms frames, at real time) when the turn ended.
    async fn silence_before_the_end(engine: &LocalEngine, speech: &[i16]) -> Option<usize> {
        let options = ConversationOptions {
            language: "es".into(),
            voice: String::new(),
            history: Vec::new(),
        };
        let mut session = engine.start(options).unwrap();
        let silent_frames = Arc::new(AtomicUsize::new(0));
        let mut feeder = tokio::spawn({
            let input = session.input.clone();
            let speech = speech.to_vec();
            let silent_frames = Arc::clone(&silent_frames);
            async move {
                for frame in speech.chunks(320) {
                    input.send(EngineInput::Audio(frame.to_vec())).await.ok();
                }
                let mut pace = tokio::time::interval(std::time::Duration::from_millis(20));
                for _ in 0..100 {
                    pace.tick().await;
                    if input.send(EngineInput::Audio(vec![0; 320])).await.is_err() {
                        break;
                    }
                    silent_frames.fetch_add(1, Ordering::AcqRel);
                }
            }
        });
        // Past the silence (and a second more for a verdict still running)
        // nothing can end the turn: no more audio comes.
        let mut guard = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut fed = false;
        let ended = loop {
            tokio::select! {
                _ = &mut feeder, if !fed => {
                    fed = true;
                    guard = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
                }
                event = tokio::time::timeout_at(guard, session.events.recv()) => match event {
                    Ok(Some(EngineEvent::SpeechEnded { .. })) => {
                        break Some(silent_frames.load(Ordering::Acquire) * 20);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break None,
                },
            }
        };
        feeder.abort();
        ended
    }

    let mut config = sonora::config::LocalConfig {
        model_dir: root().join("models/whisper-base").display().to_string(),
        knowledge_dir: root().join("knowledge").display().to_string(),
        turn_model: turn_model.display().to_string(),
        onnxruntime_library: library.display().to_string(),
        vad_hangover_ms: 3_000,
        ..Default::default()
    };
    let with_model = LocalEngine::load(&LocalSettings::from_config(&config)).unwrap();
    let ended = silence_before_the_end(&with_model, &speech).await;
    let ended = ended.expect("the turn ended within the 2 s of silence sent");
    assert!(ended < 1_500, "the turn ended after {ended} ms of silence");

    config.turn_model = String::new();
    let without = LocalEngine::load(&LocalSettings::from_config(&config)).unwrap();
    assert_eq!(
        silence_before_the_end(&without, &speech).await,
        None,
        "without the model the 3 s hangover is not over after 2 s"
    );
    std::fs::remove_dir_all(&dir).ok();
}
