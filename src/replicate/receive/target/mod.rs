//! Targets on the receiver: opening a HELLO's target name
//! ([`open::Targets::open`], confined below the target root by
//! [`beneath`]), preparing it for a job without ever truncating what a
//! journal vouches for ([`TargetFile::fresh`], [`TargetFile::existing`]) and the I/O
//! a stream does on it (write, zero, flush, read back).
//!
//! Errors name the target as the sender named it, never the receiver's
//! paths: they go back to the sender (the receiver logs the paths).
//!
//! Writes go through the page cache and are serialised per target (one
//! `pwrite` at a time): concurrent buffered writes to one inode spin on its
//! lock and were 3× slower here. O_DIRECT from aligned buffers is left to the
//! I/O engine when the receiver moves onto it.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

pub mod beneath;
pub mod open;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::endpoint::FileKind;
use crate::engine::sys;
use crate::journal::TargetStamp;
use crate::sync::lock;
pub use open::{Opened, TARGET_MODE_DEFAULT, TargetKey, Targets};

/// Zeros written per `pwrite` where a hole cannot be punched.
const ZERO_WRITE_BYTES: usize = 1024 * 1024;

/// Why a target name or target was refused, or its I/O failed. Every
/// message names the target by the name the sender gave.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The name breaks the naming rules.
    #[error(
        "target name {name:?} {why}; name a file below the receiver's --target-root \
         (e.g. \"vm1/disk0.img\"), or ask its operator to add --allow NAME=PATH"
    )]
    BadName { name: String, why: &'static str },
    /// The name leads outside the root.
    #[error(
        "target name {name:?} leads outside the receiver's --target-root ({why}); \
         refusing it"
    )]
    OutsideRoot { name: String, why: String },
    /// The name's directory does not exist below the root.
    #[error(
        "target name {name:?}: directory {dir:?} does not exist below the receiver's target \
         root; create it there first (the receiver creates files, not directories)"
    )]
    NoDirectory { name: String, dir: String },
    /// The name reaches the receiver's own state.
    #[error("target {name:?} is inside the receiver's state directory; refusing it")]
    InStateDir { name: String },
    /// The path exists and is not something the receiver writes.
    #[error(
        "target {name:?} is {what} on the receiver; it writes regular files below \
         --target-root and block devices listed with --allow"
    )]
    WrongKind { name: String, what: &'static str },
    /// A regular file another name could reach too.
    #[error(
        "target {name:?} has {links} hard links on the receiver: another name could reach the \
         same data, so it is refused; remove the other links or use another name"
    )]
    HardLinked { name: String, links: u64 },
    /// An existing file that is not ours and not empty.
    #[error(
        "target {name:?} already exists on the receiver with {len_bytes} bytes and no journal \
         of this receiver: refusing to overwrite it; ask the sender to pass --overwrite if it \
         may be replaced"
    )]
    Occupied { name: String, len_bytes: u64 },
    /// A block device smaller than the image.
    #[error(
        "target {name:?} is {device_bytes} bytes, smaller than the image ({size_bytes} bytes); \
         refusing to write anything"
    )]
    TooSmall {
        name: String,
        device_bytes: u64,
        size_bytes: u64,
    },
    /// A resumed regular file that no longer has the job's size.
    #[error(
        "target {name:?} is {len_bytes} bytes but the job being resumed wrote a \
         {size_bytes}-byte target"
    )]
    WrongSize {
        name: String,
        len_bytes: u64,
        size_bytes: u64,
    },
    /// A delta pass onto a regular file longer than the source: it never
    /// truncates, and a longer file would not end up equal to the source.
    #[error(
        "target {name:?} is {len_bytes} bytes, longer than the {size_bytes}-byte source: a delta \
         pass never truncates a target; send a full pass to replace it"
    )]
    LongerThanSource {
        name: String,
        len_bytes: u64,
        size_bytes: u64,
    },
    /// Opening or preparing the target failed (`path` is for the log).
    #[error("cannot open target {name:?} on the receiver: {source}")]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open target.
