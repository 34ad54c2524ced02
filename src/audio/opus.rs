//! Opus stream set-up (`OpusHead`) and decoding straight to 16 kHz mono.
//!
//! libopus resamples and downmixes inside the decoder, which is cheaper and
//! closer to a reference decode than decoding at 48 kHz and resampling.

use super::{DecoderStats, ENGINE_RATE_HZ};

/// Longest Opus packet: 120 ms.
const MAX_PACKET_SAMPLES: usize = ENGINE_RATE_HZ as usize * 120 / 1000;
/// Concealment is for real packet loss: a run of lost (empty or
/// undecodable) packets is concealed up to this much audio, 120 ms; the rest
/// of the run is counted as corrupt and yields nothing.
pub(crate) const MAX_CONCEALED_RUN_SAMPLES: usize = ENGINE_RATE_HZ as usize * 120 / 1000;
/// A run of this many lost packets in a row (a second or more of audio at
/// 20 ms a packet) is no network loss: the stream ends as corrupt.
pub(crate) const MAX_LOST_RUN_PACKETS: u32 = 50;
/// Opus timestamps (pre-skip, granule positions, padding) count 48 kHz samples.
const OPUS_CLOCK_DIVISOR: usize = 48_000 / ENGINE_RATE_HZ as usize;

/// The identification header of an Opus stream (RFC 7845 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpusHead {
    pub(crate) channels: u8,
    /// Samples at 48 kHz to drop from the start of the decoded stream.
    pub(crate) pre_skip: u16,
    pub(crate) output_gain_q8: i16,
    pub(crate) mapping_family: u8,
    pub(crate) stream_count: u8,
}

impl OpusHead {
    pub(crate) fn parse(data: &[u8]) -> Result<Self, String> {
        if data.len() < 19 || &data[..8] != b"OpusHead" {
            return Err("Opus stream without a valid OpusHead".into());
        }
        let version = data[8];
        if version >> 4 != 0 {
            return Err(format!("OpusHead version {version} is not supported"));
        }
        let head = Self {
            channels: data[9],
            pre_skip: u16::from_le_bytes([data[10], data[11]]),
            output_gain_q8: i16::from_le_bytes([data[16], data[17]]),
            mapping_family: data[18],
            stream_count: if data[18] == 0 {
                1
            } else {
                *data.get(19).ok_or("OpusHead channel mapping cut short")?
            },
        };
        if head.channels == 0 {
            return Err("OpusHead declares zero channels".into());
        }
        Ok(head)
    }

    /// A head for a plain mono or stereo stream.
    pub(crate) fn plain(channels: u8, pre_skip: u16) -> Self {
        Self {
            channels,
            pre_skip,
            output_gain_q8: 0,
            mapping_family: 0,
            stream_count: 1,
        }
    }

    /// Multistream (surround, ambisonics) Opus needs the multistream decoder.
    pub(crate) fn check_supported(&self) -> Result<(), String> {
        if self.stream_count == 1 && self.channels <= 2 {
            Ok(())
        } else {
            Err(format!(
                "multistream Opus ({} channels in {} streams, mapping family {})",
                self.channels, self.stream_count, self.mapping_family
            ))
        }
    }
}

/// One Opus decoder at 16 kHz mono with pre-skip and concealment.
pub(crate) struct OpusStage {
    decoder: opus::Decoder,
    /// 16 kHz samples still to drop from the start.
    pre_skip_left: usize,
    /// Duration of the last good packet, used to size concealment.
    last_samples: usize,
    /// Lost packets in a row, and the samples concealed for them.
    lost_run_packets: u32,
    lost_run_samples: usize,
    scratch: Vec<i16>,
}

impl std::fmt::Debug for OpusStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusStage")
            .field("pre_skip_left", &self.pre_skip_left)
            .field("last_samples", &self.last_samples)
            .finish_non_exhaustive()
    }
}

