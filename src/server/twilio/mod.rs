//! Phone calls through Twilio Media Streams (bidirectional
//! `<Connect><Stream>`), on the same engines, session core, limits, metrics
//! and ledger as `/ws`.
//!
//! `POST /twilio/voice` is the webhook Twilio calls for an incoming call:
//! its `X-Twilio-Signature` is checked against `server.public_url`, and the
//! answer is TwiML that connects the call to `/twilio/stream` with a
//! single-use, short-lived token. The stream's upgrade is signed too. The
//! token is self-contained (the call, when it expires and a hash of the
//! caller's number, signed with a key derived from the Auth Token), so a
//! call's stream may reach any gateway of a deployment; it is used once per
//! gateway, and once per deployment through the ledger, where the call is
//! recorded under its `CallSid`.

mod messages;
mod playback;
mod signature;
mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::Shared;
use super::metrics::Refusal;

/// Twilio's audio: μ-law at 8 kHz.
const RATE_HZ: u32 = 8_000;
/// Where Twilio asks what to do with a call.
pub(super) const VOICE_PATH: &str = "/twilio/voice";
/// Where a call's audio streams.
pub(super) const STREAM_PATH: &str = "/twilio/stream";
/// Largest webhook body read (Twilio's are a few hundred bytes).
const MAX_WEBHOOK_BYTES: usize = 16 * 1024;
/// The header Twilio signs its requests with.
const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// The calls this gateway answered: signs their tokens and remembers which
/// were used until they expire.
pub(super) struct Calls {
    key: Vec<u8>,
    used: Mutex<HashMap<String, Instant>>,
}

/// A call whose token was good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Call {
    pub(super) call_sid: String,
    /// [`crate::ledger::client_hash`] of the caller's number.
    pub(super) caller: String,
}

impl Calls {
    /// Tokens signed with a key derived from the Auth Token (so every
    /// gateway of a deployment accepts them), or with a random one for
    /// unsigned local testing.
    pub(super) fn new(auth_token: &str) -> Self {
        let key = if auth_token.is_empty() {
            let mut key = vec![0u8; 32];
            if getrandom::fill(&mut key).is_err() {
                key = super::instance_id().into_bytes();
            }
            key
        } else {
            format!("sonora call token:{auth_token}").into_bytes()
        };
        Self {
            key,
            used: Mutex::new(HashMap::new()),
        }
    }

    fn mac(&self, text: &str) -> String {
        let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(text.as_bytes());
        crate::base64::encode(&mac.finalize().into_bytes())
    }

    /// A token for `call_sid`, usable for `ttl`.
    pub(super) fn issue(&self, call_sid: &str, caller: &str, ttl: Duration) -> String {
        let expires = unix_now() + ttl.as_secs();
        let body = format!("{call_sid}.{expires}.{caller}");
        format!("{body}.{}", self.mac(&body))
    }

    /// Uses a token up: signed by this deployment, not expired, not used
    /// before on this gateway.
    pub(super) fn redeem(&self, token: &str) -> Result<Call, &'static str> {
        let mut parts = token.splitn(4, '.');
        let (Some(call_sid), Some(expires), Some(caller), Some(mac)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the call's token is malformed");
        };
        let body = format!("{call_sid}.{expires}.{caller}");
        let expected = self.mac(&body);
        if expected.is_empty() || !signature::same(&expected, mac) {
            return Err("the call's token is not this service's");
        }
        let expires: u64 = expires
            .parse()
            .map_err(|_| "the call's token is malformed")?;
        if unix_now() > expires {
            return Err("the call's token has expired");
        }
        let mut used = self
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        // Expired entries can never be presented again: forgotten.
        used.retain(|_, until| *until > now);
        if used.contains_key(token) {
            return Err("the call's token was already used");
        }
        let left = expires.saturating_sub(unix_now()) + 1;
        used.insert(token.to_owned(), now + Duration::from_secs(left));
        Ok(Call {
            call_sid: call_sid.to_owned(),
            caller: caller.to_owned(),
        })
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a request carries Twilio's signature of `url` and `params`, or
/// unsigned requests are allowed.
fn signed(shared: &Shared, headers: &HeaderMap, url: &str, params: &[(String, String)]) -> bool {
    let telephony = &shared.config.telephony;
    if telephony.twilio_auth_token.is_empty() {
        return telephony.allow_unsigned;
    }
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    signature::valid(&telephony.twilio_auth_token, url, params, signature)
}

fn plain(status: StatusCode, text: &str) -> Response {
    (status, format!("{text}\n")).into_response()
}

/// Escapes text for an XML attribute.
fn xml_attr(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `POST /twilio/voice`: a signed webhook gets TwiML connecting the call
/// to the stream.
pub(super) async fn voice(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let config = &shared.config;
    if !config.telephony.enabled() || config.server.public_url.is_empty() {
        return plain(
            StatusCode::NOT_FOUND,
            "phone calls are not set up here (telephony.twilio_auth_token and server.public_url)",
        );
    }
    if body.len() > MAX_WEBHOOK_BYTES {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the webhook body is too large",
        );
    }
    let params: Vec<(String, String)> = form_urlencoded::parse(&body)
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect();
    let path = uri.path_and_query().map_or(VOICE_PATH, |p| p.as_str());
    let url = format!("{}{path}", config.server.public_url);
    if !signed(&shared, &headers, &url, &params) {
        shared.metrics.refused(Refusal::Unauthorized);
        tracing::warn!(
            url,
            "a call webhook without a valid Twilio signature was refused"
        );
        return plain(StatusCode::FORBIDDEN, "the request is not signed by Twilio");
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(call_sid) = param("CallSid").filter(|sid| {
        !sid.is_empty() && sid.len() <= 64 && sid.bytes().all(|b| b.is_ascii_alphanumeric())
    }) else {
        return plain(StatusCode::BAD_REQUEST, "the webhook has no CallSid");
    };
    if *shared.shutdown.borrow() || shared.engine.get().is_none() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "not taking calls now");
    }
    let caller = crate::ledger::client_hash(&format!("tel:{}", param("From").unwrap_or("")));
    let ttl = Duration::from_secs(u64::from(config.telephony.token_ttl_s));
    let token = shared.calls.issue(call_sid, &caller, ttl);
    let stream_url = stream_url(&config.server.public_url);
    let twiml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Connect><Stream url=\"{}\">\
         <Parameter name=\"token\" value=\"{}\"/></Stream></Connect></Response>\n",
        xml_attr(&stream_url),
        xml_attr(&token)
    );
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], twiml).into_response()
}

