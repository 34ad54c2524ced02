//! Audio in: live browser streams to 16 kHz mono s16 PCM, and WAV files.
//!
//! [`StreamDecoder`] takes byte pieces as they arrive from a socket (any
//! split, down to one byte), sniffs and checks the format, demuxes WebM or Ogg
//! incrementally, decodes Opus with libopus straight to 16 kHz mono, or
//! resamples raw PCM. Every buffer is capped; every drop is counted.

#[doc(hidden)]
pub mod crafted;
mod ebml;
mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod g711;
mod ogg;
mod opus;
mod pace;
mod resample;
pub mod wav;
mod webm;

use std::time::{Duration, Instant};

use serde::Serialize;

pub use format::{AudioFormat, PCM_RATES_HZ, pcm_rates_list};
pub use pace::RealtimeLimit;
pub use resample::StreamResampler;

use format::SNIFF_BYTES;
use ogg::OggDemuxer;
use opus::{OpusHead, OpusStage};
use pace::AudioBudget;
use webm::WebmDemuxer;

/// The rate of the audio engines take (16 kHz mono), which every decoded
/// stream comes out at: the one constant for it.
pub const ENGINE_RATE_HZ: u32 = 16_000;

/// 16-bit little-endian PCM as samples; an odd last byte is left out.
pub fn samples_from_le(bytes: &[u8]) -> impl Iterator<Item = i16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
}

/// Why a stream could not be decoded. Each variant says what the caller does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Reject the stream: the format is not supported, or the bytes are not
    /// what was declared. Sticky: every later call returns it again.
    #[error("unsupported audio: {0}")]
    Unsupported(String),
    /// Skip this chunk and tell the client: accepting it would take the bytes
    /// waiting for a complete element past the cap. The decoder stays usable.
    #[error(
        "audio chunk of {chunk_bytes} bytes refused: {pending_bytes} bytes already waiting, limit {cap_bytes}"
    )]
    ChunkRefused {
        chunk_bytes: usize,
        pending_bytes: usize,
        cap_bytes: usize,
    },
    /// Close the stream: the container is corrupt. Sticky.
    #[error("corrupt {container} stream at byte {offset}: {reason}")]
    Corrupt {
        container: &'static str,
        offset: u64,
        reason: String,
    },
    /// Close the stream: it ended inside an element or page, or before the
    /// audio track was set up. Everything complete was decoded.
    #[error("{container} stream ended early: {}", truncation(*.pending_bytes))]
    Truncated {
        container: &'static str,
        pending_bytes: u64,
    },
    /// Close the stream: no bytes at all were received.
    #[error("empty audio stream: no bytes received")]
    Empty,
    /// Close the stream: it carries audio faster than it can be spoken, past
    /// the burst a live stream may have ([`RealtimeLimit`]). Sticky.
    #[error(
        "audio arrives faster than real time: {audio_ms} ms of audio in {wall_ms} ms (a live stream may run {}× real time after a {} s burst)",
        f64::from(limit.speed_permille) / 1000.0,
        limit.burst_ms / 1000
    )]
    TooFast {
        audio_ms: u64,
        wall_ms: u64,
        limit: RealtimeLimit,
    },
}

fn truncation(pending_bytes: u64) -> String {
    if pending_bytes == 0 {
        "no audio track was set up".into()
    } else {
        format!("{pending_bytes} bytes of an unfinished element")
    }
}

impl DecodeError {
    /// Stable machine-readable code, for the wire protocol and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unsupported(_) => "unsupported_audio",
            Self::ChunkRefused { .. } => "chunk_refused",
            Self::Corrupt { .. } => "corrupt_audio",
            Self::Truncated { .. } => "truncated_audio",
            Self::Empty => "empty_audio",
            Self::TooFast { .. } => "audio_too_fast",
        }
    }

    /// Whether the stream is over (everything but a refused chunk).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::ChunkRefused { .. })
    }
}

