//! A real browser talks to Sonora: Debian's Chromium, driven by
//! playwright-core (tests/browser/talk.mjs), with a fake microphone playing
//! spoken Spanish, against a gateway running the real local engine: a
//! question about the library through the AudioWorklet capture path, and
//! the recorded-fixture sentence forced through MediaRecorder (WebM Opus).
//! Screenshots land in target/browser/.
//!
//! Needs chromium, node with tests/browser/node_modules, the speech model
//! and espeak-ng (scripts/setup --browser installs them). Without them the
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

use common::gateway::start;
use common::{folded, model_present, root, spoken_at};
use sonora::config::Config;
use sonora::engine::local::{LocalEngine, LocalSettings};

fn browser_present() -> Result<(), String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Err(format!("{chromium} is missing (apt-get install chromium)"));
    }
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is missing".into());
    }
    if !root()
        .join("tests/browser/node_modules/playwright-core")
        .is_dir()
    {
        return Err("tests/browser/node_modules is missing (npm ci --prefix tests/browser)".into());
    }
    Ok(())
}

/// What each capture path is asked, and the words its transcript must hold.
struct Question {
    wav: std::path::PathBuf,
    keywords: &'static [&'static str],
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

/// Phrasings the base Whisper model hears right, run after run, through
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
                about_the_library: true,
            },
        ),
        (
            "recorder",
            Question {
                wav: padded(test_sentence, dir.join("test-sentence.wav")),
                keywords: &["prueba", "voz"],
                about_the_library: false,
            },
        ),
    ]
}

/// One conversation in Chromium: the page's final state, or what went
/// wrong with the page's last state.
fn run_browser(url: &str, wav: &Path, mode: &str) -> Result<serde_json::Value, String> {
    let shots = root().join("target/browser");
    std::fs::create_dir_all(&shots).unwrap();
    let screenshot = shots.join(format!("{mode}.png"));
    let out = Command::new("node")
        .arg(root().join("tests/browser/talk.mjs"))
        .args([
            url,
            wav.to_str().unwrap(),
            mode,
            screenshot.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    let Ok(result) = serde_json::from_str::<serde_json::Value>(last) else {
        return Err(format!(
            "{mode}: no result\nstdout: {stdout}\nstderr: {stderr}"
        ));
    };
    if !out.status.success() {
        return Err(format!(
            "{mode}: the browser run failed: {result:#}\nstderr: {stderr}"
        ));
    }
    assert!(screenshot.is_file());
    Ok(result)
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

fn heard_all(result: &serde_json::Value, question: &Question) -> bool {
    let heard = said(result, "user");
    question.keywords.iter().all(|k| heard.contains(k))
}

fn check(result: &serde_json::Value, mode: &str, question: &Question) {
    assert_eq!(result["mode"], mode, "{result:#}");
    assert!(heard_all(result, question), "{mode}: heard {result:#}");
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
    assert_ne!(result["latencyShown"], "—");
    assert!(
        result["metrics"].as_str().unwrap().contains(" ms"),
        "{result:#}"
    );
    assert_eq!(result["end"]["reason"], "client_stopped", "{result:#}");
    // The worklet sends 16 kHz PCM; the recorder sends Opus in WebM.
    let format = if mode == "worklet" { "pcm16" } else { "webm" };
    assert_eq!(result["end"]["summary"]["decoder"]["format"], format);
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
    let required = std::env::var("REQUIRE_BROWSER_TEST").is_ok_and(|v| v == "1");
    let missing = browser_present().err().or_else(|| {
        (!model_present()).then(|| "the speech model or espeak-ng is missing".to_owned())
    });
    if let Some(missing) = missing {
        assert!(!required, "the browser test cannot run: {missing}");
        eprintln!("\n\n*** SKIPPED: the browser test needs {missing} ***\n");
        return;
    }
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
    let dir = std::env::temp_dir().join(format!("sonora-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
            if heard_all(&result, &question) {
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
    std::fs::remove_dir_all(&dir).ok();
}