impl OpusStage {
    pub(crate) fn new(head: &OpusHead) -> Result<Self, String> {
        let mut decoder = opus::Decoder::new(ENGINE_RATE_HZ, opus::Channels::Mono)
            .map_err(|e| format!("cannot create an Opus decoder: {e}"))?;
        if head.output_gain_q8 != 0 {
            decoder
                .set_gain(i32::from(head.output_gain_q8))
                .map_err(|e| format!("OpusHead output gain rejected: {e}"))?;
        }
        Ok(Self {
            decoder,
            pre_skip_left: usize::from(head.pre_skip) / OPUS_CLOCK_DIVISOR,
            last_samples: ENGINE_RATE_HZ as usize / 50,
            lost_run_packets: 0,
            lost_run_samples: 0,
            scratch: vec![0; MAX_PACKET_SAMPLES],
        })
    }

    /// The 16 kHz samples decoding `packet` would produce, before trimming:
    /// its own duration, or for a lost packet what concealment would add.
    /// `allow` checks them against the stream's real-time budget first.
    pub(crate) fn samples_for(&self, packet: &[u8]) -> usize {
        match packet_frame(packet) {
            Some(n) => n,
            None => self
                .last_samples
                .min(MAX_CONCEALED_RUN_SAMPLES.saturating_sub(self.lost_run_samples)),
        }
    }

    /// Decodes one packet into `out`. A lost packet (empty, or rejected by
    /// libopus) is replaced by concealment of the previous packet's length
    /// and counted, up to 120 ms a run; past that it is counted as corrupt,
    /// and a long run of them ends the stream.
    pub(crate) fn decode(
        &mut self,
        packet: &[u8],
        discard_end_48k: u32,
        out: &mut Vec<i16>,
        stats: &mut DecoderStats,
    ) -> Result<(), String> {
        let decoded = packet_frame(packet).and_then(|n| {
            self.decoder
                .decode(packet, &mut self.scratch[..n], false)
                .ok()
        });
        let samples = match decoded {
            Some(samples) => {
                stats.packets_decoded += 1;
                self.last_samples = samples;
                self.lost_run_packets = 0;
                self.lost_run_samples = 0;
                samples
            }
            None => {
                self.lost_run_packets += 1;
                if self.lost_run_packets > MAX_LOST_RUN_PACKETS {
                    return Err(format!(
                        "{} empty or undecodable Opus packets in a row",
                        self.lost_run_packets
                    ));
                }
                let conceal = self.samples_for(&[]);
                if conceal == 0 {
                    stats.packets_corrupt += 1;
                    return Ok(());
                }
                stats.packets_concealed += 1;
                self.lost_run_samples += conceal;
                self.decoder
                    .decode(&[], &mut self.scratch[..conceal], false)
                    .unwrap_or(0)
            }
        };
        let discard = (discard_end_48k as usize / OPUS_CLOCK_DIVISOR).min(samples);
        let mut kept = &self.scratch[..samples - discard];
        let skip = self.pre_skip_left.min(kept.len());
        self.pre_skip_left -= skip;
        kept = &kept[skip..];
        out.extend_from_slice(kept);
        Ok(())
    }
}

/// The duration of a packet libopus can decode, at 16 kHz; `None` for a
/// lost one: empty, a bare TOC byte with no frame data (which libopus would
/// only conceal), or an invalid header.
fn packet_frame(packet: &[u8]) -> Option<usize> {
    if packet.len() < 2 {
        return None;
    }
    opus::packet::get_nb_samples(packet, ENGINE_RATE_HZ)
        .ok()
        .filter(|&n| n > 0 && n <= MAX_PACKET_SAMPLES)
}

