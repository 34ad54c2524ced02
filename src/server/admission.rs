//! `/ws` upgrades: the origin check, the socket's size limits, refusals
//! after the upgrade (so a browser sees the close code and reason), and
//! the places an admitted conversation holds until it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Extension, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::OwnedSemaphorePermit;

use super::clients::ClientPermit;
use super::{Caller, READ_BUFFER_BYTES, Shared, WRITE_BUFFER_BYTES, metrics, net, socket};
use crate::engine::Engine as _;

/// A conversation's places: one of `server.max_sessions` and one of its
/// address's `server.max_sessions_per_client`. Both are given back when it
/// is dropped.
#[derive(Debug)]
struct Admitted {
    _server: OwnedSemaphorePermit,
    _client: ClientPermit,
}

pub(super) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Response {
    use metrics::Refusal;
    // An origin that is not text is no origin of ours.
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or_default());
    let listed = &shared.config.server.allowed_origins;
    if !net::origin_allowed(origin, listed, &caller.hosts, caller.https) {
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
    } else if caller.rate_limited {
        Some((
            Refusal::RateLimited,
            socket::CLOSE_TRY_AGAIN,
            "rate_limited: too many new connections from this address; try again later",
        ))
    } else {
        None
    };
    if let Some((why, code, reason)) = refusal {
        shared.metrics.refused(why);
        return ws.on_upgrade(move |socket| socket::refuse(socket, code, reason));
    }
    // A client re-attaching to its conversation (`/ws?resume`) needs no
    // place of its own: the conversation kept its places.
    let resuming = uri
        .query()
        .is_some_and(|query| query.split('&').any(|pair| pair == "resume"));
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let span = crate::telemetry::connection_span(id, caller.client);
    let full = |ws: WebSocketUpgrade, why: Refusal, reason: &'static str| {
        let shared = Arc::clone(&shared);
        let span = span.clone();
        ws.on_upgrade(move |socket| async move {
            if resuming {
                socket::Connection::new(socket, shared, id, peer, span)
                    .resume_or_refuse(why, socket::CLOSE_TRY_AGAIN, reason)
                    .await;
            } else {
                shared.metrics.refused(why);
                socket::refuse(socket, socket::CLOSE_TRY_AGAIN, reason).await;
            }
        })
    };
    let Some(client) = shared.clients.enter(caller.client) else {
        return full(
            ws,
            Refusal::ClientBusy,
            "client_busy: too many conversations from this address; end one or try again later",
        );
    };
    let Ok(server) = Arc::clone(&shared.admission).try_acquire_owned() else {
        return full(
            ws,
            Refusal::Busy,
            "the server is busy: too many conversations; try again later",
        );
    };
    let admitted = Admitted {
        _server: server,
        _client: client,
    };
    ws.on_upgrade(move |socket| async move {
        // The connection enters its span itself: not on every frame.
        socket::Connection::new(socket, shared, id, peer, span)
            .run()
            .await;
        // The conversation is over: its places are free.
        drop(admitted);
    })
}
