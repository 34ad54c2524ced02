//! `sonora bench hostile`: N honest real-time clients alone, then the same N
//! beside M hostile ones that replay every known attack in a loop, against
//! one gateway (scripted echo engine) in its own process. Prints the honest
//! clients' round trip in both phases and their ratio, the server's peak
//! memory, and every refusal by reason from `/metrics`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::serve::{Server, Talk, load, on_one_thread, raise_open_files, round_trips};
use crate::audio::crafted;
use crate::cli::Failure;

#[derive(Debug, Args)]
pub(crate) struct HostileBenchArgs {
    /// Honest real-time conversations.
    #[arg(long, default_value_t = 50)]
    honest: usize,
    /// Hostile clients, each from its own address, each looping over every attack.
    #[arg(long, default_value_t = 8)]
    hostile: usize,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
}

crate::names::named_enum! {
    /// Every attack a hostile client replays.
    enum Attack {
        /// WebM blocks of 256 empty laced frames (concealment amplification).
        EmptyLacedFrames = "empty_laced_frames",
        /// Ogg pages of 255 empty packets.
        EmptyOggPackets = "empty_ogg_packets",
        /// Raw PCM far faster than real time.
        PcmFlood = "pcm_flood",
        /// Valid Opus packets far faster than real time.
        OpusFlood = "opus_flood",
        /// Typed questions as fast as the socket takes them.
        TextFlood = "text_flood",
        /// Tool results for calls never made.
        ForgedToolResults = "forged_tool_results",
        /// A text frame over the 64 KiB limit.
        OversizedText = "oversized_text",
        /// Audio sent on after `stop`.
        AudioAfterStop = "audio_after_stop",
        /// An odd PCM rate.
        OddRate = "odd_rate",
        /// Half-sent HTTP request headers, held open.
        Slowloris = "slowloris",
        /// Requests for another host name (DNS rebinding).
        ForeignHost = "foreign_host",
        /// Many conversations from one address, held idle.
        HoldSlots = "hold_slots",
    }
}

pub(crate) fn run(args: &HostileBenchArgs) -> Result<(), Failure> {
    if args.honest == 0 || args.seconds == 0 {
        return Err(anyhow!("--honest and --seconds must be positive").into());
    }
    raise_open_files((args.honest + args.hostile * 32) * 2 + 256)?;
    let mut server = Server::start(
        2_000,
        1_000,
        args.honest + args.hostile * 16 + 10,
        0,
        false,
        0,
    )?;
    let result = on_one_thread(measure(args, &server));
    server.stop();
    result?;
    Ok(())
}

