//! The span exporter: a bounded queue filled by the tracing layer without
//! ever waiting, and a thread of its own that batches what is queued and
//! posts it to the collector, each request within `telemetry.otlp_timeout_ms`.
//! A full queue drops the new span and counts it; a failed request drops its
//! batch and counts it (no retries: a trace is worth less than the memory a
//! backlog would hold). The thread has its own small runtime, so a slow
//! collector never takes time from the conversations' workers.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::otlp::{self, SpanRecord};
use crate::config::TelemetryConfig;

/// Most spans in one request (fewer when the queue is smaller).
const MAX_BATCH_SPANS: usize = 512;
/// Longest time the final flush may take, whatever the request timeout.
const MAX_FLUSH: Duration = Duration::from_secs(5);
/// Least time between two warnings about failed or dropped exports.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How often drops are looked for while a request waits.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the exporter has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Spans the collector accepted.
    pub exported_spans: u64,
    /// Spans dropped unsent: the queue was full, or the exporter stopped
    /// before it could send them.
    pub dropped_spans: u64,
    /// Spans in requests that failed: an error status, no answer in time or
    /// no connection.
    pub failed_spans: u64,
}

#[derive(Debug, Default)]
struct Counters {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ExportStats {
        ExportStats {
            exported_spans: self.exported.load(Ordering::Relaxed),
            dropped_spans: self.dropped.load(Ordering::Relaxed),
            failed_spans: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// The layer's end of the queue: cheap to clone, never waits.
#[derive(Debug, Clone)]
pub(super) struct Queue {
    tx: mpsc::Sender<SpanRecord>,
    counters: Arc<Counters>,
}

impl Queue {
    /// Queues a finished span, or counts it dropped when the queue is full
    /// or the exporter has stopped.
    pub(super) fn push(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
impl Queue {
    /// A queue of `capacity` spans read by the caller, and its counters.
    pub(super) fn detached(capacity: usize) -> (Self, mpsc::Receiver<SpanRecord>) {
        let (tx, rx) = mpsc::channel(capacity);
        let counters = Arc::new(Counters::default());
        (Self { tx, counters }, rx)
    }

    pub(super) fn stats(&self) -> ExportStats {
        self.counters.snapshot()
    }
}

/// The counters of the exporter this process installed, for `/metrics`.
static INSTALLED: std::sync::OnceLock<Arc<Counters>> = std::sync::OnceLock::new();

/// What the process's span exporter has done; `None` when spans are not
/// exported.
pub(super) fn installed_stats() -> Option<ExportStats> {
    INSTALLED.get().map(|counters| counters.snapshot())
}

/// The export thread and its queue.
#[derive(Debug)]
pub(super) struct Exporter {
    queue: Queue,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Starts the thread for `config.otlp_endpoint`.
    pub(super) fn start(config: &TelemetryConfig) -> Self {
        let capacity = (config.otlp_queue_spans as usize).max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = watch::channel(false);
        let worker = Worker {
            url: traces_url(&config.otlp_endpoint),
            timeout: Duration::from_millis(u64::from(config.otlp_timeout_ms)),
            batch_wait: Duration::from_millis(u64::from(config.otlp_batch_ms)),
            // The batch in hand is bounded like the queue.
            max_batch: capacity.min(MAX_BATCH_SPANS),
            counters: Arc::clone(&counters),
        };
        let thread = std::thread::Builder::new()
            .name("sonora-otlp".into())
            .spawn(move || worker.run(rx, stop_rx));
        let thread = match thread {
            Ok(thread) => Some(thread),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the span exporter; spans are dropped");
                None
            }
        };
        // Only the first exporter of a process is installed (see `init`).
        let _ = INSTALLED.set(Arc::clone(&counters));
        Self {
            queue: Queue { tx, counters },
            stop,
            thread,
        }
    }

    pub(super) fn queue(&self) -> Queue {
        self.queue.clone()
    }

    pub(super) fn stats(&self) -> ExportStats {
        self.queue.counters.snapshot()
    }

    /// Flushes, stops the thread and logs the counters.
    pub(super) fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let stats = self.stats();
        tracing::info!(
            exported_spans = stats.exported_spans,
            dropped_spans = stats.dropped_spans,
            failed_spans = stats.failed_spans,
            "span export stopped"
        );
    }
}

/// The collector URL for traces: the endpoint as given when it ends with
/// `/v1/traces`, else with that path added (as OTLP exporters do).
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// The thread's side.
struct Worker {
    url: String,
    timeout: Duration,
    batch_wait: Duration,
    max_batch: usize,
    counters: Arc<Counters>,
}

/// Why a send loop stopped.
enum Stopped {
    /// Stop was asked for.
    Asked,
    /// Every queue sender is gone.
    Closed,
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<SpanRecord>, stop: watch::Receiver<bool>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let client = reqwest::Client::builder().timeout(self.timeout).build();
        match (runtime, client) {
            (Ok(runtime), Ok(client)) => runtime.block_on(self.serve(client, rx, stop)),
            (Err(e), _) => {
                tracing::warn!(error = %e, "span exporter: no runtime; spans are dropped")
            }
            (_, Err(e)) => {
                tracing::warn!(error = %e, "span exporter: no HTTP client; spans are dropped");
            }
        }
    }

    async fn serve(
        self,
        client: reqwest::Client,
        mut rx: mpsc::Receiver<SpanRecord>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut batch = Vec::new();
        let warned = Warned::default();
        let stopped = self
            .send_loop(&client, &mut rx, &mut stop, &mut batch, &warned)
            .await;
        // The final flush: what was batched and what is still queued.
        rx.close();
        while let Ok(span) = rx.try_recv() {
            batch.push(span);
        }
        let deadline = Instant::now() + self.timeout.min(MAX_FLUSH);
        while !batch.is_empty() {
            let take = batch.len().min(self.max_batch);
            let chunk: Vec<SpanRecord> = batch.drain(..take).collect();
            if tokio::time::timeout_at(deadline, self.export(&client, &chunk, &warned))
                .await
                .is_err()
            {
                let lost = chunk.len() + batch.len();
                self.counters
                    .dropped
                    .fetch_add(lost as u64, Ordering::Relaxed);
                batch.clear();
                tracing::warn!(
                    dropped_spans = lost,
                    "span export: the final flush ran out of time"
                );
            }
        }
        if matches!(stopped, Stopped::Closed) {
            tracing::debug!("span exporter: the queue closed");
        }
    }

    /// Collects spans into batches and sends each when it is full or has
    /// waited `batch_wait`, until stop is asked for (the batch in hand is
    /// kept for the final flush) or the queue closes.
    async fn send_loop(
        &self,
        client: &reqwest::Client,
        rx: &mut mpsc::Receiver<SpanRecord>,
        stop: &mut watch::Receiver<bool>,
        batch: &mut Vec<SpanRecord>,
        warned: &Warned,
    ) -> Stopped {
        let mut due: Option<Instant> = None;
        loop {
            let send = tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => return Stopped::Asked,
                span = rx.recv() => {
                    let Some(span) = span else {
                        return Stopped::Closed;
                    };
                    if batch.is_empty() {
                        due = Some(Instant::now() + self.batch_wait);
                    }
                    batch.push(span);
                    batch.len() >= self.max_batch
                }
                () = sleep_until(due), if due.is_some() => true,
            };
            if !send {
                continue;
            }
            due = None;
            let chunk = std::mem::take(batch);
            let export = self.export(client, &chunk, warned);
            tokio::pin!(export);
            // Spans dropped while a request waits are told of meanwhile.
            let mut check = tokio::time::interval(CHECK_EVERY);
            loop {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|stop| *stop) => {
                        // The request in flight is abandoned: its spans are lost.
                        self.counters
                            .failed
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        return Stopped::Asked;
                    }
                    () = &mut export => break,
                    _ = check.tick() => warned.drops(self.counters.snapshot()),
                }
            }
        }
    }

    /// Posts one batch and counts the outcome.
    async fn export(&self, client: &reqwest::Client, chunk: &[SpanRecord], warned: &Warned) {
        let body = otlp::encode(chunk);
        let sent = client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let spans = chunk.len() as u64;
        let problem = match sent {
            Ok(response) if response.status().is_success() => {
                // Read the answer so the connection can be reused.
                let _ = response.bytes().await;
                self.counters.exported.fetch_add(spans, Ordering::Relaxed);
                None
            }
            Ok(response) => Some(format!("the collector answered {}", response.status())),
            Err(e) if e.is_timeout() => {
                Some(format!("no answer within {} ms", self.timeout.as_millis()))
            }
            Err(e) => Some(format!(
                "cannot reach the collector: {}",
                crate::redact::urls_in(&e.to_string())
            )),
        };
        if let Some(problem) = &problem {
            self.counters.failed.fetch_add(spans, Ordering::Relaxed);
            warned.failure(problem, self.counters.snapshot());
        } else {
            warned.drops(self.counters.snapshot());
        }
    }
}

/// Completes at `due`; never when there is none.
async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Keeps export warnings to one per [`WARN_EVERY`].
#[derive(Debug, Default)]
struct Warned {
    at: Cell<Option<Instant>>,
    dropped: Cell<u64>,
}

impl Warned {
    fn due(&self) -> bool {
        let now = Instant::now();
        if self.at.get().is_some_and(|at| now < at + WARN_EVERY) {
            return false;
        }
        self.at.set(Some(now));
        true
    }

    fn failure(&self, problem: &str, stats: ExportStats) {
        if self.due() {
            self.dropped.set(stats.dropped_spans);
            tracing::warn!(
                problem,
                failed_spans = stats.failed_spans,
                dropped_spans = stats.dropped_spans,
                "span export failed"
            );
        }
    }

    fn drops(&self, stats: ExportStats) {
        if stats.dropped_spans > self.dropped.get() && self.due() {
            self.dropped.set(stats.dropped_spans);
            tracing::warn!(
                dropped_spans = stats.dropped_spans,
                "span export queue full: spans dropped (telemetry.otlp_queue_spans)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("https://c/otlp/v1/traces"),
            "https://c/otlp/v1/traces"
        );
    }
}
