//! What the conversation sends: user audio (resampled, or silence while the
//! user is mute), typed text, tool results, and the close; and the tick that
//! watches for stalls, the hand-off and the end.

use crate::engine::Role;
use std::time::Duration;

use tokio::time::Instant;

use super::{CLOSE_LIMIT, CLOSE_QUIET, Driver, MUTE_AFTER, Purpose, REPLAY, Step};
use crate::engine::EngineInput;
use crate::engine::openai_realtime::RATE_HZ;
use crate::engine::openai_realtime::wire::ClientEvent;
use crate::engine::tool_runner::ToolDone;

impl Driver {
    pub(super) async fn input(&mut self, message: EngineInput) -> Step {
        match message {
            EngineInput::Audio(samples) => {
                let now = Instant::now();
                self.audio_at = now;
                if samples.iter().any(|s| s.unsigned_abs() > 300) {
                    self.activity_at = now;
                }
                self.resampled.clear();
                self.resampler.push(&samples, &mut self.resampled);
                let audio = std::mem::take(&mut self.resampled);
                self.recent.extend(audio.iter().copied());
                let excess = self.recent.len().saturating_sub(REPLAY);
                self.recent.drain(..excess);
                if let Some(mut conn) = self.conn.take() {
                    let sent = self.append(&mut conn, &audio).await;
                    self.conn = Some(conn);
                    if let Err(e) = sent {
                        return self.lost(e.to_string()).await;
                    }
                } else {
                    self.backlog.hold(&audio);
                }
                self.resampled = audio;
            }
            EngineInput::Text(text) => {
                self.turn += 1;
                self.history.push(Role::User, &text);
                self.send(&ClientEvent::user_text(&text)).await;
                self.send(&ClientEvent::respond()).await;
                self.awaiting = Some(Instant::now());
            }
            EngineInput::ToolResult { id, json } => {
                self.tools.finished(&id);
                self.send(&ClientEvent::tool_output(&id, &json)).await;
                self.send(&ClientEvent::respond()).await;
                self.awaiting = Some(Instant::now());
            }
            EngineInput::Close => {
                // The reply in progress, and one to words the service has
                // not yet heard end, still come (see `tick`).
                self.closing_since = Some(Instant::now());
            }
        }
        Step::Go
    }

    pub(super) async fn tool_done(&mut self, done: ToolDone) -> Step {
        self.tools.finished(&done.id);
        if done.generation != self.generation {
            tracing::debug!(id = %done.id, "tool result for a replaced session dropped");
            return Step::Go;
        }
        self.send(&ClientEvent::tool_output(&done.id, &done.result))
            .await;
        self.send(&ClientEvent::respond()).await;
        self.awaiting = Some(Instant::now());
        Step::Go
    }

    pub(super) async fn tick(&mut self) -> Step {
        let now = Instant::now();
        let shared = self.shared.clone();
        let settings = &shared.settings;
        if let Some(since) = self.closing_since {
            let idle = now.duration_since(self.activity_at.max(since));
            if now.duration_since(since) >= CLOSE_LIMIT || (self.quiet(now) && idle >= CLOSE_QUIET)
            {
                return Step::Stop;
            }
        }
        let mute = now.duration_since(self.audio_at);
        if mute >= MUTE_AFTER
            && let Some(mut conn) = self.conn.take()
        {
            let ms = u64::try_from(mute.as_millis()).unwrap_or(u64::MAX).min(250);
            let silence = vec![0i16; ms as usize * RATE_HZ as usize / 1000];
            let sent = self.append(&mut conn, &silence).await;
            self.conn = Some(conn);
            self.audio_at = now;
            if let Err(e) = sent {
                return self.lost(e.to_string()).await;
            }
        }
        if let Some(since) = self.awaiting
            && self.conn.is_some()
            && now.duration_since(since) >= settings.stall_timeout
        {
            self.awaiting = Some(now);
            let why = format!("no reply within {} ms", settings.stall_timeout.as_millis());
            return self.lost(why).await;
        }
        let due = self
            .conn
            .as_ref()
            .is_some_and(|c| now.duration_since(c.opened_at) >= settings.rotate_after);
        if due && self.pending.is_none() && self.closing_since.is_none() && self.quiet(now) {
            self.open(Purpose::HandOff { turn: self.turn }, Duration::ZERO);
        }
        Step::Go
    }
}
