//! WebSocket connections to a speech service (`wss://`, or `ws://` for a
//! local test server): TLS with the system's roots plus an optional PEM file
//! of extra ones, a bounded handshake, and a failure kind decided from what
//! the server answered, so an engine knows whether to retry, cool down or
//! give up.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Error as WsError, Message};

/// The byte stream under a connection: TCP, or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An open connection to a service.
pub(crate) type Socket = WebSocketStream<Box<dyn Io>>;

/// One open connection, split so that a send never waits for a read.
pub(crate) struct Conn {
    pub(crate) sink: SplitSink<Socket, Message>,
    pub(crate) stream: SplitStream<Socket>,
    pub(crate) opened_at: Instant,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("opened_at", &self.opened_at)
            .finish_non_exhaustive()
    }
}

impl Conn {
    pub(crate) fn new(socket: Socket) -> Self {
        let (sink, stream) = socket.split();
        Self {
            sink,
            stream,
            opened_at: Instant::now(),
        }
    }

    /// Sends one text message within `wait`; a failure is passing.
    pub(crate) async fn send_text(
        &mut self,
        text: String,
        wait: Duration,
    ) -> Result<(), ConnectError> {
        match tokio::time::timeout(wait, self.sink.send(Message::text(text))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ConnectError::Unavailable(format!("sending: {e}"))),
            Err(_) => Err(ConnectError::Unavailable(format!(
                "the service took no data for {} ms",
                wait.as_millis()
            ))),
        }
    }

    /// The next message, or `deadline`'s passing as `None`.
    pub(crate) async fn next_until(&mut self, deadline: Instant) -> Option<Received> {
        let message = tokio::time::timeout_at(deadline, self.stream.next())
            .await
            .ok()?;
        Some(Received::from(message))
    }

    /// Sends a close frame, waiting at most `wait` for the service.
    pub(crate) async fn close(mut self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.sink.close()).await;
    }
}

/// What reading a connection gave.
#[derive(Debug)]
pub(crate) enum Received {
    /// A text or binary message's payload.
    Data(Bytes),
    /// The service closed the connection (with its frame, when it sent one).
    Closed(Option<CloseFrame>),
    /// A ping or pong: nothing for the conversation.
    Control,
    /// The connection broke.
    Lost(String),
}

impl From<Option<Result<Message, WsError>>> for Received {
    fn from(message: Option<Result<Message, WsError>>) -> Self {
        match message {
            Some(Ok(Message::Text(text))) => Self::Data(text.into()),
            Some(Ok(Message::Binary(bytes))) => Self::Data(bytes),
            Some(Ok(Message::Close(frame))) => Self::Closed(frame),
            Some(Ok(_)) => Self::Control,
            Some(Err(e)) => Self::Lost(e.to_string()),
            None => Self::Lost("connection closed".to_owned()),
        }
    }
}

/// Largest message a service may send: one reply's audio delta is a few KB,
/// a session description tens of KB.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// How a connection attempt failed, and so what the engine does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The service refused the credentials (HTTP 401 or 403): no retry.
    #[error("the service refused the credentials: {0}")]
    Auth(String),
    /// The service throttles or the quota is used up (HTTP 429): cool down.
    #[error("the service is throttling: {0}")]
    Throttled(String),
    /// Unreachable, timed out or a server fault (HTTP 5xx): a later try may work.
    #[error("the service could not be reached: {0}")]
    Unavailable(String),
    /// Anything else the service refused (a bad model name, a bad URL): no retry.
    #[error("the service refused the connection: {0}")]
    Refused(String),
}

/// TLS settings shared by every connection of an engine.
#[derive(Clone)]
pub(crate) struct Tls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// The system's root certificates, and those in `ca_file` when given.
    pub(crate) fn new(ca_file: Option<&Path>) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system certificate rustls cannot read is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{} holds no certificate", path.display()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: unusable certificate: {e}", path.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// Opens `url` with `headers`, within `timeout` for TCP, TLS and the
/// WebSocket handshake together.
pub(crate) async fn connect(
    url: &str,
    headers: &[(&'static str, String)],
    tls: &Tls,
    timeout: Duration,
) -> Result<Socket, ConnectError> {
    match tokio::time::timeout(timeout, open(url, headers, tls)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectError::Unavailable(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

async fn open(
    url: &str,
    headers: &[(&'static str, String)],
    tls: &Tls,
) -> Result<Socket, ConnectError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ConnectError::Refused(format!("bad URL {url:?}: {e}")))?;
    let secure = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => {
            return Err(ConnectError::Refused(format!(
                "{url:?} is not ws:// or wss://"
            )));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| ConnectError::Refused(format!("{url:?} names no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| ConnectError::Unavailable(format!("{host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if secure {
        let name = ServerName::try_from(host.clone())
            .map_err(|e| ConnectError::Refused(format!("bad host name {host:?}: {e}")))?;
        let stream = TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectError::Unavailable(format!("TLS with {host}: {e}")))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::Refused(format!("bad URL {url:?}: {e}")))?;
    for (name, value) in headers {
        let value = HeaderValue::from_str(value)
            .map_err(|_| ConnectError::Refused(format!("header {name} is not valid text")))?;
        request.headers_mut().insert(*name, value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    match tokio_tungstenite::client_async_with_config(request, io, Some(config)).await {
        Ok((socket, _)) => Ok(socket),
        Err(error) => Err(handshake_error(error)),
    }
}

/// What a failed WebSocket handshake means.
fn handshake_error(error: WsError) -> ConnectError {
    let WsError::Http(response) = &error else {
        return ConnectError::Unavailable(error.to_string());
    };
    let status = response.status();
    let body = response
        .body()
        .as_deref()
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
        .unwrap_or_default();
    let said = if body.trim().is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {}", body.trim())
    };
    match status.as_u16() {
        401 | 403 => ConnectError::Auth(said),
        429 => ConnectError::Throttled(said),
        500..=599 => ConnectError::Unavailable(said),
        _ => ConnectError::Refused(said),
    }
}

/// A close frame's code and reason, as text for messages.
pub(crate) fn close_text(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(frame) if frame.reason.is_empty() => format!("close {}", u16::from(frame.code)),
        Some(frame) => format!("close {}: {}", u16::from(frame.code), frame.reason),
        None => "closed without a close frame".to_owned(),
    }
}
