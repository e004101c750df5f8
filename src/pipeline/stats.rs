//! Counters shared between the workers and the control thread.

#![forbid(unsafe_code)]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Job counters. Workers add; the control thread reads for progress.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes the plan says must be read (allocated, non-zero per the source).
    pub bytes_planned: AtomicU64,
    /// True once `bytes_planned` is final.
    pub planning_done: AtomicBool,
    /// Planned bytes fully handled (read and written or found to be zero).
    pub bytes_done: AtomicU64,
    /// Bytes read from the source.
    pub bytes_read: AtomicU64,
    /// Bytes written to the target as data.
    pub bytes_written: AtomicU64,
    /// Target bytes made zero without data: holes and zero runs, whether
    /// skipped (fresh target) or written as zeroes / punched.
    pub bytes_zeroed: AtomicU64,
    /// Data bytes a file target holds on its storage, not just in the page
    /// cache: written with O_DIRECT, or written back (the throughput probe's
    /// measure when reads and writes may share a disk).
    pub bytes_landed: AtomicU64,
    /// Source reads issued again after a transient failure (see
    /// [`super::retry`]).
    pub read_retries: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Snapshot {
    pub bytes_planned: u64,
    pub planning_done: bool,
    pub bytes_done: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub read_retries: u64,
}

impl Snapshot {
    /// These counters followed by `later`'s (a later round of the same
    /// disk: its planning state wins).
    pub fn plus(&self, later: &Snapshot) -> Snapshot {
        Snapshot {
            bytes_planned: self.bytes_planned + later.bytes_planned,
            planning_done: later.planning_done,
            bytes_done: self.bytes_done + later.bytes_done,
            bytes_read: self.bytes_read + later.bytes_read,
            bytes_written: self.bytes_written + later.bytes_written,
            bytes_zeroed: self.bytes_zeroed + later.bytes_zeroed,
            read_retries: self.read_retries + later.read_retries,
        }
    }
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            bytes_planned: self.bytes_planned.load(Relaxed),
            planning_done: self.planning_done.load(Relaxed),
            bytes_done: self.bytes_done.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Relaxed),
            read_retries: self.read_retries.load(Relaxed),
        }
    }
}