/// Duration of an Opus packet in 48 kHz samples, from its TOC byte(s).
pub(crate) fn packet_samples_48k(packet: &[u8]) -> Option<u64> {
    opus::packet::get_nb_samples(packet, 48_000)
        .ok()
        .map(|n| n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_bytes(channels: u8, pre_skip: u16, family: u8) -> Vec<u8> {
        let mut v = b"OpusHead".to_vec();
        v.push(1);
        v.push(channels);
        v.extend_from_slice(&pre_skip.to_le_bytes());
        v.extend_from_slice(&48_000u32.to_le_bytes());
        v.extend_from_slice(&0i16.to_le_bytes());
        v.push(family);
        if family != 0 {
            v.extend_from_slice(&[2, 2, 0, 1, 2, 3, 4, 5]);
        }
        v
    }

    #[test]
    fn parses_and_checks_heads() {
        let head = OpusHead::parse(&head_bytes(2, 312, 0)).unwrap();
        assert_eq!(head.channels, 2);
        assert_eq!(head.pre_skip, 312);
        assert!(head.check_supported().is_ok());
        let surround = OpusHead::parse(&head_bytes(6, 0, 1)).unwrap();
        assert!(
            surround
                .check_supported()
                .unwrap_err()
                .contains("multistream")
        );
        assert!(OpusHead::parse(b"OpusHea").is_err());
        assert!(OpusHead::parse(&head_bytes(0, 0, 0)).is_err());
    }

    #[test]
    fn garbage_packets_are_concealed_and_counted() {
        let mut stage = OpusStage::new(&OpusHead::plain(1, 0)).unwrap();
        let mut stats = DecoderStats::default();
        let mut out = Vec::new();
        // TOC 0xFF with code 3 and no frame count byte is invalid.
        stage.decode(&[0xFF], 0, &mut out, &mut stats).unwrap();
        stage.decode(&[], 0, &mut out, &mut stats).unwrap();
        assert_eq!(stats.packets_concealed, 2);
        assert_eq!(stats.packets_decoded, 0);
        assert_eq!(out.len(), 2 * 320);
    }

    #[test]
    fn concealment_stops_at_120_ms_a_run_and_a_long_run_is_corrupt() {
        let mut stage = OpusStage::new(&OpusHead::plain(1, 0)).unwrap();
        let mut stats = DecoderStats::default();
        let mut out = Vec::new();
        for _ in 0..MAX_LOST_RUN_PACKETS {
            stage.decode(&[], 0, &mut out, &mut stats).unwrap();
        }
        // 20 ms a packet, concealed for 6 packets, then nothing.
        assert_eq!(out.len(), MAX_CONCEALED_RUN_SAMPLES);
        assert_eq!(stats.packets_concealed, 6);
        assert_eq!(stats.packets_corrupt, u64::from(MAX_LOST_RUN_PACKETS) - 6);
        let error = stage.decode(&[], 0, &mut out, &mut stats).unwrap_err();
        assert!(error.contains("in a row"), "{error}");
        // A good packet ends a run: the next loss is concealed again.
        let mut stage = OpusStage::new(&OpusHead::plain(1, 0)).unwrap();
        let mut out = Vec::new();
        for _ in 0..10 {
            stage.decode(&[], 0, &mut out, &mut stats).unwrap();
        }
        stage
            .decode(&[0xF8, 0xFF, 0xFE], 0, &mut out, &mut stats)
            .unwrap();
        let before = out.len();
        stage.decode(&[], 0, &mut out, &mut stats).unwrap();
        assert_eq!(out.len() - before, 320);
    }

    #[test]
    fn pre_skip_is_applied_at_16k() {
        let mut stage = OpusStage::new(&OpusHead::plain(1, 312)).unwrap();
        let mut stats = DecoderStats::default();
        let mut out = Vec::new();
        // A 20 ms CELT silence frame: TOC config 31 (FB 20 ms), mono, code 0.
        stage
            .decode(&[0xF8, 0xFF, 0xFE], 0, &mut out, &mut stats)
            .unwrap();
        assert_eq!(stats.packets_decoded, 1);
        assert_eq!(out.len(), 320 - 104);
    }
}