/// Bounds on what one decoder may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderLimits {
    /// Bytes waiting for a complete element/page, plus the incoming chunk.
    pub input_cap_bytes: usize,
    /// Largest single WebM block or Ogg packet.
    pub max_block_bytes: usize,
    /// How fast a live stream may deliver audio; `None` for files, which
    /// are decoded as fast as the machine goes.
    pub realtime: Option<RealtimeLimit>,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        Self {
            input_cap_bytes: 4 * 1024 * 1024,
            max_block_bytes: 256 * 1024,
            realtime: None,
        }
    }
}

/// Counters for one stream: what came in, what was refused, what came out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DecoderStats {
    /// Detected format (`webm`, `ogg`, `pcm16`), once known.
    pub format: Option<&'static str>,
    pub bytes_in: u64,
    pub bytes_refused: u64,
    pub chunks_refused: u64,
    pub packets_decoded: u64,
    /// Lost packets (empty, or rejected by libopus) replaced by packet-loss
    /// concealment.
    pub packets_concealed: u64,
    /// Lost packets past the 120 ms a run that concealment covers: no audio.
    pub packets_corrupt: u64,
    /// Audio refused because the stream ran ahead of the clock (0 or 1: the
    /// stream ends).
    pub refused_too_fast: u64,
    pub pcm_samples_out: u64,
    pub pcm_ms_out: u64,
    /// Most bytes ever held waiting for a complete element.
    pub pending_bytes_high_water: u64,
    /// Time spent inside the decoder from the first byte to the first PCM
    /// sample (excludes time spent waiting for the network).
    pub first_pcm_latency_us: Option<u64>,
}

/// One demuxed item: the stream set-up, or one Opus packet with the number
/// of 48 kHz samples to trim from its end.
#[derive(Debug)]
pub(crate) enum Demuxed<'a> {
    Head(OpusHead),
    Packet {
        data: &'a [u8],
        discard_end_48k: u32,
    },
}

#[derive(Debug)]
enum Stage {
    Sniffing(Vec<u8>),
    Webm(WebmDemuxer, Option<OpusStage>),
    Ogg(OggDemuxer, Option<OpusStage>),
    Pcm(Box<PcmStage>),
}

