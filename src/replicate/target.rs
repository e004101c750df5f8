//! Targets on the receiver: mapping a HELLO's target name to a path that is
//! allowed ([`resolve`]), opening it ([`Target::open_fresh`]) and the I/O a
//! stream does on it (write, zero, flush, read back).
//!
//! A name is a relative path below `--target-root` (no `.` / `..` / empty
//! components, no NUL, components ≤ 255 bytes); the final component is opened
//! with `O_NOFOLLOW` and the canonical parent directory must be inside the
//! canonical root, so neither a symlinked file nor a symlinked directory can
//! lead out. Names listed with `--allow NAME=PATH` map to that path instead
//! (block devices, files elsewhere).
//!
//! Writes go through the page cache and are serialised per target (one
//! `pwrite` at a time): concurrent buffered writes to one inode spin on its
//! lock and were 3× slower here. O_DIRECT from aligned buffers is left to the
//! I/O engine when the receiver moves onto it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use crate::endpoint::file::{RawFile, describe_file_type};
use crate::endpoint::{EndpointError, FileKind};

/// Longest component of a target name (NAME_MAX).
pub const MAX_NAME_COMPONENT_BYTES: usize = 255;
/// Zeros written per `pwrite` where a hole cannot be punched.
const ZERO_WRITE_BYTES: usize = 1024 * 1024;

/// Why a target name or target was refused, or its I/O failed.
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
        "target name {name:?}: directory {} does not exist on the receiver; create it \
         there first (the receiver creates files, not directories)",
        dir.display()
    )]
    NoDirectory { name: String, dir: PathBuf },
    /// The path exists and is not something the receiver writes.
    #[error(
        "target {} is {what}; the receiver writes regular files below --target-root \
         and block devices listed with --allow",
        path.display()
    )]
    WrongKind { path: PathBuf, what: &'static str },
    /// A block device smaller than the image.
    #[error(
        "target {} is {device_bytes} bytes, smaller than the image ({size_bytes} bytes); \
         refusing to write anything",
        path.display()
    )]
    TooSmall {
        path: PathBuf,
        device_bytes: u64,
        size_bytes: u64,
    },
    /// Opening or preparing the target failed.
    #[error("cannot open target {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A target name mapped to a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// The path to open: `canonical parent / final component` below the
    /// root, or the `--allow` path as configured.
    pub path: PathBuf,
    /// True for names from `--allow` (opened following symlinks, may be a
    /// block device).
    pub from_allow_list: bool,
}

/// Maps `name` to a path, refusing anything that could lead outside the
/// canonical `root` (which the caller canonicalised). Creates nothing.
pub fn resolve(
    name: &str,
    root: &Path,
    allow: &[(String, PathBuf)],
) -> Result<ResolvedTarget, TargetError> {
    if let Some((_, path)) = allow.iter().find(|(allowed, _)| allowed == name) {
        return Ok(ResolvedTarget {
            path: path.clone(),
            from_allow_list: true,
        });
    }
    let bad = |why| TargetError::BadName {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if name.starts_with('/') {
        return Err(bad("is absolute"));
    }
    let parts: Vec<&str> = name.split('/').collect();
    for part in &parts {
        match *part {
            "" => return Err(bad("has an empty component (\"//\" or a trailing \"/\")")),
            "." | ".." => return Err(bad("has a \".\" or \"..\" component")),
            p if p.len() > MAX_NAME_COMPONENT_BYTES => {
                return Err(bad("has a component longer than 255 bytes"));
            }
            _ => {}
        }
    }
    let (file_name, dirs) = parts.split_last().ok_or_else(|| bad("is empty"))?;
    let dir = dirs.iter().fold(root.to_path_buf(), |p, d| p.join(d));
    let canonical_dir = dir.canonicalize().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => TargetError::NoDirectory {
            name: name.to_string(),
            dir: dir.clone(),
        },
        _ => TargetError::Open {
            path: dir.clone(),
            source: e,
        },
    })?;
    if !canonical_dir.starts_with(root) {
        return Err(TargetError::OutsideRoot {
            name: name.to_string(),
            why: format!("its directory resolves to {}", canonical_dir.display()),
        });
    }
    if !canonical_dir.is_dir() {
        return Err(TargetError::NoDirectory {
            name: name.to_string(),
            dir,
        });
    }
    let path = canonical_dir.join(file_name);
    debug_assert!(matches!(
        path.components().next_back(),
        Some(Component::Normal(_))
    ));
    Ok(ResolvedTarget {
        path,
        from_allow_list: false,
    })
}

