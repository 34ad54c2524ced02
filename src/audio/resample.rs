//! Streaming sample-rate conversion for mono s16 audio.
//!
//! The resampler only ever sees fixed-size blocks, so its output does not
//! depend on how the input was chunked; `finish` flushes the filter delay and
//! trims the output to exactly `ceil(n_in × rate_out / rate_in)` samples.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

/// Mono s16 resampler; a passthrough when the rates are equal.
pub struct StreamResampler {
    rate_in_hz: u32,
    rate_out_hz: u32,
    inner: Option<Fft<f32>>,
    block: Vec<f32>,
    /// Input samples per block (fixed).
    block_len: usize,
    output: Vec<f32>,
    /// Leading output samples that are filter delay, still to drop.
    delay_left: usize,
    samples_in: u64,
    samples_out: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("rate_in_hz", &self.rate_in_hz)
            .field("rate_out_hz", &self.rate_out_hz)
            .field("samples_in", &self.samples_in)
            .field("samples_out", &self.samples_out)
            .finish_non_exhaustive()
    }
}

/// Lowest and highest input rates accepted (telephone to studio).
pub(super) const RATE_RANGE_HZ: std::ops::RangeInclusive<u32> = 4_000..=192_000;

impl StreamResampler {
    /// Builds a resampler; rates outside [`RATE_RANGE_HZ`] are refused.
    pub fn new(rate_in_hz: u32, rate_out_hz: u32) -> Result<Self, String> {
        for rate in [rate_in_hz, rate_out_hz] {
            if !RATE_RANGE_HZ.contains(&rate) {
                return Err(format!(
                    "sample rate {rate} Hz is outside {}..={} Hz",
                    RATE_RANGE_HZ.start(),
                    RATE_RANGE_HZ.end()
                ));
            }
        }
        let inner = if rate_in_hz == rate_out_hz {
            None
        } else {
            // 20 ms blocks keep latency low; the FFT size follows the rates' GCD.
            let block = (rate_in_hz / 50) as usize;
            Some(
                Fft::<f32>::new(
                    rate_in_hz as usize,
                    rate_out_hz as usize,
                    block,
                    1,
                    FixedSync::Input,
                )
                .map_err(|e| {
                    format!("cannot build a {rate_in_hz}→{rate_out_hz} Hz resampler: {e}")
                })?,
            )
        };
        let delay_left = inner.as_ref().map_or(0, Resampler::output_delay);
        let (block_len, output) = match &inner {
            Some(r) => (r.input_frames_next(), vec![0.0; r.output_frames_max()]),
            None => (0, Vec::new()),
        };
        Ok(Self {
            rate_in_hz,
            rate_out_hz,
            inner,
            block: Vec::with_capacity(block_len),
            block_len,
            output,
            delay_left,
            samples_in: 0,
            samples_out: 0,
        })
    }

    pub fn rate_in_hz(&self) -> u32 {
        self.rate_in_hz
    }

    /// Resamples `input`, appending whatever is ready to `out`.
    pub fn push(&mut self, input: &[i16], out: &mut Vec<i16>) {
        self.samples_in += input.len() as u64;
        if self.inner.is_none() {
            out.extend_from_slice(input);
            self.samples_out += input.len() as u64;
            return;
        }
        for &s in input {
            self.block.push(f32::from(s) / 32768.0);
            if self.block.len() == self.block_len {
                self.process_block(None, out);
            }
        }
    }

    /// Flushes the filter and trims the output to the exact expected length.
    pub fn finish(&mut self, out: &mut Vec<i16>) {
        let expected =
            (self.samples_in * u64::from(self.rate_out_hz)).div_ceil(u64::from(self.rate_in_hz));
        if self.inner.is_none() {
            return;
        }
        let mut partial = Some(self.block.len());
        while self.samples_out < expected {
            self.process_block(partial.take().or(Some(0)), out);
        }
        let extra = (self.samples_out - expected) as usize;
        out.truncate(out.len() - extra.min(out.len()));
        self.samples_out = expected;
    }