async fn measure(args: &HostileBenchArgs, server: &Server) -> anyhow::Result<()> {
    let talk = Talk {
        frame_ms: 20,
        turn_ms: 2_000,
        phone: false,
    };
    eprintln!(
        "baseline: {} honest sessions for {} s",
        args.honest, args.seconds
    );
    let (alone, _) = load(talk, server, args.honest, args.seconds).await?;
    let rss_before = server.rss_kib()?;
    eprintln!(
        "attack: {} honest and {} hostile clients for {} s",
        args.honest, args.hostile, args.seconds
    );
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(AtomicU64::new(0));
    let mut hostile = Vec::new();
    for k in 0..args.hostile {
        let source = IpAddr::V4(Ipv4Addr::new(127, 2, 0, k as u8 + 1));
        let (stop, attacks) = (Arc::clone(&stop), Arc::clone(&attacks));
        let addr = server.addr;
        hostile.push(tokio::spawn(async move {
            let mut round = k;
            while !stop.load(Ordering::Relaxed) {
                let attack = Attack::ALL[round % Attack::ALL.len()];
                round += 1;
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), run_attack(attack, addr, source))
                        .await;
                attacks.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Let the attacks get going before the honest clients start.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (attacked, usage) = load(talk, server, args.honest, args.seconds).await?;
    stop.store(true, Ordering::Relaxed);
    for task in hostile {
        let _ = task.await;
    }
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .context("scraping /metrics")?
        .text()
        .await?;
    let peak_kib = server
        .proc_file("status")?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let (n_alone, p50_alone, p99_alone, _) = round_trips(&alone);
    let (n_attacked, p50_attacked, p99_attacked, max_attacked) = round_trips(&attacked);
    let held = |reports: &[super::serve::ClientReport]| {
        reports
            .iter()
            .filter(|r| r.ready && r.errors.is_empty())
            .count()
    };
    println!(
        "sonora bench hostile: {} honest real-time sessions, {} hostile clients ({} attacks run), {} s a phase",
        args.honest,
        args.hostile,
        attacks.load(Ordering::Relaxed),
        args.seconds
    );
    println!(
        "attacks, in turn: {}",
        Attack::ALL.map(Attack::as_str).join(", ")
    );
    println!("{:<36} {:>12} {:>14}", "", "honest alone", "under attack");
    println!(
        "{:<36} {:>12} {:>14}",
        "honest sessions without error",
        held(&alone),
        held(&attacked)
    );
    println!(
        "{:<36} {:>12} {:>14}",
        "turns measured", n_alone, n_attacked
    );
    println!(
        "{:<36} {:>12.2} {:>14.2}",
        "round trip p50 (ms)", p50_alone, p50_attacked
    );
    println!(
        "{:<36} {:>12.2} {:>14.2}",
        "round trip p99 (ms)", p99_alone, p99_attacked
    );
    let ratio = if p99_alone > 0.0 {
        p99_attacked / p99_alone
    } else {
        0.0
    };
    println!(
        "{:<36} {:>12} {:>14.2}",
        "p99 ratio (goal ≤ 1.5)", "", ratio
    );
    println!(
        "{:<36} {:>12} {:>14.2}",
        "round trip max (ms)", "", max_attacked
    );
    println!(
        "{:<36} {:>12} {:>14.1}",
        "server CPU (% of one core)",
        "",
        usage.cpu.as_secs_f64() * 100.0 / usage.wall.as_secs_f64()
    );
    println!(
        "{:<36} {:>12.0} {:>14.0}",
        "server RSS (MiB), peak under attack",
        rss_before as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    );
    println!("refusals and ends by reason:");
    for line in metrics.lines().filter(|l| {
        (l.starts_with("sonora_sessions_refused_total")
            || l.starts_with("sonora_protocol_errors_total")
            || l.starts_with("sonora_sessions_closed_total")
            || l.starts_with("sonora_http_")
            || l.starts_with("sonora_decoder_too_fast_total")
            || l.starts_with("sonora_decoder_packets_corrupt_total"))
            && !l.ends_with(" 0")
    }) {
        println!("  {line}");
    }
    let first_errors: Vec<&String> = attacked.iter().flat_map(|r| &r.errors).take(5).collect();
    for error in first_errors {
        println!("  honest error: {error}");
    }
    Ok(())
}

type Ws = WebSocketStream<TcpStream>;

async fn connect(addr: SocketAddr, source: IpAddr) -> anyhow::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket.connect(addr).await?)
}

async fn open(addr: SocketAddr, source: IpAddr) -> anyhow::Result<Ws> {
    let stream = connect(addr, source).await?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream).await?;
    Ok(ws)
}

/// Opens a conversation in `format` and waits for `ready`.
async fn start(addr: SocketAddr, source: IpAddr, audio: serde_json::Value) -> anyhow::Result<Ws> {
    let mut ws = open(addr, source).await?;
    let hello = json!({"type": "hello", "version": 1, "audio": audio});
    ws.send(Message::Text(hello.to_string().into())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"ready\"") => return Ok(ws),
            Some(Ok(Message::Text(_) | Message::Binary(_) | Message::Ping(_))) => {}
            other => return Err(anyhow!("no ready: {other:?}")),
        }
    }
}

/// Sends binary frames until the server stops taking them, then reads to
/// the end.
async fn flood(mut ws: Ws, frames: impl Iterator<Item = Vec<u8>>) -> anyhow::Result<()> {
    for frame in frames {
        if ws.send(Message::Binary(frame.into())).await.is_err() {
            break;
        }
    }
    drain(ws).await
}

