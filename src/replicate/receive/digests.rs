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

use super::events::{Action, End, JobInfo};
use super::job::Refusal;
use super::limits::RANGES_PER_STREAM_MAX;
use crate::journal::RangeSet;
use crate::wire::{ErrorCode, Frame, PassMode};

/// A DIGEST_REQUEST `(offset, len_bytes, block_bytes)`.
pub type DigestSpan = (u64, u32, u32);

fn refuse(code: ErrorCode, message: String) -> End {
    End::Refuse(Refusal::new(code, message))
}

/// The action a DIGEST_REQUEST asks for on a stream of `job`, or why it
/// is refused (only a delta pass asks; the span within the image).
pub fn request(job: &JobInfo, span: DigestSpan) -> Result<Action, End> {
    if job.mode != PassMode::Delta {
        return Err(refuse(
            ErrorCode::Protocol,
            format!(
                "DIGEST_REQUEST on a {} pass: only delta passes ask for digests",
                job.mode
            ),
        ));
    }
    let (offset, len_bytes, block_bytes) = span;
    check_request(offset, len_bytes, block_bytes, job.size_bytes)
        .map_err(|m| refuse(ErrorCode::BadRequest, m))?;
    Ok(Action::ReadDigests {
        offset,
        len_bytes,
        block_bytes,
    })
}

/// The DIGESTS frame answering `span` with what the read gave; the range
/// is noted in `compared`.
pub fn answer(
    span: DigestSpan,
    result: Result<(Vec<[u8; 16]>, u64), DigestReadError>,
    compared: &mut Compared,
    target_name: &str,
) -> Result<Frame, End> {
    let (offset, len_bytes, block_bytes) = span;
    let (digests, sync_point) = match result {
        Ok(read) => read,
        Err(DigestReadError::Stopped) => return Err(End::Stopped),
        Err(DigestReadError::Io(e)) => {
            return Err(refuse(
                ErrorCode::TargetIo,
                format!("reading target {target_name:?} for its block digests failed: {e}"),
            ));
        }
    };
    let want = crate::wire::pass::digest_count(len_bytes, block_bytes) as usize;
    if digests.len() != want {
        return Err(refuse(
            ErrorCode::Internal,
            format!("{} digests for {want} blocks (a bug)", digests.len()),
        ));
    }
    compared
        .add(offset, len_bytes, sync_point)
        .map_err(|m| refuse(ErrorCode::Protocol, m))?;
    Ok(Frame::Digests {
        offset,
        block_bytes,
        digests,
    })
}

/// Bytes read from the target at a time.
pub const DIGEST_READ_BYTES: usize = 1 << 20;
/// Most bytes one request covers (the wire's bound, checked again here).
pub const DIGEST_REQUEST_MAX_BYTES: u32 = crate::wire::pass::MAX_DIGEST_SPAN_BYTES;
/// Smallest and largest block.
pub const DIGEST_BLOCK_MIN_BYTES: u32 = crate::wire::pass::MIN_DIGEST_BLOCK_BYTES;
pub const DIGEST_BLOCK_MAX_BYTES: u32 = crate::wire::pass::MAX_DIGEST_BLOCK_BYTES;

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
/// `buf` is the stream's read buffer (grown to at most
/// [`DIGEST_READ_BYTES`]).
pub fn digest_blocks(
    target: &impl BlockSource,
    (offset, len_bytes, block_bytes): (u64, u32, u32),
    stop: &AtomicBool,
    buf: &mut Vec<u8>,
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
    if buf.len() < piece_bytes.min(len) {
        buf.resize(piece_bytes.min(len), 0);
    }
    let mut zeros = ZeroDigests::default();
    let mut done = 0usize;
    while done < len {
        if stop.load(Ordering::Relaxed) {
            return Err(DigestReadError::Stopped);
        }
        let n = piece_bytes.min(len - done);
        let at = offset + done as u64;
        // The data in this piece, relative to it (sorted, disjoint).
        let data: Vec<(usize, usize)> = extents
            .iter()
            .filter_map(|&(e_off, e_len)| {
                let s = e_off.max(at);
                let e = (e_off + e_len).min(at + n as u64);
                (s < e).then(|| ((s - at) as usize, (e - at) as usize))
            })
            .collect();
        if data.is_empty() {
            // A hole: its blocks read as zeros; nothing is read or touched.
            let mut b = 0;
            while b < n {
                let l = block.min(n - b);
                digests.push(zeros.of(l, &digest));
                b += l;
            }
            done += n;
            continue;
        }
        let piece = &mut buf[..n];
        let mut gap = 0;
        for &(s, e) in &data {
            piece[gap..s].fill(0);
            target
                .read_at(&mut piece[s..e], at + s as u64)
                .map_err(DigestReadError::Io)?;
            gap = e;
        }
        piece[gap..].fill(0);
        for (i, b) in piece.chunks(block).enumerate() {
            let (bs, be) = (i * block, i * block + b.len());
            let has_data = data.iter().any(|&(s, e)| s < be && bs < e);
            digests.push(if has_data {
                digest(b)
            } else {
                zeros.of(b.len(), &digest)
            });
        }
        done += n;
    }
    Ok(digests)
}

