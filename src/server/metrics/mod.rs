// Over 600 lines: every metric and its Prometheus rendering stay together, a third of it tests.
//! Server-wide counters, rendered in the Prometheus text format at
//! `/metrics`. Traffic totals are exact and live: finished conversations
//! are folded into a running total, and the counters of the ones still
//! running are added at each scrape.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::session::{CloseReason, Counters, CountersSnapshot};
use crate::usage::UsageDelta;

use super::protocol::ErrorCode;

/// Upper bounds of the turn latency histogram, in seconds.
const LATENCY_BUCKETS_S: [f64; 12] = [
    0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
];

crate::names::named_enum! {
    /// Why a connection was refused before its conversation started.
    pub enum Refusal {
        /// At `server.max_sessions`.
        Busy = "busy",
        /// The server is shutting down.
        ShuttingDown = "shutting_down",
        /// A browser origin not allowed.
        Origin = "origin",
        /// A missing or wrong token.
        Unauthorized = "unauthorized",
        /// The engine is still loading.
        NotReady = "not_ready",
        /// The engine sheds load: its service throttles.
        EngineBusy = "engine_busy",
        /// Every fitting engine instance was full, and so was the queue.
        QueueFull = "queue_full",
        /// No engine instance had room within `engine.queue_timeout_s`.
        QueueTimeout = "queue_timeout",
        /// The client address is at `server.max_sessions_per_client`.
        ClientBusy = "client_busy",
        /// The client address is over `server.connections_per_minute_per_client`.
        RateLimited = "rate_limited",
        /// A `Host` not in `server.allowed_hosts` (HTTP 421).
        Host = "host",
        /// A TCP connection past `server.max_connections`, closed at once.
        MaxConnections = "max_connections",
        /// The ledger could not record the conversation's start.
        LedgerUnavailable = "ledger_unavailable",
        /// A budget had no room for one more turn.
        BudgetExceeded = "budget_exceeded",
        /// The key's `max_sessions` conversations were running.
        KeyBusy = "key_busy",
    }
}

crate::names::named_enum! {
    /// Why the server closed an HTTP connection that was not a WebSocket.
    pub enum HttpTimeout {
        /// A request head took longer than `server.header_read_timeout_ms`.
        Header = "header_timeout",
        /// Idle between requests longer than `server.keepalive_timeout_ms`.
        Idle = "idle",
    }
}

const ORDER: Ordering = Ordering::Relaxed;

#[derive(Debug, Default)]
struct Traffic {
    /// Sum of the final counters of finished conversations.
    finished: CountersSnapshot,
    /// Counters of running conversations, by connection id.
    live: HashMap<u64, Arc<Counters>>,
}

/// Every server metric.
#[derive(Debug, Default)]
pub struct Metrics {
    ready: AtomicBool,
    active: AtomicU64,
    total: AtomicU64,
    /// Of those, phone calls (running now, ever).
    calls_active: AtomicU64,
    calls_total: AtomicU64,
    /// Conversations whose client is away now, waiting for it to re-attach.
    detached: AtomicU64,
    /// Clients that re-attached to their conversation.
    resumes: AtomicU64,
    /// Reply audio dropped from conversations' resume buffers, in ms.
    resume_dropped_ms: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    /// TCP connections open now, WebSockets included.
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    connection_timeouts: [AtomicU64; HttpTimeout::ALL.len()],
    closed: [AtomicU64; CloseReason::ALL.len()],
    /// Connections dropped because one write to them took too long.
    write_timeouts: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_S.len()],
    latency_count: AtomicU64,
    latency_sum_ms: AtomicU64,
    usage: Mutex<UsageDelta>,
    traffic: Mutex<Traffic>,
    /// Told when the last running conversation closes.
    all_closed: tokio::sync::Notify,
}

