//! Conversations that outlive their socket.
//!
//! A conversation's `ready` carries a `resume` secret. When its socket drops
//! without `stop`, the conversation is *detached*: the engine goes on, what
//! it says is kept (`replay.rs`), the user's audio is taken as silence, and
//! after `server.resume_window_ms` it ends with `resume_expired`. A new
//! socket whose hello carries the secret and the `seq` of the last frame its
//! client received is handed to the conversation, which sends what was
//! missed, then `resumed`, and goes on. A client that comes back while the
//! server still writes to its old socket (one dropped without a word)
//! takes the conversation over the same way.
//!
//! Secrets are kept as their SHA-256 only.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::super::protocol::{ErrorCode, ProtocolError, Resume, ServerMessage};
use super::{CLOSE_POLICY, Connection, Exit, Running};
use crate::audio::AudioFormat;
use crate::config::ServerConfig;
use crate::session::{ClientInput, CloseReason};

/// How often a detached conversation is given silence for its client.
pub(super) const SILENCE_EVERY: Duration = Duration::from_millis(100);
/// Silence for [`SILENCE_EVERY`], at the engine's 16 kHz.
const SILENCE_SAMPLES: usize = 1_600;

/// Sockets waiting to be handed to a conversation, at most.
const ATTACH_QUEUE: usize = 2;

/// A new socket for a conversation, from a client that came back.
pub(crate) struct Attach {
    socket: WebSocket,
    last_seq: u64,
    audio: AudioFormat,
}

/// The running conversations a client may re-attach to, by the SHA-256 of
/// their secret.
#[derive(Default)]
pub(crate) struct Resumable {
    waiting: Mutex<HashMap<[u8; 32], mpsc::Sender<Attach>>>,
}

/// What a resumable conversation holds: its secret, where its client's
/// new sockets arrive, and until when it waits while its client is away.
pub(super) struct Slot {
    pub(super) secret: String,
    key: [u8; 32],
    attach: mpsc::Receiver<Attach>,
    window: Duration,
    pub(super) away_until: Option<Instant>,
}

impl Resumable {
    /// A slot for a new conversation; `None` when the server does not keep
    /// conversations for their clients (`server.resume_window_ms = 0`) or
    /// has no randomness for a secret.
    pub(super) fn register(&self, config: &ServerConfig) -> Option<Slot> {
        if config.resume_window_ms == 0 {
            return None;
        }
        let mut random = [0u8; 24];
        getrandom::fill(&mut random).ok()?;
        let secret: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let key = digest(&secret);
        let (tx, attach) = mpsc::channel(ATTACH_QUEUE);
        self.lock().insert(key, tx);
        Some(Slot {
            secret,
            key,
            attach,
            window: Duration::from_millis(u64::from(config.resume_window_ms)),
            away_until: None,
        })
    }

    fn forget(&self, key: &[u8; 32]) {
        self.lock().remove(key);
    }