/// The digests of all-zero blocks, by length (a block and, at most, a
/// short last one).
#[derive(Default)]
struct ZeroDigests(Vec<(usize, [u8; 16])>);

impl ZeroDigests {
    fn of(&mut self, len: usize, digest: &impl Fn(&[u8]) -> [u8; 16]) -> [u8; 16] {
        if let Some((_, d)) = self.0.iter().find(|(l, _)| *l == len) {
            return *d;
        }
        let d = digest(&vec![0u8; len]);
        self.0.push((len, d));
        d
    }
}

/// The ranges a stream compared since its last BARRIER, and the flush that
/// covers the bytes read for them. They count as written (the target's
/// bytes there are what the sender wants, once it sent its corrections)
/// only at the stream's next BARRIER or DONE: the sender sends every
/// correction of a range before either, and a stream that just ends
/// counts none of them.
#[derive(Debug, Default)]
pub struct Compared {
    ranges: RangeSet,
    sync_need: u64,
}

impl Compared {
    /// `[offset, offset + len_bytes)` was read, and flush number
    /// `sync_point` covers what was read. Refused past the stream's cap on
    /// ranges (a sender barriers every 256 MiB or second).
    pub fn add(&mut self, offset: u64, len_bytes: u32, sync_point: u64) -> Result<(), String> {
        self.ranges.insert(offset, u64::from(len_bytes));
        self.sync_need = self.sync_need.max(sync_point);
        if self.ranges.len() > RANGES_PER_STREAM_MAX {
            return Err(format!(
                "this stream compared {} separate ranges since its last BARRIER, more than \
                 the receiver allows ({RANGES_PER_STREAM_MAX})",
                self.ranges.len()
            ));
        }
        Ok(())
    }

    /// The ranges and the flush that covers them, emptied.
    pub fn take(&mut self) -> Option<(Vec<(u64, u64)>, u64)> {
        if self.ranges.is_empty() {
            return None;
        }
        let ranges = std::mem::take(&mut self.ranges).iter().collect();
        Some((ranges, self.sync_need))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(bytes: &[u8]) -> [u8; 16] {
        crate::wire::block_digest(bytes)
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
        // The stream's buffer holds what an earlier request read.
        let mut buf = vec![0xff; DIGEST_READ_BYTES];
        let got = digest_blocks(&target, (offset, len, block), &stop, &mut buf, digest).unwrap();
        let want: Vec<_> = bytes[offset as usize..offset as usize + len as usize]
            .chunks(block as usize)
            .map(digest)
            .collect();
        assert_eq!(got, want);
        assert_eq!(target.reads.get(), 300_000, "only the data extent is read");
        assert_eq!(buf.len(), DIGEST_READ_BYTES, "one buffer of 1 MiB");
        stop.store(true, Ordering::Relaxed);
        let stopped = digest_blocks(&target, (offset, len, block), &stop, &mut buf, digest);
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

#[cfg(test)]
mod compared_tests {
    use super::*;

    #[test]
    fn compared_ranges_merge_and_keep_the_latest_flush() {
        let mut c = Compared::default();
        assert!(c.take().is_none());
        c.add(0, 4096, 3).unwrap();
        c.add(4096, 4096, 2).unwrap();
        c.add(1 << 20, 4096, 5).unwrap();
        assert_eq!(c.take(), Some((vec![(0, 8192), (1 << 20, 4096)], 5)));
        assert!(c.take().is_none());
        for i in 0..RANGES_PER_STREAM_MAX as u64 {
            c.add(i * 8192, 4096, 1).unwrap();
        }
        let e = c.add(u64::MAX / 2, 4096, 1).unwrap_err();
        assert!(e.contains("BARRIER"), "{e}");
    }
}
