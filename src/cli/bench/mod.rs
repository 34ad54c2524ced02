//! `sonora bench`: measurements against baselines taken in the same run.
//! Streaming decode lives here; the gateway load (`serve`), the hostile
//! clients (`hostile`) and the local engine (`local`) have their own files.

mod accuracy;
mod client;
mod floor;
mod hostile;
mod local;
mod serve;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use nix::sys::resource::{Usage, UsageWho, getrusage};
use serde::Serialize;

use super::Failure;
use super::decode::{Recording, limits};
use crate::audio::{self, AudioFormat, DecoderLimits, ENGINE_RATE_HZ, StreamDecoder};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Streaming decode: Sonora's decoder vs an ffmpeg process per stream vs bare libopus.
    Decode(DecodeBenchArgs),
    /// Spanish questions through the local engine: latency, recognition and synthesis times.
    Local(local::LocalBenchArgs),
    /// Many WebSocket clients streaming at a gateway with a scripted echo engine: sessions
    /// held, server CPU and memory per session, round-trip latency against one client alone.
    Serve(serve::ServeBenchArgs),
    /// Honest real-time clients alone, then beside hostile clients replaying every known
    /// attack: the honest round trip in both, the ratio, peak memory, refusals by reason.
    Hostile(hostile::HostileBenchArgs),
    /// Resident memory of many concurrent decoders (run by `bench decode` in a fresh process).
    #[command(hide = true)]
    DecodeMemory(MemoryArgs),
    /// The bare WebSocket echo `bench serve` compares the gateway with (run by it).
    #[command(hide = true)]
    Floor(floor::FloorArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DecodeBenchArgs {
    /// Recorded stream (default: the 60 s Chrome recording in tests/fixtures).
    #[arg(long)]
    input: Option<PathBuf>,
    /// JSON array of blob lengths (default: the recording's own `.chunks.json`).
    #[arg(long)]
    chunks: Option<PathBuf>,
    /// MIME type of the input (default: from the file name).
    #[arg(long)]
    mime: Option<String>,
    /// Minimum seconds spent measuring each contender.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent decoders held for the memory measurement.
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Path of the ffmpeg binary for the baseline.
    #[arg(long, default_value = "ffmpeg")]
    ffmpeg: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct MemoryArgs {
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    chunks: Option<PathBuf>,
    #[arg(long)]
    mime: Option<String>,
    #[arg(long)]
    sessions: usize,
}

const DEFAULT_INPUT: &str = "tests/fixtures/chrome_60s.webm";

pub(crate) fn run(config: &Config, command: BenchCommand) -> Result<(), Failure> {
    match command {
        BenchCommand::Decode(args) => bench_decode(config, &args),
        BenchCommand::Local(args) => local::run(config, &args),
        BenchCommand::Serve(args) => serve::run(&args),
        BenchCommand::Hostile(args) => hostile::run(&args),
        BenchCommand::Floor(args) => floor::run(&args),
        BenchCommand::DecodeMemory(args) => {
            let recording =
                Recording::load(&args.input, args.mime.as_deref(), args.chunks.as_deref())?;
            let report = memory_of_sessions(&recording, limits(config), args.sessions)?;
            println!(
                "{}",
                serde_json::to_string(&report).context("cannot print")?
            );
            Ok(())
        }
    }
}

/// CPU time of the calling thread (or of reaped children).
pub(super) fn cpu_time(who: UsageWho) -> anyhow::Result<Duration> {
    let usage: Usage = getrusage(who).context("getrusage")?;
    let to = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    Ok(to(usage.user_time()) + to(usage.system_time()))
}

#[derive(Debug, Serialize)]
struct Contender {
    name: &'static str,
    runs: u32,
    audio_seconds: f64,
    cpu_ms_per_audio_second: f64,
    x_realtime: f64,
    first_pcm_ms: Option<f64>,
    memory_per_session_bytes: Option<u64>,
}

impl Contender {
    fn new(name: &'static str, runs: u32, audio_seconds: f64, cpu: Duration) -> Self {
        let cpu_s = cpu.as_secs_f64().max(1e-9);
        Self {
            name,
            runs,
            audio_seconds,
            cpu_ms_per_audio_second: cpu_s * 1000.0 / audio_seconds,
            x_realtime: audio_seconds / cpu_s,
            first_pcm_ms: None,
            memory_per_session_bytes: None,
        }
    }
}

#[derive(Debug, Serialize)]
struct MemoryReport {
    sessions: usize,
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    per_session_bytes: u64,
    pending_bytes_high_water: u64,
}

fn bench_decode(config: &Config, args: &DecodeBenchArgs) -> Result<(), Failure> {
    let input = args
        .input
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_INPUT));
    let chunks = args.chunks.clone().or_else(|| {
        let sibling = PathBuf::from(format!("{}.chunks.json", input.display()));
        sibling.exists().then_some(sibling)
    });
    let recording = Recording::load(&input, args.mime.as_deref(), chunks.as_deref())?;
    let format = AudioFormat::from_mime(&recording.mime)
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("{}: give --mime for this input", input.display()))?;
    let demuxer = match format {
        AudioFormat::Webm => "matroska",
        AudioFormat::Ogg => "ogg",
        AudioFormat::Pcm16 { .. } => {
            return Err(anyhow!("the decode benchmark needs a WebM or Ogg Opus input").into());
        }
    };
    let limits = limits(config);
    let budget = Duration::from_secs_f64(args.seconds.max(0.1));
    eprintln!(
        "input {} ({} bytes in {} chunks), {:.1} s per contender",
        input.display(),
        recording.bytes.len(),
        recording.chunk_lengths.len(),
        budget.as_secs_f64()
    );

    let (sonora, reference) = bench_sonora(&recording, limits, budget)?;
    let floor = bench_libopus(format, &recording, budget)?;
    let (ffmpeg, ffmpeg_pcm) = bench_ffmpeg(&args.ffmpeg, demuxer, &recording, budget)?;
    let memory = memory_in_child(&input, chunks.as_deref(), &recording.mime, args.sessions)?;

    let mut sonora = sonora;
    sonora.memory_per_session_bytes = Some(memory.per_session_bytes);
    let agreement_db = snr_db(&ffmpeg_pcm, &reference);
    let cpu_ratio = ffmpeg.cpu_ms_per_audio_second / sonora.cpu_ms_per_audio_second;
    let floor_ratio = sonora.cpu_ms_per_audio_second / floor.cpu_ms_per_audio_second;
    let memory_ratio = ffmpeg.memory_per_session_bytes.unwrap_or(0) as f64
        / memory.per_session_bytes.max(1) as f64;

    println!(
        "{:<28} {:>6} {:>10} {:>12} {:>11} {:>13}",
        "contender", "runs", "ms CPU/s", "x realtime", "first PCM", "memory/sess"
    );
    for c in [&sonora, &ffmpeg, &floor] {
        println!(
            "{:<28} {:>6} {:>10.3} {:>12.0} {:>11} {:>13}",
            c.name,
            c.runs,
            c.cpu_ms_per_audio_second,
            c.x_realtime,
            c.first_pcm_ms
                .map_or("-".into(), |ms| format!("{ms:.3} ms")),
            c.memory_per_session_bytes.map_or("-".into(), human_bytes),
        );
    }
    println!(
        "ffmpeg/sonora CPU {cpu_ratio:.2}x   memory {memory_ratio:.0}x   sonora/libopus CPU {floor_ratio:.3}   \
         sonora vs ffmpeg output {agreement_db:.1} dB SNR   pending high-water {} bytes",
        memory.pending_bytes_high_water
    );
    let summary = serde_json::json!({
        "bench": "decode",
        "input": input.display().to_string(),
        "chunks": recording.chunk_lengths.len(),
        "sonora": sonora,
        "ffmpeg_per_session": ffmpeg,
        "libopus_floor": floor,
        "memory": memory,
        "ratios": {
            "cpu_ffmpeg_over_sonora": cpu_ratio,
            "memory_ffmpeg_over_sonora": memory_ratio,
            "cpu_sonora_over_libopus": floor_ratio,
        },
        "output_snr_db_vs_ffmpeg": agreement_db,
    });
    println!("{summary}");
    Ok(())
}