impl Metrics {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, ORDER);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(ORDER)
    }

    pub fn active(&self) -> u64 {
        self.active.load(ORDER)
    }

    pub fn refused(&self, why: Refusal) {
        let at = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refused[at].fetch_add(1, ORDER);
    }

    /// A TCP connection was accepted.
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, ORDER);
        self.connections_total.fetch_add(1, ORDER);
    }

    /// An accepted TCP connection is gone.
    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, ORDER);
    }

    /// The server closed an HTTP connection for taking too long.
    pub fn connection_timed_out(&self, why: HttpTimeout) {
        let at = HttpTimeout::ALL.iter().position(|t| *t == why).unwrap_or(0);
        self.connection_timeouts[at].fetch_add(1, ORDER);
    }

    pub(crate) fn error(&self, code: ErrorCode) {
        let at = ErrorCode::ALL.iter().position(|c| *c == code).unwrap_or(0);
        self.errors[at].fetch_add(1, ORDER);
    }

    pub fn write_timeout(&self) {
        self.write_timeouts.fetch_add(1, ORDER);
    }

    /// A conversation started: its counters are read live from now on.
    pub fn opened(&self, id: u64, counters: Arc<Counters>) {
        self.active.fetch_add(1, ORDER);
        self.total.fetch_add(1, ORDER);
        self.lock_traffic().live.insert(id, counters);
    }

    /// A phone call started (besides [`Metrics::opened`]).
    pub fn call_opened(&self) {
        self.calls_active.fetch_add(1, ORDER);
        self.calls_total.fetch_add(1, ORDER);
    }

    /// A conversation's socket dropped: it waits for its client.
    pub fn detached(&self) {
        self.detached.fetch_add(1, ORDER);
    }

    /// A detached conversation got its client back (`resumed`) or ended.
    pub fn reattached(&self, resumed: bool) {
        self.detached.fetch_sub(1, ORDER);
        self.resumes.fetch_add(u64::from(resumed), ORDER);
    }

    /// Reply audio a resume buffer could not keep.
    pub fn resume_dropped(&self, ms: u64) {
        self.resume_dropped_ms.fetch_add(ms, ORDER);
    }

    /// A phone call ended (besides [`Metrics::closed`]).
    pub fn call_closed(&self) {
        self.calls_active.fetch_sub(1, ORDER);
    }

    /// A conversation ended; `reason` is `None` when the connection was
    /// lost before the conversation could say why.
    pub fn closed(&self, id: u64, reason: Option<CloseReason>) {
        let last = self.active.fetch_sub(1, ORDER) == 1;
        if let Some(reason) = reason {
            let at = CloseReason::ALL
                .iter()
                .position(|r| *r == reason)
                .unwrap_or(0);
            self.closed[at].fetch_add(1, ORDER);
        }
        let mut traffic = self.lock_traffic();
        if let Some(counters) = traffic.live.remove(&id) {
            add_cumulative(&mut traffic.finished, &counters.snapshot());
        }
        drop(traffic);
        if last {
            self.all_closed.notify_waiters();
        }
    }

    /// Completes once no conversation is running (at once if none is).
    pub async fn all_closed(&self) {
        loop {
            let closed = self.all_closed.notified();
            tokio::pin!(closed);
            // Registered before the check, so a close in between is seen.
            closed.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            closed.await;
        }
    }

    fn closed_count(&self, reason: CloseReason) -> u64 {
        CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |at| self.closed[at].load(ORDER))
    }

    pub fn latency(&self, ms: u64) {
        let seconds = ms as f64 / 1000.0;
        for (bucket, bound) in self.latency_buckets.iter().zip(LATENCY_BUCKETS_S) {
            if seconds <= bound {
                bucket.fetch_add(1, ORDER);
            }
        }
        self.latency_count.fetch_add(1, ORDER);
        self.latency_sum_ms.fetch_add(ms, ORDER);
    }

    pub fn usage(&self, delta: &UsageDelta) {
        self.usage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(delta);
    }

    fn lock_traffic(&self) -> std::sync::MutexGuard<'_, Traffic> {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let (totals, queued_up, queued_down) = {
            let traffic = self.lock_traffic();
            let mut totals = traffic.finished.clone();
            let (mut up, mut down) = (0, 0);
            for counters in traffic.live.values() {
                let now = counters.snapshot();
                up += now.uplink_queued_ms;
                down += now.downlink_queued_ms;
                add_cumulative(&mut totals, &now);
            }
            (totals, up, down)
        };
        let usage = *self.usage.lock().unwrap_or_else(PoisonError::into_inner);
        let seconds = |ms: u64| ms as f64 / 1000.0;
        let slow = self.closed_count(CloseReason::SlowClient) + self.write_timeouts.load(ORDER);
        // (name, type, help, value)
        let plain: [(&str, &str, &str, f64); 26] = [
            (
                "sonora_engine_ready",
                "gauge",
                "1 when the engine is loaded and conversations are accepted.",
                f64::from(u8::from(self.is_ready())),
            ),
            (
                "sonora_sessions_active",
                "gauge",
                "Conversations running now.",
                self.active() as f64,
            ),
            (
                "sonora_sessions_total",
                "counter",
                "Conversations started.",
                self.total.load(ORDER) as f64,
            ),
            (
                "sonora_calls_active",
                "gauge",
                "Phone calls running now (counted in sonora_sessions_active too).",
                self.calls_active.load(ORDER) as f64,
            ),
            (
                "sonora_calls_total",
                "counter",
                "Phone calls answered (counted in sonora_sessions_total too).",
                self.calls_total.load(ORDER) as f64,
            ),
            (
                "sonora_sessions_detached",
                "gauge",
                "Conversations whose connection dropped, waiting for their client to re-attach.",
                self.detached.load(ORDER) as f64,
            ),
            (
                "sonora_resumes_total",
                "counter",
                "Clients that re-attached to their conversation after a dropped connection.",
                self.resumes.load(ORDER) as f64,
            ),
            (
                "sonora_resume_dropped_audio_seconds_total",
                "counter",
                "Reply audio a conversation could not keep for its absent client (server.resume_buffer_bytes).",
                seconds(self.resume_dropped_ms.load(ORDER)),
            ),
            (
                "sonora_http_connections_open",
                "gauge",
                "TCP connections open now, WebSockets included.",
                self.connections_open.load(ORDER) as f64,
            ),
            (
                "sonora_http_connections_total",
                "counter",
                "TCP connections accepted (those refused past server.max_connections not included).",
                self.connections_total.load(ORDER) as f64,
            ),
            (
                "sonora_audio_in_seconds_total",
                "counter",
                "User audio received, after decoding.",
                seconds(totals.audio_in_ms),
            ),
            (
                "sonora_audio_out_seconds_total",
                "counter",
                "Reply audio handed to clients.",
                seconds(totals.audio_out_ms),
            ),
            (
                "sonora_decoder_bytes_total",
                "counter",
                "Compressed audio bytes the decoders took.",
                totals.decoder_bytes_in as f64,
            ),
            (
                "sonora_decoder_bytes_refused_total",
                "counter",
                "Compressed audio bytes refused at the decoder input cap.",
                totals.decoder_bytes_refused as f64,
            ),
            (
                "sonora_decoder_packets_concealed_total",
                "counter",
                "Opus packets replaced by packet-loss concealment.",
                totals.packets_concealed as f64,
            ),
            (
                "sonora_decoder_packets_corrupt_total",
                "counter",
                "Lost Opus packets past the 120 ms a run that concealment covers.",
                totals.packets_corrupt as f64,
            ),
            (
                "sonora_decoder_too_fast_total",
                "counter",
                "Streams ended for delivering audio faster than real time.",
                totals.audio_too_fast as f64,
            ),
            (
                "sonora_engine_lingered_total",
                "counter",
                "Engines still running 30 s after their conversation ended.",
                totals.engine_lingered as f64,
            ),
            (
                "sonora_uplink_dropped_seconds_total",
                "counter",
                "User audio dropped, oldest first, because the engine fell behind.",
                seconds(totals.uplink_dropped_ms),
            ),
            (
                "sonora_uplink_queued_seconds",
                "gauge",
                "User audio waiting for the engines now.",
                seconds(queued_up),
            ),
            (
                "sonora_downlink_queued_seconds",
                "gauge",
                "Reply audio waiting for clients now.",
                seconds(queued_down),
            ),
            (
                "sonora_downlink_cleared_seconds_total",
                "counter",
                "Reply audio dropped by barge-in.",
                seconds(totals.downlink_cleared_ms),
            ),
            (
                "sonora_engine_send_stalls_total",
                "counter",
                "Times an engine was slow to accept audio.",
                totals.engine_send_stalls as f64,
            ),
            (
                "sonora_interruptions_total",
                "counter",
                "Barge-ins: the user spoke over a reply.",
                totals.interruptions as f64,
            ),
            (
                "sonora_downlink_slow_client_closes_total",
                "counter",
                "Connections closed because the client did not read its reply audio in time.",
                slow as f64,
            ),
            (
                "sonora_cost_usd_total",
                "counter",
                "Engine cost of every conversation, in US dollars.",
                usage.cost_micro_usd as f64 / 1e6,
            ),
        ];
        let mut out = String::with_capacity(8192);
        for (name, kind, help, value) in plain {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        if let Some(spans) = crate::telemetry::export_stats() {
            let exported = [
                ("exported", "sent to the collector", spans.exported_spans),
                (
                    "dropped",
                    "dropped unsent (queue full)",
                    spans.dropped_spans,
                ),
                (
                    "failed",
                    "in export requests that failed",
                    spans.failed_spans,
                ),
            ];
            for (what, help, value) in exported {
                let name = format!("sonora_telemetry_spans_{what}_total");
                let _ = writeln!(
                    out,
                    "# HELP {name} Spans {help}.\n# TYPE {name} counter\n{name} {value}"
                );
            }
        }
        let refused = labelled("reason", &Refusal::ALL, &self.refused);
        let closed = labelled("reason", &CloseReason::ALL, &self.closed);
        let timeouts = labelled("reason", &HttpTimeout::ALL, &self.connection_timeouts);
        let errors = labelled("code", &ErrorCode::ALL, &self.errors);
        let tokens: Vec<(String, u64)> = [
            ("speech", "input", usage.speech_in_tokens),
            ("speech", "output", usage.speech_out_tokens),
            ("text", "input", usage.text_in_tokens),
            ("text", "output", usage.text_out_tokens),
        ]
        .into_iter()
        .map(|(modality, direction, n)| {
            (
                format!("modality=\"{modality}\",direction=\"{direction}\""),
                n,
            )
        })
        .collect();
        let modality_cost: Vec<(String, u64)> = vec![
            (
                "modality=\"speech\"".to_owned(),
                usage.speech_cost_micro_usd,
            ),
            ("modality=\"text\"".to_owned(), usage.text_cost_micro_usd),
        ];
        let labelled = [
            (
                "sonora_sessions_refused_total",
                "Connections and requests refused, by reason.",
                refused,
            ),
            (
                "sonora_http_connections_timed_out_total",
                "HTTP connections (not WebSockets) closed for a slow request head or for idling, by reason.",
                timeouts,
            ),
            (
                "sonora_sessions_closed_total",
                "Conversations ended, by reason.",
                closed,
            ),
            (
                "sonora_protocol_errors_total",
                "Error messages sent to clients, by code.",
                errors,
            ),
            (
                "sonora_tokens_total",
                "Engine tokens, by modality and direction.",
                tokens,
            ),
            (
                "sonora_cost_micro_usd_total",
                "Engine cost by modality, in micro-dollars (each rounded on its own).",
                modality_cost,
            ),
        ];
        for (name, help, samples) in labelled {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
        self.render_latency(&mut out);
        out
    }

    fn render_latency(&self, out: &mut String) {
        let name = "sonora_turn_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From the end of the user's speech to the first reply audio.\n# TYPE {name} histogram"
        );
        for (bound, count) in LATENCY_BUCKETS_S.iter().zip(&self.latency_buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", count.load(ORDER));
        }
        let count = self.latency_count.load(ORDER);
        let sum = self.latency_sum_ms.load(ORDER) as f64 / 1000.0;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
        );
    }
}

