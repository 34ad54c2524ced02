//! The streaming decoder on real browser and ffmpeg recordings, on every
//! kind of bad input, and under its memory cap.

#![allow(
    clippy::unwrap_used,
    reason = "a helper that cannot read a fixture must fail the test"
)]

use std::path::PathBuf;

use sonora::audio::{AudioFormat, DecodeError, DecoderLimits, StreamDecoder};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn chunk_lengths(name: &str) -> Vec<usize> {
    serde_json::from_slice(&fixture(name)).unwrap()
}

fn reference(name: &str) -> Vec<i16> {
    fixture(name)
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn split<'a>(bytes: &'a [u8], lengths: &'a [usize]) -> Vec<&'a [u8]> {
    let mut rest = bytes;
    lengths
        .iter()
        .map(|&n| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        })
        .collect()
}

/// Decodes `chunks`, returning the PCM and the first error (if any).
fn decode(
    mime: &str,
    chunks: &[&[u8]],
    limits: DecoderLimits,
) -> (Vec<i16>, Result<(), DecodeError>, StreamDecoder) {
    let mut decoder = StreamDecoder::for_mime(mime, limits).unwrap();
    let mut pcm = Vec::new();
    for chunk in chunks {
        if let Err(e) = decoder.push(chunk, &mut pcm) {
            return (pcm, Err(e), decoder);
        }
    }
    let result = decoder.finish(&mut pcm);
    (pcm, result, decoder)
}

fn decode_ok(mime: &str, chunks: &[&[u8]]) -> Vec<i16> {
    let (pcm, result, _) = decode(mime, chunks, DecoderLimits::default());
    result.unwrap();
    pcm
}

fn snr_db(reference: &[i16], test: &[i16]) -> f64 {
    assert!(!test.is_empty());
    let (mut signal, mut noise) = (0f64, 0f64);
    for (r, t) in reference.iter().zip(test) {
        signal += f64::from(*r).powi(2);
        noise += (f64::from(*r) - f64::from(*t)).powi(2);
    }
    10.0 * (signal / noise.max(1e-9)).log10()
}

