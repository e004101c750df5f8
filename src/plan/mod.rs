//! Planning: what the source holds and in which order it is moved.
//!
//! * [`maps`]: allocation maps of an opened source (`SEEK_DATA`/`SEEK_HOLE`
//!   on its fd, NBD `BLOCK_STATUS` `base:allocation` over its first
//!   connection), collected once into an [`maps::ExtentList`]. Mapping takes
//!   what [`crate::endpoint::open`] opened, never a SRC string.
//! * [`windows`]: the disk cut into chunk-aligned windows, each with data a
//!   [`windows::Work::Copy`] of its data runs, the stretches between
//!   [`windows::Work::Zero`] items.
//! * [`lanes`]: the order of those windows, one from each of `--lanes`
//!   regions in turn, so the reads in flight are spread over the disk.
//!   The pipeline's planner thread (`pipeline/planner.rs`) runs them.
//!
//! **Pass plans (issue 16).** An incremental `send` moves a [`PassPlan`]:
//! it reads and sends the [`PassKind::Copy`] extents, zeroes (ZERO frame,
//! punched hole) the [`PassKind::Zero`] ones and skips the
//! [`PassKind::Unchanged`] ones ([`pass_work`] plans them exactly, not in
//! whole windows).
//!
//! * [`PassPlan`]: the three-kind plan of a pass, checked to partition the
//!   disk `[0, size)` exactly.
//! * [`dirty`]: the plan from an NBD server's `qemu:dirty-bitmap:NAME` and
//!   `base:allocation` contexts (qemu-nbd `-B NAME`), over the blocking
//!   client.
//! * [`changed_areas`]: the plan from a changed-areas list in the JSON shape
//!   of VMware's `QueryChangedDiskAreas` and the source's allocation.
//! * [`pass_work`]: a pass's changed extents, what a round still has to
//!   move of them, and the exact work items for the workers.
#![forbid(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

pub mod changed_areas;
pub mod dirty;
pub mod lanes;
pub mod maps;
pub mod pass_work;
pub mod windows;

/// What a pass does with one extent of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PassKind {
    /// Changed since the base and holding data: read and send it.
    Copy,
    /// Changed since the base and now reading as zeros: zero it on the
    /// target (ZERO frame, punched hole); nothing is read.
    Zero,
    /// Not changed since the base: the target already holds it.
    Unchanged,
}

/// One extent of a [`PassPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassExtent {
    /// First byte.
    pub offset: u64,
    /// Bytes (never 0).
    pub len: u64,
    /// What the pass does with it.
    pub kind: PassKind,
}

impl PassExtent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A plan that is not a partition of its disk, or inputs that cannot make
/// one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// An extent is empty.
    #[error("plan extent #{index} at offset {offset} is empty")]
    Empty {
        /// Its index.
        index: usize,
        /// Where.
        offset: u64,
    },
    /// An extent does not start where the previous one ended (a gap or an
    /// overlap).
    #[error("plan extent #{index} starts at offset {offset}, expected {expected}")]
    NotContiguous {
        /// Its index.
        index: usize,
        /// Where it starts.
        offset: u64,
        /// Where the previous one ended.
        expected: u64,
    },
    /// The extents end before or after the disk does.
    #[error("plan covers [0, {covered}) but the disk has {size_bytes} bytes")]
    WrongEnd {
        /// Where the last extent ends.
        covered: u64,
        /// The disk's size.
        size_bytes: u64,
    },
    /// A range list given to build a plan is not sorted, disjoint and
    /// inside the disk.
    #[error(
        "{list} range #{index} at offset {offset} length {len} is empty, unsorted, overlapping or past the disk's {size_bytes} bytes"
    )]
    BadRange {
        /// Which list ("changed", "data").
        list: &'static str,
        /// Its index.
        index: usize,
        /// Where it starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk's size.
        size_bytes: u64,
    },
}

/// The plan of one pass: extents partitioning `[0, size_bytes)` exactly,
/// adjacent extents of one kind merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassPlan {
    extents: Vec<PassExtent>,
    size_bytes: u64,
}

