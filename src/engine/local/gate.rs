//! One blocking job at a time per model, queued without holding a thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

/// Runs `job` on the blocking pool once `gate` grants its turn. The turn is
/// taken on the async semaphore before any blocking thread is used, so
/// waiting jobs cost nothing and an aborted one simply goes; the permit
/// moves into the blocking job, so a running job keeps its turn even if its
/// caller is aborted. With a `wanted` generation, the job is skipped
/// (`Ok(None)`) if the generation moved on while it waited.
pub(super) async fn run<T: Send + 'static>(
    gate: &Arc<Semaphore>,
    wanted: Option<(Arc<AtomicU64>, u64)>,
    what: &str,
    job: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<Option<T>, String> {
    let turn = Arc::clone(gate)
        .acquire_owned()
        .await
        .map_err(|_| format!("{what} is shut down"))?;
    if !is_current(wanted.as_ref()) {
        return Ok(None);
    }
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        job().map(Some)
    })
    .await
    .map_err(|e| format!("{what} stopped: {e}"))?
}

/// Whether a job for the `wanted` generation is still wanted: always,
/// without one.
pub(super) fn is_current(wanted: Option<&(Arc<AtomicU64>, u64)>) -> bool {
    wanted.is_none_or(|(current, generation)| current.load(Ordering::Acquire) == *generation)
}