/// Deterministic pseudo-random split points (no RNG crate needed).
fn random_split(bytes: &[u8], seed: u64, max_len: usize) -> Vec<&[u8]> {
    let mut state = seed;
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let n = ((state >> 33) as usize % max_len + 1).min(rest.len());
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

#[test]
fn chrome_webm_in_recorded_chunks_matches_ffmpeg() {
    let bytes = fixture("chrome_5s.webm");
    let lengths = chunk_lengths("chrome_5s.webm.chunks.json");
    let (pcm, result, decoder) = decode(
        "audio/webm;codecs=opus",
        &split(&bytes, &lengths),
        DecoderLimits::default(),
    );
    result.unwrap();
    let reference = reference("chrome_5s.ref16k.s16le");
    let snr = snr_db(&reference, &pcm);
    assert!(snr >= 30.0, "SNR {snr:.1} dB");
    assert_eq!(pcm.len(), reference.len());

    let stats = decoder.stats();
    assert_eq!(stats.format, Some("webm"));
    assert_eq!(stats.bytes_in, bytes.len() as u64);
    assert_eq!(stats.bytes_refused, 0);
    assert_eq!(stats.packets_decoded, 93, "5.58 s of 60 ms packets");
    assert_eq!(stats.packets_concealed, 0);
    assert_eq!(stats.pcm_samples_out, pcm.len() as u64);
    assert_eq!(stats.pcm_ms_out, 5580);
    // Chrome's blobs end a byte or so into the next element: only about one
    // blob is ever held.
    assert!(
        stats.pending_bytes_high_water > 0 && stats.pending_bytes_high_water < 4096,
        "{stats:?}"
    );
    assert!(stats.first_pcm_latency_us.is_some());
}

#[test]
fn webm_output_is_identical_whatever_the_split() {
    let bytes = fixture("chrome_5s.webm");
    let whole = decode_ok("audio/webm", &[&bytes]);
    let ones: Vec<&[u8]> = bytes.chunks(1).collect();
    let sevens: Vec<&[u8]> = bytes.chunks(7).collect();
    assert_eq!(decode_ok("audio/webm", &ones), whole);
    assert_eq!(decode_ok("audio/webm", &sevens), whole);
    for seed in 1..6 {
        assert_eq!(
            decode_ok("audio/webm", &random_split(&bytes, seed, 3000)),
            whole,
            "seed {seed}"
        );
    }
    let lengths = chunk_lengths("chrome_5s.webm.chunks.json");
    assert_eq!(decode_ok("audio/webm", &split(&bytes, &lengths)), whole);
}

#[test]
fn ogg_opus_matches_ffmpeg_exactly_in_length() {
    let bytes = fixture("ffmpeg_5s.ogg");
    let reference = reference("ffmpeg_5s.ref16k.s16le");
    let whole = decode_ok("audio/ogg;codecs=opus", &[&bytes]);
    // Pre-skip and the final granule trim make the length exact.
    assert_eq!(whole.len(), reference.len());
    let snr = snr_db(&reference, &whole);
    assert!(snr >= 30.0, "SNR {snr:.1} dB");
    let ones: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(decode_ok("audio/ogg", &ones), whole);
    for seed in 1..6 {
        assert_eq!(
            decode_ok("audio/ogg", &random_split(&bytes, seed, 900)),
            whole,
            "seed {seed}"
        );
    }
}

#[test]
fn pcm_passthrough_and_resampling() {
    let pcm16k: Vec<i16> = (0..16_000)
        .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
        .collect();
    let bytes: Vec<u8> = pcm16k.iter().flat_map(|s| s.to_le_bytes()).collect();
    let odd: Vec<&[u8]> = bytes.chunks(333).collect();
    assert_eq!(decode_ok("audio/pcm;rate=16000", &odd), pcm16k);

    // Stereo 48 kHz with the same signal on both channels comes out at 16 kHz mono.
    let stereo48: Vec<u8> = (0..48_000)
        .flat_map(|i| {
            let s = ((i as f32 * 0.05 / 3.0).sin() * 8000.0) as i16;
            [s, s]
        })
        .flat_map(i16::to_le_bytes)
        .collect();
    let out = decode_ok(
        "audio/pcm;rate=48000;channels=2",
        &stereo48.chunks(1001).collect::<Vec<_>>(),
    );
    assert_eq!(out.len(), 16_000);
    let snr = snr_db(&pcm16k[100..15_900], &out[100..15_900]);
    assert!(snr > 30.0, "SNR {snr:.1} dB");
}

// ---- bad input: every kind gives the right error and never panics ----

/// A minimal EBML element.
fn element(id: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = id.to_vec();
    v.push(0x01); // 8-byte size: marker byte then 7 bytes
    v.extend_from_slice(&(body.len() as u64).to_be_bytes()[1..]);
    v.extend_from_slice(body);
    v
}

fn webm_with_codec(codec: &str) -> Vec<u8> {
    let mut v = element(&[0x1A, 0x45, 0xDF, 0xA3], &element(&[0x42, 0x82], b"webm"));
    v.extend_from_slice(&[
        0x18, 0x53, 0x80, 0x67, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    ]);
    let mut entry = element(&[0xD7], &[1]);
    entry.extend(element(&[0x83], &[2]));
    entry.extend(element(&[0x86], codec.as_bytes()));
    v.extend(element(
        &[0x16, 0x54, 0xAE, 0x6B],
        &element(&[0xAE], &entry),
    ));
    v
}

#[test]
fn vorbis_webm_is_unsupported() {
    let (_, result, _) = decode(
        "audio/webm",
        &[&webm_with_codec("A_VORBIS")],
        DecoderLimits::default(),
    );
    let err = result.unwrap_err();
    assert!(
        matches!(err, DecodeError::Unsupported(ref m) if m.contains("vorbis")),
        "{err}"
    );
    assert_eq!(err.code(), "unsupported_audio");
}

#[test]
fn mp4_is_unsupported_when_declared_or_disguised() {
    let err =
        StreamDecoder::for_mime("audio/mp4;codecs=opus", DecoderLimits::default()).unwrap_err();
    assert!(matches!(err, DecodeError::Unsupported(_)), "{err}");
    let bytes = fixture("chrome_5s.mp4");
    let (pcm, result, _) = decode("audio/webm", &[&bytes[..641]], DecoderLimits::default());
    let err = result.unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported audio: declared webm but the stream starts like MP4"
    );
    assert!(pcm.is_empty());
    // Without a declaration, it is named too.
    let (_, result, _) = decode("", &[&bytes], DecoderLimits::default());
    assert!(result.unwrap_err().to_string().contains("MP4"));
}

