//! The web gateway: the embedded web UI, the `/ws` conversation socket,
//! `/healthz`, `/readyz` and `/metrics`, admission limits (global and per
//! client address), `Host` and origin checks, HTTP connection limits and
//! graceful shutdown.
//!
//! One [`Server`] holds the engine (set once it has loaded, which makes
//! `/readyz` answer 200), the metrics and the shutdown signal. Every request
//! passes the gate first (`Host`, client address, request rate); each
//! accepted socket runs one `session::Conversation`; browser-protocol types
//! stay in [`protocol`].

mod admission;
mod assets;
mod clients;
#[doc(hidden)]
pub mod fuzzing;
mod http;
pub mod metrics;
pub(crate) mod net;
mod protocol;
mod record;
mod socket;
mod twilio;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::engine::Engine;
use crate::engine::pool::Pool;
use crate::ledger::Ledger;
use crate::session::SessionLimits;
use clients::Clients;
pub use net::check_settings;
use net::{Hosts, IpNet};

pub use metrics::Metrics;

/// Reply audio rate announced in `ready`; engine audio at another rate is
/// resampled to it.
pub const REPLY_RATE_HZ: u32 = 24_000;

/// Socket buffer sizes: small, so that a thousand idle sockets stay cheap.
/// The socket library zeroes the free part of its read buffer (up to this
/// size) before every read, so a small one is also cheaper per frame; a
/// larger message is still read whole, over several reads.
const READ_BUFFER_BYTES: usize = 4 * 1024;
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Open connections allowed on `server.metrics_listen`, apart from the
/// main listener's, so that a flood there cannot hide the metrics.
const METRICS_CONNECTIONS: usize = 64;

/// Everything the handlers share.
struct Shared {
    config: Config,
    limits: SessionLimits,
    /// The engines conversations are placed on, once loaded.
    engine: OnceLock<Pool>,
    metrics: Arc<Metrics>,
    admission: Arc<Semaphore>,
    /// Conversations and request rates per client address.
    clients: Arc<Clients>,
    /// `server.trusted_proxies`, parsed.
    trusted: Vec<IpNet>,
    shutdown: watch::Receiver<bool>,
    next_id: AtomicU64,
    /// Where conversations and their cost are recorded, when set.
    ledger: OnceLock<Ledger>,
    /// Random, per process: conversation ids are `{instance}-{connection}`,
    /// unique across restarts and across gateways sharing a ledger.
    instance: String,
    /// Phone calls answered and their tokens.
    calls: twilio::Calls,
    /// Conversations a client may re-attach to.
    resumable: socket::Resumable,
}

