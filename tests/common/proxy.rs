//! A TCP proxy whose connections can all be cut at once, as a network that
//! drops does: both sides see their connection end without a WebSocket
//! close.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::MaybeTlsStream;

use super::gateway::Client;

/// The proxy. See the module docs.
pub struct Proxy {
    pub addr: SocketAddr,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn to(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let held = Arc::clone(&links);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    let mut server = TcpStream::connect(upstream).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                held.lock().unwrap().push(link);
            }
        });
        Self {
            addr,
            links,
            _accept: accept,
        }
    }

    /// Cuts every connection open now; new ones still get through.
    pub fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// A WebSocket client through the proxy, to `gateway` as its host.
    pub async fn client(&self, gateway: SocketAddr) -> Client {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(
            format!("ws://{gateway}/ws"),
            MaybeTlsStream::Plain(stream),
        )
        .await
        .unwrap();
        Client { ws }
    }
}