/// An open target.
#[derive(Debug)]
pub struct Target {
    file: File,
    path: PathBuf,
    kind: FileKind,
    /// A regular file created/truncated for this job: every byte not
    /// written reads as zero, so ZERO frames need no work.
    fresh_zero: bool,
    /// Serialises buffered writes to the inode (see the module doc) and
    /// holds the ranges whose writeback was started, oldest first.
    write_lock: Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// Flushes started and the number of the last one finished (see
    /// [`Target::sync_point`]).
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

impl Target {
    /// Opens a target for a new job: a regular file is created or
    /// truncated and sized to `size_bytes` (all holes); a block device
    /// (allow-listed only) keeps its content and must hold `size_bytes`.
    ///
    /// A resumed job opens its target with [`Target::open_existing`].
    pub fn open_fresh(resolved: &ResolvedTarget, size_bytes: u64) -> Result<Target, TargetError> {
        if resolved.from_allow_list {
            return Self::open_allowed(&resolved.path, size_bytes);
        }
        let path = &resolved.path;
        let open_err = |source| TargetError::Open {
            path: path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && !meta.file_type().is_file()
        {
            return Err(TargetError::WrongKind {
                path: path.clone(),
                what: describe_file_type(meta.file_type()),
            });
        }
        let file = open_regular(path, true)?;
        file.set_len(0).map_err(open_err)?;
        file.set_len(size_bytes).map_err(open_err)?;
        Ok(Target {
            file,
            path: path.clone(),
            kind: FileKind::Regular,
            fresh_zero: true,
            write_lock: Mutex::new(std::collections::VecDeque::new()),
            syncs: Mutex::default(),
            sync_lock: Mutex::new(()),
            failed: std::sync::OnceLock::new(),
        })
    }

    /// Opens the target of a resumed job as it is: nothing is truncated or
    /// resized. A regular file must exist and have exactly `size_bytes`
    /// (the size it was given when the job started); an allow-listed block
    /// device must still hold `size_bytes`.
    pub fn open_existing(
        resolved: &ResolvedTarget,
        size_bytes: u64,
    ) -> Result<Target, TargetError> {
        if resolved.from_allow_list {
            let mut t = Self::open_allowed(&resolved.path, size_bytes)?;
            t.fresh_zero = false;
            return Ok(t);
        }
        let path = &resolved.path;
        let open_err = |source| TargetError::Open {
            path: path.clone(),
            source,
        };
        let file = open_regular(path, false)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.len() != size_bytes {
            return Err(TargetError::Open {
                path: path.clone(),
                source: io::Error::other(format!(
                    "it is {} bytes but the job being resumed wrote a {size_bytes}-byte target",
                    meta.len()
                )),
            });
        }
        forget_stale_writeback_error(&file, path);
        Ok(Target {
            file,
            path: path.clone(),
            kind: FileKind::Regular,
            fresh_zero: false,
            write_lock: Mutex::new(std::collections::VecDeque::new()),
            syncs: Mutex::default(),
            sync_lock: Mutex::new(()),
            failed: std::sync::OnceLock::new(),
        })
    }

    fn open_allowed(path: &Path, size_bytes: u64) -> Result<Target, TargetError> {
        let (raw, fresh_zero) = RawFile::open_target(path, size_bytes).map_err(|e| match e {
            EndpointError::TargetTooSmall {
                target_bytes,
                source_bytes,
                ..
            } => TargetError::TooSmall {
                path: path.to_path_buf(),
                device_bytes: target_bytes,
                size_bytes: source_bytes,
            },
            EndpointError::NotAFileOrDevice { what, .. } => TargetError::WrongKind {
                path: path.to_path_buf(),
                what,
            },
            EndpointError::Io { source, .. } => TargetError::Open {
                path: path.to_path_buf(),
                source,
            },
            other => TargetError::Open {
                path: path.to_path_buf(),
                source: io::Error::other(other.to_string()),
            },
        })?;
        forget_stale_writeback_error(&raw.file, path);
        Ok(Target {
            file: raw.file,
            path: path.to_path_buf(),
            kind: raw.kind,
            fresh_zero,
            write_lock: Mutex::new(std::collections::VecDeque::new()),
            syncs: Mutex::default(),
            sync_lock: Mutex::new(()),
            failed: std::sync::OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
            let mut ranges = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.file.write_all_at(bytes, offset)?;
            let len = bytes.len() as u64;
            sync_range(&self.file, offset, len, libc::SYNC_FILE_RANGE_WRITE)?;
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
            sync_range(&self.file, o, l, wait)?;
            drop_cached(&self.file, o, l);
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
            let n = (len_bytes - done_bytes).min(ZERO_WRITE_BYTES as u64) as usize;
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
        self.syncs.lock().unwrap_or_else(|p| p.into_inner()).started + 1
    }

    /// Makes durable every write whose [`Target::sync_point`] was `need`
    /// or less: returns at once if such a flush already finished, else
    /// waits for the flush in progress and flushes again only if that one
    /// started too early. Streams asking for barriers together share one
    /// fdatasync instead of queueing one each.
    pub fn sync_covering(&self, need: u64) -> io::Result<()> {
        self.check_failed()?;
        let done = |s: &Self| s.syncs.lock().unwrap_or_else(|p| p.into_inner()).done;
        if done(self) >= need {
            return Ok(());
        }
        let _one = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        if done(self) >= need {
            return Ok(());
        }
        let mine = {
            let mut s = self.syncs.lock().unwrap_or_else(|p| p.into_inner());
            s.started += 1;
            s.started
        };
        self.check_failed()?;
        self.poison_on_error(self.file.sync_data())?;
        let mut s = self.syncs.lock().unwrap_or_else(|p| p.into_inner());
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

/// Opens (with `create`, creating) the regular file at `path` for reading
/// and writing, refusing a symbolic link as the last component and
/// anything that is not a regular file once open (the path may have been
/// swapped between a check and the open).
fn open_regular(path: &Path, create: bool) -> Result<File, TargetError> {
    let open_err = |source| TargetError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => TargetError::OutsideRoot {
                name: path.display().to_string(),
                why: "its last component is a symbolic link".into(),
            },
            _ => open_err(e),
        })?;
    let file_type = file.metadata().map_err(open_err)?.file_type();
    if !file_type.is_file() {
        return Err(TargetError::WrongKind {
            path: path.to_path_buf(),
            what: describe_file_type(file_type),
        });
    }
    Ok(file)
}

/// `sync_file_range(2)` over the range with `flags`.
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

fn sync_range(file: &File, offset: u64, len_bytes: u64, flags: u32) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off64_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off64_t::try_from(len_bytes).map_err(|_| too_big())?;
    // SAFETY: sync_file_range(2) passes no memory: a descriptor borrowed from
    // a live `File` and three integers.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `posix_fadvise(DONTNEED)`: the range is on disk; free its cache pages.
/// Advisory, so a failure is ignored.
fn drop_cached(file: &File, offset: u64, len_bytes: u64) {
    let (Ok(offset), Ok(len)) = (
        libc::off_t::try_from(offset),
        libc::off_t::try_from(len_bytes),
    ) else {
        return;
    };
    // SAFETY: posix_fadvise(2) passes no memory: a descriptor borrowed from a
    // live `File` and three integers.
    let _ =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)` over the range.
fn punch_hole(file: &File, offset: u64, len_bytes: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len_bytes).map_err(|_| too_big())?;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) passes no memory: only a descriptor borrowed from a
    // live `File` (so it stays open for the call) and three integers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_range_on_a_used_target_reads_back_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let resolved = resolve("t.img", &root, &[]).unwrap();
        let mut target = Target::open_fresh(&resolved, 4 << 20).unwrap();
        target.fresh_zero = false; // as a block device or a resumed file
        target.write_at(&[0xAB; 3 << 20], 0).unwrap();
        target.zero_range(4096, (2 << 20) + 4096).unwrap();
        target.write_zeros((3 << 20) - 10, 10).unwrap();
        let bytes = std::fs::read(&resolved.path).unwrap();
        assert!(bytes[..4096].iter().all(|&b| b == 0xAB));
        assert!(bytes[4096..(2 << 20) + 8192].iter().all(|&b| b == 0));
        assert!(
            bytes[(2 << 20) + 8192..(3 << 20) - 10]
                .iter()
                .all(|&b| b == 0xAB)
        );
        assert!(bytes[(3 << 20) - 10..].iter().all(|&b| b == 0));
        let allocated = crate::endpoint::file::allocated_bytes(&resolved.path);
        assert!(
            allocated < 2 << 20,
            "no hole was punched: {allocated} bytes allocated"
        );
    }

    #[test]
    fn resolve_keeps_names_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("vm")).unwrap();
        let ok = resolve("vm/disk.img", &root, &[]).unwrap();
        assert_eq!(ok.path, root.join("vm/disk.img"));
        assert!(!ok.from_allow_list);
        for bad in [
            "", "/abs", "../x", "vm/../x", "vm/./x", "vm//x", "x\0y", "nodir/x",
        ] {
            assert!(resolve(bad, &root, &[]).is_err(), "{bad:?} accepted");
        }
        let allow = vec![("dev".to_string(), PathBuf::from("/dev/null"))];
        let listed = resolve("dev", &root, &allow).unwrap();
        assert!(listed.from_allow_list && listed.path == Path::new("/dev/null"));
        assert!(
            !root.join("vm/disk.img").exists(),
            "resolve must not create"
        );
    }
}