/// The stream's public URL: `server.public_url` as `wss://` (or `ws://`).
fn stream_url(public_url: &str) -> String {
    let rest = public_url
        .strip_prefix("https://")
        .map(|rest| format!("wss://{rest}"))
        .or_else(|| {
            public_url
                .strip_prefix("http://")
                .map(|rest| format!("ws://{rest}"))
        })
        .unwrap_or_else(|| public_url.to_owned());
    format!("{rest}{STREAM_PATH}")
}

/// `GET /twilio/stream`: a signed upgrade becomes a call.
pub(super) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let config = &shared.config;
    if !config.telephony.enabled() || config.server.public_url.is_empty() {
        return plain(StatusCode::NOT_FOUND, "phone calls are not set up here");
    }
    if !signed(
        &shared,
        &headers,
        &stream_url(&config.server.public_url),
        &[],
    ) {
        shared.metrics.refused(Refusal::Unauthorized);
        return plain(StatusCode::FORBIDDEN, "the request is not signed by Twilio");
    }
    if *shared.shutdown.borrow() || shared.engine.get().is_none() {
        shared.metrics.refused(Refusal::NotReady);
        return plain(StatusCode::SERVICE_UNAVAILABLE, "not taking calls now");
    }
    let Ok(place) = Arc::clone(&shared.admission).try_acquire_owned() else {
        shared.metrics.refused(Refusal::Busy);
        return plain(StatusCode::SERVICE_UNAVAILABLE, "too many conversations");
    };
    let id = shared
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Twilio's messages are small: 64 KiB is plenty. Small socket buffers,
    // as on `/ws`: the socket library zeroes the free part of its read
    // buffer before every read (a 128 KiB default cost a sixth of a call's
    // CPU).
    let ws = ws
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .read_buffer_size(super::READ_BUFFER_BYTES)
        .write_buffer_size(super::WRITE_BUFFER_BYTES);
    ws.on_upgrade(move |socket| async move {
        stream::Call::run(socket, shared, id).await;
        drop(place);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_good_once_and_only_as_signed() {
        let calls = Calls::new("auth");
        let token = calls.issue("CA123", "abc", Duration::from_secs(30));
        let call = calls.redeem(&token).expect("good");
        assert_eq!(call.call_sid, "CA123");
        assert_eq!(call.caller, "abc");
        assert_eq!(
            calls.redeem(&token),
            Err("the call's token was already used")
        );
        // Another gateway of the same deployment takes it; another
        // deployment does not.
        let sibling = Calls::new("auth");
        let token = sibling.issue("CA124", "abc", Duration::from_secs(30));
        assert!(calls.redeem(&token).is_ok());
        let stranger = Calls::new("other");
        let token = stranger.issue("CA125", "abc", Duration::from_secs(30));
        assert!(calls.redeem(&token).is_err());
        // Tampering with the call or the expiry breaks the signature.
        let token = calls.issue("CA126", "abc", Duration::from_secs(30));
        assert!(calls.redeem(&token.replacen("CA126", "CA127", 1)).is_err());
        assert!(calls.redeem("nonsense").is_err());
        let expired = calls.issue("CA128", "abc", Duration::ZERO);
        let body = expired.rsplit_once('.').expect("body").0.to_owned();
        let parts: Vec<&str> = body.split('.').collect();
        let old = format!("{}.{}.{}", parts[0], unix_now() - 5, parts[2]);
        let stale = format!("{old}.{}", calls.mac(&old));
        assert_eq!(calls.redeem(&stale), Err("the call's token has expired"));
    }

    #[test]
    fn the_stream_url_follows_the_public_one() {
        assert_eq!(
            stream_url("https://voz.example.edu"),
            "wss://voz.example.edu/twilio/stream"
        );
        assert_eq!(
            stream_url("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/twilio/stream"
        );
        assert_eq!(xml_attr("a&b\"<c>"), "a&amp;b&quot;&lt;c&gt;");
    }
}