impl PassPlan {
    /// Check that `extents` partition `[0, size_bytes)` exactly (in order,
    /// none empty) and merge adjacent extents of one kind.
    pub fn new(extents: Vec<PassExtent>, size_bytes: u64) -> Result<Self, PlanError> {
        let mut b = PassBuilder::with_capacity(extents.len());
        for (index, e) in extents.into_iter().enumerate() {
            if e.len == 0 {
                return Err(PlanError::Empty {
                    index,
                    offset: e.offset,
                });
            }
            if e.offset != b.pos {
                return Err(PlanError::NotContiguous {
                    index,
                    offset: e.offset,
                    expected: b.pos,
                });
            }
            let Some(end) = e.offset.checked_add(e.len) else {
                return Err(PlanError::WrongEnd {
                    covered: u64::MAX,
                    size_bytes,
                });
            };
            b.push(end, e.kind);
        }
        b.finish(size_bytes)
    }

    /// The plan of a disk of `size_bytes` whose `changed` ranges changed
    /// since the base and whose `data` ranges hold data now (both lists of
    /// `(offset, len)`: sorted, disjoint, non-empty, inside the disk):
    /// changed ∩ data → Copy, changed ∖ data → Zero, the rest Unchanged.
    pub fn from_changed(
        changed: &[(u64, u64)],
        data: &[(u64, u64)],
        size_bytes: u64,
    ) -> Result<Self, PlanError> {
        check_ranges("changed", changed, size_bytes)?;
        check_ranges("data", data, size_bytes)?;
        let mut b = PassBuilder::with_capacity(changed.len() * 2 + 1);
        let mut d = 0;
        for &(start, len) in changed {
            let end = start + len;
            b.push(start, PassKind::Unchanged);
            // Skip data ranges that end before this changed range.
            while data.get(d).is_some_and(|&(o, l)| o + l <= start) {
                d += 1;
            }
            let mut i = d;
            while let Some(&(o, l)) = data.get(i).filter(|&&(o, _)| o < end) {
                b.push(o.max(start), PassKind::Zero);
                b.push((o + l).min(end), PassKind::Copy);
                i += 1;
            }
            b.push(end, PassKind::Zero);
        }
        b.push(size_bytes, PassKind::Unchanged);
        b.finish(size_bytes)
    }

    /// The extents, in order.
    pub fn extents(&self) -> &[PassExtent] {
        &self.extents
    }

    /// The disk's size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Bytes of the plan of `kind`.
    pub fn bytes(&self, kind: PassKind) -> u64 {
        self.of_kind(kind).map(|e| e.len).sum()
    }

    /// The extents of `kind`, in order.
    pub fn of_kind(&self, kind: PassKind) -> impl Iterator<Item = &PassExtent> {
        self.extents.iter().filter(move |e| e.kind == kind)
    }
}

/// Check a range list is sorted, disjoint, non-empty and inside the disk.
fn check_ranges(
    list: &'static str,
    ranges: &[(u64, u64)],
    size_bytes: u64,
) -> Result<(), PlanError> {
    let mut pos = 0;
    for (index, &(offset, len)) in ranges.iter().enumerate() {
        let ok = len > 0
            && offset >= pos
            && offset.checked_add(len).is_some_and(|end| end <= size_bytes);
        if !ok {
            return Err(PlanError::BadRange {
                list,
                index,
                offset,
                len,
                size_bytes,
            });
        }
        pos = offset + len;
    }
    Ok(())
}

/// Appends extents up to given ends, dropping empty ones and merging
/// adjacent ones of one kind.
struct PassBuilder {
    extents: Vec<PassExtent>,
    pos: u64,
}

impl PassBuilder {
    fn with_capacity(n: usize) -> Self {
        PassBuilder {
            extents: Vec::with_capacity(n),
            pos: 0,
        }
    }

    /// Extend the plan to `end` with `kind` (nothing if `end <= pos`).
    fn push(&mut self, end: u64, kind: PassKind) {
        if end <= self.pos {
            return;
        }
        match self.extents.last_mut() {
            Some(last) if last.kind == kind => last.len += end - self.pos,
            _ => self.extents.push(PassExtent {
                offset: self.pos,
                len: end - self.pos,
                kind,
            }),
        }
        self.pos = end;
    }

    fn finish(self, size_bytes: u64) -> Result<PassPlan, PlanError> {
        if self.pos != size_bytes {
            return Err(PlanError::WrongEnd {
                covered: self.pos,
                size_bytes,
            });
        }
        Ok(PassPlan {
            extents: self.extents,
            size_bytes,
        })
    }
}

#[cfg(test)]
mod tests;
