//! The gateway facing hostile clients, over real sockets: slow and idle
//! HTTP connections, the connection cap, `Host` and `Origin` checks,
//! conversation caps and request rates per client address, proxies'
//! forwarding headers, and `/metrics` on a listener of its own.
//!
//! Per-address tests bind their client sockets to 127.0.0.2 and 127.0.0.3
//! (Linux routes all of 127/8 to the loopback).

#![allow(
    clippy::unwrap_used,
    reason = "a test helper that fails must fail the test"
)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::gateway::{Client, Frame, metric, start};
use serde_json::json;
use sonora::config::Config;
use sonora::engine::Engine;
use sonora::engine::scripted::ScriptedEngine;
use sonora::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Longest wait for anything the server must do; far past every timeout
/// the tests set, so that a loaded machine is only slower, not failing.
const WAIT: Duration = Duration::from_secs(60);

fn echo() -> Option<Arc<dyn Engine>> {
    Some(Arc::new(ScriptedEngine::echo_turns(400, 200)))
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A TCP connection to `addr`, from `local` when given.
async fn tcp(addr: SocketAddr, local: Option<IpAddr>) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(local) = local {
        socket.bind(SocketAddr::new(local, 0)).unwrap();
    }
    socket.connect(addr).await.unwrap()
}