    /// Hands `attach` to the conversation `secret` names; gives it back when
    /// there is none, or it is ending.
    fn hand_over(&self, secret: &str, attach: Attach) -> Result<(), Box<Attach>> {
        let Some(tx) = self.lock().get(&digest(secret)).cloned() else {
            return Err(Box::new(attach));
        };
        tx.try_send(attach).map_err(|e| match e {
            mpsc::error::TrySendError::Full(attach) | mpsc::error::TrySendError::Closed(attach) => {
                Box::new(attach)
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], mpsc::Sender<Attach>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The next socket for a resumable conversation; never, for another.
pub(super) async fn next_attach(slot: &mut Option<Slot>) -> Option<Attach> {
    match slot {
        Some(slot) => slot.attach.recv().await,
        None => std::future::pending().await,
    }
}

impl Running {
    /// Whether the client is away and the conversation waits for it.
    pub(super) fn away(&self) -> bool {
        self.resume
            .as_ref()
            .is_some_and(|slot| slot.away_until.is_some())
    }
}

impl Connection {
    /// A returning client's connection: its socket goes to the conversation
    /// its secret names, or it is told `resume_failed`.
    pub(super) async fn resume(&mut self, resume: Resume, audio: AudioFormat) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        let attach = Attach {
            socket,
            last_seq: resume.last_seq,
            audio,
        };
        match self.shared.resumable.hand_over(&resume.secret, attach) {
            Ok(()) => self.log_info("the client came back: its socket goes to its conversation"),
            Err(attach) => {
                self.socket = Some(attach.socket);
                self.resume_failed(
                    "no conversation waits for this resume secret: it ended, its window passed, or it never was; start a new one",
                )
                .await;
            }
        }
    }

    /// A socket the server (or its address) has no place for, from a client
    /// that says it is re-attaching: its socket goes to its conversation
    /// (which kept its places) if its hello names one; anything else is
    /// refused as it would have been (`why`, `code`, `reason`).
    pub(in crate::server) async fn resume_or_refuse(
        mut self,
        why: super::super::metrics::Refusal,
        code: u16,
        reason: &'static str,
    ) {
        let wait = Duration::from_millis(u64::from(self.shared.config.server.hello_timeout_ms));
        let deadline = Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, super::receive(&mut self.socket)).await;
            match frame {
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(Message::Text(text)))) => {
                    if let Ok(super::super::protocol::ClientMessage::Hello(hello)) =
                        super::super::protocol::parse_client(&text)
                        && let Some(resume) = hello.resume
                    {
                        self.resume(resume, hello.audio).await;
                        return;
                    }
                    break;
                }
                _ => break,
            }
        }
        self.shared.metrics.refused(why);
        self.close(code, reason).await;
    }

    async fn resume_failed(&mut self, message: &str) {
        let error = ProtocolError::new(ErrorCode::ResumeFailed, message);
        self.send_error(&error, true).await;
        self.close(CLOSE_POLICY, "resume_failed").await;
    }

    /// The client's socket dropped, or cannot be written to: `true` when the
    /// conversation now waits for the client to come back; `false` when it
    /// cannot (it is not resumable, or its client said `stop`).
    pub(super) fn detach(&mut self, running: &mut Running) -> bool {
        if running.stopped || running.client_gone {
            return false;
        }
        let Some(slot) = running.resume.as_mut() else {
            return false;
        };
        if slot.away_until.is_none() {
            slot.away_until = Some(Instant::now() + slot.window);
            self.shared.metrics.detached();
            self.log_info("the connection dropped: the conversation waits for its client");
        }
        // A half-written frame of the old socket is lost with it; the
        // frames it held are kept.
        self.socket = None;
        true
    }

    /// The window passed without the client: the conversation ends with
    /// `resume_expired` (and is recorded so).
    pub(super) fn expire(&mut self, running: &mut Running) {
        if let Some(slot) = running.resume.take() {
            self.forget(slot);
        }
        running.client_gone = true;
        running
            .handle
            .shutdown
            .trigger_with(CloseReason::ResumeExpired);
    }

    /// The conversation ends: its secret names it no more.
    pub(super) fn forget(&self, slot: Slot) {
        self.shared.resumable.forget(&slot.key);
        if slot.away_until.is_some() {
            self.shared.metrics.reattached(false);
        }
    }

    /// Silence for the engine while the client is away.
    pub(super) fn give_silence(running: &Running) {
        let _ = running
            .handle
            .input
            .try_send(ClientInput::Pcm(vec![0; SILENCE_SAMPLES]));
    }

    /// A client came back with a new socket: the old one (if the server
    /// still had it) is dropped, the frames after the client's `last_seq`
    /// are sent again, then `resumed`. `Some` when the connection is done.
    pub(super) async fn reattach(&mut self, running: &mut Running, attach: Attach) -> Option<Exit> {
        let replay = self.replay.as_ref()?;
        let missed = match replay.missed(attach.last_seq) {
            Ok(missed) => missed,
            Err(last) => {
                // Not this conversation's client, or a confused one: the
                // conversation goes on as it was.
                let message = format!(
                    "last_seq {} is past the last frame this conversation sent ({last})",
                    attach.last_seq
                );
                self.shared.metrics.error(ErrorCode::ResumeFailed);
                turn_away(attach.socket, &message).await;
                return None;
            }
        };
        let was_away = running.away();
        if let Some(slot) = running.resume.as_mut() {
            slot.away_until = None;
        }
        if !was_away {
            // Taken over from a socket the server still wrote to.
            self.shared.metrics.detached();
        }
        self.shared.metrics.reattached(true);
        // Pending reply audio belongs after what was missed: it is numbered
        // as it goes out, behind the replay.
        self.socket = Some(attach.socket);
        running.hello.audio = attach.audio;
        let _ = running
            .handle
            .input
            .send(ClientInput::NewStream(attach.audio))
            .await;
        let replayed = missed.frames.len() as u64;
        for frame in missed.frames {
            if !self.feed_raw(frame).await {
                return self.write_failed(running);
            }
        }
        let resumed = ServerMessage::Resumed {
            session: &self.conversation.clone(),
            replayed,
            skipped: missed.skipped,
            skipped_audio_ms: missed.skipped_audio_ms,
        };
        if !self.send_message(&resumed).await {
            return self.write_failed(running);
        }
        self.log_info(&format!(
            "the client came back after seq {}: {replayed} frames sent again, {} not kept ({} ms of reply audio)",
            attach.last_seq, missed.skipped, missed.skipped_audio_ms
        ));
        None
    }

    /// A line in the server log about this connection.
    fn log_info(&self, what: &str) {
        self.span.in_scope(|| tracing::info!("{what}"));
    }
}

/// Refuses a socket that came back with a `last_seq` its conversation
/// never sent.
async fn turn_away(mut socket: WebSocket, message: &str) {
    use futures_util::SinkExt;
    let error = ServerMessage::error(ErrorCode::ResumeFailed, message, true).to_text();
    let frame = axum::extract::ws::CloseFrame {
        code: CLOSE_POLICY,
        reason: "resume_failed".into(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        socket.feed(Message::Text(error.into())).await?;
        socket.send(Message::Close(Some(frame))).await
    })
    .await;
}

/// A pong from the client: its WebSocket has read every frame up to the
/// `seq` the ping carried, and those need not be kept.
pub(super) fn pong(connection: &mut Connection, message: &Message) {
    if let (Message::Pong(payload), Some(replay)) = (message, connection.replay.as_mut()) {
        replay.pong(payload);
    }
}
