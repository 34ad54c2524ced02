//! `sonora bench serve`: many WebSocket clients streaming real-time PCM at
//! a gateway that runs the scripted echo engine in a child process. In one
//! run: one client alone (the baseline), then N at once; reports sessions
//! held, the server's CPU and memory per session, the load generator's own
//! CPU (this process, one thread, see `client`), round-trip latency and
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
use serde_json::json;

use super::client;
pub(super) use super::client::{ClientReport, Talk};
use super::floor::FloorKind;
use crate::cli::Failure;

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
    /// Worker threads of the gateway's runtime (set as its
    /// `TOKIO_WORKER_THREADS`); 0 keeps its default, one per core.
    #[arg(long, default_value_t = 0)]
    gateway_workers: usize,
    /// Phone calls instead of web pages: each client is a Twilio Media
    /// Stream (the webhook, then μ-law in JSON on `/twilio/stream`).
    #[arg(long)]
    phone: bool,
    /// Engine instances the gateway routes over (each an echo engine with
    /// no limit of its own): every conversation runs behind the pool's
    /// relay. 0: the one engine, no relay.
    #[arg(long, default_value_t = 0)]
    instances: usize,
    /// Skip the floor: the same load on a bare WebSocket echo (see `floor`).
    #[arg(long)]
    no_floor: bool,
    /// The floor's echo reads and writes frames with the gateway's WebSocket
    /// library instead of by hand (what the library costs is the difference).
    #[arg(long, conflicts_with = "floor_engine_task")]
    floor_library: bool,
    /// The floor's echo counts and answers in a task of its own per
    /// connection, behind a channel each way, as the gateway's engines run
    /// (what those hand-overs cost is the difference).
    #[arg(long)]
    floor_engine_task: bool,
}

impl ServeBenchArgs {
    fn floor_kind(&self) -> FloorKind {
        FloorKind::from_flags(self.floor_library, self.floor_engine_task)
    }
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
    let mut server = Server::start(
        args.turn_ms,
        args.reply_ms,
        args.sessions + 10,
        args.gateway_workers,
        args.phone,
        args.instances,
    )?;
    let result = on_one_thread(measure(args, &server));
    server.stop();
    let mut report = result?;
    // Web clients only: the floor does not speak Twilio's messages.
    if !args.no_floor && !args.phone {
        let mut floor = Server::start_floor(
            args.turn_ms,
            args.reply_ms,
            args.gateway_workers,
            args.floor_kind(),
        )?;
        let result = on_one_thread(measure_floor(args, &floor, &report));
        floor.stop();
        report["floor"] = result?;
    }
    println!("{report}");
    Ok(())
}

