//! WAV files in and out (mono or interleaved s16 in memory).

use std::path::Path;

/// Audio read from a WAV file, as s16 whatever the file's sample format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WavAudio {
    pub rate_hz: u32,
    pub channels: u16,
    /// Interleaved when `channels > 1`.
    pub samples: Vec<i16>,
}

impl WavAudio {
    /// Little-endian bytes of the samples, as a PCM stream would carry them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.samples.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    pub fn duration_ms(&self) -> u64 {
        self.samples.len() as u64 * 1000
            / (u64::from(self.rate_hz) * u64::from(self.channels.max(1)))
    }
}

/// Reads 8/16/24/32-bit integer or 32-bit float WAV into s16.
pub fn read(path: &Path) -> Result<WavAudio, String> {
    let mut reader =
        hound::WavReader::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let spec = reader.spec();
    let bad = |e: hound::Error| format!("{}: {e}", path.display());
    let samples: Vec<i16> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, 16) => reader
            .samples::<i16>()
            .collect::<Result<_, _>>()
            .map_err(bad)?,
        (hound::SampleFormat::Int, bits @ (8 | 24 | 32)) => reader
            .samples::<i32>()
            .map(|s| {
                s.map(|v| {
                    if bits == 8 {
                        (v << 8) as i16
                    } else {
                        (v >> (bits - 16)) as i16
                    }
                })
            })
            .collect::<Result<_, _>>()
            .map_err(bad)?,
        (hound::SampleFormat::Float, 32) => reader
            .samples::<f32>()
            .map(|s| s.map(|v| (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16))
            .collect::<Result<_, _>>()
            .map_err(bad)?,
        (format, bits) => {
            return Err(format!(
                "{}: {bits}-bit {format:?} WAV is not supported",
                path.display()
            ));
        }
    };
    Ok(WavAudio {
        rate_hz: spec.sample_rate,
        channels: spec.channels,
        samples,
    })
}

/// Writes mono s16 samples as a 16-bit PCM WAV file.
pub fn write_mono(path: &Path, rate_hz: u32, samples: &[i16]) -> Result<(), String> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate_hz,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let fail = |e: hound::Error| format!("{}: {e}", path.display());
    let mut writer = hound::WavWriter::create(path, spec).map_err(fail)?;
    let mut samples_writer = writer.get_i16_writer(samples.len() as u32);
    for &s in samples {
        samples_writer.write_sample(s);
    }
    samples_writer.flush().map_err(fail)?;
    writer.finalize().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let path = std::env::temp_dir().join(format!("sonora-wav-{}.wav", std::process::id()));
        let samples: Vec<i16> = (0..1000).map(|i| (i * 37 % 2000 - 1000) as i16).collect();
        write_mono(&path, 16_000, &samples).unwrap();
        let back = read(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(
            back,
            WavAudio {
                rate_hz: 16_000,
                channels: 1,
                samples
            }
        );
        assert_eq!(back.duration_ms(), 62);
    }
}
