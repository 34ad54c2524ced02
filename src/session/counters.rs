//! Live queue and traffic counters of one conversation, readable from other
//! tasks (metrics, clients pacing their sends) while the conversation runs.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A conversation's counters; the conversation writes, anyone reads.
#[derive(Debug, Default)]
pub struct Counters {
    uplink_queued_ms: AtomicU64,
    uplink_high_water_ms: AtomicU64,
    uplink_dropped_ms: AtomicU64,
    engine_send_stalls: AtomicU64,
    downlink_queued_ms: AtomicU64,
    downlink_high_water_ms: AtomicU64,
    downlink_cleared_ms: AtomicU64,
    audio_in_ms: AtomicU64,
    audio_out_ms: AtomicU64,
    chunks_refused: AtomicU64,
    interruptions: AtomicU64,
    decoder_bytes_in: AtomicU64,
    decoder_bytes_refused: AtomicU64,
    packets_decoded: AtomicU64,
    packets_concealed: AtomicU64,
    packets_corrupt: AtomicU64,
    audio_too_fast: AtomicU64,
    engine_lingered: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    /// User audio waiting to go to the engine.
    pub uplink_queued_ms: u64,
    /// Most user audio ever waiting at once.
    pub uplink_high_water_ms: u64,
    /// User audio dropped (oldest first) because the queue was full.
    pub uplink_dropped_ms: u64,
    /// Times the engine took longer than the send timeout to accept a frame.
    pub engine_send_stalls: u64,
    /// Reply audio waiting to go to the client.
    pub downlink_queued_ms: u64,
    /// Most reply audio ever waiting at once.
    pub downlink_high_water_ms: u64,
    /// Reply audio dropped by barge-in.
    pub downlink_cleared_ms: u64,
    /// User audio received from the client, as 16 kHz PCM.
    pub audio_in_ms: u64,
    /// Reply audio handed to the client.
    pub audio_out_ms: u64,
    /// Client audio chunks refused (decoder over its cap, or no decoder).
    pub chunks_refused: u64,
    /// Barge-ins (`Interrupted` events).
    pub interruptions: u64,
    /// Compressed bytes the decoder took.
    pub decoder_bytes_in: u64,
    /// Compressed bytes the decoder refused (input cap).
    pub decoder_bytes_refused: u64,
    /// Opus packets decoded.
    pub packets_decoded: u64,
    /// Opus packets replaced by packet-loss concealment.
    pub packets_concealed: u64,
    /// Lost Opus packets past what concealment covers (120 ms a run).
    pub packets_corrupt: u64,
    /// Streams ended for delivering audio faster than real time.
    pub audio_too_fast: u64,
    /// Engines still running 30 s after their conversation ended.
    pub engine_lingered: u64,
}

// Every counter is independent and only ever written by the conversation
// task, so relaxed ordering is enough.
const ORDER: Ordering = Ordering::Relaxed;

impl Counters {
    /// Audio waiting to go to the engine now, in ms (clients may pace on it).
    pub fn uplink_queued_ms(&self) -> u64 {
        self.uplink_queued_ms.load(ORDER)
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            uplink_queued_ms: self.uplink_queued_ms.load(ORDER),
            uplink_high_water_ms: self.uplink_high_water_ms.load(ORDER),
            uplink_dropped_ms: self.uplink_dropped_ms.load(ORDER),
            engine_send_stalls: self.engine_send_stalls.load(ORDER),
            downlink_queued_ms: self.downlink_queued_ms.load(ORDER),
            downlink_high_water_ms: self.downlink_high_water_ms.load(ORDER),
            downlink_cleared_ms: self.downlink_cleared_ms.load(ORDER),
            audio_in_ms: self.audio_in_ms.load(ORDER),
            audio_out_ms: self.audio_out_ms.load(ORDER),
            chunks_refused: self.chunks_refused.load(ORDER),
            interruptions: self.interruptions.load(ORDER),
            decoder_bytes_in: self.decoder_bytes_in.load(ORDER),
            decoder_bytes_refused: self.decoder_bytes_refused.load(ORDER),
            packets_decoded: self.packets_decoded.load(ORDER),
            packets_concealed: self.packets_concealed.load(ORDER),
            packets_corrupt: self.packets_corrupt.load(ORDER),
            audio_too_fast: self.audio_too_fast.load(ORDER),
            engine_lingered: self.engine_lingered.load(ORDER),
        }
    }

    pub(super) fn set_uplink_queued(&self, ms: u64) {
        self.uplink_queued_ms.store(ms, ORDER);
        self.uplink_high_water_ms.fetch_max(ms, ORDER);
    }

    pub(super) fn set_uplink_dropped(&self, ms: u64) {
        self.uplink_dropped_ms.store(ms, ORDER);
    }

    pub(super) fn add_engine_send_stall(&self) {
        self.engine_send_stalls.fetch_add(1, ORDER);
    }

    pub(super) fn set_downlink_queued(&self, ms: u64) {
        self.downlink_queued_ms.store(ms, ORDER);
        self.downlink_high_water_ms.fetch_max(ms, ORDER);
    }

    pub(super) fn set_downlink_cleared(&self, ms: u64) {
        self.downlink_cleared_ms.store(ms, ORDER);
    }

    pub(super) fn set_audio_in(&self, ms: u64) {
        self.audio_in_ms.store(ms, ORDER);
    }

    pub(super) fn set_audio_out(&self, ms: u64) {
        self.audio_out_ms.store(ms, ORDER);
    }

    pub(super) fn add_chunk_refused(&self) {
        self.chunks_refused.fetch_add(1, ORDER);
    }

    pub(super) fn add_engine_lingered(&self) {
        self.engine_lingered.fetch_add(1, ORDER);
    }

    pub(super) fn add_interruption(&self) {
        self.interruptions.fetch_add(1, ORDER);
    }

    pub(super) fn set_decoder(&self, stats: &crate::audio::DecoderStats) {
        self.decoder_bytes_in.store(stats.bytes_in, ORDER);
        self.decoder_bytes_refused.store(stats.bytes_refused, ORDER);
        self.packets_decoded.store(stats.packets_decoded, ORDER);
        self.packets_concealed.store(stats.packets_concealed, ORDER);
        self.packets_corrupt.store(stats.packets_corrupt, ORDER);
        self.audio_too_fast.store(stats.refused_too_fast, ORDER);
    }
}
