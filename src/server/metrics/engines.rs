//! The engines on `/metrics`: each engine's own numbers (labelled by
//! instance when several are configured), each instance's conversations,
//! refusals, failures and cost by modality, and the wait for a place.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::pool::{Instance, Pool};
use crate::engine::{EngineStat, StatKind};

/// One engine's own numbers, as `sonora_engine_{name}`.
pub fn render_engine(out: &mut String, stats: &[EngineStat]) {
    render_stats(out, &[(None, stats.to_vec())]);
}

/// Every instance's numbers and the queue's.
pub fn render_engines(out: &mut String, pool: &Pool) {
    let stats = pool.stats();
    if pool.routed() {
        let groups: Vec<(Option<&str>, Vec<EngineStat>)> = stats
            .iter()
            .map(|(instance, stats)| (Some(instance.name()), stats.clone()))
            .collect();
        render_stats(out, &groups);
    } else if let Some((_, stats)) = stats.first() {
        render_stats(out, &[(None, stats.clone())]);
    }
    let instances = pool.instances();
    let gauge = |out: &mut String, name: &str, help: &str, value: &dyn Fn(&Instance) -> u64| {
        header(out, name, help, "gauge");
        for instance in instances {
            let _ = writeln!(out, "{name}{} {}", labels(instance), value(instance));
        }
    };
    gauge(
        out,
        "sonora_engine_instance_active",
        "Conversations running on the instance.",
        &|i| i.active().into(),
    );
    gauge(
        out,
        "sonora_engine_instance_max_concurrent",
        "The instance's limit of conversations (0: none).",
        &|i| i.max_concurrent().unwrap_or(0).into(),
    );
    gauge(
        out,
        "sonora_engine_instance_available",
        "1 while the instance takes new conversations (room, not cooling down).",
        &|i| i.available().into(),
    );
    let counter = |out: &mut String, name: &str, help: &str, value: &dyn Fn(&Instance) -> u64| {
        header(out, name, help, "counter");
        for instance in instances {
            let _ = writeln!(out, "{name}{} {}", labels(instance), value(instance));
        }
    };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counter(
        out,
        "sonora_engine_instance_started_total",
        "Conversations started on the instance (taken over ones too).",
        &|i| load(&i.counters().started),
    );
    counter(
        out,
        "sonora_engine_instance_refused_total",
        "Conversations the instance would not start (throttled, unreachable, misconfigured).",
        &|i| load(&i.counters().refused),
    );
    counter(
        out,
        "sonora_engine_instance_failed_total",
        "Conversations the instance failed while they ran.",
        &|i| load(&i.counters().failed),
    );
    counter(
        out,
        "sonora_engine_instance_taken_over_total",
        "Conversations the instance went on with after another failed.",
        &|i| load(&i.counters().taken_over),
    );
    counter(
        out,
        "sonora_engine_instance_billed_micro_usd_total",
        "Cost of the instance's usage, in millionths of a dollar.",
        &|i| load(&i.counters().cost_micro_usd),
    );
    let name = "sonora_engine_instance_cost_micro_usd_total";
    header(
        out,
        name,
        "Cost of the instance's usage by modality, in millionths of a dollar.",
        "counter",
    );
    for instance in instances {
        let c = instance.counters();
        let base = labels(instance);
        let base = base.trim_end_matches('}');
        let _ = writeln!(
            out,
            "{name}{base},modality=\"speech\"}} {}\n{name}{base},modality=\"text\"}} {}",
            load(&c.speech_cost_micro_usd),
            load(&c.text_cost_micro_usd)
        );
    }
    let queue = pool.counters();
    let pool_numbers: [(&str, &str, &str, u64); 7] = [
        (
            "sonora_engine_queue_waiting",
            "Conversations waiting for an engine instance.",
            "gauge",
            pool.waiting() as u64,
        ),
        (
            "sonora_engine_queued_total",
            "Conversations that had to wait for an engine instance.",
            "counter",
            load(&queue.queued),
        ),
        (
            "sonora_engine_queue_full_total",
            "Conversations refused because the wait queue was full.",
            "counter",
            load(&queue.queue_full),
        ),
        (
            "sonora_engine_queue_timeouts_total",
            "Conversations refused after waiting engine.queue_timeout_s.",
            "counter",
            load(&queue.queue_timeouts),
        ),
        (
            "sonora_engine_queue_wait_seconds_count",
            "Waits that ended with a place.",
            "counter",
            load(&queue.waits),
        ),
        (
            "sonora_engine_failovers_total",
            "Conversations moved to another instance after theirs failed.",
            "counter",
            load(&queue.failovers),
        ),
        (
            "sonora_engine_queue_max",
            "Most conversations that may wait (engine.queue_max).",
            "gauge",
            pool.settings().queue_max as u64,
        ),
    ];
    for (name, help, kind, value) in pool_numbers {
        header(out, name, help, kind);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "sonora_engine_queue_wait_seconds_sum";
    header(
        out,
        name,
        "Time waited by conversations that got a place, in seconds.",
        "counter",
    );
    let _ = writeln!(out, "{name} {:.3}", load(&queue.wait_ms) as f64 / 1000.0);
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// `{instance="…",kind="…"}`: names are `a-z 0-9 - _` (the configuration
/// checks them), kinds are fixed.
fn labels(instance: &Instance) -> String {
    format!(
        "{{instance=\"{}\",kind=\"{}\"}}",
        instance.name(),
        instance.kind()
    )
}

/// Engine numbers grouped by name (one header each), labelled by instance
/// where given.
fn render_stats(out: &mut String, groups: &[(Option<&str>, Vec<EngineStat>)]) {
    let mut names: Vec<&EngineStat> = Vec::new();
    for (_, stats) in groups {
        for stat in stats {
            if !names.iter().any(|s| s.name == stat.name) {
                names.push(stat);
            }
        }
    }
    for first in names {
        let name = format!("sonora_engine_{}", first.name);
        let kind = match first.kind {
            StatKind::Counter => "counter",
            StatKind::Gauge => "gauge",
        };
        header(out, &name, first.help, kind);
        for (instance, stats) in groups {
            for stat in stats.iter().filter(|s| s.name == first.name) {
                match instance {
                    Some(instance) => {
                        let _ = writeln!(out, "{name}{{instance=\"{instance}\"}} {}", stat.value);
                    }
                    None => {
                        let _ = writeln!(out, "{name} {}", stat.value);
                    }
                }
            }
        }
    }
}