/// Appends an engine's own numbers as `sonora_engine_{name}`.
/// One `label="name"` series per value of a named enum, with its count.
fn labelled<T: std::fmt::Display>(
    label: &str,
    all: &[T],
    counts: &[AtomicU64],
) -> Vec<(String, u64)> {
    all.iter()
        .zip(counts)
        .map(|(value, n)| (format!("{label}=\"{value}\""), n.load(ORDER)))
        .collect()
}

/// The ledger's writer: records written and lost, transactions, health.
pub fn render_ledger(out: &mut String, ledger: &crate::ledger::Ledger) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = ledger.stats();
    let series = [
        (
            "sonora_ledger_records_written_total",
            "counter",
            "Records the ledger committed.",
            stats.written.load(Relaxed),
        ),
        (
            "sonora_ledger_records_failed_total",
            "counter",
            "Records lost to a failed ledger write.",
            stats.failed.load(Relaxed),
        ),
        (
            "sonora_ledger_transactions_total",
            "counter",
            "Transactions the ledger committed.",
            stats.batches.load(Relaxed),
        ),
        (
            "sonora_ledger_up",
            "gauge",
            "1 while the ledger's last write succeeded.",
            u64::from(ledger.healthy()),
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// Adds the ever-growing counters of `more` to `total`; gauges are left.
fn add_cumulative(total: &mut CountersSnapshot, more: &CountersSnapshot) {
    total.uplink_dropped_ms += more.uplink_dropped_ms;
    total.engine_send_stalls += more.engine_send_stalls;
    total.downlink_cleared_ms += more.downlink_cleared_ms;
    total.audio_in_ms += more.audio_in_ms;
    total.audio_out_ms += more.audio_out_ms;
    total.chunks_refused += more.chunks_refused;
    total.interruptions += more.interruptions;
    total.decoder_bytes_in += more.decoder_bytes_in;
    total.decoder_bytes_refused += more.decoder_bytes_refused;
    total.packets_decoded += more.packets_decoded;
    total.packets_concealed += more.packets_concealed;
    total.packets_corrupt += more.packets_corrupt;
    total.audio_too_fast += more.audio_too_fast;
    total.engine_lingered += more.engine_lingered;
}

mod engines;
#[cfg(test)]
mod tests;

pub use engines::{render_engine, render_engines};
