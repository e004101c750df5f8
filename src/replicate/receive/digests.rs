//! DIGEST_REQUEST in a delta job: the receiver digests its target block by
//! block (`wire::block_digest`, XXH3-128) and answers with DIGESTS; the
//! sender then sends only the blocks that differ (`send/delta.rs`).
//!
//! Bounded whatever the peer asks: the state machine checked the request
//! (at most [`DIGEST_REQUEST_MAX_BYTES`], blocks a power of two within
//! [`DIGEST_BLOCK_MIN_BYTES`]..=[`DIGEST_BLOCK_MAX_BYTES`], inside the
//! image); the target is read in pieces of at most [`DIGEST_READ_BYTES`]
//! into one buffer, and only its data extents are read: a hole's blocks
//! get the digest of zeros without a read.

#![forbid(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes read from the target at a time.
pub const DIGEST_READ_BYTES: usize = 1 << 20;
/// Most bytes one request covers.
pub const DIGEST_REQUEST_MAX_BYTES: u32 = 32 << 20;
/// Smallest and largest block.
pub const DIGEST_BLOCK_MIN_BYTES: u32 = 4 << 10;
pub const DIGEST_BLOCK_MAX_BYTES: u32 = 1 << 20;

/// Why a request is refused (before anything is read).
pub fn check_request(
    offset: u64,
    len_bytes: u32,
    block_bytes: u32,
    size_bytes: u64,
) -> Result<(), String> {
    if len_bytes == 0 || len_bytes > DIGEST_REQUEST_MAX_BYTES {
        return Err(format!(
            "DIGEST_REQUEST for {len_bytes} bytes: a request covers 1 to \
             {DIGEST_REQUEST_MAX_BYTES} bytes"
        ));
    }
    if !block_bytes.is_power_of_two()
        || !(DIGEST_BLOCK_MIN_BYTES..=DIGEST_BLOCK_MAX_BYTES).contains(&block_bytes)
    {
        return Err(format!(
            "DIGEST_REQUEST with {block_bytes}-byte blocks: a block is a power of two from \
             {DIGEST_BLOCK_MIN_BYTES} to {DIGEST_BLOCK_MAX_BYTES} bytes"
        ));
    }
    match offset.checked_add(u64::from(len_bytes)) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(format!(
            "DIGEST_REQUEST past the end of the target: offset {offset} + {len_bytes} bytes \
             is beyond the image size {size_bytes}"
        )),
    }
}

/// Why no digests came.
#[derive(Debug)]
pub enum DigestReadError {
    /// The receiver is shutting down.
    Stopped,
    /// Mapping or reading the target failed.
    Io(io::Error),
}