/// Feeds the recording through fresh decoders until the budget is spent.
fn bench_sonora(
    recording: &Recording,
    limits: DecoderLimits,
    budget: Duration,
) -> anyhow::Result<(Contender, Vec<i16>)> {
    let mut first_pcm_us = Vec::new();
    let mut pcm = Vec::new();
    let mut runs = 0u32;
    let mut samples = 0u64;
    let started = Instant::now();
    let cpu_before = cpu_time(UsageWho::RUSAGE_THREAD)?;
    while runs == 0 || started.elapsed() < budget {
        pcm.clear();
        let mut decoder = StreamDecoder::for_mime(&recording.mime, limits)?;
        for chunk in recording.chunks() {
            decoder.push(chunk, &mut pcm)?;
        }
        decoder.finish(&mut pcm)?;
        samples += pcm.len() as u64;
        first_pcm_us.extend(decoder.stats().first_pcm_latency_us);
        runs += 1;
    }
    let cpu = cpu_time(UsageWho::RUSAGE_THREAD)? - cpu_before;
    let mut contender = Contender::new(
        "sonora StreamDecoder",
        runs,
        samples as f64 / f64::from(ENGINE_RATE_HZ),
        cpu,
    );
    contender.first_pcm_ms = median(&mut first_pcm_us).map(|us| us as f64 / 1000.0);
    Ok((contender, pcm))
}

