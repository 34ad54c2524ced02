//! Debian's Chromium driven by playwright-core (tests/browser/*.mjs): one
//! browser at a time, the scripts run as processes, and the checks every
//! page run shares.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use sonora::engine::scripted::Step;
use sonora::engine::{EngineEvent, Pcm, Role, Stage};
use tokio::sync::MutexGuard;

use super::root;

/// One Chromium at a time: two on these cores starve the fake microphone.
pub static CHROMIUM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The page's ES modules. (Worklet fetches are not seen by playwright; that
/// they loaded shows in the capture mode and the playback path.)
pub const MODULES: [&str; 5] = [
    "/app.js",
    "/text.js",
    "/protocol.js",
    "/player.js",
    "/capture.js",
];

pub fn browser_present() -> Result<(), String> {
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

/// The browser's turn, or `None` (the test skips, loudly) when Chromium,
/// Node, playwright-core or `also_missing` is missing; with
/// `REQUIRE_BROWSER_TEST=1` a missing piece fails the test instead.
pub async fn one_browser(also_missing: Option<String>) -> Option<MutexGuard<'static, ()>> {
    let required = std::env::var("REQUIRE_BROWSER_TEST").is_ok_and(|v| v == "1");
    if let Some(missing) = browser_present().err().or(also_missing) {
        assert!(!required, "the browser test cannot run: {missing}");
        eprintln!("\n\n*** SKIPPED: the browser test needs {missing} ***\n");
        return None;
    }
    Some(CHROMIUM.lock().await)
}

pub fn run_node(script: &str, args: &[&str], shot: &str) -> Result<serde_json::Value, String> {
    let shots = root().join("target/browser");
    std::fs::create_dir_all(&shots).unwrap();
    let screenshot = shots.join(format!("{shot}.png"));
    let out = Command::new("node")
        .arg(root().join("tests/browser").join(script))
        .args(args)
        .arg(&screenshot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    let Ok(result) = serde_json::from_str::<serde_json::Value>(last) else {
        return Err(format!(
            "{shot}: no result\nstdout: {stdout}\nstderr: {stderr}"
        ));
    };
    if !out.status.success() {
        return Err(format!(
            "{shot}: the browser run failed: {result:#}\nstderr: {stderr}"
        ));
    }
    assert!(screenshot.is_file());
    Ok(result)
}

/// Every module loaded, as JavaScript, with no page error; automation sees
/// the narrow hook only.
pub fn check_page(result: &serde_json::Value) {
    let scripts = result["scripts"].as_array().unwrap();
    for module in MODULES {
        let loads: Vec<_> = scripts.iter().filter(|s| s["path"] == *module).collect();
        assert!(!loads.is_empty(), "{module} never loaded: {result:#}");
        for load in loads {
            assert_eq!(load["status"], 200, "{module}: {load}");
            let kind = load["type"].as_str().unwrap_or_default();
            assert!(kind.starts_with("text/javascript"), "{module}: {load}");
        }
    }
    assert_eq!(result["pageErrors"], json!([]), "{result:#}");
    assert_eq!(result["hook"], json!(["facts"]), "{result:#}");
    assert_eq!(result["hookFrozen"], true);
}

/// Open while the conversation ran; closed once it ended.
pub fn check_closed(result: &serde_json::Value, captured: bool) {
    assert_eq!(result["during"]["player"], "running", "{result:#}");
    assert_eq!(result["audio"]["playback"], "worklet", "{result:#}");
    let audio = &result["audio"];
    assert_eq!(audio["player"], "closed", "{result:#}");
    assert_eq!(result["running"], false);
    if captured {
        assert_eq!(result["during"]["capture"], "running", "{result:#}");
        assert_eq!(result["during"]["tracks"], "live", "{result:#}");
        assert_eq!(audio["capture"], "closed", "{result:#}");
        assert_eq!(audio["tracks"], "ended", "{result:#}");
    } else {
        assert_eq!(audio["capture"], serde_json::Value::Null, "{result:#}");
    }
}

/// 100 ms of a 440 Hz tone at 24 kHz.
pub fn tone_frame() -> EngineEvent {
    let samples = (0..2_400)
        .map(|i| {
            let phase = i as f32 * 440.0 * std::f32::consts::TAU / 24_000.0;
            (phase.sin() * 6_000.0) as i16
        })
        .collect();
    EngineEvent::Audio(Pcm {
        rate_hz: 24_000,
        samples,
    })
}

/// A final transcript line of turn `turn_id`.
pub fn line(role: Role, text: &str, turn_id: u64) -> Step {
    Step::Emit(EngineEvent::Transcript {
        role,
        text: text.into(),
        stage: Stage::Final,
        turn_id,
    })
}

/// A scripted conversation's start: `ready`, then the page's typed
/// `question`, shown as the user's line of turn 1.
pub fn typed_question(question: &str) -> Vec<Step> {
    vec![
        Step::Emit(EngineEvent::Ready {
            engine: "scripted".into(),
            model: "script".into(),
            voice: "tone".into(),
        }),
        Step::AwaitText,
        line(Role::User, question, 1),
    ]
}
