//! G.711 μ-law, the telephone network's 8-bit audio (ITU-T G.711, the
//! 16-bit form of the Sun/CCITT reference encoder): 8 kHz, one byte per
//! sample, 0xFF for silence.

/// Added to a magnitude before encoding.
const BIAS: i32 = 0x84;
/// The largest magnitude encoded; louder samples clip to it.
const CLIP: i32 = 32_635;

/// Every byte's sample, computed once at compile time.
const DECODE: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut byte = 0;
    while byte < 256 {
        let inverted = !(byte as u8);
        let exponent = ((inverted >> 4) & 0x07) as i32;
        let mantissa = (inverted & 0x0F) as i32;
        let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
        table[byte] = if inverted & 0x80 != 0 {
            -magnitude as i16
        } else {
            magnitude as i16
        };
        byte += 1;
    }
    table
};

/// The sample a μ-law byte stands for.
pub fn decode(byte: u8) -> i16 {
    DECODE[usize::from(byte)]
}

/// The μ-law byte for a 16-bit sample.
pub fn encode(sample: i16) -> u8 {
    let value = i32::from(sample);
    let sign = if value < 0 { 0x80 } else { 0 };
    let magnitude = value.abs().min(CLIP) + BIAS;
    // The segment: where the highest set bit sits above bit 7.
    let exponent = (31 - magnitude.leading_zeros() as i32 - 7).clamp(0, 7);
    let mantissa = (magnitude >> (exponent + 3)) & 0x0F;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "sign | exponent | mantissa fits one byte"
    )]
    let byte = (sign | (exponent << 4) | mantissa) as u8;
    !byte
}

/// Decodes μ-law bytes, appending 16-bit samples to `out`.
pub fn decode_into(bytes: &[u8], out: &mut Vec<i16>) {
    out.extend(bytes.iter().map(|&b| decode(b)));
}

/// Decodes μ-law bytes, appending 16-bit little-endian samples to `out`.
pub fn decode_le_into(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend(bytes.iter().flat_map(|&b| decode(b).to_le_bytes()));
}

/// Encodes 16-bit samples, appending μ-law bytes to `out`.
pub fn encode_into(samples: &[i16], out: &mut Vec<u8>) {
    out.extend(samples.iter().map(|&s| encode(s)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standards_fixed_points() {
        // Silence, and the negative zero.
        assert_eq!(encode(0), 0xFF);
        assert_eq!(decode(0xFF), 0);
        assert_eq!(decode(0x7F), 0);
        // Full scale both ways, and clipping beyond it.
        assert_eq!(decode(0x80), 32_124);
        assert_eq!(decode(0x00), -32_124);
        assert_eq!(encode(i16::MAX), 0x80);
        assert_eq!(encode(i16::MIN), 0x00);
        // Segment ends of the reference encoder (values from g711.c).
        assert_eq!(encode(1), 0xFF);
        assert_eq!(encode(-1), 0x7F);
        assert_eq!(encode(100), 0xF2);
        assert_eq!(encode(1000), 0xCE);
        assert_eq!(encode(-1000), 0x4E);
        assert_eq!(decode(0xCE), 988);
        assert_eq!(decode(0xF2), 104);
    }

    #[test]
    fn little_endian_decoding_is_the_same_samples() {
        let mut samples = Vec::new();
        let mut bytes = Vec::new();
        let all: Vec<u8> = (0..=255).collect();
        decode_into(&all, &mut samples);
        decode_le_into(&all, &mut bytes);
        let again: Vec<i16> = crate::audio::samples_from_le(&bytes).collect();
        assert_eq!(again, samples);
    }

    #[test]
    fn every_code_survives_a_round_trip() {
        for byte in 0..=255u8 {
            let sample = decode(byte);
            let again = encode(sample);
            // The two zeros both come back as the positive one.
            if sample == 0 {
                assert_eq!(again, 0xFF);
            } else {
                assert_eq!(again, byte, "{byte:#04x} -> {sample}");
            }
        }
    }

    #[test]
    fn the_error_stays_within_the_step_of_each_segment() {
        for sample in (i16::MIN..=i16::MAX).step_by(7) {
            let back = i32::from(decode(encode(sample)));
            let value = i32::from(sample).clamp(-CLIP, CLIP);
            // The step doubles per segment: at most 1/16 of the magnitude
            // plus the bias region.
            let allowed = (value.abs() + BIAS) / 16 + 8;
            assert!((back - value).abs() <= allowed, "{sample} -> {back}");
        }
    }
}