/// Bare libopus on the same packets, already demuxed: the floor.
fn bench_libopus(
    format: AudioFormat,
    recording: &Recording,
    budget: Duration,
) -> anyhow::Result<Contender> {
    let packets = audio::demux_opus_packets(format, &recording.bytes)?;
    let mut out = vec![0i16; 1920];
    let mut runs = 0u32;
    let mut samples = 0u64;
    let started = Instant::now();
    let cpu_before = cpu_time(UsageWho::RUSAGE_THREAD)?;
    while runs == 0 || started.elapsed() < budget {
        let mut decoder = opus::Decoder::new(ENGINE_RATE_HZ, opus::Channels::Mono)?;
        for packet in &packets {
            samples += decoder.decode(packet, &mut out, false)? as u64;
        }
        runs += 1;
    }
    let cpu = cpu_time(UsageWho::RUSAGE_THREAD)? - cpu_before;
    Ok(Contender::new(
        "libopus alone (floor)",
        runs,
        samples as f64 / f64::from(ENGINE_RATE_HZ),
        cpu,
    ))
}

/// The old design: one ffmpeg child per stream, fed the same chunks.
fn bench_ffmpeg(
    ffmpeg: &Path,
    demuxer: &str,
    recording: &Recording,
    budget: Duration,
) -> anyhow::Result<(Contender, Vec<i16>)> {
    let mut runs = 0u32;
    let mut samples = 0u64;
    let mut first_pcm_us = Vec::new();
    let mut last_pcm = Vec::new();
    let cpu_before = cpu_time(UsageWho::RUSAGE_CHILDREN)?;
    let started = Instant::now();
    while runs == 0 || started.elapsed() < budget {
        let spawned = Instant::now();
        let mut child = Command::new(ffmpeg)
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-f",
                demuxer,
                "-i",
                "pipe:0",
            ])
            .args(["-f", "s16le", "-ar", "16000", "-ac", "1", "pipe:1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {} (install ffmpeg)", ffmpeg.display()))?;
        let mut stdin = child.stdin.take().context("ffmpeg stdin")?;
        let mut stdout = child.stdout.take().context("ffmpeg stdout")?;
        let pcm = std::thread::scope(|scope| -> anyhow::Result<(Vec<u8>, Duration)> {
            let writer = scope.spawn(move || -> std::io::Result<()> {
                for chunk in recording.chunks() {
                    stdin.write_all(chunk)?;
                    stdin.flush()?;
                }
                Ok(())
            });
            let mut pcm = Vec::new();
            let mut first = None;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stdout.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                first.get_or_insert_with(|| spawned.elapsed());
                pcm.extend_from_slice(&buf[..n]);
            }
            writer
                .join()
                .map_err(|_| anyhow!("ffmpeg writer thread failed"))??;
            Ok((pcm, first.unwrap_or_default()))
        });
        let status = child.wait()?;
        let (pcm, first) = pcm?;
        if !status.success() {
            bail!("ffmpeg exited with {status}");
        }
        first_pcm_us.push(first.as_micros() as u64);
        samples += pcm.len() as u64 / 2;
        last_pcm = pcm;
        runs += 1;
    }
    let cpu = cpu_time(UsageWho::RUSAGE_CHILDREN)? - cpu_before;
    let mut contender = Contender::new(
        "ffmpeg process per session",
        runs,
        samples as f64 / f64::from(ENGINE_RATE_HZ),
        cpu,
    );
    contender.first_pcm_ms = median(&mut first_pcm_us).map(|us| us as f64 / 1000.0);
    // Peak RSS of the largest reaped child, in KiB on Linux.
    let max_rss_kib = getrusage(UsageWho::RUSAGE_CHILDREN)?.max_rss();
    contender.memory_per_session_bytes = Some(max_rss_kib.max(0) as u64 * 1024);
    let pcm = crate::audio::samples_from_le(&last_pcm).collect();
    Ok((contender, pcm))
}

