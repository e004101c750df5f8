//! What protocol v2 adds for passes: sync ids, the plan digest of an
//! incremental pass, the block digests of a delta pass, and their bounds.
//!
//! * A [`SyncId`] names one send run (16 random bytes, never all zero); the
//!   receiver records the id of the job that last completed on a target,
//!   and an incremental pass names it as its base.
//! * [`plan_digest`] binds an incremental HELLO to the PLAN frames that
//!   follow it on every stream: BLAKE3 in key-derivation mode
//!   ([`PLAN_DIGEST_CONTEXT`]) over the ranges encoded as in PLAN.
//! * [`block_digest`] is XXH3-128 (little endian) of one block: what a
//!   DIGESTS frame carries for each block of the target, and what the
//!   sender computes over its own blocks to compare.

use super::ByteRange;
use super::MAX_CHUNK_BYTES;

/// Names one send run; shown to users as 32 lowercase hex characters.
pub type SyncId = [u8; 16];

/// The all-zero id: "none" (a HELLO's base when it has no base).
pub const NO_SYNC_ID: SyncId = [0; 16];

/// BLAKE3 key-derivation context of [`plan_digest`].
pub const PLAN_DIGEST_CONTEXT: &str = "diskferry plan v2";

/// Most ranges in a PLAN (and in an in-progress incremental's planned set).
pub const MAX_PLAN_RANGES: u32 = 1 << 20;
/// Most ranges in a WELCOME's replan list.
pub const MAX_REPLAN_RANGES: u32 = 1 << 20;
/// Longest span one DIGEST_REQUEST covers.
pub const MAX_DIGEST_SPAN_BYTES: u32 = MAX_CHUNK_BYTES;
/// Smallest delta block.
pub const MIN_DIGEST_BLOCK_BYTES: u32 = 4096;
/// Largest delta block.
pub const MAX_DIGEST_BLOCK_BYTES: u32 = 1 << 20;
/// Most digests in one DIGESTS frame (the longest span in the smallest
/// blocks).
pub const MAX_DIGESTS: u32 = MAX_DIGEST_SPAN_BYTES / MIN_DIGEST_BLOCK_BYTES;

/// The plan digest a HELLO of an incremental pass carries: BLAKE3 in
/// key-derivation mode over `count (u32 LE) ‖ (offset u64 LE, len u64 LE)…`,
/// the ranges exactly as a PLAN frame's payload holds them.
pub fn plan_digest(ranges: &[ByteRange]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(PLAN_DIGEST_CONTEXT);
    // A plan is bounded to MAX_PLAN_RANGES before it is sent; a longer
    // list still gets a digest (which no receiver will accept).
    let count = u32::try_from(ranges.len()).unwrap_or(u32::MAX);
    hasher.update(&count.to_le_bytes());
    for r in ranges {
        hasher.update(&r.offset.to_le_bytes());
        hasher.update(&r.len_bytes.to_le_bytes());
    }
    *hasher.finalize().as_bytes()
}

/// XXH3-128 of one block, little endian: the digest DIGESTS carries.
pub fn block_digest(bytes: &[u8]) -> [u8; 16] {
    twox_hash::XxHash3_128::oneshot(bytes).to_le_bytes()
}

/// Whether `block_bytes` is a delta block size the protocol accepts: a
/// power of two in [`MIN_DIGEST_BLOCK_BYTES`] ..= [`MAX_DIGEST_BLOCK_BYTES`].
pub fn is_valid_block_size(block_bytes: u32) -> bool {
    block_bytes.is_power_of_two()
        && (MIN_DIGEST_BLOCK_BYTES..=MAX_DIGEST_BLOCK_BYTES).contains(&block_bytes)
}

/// Digests covering `len_bytes` in `block_bytes` blocks (the last block may
/// be short).
pub fn digest_count(len_bytes: u32, block_bytes: u32) -> u32 {
    len_bytes.div_ceil(block_bytes.max(1))
}

/// The 32 lowercase hex characters users see for `id`.
pub fn sync_id_hex(id: &SyncId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 32 hex characters (either case) into a sync id; `None` for any
/// other string and for the all-zero id, which names nothing.
pub fn parse_sync_id(text: &str) -> Option<SyncId> {
    let bytes = text.as_bytes();
    if bytes.len() != 32 {
        return None;
    }
    let mut id = NO_SYNC_ID;
    for (out, pair) in id.iter_mut().zip(bytes.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *out = u8::try_from(high * 16 + low).ok()?;
    }
    (id != NO_SYNC_ID).then_some(id)
}