/// Completes at `at`; never, without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// 48 random bits in hex, from the standard library's per-process random
/// hash keys.
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("{:012x}", hasher.finish() >> 16)
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
        let server = &config.server;
        let shared = Shared {
            config: config.clone(),
            limits: SessionLimits::from_config(config),
            engine: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
            admission: Arc::new(Semaphore::new(server.max_sessions as usize)),
            clients: Arc::new(Clients::new(
                server.max_sessions_per_client,
                server.connections_per_minute_per_client,
                server.max_sessions,
            )),
            // Entries that do not parse are refused by the configuration check.
            trusted: server
                .trusted_proxies
                .iter()
                .filter_map(|p| IpNet::parse(p).ok())
                .collect(),
            shutdown: rx,
            next_id: AtomicU64::new(1),
            ledger: OnceLock::new(),
            instance: instance_id(),
            calls: twilio::Calls::new(&config.telephony.twilio_auth_token),
            resumable: socket::Resumable::default(),
        };
        Self {
            shared: Arc::new(shared),
            shutdown: Arc::new(tx),
        }
    }

    /// Hands over the loaded engine; `/readyz` says ready from now on. A
    /// second engine is refused.
    pub fn set_engine(&self, engine: Arc<dyn Engine>) -> Result<(), String> {
        self.set_pool(Pool::single(engine))
    }

    /// Hands over the loaded engine instances (`[[engine.instances]]`);
    /// `/readyz` says ready from now on. A second set is refused.
    pub fn set_pool(&self, pool: Pool) -> Result<(), String> {
        self.shared
            .engine
            .set(pool)
            .map_err(|_| "the engine is already set".to_owned())?;
        self.shared.metrics.set_ready(true);
        Ok(())
    }

    /// Hands over the ledger: from now on every conversation is recorded,
    /// and none starts while the ledger cannot be written. A second one is
    /// refused.
    pub fn set_ledger(&self, ledger: Ledger) -> Result<(), String> {
        self.shared
            .ledger
            .set(ledger)
            .map_err(|_| "the ledger is already set".to_owned())
    }

    /// The ledger, once set.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.shared.ledger.get()
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

    /// The routes of the main listener, behind the gate; `/metrics` only
    /// when it has no listener of its own.
    fn app(&self, hosts: Arc<Hosts>, with_metrics: bool) -> Router {
        let mut routes = Router::new()
            .route("/ws", get(admission::upgrade))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/api/engine", get(engine_info))
            .route("/api/tokens", post(issue_token))
            .route(twilio::VOICE_PATH, post(twilio::voice))
            .route(twilio::STREAM_PATH, get(twilio::upgrade));
        if with_metrics {
            routes = routes.route("/metrics", get(metrics_text));
        }
        let gate = Gate {
            shared: Arc::clone(&self.shared),
            hosts,
            rate_limited: true,
        };
        routes
            .fallback(get(assets::serve))
            .with_state(Arc::clone(&self.shared))
            .layer(middleware::from_fn_with_state(gate, gatekeeper))
    }

    /// The routes of `server.metrics_listen`: `/metrics` alone, with the
    /// `Host` check but no request rate.
    fn metrics_app(&self, hosts: Arc<Hosts>) -> Router {
        let gate = Gate {
            shared: Arc::clone(&self.shared),
            hosts,
            rate_limited: false,
        };
        Router::new()
            .route("/metrics", get(metrics_text))
            .with_state(Arc::clone(&self.shared))
            .layer(middleware::from_fn_with_state(gate, gatekeeper))
    }

    /// Serves until `stop` completes, then shuts down gracefully: stops
    /// accepting, lets conversations close for `server.shutdown_grace_ms`,
    /// and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_with_metrics(listener, None, stop).await
    }

    /// [`Server::serve`], with `/metrics` served on `metrics` alone when it
    /// is given (`server.metrics_listen`) instead of on `listener`.
    pub async fn serve_with_metrics(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let config = &self.shared.config.server;
        let timeouts = http::Timeouts {
            header_read: Duration::from_millis(u64::from(config.header_read_timeout_ms)),
            keepalive: Duration::from_millis(u64::from(config.keepalive_timeout_ms)),
        };
        let hosts = |listener: &TcpListener| -> std::io::Result<Arc<Hosts>> {
            Ok(Arc::new(Hosts::new(
                &config.allowed_hosts,
                listener.local_addr()?,
            )))
        };
        let main = http::Listener {
            app: self.app(hosts(&listener)?, metrics.is_none()),
            listener,
            slots: Arc::new(Semaphore::new(config.max_connections as usize)),
            timeouts,
        };
        let side = match metrics {
            Some(listener) => Some(http::Listener {
                app: self.metrics_app(hosts(&listener)?),
                listener,
                slots: Arc::new(Semaphore::new(METRICS_CONNECTIONS)),
                timeouts,
            }),
            None => None,
        };
        let me = self.clone();
        let stopping = tokio::spawn(async move {
            stop.await;
            me.shut_down();
        });
        // Both accept loops end, closing their listeners, once shutdown
        // begins; connections still serving requests finish them, idle
        // ones close.
        let (counters, shutdown) = (&self.shared.metrics, &self.shared.shutdown);
        let serving_side = async {
            if let Some(side) = side {
                http::accept(side, Arc::clone(counters), shutdown.clone()).await;
            }
        };
        tokio::join!(
            http::accept(main, Arc::clone(counters), shutdown.clone()),
            serving_side
        );
        // Upgraded sockets outlive their HTTP connections: wait for them.
        let grace = Duration::from_millis(u64::from(config.shutdown_grace_ms));
        let _ = tokio::time::timeout(grace, self.shared.metrics.all_closed()).await;
        stopping.abort();
        Ok(())
    }
}

/// What the gate checks with: the server, the `Host`s its listener answers
/// for, and whether requests count toward the per-client rate.
#[derive(Clone)]
struct Gate {
    shared: Arc<Shared>,
    hosts: Arc<Hosts>,
    rate_limited: bool,
}

/// What the gate learned about a request, for the `/ws` handler.
#[derive(Debug, Clone)]
struct Caller {
    /// The client address limits count under (see [`net::client_key`]).
    client: IpAddr,
    /// A trusted proxy says the client spoke HTTPS to it.
    https: bool,
    /// Over the request rate: a WebSocket is accepted, then closed.
    rate_limited: bool,
    hosts: Arc<Hosts>,
}

/// Every request passes here first: a `Host` that is not ours gets 421
/// (probes excepted: they tell nothing and load balancers send them by IP),
/// the client address is worked out, and requests (probes and `/metrics`
/// excepted) count toward the address's rate; past it, 429.
async fn gatekeeper(
    State(gate): State<Gate>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    use metrics::Refusal;
    let path = request.uri().path();
    let probe = matches!(path, "/healthz" | "/readyz");
    let counted = gate.rate_limited && !probe && path != "/metrics";
    let socket = path == "/ws" && is_websocket_upgrade(request.headers());
    let authority = match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok()),
    };
    if !probe && !authority.is_some_and(|a| gate.hosts.allows_authority(a)) {
        gate.shared.metrics.refused(Refusal::Host);
        let message = "421 this server does not answer for that host name (server.allowed_hosts)\n";
        return (StatusCode::MISDIRECTED_REQUEST, message).into_response();
    }
    let trusted = &gate.shared.trusted;
    let headers = request.headers();
    let from_proxy = trusted.iter().any(|net| net.contains(peer.ip()));
    let client = net::client_key(net::client_ip(peer.ip(), headers, trusted));
    let https = from_proxy && net::forwarded_https(headers);
    let mut rate_limited = false;
    if counted && let Err(wait) = gate.shared.clients.arrive(client) {
        if socket {
            // Refused after the upgrade, so that a browser sees the reason.
            rate_limited = true;
        } else {
            gate.shared.metrics.refused(Refusal::RateLimited);
            let seconds = wait.as_secs() + 1;
            let message =
                format!("429 too many requests from this address; try again in {seconds} s\n");
            let retry = [(header::RETRY_AFTER, seconds.to_string())];
            return (StatusCode::TOO_MANY_REQUESTS, retry, message).into_response();
        }
    }
    request.extensions_mut().insert(Caller {
        client,
        https,
        rate_limited,
        hosts: Arc::clone(&gate.hosts),
    });
    next.run(request).await
}