#[derive(Debug)]
pub struct TargetFile {
    /// Writes, reads and fdatasync. Only fdatasync, under `sync_lock`,
    /// takes in writeback errors on this descriptor (see `writeback`).
    file: File,
    /// A second open file description of the same file or device, for
    /// `sync_file_range` and `posix_fadvise` only. Linux reports each
    /// writeback error once per open file description, and waiting for
    /// writeback with `sync_file_range` takes the error in just as
    /// fdatasync does: on one shared descriptor, a stream waiting for its
    /// writeback could take in an error between another stream's write and
    /// that stream's flush, which then returned 0 and made lost writes
    /// durable in the journal (seen in `tests/target_eio.rs`, 3 runs in 25).
    /// With the waits on their own description, every error reaches the
    /// flushes.
    writeback: File,
    /// The name the sender gave (for messages).
    name: String,
    /// Where it is (for the receiver's log).
    path: PathBuf,
    /// What it is, whatever name reached it.
    key: TargetKey,
    kind: FileKind,
    /// A regular file created/truncated for this job: every byte not
    /// written reads as zero, so ZERO frames need no work.
    fresh_zero: bool,
    /// Serialises buffered writes to the inode (see the module doc) and
    /// holds the ranges whose writeback was started, oldest first.
    write_lock: Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// Flushes started and the number of the last one finished (see
    /// [`TargetFile::sync_point`]).
    syncs: Mutex<SyncCount>,
    /// One flush at a time: the streams' barriers share them.
    sync_lock: Mutex<()>,
    /// The first write or flush error, kept for good. Linux reports a
    /// writeback error once per open file: after one fdatasync failed, the
    /// next returns 0 although the failed pages never reached the disk. So
    /// once this is set every later write and flush fails, and no
    /// checkpoint after the error can call those chunks durable.
    failed: std::sync::OnceLock<(io::ErrorKind, String)>,
}

#[derive(Debug, Default)]
struct SyncCount {
    started: u64,
    done: u64,
}

/// Ranges in writeback before the oldest is waited for and dropped from
/// the page cache (the same streamed writeback as `copy`).
const WRITEBACK_WINDOW: usize = 8;

impl TargetFile {
    /// Prepares an opened target for a new job: a regular file is
    /// truncated and sized to `size_bytes` (all holes); a block device
    /// keeps its content and must hold `size_bytes`.
    ///
    /// The caller decided that nothing in it is to be kept (no journal
    /// vouches for it, and it was empty, new, or the sender asked to
    /// overwrite it).
    pub fn fresh(opened: Opened, size_bytes: u64) -> Result<TargetFile, TargetError> {
        let fresh_zero = match opened.kind {
            FileKind::Regular => {
                let err = |source| TargetError::Open {
                    name: opened.name.clone(),
                    path: opened.path.clone(),
                    source,
                };
                opened.file.set_len(0).map_err(err)?;
                opened.file.set_len(size_bytes).map_err(err)?;
                true
            }
            _ => {
                check_device_size(&opened, size_bytes)?;
                false
            }
        };
        TargetFile::new(opened, fresh_zero)
    }

    /// Opens the target of a resumed (or already complete) job as it is:
    /// nothing is truncated or resized. A regular file must have exactly
    /// `size_bytes` (the size it was given when the job started); a block
    /// device must still hold `size_bytes`.
    pub fn existing(opened: Opened, size_bytes: u64) -> Result<TargetFile, TargetError> {
        match opened.kind {
            FileKind::Regular if opened.len_bytes != size_bytes => Err(TargetError::WrongSize {
                name: opened.name,
                len_bytes: opened.len_bytes,
                size_bytes,
            }),
            FileKind::Regular => TargetFile::new(opened, false),
            _ => {
                check_device_size(&opened, size_bytes)?;
                TargetFile::new(opened, false)
            }
        }
    }

    /// Opens the target of a delta pass as it is: never truncated. A
    /// regular file shorter than `size_bytes` is extended (the new part
    /// reads as zeros), one longer is refused; a block device must hold
    /// `size_bytes`. The caller journaled the pass first.
    pub fn for_delta(opened: Opened, size_bytes: u64) -> Result<TargetFile, TargetError> {
        TargetFile::check_delta(&opened, size_bytes)?;
        match opened.kind {
            FileKind::Regular => {
                if opened.len_bytes < size_bytes {
                    opened
                        .file
                        .set_len(size_bytes)
                        .map_err(|source| TargetError::Open {
                            name: opened.name.clone(),
                            path: opened.path.clone(),
                            source,
                        })?;
                }
                TargetFile::new(opened, false)
            }
            _ => TargetFile::new(opened, false),
        }
    }

