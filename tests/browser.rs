//! A real browser talks to Sonora: Debian's Chromium, driven by
//! playwright-core (tests/browser/*.mjs), with a fake microphone playing
//! spoken Spanish, against a gateway running the real local engine: a
//! question about the library through the AudioWorklet capture path, and
//! the recorded-fixture sentence forced through MediaRecorder (WebM Opus).
//! A typed conversation with a scripted engine shows a client-side tool call,
//! an engine hand-off and a barge-in (one whose connection drops is in
//! `tests/resume.rs`). Every run checks that each of the
//! page's modules loaded and that the conversation closed what it opened
//! (the player's AudioContext, the capture's context, stream and recorder).
//! Screenshots land in target/browser/. Two more tests run page modules
//! under Node alone: the capture worklet, and the protocol and text modules.
//!
//! Needs chromium, node with tests/browser/node_modules, the speech model
//! and espeak-ng (scripts/setup --browser installs them; the scripted run
//! needs no model). Without them the
//! test says so loudly and skips, unless REQUIRE_BROWSER_TEST=1 (set by
//! scripts/test), which makes a missing piece a failure.

#![allow(
    clippy::unwrap_used,
    reason = "a test helper that fails must fail the test"
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::browser::{
    check_closed, check_page, line, one_browser, run_node, tone_frame, typed_question,
};
use common::gateway::start;
use common::{folded, model_present, root, spoken_at};
use serde_json::json;
use sonora::config::Config;
use sonora::engine::local::{LocalEngine, LocalSettings};
use sonora::engine::scripted::{ScriptedEngine, Step};
use sonora::engine::{EngineEvent, Role, Stage, TurnEndReason};

/// What each capture path is asked, and the words its transcript must hold
/// (at least `enough` of them: eSpeak's voice through Chromium's audio
/// processing and the base model sometimes loses a word of a sentence).
struct Question {
    wav: std::path::PathBuf,
    keywords: &'static [&'static str],
    enough: usize,
    /// The answer must come from the knowledge base's library entry.
    about_the_library: bool,
}

/// Speech, then ten seconds of room noise, so that the answer plays out
/// before the fake microphone loops back to the start.
fn padded(mut samples: Vec<i16>, path: std::path::PathBuf) -> std::path::PathBuf {
    let mut state = 99u64;
    samples.extend((0..160_000).map(|_| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        ((state >> 33) % 201) as i16 - 100
    }));
    sonora::audio::wav::write_mono(&path, 16_000, &samples).unwrap();
    path
}