#[test]
fn wav_declared_as_webm_is_refused() {
    let bytes = fixture("espeak_es_16k.wav");
    let (_, result, mut decoder) = decode("audio/webm", &[&bytes[..100]], DecoderLimits::default());
    let err = result.unwrap_err();
    assert!(err.to_string().contains("WAV"), "{err}");
    // Sticky: the decoder keeps refusing.
    assert_eq!(decoder.push(&bytes[100..200], &mut Vec::new()), Err(err));
}

#[test]
fn random_bytes_and_empty_streams() {
    let noise: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for mime in ["audio/webm", "audio/ogg", ""] {
        let (_, result, _) = decode(mime, &[&noise], DecoderLimits::default());
        assert!(
            matches!(result, Err(DecodeError::Unsupported(_))),
            "{mime}: {result:?}"
        );
    }
    for mime in ["audio/webm", "audio/ogg", "audio/pcm", ""] {
        let (_, result, _) = decode(mime, &[], DecoderLimits::default());
        assert_eq!(result, Err(DecodeError::Empty), "{mime}");
    }
}

#[test]
fn truncated_block_keeps_what_was_decoded() {
    let bytes = fixture("chrome_5s.webm");
    // Cut in the middle of a block, well into the stream.
    let cut = &bytes[..bytes.len() / 2 + 17];
    let (pcm, result, _) = decode("audio/webm", &[cut], DecoderLimits::default());
    let err = result.unwrap_err();
    assert!(
        matches!(err, DecodeError::Truncated { container: "WebM", pending_bytes } if pending_bytes > 0),
        "{err}"
    );
    assert!(
        pcm.len() > 16_000,
        "the first half was decoded: {} samples",
        pcm.len()
    );
    // Ogg cut mid-page.
    let ogg = fixture("ffmpeg_5s.ogg");
    let (pcm, result, _) = decode(
        "audio/ogg",
        &[&ogg[..ogg.len() - 100]],
        DecoderLimits::default(),
    );
    assert!(
        matches!(
            result,
            Err(DecodeError::Truncated {
                container: "Ogg",
                ..
            })
        ),
        "{result:?}"
    );
    assert!(pcm.len() > 60_000);
    // A WebM that stops before Tracks.
    let (_, result, _) = decode("audio/webm", &[&bytes[..60]], DecoderLimits::default());
    assert!(
        matches!(result, Err(DecodeError::Truncated { .. })),
        "{result:?}"
    );
}