/// `Connection: upgrade` with `Upgrade: websocket`.
fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let ledger_down = shared.ledger.get().is_some_and(|ledger| !ledger.healthy());
    if shared.metrics.is_ready() && ledger_down {
        // A load balancer sends new conversations elsewhere meanwhile.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the ledger cannot be written\n",
        )
            .into_response()
    } else if shared.metrics.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if *shared.shutdown.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the engine is loading\n").into_response()
    }
}

/// Most bytes of a `POST /api/tokens` body (its optional restrictions).
const MAX_TOKEN_REQUEST_BYTES: usize = 4 * 1024;

/// `POST /api/tokens` with `Authorization: Bearer sk_…`: a one-time client
/// token for a browser's `hello`, tied to the key; the body may name an
/// `engine`, `voice` or `language` the token is limited to.
async fn issue_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let refuse = |status: StatusCode, code: &str, message: &str| {
        let body = serde_json::json!({"error": code, "message": message});
        (status, axum::Json(body)).into_response()
    };
    let Some(ledger) = shared.ledger.get() else {
        let message = "keys and tokens live in the ledger, which this server does not have";
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger_unavailable",
            message,
        );
    };
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|secret| !secret.is_empty());
    let Some(secret) = secret else {
        let message = "send the API key as Authorization: Bearer sk_…";
        return refuse(StatusCode::UNAUTHORIZED, "unauthorized", message);
    };
    if body.len() > MAX_TOKEN_REQUEST_BYTES {
        let message = format!("the body is over {MAX_TOKEN_REQUEST_BYTES} bytes");
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "bad_request", &message);
    }
    let restrictions = if body.iter().all(u8::is_ascii_whitespace) {
        crate::ledger::keys::Restrictions::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(restrictions) => restrictions,
            Err(e) => {
                let message = format!(
                    "the body is a JSON object with optional engine, voice and language: {e}"
                );
                return refuse(StatusCode::BAD_REQUEST, "bad_request", &message);
            }
        }
    };
    let ttl = shared.config.server.client_token_ttl_s;
    match ledger.issue_token(secret, ttl, &restrictions).await {
        Ok(token) => axum::Json(token).into_response(),
        Err(crate::ledger::keys::AuthError::Ledger(e)) => {
            tracing::warn!(
                "a client token could not be issued: {}",
                crate::redact::urls_in(&e.to_string())
            );
            let message = "the ledger cannot be written now; try again later";
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                message,
            )
        }
        Err(e) => refuse(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()),
    }
}

/// The engines, their voices and whether they have room, for the UI's
/// menus and for operators.
async fn engine_info(State(shared): State<Arc<Shared>>) -> Response {
    let pool = shared.engine.get();
    let instances: Vec<serde_json::Value> = pool
        .map(|pool| pool.instances().iter().map(|i| instance_info(i)).collect())
        .unwrap_or_default();
    let body = serde_json::json!({
        "engine": pool.and_then(|p| p.instances().first()).map(|i| i.name()),
        "ready": shared.metrics.is_ready(),
        "language": shared.config.engine.language,
        "voices": pool.map(Pool::voices).unwrap_or_default(),
        "instances": instances,
        "queue": {
            "waiting": pool.map_or(0, Pool::waiting),
            "max": pool.map_or(0, |p| p.settings().queue_max),
        },
        "protocol": protocol::VERSION,
        "token_url": shared.config.server.client_token_url,
    });
    axum::Json(body).into_response()
}

fn instance_info(instance: &crate::engine::pool::Instance) -> serde_json::Value {
    let cooling = instance.cooling().map_or(0, |d| d.as_millis());
    serde_json::json!({
        "name": instance.name(),
        "kind": instance.kind(),
        "voices": instance.engine().voices(),
        "max_concurrent": instance.max_concurrent(),
        "active": instance.active(),
        "available": instance.available(),
        "cooling_ms": u64::try_from(cooling).unwrap_or(u64::MAX),
    })
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> Response {
    let mut text = shared.metrics.render();
    if let Some(pool) = shared.engine.get() {
        metrics::render_engines(&mut text, pool);
    }
    if let Some(ledger) = shared.ledger.get() {
        metrics::render_ledger(&mut text, ledger);
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
