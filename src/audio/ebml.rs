//! EBML variable-length integers, the building block of WebM/Matroska.
//!
//! Every reader here works on a slice that may end early: `Ok(None)` means
//! "need more bytes", never an error, so the push demuxer can wait for the
//! next network chunk.

/// Why a byte sequence is not valid EBML. The demuxer turns it into a
/// sticky `Corrupt` error for the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VintError {
    /// The first byte has no length marker in the first four bits (an ID
    /// longer than 4 bytes) or is zero (a size longer than 8 bytes).
    BadLength(u8),
}

/// Length of a vint from its first byte, `None` when the marker is absent
/// within `max_len` bytes.
fn vint_len(first: u8, max_len: u32) -> Option<usize> {
    let len = first.leading_zeros() + 1;
    (len <= max_len).then_some(len as usize)
}

/// Reads an element ID (1–4 bytes, marker bits kept, as Matroska writes IDs).
pub(crate) fn read_id(buf: &[u8]) -> Result<Option<(u32, usize)>, VintError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let len = vint_len(first, 4).ok_or(VintError::BadLength(first))?;
    if buf.len() < len {
        return Ok(None);
    }
    let id = buf[..len]
        .iter()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    Ok(Some((id, len)))
}

/// An element's data size: known, or "unknown" (all value bits set), which
/// live WebM uses for the Segment and every Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Size {
    Known(u64),
    Unknown,
}

/// Reads an element data size (1–8 bytes, marker bit removed).
pub(crate) fn read_size(buf: &[u8]) -> Result<Option<(Size, usize)>, VintError> {
    let Some((value, len)) = read_vint(buf)? else {
        return Ok(None);
    };
    let all_ones = (1u64 << (7 * len)) - 1;
    let size = if value == all_ones {
        Size::Unknown
    } else {
        Size::Known(value)
    };
    Ok(Some((size, len)))
}

/// Reads an unsigned vint (1–8 bytes) with the marker bit removed.
pub(crate) fn read_vint(buf: &[u8]) -> Result<Option<(u64, usize)>, VintError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let len = vint_len(first, 8).ok_or(VintError::BadLength(first))?;
    if buf.len() < len {
        return Ok(None);
    }
    let marker_cleared = if len == 8 {
        0
    } else {
        u64::from(first) & (0xFF >> len)
    };
    let value = buf[1..len]
        .iter()
        .fold(marker_cleared, |acc, &b| (acc << 8) | u64::from(b));
    Ok(Some((value, len)))
}

/// Reads a signed vint as used by EBML lacing: the unsigned value minus the
/// bias `2^(7n-1) - 1`.
pub(crate) fn read_signed_vint(buf: &[u8]) -> Result<Option<(i64, usize)>, VintError> {
    let Some((value, len)) = read_vint(buf)? else {
        return Ok(None);
    };
    let bias = (1i64 << (7 * len - 1)) - 1;
    // `value < 2^56`, so the cast cannot wrap.
    Ok(Some((value as i64 - bias, len)))
}

/// Big-endian unsigned integer element payload (0–8 bytes).
pub(crate) fn read_uint(data: &[u8]) -> Option<u64> {
    (data.len() <= 8).then(|| data.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

/// Iterates over the child elements of a fully buffered master element.
/// Children with unknown sizes or sizes past the end stop the walk with an
/// error message.
pub(crate) fn children(mut data: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8]), String>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let parsed = (|| {
            let (id, id_len) = read_id(data)
                .map_err(|e| format!("{e:?}"))?
                .ok_or("element ID cut short")?;
            let (size, size_len) = read_size(&data[id_len..])
                .map_err(|e| format!("{e:?}"))?
                .ok_or("element size cut short")?;
            let Size::Known(size) = size else {
                return Err(format!("child element {id:#X} of unknown size"));
            };
            let start = id_len + size_len;
            let end = usize::try_from(size)
                .ok()
                .and_then(|s| start.checked_add(s))
                .filter(|&end| end <= data.len())
                .ok_or_else(|| {
                    format!("child element {id:#X} of {size} bytes overruns its parent")
                })?;
            let body = &data[start..end];
            data = &data[end..];
            Ok((id, body))
        })();
        if parsed.is_err() {
            data = &[];
        }
        Some(parsed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_their_marker_bits() {
        assert_eq!(
            read_id(&[0x1A, 0x45, 0xDF, 0xA3]),
            Ok(Some((0x1A45_DFA3, 4)))
        );
        assert_eq!(read_id(&[0xA3]), Ok(Some((0xA3, 1))));
        assert_eq!(read_id(&[0x1A, 0x45]), Ok(None));
        assert_eq!(read_id(&[0x08]), Err(VintError::BadLength(0x08)));
        assert_eq!(read_id(&[]), Ok(None));
    }

    #[test]
    fn sizes_of_every_length_and_unknown() {
        assert_eq!(read_size(&[0x81]), Ok(Some((Size::Known(1), 1))));
        assert_eq!(read_size(&[0x40, 0x02]), Ok(Some((Size::Known(2), 2))));
        assert_eq!(read_size(&[0xFF]), Ok(Some((Size::Unknown, 1))));
        assert_eq!(
            read_size(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Ok(Some((Size::Unknown, 8)))
        );
        // 2^50 declared: parsed as a number, nothing allocated.
        let huge = [0x01, 0x04, 0, 0, 0, 0, 0, 0];
        assert_eq!(read_size(&huge), Ok(Some((Size::Known(1 << 50), 8))));
        assert_eq!(read_size(&[0x00]), Err(VintError::BadLength(0)));
        assert_eq!(read_size(&[0x01, 0x00]), Ok(None));
    }

    #[test]
    fn signed_vints_for_lacing() {
        // 1-byte: bias 63.
        assert_eq!(read_signed_vint(&[0x80 | 63]), Ok(Some((0, 1))));
        assert_eq!(read_signed_vint(&[0x80]), Ok(Some((-63, 1))));
        // 2-byte: bias 8191.
        assert_eq!(read_signed_vint(&[0x60, 0x00]), Ok(Some((1, 2))));
    }

    #[test]
    fn children_walk_and_overrun() {
        let data = [0xD7, 0x81, 0x01, 0x83, 0x81, 0x02];
        let kids: Vec<_> = children(&data).collect::<Result<_, _>>().unwrap();
        assert_eq!(kids, vec![(0xD7, &[1u8][..]), (0x83, &[2u8][..])]);
        let bad = [0xD7, 0x85, 0x01];
        let mut it = children(&bad);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }
}