    fn process_block(&mut self, partial_len: Option<usize>, out: &mut Vec<i16>) {
        let Some(inner) = self.inner.as_mut() else {
            return;
        };
        let frames_in = inner.input_frames_next();
        self.block.resize(frames_in, 0.0);
        let frames_out = inner.output_frames_next();
        let indexing = partial_len.map(|n| rubato::Indexing::new().partial_len(n));
        let produced = InterleavedSlice::new(&self.block[..], 1, frames_in)
            .ok()
            .zip(InterleavedSlice::new_mut(&mut self.output[..], 1, frames_out).ok())
            .and_then(|(input, mut output)| {
                inner
                    .process_into_buffer(&input, &mut output, indexing.as_ref())
                    .ok()
            })
            .map_or(0, |(_, produced)| produced);
        self.block.clear();
        let skip = self.delay_left.min(produced);
        self.delay_left -= skip;
        let ready = &self.output[skip..produced];
        out.extend(
            ready
                .iter()
                .map(|&x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16),
        );
        self.samples_out += ready.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(rate_in: u32, rate_out: u32, input: &[i16], chunk: usize) -> Vec<i16> {
        let mut r = StreamResampler::new(rate_in, rate_out).unwrap();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            r.push(piece, &mut out);
        }
        r.finish(&mut out);
        out
    }

    fn sine(rate: u32, hz: f32, n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| {
                ((i as f32 * hz * std::f32::consts::TAU / rate as f32).sin() * 10_000.0) as i16
            })
            .collect()
    }

    fn rms(samples: &[i16]) -> f64 {
        let sum: f64 = samples.iter().map(|&s| f64::from(s).powi(2)).sum();
        (sum / samples.len().max(1) as f64).sqrt()
    }

    /// Reply audio at 24 kHz going down a telephone line (8 kHz): what is
    /// above the new Nyquist frequency (4 kHz) is filtered out, not folded
    /// into the band a caller hears; what is below passes.
    #[test]
    fn going_down_to_the_telephone_band_does_not_alias() {
        let passed = run(24_000, 8_000, &sine(24_000, 1_000.0, 24_000), 480);
        let folded = run(24_000, 8_000, &sine(24_000, 5_000.0, 24_000), 480);
        // Away from the edges (the filter's ramp).
        let middle = |s: &[i16]| s[800..s.len() - 800].to_vec();
        let (passed, folded) = (rms(&middle(&passed)), rms(&middle(&folded)));
        assert!(passed > 6_000.0, "1 kHz passes: {passed}");
        // 5 kHz would alias to 3 kHz: at least 60 dB down.
        assert!(
            folded < passed / 1_000.0,
            "5 kHz leaks: {folded} vs {passed}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn length_is_kept(rate_in in prop::sample::select(vec![8_000u32, 11_025, 22_050, 24_000, 44_100, 48_000]),
                          n in 0usize..20_000, chunk in 1usize..5_000) {
            let out = run(rate_in, 16_000, &vec![100; n], chunk);
            let expected = (n as u64 * 16_000).div_ceil(u64::from(rate_in)) as usize;
            prop_assert_eq!(out.len(), expected);
        }

        #[test]
        fn identity_at_equal_rates(input in prop::collection::vec(any::<i16>(), 0..4_000), chunk in 1usize..500) {
            prop_assert_eq!(run(16_000, 16_000, &input, chunk), input);
        }

        #[test]
        fn output_does_not_depend_on_chunking(seed in any::<u64>(), a in 1usize..3_000, b in 1usize..3_000) {
            let input: Vec<i16> = (0..9_000u64).map(|i| ((i.wrapping_mul(seed | 1) >> 7) as i16) / 4).collect();
            prop_assert_eq!(run(44_100, 16_000, &input, a), run(44_100, 16_000, &input, b));
        }
    }

    #[test]
    fn a_tone_keeps_its_level_and_timing() {
        // 440 Hz at 48 kHz → 16 kHz must match a 440 Hz tone generated at
        // 16 kHz, within a fraction of a sample.
        let out = run(48_000, 16_000, &sine(48_000, 440.0, 48_000), 960);
        let (best_offset, best_snr) = (-12..=12)
            .map(|twelfths| {
                let offset = f64::from(twelfths) / 12.0;
                let (mut signal, mut noise) = (0f64, 0f64);
                for (i, o) in out.iter().enumerate().skip(400).take(15_000) {
                    let t = (i as f64 - offset) * 440.0 * std::f64::consts::TAU / 16_000.0;
                    let e = t.sin() * 10_000.0;
                    signal += e * e;
                    noise += (f64::from(*o) - e).powi(2);
                }
                (offset, 10.0 * (signal / noise).log10())
            })
            .fold(
                (0.0, f64::MIN),
                |best, x| if x.1 > best.1 { x } else { best },
            );
        assert!(
            best_snr > 40.0,
            "snr {best_snr:.1} dB at offset {best_offset}"
        );
        assert!(best_offset.abs() <= 0.5, "offset {best_offset} samples");
    }

    #[test]
    fn out_of_range_rates_are_refused() {
        assert!(StreamResampler::new(1_000, 16_000).is_err());
        assert!(StreamResampler::new(16_000, 500_000).is_err());
    }
}
