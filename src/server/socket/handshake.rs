//! The start of a `/ws` connection: waiting for a valid `hello` (timeout,
//! shutdown, oversized or early frames) and checking its token and voice.

use axum::extract::ws::Message;
use tokio::time::{Duration, Instant, sleep_until};

use super::super::protocol::{self, ClientMessage, ErrorCode, Hello, ProtocolError};
use super::{CLOSE_GOING_AWAY, CLOSE_POLICY, Connection, shutting_down};
use crate::engine::pool::{Mismatch, Want};

impl Connection {
    /// Reads until a valid `hello`; errors in between are reported and the
    /// client may try again. `None` when the connection ends instead.
    pub(super) async fn await_hello(&mut self) -> Option<Hello> {
        let hello_ms = u64::from(self.shared.config.server.hello_timeout_ms);
        let deadline = Instant::now() + Duration::from_millis(hello_ms);
        let mut shutdown = self.shared.shutdown.clone();
        loop {
            let frame = tokio::select! {
                frame = super::receive(&mut self.socket) => frame,
                () = sleep_until(deadline) => {
                    let message = format!("no hello within {hello_ms} ms");
                    let error = ProtocolError::new(ErrorCode::HelloTimeout, message.clone());
                    self.send_error(&error, true).await;
                    self.close(CLOSE_POLICY, &message).await;
                    return None;
                }
                () = shutting_down(&mut shutdown) => {
                    self.close(CLOSE_GOING_AWAY, "the server is shutting down").await;
                    return None;
                }
            };
            if !self.size_ok(&frame).await {
                return None;
            }
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(bytes))) => {
                    let message = format!(
                        "{} bytes of audio before hello were dropped: send hello first",
                        bytes.len()
                    );
                    let error = ProtocolError::new(ErrorCode::HelloFirst, message);
                    if !self.send_error(&error, false).await {
                        return None;
                    }
                    continue;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => return None,
                Some(Err(e)) => {
                    self.read_failed(&e).await;
                    return None;
                }
            };
            let error = match protocol::parse_client(&text) {
                // The secret is the credential of a returning client.
                Ok(ClientMessage::Hello(hello)) if hello.resume.is_some() => return Some(hello),
                Ok(ClientMessage::Hello(mut hello)) => match self.admit(&mut hello).await {
                    Ok(()) => return Some(hello),
                    Err(error) if error.code == ErrorCode::LedgerUnavailable => {
                        self.shared
                            .metrics
                            .refused(super::super::metrics::Refusal::LedgerUnavailable);
                        self.send_error(&error, true).await;
                        self.close(super::CLOSE_TRY_AGAIN, "ledger_unavailable")
                            .await;
                        return None;
                    }
                    Err(error) if error.code == ErrorCode::Unauthorized => {
                        self.shared
                            .metrics
                            .refused(super::super::metrics::Refusal::Unauthorized);
                        self.send_error(&error, true).await;
                        self.close(CLOSE_POLICY, "unauthorized").await;
                        return None;
                    }
                    Err(error) => error,
                },
                Ok(_) => ProtocolError::new(
                    ErrorCode::HelloFirst,
                    "send hello before text, tool results or stop",
                ),
                Err(error) => error,
            };
            if !self.send_error(&error, false).await {
                return None;
            }
        }
    }

    /// Checks the token and the voice of a hello; with `server.auth =
    /// "keys"`, uses its client token up and applies the token's limits.
    async fn admit(&mut self, hello: &mut Hello) -> Result<(), ProtocolError> {
        if self.shared.config.server.auth == "keys" {
            self.redeem(hello).await?;
            return self.check_voice(hello);
        }
        let tokens = &self.shared.config.server.auth_tokens;
        if tokens.is_empty() || tokens.iter().any(|t| constant_time_eq(t, &hello.token)) {
            return self.check_voice(hello);
        }
        let message = if hello.token.is_empty() {
            "this server needs a token in hello"
        } else {
            "the token in hello is not valid"
        };
        Err(ProtocolError::new(ErrorCode::Unauthorized, message))
    }

    /// Redeems the hello's client token: its key is the conversation's, and
    /// an engine, voice or language it names is the one used.
    async fn redeem(&mut self, hello: &mut Hello) -> Result<(), ProtocolError> {
        let unauthorized = |message: String| ProtocolError::new(ErrorCode::Unauthorized, message);
        let Some(ledger) = self.shared.ledger.get() else {
            return Err(ProtocolError::new(
                ErrorCode::LedgerUnavailable,
                "this server takes conversations only with its ledger, which is not open",
            ));
        };
        if hello.token.is_empty() {
            return Err(unauthorized(
                "this server needs a client token in hello (from POST /api/tokens)".into(),
            ));
        }
        let redeemed = match ledger.redeem_token(&hello.token).await {
            Ok(redeemed) => redeemed,
            Err(crate::ledger::keys::AuthError::Ledger(e)) => {
                self.log(&format!("a token could not be checked: {e}"));
                return Err(ProtocolError::new(
                    ErrorCode::LedgerUnavailable,
                    "the token cannot be checked now; try again later",
                ));
            }
            Err(e) => return Err(unauthorized(e.to_string())),
        };
        let limits = &redeemed.restrictions;
        if let Some(wanted) = &limits.engine {
            let runs = self.shared.engine.get().is_some_and(|pool| {
                pool.check(&Want {
                    engine: wanted.clone(),
                    voice: String::new(),
                })
                .is_ok()
            });
            if !runs {
                return Err(unauthorized(format!(
                    "this token is for the {wanted} engine, which this server does not run"
                )));
            }
        }
        for (field, limit, asked) in [
            ("engine", &limits.engine, &mut hello.engine),
            ("voice", &limits.voice, &mut hello.voice),
            ("language", &limits.language, &mut hello.language),
        ] {
            let Some(limit) = limit else { continue };
            if asked.is_empty() {
                asked.clone_from(limit);
            } else if asked != limit {
                return Err(unauthorized(format!(
                    "this token is for the {field} {limit:?}, not {asked:?}"
                )));
            }
        }
        self.key = Some(redeemed.key_id);
        Ok(())
    }

    /// Whether the hello's engine runs here and offers its voice.
    fn check_voice(&self, hello: &Hello) -> Result<(), ProtocolError> {
        let Some(pool) = self.shared.engine.get() else {
            return Ok(());
        };
        let want = Want {
            engine: hello.engine.clone(),
            voice: hello.voice.clone(),
        };
        pool.check(&want).map_err(|mismatch| {
            let code = match mismatch {
                Mismatch::UnknownEngine(..) => ErrorCode::UnknownEngine,
                Mismatch::UnknownVoice(..) => ErrorCode::UnknownVoice,
            };
            ProtocolError::new(code, mismatch.to_string())
        })
    }
}

/// Compares secrets without stopping at the first difference.
fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
        assert!(!constant_time_eq("", "a"));
    }
}
