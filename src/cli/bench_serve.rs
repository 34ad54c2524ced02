//! `sonora bench serve`: many WebSocket clients streaming real-time PCM at
//! a gateway that runs the scripted echo engine in a child process. In one
//! run: one client alone (the baseline), then N at once; reports sessions
//! held, the server's CPU and memory per session, round-trip latency and
//! errors.
//!
//! The latency is measured where a client can see it: from sending the
//! frame that completes a turn to receiving the first reply audio of that
//! turn. The echo engine answers at once, so this is the gateway's added
//! delay in both directions together (client → engine plus engine →
//! client), loopback included.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::Failure;

#[derive(Debug, Args)]
pub(crate) struct ServeBenchArgs {
    /// Concurrent conversations.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Seconds of streaming, measured after every session is up.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Length of each PCM frame a client sends, in ms (browsers send 20).
    #[arg(long, default_value_t = 20)]
    frame_ms: u64,
    /// The echo engine answers every TURN_MS of audio ...
    #[arg(long, default_value_t = 2_000)]
    turn_ms: u64,
    /// ... with REPLY_MS of 24 kHz audio.
    #[arg(long, default_value_t = 1_000)]
    reply_ms: u64,
}

/// What one client saw.
#[derive(Debug, Default)]
pub(super) struct ClientReport {
    pub(super) ready: bool,
    pub(super) round_trips_us: Vec<u64>,
    bytes_in: u64,
    pub(super) errors: Vec<String>,
}

/// The address client `i` connects from: clients are spread over
/// 127.1.0.0/16, as people are over addresses, so the gateway's
/// per-address limits see many clients rather than one.
pub(super) fn client_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250) as u8 + 1))
}

pub(crate) fn run(args: &ServeBenchArgs) -> Result<(), Failure> {
    if args.sessions == 0 || args.frame_ms == 0 || !args.turn_ms.is_multiple_of(args.frame_ms) {
        return Err(anyhow!(
            "--sessions and --frame-ms must be positive and --turn-ms a multiple of --frame-ms"
        )
        .into());
    }
    raise_open_files(args.sessions * 2 + 256)?;
    let mut server = Server::start(args.turn_ms, args.reply_ms, args.sessions + 10)?;
    let result = on_one_thread(measure(args, &server));
    server.stop();
    let report = result?;
    println!("{report}");
    Ok(())
}

async fn measure(args: &ServeBenchArgs, server: &Server) -> anyhow::Result<serde_json::Value> {
    let baseline_seconds = args.seconds.clamp(3, 10);
    eprintln!("baseline: 1 session for {baseline_seconds} s");
    let (baseline, _) = load(args.into(), server, 1, baseline_seconds).await?;
    let idle_rss = server.rss_kib()?;
    eprintln!(
        "load: {} sessions for {} s ({} ms frames)",
        args.sessions, args.seconds, args.frame_ms
    );
    let (loaded, usage) = load(args.into(), server, args.sessions, args.seconds).await?;
    let held = loaded.iter().filter(|r| r.ready).count();
    let errors: usize = loaded.iter().map(|r| r.errors.len()).sum();
    let first_errors: Vec<&String> = loaded.iter().flat_map(|r| &r.errors).take(5).collect();
    let per_session_rss = usage.rss_kib.saturating_sub(idle_rss) as f64 / held.max(1) as f64;
    let cpu_share = usage.cpu.as_secs_f64() / usage.wall.as_secs_f64();
    let clients_share = usage.clients_cpu.as_secs_f64() / usage.wall.as_secs_f64();
    let (base_n, base_p50, base_p99, _) = round_trips(&baseline);
    let (n, p50, p99, max) = round_trips(&loaded);
    let mib_in: f64 = loaded.iter().map(|r| r.bytes_in as f64).sum::<f64>() / 1_048_576.0;
    println!(
        "sonora bench serve: {held}/{} sessions held, {} s, {} ms PCM frames, echo {} ms → {} ms",
        args.sessions, args.seconds, args.frame_ms, args.turn_ms, args.reply_ms
    );
    println!(
        "{:<34} {:>12} {:>12}",
        "",
        "1 session",
        format!("{held} sessions")
    );
    println!(
        "{:<34} {:>12.2} {:>12.2}",
        "round trip p50 (ms)", base_p50, p50
    );
    println!(
        "{:<34} {:>12.2} {:>12.2}",
        "round trip p99 (ms)", base_p99, p99
    );
    println!("{:<34} {:>12} {:>12}", "turns measured", base_n, n);
    println!(
        "{:<34} {:>12} {:>12.1}",
        "server CPU (% of one core)",
        "",
        cpu_share * 100.0
    );
    println!(
        "{:<34} {:>12} {:>12.1}",
        "load generator CPU (% of one core)",
        "",
        clients_share * 100.0
    );
    println!(
        "{:<34} {:>12} {:>12.3}",
        "server CPU ms per session-second",
        "",
        usage.cpu.as_secs_f64() * 1000.0 / (held.max(1) as f64 * usage.wall.as_secs_f64())
    );
    println!(
        "{:<34} {:>12} {:>12.0}",
        "server RSS per session (KiB)", "", per_session_rss
    );
    println!(
        "{:<34} {:>12} {:>12.0}",
        "server RSS (MiB)",
        "",
        usage.rss_kib as f64 / 1024.0
    );
    println!(
        "{:<34} {:>12} {:>12.1}",
        "reply audio received (MiB)", "", mib_in
    );
    println!("{:<34} {:>12} {:>12}", "errors", "", errors);
    for error in &first_errors {
        println!("  {error}");
    }
    Ok(json!({
        "sessions": args.sessions,
        "sessions_held": held,
        "seconds": args.seconds,
        "frame_ms": args.frame_ms,
        "turns_measured": n,
        "round_trip_ms": {"p50": p50, "p99": p99, "max": max},
        "baseline_round_trip_ms": {"p50": base_p50, "p99": base_p99, "turns": base_n},
        "p99_ratio_to_baseline": if base_p99 > 0.0 { p99 / base_p99 } else { 0.0 },
        "server_cpu_percent_of_one_core": cpu_share * 100.0,
        "load_generator_cpu_percent_of_one_core": clients_share * 100.0,
        "cores": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "server_rss_mib": usage.rss_kib as f64 / 1024.0,
        "server_rss_kib_per_session": per_session_rss,
        "errors": errors,
    }))
}