#[test]
fn flipped_bytes() {
    let bytes = fixture("chrome_5s.webm");
    let clean = decode_ok("audio/webm", &[&bytes]);
    // A flipped byte inside Opus payload is a glitch, never an error: the
    // stream goes on with the same length.
    let mut payload_hit = bytes.clone();
    payload_hit[40_000] ^= 0x5A;
    let glitched = decode_ok("audio/webm", &[&payload_hit]);
    assert_eq!(glitched.len(), clean.len());
    // Flipping every byte of a structural run is corruption, caught.
    let mut structural = bytes.clone();
    let cluster = bytes
        .windows(4)
        .rposition(|w| w == [0x1F, 0x43, 0xB6, 0x75])
        .unwrap();
    structural[cluster] = 0x00;
    let (pcm, result, _) = decode("audio/webm", &[&structural], DecoderLimits::default());
    assert!(
        matches!(
            result,
            Err(DecodeError::Corrupt {
                container: "WebM",
                ..
            })
        ),
        "{result:?}"
    );
    assert!(
        pcm.len() > 70_000,
        "everything before the damage was decoded"
    );
    // Many single flips anywhere: errors or glitches, never a panic.
    for i in (0..bytes.len()).step_by(997) {
        let mut damaged = bytes.clone();
        damaged[i] ^= 0xFF;
        let _ = decode("audio/webm", &[&damaged], DecoderLimits::default());
    }
}

#[test]
fn broken_ogg_crc_is_corruption() {
    let mut bytes = fixture("ffmpeg_5s.ogg");
    let fifth_page = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == b"OggS")
        .nth(5)
        .unwrap()
        .0;
    bytes[fifth_page + 40] ^= 0x01;
    let (pcm, result, mut decoder) = decode("audio/ogg", &[&bytes], DecoderLimits::default());
    let err = result.unwrap_err();
    assert!(
        matches!(err, DecodeError::Corrupt { container: "Ogg", ref reason, .. } if reason.contains("CRC")),
        "{err}"
    );
    assert_eq!(
        pcm.len(),
        3 * 1600 - 104,
        "three 100 ms pages, less the 104-sample pre-skip, came first"
    );
    assert!(decoder.finish(&mut Vec::new()).is_err(), "sticky");
}

#[test]
fn absurd_element_sizes_never_allocate() {
    let mut header = webm_with_codec("A_OPUS");
    // Replace Tracks by a SimpleBlock declaring 2^50 bytes.
    header.truncate(
        header
            .windows(4)
            .position(|w| w == [0x16, 0x54, 0xAE, 0x6B])
            .unwrap(),
    );
    let mut block = header.clone();
    block.extend_from_slice(&[0xA3, 0x01, 0x04, 0, 0, 0, 0, 0, 0]);
    let (_, result, _) = decode("audio/webm", &[&block], DecoderLimits::default());
    let err = result.unwrap_err();
    assert!(err.to_string().contains("1125899906842624 bytes"), "{err}");
    // A skipped element (Void) of 2^50 bytes is corruption too, not a silent
    // swallow of the rest of the stream.
    let mut void = header.clone();
    void.extend_from_slice(&[0xEC, 0x01, 0x04, 0, 0, 0, 0, 0, 0]);
    let (_, result, _) = decode("audio/webm", &[&void], DecoderLimits::default());
    assert!(
        matches!(result, Err(DecodeError::Corrupt { .. })),
        "{result:?}"
    );
}

