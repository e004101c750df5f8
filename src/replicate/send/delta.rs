//! `send --delta`, its sans-IO core: which parts of a window cross the
//! wire once the receiver told the digests of its target's blocks.
//!
//! A window's source bytes are cut into blocks of `block_bytes` (the last
//! one may be short), each block's XXH3-128 compared with the target's
//! ([`crate::wire::block_digest`]'s). Equal blocks are skipped; runs of
//! differing blocks are sent as the source has them: its data runs as
//! DATA, its zero runs as ZERO (a source hole over target data must be
//! zeroed). No I/O here: the sender thread (`sender.rs`) asks for the
//! digests and sends the pieces.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use crate::pipeline::sink::SinkRun;

/// Most bytes one digest request covers (the wire's bound).
pub const DIGEST_REQUEST_MAX_BYTES: u32 = crate::wire::pass::MAX_DIGEST_SPAN_BYTES;

/// Why a digest reply cannot be used (a receiver bug: the job fails).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error(
        "the receiver sent {got} block digests for {len_bytes} bytes in blocks of \
         {block_bytes} bytes, which are {want} blocks"
    )]
    DigestCount {
        got: usize,
        want: usize,
        len_bytes: u64,
        block_bytes: u32,
    },
    #[error(
        "the receiver answered for {got_offset}+{got_block_bytes}-byte blocks where \
         {want_offset}+{want_block_bytes}-byte blocks were asked for"
    )]
    WrongReply {
        got_offset: u64,
        got_block_bytes: u32,
        want_offset: u64,
        want_block_bytes: u32,
    },
}

/// The source side of one digest request.
#[derive(Debug, Clone, Copy)]
pub enum SourceBytes<'a> {
    /// A window that was read: its bytes and its data / zero runs (which
    /// cover it, in order).
    Read {
        bytes: &'a [u8],
        runs: &'a [SinkRun],
    },
    /// `len_bytes` of a source hole.
    Zeros { len_bytes: u32 },
}

impl SourceBytes<'_> {
    pub fn len_bytes(&self) -> u32 {
        match self {
            SourceBytes::Read { bytes, .. } => {
                u32::try_from(bytes.len()).expect("a window is at most 32 MiB")
            }
            SourceBytes::Zeros { len_bytes } => *len_bytes,
        }
    }
}

/// One piece to send, at `rel` bytes from the request's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// DATA with the source's bytes.
    Data { rel: u32, len: u32 },
    /// ZERO.
    Zero { rel: u32, len: u32 },
}

impl Piece {
    #[cfg(test)]
    pub fn range(&self) -> (u32, u32) {
        match *self {
            Piece::Data { rel, len } | Piece::Zero { rel, len } => (rel, len),
        }
    }
}

/// What to send for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaPlan {
    /// In ascending order, disjoint.
    pub pieces: Vec<Piece>,
    /// Bytes of the blocks that differ.
    pub bytes_changed: u64,
}

/// Checks that a digest reply answers the request `(offset, len_bytes,
/// block_bytes)`.
pub fn check_reply(
    (offset, len_bytes, block_bytes): (u64, u32, u32),
    (got_offset, got_block_bytes): (u64, u32),
    digests: usize,
) -> Result<(), DeltaError> {
    if (got_offset, got_block_bytes) != (offset, block_bytes) {
        return Err(DeltaError::WrongReply {
            got_offset,
            got_block_bytes,
            want_offset: offset,
            want_block_bytes: block_bytes,
        });
    }
    let want = len_bytes.div_ceil(block_bytes.max(1)) as usize;
    if digests != want {
        return Err(DeltaError::DigestCount {
            got: digests,
            want,
            len_bytes: u64::from(len_bytes),
            block_bytes,
        });
    }
    Ok(())
}

