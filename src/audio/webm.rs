//! Push-based WebM/Matroska demuxer for live MediaRecorder streams.
//!
//! Browsers write the Segment and every Cluster with unknown size and split
//! blobs anywhere, so this walker enters those masters whatever their size,
//! buffers only the elements it must read whole (EBML header, Tracks, blocks,
//! each under a cap) and skips everything else by counting bytes.

use super::ebml::{self, Size, VintError};
use super::opus::OpusHead;
use super::{DecodeError, Demuxed};

const EBML_HEADER: u32 = 0x1A45_DFA3;
const DOC_TYPE: u32 = 0x4282;
const SEGMENT: u32 = 0x1853_8067;
const CLUSTER: u32 = 0x1F43_B675;
const TRACKS: u32 = 0x1654_AE6B;
const TRACK_ENTRY: u32 = 0xAE;
const TRACK_NUMBER: u32 = 0xD7;
const TRACK_TYPE: u32 = 0x83;
const CODEC_ID: u32 = 0x86;
const CODEC_PRIVATE: u32 = 0x63A2;
const CODEC_DELAY: u32 = 0x56AA;
const AUDIO: u32 = 0xE1;
const CHANNELS: u32 = 0x9F;
const SIMPLE_BLOCK: u32 = 0xA3;
const BLOCK_GROUP: u32 = 0xA0;
const BLOCK: u32 = 0xA1;
const DISCARD_PADDING: u32 = 0x75A2;

const TRACK_TYPE_AUDIO: u64 = 2;
/// The EBML header is a handful of short strings and integers.
const MAX_EBML_HEADER_BYTES: u64 = 4 * 1024;
/// Tracks holds codec set-up; audio set-up is tiny, video may be larger.
const MAX_TRACKS_BYTES: u64 = 256 * 1024;
/// Skipped elements cost no memory, but a declared size past this is not a
/// plausible Cues/Tags/Void element in an audio stream: it is corruption,
/// and skipping it would silently swallow the rest of the stream.
const MAX_SKIP_BYTES: u64 = 64 * 1024 * 1024;

const CONTAINER: &str = "WebM";

/// Incremental WebM demuxer: bytes in, Opus head and packets out.
#[derive(Debug)]
pub(crate) struct WebmDemuxer {
    buf: Vec<u8>,
    /// Read position in `buf`.
    pos: usize,
    /// Stream offset of `buf[0]`, for error messages.
    base: u64,
    /// Bytes of a skipped element still to come.
    skip: u64,
    max_block_bytes: u64,
    state: State,
}

#[derive(Debug, Default)]
struct State {
    seen_header: bool,
    /// Track number of the Opus track once Tracks was read.
    track: Option<u64>,
}