/// A WebSocket to `/ws` from `local`, with extra (or replaced) headers.
async fn ws(
    addr: SocketAddr,
    local: Option<IpAddr>,
    headers: &[(&'static str, String)],
) -> Result<Client, tungstenite::Error> {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    let stream = tcp(addr, local).await;
    let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await?;
    Ok(Client { ws })
}

/// The HTTP status a WebSocket handshake was refused with (101: accepted).
async fn ws_status(
    addr: SocketAddr,
    local: Option<IpAddr>,
    headers: &[(&'static str, String)],
) -> u16 {
    match ws(addr, local, headers).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
    }
}

/// A conversation that got its `ready`.
async fn converse(
    addr: SocketAddr,
    local: Option<IpAddr>,
    headers: &[(&'static str, String)],
) -> Client {
    let mut client = ws(addr, local, headers).await.unwrap();
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    client
}

/// The close a socket gets before any conversation.
async fn refusal(mut client: Client) -> (u16, String) {
    match client.next().await {
        Frame::Closed(Some(close)) => close,
        other => panic!("expected a close, got {other:?}"),
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// Sends `GET path` with `Host: host` (and `extra` header lines) on
/// `stream` and reads the whole response.
async fn get_on(stream: &mut TcpStream, path: &str, host: &str, extra: &str) -> Reply {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(WAIT, read_reply(stream))
        .await
        .expect("a response")
}

async fn read_reply(stream: &mut TcpStream) -> Reply {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-response: {bytes:?}");
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while bytes.len() < head_end + length {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-body");
        bytes.extend_from_slice(&chunk[..n]);
    }
    Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: String::from_utf8_lossy(&bytes[head_end..head_end + length]).to_string(),
    }
}

/// One request on a new connection from `local`.
async fn get(addr: SocketAddr, local: Option<IpAddr>, path: &str, host: &str) -> Reply {
    let mut stream = tcp(addr, local).await;
    get_on(&mut stream, path, host, "Connection: close\r\n").await
}

/// Waits for the server to close `stream` without a byte more.
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "the server sent {:?} instead of closing",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("still open after {WAIT:?}"),
    }
}

#[tokio::test]
async fn a_slow_request_head_is_closed_after_the_header_timeout() {
    let mut config = Config::default();
    config.server.header_read_timeout_ms = 300;
    // Far longer: only the header timeout can close these.
    config.server.keepalive_timeout_ms = 3_600_000;
    let gateway = start(&config, echo()).await;
    let host = gateway.addr.to_string();
    // Half a head, then nothing.
    let mut half = tcp(gateway.addr, None).await;
    let start = format!("GET /api/engine HTTP/1.1\r\nHost: {host}\r\nUser-Agent: slo");
    half.write_all(start.as_bytes()).await.unwrap();
    assert_closed(&mut half).await;
    // Nothing at all.
    let mut silent = tcp(gateway.addr, None).await;
    assert_closed(&mut silent).await;
    // A keep-alive connection's next request, half sent.
    let mut second = tcp(gateway.addr, None).await;
    assert_eq!(get_on(&mut second, "/healthz", &host, "").await.status, 200);
    second
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    assert_closed(&mut second).await;
    // Whole requests are still answered.
    assert_eq!(
        get(gateway.addr, None, "/api/engine", &host).await.status,
        200
    );
    let text = gateway.metrics().await;
    let timed_out = "sonora_http_connections_timed_out_total{reason=\"header_timeout\"}";
    assert_eq!(metric(&text, timed_out), 3.0, "{text}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_but_a_quiet_conversation_is_not() {
    let mut config = Config::default();
    config.server.keepalive_timeout_ms = 300;
    // Far longer: only the idle timeout can close the connection.
    config.server.header_read_timeout_ms = 600_000;
    let gateway = start(&config, echo()).await;
    let host = gateway.addr.to_string();
    let mut idle = tcp(gateway.addr, None).await;
    let reply = get_on(&mut idle, "/healthz", &host, "").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
    assert_closed(&mut idle).await;
    let text = gateway.metrics().await;
    let timed_out = "sonora_http_connections_timed_out_total{reason=\"idle\"}";
    assert_eq!(metric(&text, timed_out), 1.0, "{text}");

    // A WebSocket is no longer an HTTP connection: silence past the
    // keep-alive timeout does not end it.
    let mut client = gateway.client().await;
    client.hello_pcm().await;
    client.until(|f| f.is("ready")).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    client.send_json(json!({"type": "stop"})).await;
    let end = client.until(|f| f.is("end")).await;
    assert_eq!(end.last().unwrap().json()["reason"], "client_stopped");
}

#[tokio::test]
async fn past_max_connections_new_connections_are_closed_and_open_ones_work() {
    let mut config = Config::default();
    config.server.max_connections = 3;
    config.server.max_sessions = 3;
    config.server.header_read_timeout_ms = 600_000;
    config.server.keepalive_timeout_ms = 3_600_000;
    let gateway = start(&config, echo()).await;
    let host = gateway.addr.to_string();
    let mut conversation = gateway.client().await;
    conversation.hello_pcm().await;
    conversation.until(|f| f.is("ready")).await;
    let mut first = tcp(gateway.addr, None).await;
    let mut second = tcp(gateway.addr, None).await;
    // The server accepts in order: this fourth one is past the cap.
    let mut fourth = tcp(gateway.addr, None).await;
    assert_closed(&mut fourth).await;
    // The open ones still work.
    assert_eq!(get_on(&mut first, "/healthz", &host, "").await.status, 200);
    let text = get_on(&mut second, "/metrics", &host, "").await.body;
    assert_eq!(
        metric(
            &text,
            "sonora_sessions_refused_total{reason=\"max_connections\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "sonora_http_connections_open"), 3.0, "{text}");
    for _ in 0..25 {
        conversation.send_pcm(&[100i16; 320]).await;
    }
    conversation.until(|f| f.is("turn_end")).await;
    // A closed connection makes room.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut stream = tcp(gateway.addr, None).await;
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        // A refused connection may be reset under the write.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut reply)).await;
        if reply.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no room made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn other_host_names_get_421_on_every_endpoint() {
    let gateway = start(&Config::default(), echo()).await;
    let port = gateway.addr.port();
    let evil = format!("evil.example:{port}");
    for path in ["/", "/metrics", "/api/engine", "/ws", "/app.js"] {
        let reply = get(gateway.addr, None, path, &evil).await;
        assert_eq!(reply.status, 421, "{path}: {reply:?}");
        assert_eq!(reply.body.lines().count(), 1, "{reply:?}");
    }
    // A real WebSocket handshake, as a rebinding page would make it.
    let headers = [("host", evil.clone()), ("origin", format!("http://{evil}"))];
    assert_eq!(ws_status(gateway.addr, None, &headers).await, 421);
    // Probes answer whatever the name: load balancers send them by IP.
    assert_eq!(get(gateway.addr, None, "/healthz", &evil).await.status, 200);
    assert_eq!(get(gateway.addr, None, "/readyz", &evil).await.status, 200);
    // The listen address and the loopback names are ours.
    for host in [
        gateway.addr.to_string(),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
    ] {
        assert_eq!(
            get(gateway.addr, None, "/api/engine", &host).await.status,
            200,
            "{host}"
        );
    }
    assert_eq!(
        get(gateway.addr, None, "/api/engine", "localhost")
            .await
            .status,
        421
    );
    let text = gateway.metrics().await;
    assert_eq!(
        metric(&text, "sonora_sessions_refused_total{reason=\"host\"}"),
        7.0,
        "{text}"
    );
}

#[tokio::test]
async fn a_rebinding_or_https_origin_cannot_open_a_conversation() {
    let mut config = Config::default();
    config.server.allowed_origins = vec!["https://ayuda.example.edu".into()];
    let gateway = start(&config, echo()).await;
    let (own, port) = (gateway.addr.to_string(), gateway.addr.port());
    let cases = [
        // A page on a name that resolves to us, but an allowed Host.
        (format!("http://evil.example:{port}"), 403),
        // HTTPS claimed over a plain, direct connection.
        (format!("https://{own}"), 403),
        (format!("https://localhost:{port}"), 403),
        // Another port of the loopback is another origin.
        ("http://localhost:3000".to_owned(), 403),
        ("null".to_owned(), 403),
        // Our own origin, by address or by name, and a listed one.
        (format!("http://{own}"), 101),
        (format!("http://localhost:{port}"), 101),
        ("https://ayuda.example.edu".to_owned(), 101),
    ];
    for (origin, status) in cases {
        let headers = [("origin", origin.clone())];
        assert_eq!(
            ws_status(gateway.addr, None, &headers).await,
            status,
            "{origin}"
        );
    }
    let text = gateway.metrics().await;
    assert_eq!(
        metric(&text, "sonora_sessions_refused_total{reason=\"origin\"}"),
        5.0
    );

    // Behind a trusted proxy that says the client used HTTPS.
    let mut config = Config::default();
    config.server.trusted_proxies = vec!["127.0.0.1".into()];
    config.server.allowed_hosts = vec!["voz.example.edu".into()];
    let gateway = start(&config, echo()).await;
    let proxied = |proto: Option<&str>| {
        let mut headers = vec![
            ("host", "voz.example.edu".to_owned()),
            ("origin", "https://voz.example.edu".to_owned()),
            ("x-forwarded-for", "203.0.113.5".to_owned()),
        ];
        if let Some(proto) = proto {
            headers.push(("x-forwarded-proto", proto.to_owned()));
        }
        headers
    };
    let addr = gateway.addr;
    assert_eq!(ws_status(addr, None, &proxied(Some("https"))).await, 101);
    assert_eq!(ws_status(addr, None, &proxied(Some("http"))).await, 403);
    assert_eq!(ws_status(addr, None, &proxied(None)).await, 403);
    // The same headers from a peer that is not a trusted proxy.
    let direct = ws_status(addr, Some(ip("127.0.0.2")), &proxied(Some("https"))).await;
    assert_eq!(direct, 403);
}

#[tokio::test]
async fn one_address_at_its_cap_is_refused_while_another_gets_in() {
    let mut config = Config::default();
    config.server.max_sessions_per_client = 2;
    let gateway = start(&config, echo()).await;
    let (two, three) = (Some(ip("127.0.0.2")), Some(ip("127.0.0.3")));
    let mut held = [
        converse(gateway.addr, two, &[]).await,
        converse(gateway.addr, two, &[]).await,
    ];
    let third = ws(gateway.addr, two, &[]).await.unwrap();
    let (code, reason) = refusal(third).await;
    assert_eq!(code, 1013);
    assert!(reason.starts_with("client_busy"), "{reason}");
    let _other = converse(gateway.addr, three, &[]).await;
    let text = gateway.metrics().await;
    assert_eq!(
        metric(
            &text,
            "sonora_sessions_refused_total{reason=\"client_busy\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "sonora_sessions_active"), 3.0);
    // A place frees up for that address when one of its conversations ends.
    held[0].send_json(json!({"type": "stop"})).await;
    held[0].until(|f| f.is("end")).await;
    held[0].next().await;
    gateway.metrics_when_active(2.0).await;
    let _again = converse(gateway.addr, two, &[]).await;
}

#[tokio::test]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let xff = |value: &str| vec![("x-forwarded-for", value.to_owned())];
    let busy = |(code, reason): (u16, String)| code == 1013 && reason.starts_with("client_busy");

    // Not a trusted proxy: the header is ignored, the peer is the client.
    let mut config = Config::default();
    config.server.max_sessions_per_client = 1;
    let gateway = start(&config, echo()).await;
    let _first = converse(gateway.addr, None, &xff("203.0.113.5")).await;
    let second = ws(gateway.addr, None, &xff("203.0.113.6")).await.unwrap();
    assert!(busy(refusal(second).await));

    // A trusted proxy: the right-most address it does not trust is the client.
    config.server.trusted_proxies = vec!["127.0.0.1".into()];
    let gateway = start(&config, echo()).await;
    let addr = gateway.addr;
    let _five = converse(addr, None, &xff("203.0.113.5")).await;
    let _six = converse(addr, None, &xff("203.0.113.6")).await;
    // A forged left part changes nothing.
    let forged = ws(addr, None, &xff("198.51.100.1, 203.0.113.5"))
        .await
        .unwrap();
    assert!(busy(refusal(forged).await));
    // RFC 7239 `Forwarded`, when there is no X-Forwarded-For.
    let forwarded = |v: &str| vec![("forwarded", v.to_owned())];
    let six = ws(addr, None, &forwarded("for=203.0.113.6;proto=https"))
        .await
        .unwrap();
    assert!(busy(refusal(six).await));
    let _v6 = converse(addr, None, &forwarded("for=\"[2001:db8::1]:4711\"")).await;
    // 127.0.0.2 is not trusted: its header means nothing.
    let two = Some(ip("127.0.0.2"));
    let _two = converse(addr, two, &xff("203.0.113.7")).await;
    let again = ws(addr, two, &xff("203.0.113.8")).await.unwrap();
    assert!(busy(refusal(again).await));
    let text = gateway.metrics().await;
    assert_eq!(
        metric(
            &text,
            "sonora_sessions_refused_total{reason=\"client_busy\"}"
        ),
        3.0
    );
    assert_eq!(metric(&text, "sonora_sessions_active"), 4.0);
}

#[tokio::test]
async fn past_its_request_rate_an_address_gets_429_and_sockets_1013() {
    let mut config = Config::default();
    // One request a minute: nothing comes back within the test.
    config.server.connections_per_minute_per_client = 1;
    let gateway = start(&config, echo()).await;
    let host = gateway.addr.to_string();
    let (two, three) = (Some(ip("127.0.0.2")), Some(ip("127.0.0.3")));
    assert_eq!(
        get(gateway.addr, two, "/api/engine", &host).await.status,
        200
    );
    let refused = get(gateway.addr, two, "/", &host).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert!(refused.headers.contains("retry-after: "), "{refused:?}");
    let (code, reason) = refusal(ws(gateway.addr, two, &[]).await.unwrap()).await;
    assert_eq!(code, 1013);
    assert!(reason.starts_with("rate_limited"), "{reason}");
    // Probes and scrapes are not counted.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            get(gateway.addr, two, path, &host).await.status,
            200,
            "{path}"
        );
    }
    // Another address has its own budget.
    let _three = converse(gateway.addr, three, &[]).await;
    let text = gateway.metrics().await;
    assert_eq!(
        metric(
            &text,
            "sonora_sessions_refused_total{reason=\"rate_limited\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn metrics_can_be_served_on_their_own_listener_only() {
    let config = Config::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let side = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, metrics_addr) = (listener.local_addr().unwrap(), side.local_addr().unwrap());
    let server = Server::new(&config);
    server.set_engine(echo().unwrap()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        server
            .clone()
            .serve_with_metrics(listener, Some(side), async move {
                let _ = stopped.await;
            }),
    );
    let main_host = addr.to_string();
    let metrics_host = metrics_addr.to_string();
    assert_eq!(get(addr, None, "/metrics", &main_host).await.status, 404);
    assert_eq!(get(addr, None, "/api/engine", &main_host).await.status, 200);
    let scrape = get(metrics_addr, None, "/metrics", &metrics_host).await;
    assert_eq!(scrape.status, 200);
    assert!(scrape.body.contains("sonora_sessions_active"), "{scrape:?}");
    assert_eq!(
        get(metrics_addr, None, "/api/engine", &metrics_host)
            .await
            .status,
        404
    );
    let evil = format!("evil.example:{}", metrics_addr.port());
    assert_eq!(get(metrics_addr, None, "/metrics", &evil).await.status, 421);
    // Both listeners close on shutdown.
    stop.send(()).unwrap();
    let served = tokio::time::timeout(WAIT, task).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    assert!(
        TcpStream::connect(metrics_addr).await.is_err(),
        "still listening"
    );
}
