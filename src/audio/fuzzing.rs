//! Entry points for the fuzz targets in `fuzz/`: they reach the demuxers
//! directly, so the fuzzer explores the parsers instead of the format check.

use super::*;

/// Runs the WebM demuxer over `data` in
/// pieces of `piece` bytes.
pub fn demux_webm(data: &[u8], piece: usize) {
    let mut demux = WebmDemuxer::new(DecoderLimits::default().max_block_bytes);
    let mut count = 0usize;
    let mut sink = |item: Demuxed<'_>| {
        if let Demuxed::Packet { data, .. } = item {
            count += data.len();
        }
    };
    for chunk in data.chunks(piece.max(1)) {
        if demux.push(chunk, &mut sink).is_err() {
            return;
        }
        assert!(
            demux.pending_bytes()
                <= DecoderLimits::default().max_block_bytes + 64 * 1024 + chunk.len()
        );
    }
    let _ = demux.finish();
}

/// Runs the Ogg demuxer over `data` in pieces of `piece` bytes.
pub fn demux_ogg(data: &[u8], piece: usize) {
    let mut demux = OggDemuxer::new(DecoderLimits::default().max_block_bytes);
    let mut sink = |_: Demuxed<'_>| {};
    for chunk in data.chunks(piece.max(1)) {
        if demux.push(chunk, &mut sink).is_err() {
            return;
        }
    }
    let _ = demux.finish();
}

/// Runs a live [`StreamDecoder`] (with the default [`RealtimeLimit`])
/// over `data` in pieces; `selector` picks the format and the piece
/// size as in [`decode`]. Checks that decoded audio never outruns the
/// wall clock by more than the burst (plus one 120 ms packet).
pub fn decode_live(data: &[u8], selector: u8) {
    let mime = ["audio/webm", "audio/ogg", "audio/pcm;rate=8000", ""][usize::from(selector & 3)];
    let piece = usize::from(selector >> 2) * 97 + 1;
    let pace = RealtimeLimit::default();
    let limits = DecoderLimits {
        input_cap_bytes: 256 * 1024,
        max_block_bytes: 64 * 1024,
        realtime: Some(pace),
    };
    let Ok(mut decoder) = StreamDecoder::for_mime(mime, limits) else {
        return;
    };
    let started = Instant::now();
    let mut out = Vec::new();
    for chunk in data.chunks(piece) {
        let result = decoder.push(chunk, &mut out);
        let wall_ms = started.elapsed().as_millis() as u64;
        let allowed_ms =
            u64::from(pace.burst_ms) + wall_ms * u64::from(pace.speed_permille) / 1000 + 120;
        let audio_ms = out.len() as u64 / 16;
        assert!(
            audio_ms <= allowed_ms,
            "{audio_ms} ms of audio in {wall_ms} ms of wall time"
        );
        match result {
            Ok(()) | Err(DecodeError::ChunkRefused { .. }) => {}
            Err(_) => return,
        }
    }
}

/// Runs a whole [`StreamDecoder`]; `selector` picks the declared format
/// (low 2 bits) and the piece size (the rest).
pub fn decode(data: &[u8], selector: u8) {
    let mime = [
        "audio/webm",
        "audio/ogg",
        "audio/pcm;rate=22050;channels=2",
        "",
    ][usize::from(selector & 3)];
    let piece = usize::from(selector >> 2) * 97 + 1;
    let limits = DecoderLimits {
        input_cap_bytes: 256 * 1024,
        max_block_bytes: 64 * 1024,
        realtime: None,
    };
    let Ok(mut decoder) = StreamDecoder::for_mime(mime, limits) else {
        return;
    };
    let mut out = Vec::new();
    for chunk in data.chunks(piece) {
        match decoder.push(chunk, &mut out) {
            Ok(()) | Err(DecodeError::ChunkRefused { .. }) => {}
            Err(_) => return,
        }
        assert!(decoder.pending_bytes() <= limits.input_cap_bytes);
    }
    let _ = decoder.finish(&mut out);
    assert_eq!(decoder.stats().pcm_samples_out, out.len() as u64);
}