/// Lace sizes whose sum overflows a 64-bit integer (each EBML delta adds
/// 2^55) are corruption, not a panic.
#[test]
fn overflowing_ebml_lace_sizes_are_corruption() {
    let mut stream = webm_with_codec("A_OPUS");
    let mut block = vec![0x81, 0x00, 0x00, 0x86, 31];
    for _ in 0..31 {
        block.extend_from_slice(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    block.extend_from_slice(&[0xF8, 0xFF, 0xFE]);
    stream.extend(element(&[0xA3], &block));
    let (_, result, _) = decode("audio/webm", &[&stream], DecoderLimits::default());
    let err = result.unwrap_err();
    assert!(
        matches!(err, DecodeError::Corrupt { ref reason, .. } if reason.contains("laced")),
        "{err}"
    );
}

/// A block of another track over the block cap (a video keyframe) is
/// skipped by counting, not buffered and not an error.
#[test]
fn big_blocks_of_other_tracks_are_skipped() {
    let mut stream = webm_with_codec("A_OPUS");
    let mut video = vec![0x82, 0x00, 0x00, 0x80];
    video.extend(vec![7u8; 300 * 1024]);
    stream.extend(element(&[0xA3], &video));
    let chunks: Vec<&[u8]> = stream.chunks(4096).collect();
    let (pcm, result, decoder) = decode("video/webm", &chunks, DecoderLimits::default());
    result.unwrap();
    assert!(pcm.is_empty());
    assert!(decoder.stats().pending_bytes_high_water < 8192);
}

#[test]
fn input_cap_refuses_a_chunk_and_stays_usable() {
    let limits = DecoderLimits {
        input_cap_bytes: 64 * 1024,
        max_block_bytes: 1024 * 1024,
        realtime: None,
    };
    let bytes = fixture("chrome_5s.webm");
    let mut decoder = StreamDecoder::for_mime("audio/webm", limits).unwrap();
    let mut pcm = Vec::new();
    let too_big = vec![0u8; 64 * 1024 + 1];
    let err = decoder.push(&too_big, &mut pcm).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::ChunkRefused {
            chunk_bytes: 65_537,
            pending_bytes: 0,
            cap_bytes: 65_536
        }
    ));
    assert!(!err.is_fatal());
    for chunk in bytes.chunks(1000) {
        decoder.push(chunk, &mut pcm).unwrap();
    }
    decoder.finish(&mut pcm).unwrap();
    assert_eq!(pcm.len(), 89_280);
    let stats = decoder.stats();
    assert_eq!((stats.bytes_refused, stats.chunks_refused), (65_537, 1));
    assert_eq!(stats.bytes_in, bytes.len() as u64);
}

#[test]
fn a_block_growing_past_the_cap_is_refused_piece_by_piece() {
    let limits = DecoderLimits {
        input_cap_bytes: 64 * 1024,
        max_block_bytes: 1024 * 1024,
        realtime: None,
    };
    let mut stream = webm_with_codec("A_OPUS");
    stream.truncate(
        stream
            .windows(4)
            .position(|w| w == [0x16, 0x54, 0xAE, 0x6B])
            .unwrap(),
    );
    // A 200 KiB SimpleBlock, allowed by the block cap, arrives in 10 KiB pieces.
    stream.extend_from_slice(&[0xA3, 0x01]);
    stream.extend_from_slice(&(200u64 * 1024).to_be_bytes()[1..]);
    stream.extend(vec![0u8; 200 * 1024]);
    let mut decoder = StreamDecoder::for_mime("audio/webm", limits).unwrap();
    let mut refused = 0;
    for chunk in stream.chunks(10 * 1024) {
        match decoder.push(chunk, &mut Vec::new()) {
            Ok(()) => {}
            Err(DecodeError::ChunkRefused { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
        assert!(decoder.pending_bytes() <= 64 * 1024);
    }
    assert!(refused > 10, "{refused}");
    assert!(decoder.stats().pending_bytes_high_water <= 64 * 1024);
}

#[test]
fn declared_format_is_reported() {
    let bytes = fixture("ffmpeg_5s.ogg");
    let (_, result, decoder) = decode("", &[&bytes], DecoderLimits::default());
    result.unwrap();
    assert_eq!(decoder.format(), Some(AudioFormat::Ogg));
}

/// Inputs that once broke a parser (from fuzzing) stay fixed.
#[test]
fn fuzz_regressions() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let bytes = std::fs::read(entry.path()).unwrap();
        for mime in ["audio/webm", "audio/ogg", "audio/pcm;rate=44100", ""] {
            for size in [1, 7, 4096] {
                let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
                let _ = decode(mime, &chunks, DecoderLimits::default());
            }
        }
    }
}