/// A push demuxer of Opus packets (WebM or Ogg).
trait OpusDemuxer {
    const CONTAINER: &'static str;
    fn push(&mut self, chunk: &[u8], sink: &mut dyn FnMut(Demuxed<'_>)) -> Result<(), DecodeError>;
    fn finish(&self) -> Result<(), DecodeError>;
}

impl OpusDemuxer for WebmDemuxer {
    const CONTAINER: &'static str = "WebM";
    fn push(&mut self, chunk: &[u8], sink: &mut dyn FnMut(Demuxed<'_>)) -> Result<(), DecodeError> {
        WebmDemuxer::push(self, chunk, sink)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        WebmDemuxer::finish(self)
    }
}

impl OpusDemuxer for OggDemuxer {
    const CONTAINER: &'static str = "Ogg";
    fn push(&mut self, chunk: &[u8], sink: &mut dyn FnMut(Demuxed<'_>)) -> Result<(), DecodeError> {
        OggDemuxer::push(self, chunk, sink)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        OggDemuxer::finish(self)
    }
}

/// Demuxes `chunk` and decodes its Opus packets within the stream's pace.
fn feed_opus<D: OpusDemuxer>(
    demux: &mut D,
    opus: &mut Option<OpusStage>,
    budget: &mut Option<AudioBudget>,
    chunk: &[u8],
    end: bool,
    out: &mut Vec<i16>,
    stats: &mut DecoderStats,
) -> Result<(), DecodeError> {
    let mut sink = OpusSink {
        opus,
        budget,
        error: None,
        container: D::CONTAINER,
        out,
        stats,
    };
    demux.push(chunk, &mut |item| sink.take(item))?;
    sink.error.map_or(Ok(()), Err)?;
    if end { demux.finish() } else { Ok(()) }
}

/// What the Opus sink of a demuxer works with.
struct OpusSink<'a> {
    opus: &'a mut Option<OpusStage>,
    budget: &'a mut Option<AudioBudget>,
    error: Option<DecodeError>,
    container: &'static str,
    out: &'a mut Vec<i16>,
    stats: &'a mut DecoderStats,
}

impl Stage {
    fn pending_bytes(&self) -> usize {
        match self {
            Self::Sniffing(head) => head.len(),
            Self::Webm(demux, _) => demux.pending_bytes(),
            Self::Ogg(demux, _) => demux.pending_bytes(),
            Self::Pcm(pcm) => pcm.leftover.len(),
        }
    }
}

/// Raw PCM: de-interleave, downmix and resample to 16 kHz mono.
#[derive(Debug)]
struct PcmStage {
    channels: usize,
    /// Bytes of an incomplete sample frame.
    leftover: Vec<u8>,
    mono: Vec<i16>,
    resampler: StreamResampler,
}

impl PcmStage {
    /// The audio in `bytes` of this stream, in microseconds.
    fn duration_us(&self, bytes: usize) -> u64 {
        let frames = (self.leftover.len() + bytes) / (2 * self.channels);
        frames as u64 * 1_000_000 / u64::from(self.resampler.rate_in_hz().max(1))
    }

    fn push(&mut self, chunk: &[u8], out: &mut Vec<i16>) {
        let frame_bytes = 2 * self.channels;
        let mut chunk = chunk;
        if !self.leftover.is_empty() {
            let take = (frame_bytes - self.leftover.len()).min(chunk.len());
            self.leftover.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.leftover.len() < frame_bytes {
                return;
            }
            let frame = std::mem::take(&mut self.leftover);
            self.convert(&frame, out);
        }
        let whole = chunk.len() - chunk.len() % frame_bytes;
        self.convert(&chunk[..whole], out);
        self.leftover.extend_from_slice(&chunk[whole..]);
    }

    fn convert(&mut self, frames: &[u8], out: &mut Vec<i16>) {
        self.mono.clear();
        if self.channels == 1 {
            // The usual stream, without the downmix.
            self.mono.extend(samples_from_le(frames));
            self.resampler.push(&self.mono, out);
            return;
        }
        let channels = self.channels as i32;
        self.mono
            .extend(frames.chunks_exact(2 * self.channels).map(|frame| {
                let sum: i32 = samples_from_le(frame).map(i32::from).sum();
                // The mean of i16 values is an i16.
                (sum / channels) as i16
            }));
        self.resampler.push(&self.mono, out);
    }
}

/// Incremental decoder for one client stream. See the module docs.
#[derive(Debug)]
pub struct StreamDecoder {
    declared: Option<AudioFormat>,
    limits: DecoderLimits,
    stage: Stage,
    stats: DecoderStats,
    failed: Option<DecodeError>,
    /// Time spent in `push` until the first PCM sample.
    busy: Duration,
    /// The pace of a live stream.
    budget: Option<AudioBudget>,
}

impl StreamDecoder {
    /// A decoder for a stream of `declared` format (`None`: detect it).
    pub fn new(declared: Option<AudioFormat>, limits: DecoderLimits) -> Self {
        Self {
            declared,
            limits,
            stage: Stage::Sniffing(Vec::with_capacity(SNIFF_BYTES)),
            stats: DecoderStats::default(),
            failed: None,
            busy: Duration::ZERO,
            budget: limits.realtime.map(AudioBudget::new),
        }
    }

    /// Starts a new stream of `declared` format on the same decoder: what
    /// the old one left half-read is dropped; counters and pace go on.
    pub fn restart(&mut self, declared: AudioFormat) {
        self.declared = Some(declared);
        self.stage = Stage::Sniffing(Vec::with_capacity(SNIFF_BYTES));
        self.failed = None;
    }

    /// A decoder for a stream announced with a MIME type.
    pub fn for_mime(mime: &str, limits: DecoderLimits) -> Result<Self, DecodeError> {
        Ok(Self::new(AudioFormat::from_mime(mime)?, limits))
    }

    pub fn stats(&self) -> &DecoderStats {
        &self.stats
    }

    /// The format the stream was announced as, if any.
    pub fn declared(&self) -> Option<AudioFormat> {
        self.declared
    }

    /// The format in use, once the first bytes confirmed it.
    pub fn format(&self) -> Option<AudioFormat> {
        match &self.stage {
            Stage::Sniffing(_) => None,
            Stage::Webm(..) => Some(AudioFormat::Webm),
            Stage::Ogg(..) => Some(AudioFormat::Ogg),
            Stage::Pcm(pcm) => Some(AudioFormat::Pcm16 {
                rate_hz: pcm.resampler.rate_in_hz(),
                channels: pcm.channels as u16,
            }),
        }
    }

    /// Bytes held waiting for the rest of an element.
    pub fn pending_bytes(&self) -> usize {
        self.stage.pending_bytes()
    }

    /// Feeds the next piece of the stream; decoded 16 kHz mono samples are
    /// appended to `out`. On a fatal error, the PCM decoded before it is
    /// still in `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<i16>) -> Result<(), DecodeError> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        let pending = self.stage.pending_bytes();
        if pending.saturating_add(chunk.len()) > self.limits.input_cap_bytes {
            self.stats.bytes_refused += chunk.len() as u64;
            self.stats.chunks_refused += 1;
            return Err(DecodeError::ChunkRefused {
                chunk_bytes: chunk.len(),
                pending_bytes: pending,
                cap_bytes: self.limits.input_cap_bytes,
            });
        }
        self.stats.bytes_in += chunk.len() as u64;
        let timer = self.stats.first_pcm_latency_us.is_none().then(Instant::now);
        let before = out.len();
        let result = self.feed(chunk, out, false);
        self.account(before, out.len(), timer);
        result
    }

    /// Ends the stream: flushes the resampler and reports a stream that
    /// stopped inside an element.
    pub fn finish(&mut self, out: &mut Vec<i16>) -> Result<(), DecodeError> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        let before = out.len();
        let result = self.feed(&[], out, true);
        self.account(before, out.len(), None);
        result
    }

    fn account(&mut self, before: usize, after: usize, timer: Option<Instant>) {
        let produced = (after - before) as u64;
        self.stats.pcm_samples_out += produced;
        self.stats.pcm_ms_out = self.stats.pcm_samples_out * 1000 / u64::from(ENGINE_RATE_HZ);
        self.stats.pending_bytes_high_water = self
            .stats
            .pending_bytes_high_water
            .max(self.stage.pending_bytes() as u64);
        if let Some(start) = timer {
            self.busy += start.elapsed();
            if produced > 0 {
                self.stats.first_pcm_latency_us = Some(self.busy.as_micros() as u64);
            }
        }
    }

    fn feed(&mut self, chunk: &[u8], out: &mut Vec<i16>, end: bool) -> Result<(), DecodeError> {
        let result = self.feed_inner(chunk, out, end);
        if let Err(e) = &result
            && e.is_fatal()
        {
            if matches!(e, DecodeError::TooFast { .. }) {
                self.stats.refused_too_fast += 1;
            }
            self.failed = Some(e.clone());
        }
        result
    }

    fn feed_inner(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<i16>,
        end: bool,
    ) -> Result<(), DecodeError> {
        let mut chunk = chunk;
        let sniffed;
        if let Stage::Sniffing(head) = &mut self.stage {
            head.extend_from_slice(chunk);
            if head.len() < SNIFF_BYTES && !end && !magic_complete(self.declared, head) {
                return Ok(());
            }
            if head.is_empty() {
                return Err(DecodeError::Empty);
            }
            sniffed = std::mem::take(head);
            let format = format::check(self.declared, &sniffed)?;
            self.stage = start(format, self.limits)?;
            self.stats.format = Some(format.name());
            chunk = &sniffed;
        }
        let stats = &mut self.stats;
        let budget = &mut self.budget;
        match &mut self.stage {
            Stage::Sniffing(_) => Ok(()),
            Stage::Webm(demux, opus) => feed_opus(demux, opus, budget, chunk, end, out, stats),
            Stage::Ogg(demux, opus) => feed_opus(demux, opus, budget, chunk, end, out, stats),
            Stage::Pcm(pcm) => {
                if let Some(budget) = budget {
                    budget.take(pcm.duration_us(chunk.len()))?;
                }
                pcm.push(chunk, out);
                if end {
                    pcm.resampler.finish(out);
                }
                Ok(())
            }
        }
    }
}

/// A declared WebM or Ogg stream can start as soon as its 4-byte magic is in.
fn magic_complete(declared: Option<AudioFormat>, head: &[u8]) -> bool {
    match declared {
        Some(AudioFormat::Webm) => head.starts_with(&[0x1A, 0x45, 0xDF, 0xA3]),
        Some(AudioFormat::Ogg) => head.starts_with(b"OggS"),
        _ => false,
    }
}

fn start(format: AudioFormat, limits: DecoderLimits) -> Result<Stage, DecodeError> {
    Ok(match format {
        AudioFormat::Webm => Stage::Webm(WebmDemuxer::new(limits.max_block_bytes), None),
        AudioFormat::Ogg => Stage::Ogg(OggDemuxer::new(limits.max_block_bytes), None),
        AudioFormat::Pcm16 { rate_hz, channels } => Stage::Pcm(Box::new(PcmStage {
            channels: usize::from(channels.max(1)),
            leftover: Vec::new(),
            mono: Vec::new(),
            resampler: StreamResampler::new(rate_hz, ENGINE_RATE_HZ)
                .map_err(DecodeError::Unsupported)?,
        })),
    })
}

impl OpusSink<'_> {
    /// One demuxed item. After an error the rest of the chunk is only
    /// parsed, never decoded.
    fn take(&mut self, item: Demuxed<'_>) {
        if self.error.is_some() {
            return;
        }
        match item {
            Demuxed::Head(head) => match OpusStage::new(&head) {
                Ok(stage) => *self.opus = Some(stage),
                Err(e) => self.error = Some(DecodeError::Unsupported(e)),
            },
            Demuxed::Packet {
                data,
                discard_end_48k,
            } => {
                let Some(stage) = self.opus.as_mut() else {
                    return;
                };
                if let Some(budget) = self.budget.as_mut() {
                    // 16 kHz samples are 62.5 µs each.
                    let audio_us = stage.samples_for(data) as u64 * 125 / 2;
                    if let Err(e) = budget.take(audio_us) {
                        self.error = Some(e);
                        return;
                    }
                }
                if let Err(reason) = stage.decode(data, discard_end_48k, self.out, self.stats) {
                    self.error = Some(DecodeError::Corrupt {
                        container: self.container,
                        offset: self.stats.bytes_in,
                        reason,
                    });
                }
            }
        }
    }
}

/// Demuxes a whole WebM or Ogg recording into its Opus packets, for
/// measuring the decoder against bare libopus on the same packets.
pub fn demux_opus_packets(format: AudioFormat, bytes: &[u8]) -> Result<Vec<Vec<u8>>, DecodeError> {
    let limits = DecoderLimits::default();
    let mut packets = Vec::new();
    let mut sink = |item: Demuxed<'_>| {
        if let Demuxed::Packet { data, .. } = item {
            packets.push(data.to_vec());
        }
    };
    match format {
        AudioFormat::Webm => {
            let mut demux = WebmDemuxer::new(limits.max_block_bytes);
            demux.push(bytes, &mut sink)?;
            demux.finish()?;
        }
        AudioFormat::Ogg => {
            let mut demux = OggDemuxer::new(limits.max_block_bytes);
            demux.push(bytes, &mut sink)?;
            demux.finish()?;
        }
        AudioFormat::Pcm16 { .. } => {
            return Err(DecodeError::Unsupported("PCM has no Opus packets".into()));
        }
    }
    Ok(packets)
}