    /// Whether a delta pass of a `size_bytes` source may open `opened`
    /// (see [`TargetFile::for_delta`]): checked before its journal is
    /// written, and again when it is opened.
    pub fn check_delta(opened: &Opened, size_bytes: u64) -> Result<(), TargetError> {
        match opened.kind {
            FileKind::Regular if opened.len_bytes > size_bytes => {
                Err(TargetError::LongerThanSource {
                    name: opened.name.clone(),
                    len_bytes: opened.len_bytes,
                    size_bytes,
                })
            }
            FileKind::Regular => Ok(()),
            _ => check_device_size(opened, size_bytes),
        }
    }

    /// The target's stamp now (see [`stamp_of`]).
    pub fn stamp(&self) -> io::Result<Option<TargetStamp>> {
        stamp_of(&self.file, self.kind)
    }

    fn new(opened: Opened, fresh_zero: bool) -> Result<TargetFile, TargetError> {
        forget_stale_writeback_error(&opened.file, &opened.path);
        // The same file or device, reopened through the descriptor (never
        // by path, which may have changed since it was opened). Opened
        // after the stale error was taken in, so it does not report it.
        let writeback =
            File::open(format!("/proc/self/fd/{}", opened.file.as_raw_fd())).map_err(|source| {
                TargetError::Open {
                    name: opened.name.clone(),
                    path: opened.path.clone(),
                    source,
                }
            })?;
        Ok(TargetFile {
            file: opened.file,
            writeback,
            name: opened.name,
            path: opened.path,
            key: opened.key,
            kind: opened.kind,
            fresh_zero,
            write_lock: Mutex::new(std::collections::VecDeque::new()),
            syncs: Mutex::default(),
            sync_lock: Mutex::new(()),
            failed: std::sync::OnceLock::new(),
        })
    }

    /// Where the target is on the receiver: for its log only.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode (or device number): one key per file or device.
    pub fn key(&self) -> TargetKey {
        self.key
    }

