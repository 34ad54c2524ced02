//! Push-based Ogg demuxer for Opus (RFC 3533, RFC 7845).
//!
//! Pages are CRC-checked, packets are reassembled across pages, chained
//! streams (a new Opus stream after end-of-stream) restart the decoder, and
//! the final page's granule position trims the end exactly as a file decoder
//! would. A page can never exceed 65,307 bytes, which bounds the buffer.

use super::opus::{OpusHead, packet_samples_48k};
use super::{DecodeError, Demuxed};

const CONTAINER: &str = "Ogg";
const HEADER_LEN: usize = 27;
const FLAG_CONTINUED: u8 = 0x01;
const FLAG_BOS: u8 = 0x02;
const FLAG_EOS: u8 = 0x04;

/// Incremental Ogg demuxer that follows the first Opus logical stream (and
/// the Opus streams chained after it) and ignores any other.
#[derive(Debug)]
pub(crate) struct OggDemuxer {
    buf: Vec<u8>,
    pos: usize,
    base: u64,
    streams: Streams,
}

/// Logical stream state, apart from the byte buffer so a page can be read
/// straight out of the buffer.
#[derive(Debug)]
struct Streams {
    max_packet_bytes: usize,
    stream: Option<Stream>,
    /// Codec of a non-Opus stream, named if no Opus stream ever shows up.
    other_codec: Option<&'static str>,
    /// A packet that continues on the next page.
    partial: Vec<u8>,
    /// The packet in progress is over the cap and is being dropped.
    dropping: bool,
}

#[derive(Debug)]
struct Stream {
    serial: u32,
    next_sequence: u32,
    /// Packets seen so far: 0 is OpusHead, 1 is OpusTags, then audio.
    packets: u64,
    /// Sum of audio packet durations, in 48 kHz samples, pre-skip included.
    samples_48k: u64,
    ended: bool,
}