/// Runs the memory measurement in a fresh process, so that memory freed by
/// earlier measurements cannot hide growth.
fn memory_in_child(
    input: &Path,
    chunks: Option<&Path>,
    mime: &str,
    sessions: usize,
) -> anyhow::Result<MemoryReport> {
    let exe = std::env::current_exe().context("cannot find the sonora binary")?;
    let mut command = Command::new(exe);
    command
        .args(["bench", "decode-memory", "--input"])
        .arg(input)
        .args(["--mime", mime, "--sessions", &sessions.to_string()]);
    if let Some(chunks) = chunks {
        command.arg("--chunks").arg(chunks);
    }
    let output = command
        .output()
        .context("cannot run the memory measurement")?;
    if !output.status.success() {
        bail!(
            "memory measurement failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let value: serde_json::Value = serde_json::from_str(line.trim()).context("memory report")?;
    let field = |name: &str| value[name].as_u64().unwrap_or(0);
    Ok(MemoryReport {
        sessions: field("sessions") as usize,
        rss_before_bytes: field("rss_before_bytes"),
        rss_after_bytes: field("rss_after_bytes"),
        per_session_bytes: field("per_session_bytes"),
        pending_bytes_high_water: field("pending_bytes_high_water"),
    })
}

/// Holds `sessions` live decoders fed chunk by chunk in turn, as a server
/// holding that many browser streams would, and measures resident growth.
fn memory_of_sessions(
    recording: &Recording,
    limits: DecoderLimits,
    sessions: usize,
) -> anyhow::Result<MemoryReport> {
    let sessions = sessions.max(1);
    let chunks: Vec<&[u8]> = recording.chunks().collect();
    let mut scratch = Vec::with_capacity(64 * 1024);
    let rss_before = resident_bytes()?;
    let mut decoders = (0..sessions)
        .map(|_| StreamDecoder::for_mime(&recording.mime, limits))
        .collect::<Result<Vec<_>, _>>()?;
    for chunk in &chunks {
        for decoder in &mut decoders {
            scratch.clear();
            decoder.push(chunk, &mut scratch)?;
        }
    }
    let rss_after = resident_bytes()?;
    let high_water = decoders
        .iter()
        .map(|d| d.stats().pending_bytes_high_water)
        .max()
        .unwrap_or(0);
    Ok(MemoryReport {
        sessions,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        per_session_bytes: rss_after.saturating_sub(rss_before) / sessions as u64,
        pending_bytes_high_water: high_water,
    })
}

fn resident_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .ok_or_else(|| anyhow!("no VmRSS in /proc/self/status"))
}

fn median(values: &mut [u64]) -> Option<u64> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// Signal-to-noise ratio of `test` against `reference`, over their overlap.
pub(crate) fn snr_db(reference: &[i16], test: &[i16]) -> f64 {
    let (mut signal, mut noise) = (0f64, 0f64);
    for (r, t) in reference.iter().zip(test) {
        signal += f64::from(*r).powi(2);
        noise += (f64::from(*r) - f64::from(*t)).powi(2);
    }
    10.0 * (signal / noise.max(1e-9)).log10()
}
