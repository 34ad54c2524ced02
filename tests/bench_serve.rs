//! The short version of `sonora bench serve`: a few real-time clients at a
//! real gateway process, then at the floor (the bare WebSocket echo), both
//! answering every turn (the floor by hand-read frames, or through the
//! WebSocket library); the report's numbers are the ones the README's
//! table is made of.

#![allow(clippy::unwrap_used, reason = "a failed step must fail the test")]

use std::process::Command;

use serde_json::Value;

/// Runs `sonora bench serve` for 3 s with 6 clients, one turn per 400 ms.
fn short_run(extra: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_sonora"))
        .args([
            "bench",
            "serve",
            "--sessions",
            "6",
            "--seconds",
            "3",
            "--turn-ms",
            "400",
            "--reply-ms",
            "200",
        ])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn a_short_load_run_measures_the_gateway_and_its_floor() {
    let report = short_run(&[]);
    assert_eq!(report["floor"]["kind"], "bare", "{report}");
    assert_eq!(report["sessions_held"], 6, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    // 6 clients × 3 s at one turn per 400 ms: every turn answered.
    assert!(
        report["turns_measured"].as_u64().unwrap() >= 6 * 6,
        "{report}"
    );
    assert!(report["round_trip_ms"]["p50"].as_f64().unwrap() > 0.0);
    // CPU is counted in 10 ms ticks: a few sessions for 3 s may show none.
    assert!(report["server_cpu_ms_per_session_second"].as_f64().unwrap() >= 0.0);
    let floor = &report["floor"];
    assert_eq!(floor["sessions_held"], 6, "{report}");
    assert_eq!(floor["errors"], 0, "{report}");
    assert!(
        floor["round_trip_ms"]["p50"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        floor["server_cpu_ms_per_session_second"].as_f64().unwrap() >= 0.0,
        "{report}"
    );
    assert!(
        floor["gateway_to_floor_cpu_ratio"].as_f64().unwrap() >= 0.0,
        "{report}"
    );
}

#[test]
fn the_floor_can_go_through_the_websocket_library_or_answer_from_a_task() {
    for (flag, kind) in [
        ("--floor-library", "library"),
        ("--floor-engine-task", "engine_task"),
    ] {
        let report = short_run(&[flag]);
        let floor = &report["floor"];
        assert_eq!(floor["kind"], kind, "{report}");
        assert_eq!(floor["sessions_held"], 6, "{report}");
        assert_eq!(floor["errors"], 0, "{report}");
        // Every turn answered: the round trips were measured.
        assert!(
            floor["round_trip_ms"]["p50"].as_f64().unwrap() > 0.0,
            "{report}"
        );
    }
}