impl OggDemuxer {
    pub(crate) fn new(max_packet_bytes: usize) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            base: 0,
            streams: Streams {
                max_packet_bytes,
                stream: None,
                other_codec: None,
                partial: Vec::new(),
                dropping: false,
            },
        }
    }

    pub(crate) fn pending_bytes(&self) -> usize {
        self.buf.len() - self.pos + self.streams.partial.len()
    }

    pub(crate) fn push(
        &mut self,
        chunk: &[u8],
        sink: &mut dyn FnMut(Demuxed<'_>),
    ) -> Result<(), DecodeError> {
        self.buf.extend_from_slice(chunk);
        let result = self.parse(sink);
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
        result
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        let pending = self.pending_bytes() as u64;
        if pending > 0 || self.streams.stream.is_none() {
            if let (None, Some(codec)) = (&self.streams.stream, self.streams.other_codec) {
                return Err(unsupported_codec(codec));
            }
            return Err(DecodeError::Truncated {
                container: CONTAINER,
                pending_bytes: pending,
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
            let avail = &self.buf[self.pos..];
            if avail.len() < HEADER_LEN {
                if !b"OggS".starts_with(&avail[..avail.len().min(4)]) {
                    return Err(corrupt("lost page sync: no OggS capture pattern".into()));
                }
                return Ok(());
            }
            if &avail[..4] != b"OggS" {
                return Err(corrupt("lost page sync: no OggS capture pattern".into()));
            }
            if avail[4] != 0 {
                return Err(corrupt(format!("unknown Ogg version {}", avail[4])));
            }
            let segments = usize::from(avail[26]);
            if avail.len() < HEADER_LEN + segments {
                return Ok(());
            }
            let lacing = &avail[HEADER_LEN..HEADER_LEN + segments];
            let body_len: usize = lacing.iter().map(|&l| usize::from(l)).sum();
            let page_len = HEADER_LEN + segments + body_len;
            if avail.len() < page_len {
                return Ok(());
            }
            let page = &avail[..page_len];
            let stored_crc = u32::from_le_bytes([page[22], page[23], page[24], page[25]]);
            let crc = crc32(page);
            if crc != stored_crc {
                return Err(corrupt(format!(
                    "page CRC mismatch (stored {stored_crc:08x}, computed {crc:08x})"
                )));
            }
            let header = PageHeader {
                flags: page[5],
                granule: i64::from_le_bytes([
                    page[6], page[7], page[8], page[9], page[10], page[11], page[12], page[13],
                ]),
                serial: u32::from_le_bytes([page[14], page[15], page[16], page[17]]),
                sequence: u32::from_le_bytes([page[18], page[19], page[20], page[21]]),
            };
            let body = &page[HEADER_LEN + segments..];
            self.streams
                .read_page(&header, lacing, body, sink)
                .map_err(|e| match e {
                    PageError::Corrupt(reason) => corrupt(reason),
                    PageError::Unsupported(codec) => unsupported_codec(codec),
                    PageError::Head(what) => DecodeError::Unsupported(what),
                })?;
            self.pos += page_len;
        }
    }
}

impl Streams {
    fn read_page(
        &mut self,
        header: &PageHeader,
        lacing: &[u8],
        body: &[u8],
        sink: &mut dyn FnMut(Demuxed<'_>),
    ) -> Result<(), PageError> {
        let ours = self
            .stream
            .as_ref()
            .is_some_and(|s| s.serial == header.serial);
        let free = self.stream.as_ref().is_none_or(|s| s.ended);
        if header.flags & FLAG_BOS != 0 {
            if !free && !ours {
                // A stream multiplexed beside ours (video, another track).
                return Ok(());
            }
            let first_len = lacing.iter().take_while(|&&l| l == 255).count() + 1;
            let first_len: usize = lacing.iter().take(first_len).map(|&l| usize::from(l)).sum();
            let first = &body[..first_len.min(body.len())];
            if !first.starts_with(b"OpusHead") {
                self.other_codec.get_or_insert(codec_name(first));
                return Ok(());
            }
            let head = OpusHead::parse(first).map_err(PageError::Head)?;
            head.check_supported().map_err(PageError::Head)?;
            self.stream = Some(Stream {
                serial: header.serial,
                next_sequence: header.sequence.wrapping_add(1),
                packets: 1,
                samples_48k: 0,
                ended: header.flags & FLAG_EOS != 0,
            });
            self.partial.clear();
            self.dropping = false;
            sink(Demuxed::Head(head));
            return Ok(());
        }
        let Some(stream) = self.stream.as_mut().filter(|s| s.serial == header.serial) else {
            return match (&self.stream, self.other_codec) {
                (None, Some(codec)) => Err(PageError::Unsupported(codec)),
                (None, None) => Err(PageError::Corrupt("page before any stream header".into())),
                _ => Ok(()),
            };
        };
        if stream.ended {
            return Err(PageError::Corrupt(format!(
                "page {} after the end of stream {:08x}",
                header.sequence, header.serial
            )));
        }
        if header.sequence != stream.next_sequence {
            return Err(PageError::Corrupt(format!(
                "page sequence jumps from {} to {} (pages lost)",
                stream.next_sequence, header.sequence
            )));
        }
        stream.next_sequence = header.sequence.wrapping_add(1);
        let continued = header.flags & FLAG_CONTINUED != 0;
        let in_progress = !self.partial.is_empty() || self.dropping;
        if continued != in_progress {
            return Err(PageError::Corrupt(if continued {
                "page continues a packet that never started".into()
            } else {
                "packet left unfinished by the previous page".into()
            }));
        }
        let eos = header.flags & FLAG_EOS != 0;
        // On the last page, the granule position is the exact stream length.
        let end_granule = (eos && header.granule >= 0).then_some(header.granule as u64);
        let mut start = 0;
        let mut run_len = 0;
        for &len in lacing {
            run_len += usize::from(len);
            if len == 255 {
                continue;
            }
            let segment = &body[start..start + run_len];
            start += run_len;
            run_len = 0;
            let packet: &[u8] = if self.partial.is_empty() && !self.dropping {
                segment
            } else {
                self.append(segment)?;
                &self.partial
            };
            let stream = self
                .stream
                .as_mut()
                .ok_or_else(|| PageError::Corrupt("stream state lost".into()))?;
            stream.packets += 1;
            if stream.packets > 2 && !self.dropping {
                let duration = packet_samples_48k(packet).unwrap_or(0);
                stream.samples_48k += duration;
                let discard =
                    end_granule.map_or(0, |g| stream.samples_48k.saturating_sub(g).min(duration));
                sink(Demuxed::Packet {
                    data: packet,
                    discard_end_48k: u32::try_from(discard).unwrap_or(u32::MAX),
                });
            }
            self.partial.clear();
            self.dropping = false;
        }
        if run_len > 0 {
            // The last packet goes on in the next page.
            let tail = &body[start..start + run_len];
            self.append(tail)?;
        }
        if eos && let Some(stream) = self.stream.as_mut() {
            stream.ended = true;
        }
        Ok(())
    }

    /// Adds a segment run to the packet in progress; tag packets over the cap
    /// are dropped (their content is not needed), audio packets are corruption.
    fn append(&mut self, data: &[u8]) -> Result<(), PageError> {
        if self.dropping {
            return Ok(());
        }
        if self.partial.len() + data.len() > self.max_packet_bytes {
            let headers = self.stream.as_ref().is_some_and(|s| s.packets < 2);
            if headers {
                self.partial.clear();
                self.dropping = true;
                return Ok(());
            }
            return Err(PageError::Corrupt(format!(
                "packet over the {}-byte cap",
                self.max_packet_bytes
            )));
        }
        self.partial.extend_from_slice(data);
        Ok(())
    }
}

struct PageHeader {
    flags: u8,
    granule: i64,
    serial: u32,
    sequence: u32,
}

enum PageError {
    Corrupt(String),
    Unsupported(&'static str),
    Head(String),
}

fn unsupported_codec(codec: &str) -> DecodeError {
    DecodeError::Unsupported(format!("Ogg {codec} (only Opus is supported)"))
}

fn codec_name(first_packet: &[u8]) -> &'static str {
    const KNOWN: [(&[u8], &str); 6] = [
        (b"\x01vorbis", "Vorbis"),
        (b"Speex   ", "Speex"),
        (b"\x7fFLAC", "FLAC"),
        (b"\x80theora", "Theora"),
        (b"OggSkeleton", "Skeleton"),
        (b"fishead", "Skeleton"),
    ];
    KNOWN
        .iter()
        .find(|(magic, _)| first_packet.starts_with(magic))
        .map_or("stream of an unknown codec", |(_, name)| name)
}

/// CRC-32 as Ogg defines it: polynomial 0x04C11DB7, no reflection, initial
/// value 0, computed with the checksum field zeroed.
fn crc32(page: &[u8]) -> u32 {
    let mut crc = 0u32;
    for (i, &byte) in page.iter().enumerate() {
        let byte = if (22..26).contains(&i) { 0 } else { byte };
        crc = (crc << 8) ^ CRC_TABLE[usize::from((crc >> 24) as u8 ^ byte)];
    }
    crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut r = (i as u32) << 24;
        let mut bit = 0;
        while bit < 8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04C1_1DB7
            } else {
                r << 1
            };
            bit += 1;
        }
        table[i] = r;
        i += 1;
    }
    table
};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds one Ogg page with a valid CRC.
    pub(crate) fn page(
        flags: u8,
        granule: i64,
        serial: u32,
        seq: u32,
        packets: &[&[u8]],
    ) -> Vec<u8> {
        let mut lacing = Vec::new();
        let mut body = Vec::new();
        for p in packets {
            let mut n = p.len();
            while n >= 255 {
                lacing.push(255);
                n -= 255;
            }
            lacing.push(n as u8);
            body.extend_from_slice(p);
        }
        let mut v = b"OggS".to_vec();
        v.push(0);
        v.push(flags);
        v.extend_from_slice(&granule.to_le_bytes());
        v.extend_from_slice(&serial.to_le_bytes());
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        v.push(lacing.len() as u8);
        v.extend_from_slice(&lacing);
        v.extend_from_slice(&body);
        let crc = crc32(&v);
        v[22..26].copy_from_slice(&crc.to_le_bytes());
        v
    }

    pub(crate) fn opus_head(pre_skip: u16) -> Vec<u8> {
        let mut v = b"OpusHead".to_vec();
        v.extend_from_slice(&[1, 1]);
        v.extend_from_slice(&pre_skip.to_le_bytes());
        v.extend_from_slice(&16_000u32.to_le_bytes());
        v.extend_from_slice(&[0, 0, 0]);
        v
    }

    /// A 20 ms CELT packet (TOC config 31, mono, one frame).
    const PACKET: &[u8] = &[0xF8, 0xFF, 0xFE];

    fn collect(
        demux: &mut OggDemuxer,
        data: &[u8],
    ) -> (Vec<Vec<u8>>, Vec<u32>, Result<(), DecodeError>) {
        let mut packets = Vec::new();
        let mut discards = Vec::new();
        let result = demux.push(data, &mut |event| {
            if let Demuxed::Packet {
                data,
                discard_end_48k,
            } = event
            {
                packets.push(data.to_vec());
                discards.push(discard_end_48k);
            }
        });
        (packets, discards, result)
    }

    fn stream(serial: u32, audio_pages: u32, eos_granule: Option<i64>) -> Vec<u8> {
        let mut v = page(FLAG_BOS, 0, serial, 0, &[&opus_head(312)]);
        v.extend(page(0, 0, serial, 1, &[b"OpusTags\0\0\0\0\0\0\0\0"]));
        for i in 0..audio_pages {
            let last = i + 1 == audio_pages;
            let flags = if last && eos_granule.is_some() {
                FLAG_EOS
            } else {
                0
            };
            let granule = if last { eos_granule.unwrap_or(-1) } else { -1 };
            v.extend(page(flags, granule, serial, 2 + i, &[PACKET, PACKET]));
        }
        v
    }

    #[test]
    fn crc_matches_known_page() {
        // Any page built by `page` must verify, and a flipped byte must not.
        let mut p = page(FLAG_BOS, 0, 7, 0, &[&opus_head(0)]);
        let mut demux = OggDemuxer::new(1 << 16);
        assert!(collect(&mut demux, &p).2.is_ok());
        p[30] ^= 1;
        let mut demux = OggDemuxer::new(1 << 16);
        let err = collect(&mut demux, &p).2.unwrap_err();
        assert!(err.to_string().contains("CRC"), "{err}");
    }

    #[test]
    fn packets_span_pages() {
        let big: Vec<u8> = (0..600).map(|i| i as u8).collect();
        let mut v = page(FLAG_BOS, 0, 1, 0, &[&opus_head(0)]);
        v.extend(page(0, 0, 1, 1, &[b"OpusTags\0\0\0\0\0\0\0\0"]));
        // First 510 bytes as two 255-segments with no terminator: continues.
        let mut first = page(0, -1, 1, 2, &[&big[..510]]);
        // Remove the terminating 0 lacing value written for an exact multiple.
        let segs = first[26] as usize;
        assert_eq!(first[27 + segs - 1], 0);
        first.remove(27 + segs - 1);
        first[26] -= 1;
        first[22..26].copy_from_slice(&[0; 4]);
        let crc = crc32(&first);
        first[22..26].copy_from_slice(&crc.to_le_bytes());
        v.extend(first);
        v.extend(page(FLAG_CONTINUED, 960, 1, 3, &[&big[510..]]));
        let mut demux = OggDemuxer::new(1 << 16);
        let (packets, _, result) = collect(&mut demux, &v);
        result.unwrap();
        assert_eq!(packets, vec![big]);
    }

    #[test]
    fn end_trim_from_final_granule() {
        // 3 pages of 2 × 960 samples = 5760; granule says 5000.
        let v = stream(9, 3, Some(5000));
        let mut demux = OggDemuxer::new(1 << 16);
        let (packets, discards, result) = collect(&mut demux, &v);
        result.unwrap();
        assert_eq!(packets.len(), 6);
        assert_eq!(discards, vec![0, 0, 0, 0, 0, 760]);
        demux.finish().unwrap();
    }

    #[test]
    fn chained_streams_restart() {
        let mut v = stream(1, 2, Some(3840));
        v.extend(stream(2, 1, Some(1920)));
        let mut heads = 0;
        let mut packets = 0;
        let mut demux = OggDemuxer::new(1 << 16);
        demux
            .push(&v, &mut |e| match e {
                Demuxed::Head(_) => heads += 1,
                Demuxed::Packet { .. } => packets += 1,
            })
            .unwrap();
        assert_eq!((heads, packets), (2, 6));
    }

    #[test]
    fn sequence_gap_is_corruption() {
        let mut v = page(FLAG_BOS, 0, 1, 0, &[&opus_head(0)]);
        v.extend(page(0, 0, 1, 1, &[b"OpusTags"]));
        v.extend(page(0, 960, 1, 5, &[PACKET]));
        let mut demux = OggDemuxer::new(1 << 16);
        let err = collect(&mut demux, &v).2.unwrap_err();
        assert!(err.to_string().contains("sequence"), "{err}");
    }

    #[test]
    fn vorbis_is_named() {
        let mut v = page(FLAG_BOS, 0, 1, 0, &[b"\x01vorbis\0\0\0\0\x01"]);
        v.extend(page(0, 0, 1, 1, &[b"\x03vorbis"]));
        let mut demux = OggDemuxer::new(1 << 16);
        let err = collect(&mut demux, &v).2.unwrap_err();
        assert!(
            matches!(err, DecodeError::Unsupported(ref m) if m.contains("Vorbis")),
            "{err}"
        );
    }

    #[test]
    fn other_multiplexed_streams_are_ignored() {
        let mut v = page(FLAG_BOS, 0, 1, 0, &[&opus_head(0)]);
        v.extend(page(FLAG_BOS, 0, 2, 0, &[b"\x80theora"]));
        v.extend(page(0, 0, 1, 1, &[b"OpusTags"]));
        v.extend(page(0, 0, 2, 1, &[b"video data"]));
        v.extend(page(0, 960, 1, 2, &[PACKET]));
        let mut demux = OggDemuxer::new(1 << 16);
        let (packets, _, result) = collect(&mut demux, &v);
        result.unwrap();
        assert_eq!(packets.len(), 1);
    }
}
