//! A certificate made at start for a test service's TLS: the server's
//! settings, and a CA file for the client under test to trust, in a
//! directory removed when the certificate is dropped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_tungstenite::tungstenite::handshake::server::ErrorResponse;
use tokio_tungstenite::tungstenite::http::StatusCode;

#[derive(Debug)]
pub struct TestCert {
    pub ca_file: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
    dir: PathBuf,
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1; the server
/// offers `alpn` (e.g. `h2`), none when empty.
pub fn self_signed(name: &str, alpn: &[&[u8]]) -> TestCert {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).expect("certificate");
    let dir = std::env::temp_dir().join(format!(
        "sonora-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, certified.cert.pem()).expect("write ca.pem");
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server certificate");
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TestCert {
        ca_file,
        server: Arc::new(server),
        dir,
    }
}

/// A test service over TLS on 127.0.0.1:0: each accepted connection is
/// handed to `serve` on a task of its own; the service stops when this is
/// dropped.
#[derive(Debug)]
pub struct Listening {
    pub addr: std::net::SocketAddr,
    pub ca_file: PathBuf,
    task: tokio::task::JoinHandle<()>,
    _cert: TestCert,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The server side of one accepted connection.
pub type Stream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Starts a service named `name` (for its certificate's directory) that
/// offers `alpn` and runs `serve` for every connection.
pub async fn listen<F, Fut>(name: &str, alpn: &[&[u8]], serve: F) -> Listening
where
    F: Fn(Stream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let cert = self_signed(name, alpn);
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let serve = Arc::new(serve);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    Listening {
        addr,
        ca_file: cert.ca_file.clone(),
        task,
        _cert: cert,
    }
}

/// The script for connection `index`: its own, or the last one repeating.
pub fn nth<T: Clone + Default>(scripts: &[T], index: usize) -> T {
    nth_or(scripts, index, T::default)
}

/// Item `index` of `items`, or the last one repeating, or `empty()` when
/// there is none.
pub fn nth_or<T: Clone>(items: &[T], index: usize, empty: impl FnOnce() -> T) -> T {
    items
        .get(index)
        .or(items.last())
        .cloned()
        .unwrap_or_else(empty)
}

/// A WebSocket handshake refused with HTTP status `code` and `body`.
pub fn refusal(code: u16, body: &serde_json::Value) -> ErrorResponse {
    let mut refusal = ErrorResponse::new(Some(body.to_string()));
    *refusal.status_mut() = StatusCode::from_u16(code).unwrap();
    refusal
}

/// What a planned service saw: one entry a connection, in the order they came.
#[derive(Debug)]
pub struct Log<C> {
    pub connections: Vec<C>,
}

impl<C> Default for Log<C> {
    fn default() -> Self {
        Self {
            connections: Vec::new(),
        }
    }
}

/// The log entry of connection `index`, changed by `f`.
pub fn with_log<C, T>(log: &Mutex<Log<C>>, index: usize, f: impl FnOnce(&mut C) -> T) -> T {
    f(&mut log.lock().unwrap().connections[index])
}

/// A WebSocket-over-TLS service whose connection `i` follows `plans[i]` (the
/// last repeating): `serve` gets the stream, its plan, its index and the
/// log, where a fresh entry for it is already in place.
pub async fn listen_planned<P, C, F, Fut>(
    name: &str,
    plans: Vec<P>,
    serve: F,
) -> (Listening, Arc<Mutex<Log<C>>>)
where
    P: Clone + Default + Send + Sync + 'static,
    C: Default + Send + 'static,
    F: Fn(Stream, P, usize, Arc<Mutex<Log<C>>>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let log = Arc::new(Mutex::new(Log::default()));
    let plans = Arc::new(plans);
    let serve = Arc::new(serve);
    let shared = log.clone();
    let listening = listen(name, &[], move |tls| {
        let (log, plans, serve) = (shared.clone(), plans.clone(), serve.clone());
        async move {
            let index = {
                let mut log = log.lock().unwrap();
                log.connections.push(C::default());
                log.connections.len() - 1
            };
            serve(tls, nth(&plans, index), index, log).await;
        }
    })
    .await;
    (listening, log)
}
