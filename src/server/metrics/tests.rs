use super::*;
use crate::engine::{EngineStat, StatKind};

fn value(text: &str, line_start: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("{line_start} in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(start_paused = true)]
async fn all_closed_waits_for_the_last_conversation_only() {
    let metrics = Arc::new(Metrics::default());
    metrics.all_closed().await;
    for id in [1, 2] {
        metrics.opened(id, Arc::new(Counters::default()));
    }
    let waiter = tokio::spawn({
        let metrics = Arc::clone(&metrics);
        async move { metrics.all_closed().await }
    });
    metrics.closed(1, Some(CloseReason::ClientStopped));
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    assert!(!waiter.is_finished(), "one conversation still runs");
    metrics.closed(2, None);
    tokio::time::timeout(std::time::Duration::from_millis(10), waiter)
        .await
        .expect("told at once")
        .expect("no panic");
}

#[test]
fn latency_histogram_is_cumulative() {
    let metrics = Metrics::default();
    metrics.latency(250);
    metrics.latency(900);
    metrics.latency(60_000);
    let text = metrics.render();
    assert_eq!(
        value(&text, "sonora_turn_latency_seconds_bucket{le=\"0.1\"}"),
        "0"
    );
    assert_eq!(
        value(&text, "sonora_turn_latency_seconds_bucket{le=\"0.3\"}"),
        "1"
    );
    assert_eq!(
        value(&text, "sonora_turn_latency_seconds_bucket{le=\"1\"}"),
        "2"
    );
    assert_eq!(
        value(&text, "sonora_turn_latency_seconds_bucket{le=\"30\"}"),
        "2"
    );
    assert_eq!(
        value(&text, "sonora_turn_latency_seconds_bucket{le=\"+Inf\"}"),
        "3"
    );
    assert_eq!(value(&text, "sonora_turn_latency_seconds_sum"), "61.15");
}

#[test]
fn engine_numbers_are_rendered_with_their_kind() {
    let mut text = String::new();
    let stats = [
        EngineStat {
            name: "breaker_trips_total",
            help: "Trips.",
            kind: StatKind::Counter,
            value: 2,
        },
        EngineStat {
            name: "breaker_open",
            help: "Open.",
            kind: StatKind::Gauge,
            value: 1,
        },
    ];
    render_engine(&mut text, &stats);
    assert_eq!(value(&text, "sonora_engine_breaker_trips_total "), "2");
    assert!(text.contains("# TYPE sonora_engine_breaker_trips_total counter\n"));
    assert!(text.contains("# TYPE sonora_engine_breaker_open gauge\n"));
    assert_eq!(value(&text, "sonora_engine_breaker_open "), "1");
}

#[test]
fn sessions_usage_and_refusals_are_counted() {
    let metrics = Metrics::default();
    metrics.opened(1, Arc::new(Counters::default()));
    metrics.opened(2, Arc::new(Counters::default()));
    metrics.closed(1, Some(CloseReason::SlowClient));
    metrics.refused(Refusal::Busy);
    metrics.refused(Refusal::EngineBusy);
    metrics.usage(&UsageDelta {
        speech_in_tokens: 40,
        cost_micro_usd: 1_500,
        ..UsageDelta::default()
    });
    let text = metrics.render();
    assert_eq!(value(&text, "sonora_sessions_active "), "1");
    assert_eq!(value(&text, "sonora_sessions_total "), "2");
    assert_eq!(
        value(&text, "sonora_sessions_refused_total{reason=\"busy\"}"),
        "1"
    );
    assert_eq!(
        value(
            &text,
            "sonora_sessions_refused_total{reason=\"engine_busy\"}"
        ),
        "1"
    );
    assert_eq!(
        value(&text, "sonora_downlink_slow_client_closes_total "),
        "1"
    );
    assert_eq!(
        value(
            &text,
            "sonora_tokens_total{modality=\"speech\",direction=\"input\"}"
        ),
        "40"
    );
    assert_eq!(value(&text, "sonora_cost_usd_total "), "0.0015");
    // Every sample line is `name{labels} number`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let number = line.rsplit(' ').next().unwrap_or_default();
        assert!(number.parse::<f64>().is_ok(), "{line}");
        assert!(line.starts_with("sonora_"), "{line}");
    }
}
