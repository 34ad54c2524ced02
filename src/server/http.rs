//! The HTTP/1.1 listener under the routes: an accept loop with a cap on
//! open TCP connections, TCP_NODELAY, `ConnectInfo`, upgrades for `/ws`,
//! a deadline for request heads and one for idle keep-alive connections,
//! and graceful shutdown.
//!
//! hyper's own `header_read_timeout` is not used: its clock starts as soon
//! as a connection is idle, so it cannot give an idle keep-alive connection
//! longer than a slow request head. Each connection here has a watchdog
//! instead, fed by what its socket reads and writes and by the requests in
//! flight:
//!
//! - before the first request, the whole head must come within
//!   `header_read_timeout` of the accept;
//! - between requests, the connection may sit silent for `keepalive`;
//!   once the next request's first byte arrives, its head must be complete
//!   within `header_read_timeout`;
//! - while a handler runs, nothing is timed; while a response is written,
//!   every write restarts the idle clock.
//!
//! A connection upgraded to a WebSocket leaves hyper and its watchdog: the
//! conversation has its own timeouts. It still holds its place among
//! `server.max_connections` until the socket closes.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower_service::Service;

use super::metrics::{HttpTimeout, Metrics, Refusal};

const ORDER: Ordering = Ordering::Relaxed;

/// The time limits of one listener's HTTP connections.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    pub(super) header_read: Duration,
    pub(super) keepalive: Duration,
}

/// One listener: its routes, its share of connections and its limits.
pub(super) struct Listener {
    pub(super) listener: TcpListener,
    pub(super) app: Router,
    pub(super) slots: Arc<Semaphore>,
    pub(super) timeouts: Timeouts,
}

/// Accepts connections until the server shuts down, then drops the
/// listener. Past the connection cap a new connection is closed at once.
pub(super) async fn accept(
    mut listener: Listener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener.listener) => accepted,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        let Ok(permit) = Arc::clone(&listener.slots).try_acquire_owned() else {
            metrics.refused(Refusal::MaxConnections);
            drop(stream);
            continue;
        };
        // Small frames both ways: never wait to coalesce them (Nagle).
        let _ = stream.set_nodelay(true);
        metrics.connection_opened();
        let slot = Slot {
            _permit: permit,
            metrics: Arc::clone(&metrics),
        };
        tokio::spawn(connection(
            stream,
            peer,
            slot,
            listener.app.clone(),
            listener.timeouts,
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
    }
}

/// Serves one connection until it closes, is upgraded, times out, or has
/// finished its requests after the server began shutting down.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    app: Router,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        stream,
        activity: Arc::clone(&activity),
        _slot: slot,
    });
    let requests = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let busy = Busy::begin(Arc::clone(&requests));
        request.extensions_mut().insert(ConnectInfo(peer));
        let call = app.clone().call(request);
        async move {
            let response: Result<Response, Infallible> = call.await;
            drop(busy);
            response
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // The watchdog below times request heads and idle connections.
    http.header_read_timeout(None);
    let mut conn = pin!(http.serve_connection(io, service).with_upgrades());
    let mut watchdog = pin!(activity.expired(timeouts));
    let mut draining = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            why = &mut watchdog => {
                metrics.connection_timed_out(why);
                return;
            }
            _ = shutdown.wait_for(|down| *down), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// A place among the listener's connections, and the open-connections
/// gauge; both are given back when the socket is dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

/// What a connection has been doing, in milliseconds since its accept.
struct Activity {
    accepted: Instant,
    /// Requests whose handler is running.
    busy: AtomicU32,
    /// At least one request has reached a handler.
    served: AtomicBool,
    /// When the last handler finished.
    idle_since: AtomicU64,
    /// The first byte read since then, or [`Activity::NONE`].
    first_read: AtomicU64,
    last_write: AtomicU64,
    /// Wakes the watchdog when a deadline comes closer: the first byte of
    /// a request on an idle connection.
    sooner: Notify,
}

impl Activity {
    const NONE: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            accepted: Instant::now(),
            busy: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            first_read: AtomicU64::new(Self::NONE),
            last_write: AtomicU64::new(0),
            sooner: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.accepted.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn read(&self) {
        if self.busy.load(ORDER) == 0 && self.first_read.load(ORDER) == Self::NONE {
            self.first_read.store(self.now(), ORDER);
            self.sooner.notify_one();
        }
    }

    fn wrote(&self) {
        self.last_write.store(self.now(), ORDER);
    }

    /// When the connection has waited too long, and for what; `None` while
    /// a handler runs.
    fn deadline(&self, timeouts: Timeouts) -> Option<(u64, HttpTimeout)> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4);
        if self.busy.load(ORDER) > 0 {
            return None;
        }
        let header = (ms(timeouts.header_read), HttpTimeout::Header);
        if !self.served.load(ORDER) {
            return Some(header);
        }
        let last_write = self.last_write.load(ORDER);
        match self.first_read.load(ORDER) {
            Self::NONE => {
                let since = self.idle_since.load(ORDER).max(last_write);
                Some((since + ms(timeouts.keepalive), HttpTimeout::Idle))
            }
            first => Some((first.max(last_write) + header.0, header.1)),
        }
    }

    /// Completes once the connection is past its deadline. Deadlines only
    /// move later, except when a request starts on an idle connection,
    /// which wakes this early.
    async fn expired(&self, timeouts: Timeouts) -> HttpTimeout {
        let recheck = timeouts.header_read.min(timeouts.keepalive);
        loop {
            let now = self.now();
            let wait = match self.deadline(timeouts) {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => Duration::from_millis(at - now),
                None => recheck,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.sooner.notified() => {}
            }
        }
    }
}

/// A request in a handler; dropping it marks the connection idle.
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, ORDER);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.idle_since.store(activity.now(), ORDER);
        activity.first_read.store(Activity::NONE, ORDER);
        activity.served.store(true, ORDER);
        activity.busy.fetch_sub(1, ORDER);
    }
}

/// The TCP stream, telling [`Activity`] what it reads and writes, and
/// holding the connection's [`Slot`].
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
    _slot: Slot,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Timeouts = Timeouts {
        header_read: Duration::from_millis(100),
        keepalive: Duration::from_millis(1_000),
    };

    #[test]
    fn deadlines_follow_the_connection() {
        let activity = Arc::new(Activity::new());
        // A new connection must send its head within the header timeout.
        assert_eq!(activity.deadline(LIMITS), Some((100, HttpTimeout::Header)));
        let busy = Busy::begin(Arc::clone(&activity));
        activity.read();
        assert_eq!(activity.deadline(LIMITS), None, "a handler runs");
        drop(busy);
        // Idle: the keep-alive timeout from the end of the request.
        let idle = activity.idle_since.load(ORDER);
        assert_eq!(
            activity.deadline(LIMITS),
            Some((idle + 1_000, HttpTimeout::Idle))
        );
        // Writing the response moves it on.
        activity.last_write.store(idle + 50, ORDER);
        assert_eq!(
            activity.deadline(LIMITS),
            Some((idle + 1_050, HttpTimeout::Idle))
        );
        // The next request's first byte starts the header clock.
        activity.read();
        let first = activity.first_read.load(ORDER);
        assert_ne!(first, Activity::NONE);
        assert_eq!(
            activity.deadline(LIMITS),
            Some((first.max(idle + 50) + 100, HttpTimeout::Header))
        );
    }
}