    /// "target \"NAME\"" as the sender named it: for messages to a peer.
    pub fn describe(&self) -> String {
        format!("target {:?}", self.name)
    }

    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// Writes `bytes` at `offset` (one writer at a time per target).
    ///
    /// Writes stream to disk: writeback of each range starts right away,
    /// and once more than [`WRITEBACK_WINDOW`] ranges are in writeback the
    /// oldest is waited for and dropped from the cache, so dirty data never
    /// piles up until the final sync (which then has little left to do).
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.check_failed()?;
        self.poison_on_error(self.write_streamed(bytes, offset))
    }

    fn write_streamed(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let oldest = {
            let mut ranges = lock(&self.write_lock);
            self.file.write_all_at(bytes, offset)?;
            let len = bytes.len() as u64;
            sync_range(&self.writeback, offset, len, libc::SYNC_FILE_RANGE_WRITE)?;
            ranges.push_back((offset, len));
            if ranges.len() > WRITEBACK_WINDOW {
                ranges.pop_front()
            } else {
                None
            }
        };
        if let Some((o, l)) = oldest {
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            sync_range(&self.writeback, o, l, wait)?;
            drop_cached(&self.writeback, o, l);
        }
        Ok(())
    }

    /// Makes `[offset, offset + len_bytes)` read as zeros: nothing on a
    /// fresh file, otherwise a punched hole (block devices: the kernel
    /// zeroes or discards-with-zeroing), or written zeros where neither is
    /// supported.
    pub fn zero_range(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        if self.fresh_zero {
            return Ok(());
        }
        self.check_failed()?;
        match punch_hole(&self.file, offset, len_bytes) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                ) =>
            {
                self.write_zeros(offset, len_bytes)
            }
            Err(e) => self.poison_on_error(Err(e)),
        }
    }

    /// An error once an earlier write or flush of this target failed.
    fn check_failed(&self) -> io::Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some((kind, msg)) => Err(io::Error::new(
                *kind,
                format!("an earlier write or flush of this target failed ({msg})"),
            )),
        }
    }

    /// Passes `r` through, remembering its error for good (see `failed`).
    fn poison_on_error<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            let _ = self.failed.set((e.kind(), e.to_string()));
        }
        r
    }

    fn write_zeros(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        static ZEROS: [u8; ZERO_WRITE_BYTES] = [0; ZERO_WRITE_BYTES];
        let mut done_bytes = 0u64;
        // Bounded: each iteration advances by at least one byte.
        while done_bytes < len_bytes {
            let n = usize::try_from(len_bytes - done_bytes)
                .map_or(ZERO_WRITE_BYTES, |rest| rest.min(ZERO_WRITE_BYTES));
            self.write_at(&ZEROS[..n], offset + done_bytes)?;
            done_bytes += n as u64;
        }
        Ok(())
    }

    /// fdatasync: everything written so far (by any stream) is on stable
    /// storage when this returns.
    pub fn sync(&self) -> io::Result<()> {
        self.sync_covering(self.sync_point())
    }

    /// Call after a write completed: the number of the first flush that
    /// will cover it (one that starts after now).
    pub fn sync_point(&self) -> u64 {
        lock(&self.syncs).started + 1
    }

    /// Makes durable every write whose [`TargetFile::sync_point`] was `need`
    /// or less: returns at once if such a flush already finished, else
    /// waits for the flush in progress and flushes again only if that one
    /// started too early. Streams asking for barriers together share one
    /// fdatasync instead of queueing one each.
    pub fn sync_covering(&self, need: u64) -> io::Result<()> {
        self.check_failed()?;
        let done = |s: &Self| lock(&s.syncs).done;
        if done(self) >= need {
            return Ok(());
        }
        let _one = lock(&self.sync_lock);
        if done(self) >= need {
            return Ok(());
        }
        let mine = {
            let mut s = lock(&self.syncs);
            s.started += 1;
            s.started
        };
        self.check_failed()?;
        self.poison_on_error(self.file.sync_data())?;
        let mut s = lock(&self.syncs);
        s.done = s.done.max(mine);
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// The data (allocated) ranges of `[offset, offset + len)`; a block
    /// device reports everything as data.
    pub fn data_extents(&self, offset: u64, len: u64, out: &mut Vec<(u64, u64)>) -> io::Result<()> {
        crate::endpoint::file::data_extents(&self.file, offset, len, out)
    }
}

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

fn check_device_size(opened: &Opened, size_bytes: u64) -> Result<(), TargetError> {
    if opened.len_bytes < size_bytes {
        return Err(TargetError::TooSmall {
            name: opened.name.clone(),
            device_bytes: opened.len_bytes,
            size_bytes,
        });
    }
    Ok(())
}

/// Takes in a writeback error left by writes of an earlier job on this
/// file or device: Linux reports such an error to the next file opened on
/// it, so this job's first flush would fail for writes it never made. The
/// journal vouches only for ranges flushed before the earlier job's first
/// error (see `Target::failed`), so whatever was lost is sent again.
fn forget_stale_writeback_error(file: &File, path: &Path) {
    if let Err(e) = file.sync_data() {
        tracing::warn!(
            target_path = %path.display(),
            "an earlier write to this target was lost ({e}); what the journal does not \
             vouch for is sent again"
        );
    }
}

/// `sync_file_range(2)` over the range with `flags`.
fn sync_range(file: &File, offset: u64, len_bytes: u64, flags: u32) -> io::Result<()> {
    sys::sync_file_range(file, offset, len_bytes, flags)
}

/// `posix_fadvise(DONTNEED)`: the range is on disk; free its cache pages.
/// Advisory, so a failure is ignored.
fn drop_cached(file: &File, offset: u64, len_bytes: u64) {
    let _ = sys::fadvise(file, offset, len_bytes, libc::POSIX_FADV_DONTNEED);
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` over the range.
fn punch_hole(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    sys::fallocate(file, mode, offset, len_bytes)
}

#[cfg(test)]
mod tests;
