//! Crafted streams, built byte by byte, for the adversarial tests, the
//! `bench hostile` attacks and the fuzz seeds: valid containers that carry
//! what a hostile client would put in them.

/// An EBML element: ID, size (1, 2, 4 or 8 bytes), body.
pub fn ebml_element(id: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = id.to_vec();
    let size = body.len() as u64;
    if size < 0x7F {
        v.push(0x80 | size as u8);
    } else if size < 0x3FFF {
        v.extend([0x40 | (size >> 8) as u8, size as u8]);
    } else if size < 0x0FFF_FFFF {
        v.extend([
            0x10 | (size >> 24) as u8,
            (size >> 16) as u8,
            (size >> 8) as u8,
            size as u8,
        ]);
    } else {
        v.push(0x01);
        v.extend(&size.to_be_bytes()[1..]);
    }
    v.extend_from_slice(body);
    v
}

/// An `OpusHead` for a mono 48 kHz stream with 312 samples of pre-skip.
pub fn opus_head() -> Vec<u8> {
    let mut v = b"OpusHead".to_vec();
    v.extend([1, 1]);
    v.extend(312u16.to_le_bytes());
    v.extend(48_000u32.to_le_bytes());
    v.extend([0, 0, 0]);
    v
}

/// The start of a WebM stream as MediaRecorder writes it: EBML header, a
/// Segment of unknown size, Tracks with one mono Opus track.
pub fn webm_header() -> Vec<u8> {
    let mut v = ebml_element(
        &[0x1A, 0x45, 0xDF, 0xA3],
        &ebml_element(&[0x42, 0x82], b"webm"),
    );
    v.extend([
        0x18, 0x53, 0x80, 0x67, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    let mut entry = ebml_element(&[0xD7], &[1]);
    entry.extend(ebml_element(&[0x83], &[2]));
    entry.extend(ebml_element(&[0x86], b"A_OPUS"));
    entry.extend(ebml_element(&[0x63, 0xA2], &opus_head()));
    entry.extend(ebml_element(&[0xE1], &ebml_element(&[0x9F], &[1])));
    v.extend(ebml_element(
        &[0x16, 0x54, 0xAE, 0x6B],
        &ebml_element(&[0xAE], &entry),
    ));
    v
}

/// A Cluster of unknown size holding `blocks` SimpleBlocks of track 1, each
/// with `frames` (1 to 256) copies of `packet` in fixed lacing. 256 empty
/// packets make a 7-byte block.
pub fn webm_cluster(blocks: usize, frames: usize, packet: &[u8]) -> Vec<u8> {
    let frames = frames.clamp(1, 256);
    let mut v = vec![
        0x1F, 0x43, 0xB6, 0x75, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    v.extend([0xE7, 0x81, 0x00]);
    let mut body = vec![0x81, 0x00, 0x00, 0x84, (frames - 1) as u8];
    for _ in 0..frames {
        body.extend_from_slice(packet);
    }
    let block = ebml_element(&[0xA3], &body);
    for _ in 0..blocks {
        v.extend_from_slice(&block);
    }
    v
}

/// A 20 ms Opus packet of silence (CELT, full band): valid, three bytes.
pub const OPUS_SILENCE_20MS: [u8; 3] = [0xF8, 0xFF, 0xFE];

/// Ogg's CRC-32 (polynomial 0x04C11DB7, not reflected).
pub fn ogg_crc(data: &[u8]) -> u32 {
    let mut crc = 0u32;
    for &byte in data {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

const OGG_SERIAL: u32 = 0x5E0A_0A5E;

/// One Ogg page with the given lacing values and body.
pub fn ogg_page(
    header_type: u8,
    granule: u64,
    sequence: u32,
    lacing: &[u8],
    body: &[u8],
) -> Vec<u8> {
    let mut page = b"OggS\0".to_vec();
    page.push(header_type);
    page.extend(granule.to_le_bytes());
    page.extend(OGG_SERIAL.to_le_bytes());
    page.extend(sequence.to_le_bytes());
    page.extend([0; 4]);
    page.push(lacing.len() as u8);
    page.extend_from_slice(lacing);
    page.extend_from_slice(body);
    let crc = ogg_crc(&page);
    page[22..26].copy_from_slice(&crc.to_le_bytes());
    page
}

/// The two header pages of an Ogg Opus stream (OpusHead, OpusTags).
pub fn ogg_header() -> Vec<u8> {
    let head = opus_head();
    let mut tags = b"OpusTags".to_vec();
    tags.extend(6u32.to_le_bytes());
    tags.extend(b"sonora");
    tags.extend(0u32.to_le_bytes());
    let mut v = ogg_page(2, 0, 0, &[head.len() as u8], &head);
    v.extend(ogg_page(0, 0, 1, &[tags.len() as u8], &tags));
    v
}

/// Audio page number `k` (from 0) of 255 empty packets: 255 zero lacing
/// values and no body.
pub fn ogg_empty_packets_page(k: u32) -> Vec<u8> {
    ogg_page(0, u64::from(k + 1) * 960, k + 2, &[0; 255], &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::{DecodeError, DecoderLimits, RealtimeLimit, StreamDecoder};

    fn live() -> DecoderLimits {
        DecoderLimits {
            realtime: Some(RealtimeLimit::default()),
            ..DecoderLimits::default()
        }
    }

    #[test]
    fn crafted_streams_are_what_they_claim() {
        let mut decoder = StreamDecoder::for_mime("audio/webm", live()).unwrap();
        let mut out = Vec::new();
        decoder.push(&webm_header(), &mut out).unwrap();
        decoder
            .push(&webm_cluster(5, 10, &OPUS_SILENCE_20MS), &mut out)
            .unwrap();
        assert_eq!(decoder.stats().packets_decoded, 50);
        let mut decoder = StreamDecoder::for_mime("audio/ogg", live()).unwrap();
        decoder.push(&ogg_header(), &mut out).unwrap();
        assert_eq!(decoder.stats().format, Some("ogg"));
    }

    #[test]
    fn a_message_of_empty_laced_frames_ends_the_stream_not_the_process() {
        // The attack: 200 blocks of 256 empty frames in 1,400 bytes.
        let mut decoder = StreamDecoder::for_mime("audio/webm", live()).unwrap();
        let mut out = Vec::new();
        decoder.push(&webm_header(), &mut out).unwrap();
        let error = decoder
            .push(&webm_cluster(200, 256, &[]), &mut out)
            .unwrap_err();
        assert!(matches!(error, DecodeError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("in a row"), "{error}");
        // 120 ms of concealment at most, not 51,200 packets' worth.
        assert!(out.len() <= 1_920, "{} samples", out.len());
        assert_eq!(decoder.stats().packets_concealed, 6);
    }

    #[test]
    fn ogg_pages_of_empty_packets_end_the_stream() {
        let mut decoder = StreamDecoder::for_mime("audio/ogg", live()).unwrap();
        let mut out = Vec::new();
        decoder.push(&ogg_header(), &mut out).unwrap();
        let error = decoder
            .push(&ogg_empty_packets_page(0), &mut out)
            .unwrap_err();
        assert!(error.to_string().contains("in a row"), "{error}");
        assert!(out.len() <= 1_920, "{} samples", out.len());
    }

    #[test]
    fn valid_audio_faster_than_real_time_is_refused_past_the_burst() {
        let mut decoder = StreamDecoder::for_mime("audio/webm", live()).unwrap();
        let mut out = Vec::new();
        decoder.push(&webm_header(), &mut out).unwrap();
        // 100 blocks of 64 packets of 20 ms: 128 s of audio at once.
        let error = decoder
            .push(&webm_cluster(100, 64, &OPUS_SILENCE_20MS), &mut out)
            .unwrap_err();
        assert!(matches!(error, DecodeError::TooFast { .. }), "{error}");
        assert_eq!(error.code(), "audio_too_fast");
        // The 10 s burst (and the clock's few ms), never the whole 128 s.
        let ms = out.len() / 16;
        assert!((9_000..=10_500).contains(&ms), "{ms} ms decoded");
        assert_eq!(decoder.stats().refused_too_fast, 1);
        // Sticky.
        assert_eq!(decoder.push(&[1], &mut out), Err(error));
    }

    #[test]
    fn pcm_faster_than_real_time_is_refused_and_files_are_not() {
        let second = vec![0u8; 32_000];
        let mut live_pcm = StreamDecoder::for_mime("audio/pcm;rate=16000", live()).unwrap();
        let mut out = Vec::new();
        for _ in 0..10 {
            live_pcm.push(&second, &mut out).unwrap();
        }
        let error = live_pcm.push(&second, &mut out).unwrap_err();
        assert!(
            error.to_string().contains("faster than real time"),
            "{error}"
        );
        let mut file =
            StreamDecoder::for_mime("audio/pcm;rate=16000", DecoderLimits::default()).unwrap();
        for _ in 0..60 {
            file.push(&second, &mut out).unwrap();
        }
    }
}