impl WebmDemuxer {
    pub(crate) fn new(max_block_bytes: usize) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            base: 0,
            skip: 0,
            max_block_bytes: max_block_bytes as u64,
            state: State::default(),
        }
    }

    /// Bytes held because the element they belong to is not complete yet.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn push(
        &mut self,
        mut chunk: &[u8],
        sink: &mut dyn FnMut(Demuxed<'_>),
    ) -> Result<(), DecodeError> {
        // Skipped bytes never touch the buffer.
        if self.skip > 0 && self.pending_bytes() == 0 {
            let n = clamp_len(self.skip, chunk.len());
            chunk = &chunk[n..];
            self.skip -= n as u64;
            self.base += n as u64;
        }
        if self.pos == self.buf.len() {
            self.base += self.pos as u64;
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(chunk);
        let result = self.parse(sink);
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        result
    }

    /// Called at end of stream: anything left over is a truncated element.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        if self.pending_bytes() > 0 || self.skip > 0 {
            return Err(DecodeError::Truncated {
                container: CONTAINER,
                pending_bytes: self.pending_bytes() as u64 + self.skip,
            });
        }
        if self.state.track.is_none() {
            return Err(DecodeError::Truncated {
                container: CONTAINER,
                pending_bytes: 0,
            });
        }
        Ok(())
    }

    fn parse(&mut self, sink: &mut dyn FnMut(Demuxed<'_>)) -> Result<(), DecodeError> {
        loop {
            let offset = self.base + self.pos as u64;
            let corrupt = |reason: String| DecodeError::Corrupt {
                container: CONTAINER,
                offset,
                reason,
            };
            if self.skip > 0 {
                let n = clamp_len(self.skip, self.buf.len() - self.pos);
                self.pos += n;
                self.skip -= n as u64;
                if self.skip > 0 {
                    return Ok(());
                }
            }
            let avail = &self.buf[self.pos..];
            let Some((id, id_len)) = ebml::read_id(avail).map_err(|e| corrupt(vint_reason(e)))?
            else {
                return Ok(());
            };
            let Some((size, size_len)) =
                ebml::read_size(&avail[id_len..]).map_err(|e| corrupt(vint_reason(e)))?
            else {
                return Ok(());
            };
            let header_len = id_len + size_len;
            if !self.state.seen_header && id != EBML_HEADER {
                return Err(corrupt(format!(
                    "expected the EBML header, found element {id:#X}"
                )));
            }
            let cap = match id {
                SEGMENT | CLUSTER => {
                    // Masters we walk into; their end is implied by what follows.
                    self.pos += header_len;
                    continue;
                }
                EBML_HEADER => MAX_EBML_HEADER_BYTES,
                TRACKS => MAX_TRACKS_BYTES,
                SIMPLE_BLOCK | BLOCK_GROUP => self.max_block_bytes,
                _ => {
                    let Size::Known(size) = size else {
                        return Err(corrupt(format!(
                            "element {id:#X} has unknown size and cannot be skipped"
                        )));
                    };
                    if size > MAX_SKIP_BYTES {
                        return Err(corrupt(format!(
                            "element {id:#X} declares {size} bytes, over the {MAX_SKIP_BYTES}-byte limit"
                        )));
                    }
                    self.pos += header_len;
                    self.skip = size;
                    continue;
                }
            };
            let Size::Known(size) = size else {
                return Err(corrupt(format!("{} of unknown size", element_name(id))));
            };
            if size > cap && id == SIMPLE_BLOCK && size <= MAX_SKIP_BYTES {
                // A big block of another track (video) is skipped, not buffered.
                let Some((track, _)) =
                    ebml::read_vint(&avail[header_len..]).map_err(|e| corrupt(vint_reason(e)))?
                else {
                    return Ok(());
                };
                if self.state.track.is_some_and(|ours| ours != track) {
                    self.pos += header_len;
                    self.skip = size;
                    continue;
                }
            }
            if size > cap {
                return Err(corrupt(format!(
                    "{} declares {size} bytes, over the {cap}-byte cap",
                    element_name(id)
                )));
            }
            // `size <= cap`, and every cap fits in memory.
            let total = header_len + size as usize;
            if avail.len() < total {
                return Ok(());
            }
            let body = &avail[header_len..total];
            match id {
                EBML_HEADER => read_ebml_header(body).map_err(&corrupt)?,
                TRACKS => read_tracks(body, &mut self.state, sink).map_err(|e| match e {
                    TrackError::Unsupported(what) => DecodeError::Unsupported(what),
                    TrackError::Corrupt(reason) => corrupt(reason),
                })?,
                SIMPLE_BLOCK => read_block(body, 0, &self.state, sink).map_err(&corrupt)?,
                _ => read_block_group(body, &self.state, sink).map_err(&corrupt)?,
            }
            if id == EBML_HEADER {
                self.state.seen_header = true;
            }
            self.pos += total;
        }
    }
}

fn clamp_len(want: u64, have: usize) -> usize {
    usize::try_from(want).map_or(have, |w| w.min(have))
}

fn vint_reason(e: VintError) -> String {
    match e {
        VintError::BadLength(byte) => format!("invalid EBML length marker in byte {byte:#04X}"),
    }
}

