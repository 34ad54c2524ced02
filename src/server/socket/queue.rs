//! The wait for a place on an engine instance: the client is told its
//! position (`queued`) whenever it changes, audio it sends meanwhile is
//! dropped unheard, and the wait ends with a place, a refusal (1013) at
//! `engine.queue_timeout_s`, the client leaving (`stop`, close) or the
//! server shutting down.

use axum::extract::ws::Message;

use super::super::metrics::Refusal;
use super::super::protocol::{self, ClientMessage, ErrorCode, ProtocolError, ServerMessage};
use super::{
    CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TRY_AGAIN, Connection, ENGINE_BUSY_REASON, shutting_down,
};
use crate::engine::pool::{Entry, Slot, Waited};

/// What woke a waiting connection.
enum Woke {
    Waited(Waited),
    Frame(Option<Result<Message, axum::Error>>),
    ShuttingDown,
}

impl Connection {
    /// Waits in the queue; `None` (after telling the client) when the wait
    /// ends without a place.
    pub(super) async fn wait_for_place(&mut self, mut entry: Entry, token: &str) -> Option<Slot> {
        let mut shutdown = self.shared.shutdown.clone();
        let mut position = entry.position();
        if !self.send_queued(position, entry.waiting()).await {
            return None;
        }
        self.span.in_scope(|| {
            tracing::info!(
                position,
                "every engine that fits is full: waiting for a place"
            );
        });
        loop {
            let woke = tokio::select! {
                waited = entry.next() => Woke::Waited(waited),
                frame = super::receive(&mut self.socket) => Woke::Frame(frame),
                () = shutting_down(&mut shutdown) => Woke::ShuttingDown,
            };
            match woke {
                Woke::Waited(Waited::Placed(slot)) => return Some(slot),
                Woke::Waited(Waited::Moved(now)) => {
                    position = now;
                    if !self.send_queued(position, entry.waiting()).await {
                        return None;
                    }
                }
                Woke::Waited(Waited::TimedOut) => {
                    let timeout = self.shared.config.engine.queue_timeout_s;
                    let message = format!("no engine had room within {timeout} s; try again later");
                    self.refuse_busy(Refusal::QueueTimeout, &message, token)
                        .await;
                    return None;
                }
                Woke::ShuttingDown => {
                    self.close(CLOSE_GOING_AWAY, "the server is shutting down")
                        .await;
                    return None;
                }
                Woke::Frame(frame) => {
                    if !self.size_ok(&frame).await {
                        return None;
                    }
                    match frame {
                        // Nobody hears audio before `ready`.
                        Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Text(text))) => {
                            if let Ok(ClientMessage::Stop) = protocol::parse_client(&text) {
                                self.release_token(token).await;
                                self.close(CLOSE_NORMAL, "stopped while waiting for an engine")
                                    .await;
                                return None;
                            }
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                            self.release_token(token).await;
                            return None;
                        }
                    }
                }
            }
        }
    }

    async fn send_queued(&mut self, position: usize, waiting: usize) -> bool {
        let message = ServerMessage::Queued { position, waiting };
        self.send_message(&message).await
    }

    /// Refuses a conversation no engine can take now, like a full server:
    /// the client may try again (1013).
    pub(super) async fn refuse_busy(&mut self, why: Refusal, message: &str, token: &str) {
        self.shared.metrics.refused(why);
        self.release_token(token).await;
        let error = ProtocolError::new(ErrorCode::EngineBusy, message);
        self.send_error(&error, true).await;
        self.close(CLOSE_TRY_AGAIN, ENGINE_BUSY_REASON).await;
    }
}
