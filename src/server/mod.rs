//! The web gateway: the embedded web UI, the `/ws` conversation socket,
//! `/healthz`, `/readyz` and `/metrics`, admission limits, origin checks and
//! graceful shutdown.
//!
//! One [`Server`] holds the engine (set once it has loaded, which makes
//! `/readyz` answer 200), the metrics and the shutdown signal. Each accepted
//! socket runs one `session::Conversation`; browser-protocol types stay in
//! [`protocol`].

mod assets;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod protocol;
mod socket;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::engine::Engine;
use crate::session::SessionLimits;

pub use metrics::Metrics;

/// Reply audio rate announced in `ready`; engine audio at another rate is
/// resampled to it.
pub const OUTPUT_RATE_HZ: u32 = 24_000;

/// Socket buffer sizes: small, so that a thousand idle sockets stay cheap.
const READ_BUFFER_BYTES: usize = 16 * 1024;
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Everything the handlers share.
struct Shared {
    config: Config,
    limits: SessionLimits,
    engine: OnceLock<Arc<dyn Engine>>,
    metrics: Arc<Metrics>,
    admission: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    next_id: AtomicU64,
}

/// The gateway. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    shutdown: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("ready", &self.shared.metrics.is_ready())
            .field("active", &self.shared.metrics.active())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for a validated configuration, not ready until
    /// [`Server::set_engine`].
    pub fn new(config: &Config) -> Self {
        let (tx, rx) = watch::channel(false);
        let shared = Shared {
            config: config.clone(),
            limits: SessionLimits::from_config(config),
            engine: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
            admission: Arc::new(Semaphore::new(config.server.max_sessions as usize)),
            shutdown: rx,
            next_id: AtomicU64::new(1),
        };
        Self {
            shared: Arc::new(shared),
            shutdown: Arc::new(tx),
        }
    }

    /// Hands over the loaded engine; `/readyz` says ready from now on. A
    /// second engine is refused.
    pub fn set_engine(&self, engine: Arc<dyn Engine>) -> Result<(), String> {
        self.shared
            .engine
            .set(engine)
            .map_err(|_| "the engine is already set".to_owned())?;
        self.shared.metrics.set_ready(true);
        Ok(())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.shared.metrics)
    }

    /// Starts the graceful shutdown: no new conversations, and every running
    /// one is asked to finish.
    pub fn shut_down(&self) {
        self.shared.metrics.set_ready(false);
        self.shutdown.send_replace(true);
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ws", get(upgrade))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .route("/api/engine", get(engine_info))
            .fallback(get(assets::serve))
            .with_state(Arc::clone(&self.shared))
    }

    /// Serves until `stop` completes, then shuts down gracefully: stops
    /// accepting, lets conversations close for `server.shutdown_grace_ms`,
    /// and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self
            .router()
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        let me = self.clone();
        let signal = async move {
            stop.await;
            me.shut_down();
        };
        let mut shutting = self.shutdown.subscribe();
        // Small frames both ways: never wait to coalesce them (Nagle).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serving = axum::serve(listener, app).with_graceful_shutdown(signal);
        // Upgraded sockets outlive the HTTP connections axum waits for.
        let server = tokio::spawn(serving.into_future());
        let _ = shutting.wait_for(|down| *down).await;
        let grace = Duration::from_millis(u64::from(self.shared.config.server.shutdown_grace_ms));
        let deadline = tokio::time::Instant::now() + grace;
        while self.shared.metrics.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.abort();
        Ok(())
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.metrics.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if *shared.shutdown.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the engine is loading\n").into_response()
    }
}

/// The engine and its voices, for the UI's menus.
async fn engine_info(State(shared): State<Arc<Shared>>) -> Response {
    let engine = shared.engine.get();
    let body = serde_json::json!({
        "engine": engine.map(|e| e.name()),
        "ready": shared.metrics.is_ready(),
        "language": shared.config.engine.language,
        "voices": engine.map(|e| e.voices()).unwrap_or_default(),
        "protocol": protocol::VERSION,
    });
    axum::Json(body).into_response()
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> Response {
    let mut text = shared.metrics.render();
    if let Some(engine) = shared.engine.get() {
        metrics::render_engine(&mut text, &engine.stats());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Whether a browser `Origin` may open `/ws`: absent (not a browser), the
/// server's own host, or listed in `server.allowed_origins`.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let bare = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    !host.is_empty() && bare.is_some_and(|b| b.eq_ignore_ascii_case(host))
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    use metrics::Refusal;
    if !origin_allowed(&headers, &shared.config.server.allowed_origins) {
        shared.metrics.refused(Refusal::Origin);
        let message = "this origin may not open conversations (server.allowed_origins)\n";
        return (StatusCode::FORBIDDEN, message).into_response();
    }
    // The socket library refuses past twice the limit by dropping the
    // connection; up to there the connection itself refuses politely.
    let hard_limit = shared.config.server.max_message_bytes.saturating_mul(2);
    let ws = ws
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES);
    // Refusals happen after the upgrade, so that a browser sees the close
    // code and reason rather than a failed handshake.
    let refusal = if *shared.shutdown.borrow() {
        Some((
            Refusal::ShuttingDown,
            socket::CLOSE_GOING_AWAY,
            "the server is shutting down",
        ))
    } else if shared.engine.get().is_none() {
        Some((
            Refusal::NotReady,
            socket::CLOSE_TRY_AGAIN,
            "the engine is still loading; try again shortly",
        ))
    } else if shared.engine.get().and_then(|e| e.busy()).is_some() {
        Some((
            Refusal::EngineBusy,
            socket::CLOSE_TRY_AGAIN,
            socket::ENGINE_BUSY_REASON,
        ))
    } else {
        None
    };
    if let Some((why, code, reason)) = refusal {
        shared.metrics.refused(why);
        return ws.on_upgrade(move |socket| socket::refuse(socket, code, reason));
    }
    let Ok(permit) = Arc::clone(&shared.admission).try_acquire_owned() else {
        shared.metrics.refused(Refusal::Busy);
        return ws.on_upgrade(|socket| {
            socket::refuse(
                socket,
                socket::CLOSE_TRY_AGAIN,
                "the server is busy: too many conversations; try again later",
            )
        });
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    ws.on_upgrade(move |socket| async move {
        socket::Connection::new(socket, shared, id, peer)
            .run()
            .await;
        drop(permit);
    })
}