fn element_name(id: u32) -> &'static str {
    match id {
        EBML_HEADER => "EBML header",
        TRACKS => "Tracks",
        SIMPLE_BLOCK => "SimpleBlock",
        BLOCK_GROUP => "BlockGroup",
        _ => "element",
    }
}

fn read_ebml_header(body: &[u8]) -> Result<(), String> {
    for child in ebml::children(body) {
        let (id, data) = child?;
        if id == DOC_TYPE {
            let doc_type = String::from_utf8_lossy(data);
            let doc_type = doc_type.trim_end_matches('\0');
            if doc_type != "webm" && doc_type != "matroska" {
                return Err(format!("EBML document type {doc_type:?} is not WebM"));
            }
        }
    }
    Ok(())
}

enum TrackError {
    Unsupported(String),
    Corrupt(String),
}

impl From<String> for TrackError {
    fn from(reason: String) -> Self {
        Self::Corrupt(reason)
    }
}

struct AudioTrack<'a> {
    number: u64,
    codec: String,
    private: Option<&'a [u8]>,
    channels: u64,
    delay_ns: u64,
}

/// Picks the first audio track; it must be Opus.
fn read_tracks(
    body: &[u8],
    state: &mut State,
    sink: &mut dyn FnMut(Demuxed<'_>),
) -> Result<(), TrackError> {
    let mut first_audio: Option<AudioTrack<'_>> = None;
    for child in ebml::children(body) {
        let (id, entry) = child?;
        if id != TRACK_ENTRY {
            continue;
        }
        let (mut number, mut kind, mut codec) = (None, None, String::new());
        let (mut private, mut channels, mut delay_ns) = (None, 1, 0);
        for field in ebml::children(entry) {
            let (fid, data) = field?;
            match fid {
                TRACK_NUMBER => number = ebml::read_uint(data),
                TRACK_TYPE => kind = ebml::read_uint(data),
                CODEC_ID => {
                    codec = String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_owned();
                }
                CODEC_PRIVATE => private = Some(data),
                CODEC_DELAY => delay_ns = ebml::read_uint(data).unwrap_or(0),
                AUDIO => {
                    for audio_field in ebml::children(data) {
                        let (aid, adata) = audio_field?;
                        if aid == CHANNELS {
                            channels = ebml::read_uint(adata).unwrap_or(1);
                        }
                    }
                }
                _ => {}
            }
        }
        let is_audio = kind == Some(TRACK_TYPE_AUDIO) || codec.starts_with("A_");
        if let (true, Some(number), None) = (is_audio, number, &first_audio) {
            first_audio = Some(AudioTrack {
                number,
                codec,
                private,
                channels,
                delay_ns,
            });
        }
    }
    let Some(AudioTrack {
        number,
        codec,
        private,
        channels,
        delay_ns,
    }) = first_audio
    else {
        return Err(TrackError::Unsupported(
            "WebM without an audio track".into(),
        ));
    };
    if codec != "A_OPUS" {
        let name = codec.strip_prefix("A_").unwrap_or(&codec).to_lowercase();
        return Err(TrackError::Unsupported(format!(
            "WebM audio codec {name} (only Opus is supported)"
        )));
    }
    let head = match private {
        Some(private) => OpusHead::parse(private).map_err(TrackError::Unsupported)?,
        // CodecPrivate is mandatory for Opus; tolerate its absence as a
        // plain mono/stereo stream with the declared codec delay.
        None => OpusHead::plain(
            u8::try_from(channels.clamp(1, 2)).unwrap_or(1),
            u16::try_from(delay_ns.saturating_mul(48) / 1_000_000).unwrap_or(0),
        ),
    };
    head.check_supported().map_err(TrackError::Unsupported)?;
    state.track = Some(number);
    sink(Demuxed::Head(head));
    Ok(())
}

fn read_block_group(
    body: &[u8],
    state: &State,
    sink: &mut dyn FnMut(Demuxed<'_>),
) -> Result<(), String> {
    let mut block = None;
    let mut discard_ns: i64 = 0;
    for child in ebml::children(body) {
        let (id, data) = child?;
        match id {
            BLOCK => block = Some(data),
            DISCARD_PADDING if data.len() <= 8 => {
                // Signed big-endian integer, sign-extended from its length.
                let raw = ebml::read_uint(data).unwrap_or(0);
                let bits = 8 * data.len() as u32;
                discard_ns = if bits == 0 || bits == 64 {
                    raw as i64
                } else {
                    ((raw << (64 - bits)) as i64) >> (64 - bits)
                };
            }
            _ => {}
        }
    }
    let Some(block) = block else {
        return Ok(());
    };
    let discard_48k = u32::try_from(discard_ns.max(0).saturating_mul(48) / 1_000_000).unwrap_or(0);
    read_block(block, discard_48k, state, sink)
}

/// Parses a (Simple)Block and hands each laced frame of our track to `sink`;
/// `discard_end_48k` trims the end of the block's last frame.
fn read_block(
    body: &[u8],
    discard_end_48k: u32,
    state: &State,
    sink: &mut dyn FnMut(Demuxed<'_>),
) -> Result<(), String> {
    let Some(track) = state.track else {
        return Err("audio block before Tracks".into());
    };
    let (number, num_len) = ebml::read_vint(body)
        .map_err(vint_reason)?
        .ok_or("block header cut short")?;
    let header_len = num_len + 3;
    if body.len() < header_len {
        return Err("block header cut short".into());
    }
    if number != track {
        return Ok(());
    }
    let flags = body[num_len + 2];
    let data = &body[header_len..];
    let mut emit = |frame: &[u8], last: bool| {
        sink(Demuxed::Packet {
            data: frame,
            discard_end_48k: if last { discard_end_48k } else { 0 },
        });
    };
    match (flags >> 1) & 0b11 {
        0 => emit(data, true),
        lacing => {
            let (&count_minus_one, mut rest) = data.split_first().ok_or("lace count missing")?;
            let count = usize::from(count_minus_one) + 1;
            let mut sizes = Vec::with_capacity(count);
            match lacing {
                0b01 => {
                    // Xiph: each size as a run of 255s plus a final byte.
                    for _ in 1..count {
                        let mut size = 0usize;
                        loop {
                            let (&b, tail) = rest.split_first().ok_or("Xiph lace cut short")?;
                            rest = tail;
                            size += usize::from(b);
                            if b != 255 {
                                break;
                            }
                        }
                        sizes.push(size);
                    }
                }
                0b11 => {
                    // EBML: first size unsigned, then signed differences.
                    let mut previous: i64 = 0;
                    for i in 1..count {
                        let (size, len) = if i == 1 {
                            let (v, len) = ebml::read_vint(rest)
                                .map_err(vint_reason)?
                                .ok_or("EBML lace cut short")?;
                            (
                                i64::try_from(v).map_err(|_| "EBML lace size overflow")?,
                                len,
                            )
                        } else {
                            let (delta, len) = ebml::read_signed_vint(rest)
                                .map_err(vint_reason)?
                                .ok_or("EBML lace cut short")?;
                            (previous + delta, len)
                        };
                        rest = &rest[len..];
                        let size = usize::try_from(size).map_err(|_| "negative EBML lace size")?;
                        sizes.push(size);
                        previous = size as i64;
                    }
                }
                _ => {
                    // Fixed-size lacing.
                    if rest.len() % count != 0 {
                        return Err(format!(
                            "{} bytes cannot hold {count} equal laced frames",
                            rest.len()
                        ));
                    }
                    sizes.resize(count - 1, rest.len() / count);
                }
            }
            let laced = sizes
                .iter()
                .try_fold(0usize, |total, &s| total.checked_add(s));
            match laced {
                Some(laced) if laced <= rest.len() => {}
                _ => {
                    return Err(format!(
                        "laced frame sizes add up to more than the {} bytes the block holds",
                        rest.len()
                    ));
                }
            }
            for size in sizes {
                let (frame, tail) = rest.split_at(size);
                emit(frame, false);
                rest = tail;
            }
            emit(rest, true);
        }
    }
    Ok(())
}