/// Compares `source` with the target's block digests `target` (one per
/// `block_bytes` block, the last one may be short) and says what to send.
/// `digest` is the block digest ([`crate::wire::block_digest`]).
pub fn plan_delta(
    source: SourceBytes<'_>,
    block_bytes: u32,
    target: &[[u8; 16]],
    digest: impl Fn(&[u8]) -> [u8; 16],
) -> Result<DeltaPlan, DeltaError> {
    let len = source.len_bytes();
    let block = block_bytes.max(1);
    let want = len.div_ceil(block) as usize;
    if target.len() != want {
        return Err(DeltaError::DigestCount {
            got: target.len(),
            want,
            len_bytes: u64::from(len),
            block_bytes,
        });
    }
    let mut zero = ZeroDigests::default();
    let mut plan = DeltaPlan::default();
    // The differing blocks, merged: [start, end) of the current run.
    let mut open: Option<(u32, u32)> = None;
    for (i, theirs) in target.iter().enumerate() {
        let start = u32::try_from(i).expect("fewer blocks than bytes") * block;
        let end = start.saturating_add(block).min(len);
        let ours = match source {
            SourceBytes::Read { bytes, runs } if !all_zero(runs, start, end) => {
                digest(&bytes[start as usize..end as usize])
            }
            _ => zero.of(end - start, &digest),
        };
        if ours == *theirs {
            if let Some(range) = open.take() {
                plan.emit(source, range);
            }
            continue;
        }
        match &mut open {
            Some((_, e)) => *e = end,
            None => open = Some((start, end)),
        }
    }
    if let Some(range) = open {
        plan.emit(source, range);
    }
    Ok(plan)
}

impl DeltaPlan {
    /// The differing bytes `[start, end)`: the source's data runs in it as
    /// DATA, its zero runs as ZERO.
    fn emit(&mut self, source: SourceBytes<'_>, (start, end): (u32, u32)) {
        self.bytes_changed += u64::from(end - start);
        let runs = match source {
            SourceBytes::Read { runs, .. } => runs,
            SourceBytes::Zeros { .. } => {
                self.push(true, start, end);
                return;
            }
        };
        let mut at = start;
        for r in runs {
            let (rs, re) = (r.rel.max(start), (r.rel + r.len).min(end));
            if rs >= re {
                continue;
            }
            if rs > at {
                // Not covered by a run (never, runs cover the window): data.
                self.push(false, at, rs);
            }
            self.push(r.zero, rs, re);
            at = re;
        }
        if at < end {
            self.push(false, at, end);
        }
    }

    /// Appends `[start, end)`, merged with the last piece if that is of the
    /// same kind and adjacent.
    fn push(&mut self, is_zero: bool, start: u32, end: u32) {
        match self.pieces.last_mut() {
            Some(Piece::Zero { rel, len }) if is_zero && *rel + *len == start => {
                *len = end - *rel;
            }
            Some(Piece::Data { rel, len }) if !is_zero && *rel + *len == start => {
                *len = end - *rel;
            }
            _ => {
                let len = end - start;
                self.pieces.push(if is_zero {
                    Piece::Zero { rel: start, len }
                } else {
                    Piece::Data { rel: start, len }
                });
            }
        }
    }
}

/// The runs of `runs` within `[rel, rel + len)`, relative to `rel` (their
/// digests are not used: a clipped run is not the run that was digested).
pub fn clip_runs(runs: &[SinkRun], rel: u64, len: u32) -> Vec<SinkRun> {
    let (start, end) = (rel, rel + u64::from(len));
    runs.iter()
        .filter_map(|r| {
            let (rs, re) = (
                u64::from(r.rel).max(start),
                u64::from(r.rel + r.len).min(end),
            );
            (rs < re).then(|| SinkRun {
                rel: u32::try_from(rs - start).expect("within a request"),
                len: u32::try_from(re - rs).expect("within a request"),
                zero: r.zero,
                digest: [0; 32],
            })
        })
        .collect()
}

/// True if `[start, end)` lies within zero runs.
fn all_zero(runs: &[SinkRun], start: u32, end: u32) -> bool {
    let mut at = start;
    for r in runs {
        let r_end = r.rel + r.len;
        if r_end <= at {
            continue;
        }
        if r.rel > at || !r.zero {
            return false;
        }
        at = r_end;
        if at >= end {
            return true;
        }
    }
    false
}

/// The digests of all-zero blocks, by length (at most two lengths occur:
/// the block and a short last one).
#[derive(Default)]
struct ZeroDigests {
    known: Vec<(u32, [u8; 16])>,
}

impl ZeroDigests {
    fn of(&mut self, len_bytes: u32, digest: &impl Fn(&[u8]) -> [u8; 16]) -> [u8; 16] {
        if let Some((_, d)) = self.known.iter().find(|(l, _)| *l == len_bytes) {
            return *d;
        }
        let d = digest(&vec![0u8; len_bytes as usize]);
        self.known.push((len_bytes, d));
        d
    }
}

#[cfg(test)]
#[path = "delta_tests.rs"]
mod tests;
