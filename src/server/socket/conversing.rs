//! The loop of a running conversation: client frames in, conversation
//! outputs out (a whole batch per wake-up, flushed once), `stats` every
//! second, and the server's shutdown passed on.

use std::time::Duration;

use axum::extract::ws::Message;
use tokio::time::Instant;

use super::super::protocol::{
    ClientMessage, ErrorCode, ProtocolError, ServerMessage, Stats, parse_client,
};
use super::super::sleep_until;
use super::resume::{SILENCE_EVERY, next_attach};
use super::{Connection, Exit, Running, receive, shutting_down};
use crate::session::{ClientInput, OUTPUT_CAPACITY};

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
        let mut silence = tokio::time::interval(SILENCE_EVERY);
        silence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let attached = self.socket.is_some() && !running.client_gone;
            let away_until = running.resume.as_ref().and_then(|slot| slot.away_until);
            tokio::select! {
                output = running.handle.output.recv() => {
                    let Some(output) = output else {
                        // The end may be waiting behind usage deltas.
                        while running.usage.committing() {
                            let settled = running.usage.settled().await;
                            if let Some(exit) = self.on_usage_settled(running, settled).await {
                                return exit;
                            }
                        }
                        return Exit::Lost(None);
                    };
                    if let Some(exit) = self.on_outputs(running, output).await {
                        return exit;
                    }
                }
                frame = receive(&mut self.socket), if attached => {
                    match self.on_frame(running, frame).await {
                        Read::Go => {}
                        Read::Dropped if self.detach(running) => {}
                        Read::Dropped | Read::Closed => {
                            running.client_gone = true;
                            let _ = running.handle.input.try_send(ClientInput::Stop);
                        }
                    }
                }
                // `stats` only once the client has its `ready`; a ping with
                // it asks the client's socket to acknowledge what it has.
                _ = stats.tick(), if attached && running.ready => {
                    let snapshot = running.handle.counters.snapshot();
                    let message = Stats::new(&snapshot, running.turns, &running.latency_ms);
                    let text = ServerMessage::Stats(message).to_text();
                    // The ping goes out in the same write as the `stats` it
                    // follows: one system call a second, not two.
                    let mut written = self.feed(Message::Text(text.into())).await;
                    if written
                        && running.resume.is_some()
                        && let Some(ping) = self.replay.as_ref().map(|r| r.ping())
                    {
                        written = self.feed(ping).await;
                    }
                    if !(written && self.flush().await)
                        && let Some(exit) = self.write_failed(running)
                    {
                        return exit;
                    }
                }
                settled = running.usage.settled(), if running.usage.committing() => {
                    if let Some(exit) = self.on_usage_settled(running, settled).await {
                        return exit;
                    }
                }
                attach = next_attach(&mut running.resume), if !running.client_gone => {
                    if let Some(attach) = attach
                        && let Some(exit) = self.reattach(running, attach).await
                    {
                        return exit;
                    }
                }
                _ = silence.tick(), if away_until.is_some() => Self::give_silence(running),
                () = sleep_until(away_until) => self.expire(running),
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
        self.write_failed(running)
    }

    /// One client frame.
    async fn on_frame(
        &mut self,
        running: &mut Running,
        frame: Option<Result<Message, axum::Error>>,
    ) -> Read {
        if !self.size_ok(&frame).await {
            return Read::Closed;
        }
        let input = match frame {
            // After `stop` the conversation reads no more input: what the
            // client still sends is dropped, and its `end` still comes.
            Some(Ok(Message::Binary(_) | Message::Text(_))) if running.stopped => return Read::Go,
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
                        return sent(self.send_error(&error, false).await);
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
                    return sent(self.send_error(&error, false).await);
                }
                Err(error) => return sent(self.send_error(&error, false).await),
            },
            Some(Ok(pong @ Message::Pong(_))) => {
                super::resume::pong(self, &pong);
                return Read::Go;
            }
            Some(Ok(Message::Ping(_))) => return Read::Go,
            // A close the client chose ends the conversation; a connection
            // lost without one may come back.
            Some(Ok(Message::Close(_))) => return Read::Closed,
            None => return Read::Dropped,
            Some(Err(e)) => {
                if super::is_too_large(&e) {
                    self.read_failed(&e).await;
                    return Read::Closed;
                }
                return Read::Dropped;
            }
        };
        // A full input channel holds this client back: that is the point.
        // A conversation that has ended takes no more input; its `end` is
        // on the way, so the client is not gone: the frame is dropped.
        let _ = running.handle.input.send(input).await;
        Read::Go
    }
}

/// A reply written (`Go`), or a socket that took no more.
fn sent(written: bool) -> Read {
    if written { Read::Go } else { Read::Dropped }
}

/// What reading one client frame left.
enum Read {
    /// The conversation goes on with this client.
    Go,
    /// The client closed the connection, or broke a rule and was closed.
    Closed,
    /// The connection was lost (or a reply could not be written to it).
    Dropped,
}
