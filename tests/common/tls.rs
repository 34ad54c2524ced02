//! A certificate made at start for a test service's TLS: the server's
//! settings, and a CA file for the client under test to trust, in a
//! directory removed when the certificate is dropped.

use std::path::PathBuf;
use std::sync::Arc;

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
    scripts
        .get(index)
        .or(scripts.last())
        .cloned()
        .unwrap_or_default()
}
