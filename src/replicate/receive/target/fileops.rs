//! The low-level file calls a target's I/O is built on: its journal stamp,
//! range flushes, cache drops, hole punching, and taking in a stale
//! writeback error when a target is opened.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::endpoint::FileKind;
use crate::engine::sys;
use crate::journal::TargetStamp;

/// A regular file's inode, modification time and length, as the journal
/// records them when a job completes; `None` for a block device (its
/// metadata says nothing of its content).
pub fn stamp_of(file: &File, kind: FileKind) -> io::Result<Option<TargetStamp>> {
    if kind != FileKind::Regular {
        return Ok(None);
    }
    let meta = file.metadata()?;
    let mtime_ns = meta
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec());
    Ok(Some(TargetStamp {
        inode: meta.ino(),
        mtime_ns,
        size_bytes: meta.len(),
    }))
}

/// Takes in a writeback error left by writes of an earlier job on this
/// file or device: Linux reports such an error to the next file opened on
/// it, so this job's first flush would fail for writes it never made. The
/// journal vouches only for ranges flushed before the earlier job's first
/// error (see `Target::failed`), so whatever was lost is sent again.
pub(super) fn forget_stale_writeback_error(file: &File, path: &Path) {
    if let Err(e) = file.sync_data() {
        tracing::warn!(
            target_path = %path.display(),
            "an earlier write to this target was lost ({e}); what the journal does not \
             vouch for is sent again"
        );
    }
}

/// `sync_file_range(2)` over the range with `flags`.
pub(super) fn sync_range(file: &File, offset: u64, len_bytes: u64, flags: u32) -> io::Result<()> {
    sys::sync_file_range(file, offset, len_bytes, flags)
}

/// `posix_fadvise(DONTNEED)`: the range is on disk; free its cache pages.
/// Advisory, so a failure is ignored.
pub(super) fn drop_cached(file: &File, offset: u64, len_bytes: u64) {
    let _ = sys::fadvise(file, offset, len_bytes, libc::POSIX_FADV_DONTNEED);
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` over the range.
pub(super) fn punch_hole(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    sys::fallocate(file, mode, offset, len_bytes)
}
