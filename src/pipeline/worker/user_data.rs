//! The layout of an engine op's `user_data` (tag, slot, sub-op) and of
//! the NBD cookies of a worker's requests (slot, sub-op).

#![forbid(unsafe_code)]

// user_data layout: tag in the top 4 bits.
pub(super) const TAG_SHIFT: u32 = 60;
pub(super) const TAG_FILE_READ: u64 = 1;
pub(super) const TAG_FILE_WRITE: u64 = 2;
pub(super) const TAG_FILE_ZERO: u64 = 3;
pub(super) const TAG_SRC_SEND: u64 = 4;
pub(super) const TAG_SRC_RECV: u64 = 5;
pub(super) const TAG_DST_SEND: u64 = 6;
pub(super) const TAG_DST_RECV: u64 = 7;
pub(super) const TAG_DOORBELL: u64 = 8;
/// A write through the page cache (serialised: see `buffered_queue`).
pub(super) const TAG_FILE_WRITE_BUF: u64 = 9;
/// Start writeback of a range just written (nothing to do on completion).
pub(super) const TAG_WB_START: u64 = 10;
/// Wait for an older range's writeback; then drop it from the page cache.
pub(super) const TAG_WB_WAIT: u64 = 11;
pub(super) const SUBOP_BITS: u32 = 24;

pub(super) fn ud(tag: u64, slot: usize, subop: usize) -> u64 {
    (tag << TAG_SHIFT) | ((slot as u64) << SUBOP_BITS) | subop as u64
}
pub(super) fn ud_tag(u: u64) -> u64 {
    u >> TAG_SHIFT
}
pub(super) fn ud_slot(u: u64) -> usize {
    ((u & ((1 << TAG_SHIFT) - 1)) >> SUBOP_BITS) as usize
}
pub(super) fn ud_subop(u: u64) -> usize {
    (u & ((1 << SUBOP_BITS) - 1)) as usize
}
/// NBD cookies: slot and subop (never 0 so a zeroed header is not a cookie).
pub(super) fn cookie(slot: usize, subop: usize) -> u64 {
    (((slot as u64) + 1) << SUBOP_BITS) | subop as u64
}
pub(super) fn cookie_parts(c: u64) -> Option<(usize, usize)> {
    let slot = (c >> SUBOP_BITS).checked_sub(1)? as usize;
    Some((slot, (c & ((1 << SUBOP_BITS) - 1)) as usize))
}