/// The same load on the floor: the gateway's CPU and round trips against
/// a bare echo's on the same runtime, in the same run.
async fn measure_floor(
    args: &ServeBenchArgs,
    floor: &Server,
    gateway: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    eprintln!(
        "floor: {} sessions for {} s on a bare WebSocket echo",
        args.sessions, args.seconds
    );
    let (loaded, usage) = load(args.into(), floor, args.sessions, args.seconds).await?;
    let held = loaded.iter().filter(|r| r.ready).count();
    let errors: usize = loaded.iter().map(|r| r.errors.len()).sum();
    let (_, p50, p99, _) = round_trips(&loaded);
    let session_seconds = held.max(1) as f64 * usage.wall.as_secs_f64();
    let cpu_ms = usage.cpu.as_secs_f64() * 1000.0 / session_seconds;
    let clients_ms = usage.clients_cpu.as_secs_f64() * 1000.0 / session_seconds;
    let gateway_ms = gateway["server_cpu_ms_per_session_second"]
        .as_f64()
        .unwrap_or(0.0);
    let ratio = if cpu_ms > 0.0 {
        gateway_ms / cpu_ms
    } else {
        0.0
    };
    let kind = args.floor_kind();
    println!(
        "floor ({}, same runtime, same load): {held}/{} held, {errors} errors",
        kind.describe(),
        args.sessions
    );
    println!("{:<34} {:>12.2}", "floor round trip p50 (ms)", p50);
    println!("{:<34} {:>12.2}", "floor round trip p99 (ms)", p99);
    println!("{:<34} {:>12.3}", "floor CPU ms per session-second", cpu_ms);
    println!(
        "{:<34} {:>12.3}",
        "load gen. CPU ms per session-sec.", clients_ms
    );
    println!(
        "{:<34} {:>12.3}",
        "gateway beyond the floor (ms)",
        gateway_ms - cpu_ms
    );
    println!("{:<34} {:>12.2}", "gateway / floor CPU", ratio);
    Ok(json!({
        "kind": kind.as_str(),
        "sessions_held": held,
        "errors": errors,
        "round_trip_ms": {"p50": p50, "p99": p99},
        "server_cpu_ms_per_session_second": cpu_ms,
        "load_generator_cpu_ms_per_session_second": clients_ms,
        "gateway_to_floor_cpu_ratio": ratio,
    }))
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
    let workers = match args.gateway_workers {
        0 => "one per core".to_owned(),
        n => n.to_string(),
    };
    let kind = if args.phone {
        "phone calls (μ-law, Twilio Media Streams)"
    } else {
        "sessions"
    };
    let routing = match args.instances {
        0 => "one engine".to_owned(),
        n => format!("{n} engine instances (relayed)"),
    };
    println!(
        "sonora bench serve: {held}/{} {kind} held, {} s, {} ms frames, echo {} ms → {} ms, gateway workers: {workers}, {routing}",
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
    let session_seconds = held.max(1) as f64 * usage.wall.as_secs_f64();
    let server_ms_per_session_second = usage.cpu.as_secs_f64() * 1000.0 / session_seconds;
    let clients_ms_per_session_second = usage.clients_cpu.as_secs_f64() * 1000.0 / session_seconds;
    println!(
        "{:<34} {:>12} {:>12.3}",
        "server CPU ms per session-second", "", server_ms_per_session_second
    );
    println!(
        "{:<34} {:>12} {:>12.3}",
        "load gen. CPU ms per session-sec.", "", clients_ms_per_session_second
    );
    // How many such sessions one core carries at this load.
    let per_core = held as f64 / cpu_share.max(1e-9);
    println!(
        "{:<34} {:>12} {:>12.0}",
        "sessions per core (at this load)", "", per_core
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
        "gateway_workers": args.gateway_workers,
        "turns_measured": n,
        "round_trip_ms": {"p50": p50, "p99": p99, "max": max},
        "baseline_round_trip_ms": {"p50": base_p50, "p99": base_p99, "turns": base_n},
        "p99_ratio_to_baseline": if base_p99 > 0.0 { p99 / base_p99 } else { 0.0 },
        "server_cpu_percent_of_one_core": cpu_share * 100.0,
        "load_generator_cpu_percent_of_one_core": clients_share * 100.0,
        "phone": args.phone,
        "sessions_per_core": per_core,
        "server_cpu_ms_per_session_second": server_ms_per_session_second,
        "load_generator_cpu_ms_per_session_second": clients_ms_per_session_second,
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

impl From<&ServeBenchArgs> for Talk {
    fn from(args: &ServeBenchArgs) -> Self {
        Self {
            frame_ms: args.frame_ms,
            turn_ms: args.turn_ms,
            phone: args.phone,
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
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let mut connecting = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let (addr, source) = (server.addr, client_address(i));
        let call = args
            .phone
            .then(|| CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        connecting.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), client::connect(addr, source, call))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no ready within 60 s")))
        }));
        // Ramp up: a few hundred connections a second.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut clients = Vec::with_capacity(sessions);
    let mut refused = Vec::new();
    for (i, task) in connecting.into_iter().enumerate() {
        match task.await.map_err(|e| client::lost(&e)).and_then(|r| r) {
            Ok(connected) => {
                // Phases spread evenly over a turn: people do not all stop
                // talking in the same millisecond.
                let phase = Duration::from_micros(i as u64 * args.turn_ms * 1000 / sessions as u64);
                clients.push((connected, phase));
            }
            Err(e) => refused.push(client::failed(&e)),
        }
    }
    let cpu_before = server.cpu()?;
    let clients_before = super::cpu_time(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let started = Instant::now();
    let streaming = tokio::spawn(client::stream(clients, args, seconds));
    // The peak RSS mid-run, with every session streaming.
    tokio::time::sleep(Duration::from_secs(seconds) / 2).await;
    let rss_kib = server.rss_kib()?;
    let mut reports = streaming
        .await
        .map_err(|e| anyhow!("the load generator failed: {e}"))?;
    let usage = Usage {
        cpu: server.cpu()?.saturating_sub(cpu_before),
        clients_cpu: super::cpu_time(nix::sys::resource::UsageWho::RUSAGE_SELF)?
            .saturating_sub(clients_before),
        wall: started.elapsed(),
        rss_kib,
    };
    reports.extend(refused);
    Ok((reports, usage))
}

/// The variable the async runtime reads for its number of worker threads.
const RUNTIME_WORKERS_ENV: &str = "TOKIO_WORKER_THREADS";

/// The gateway under test, in its own process.
pub(super) struct Server {
    child: Child,
    pub(super) addr: SocketAddr,
    /// The gateway's ledger, removed at the end.
    ledger_dir: Option<std::path::PathBuf>,
}

impl Server {
    /// `workers` is the gateway runtime's worker threads; 0 for its default.
    pub(super) fn start(
        turn_ms: u64,
        reply_ms: u64,
        max_sessions: usize,
        workers: usize,
        phone: bool,
        instances: usize,
    ) -> anyhow::Result<Self> {
        let mut command = Self::command(workers)?;
        // A ledger of its own, as a deployment has: every turn's usage is
        // recorded (the echo engine's cost 0).
        let ledger_dir = std::env::temp_dir().join(format!("sonora-bench-{}", std::process::id()));
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        if phone {
            // Unsigned webhooks from the loopback, and no greeting: the
            // bench measures the calls, not eSpeak NG.
            command.args([
                "--set=telephony.allow_unsigned=true",
                "--set=server.public_url=http://127.0.0.1",
                "--set=telephony.greeting=\"\"",
            ]);
        }
        command
            .arg(format!("--scripted-echo={turn_ms}:{reply_ms}"))
            .arg(format!("--scripted-echo-instances={instances}"))
            .arg(format!(
                "--ledger=sqlite://{}",
                ledger_dir.join("ledger.db").display()
            ))
            .arg(format!("--set=server.max_sessions={max_sessions}"))
            // Clients come from many addresses (see `client_address`), so
            // the per-address limits stay at their defaults; every
            // conversation holds a connection.
            .arg(format!(
                "--set=server.max_connections={}",
                max_sessions * 2 + 100
            ))
            // Its log goes nowhere: a line per turn at `info` would only
            // add to the cost being measured.
            .env(crate::config::LOG_ENV, "warn");
        Self::spawn(command, Some(ledger_dir))
    }

    /// The floor (`floor`): a bare WebSocket echo, in its own process too.
    fn start_floor(
        turn_ms: u64,
        reply_ms: u64,
        workers: usize,
        kind: FloorKind,
    ) -> anyhow::Result<Self> {
        let mut command = Self::command(workers)?;
        command.args([
            "bench",
            "floor",
            &format!("--turn-ms={turn_ms}"),
            &format!("--reply-ms={reply_ms}"),
        ]);
        command.args(kind.flag());
        Self::spawn(command, None)
    }

    /// This binary, its runtime given `workers` threads (0: its default).
    fn command(workers: usize) -> anyhow::Result<Command> {
        let exe = std::env::current_exe().context("cannot find the sonora binary")?;
        let mut command = Command::new(exe);
        if workers > 0 {
            command.env(RUNTIME_WORKERS_ENV, workers.to_string());
        }
        Ok(command)
    }

    /// Starts `command` and reads the address from its first stdout line.
    fn spawn(mut command: Command, ledger_dir: Option<std::path::PathBuf>) -> anyhow::Result<Self> {
        let mut child = command
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
        Ok(Self {
            child,
            addr,
            ledger_dir,
        })
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
        if let Some(dir) = &self.ledger_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
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