/// Runs the load generator on one thread, leaving the server the rest of
/// the machine.
pub(super) fn on_one_thread<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

/// Round trips of every report: how many, p50, p99 and max in ms.
pub(super) fn round_trips(reports: &[ClientReport]) -> (usize, f64, f64, f64) {
    let mut all: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.round_trips_us.iter().copied())
        .collect();
    all.sort_unstable();
    let at = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    (
        all.len(),
        at(0.5),
        at(0.99),
        all.last().map_or(0.0, |us| *us as f64 / 1000.0),
    )
}

/// What the server used while the clients streamed.
pub(super) struct Usage {
    pub(super) cpu: Duration,
    /// CPU of this process: the load generator shares the machine.
    pub(super) clients_cpu: Duration,
    pub(super) wall: Duration,
    pub(super) rss_kib: u64,
}

/// How the honest clients talk: frame length and the echo's turn length.
#[derive(Debug, Clone, Copy)]
pub(super) struct Talk {
    pub(super) frame_ms: u64,
    pub(super) turn_ms: u64,
}

impl From<&ServeBenchArgs> for Talk {
    fn from(args: &ServeBenchArgs) -> Self {
        Self {
            frame_ms: args.frame_ms,
            turn_ms: args.turn_ms,
        }
    }
}

/// Runs `sessions` clients for `seconds` once all are connected.
pub(super) async fn load(
    args: Talk,
    server: &Server,
    sessions: usize,
    seconds: u64,
) -> anyhow::Result<(Vec<ClientReport>, Usage)> {
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(sessions);
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::with_capacity(sessions);
    for i in 0..sessions {
        // Phases spread evenly over a turn: people do not all stop talking
        // in the same millisecond.
        let phase = Duration::from_micros(i as u64 * args.turn_ms * 1000 / sessions as u64);
        let spec = ClientSpec {
            addr: server.addr,
            source: client_address(i),
            frame_ms: args.frame_ms,
            turn_ms: args.turn_ms,
            seconds,
            phase,
        };
        let (ready_tx, go) = (ready_tx.clone(), std::sync::Arc::clone(&go));
        tasks.push(tokio::spawn(client(spec, ready_tx, go)));
        // Ramp up: a few hundred connections a second.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(ready_tx);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready = 0;
    while ready < sessions && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let cpu_before = server.cpu()?;
    let clients_before = super::bench::cpu_time(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let started = Instant::now();
    go.notify_waiters();
    // The peak RSS mid-run, with every session streaming.
    tokio::time::sleep(Duration::from_secs(seconds) / 2).await;
    let rss_kib = server.rss_kib()?;
    let mut reports = Vec::with_capacity(sessions);
    for task in tasks {
        reports.push(task.await.unwrap_or_else(|e| ClientReport {
            errors: vec![format!("client task failed: {e}")],
            ..ClientReport::default()
        }));
    }
    let usage = Usage {
        cpu: server.cpu()?.saturating_sub(cpu_before),
        clients_cpu: super::bench::cpu_time(nix::sys::resource::UsageWho::RUSAGE_SELF)?
            .saturating_sub(clients_before),
        wall: started.elapsed(),
        rss_kib,
    };
    Ok((reports, usage))
}

#[derive(Debug, Clone, Copy)]
struct ClientSpec {
    addr: SocketAddr,
    source: IpAddr,
    frame_ms: u64,
    turn_ms: u64,
    seconds: u64,
    /// Delay before the first frame, once every client is ready.
    phase: Duration,
}

async fn client(
    spec: ClientSpec,
    ready: tokio::sync::mpsc::Sender<()>,
    go: std::sync::Arc<tokio::sync::Notify>,
) -> ClientReport {
    let mut report = ClientReport::default();
    if let Err(e) = converse(spec, &ready, &go, &mut report).await {
        report.errors.push(e.to_string());
    }
    report
}

async fn converse(
    spec: ClientSpec,
    ready: &tokio::sync::mpsc::Sender<()>,
    go: &tokio::sync::Notify,
    report: &mut ClientReport,
) -> anyhow::Result<()> {
    let url = format!("ws://{}/ws", spec.addr);
    let waiting = go.notified();
    tokio::pin!(waiting);
    waiting.as_mut().enable();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(spec.source, 0))?;
    let stream = socket.connect(spec.addr).await.context("connect")?;
    // As browsers do, without Nagle's delay.
    stream.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .context("connect")?;
    let (mut sink, mut stream) = ws.split();
    let hello = json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 16000}});
    sink.send(Message::Text(hello.to_string().into())).await?;
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"ready\"") => break,
            Some(Ok(Message::Text(text))) if text.contains("\"error\"") => {
                return Err(anyhow!("refused: {text}"));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(anyhow!("closed before ready: {frame:?}"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(anyhow!("closed before ready")),
        }
    }
    report.ready = true;
    let _ = ready.send(()).await;
    waiting.await;
    tokio::time::sleep(spec.phase).await;
    // Quiet noise, never silence: it is what a microphone sends.
    let samples = (spec.frame_ms * 16) as usize;
    let frame: Vec<u8> = (0..samples)
        .flat_map(|i| (((i * 7919) % 200) as i16 - 100).to_le_bytes())
        .collect();
    let frame = tokio_tungstenite::tungstenite::Bytes::from(frame);
    let frames_per_turn = spec.turn_ms / spec.frame_ms;
    let total_frames = spec.seconds * 1000 / spec.frame_ms;
    let mut tick = tokio::time::interval(Duration::from_millis(spec.frame_ms));
    let mut sent = 0u64;
    let mut turn_sent_at: Option<Instant> = None;
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick(), if !stopping => {
                sink.send(Message::Binary(frame.clone())).await?;
                sent += 1;
                if sent.is_multiple_of(frames_per_turn) {
                    turn_sent_at = Some(Instant::now());
                }
                if sent == total_frames {
                    stopping = true;
                    sink.send(Message::Text(json!({"type": "stop"}).to_string().into())).await?;
                }
            }
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    report.bytes_in += bytes.len() as u64;
                    if let Some(at) = turn_sent_at.take() {
                        report.round_trips_us.push(at.elapsed().as_micros() as u64);
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    if text.contains("\"type\":\"error\"") {
                        report.errors.push(text.to_string());
                    }
                    if text.contains("\"type\":\"end\"") {
                        if !text.contains("client_stopped") {
                            report.errors.push(text.chars().take(200).collect());
                        }
                        return Ok(());
                    }
                }
                Some(Ok(Message::Close(frame))) => return Err(anyhow!("closed early: {frame:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(anyhow!("connection lost")),
            }
        }
    }
}

