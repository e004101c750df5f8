//! Zero detection at memory speed.
//!
//! A chunk that was read is cut into granules (4 KiB by default, aligned to
//! the chunk start); runs of all-zero granules become zero runs (never sent or
//! written as data), the rest data runs. Scanning stops at the first non-zero
//! word of a granule, so dense random data costs almost nothing.

#![forbid(unsafe_code)]
/// Default zero-detection granularity.
pub const GRANULE_BYTES: usize = 4096;

/// True if every byte of `buf` is zero.
///
/// ```
/// use diskferry::pipeline::zero::is_zero;
/// assert!(is_zero(&[0u8; 4096]));
/// assert!(!is_zero(&[0, 0, 1]));
/// ```
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    // Compare 16-byte blocks as u128 (the compiler vectorises this), then the tail.
    let (chunks, tail) = buf.as_chunks::<16>();
    // Early exit per 256-byte stripe keeps dense data cheap.
    for stripe in chunks.chunks(16) {
        let mut acc = 0u128;
        for c in stripe {
            acc |= u128::from_ne_bytes(*c);
        }
        if acc != 0 {
            return false;
        }
    }
    tail.iter().all(|&b| b == 0)
}

/// One run of a scanned buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Offset of the run from the start of the scanned buffer.
    pub offset: usize,
    pub len: usize,
    pub zero: bool,
}

/// Split `buf` into alternating data / zero runs at `granule_bytes`
/// granularity (the last granule may be short). Adjacent granules of the
/// same kind merge. `out` is cleared first.
pub fn runs(buf: &[u8], granule_bytes: usize, out: &mut Vec<Run>) {
    assert!(granule_bytes > 0, "granule must be positive");
    out.clear();
    let mut offset = 0usize;
    while offset < buf.len() {
        let end = (offset + granule_bytes).min(buf.len());
        let zero = is_zero(&buf[offset..end]);
        match out.last_mut() {
            Some(last) if last.zero == zero => last.len += end - offset,
            _ => out.push(Run {
                offset,
                len: end - offset,
                zero,
            }),
        }
        offset = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_and_small() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 17]));
        assert!(!is_zero(&[0, 0, 1]));
        let mut v = vec![0u8; 4096 * 3 + 5];
        v[4096 * 3 + 4] = 9;
        let mut out = Vec::new();
        runs(&v, 4096, &mut out);
        assert_eq!(
            out,
            vec![
                Run {
                    offset: 0,
                    len: 4096 * 3,
                    zero: true
                },
                Run {
                    offset: 4096 * 3,
                    len: 5,
                    zero: false
                }
            ]
        );
    }

    proptest! {
        #[test]
        fn is_zero_matches_naive(v in proptest::collection::vec(prop_oneof![9 => Just(0u8), 1 => any::<u8>()], 0..2000)) {
            prop_assert_eq!(is_zero(&v), v.iter().all(|&b| b == 0));
        }

        #[test]
        fn runs_cover_and_classify(
            v in proptest::collection::vec(prop_oneof![20 => Just(0u8), 1 => any::<u8>()], 0..5000),
            granule in 1usize..700,
        ) {
            let mut out = Vec::new();
            runs(&v, granule, &mut out);
            let mut pos = 0;
            for (i, r) in out.iter().enumerate() {
                prop_assert_eq!(r.offset, pos);
                prop_assert!(r.len > 0);
                prop_assert_eq!(is_zero(&v[r.offset..r.offset + r.len]), r.zero || v[r.offset..r.offset + r.len].iter().all(|&b| b == 0));
                if r.zero { prop_assert!(v[r.offset..r.offset + r.len].iter().all(|&b| b == 0)); }
                if i > 0 { prop_assert_ne!(out[i - 1].zero, r.zero); }
                pos += r.len;
            }
            prop_assert_eq!(pos, v.len());
        }
    }
}