/// The target as the digests read it.
pub trait BlockSource {
    /// The data (allocated) ranges of `[offset, offset + len)`, sorted;
    /// everything else reads as zeros.
    fn data_extents(&self, offset: u64, len: u64, out: &mut Vec<(u64, u64)>) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl BlockSource for super::target::TargetFile {
    fn data_extents(&self, offset: u64, len: u64, out: &mut Vec<(u64, u64)>) -> io::Result<()> {
        super::target::TargetFile::data_extents(self, offset, len, out)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::target::TargetFile::read_at(self, buf, offset)
    }
}

/// The block digests of `[offset, offset + len_bytes)` of `target` (the
/// last block may be short), for a request [`check_request`] accepted.
pub fn digest_blocks(
    target: &impl BlockSource,
    (offset, len_bytes, block_bytes): (u64, u32, u32),
    stop: &AtomicBool,
    digest: impl Fn(&[u8]) -> [u8; 16],
) -> Result<Vec<[u8; 16]>, DigestReadError> {
    let block = block_bytes as usize;
    let len = len_bytes as usize;
    let mut digests = Vec::with_capacity(len.div_ceil(block));
    let mut extents = Vec::new();
    target
        .data_extents(offset, u64::from(len_bytes), &mut extents)
        .map_err(DigestReadError::Io)?;
    // Whole blocks per piece (a block is at most a piece).
    let piece_bytes = DIGEST_READ_BYTES.max(block) / block * block;
    let mut buf = vec![0u8; piece_bytes.min(len)];
    let mut zero_digests: Vec<(usize, [u8; 16])> = Vec::new();
    let mut done = 0usize;
    while done < len {
        if stop.load(Ordering::Relaxed) {
            return Err(DigestReadError::Stopped);
        }
        let n = piece_bytes.min(len - done);
        let at = offset + done as u64;
        let piece = &mut buf[..n];
        // The data in this piece, relative to it.
        let data: Vec<(usize, usize)> = extents
            .iter()
            .filter_map(|&(e_off, e_len)| {
                let s = e_off.max(at);
                let e = (e_off + e_len).min(at + n as u64);
                (s < e).then(|| ((s - at) as usize, (e - at) as usize))
            })
            .collect();
        piece.fill(0);
        for &(s, e) in &data {
            target
                .read_at(&mut piece[s..e], at + s as u64)
                .map_err(DigestReadError::Io)?;
        }
        for (i, b) in piece.chunks(block).enumerate() {
            let (bs, be) = (i * block, i * block + b.len());
            let has_data = data.iter().any(|&(s, e)| s < be && bs < e);
            let d = if has_data {
                digest(b)
            } else if let Some((_, d)) = zero_digests.iter().find(|(l, _)| *l == b.len()) {
                *d
            } else {
                let d = digest(b);
                zero_digests.push((b.len(), d));
                d
            };
            digests.push(d);
        }
        done += n;
    }
    Ok(digests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(bytes: &[u8]) -> [u8; 16] {
        twox_hash::XxHash3_128::oneshot(bytes).to_le_bytes()
    }

    /// A target in memory with declared data extents.
    struct Mem {
        bytes: Vec<u8>,
        extents: Vec<(u64, u64)>,
        reads: std::cell::Cell<usize>,
    }

    impl BlockSource for Mem {
        fn data_extents(&self, offset: u64, len: u64, out: &mut Vec<(u64, u64)>) -> io::Result<()> {
            out.clear();
            for &(s, l) in &self.extents {
                let (a, b) = (s.max(offset), (s + l).min(offset + len));
                if a < b {
                    out.push((a, b - a));
                }
            }
            Ok(())
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.set(self.reads.get() + buf.len());
            let o = offset as usize;
            buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn digests_are_those_of_each_block_and_holes_are_not_read() {
        let size = 5usize << 20;
        let mut bytes = vec![0u8; size];
        for (i, b) in bytes[(1 << 20)..(1 << 20) + 300_000].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let target = Mem {
            bytes: bytes.clone(),
            extents: vec![(1 << 20, 300_000)],
            reads: std::cell::Cell::new(0),
        };
        let stop = AtomicBool::new(false);
        let (offset, len, block) = (65536u64, (4u32 << 20) + 1000, 65536u32);
        check_request(offset, len, block, size as u64).unwrap();
        let got = digest_blocks(&target, (offset, len, block), &stop, digest).unwrap();
        let want: Vec<_> = bytes[offset as usize..offset as usize + len as usize]
            .chunks(block as usize)
            .map(digest)
            .collect();
        assert_eq!(got, want);
        assert_eq!(target.reads.get(), 300_000, "only the data extent is read");
        stop.store(true, Ordering::Relaxed);
        let stopped = digest_blocks(&target, (offset, len, block), &stop, digest);
        assert!(matches!(stopped, Err(DigestReadError::Stopped)));
    }

    #[test]
    fn requests_out_of_bounds_are_refused_with_the_bound() {
        let size = 1u64 << 30;
        assert!(check_request(0, 32 << 20, 4096, size).is_ok());
        assert!(check_request(0, 1, 1 << 20, size).is_ok());
        let e = check_request(0, (32 << 20) + 1, 4096, size).unwrap_err();
        assert!(e.contains("33554432"), "{e}");
        assert!(check_request(0, 0, 4096, size).is_err());
        assert!(check_request(0, 4096, 2048, size).is_err());
        assert!(check_request(0, 4096, 2 << 20, size).is_err());
        assert!(check_request(0, 4096, 12288, size).is_err());
        assert!(check_request(size - 4096, 8192, 4096, size).is_err());
        assert!(check_request(u64::MAX, 8192, 4096, size).is_err());
    }
}
