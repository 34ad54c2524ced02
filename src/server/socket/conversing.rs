//! The loop of a running conversation: client frames in, conversation
//! outputs out (a whole batch per wake-up, flushed once), `stats` every
//! second, and the server's shutdown passed on.

use std::time::Duration;

use axum::extract::ws::Message;
use tokio::time::Instant;

use super::super::protocol::{
    ClientMessage, ErrorCode, ProtocolError, ServerMessage, Stats, parse_client,
};
use super::{Connection, Exit, Running, shutting_down};
use crate::session::{ClientInput, CloseReason, OUTPUT_CAPACITY};

/// How often a running conversation gets a `stats` message.
const STATS_EVERY: Duration = Duration::from_secs(1);

impl Connection {
    pub(super) async fn converse(&mut self, running: &mut Running) -> Exit {
        let mut shutdown = self.shared.shutdown.clone();
        // Made once: a fresh wait on the server-wide channel at every
        // wake-up registered and dropped a waiter each time.
        let shutdown = shutting_down(&mut shutdown);
        tokio::pin!(shutdown);
        let mut shutdown_sent = false;
        let mut stats = tokio::time::interval_at(Instant::now() + STATS_EVERY, STATS_EVERY);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                output = running.handle.output.recv() => {
                    let Some(output) = output else {
                        return Exit::Lost(None);
                    };
                    if let Some(exit) = self.on_outputs(running, output).await {
                        return exit;
                    }
                }
                frame = self.socket.recv(), if !running.client_gone => {
                    if !self.on_frame(running, frame).await {
                        running.client_gone = true;
                        let _ = running.handle.input.try_send(ClientInput::Stop);
                    }
                }
                // `stats` only once the client has its `ready`.
                _ = stats.tick(), if !running.client_gone && running.ready => {
                    let snapshot = running.handle.counters.snapshot();
                    let message = Stats::new(&snapshot, running.turns, &running.latency_ms);
                    if !self.send_message(&ServerMessage::Stats(message)).await {
                        return Exit::Lost(Some(CloseReason::SlowClient));
                    }
                }
                () = &mut shutdown, if !shutdown_sent => {
                    shutdown_sent = true;
                    running.handle.shutdown();
                }
            }
        }
    }

    /// `first` and whatever else the conversation has ready, written with
    /// one flush; `Some` when the connection is done.
    async fn on_outputs(
        &mut self,
        running: &mut Running,
        first: crate::session::ClientOutput,
    ) -> Option<Exit> {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(output) = next {
            if let Some(exit) = self.on_output(running, output).await {
                return Some(exit);
            }
            taken += 1;
            next = if taken < OUTPUT_CAPACITY {
                running.handle.output.try_recv().ok()
            } else {
                None
            };
        }
        if running.client_gone || self.flush().await {
            return None;
        }
        Some(self.write_failed(running))
    }

    /// One client frame; `false` when the client is gone.
    async fn on_frame(
        &mut self,
        running: &mut Running,
        frame: Option<Result<Message, axum::Error>>,
    ) -> bool {
        if !self.size_ok(&frame).await {
            return false;
        }
        let input = match frame {
            // After `stop` the conversation reads no more input: what the
            // client still sends is dropped, and its `end` still comes.
            Some(Ok(Message::Binary(_) | Message::Text(_))) if running.stopped => return true,
            Some(Ok(Message::Binary(bytes))) => ClientInput::Audio(bytes),
            Some(Ok(Message::Text(text))) => match parse_client(&text) {
                Ok(ClientMessage::Text(text)) => ClientInput::Text(text),
                Ok(ClientMessage::ToolResult { id, result }) => {
                    if !running.tool_calls.remove(&id) {
                        let shown: String = id.chars().take(64).collect();
                        let error = ProtocolError::new(
                            ErrorCode::UnknownToolCall,
                            format!(
                                "no open tool call has the id {shown:?}: a result is taken once, for a call this conversation sent"
                            ),
                        );
                        return self.send_error(&error, false).await;
                    }
                    ClientInput::ToolResult { id, json: result }
                }
                Ok(ClientMessage::Stop) => {
                    running.stopped = true;
                    ClientInput::Stop
                }
                Ok(ClientMessage::Hello(_)) => {
                    let error = ProtocolError::new(
                        ErrorCode::DuplicateHello,
                        "this conversation already has its hello; open a new socket for another",
                    );
                    return self.send_error(&error, false).await;
                }
                Err(error) => return self.send_error(&error, false).await,
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return true,
            Some(Ok(Message::Close(_))) | None => return false,
            Some(Err(e)) => {
                self.read_failed(&e).await;
                return false;
            }
        };
        // A full input channel holds this client back: that is the point.
        // A conversation that has ended takes no more input; its `end` is
        // on the way, so the client is not gone: the frame is dropped.
        let _ = running.handle.input.send(input).await;
        true
    }
}