async fn drain(mut ws: Ws) -> anyhow::Result<()> {
    while let Some(Ok(message)) = ws.next().await {
        if matches!(message, Message::Close(_)) {
            break;
        }
    }
    Ok(())
}

async fn run_attack(attack: Attack, addr: SocketAddr, source: IpAddr) -> anyhow::Result<()> {
    let pcm = json!({"format": "pcm16", "rate": 16000});
    match attack {
        Attack::EmptyLacedFrames => {
            let ws = start(addr, source, json!({"format": "webm"})).await?;
            let header = std::iter::once(crafted::webm_header());
            let blocks = std::iter::repeat_n(crafted::webm_cluster(200, 256, &[]), 20);
            flood(ws, header.chain(blocks)).await
        }
        Attack::EmptyOggPackets => {
            let ws = start(addr, source, json!({"format": "ogg"})).await?;
            let header = std::iter::once(crafted::ogg_header());
            flood(
                ws,
                header.chain((0..200).map(crafted::ogg_empty_packets_page)),
            )
            .await
        }
        Attack::PcmFlood => {
            let ws = start(addr, source, pcm).await?;
            flood(ws, std::iter::repeat_n(vec![0u8; 65_536], 40)).await
        }
        Attack::OpusFlood => {
            let ws = start(addr, source, json!({"format": "webm"})).await?;
            let header = std::iter::once(crafted::webm_header());
            let cluster = crafted::webm_cluster(10, 64, &crafted::OPUS_SILENCE_20MS);
            flood(ws, header.chain(std::iter::repeat_n(cluster, 20))).await
        }
        Attack::TextFlood => {
            let mut ws = start(addr, source, pcm).await?;
            for i in 0..200 {
                let text = json!({"type": "text", "text": format!("¿hola? {i}")});
                ws.send(Message::Text(text.to_string().into())).await?;
            }
            ws.send(Message::Text(json!({"type": "stop"}).to_string().into()))
                .await?;
            drain(ws).await
        }
        Attack::ForgedToolResults => {
            let mut ws = start(addr, source, pcm).await?;
            for i in 0..100 {
                let forged = json!({"type": "tool_result", "id": format!("call-{i}"), "result": {"x": "y".repeat(1000)}});
                ws.send(Message::Text(forged.to_string().into())).await?;
            }
            ws.send(Message::Text(json!({"type": "stop"}).to_string().into()))
                .await?;
            drain(ws).await
        }
        Attack::OversizedText => {
            let mut ws = start(addr, source, pcm).await?;
            let big = json!({"type": "text", "text": "a".repeat(200 * 1024)});
            let _ = ws.send(Message::Text(big.to_string().into())).await;
            drain(ws).await
        }
        Attack::AudioAfterStop => {
            let mut ws = start(addr, source, pcm).await?;
            ws.send(Message::Text(json!({"type": "stop"}).to_string().into()))
                .await?;
            flood(ws, std::iter::repeat_n(vec![0u8; 3_200], 300)).await
        }
        Attack::OddRate => {
            let mut ws = open(addr, source).await?;
            let hello = json!({"type": "hello", "version": 1, "audio": {"format": "pcm16", "rate": 47_999}});
            ws.send(Message::Text(hello.to_string().into())).await?;
            let _ = ws.next().await;
            Ok(())
        }
        Attack::Slowloris => {
            let mut held = Vec::new();
            for _ in 0..20 {
                let mut tcp = connect(addr, source).await?;
                tcp.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                    .await?;
                held.push(tcp);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        }
        Attack::ForeignHost => {
            for path in ["/", "/metrics", "/api/engine", "/ws"] {
                let mut tcp = connect(addr, source).await?;
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: evil.example:{}\r\nOrigin: http://evil.example:{}\r\nConnection: close\r\n\r\n",
                    addr.port(),
                    addr.port()
                );
                tcp.write_all(request.as_bytes()).await?;
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer),
                )
                .await;
            }
            Ok(())
        }
        Attack::HoldSlots => {
            let mut held = Vec::new();
            for _ in 0..12 {
                match start(addr, source, pcm.clone()).await {
                    Ok(ws) => held.push(ws),
                    Err(_) => continue,
                }
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(())
        }
    }
}