/// Phrasings the base Whisper model hears nearly word for word through
/// Chromium's audio processing: PCM for the worklet path, Opus at 96
/// kbit/s for the recorder path (the recorded-fixture sentence).
fn questions(dir: &Path) -> [(&'static str, Question); 2] {
    let spoken_path = dir.join("spoken.wav");
    spoken_at(
        "Quiero saber el horario de la biblioteca.",
        140,
        &spoken_path,
    );
    let library = sonora::audio::wav::read(&spoken_path).unwrap().samples;
    let fixture = root().join("tests/fixtures/espeak_es_16k.wav");
    let test_sentence = sonora::audio::wav::read(&fixture).unwrap().samples;
    [
        (
            "worklet",
            Question {
                wav: padded(library, dir.join("library.wav")),
                keywords: &["biblioteca"],
                enough: 1,
                about_the_library: true,
            },
        ),
        (
            "recorder",
            Question {
                wav: padded(test_sentence, dir.join("test-sentence.wav")),
                // "Hola, esta es una prueba de reconocimiento de voz en tiempo real."
                keywords: &["prueba", "voz", "reconoc", "tiempo"],
                enough: 2,
                about_the_library: false,
            },
        ),
    ]
}

/// One run of a script in tests/browser/ against the page: the page's final
/// state, or what went wrong with the page's last state.
/// One spoken conversation in Chromium.
fn run_browser(url: &str, wav: &Path, mode: &str) -> Result<serde_json::Value, String> {
    run_node("talk.mjs", &[url, wav.to_str().unwrap(), mode], mode)
}

/// The final text of one role on the page, folded.
fn said(result: &serde_json::Value, role: &str) -> String {
    result["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["role"] == role && l["stage"] == "final")
        .map(|l| folded(l["text"].as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn heard_enough(result: &serde_json::Value, question: &Question) -> bool {
    let heard = said(result, "user");
    let found = question.keywords.iter().filter(|k| heard.contains(*k));
    found.count() >= question.enough
}

fn check(result: &serde_json::Value, mode: &str, question: &Question) {
    assert_eq!(result["mode"], mode, "{result:#}");
    assert!(heard_enough(result, question), "{mode}: heard {result:#}");
    let answer = said(result, "assistant");
    assert!(!answer.trim().is_empty(), "{mode}: no answer {result:#}");
    if question.about_the_library {
        assert!(answer.contains("biblioteca"), "{mode}: answered {result:#}");
    }
    let rate = result["playbackRate"].as_f64().unwrap();
    let played = result["playedSamples"].as_f64().unwrap();
    assert!(played > rate * 0.5, "{mode}: played {played} samples");
    let latency = result["latenciesMs"][0].as_f64().unwrap();
    assert!(
        (0.0..15_000.0).contains(&latency),
        "{mode}: latency {latency} ms"
    );
    // The page's own figure: its last voiced capture frame to the first
    // reply sample at the speaker (output latency included).
    eprintln!("{mode}: the page measured {latency:.0} ms from the end of speech to the reply");
    assert_ne!(result["latencyShown"], "—");
    assert!(
        result["metrics"].as_str().unwrap().contains(" ms"),
        "{result:#}"
    );
    assert_eq!(result["end"]["reason"], "client_stopped", "{result:#}");
    // The worklet sends 16 kHz PCM; the recorder sends Opus in WebM.
    let format = if mode == "worklet" { "pcm16" } else { "webm" };
    assert_eq!(result["end"]["summary"]["decoder"]["format"], format);
    check_page(result);
    check_closed(result, true);
    if mode == "recorder" {
        assert_eq!(result["audio"]["recorder"], "inactive", "{result:#}");
    }
    let fatal: Vec<_> = result["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["fatal"] == true)
        .collect();
    assert!(fatal.is_empty(), "{mode}: {fatal:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_talks_through_the_worklet_and_the_media_recorder() {
    let model = (!model_present()).then(|| "the speech model or espeak-ng is missing".to_owned());
    let Some(_one_browser) = one_browser(model).await else {
        return;
    };
    let config = sonora::config::LocalConfig {
        model_dir: root().join("models/whisper-base").display().to_string(),
        knowledge_dir: root().join("knowledge").display().to_string(),
        // Leave a core to Chromium: a starved capture thread garbles the
        // fake microphone's audio.
        asr_threads: 1,
        ..Default::default()
    };
    let engine = LocalEngine::load(&LocalSettings::from_config(&config)).unwrap();
    let gateway = start(&Config::default(), Some(Arc::new(engine))).await;
    let dir = common::scratch::Scratch::new("browser");
    let url = gateway.url("");
    let mut conversations = 0.0;
    for (mode, question) in questions(&dir) {
        // The recogniser (Whisper base on a synthetic voice) sometimes
        // mishears a whole question; one more try is allowed for that alone.
        let mut result = serde_json::Value::Null;
        for attempt in 1..=2 {
            let (url, wav) = (url.clone(), question.wav.clone());
            let run = tokio::task::spawn_blocking(move || run_browser(&url, &wav, mode));
            result = match run.await.unwrap() {
                Ok(result) => result,
                // The server's side of the story, for the failure message.
                Err(failure) => panic!("{failure}\nserver metrics:\n{}", gateway.metrics().await),
            };
            conversations += 1.0;
            if heard_enough(&result, &question) {
                break;
            }
            eprintln!(
                "{mode}: attempt {attempt} misheard: {:?}",
                said(&result, "user")
            );
        }
        check(&result, mode, &question);
        eprintln!("{mode}: {result}");
    }
    let metrics = gateway.metrics_when_active(0.0).await;
    let sessions = common::gateway::metric(&metrics, "sonora_sessions_total");
    assert_eq!(sessions, conversations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_a_tool_call_an_engine_hand_off_and_a_barge_in() {
    let Some(_one_browser) = one_browser(None).await else {
        return;
    };
    let question = "¿Me muestras el mapa de la biblioteca?";
    let transcript = |role, text: &str| line(role, text, 1);
    let mut script = typed_question(question);
    script.extend([
        Step::Emit(EngineEvent::ToolCall {
            id: "call-7".into(),
            name: "abrir_mapa".into(),
            json: json!({"edificio": "biblioteca"}),
        }),
        Step::Sleep(Duration::from_millis(300)),
        Step::Emit(EngineEvent::Rotated {
            generation: 2,
            gap_ms: 40.0,
        }),
        transcript(Role::Assistant, "La biblioteca está junto a la plaza."),
    ]);
    script.extend((0..8).map(|_| Step::Emit(tone_frame())));
    script.push(Step::Emit(EngineEvent::TurnEnd {
        turn_id: 1,
        reason: TurnEndReason::Completed,
    }));
    // A second reply, cut short by the user (barge-in) once it started.
    script.push(Step::Sleep(Duration::from_secs(1)));
    script.push(Step::Emit(EngineEvent::Transcript {
        role: Role::Assistant,
        text: "Y además, la cafetería abre a las siete.".into(),
        stage: Stage::Final,
        turn_id: 2,
    }));
    script.extend((0..30).map(|_| Step::Emit(tone_frame())));
    script.push(Step::Sleep(Duration::from_millis(300)));
    script.push(Step::Emit(EngineEvent::Interrupted { turn_id: 2 }));
    script.push(Step::Emit(EngineEvent::TurnEnd {
        turn_id: 2,
        reason: TurnEndReason::Interrupted,
    }));
    let engine = ScriptedEngine::new(script);
    let gateway = start(&Config::default(), Some(Arc::new(engine.clone()))).await;
    let url = gateway.url("");
    let run = tokio::task::spawn_blocking(move || {
        run_node("events.mjs", &[&url, question], "tool-and-hand-off")
    });
    let result = match run.await.unwrap() {
        Ok(result) => result,
        Err(failure) => panic!("{failure}\nserver metrics:\n{}", gateway.metrics().await),
    };
    eprintln!("tool and hand-off: {result}");

    // Shown as notes in the transcript, in Spanish, then in English.
    let notes = |language: &str| -> Vec<(String, String, String)> {
        result[language]["notes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                let field = |name: &str| n[name].as_str().unwrap().to_owned();
                (field("kind"), field("who"), field("text"))
            })
            .collect()
    };
    let spanish = notes("spanish");
    let english = notes("english");
    assert_eq!(spanish.len(), 2, "{result:#}");
    assert_eq!(english.len(), 2, "{result:#}");
    let (kind, who, text) = &spanish[0];
    assert_eq!((kind.as_str(), who.as_str()), ("tool", "Herramienta"));
    assert!(text.contains("«abrir_mapa»"), "{text}");
    assert!(text.contains(r#"{"edificio":"biblioteca"}"#), "{text}");
    let (kind, who, text) = &spanish[1];
    assert_eq!((kind.as_str(), who.as_str()), ("rotated", "Conexión"));
    assert!(
        text.contains("generación 2") && text.contains("40 ms"),
        "{text}"
    );
    let (_, who, text) = &english[0];
    assert_eq!(who, "Tool");
    assert!(text.contains("“abrir_mapa”"), "{text}");
    let (_, who, text) = &english[1];
    assert_eq!(who, "Connection");
    assert!(
        text.contains("generation 2") && text.contains("40 ms"),
        "{text}"
    );
    assert_eq!(result["spanish"]["talkLabel"], "Detener");
    assert_eq!(result["english"]["talkLabel"], "Stop");
    assert_eq!(result["talkLabel"], "Talk", "{result:#}");
    assert_eq!(result["rotationsShown"], "1 (last: 40 ms)");
    assert_eq!(result["toolCalls"], 1);
    assert_eq!(result["rotations"], 1);

    // The page answered the tool call: it runs no tools.
    let received = engine.received();
    assert_eq!(received.texts, [question]);
    let [(id, answer)] = received.tool_results.as_slice() else {
        panic!("tool results: {:?}", received.tool_results);
    };
    assert_eq!(id, "call-7");
    assert_eq!(answer["error"], "unavailable");

    // The second reply was cut: marked so, and its unplayed audio dropped
    // (3 s of it arrived; about 0.3 s played before `interrupted`).
    let lines = result["transcript"].as_array().unwrap();
    let cut: Vec<_> = lines.iter().filter(|l| l["cut"] == true).collect();
    assert_eq!(cut.len(), 1, "{result:#}");
    assert!(cut[0]["text"].as_str().unwrap().contains("cafetería"));
    assert_eq!(cut[0]["mark"], "interrupted", "{result:#}");
    let received = result["receivedSamples"].as_f64().unwrap();
    assert!(
        result["playedSamples"].as_f64().unwrap() < received - 24_000.0,
        "{result:#}"
    );

    // The reply played, timed from the typed question; the conversation
    // ended, and the player was closed.
    assert!(result["playedSamples"].as_f64().unwrap() > 0.0);
    assert_eq!(
        result["latenciesMs"].as_array().unwrap().len(),
        1,
        "{result:#}"
    );
    assert_ne!(result["latencyShown"], "—");
    assert_eq!(result["end"]["reason"], "client_stopped", "{result:#}");
    assert_eq!(result["mode"], "text-only");
    check_page(&result);
    check_closed(&result, false);
}

/// The capture worklet outside a browser (tests/browser/worklet.mjs): it
/// resamples a 1 kHz tone to 16 kHz from 48, 44.1 and 16 kHz contexts,
/// reuses two frame buffers when the page hands each back, drops and counts
/// frames once the page hands none back, and constructs no array in
/// `process()`.
#[test]
fn the_capture_worklet_resamples_into_a_fixed_pool() {
    let Some(out) = node("worklet.mjs", &root().join("web/capture-worklet.js")) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for (name, count) in result["allocations"].as_object().unwrap() {
        assert_eq!(count, 0, "{name} constructed in process(): {result}");
    }
    let runs = result["runs"].as_array().unwrap();
    for run in runs {
        // 2 s in: 32,000 samples at 16 kHz, 100 frames of 320 (44.1 kHz
        // ends 8 input samples short of the last one).
        let rate = run["rate"].as_u64().unwrap();
        let whole = run["inputSamples"].as_u64().unwrap() * 16_000 / rate / 320;
        assert_eq!(run["frameSamples"], 320, "{run}");
        // The tone keeps its pitch (2 zero crossings a cycle) and, through
        // the anti-alias low-pass, nearly all its level (0.5 peak, 0.354 RMS).
        let crossings = run["crossingsPerSecond"].as_f64().unwrap();
        assert!((1_990.0..2_010.0).contains(&crossings), "{run}");
        let rms = run["rms"].as_f64().unwrap();
        assert!((0.33..0.36).contains(&rms), "{run}");
        if run == &runs[3] {
            // Nothing handed back: the 50 pooled frames go out, the next 50
            // are dropped, and the count is reported once a frame comes back.
            assert_eq!(run["frames"], 50, "{run}");
            assert_eq!(run["distinctBuffers"], 50, "{run}");
            assert_eq!(run["reports"], json!([{"dropped": whole - 50}]), "{run}");
        } else {
            assert_eq!(run["frames"], whole, "{run}");
            assert!(run["distinctBuffers"].as_u64().unwrap() <= 2, "{run}");
            assert_eq!(run["reports"], json!([]), "{run}");
        }
    }
}

/// The page's modules that need no browser, under Node
/// (tests/browser/modules.mjs): server messages read or ignored by shape,
/// the hello, the language choice, and every word in both languages.
#[test]
fn the_protocol_and_text_modules_hold_under_node() {
    let Some(out) = node("modules.mjs", &root().join("web")) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// Runs `tests/browser/SCRIPT ARG` under Node; `None` (the test skipped)
/// when Node is missing, unless `REQUIRE_BROWSER_TEST=1`.
fn node(script: &str, arg: &Path) -> Option<std::process::Output> {
    let required = std::env::var("REQUIRE_BROWSER_TEST").is_ok_and(|v| v == "1");
    let version = Command::new("node").arg("--version").output();
    if !version.is_ok_and(|o| o.status.success()) {
        assert!(!required, "{script} cannot run: node is missing");
        eprintln!("\n\n*** SKIPPED: {script} needs node ***\n");
        return None;
    }
    let out = Command::new("node")
        .arg(root().join("tests/browser").join(script))
        .arg(arg)
        .output()
        .unwrap();
    Some(out)
}