/// The gateway under test, in its own process.
pub(super) struct Server {
    child: Child,
    pub(super) addr: SocketAddr,
}

impl Server {
    pub(super) fn start(turn_ms: u64, reply_ms: u64, max_sessions: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the sonora binary")?;
        let mut child = Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg(format!("--scripted-echo={turn_ms}:{reply_ms}"))
            .arg(format!("--set=server.max_sessions={max_sessions}"))
            // Clients come from many addresses (see `client_address`), so
            // the per-address limits stay at their defaults; every
            // conversation holds a connection.
            .arg(format!(
                "--set=server.max_connections={}",
                max_sessions * 2 + 100
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the server")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no server stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the server's address")?;
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("the server said {line:?}"))?;
        Ok(Self { child, addr })
    }

    pub(super) fn proc_file(&self, name: &str) -> anyhow::Result<String> {
        let path = format!("/proc/{}/{name}", self.child.id());
        std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
    }

    /// User plus system CPU time of the server so far.
    pub(super) fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = self.proc_file("stat")?;
        // Fields after the command name (which may hold spaces).
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 of stat; 12 and 13 here.
        let total = ticks(11) + ticks(12);
        let hz = 100; // USER_HZ on Linux
        Ok(Duration::from_millis(total * 1000 / hz))
    }

    pub(super) fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = self.proc_file("status")?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS for the server"))
    }

    pub(super) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lifts the open-file limit (inherited by the server) to `wanted`, as far
/// as the hard limit allows.
pub(super) fn raise_open_files(wanted: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    let wanted = (wanted as u64).min(hard);
    if soft < wanted {
        setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).context("setrlimit")?;
    }
    if wanted < 256 {
        return Err(anyhow!("the open-file limit is too low ({hard})"));
    }
    Ok(())
}
