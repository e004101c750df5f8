//! Raw files and block devices.
//!
//! Opening a source read-only, preparing a target (a fresh, fully sparse,
//! all-zero regular file, or a large-enough block device), and finding the
//! allocated ranges of a file with `SEEK_DATA` / `SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{EndpointError, FileKind};
use crate::engine::sys;

/// An open raw file or block device.
#[derive(Debug)]
pub struct RawFile {
    /// The open file.
    pub file: File,
    /// A regular file or a block device.
    pub kind: FileKind,
    /// Its size (a block device's capacity).
    pub size_bytes: u64,
    /// The path it was opened at.
    pub path: PathBuf,
}

fn io_error(path: &Path, what: &str, source: io::Error) -> EndpointError {
    EndpointError::Io {
        path: format!("{} ({what})", path.display()),
        source,
    }
}

/// Regular file or block device; anything else is refused with a message.
fn kind_of(path: &Path, file: &File) -> Result<FileKind, EndpointError> {
    let file_type = file
        .metadata()
        .map_err(|e| io_error(path, "stat", e))?
        .file_type();
    if file_type.is_file() {
        Ok(FileKind::Regular)
    } else if file_type.is_block_device() {
        Ok(FileKind::BlockDevice)
    } else {
        Err(EndpointError::NotAFileOrDevice {
            path: path.display().to_string(),
            what: describe_file_type(file_type),
        })
    }
}

/// "a directory", "a character device", … for error messages.
pub(crate) fn describe_file_type(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Size of a regular file (st_size) or a block device (seek to its end,
/// which the kernel answers with the device size, like BLKGETSIZE64).
fn size_of(path: &Path, file: &mut File, kind: FileKind) -> Result<u64, EndpointError> {
    match kind {
        FileKind::Regular => Ok(file
            .metadata()
            .map_err(|e| io_error(path, "stat", e))?
            .len()),
        FileKind::BlockDevice => {
            let size_bytes = file
                .seek(SeekFrom::End(0))
                .map_err(|e| io_error(path, "seek to end", e))?;
            file.seek(SeekFrom::Start(0))
                .map_err(|e| io_error(path, "seek to start", e))?;
            Ok(size_bytes)
        }
    }
}

impl RawFile {
    /// Open a source read-only.
    pub fn open_source(path: &Path) -> Result<RawFile, EndpointError> {
        let mut file =
            File::open(path).map_err(|e| io_error(path, "open source for reading", e))?;
        let kind = kind_of(path, &file)?;
        let size_bytes = size_of(path, &mut file, kind)?;
        Ok(RawFile {
            file,
            kind,
            size_bytes,
            path: path.to_path_buf(),
        })
    }

    /// Open (or create) a target of `size_bytes`, read-write.
    ///
    /// A regular file is created if missing, truncated to 0 and extended to
    /// `size_bytes`: it reads as all zeros and has no blocks allocated, so
    /// the second value (`fresh_zero`) is `true` and the copy may skip
    /// writing zeros. A block device keeps its content (`fresh_zero` is
    /// `false`) and is refused with [`EndpointError::TargetTooSmall`] if it
    /// is smaller than `size_bytes`; a larger device is fine (the tail is
    /// left alone).
    pub fn open_target(path: &Path, size_bytes: u64) -> Result<(RawFile, bool), EndpointError> {
        if let Ok(meta) = std::fs::metadata(path) {
            let file_type = meta.file_type();
            if !file_type.is_file() && !file_type.is_block_device() {
                let what = describe_file_type(file_type);
                return Err(EndpointError::NotAFileOrDevice {
                    path: path.display().to_string(),
                    what,
                });
            }
            if file_type.is_block_device() {
                let mut file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| io_error(path, "open target block device for writing", e))?;
                let device_bytes = size_of(path, &mut file, FileKind::BlockDevice)?;
                if device_bytes < size_bytes {
                    return Err(EndpointError::TargetTooSmall {
                        target: path.display().to_string(),
                        target_bytes: device_bytes,
                        source_bytes: size_bytes,
                    });
                }
                let raw = RawFile {
                    file,
                    kind: FileKind::BlockDevice,
                    size_bytes: device_bytes,
                    path: path.into(),
                };
                return Ok((raw, false));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io_error(path, "create target file", e))?;
        // Truncate-on-open already dropped every block; extending makes the
        // whole file one hole that reads as zeros.
        file.set_len(size_bytes)
            .map_err(|e| io_error(path, "set target size", e))?;
        Ok((
            RawFile {
                file,
                kind: FileKind::Regular,
                size_bytes,
                path: path.into(),
            },
            true,
        ))
    }
}

/// `lseek(fd, offset, whence)`; `Ok(None)` for ENXIO (no data / hole at or
/// after `offset`).
fn seek_data_or_hole(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    match sys::lseek(file, offset, whence) {
        Ok(position) => Ok(Some(position)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Append `(offset, length_bytes)` to `out`, merging with the previous range
/// when they touch.
fn push_merged(out: &mut Vec<(u64, u64)>, offset: u64, length_bytes: u64) {
    if length_bytes == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.0 + last.1 == offset
    {
        last.1 += length_bytes;
        return;
    }
    out.push((offset, length_bytes));
}

/// The allocated (data) ranges of `file` within `[offset, offset + len)`, as
/// `(offset, length_bytes)` pairs in ascending order, merged where adjacent.
/// `out` is cleared first. Ranges past the end of a regular file are holes.
///
/// Block devices, and file systems that do not support `SEEK_DATA` (EINVAL),
/// report the whole range as data. Ranges are as the file system reports
/// them: a range may include zeros that are allocated.
pub fn data_extents(
    file: &File,
    offset: u64,
    len: u64,
    out: &mut Vec<(u64, u64)>,
) -> io::Result<()> {
    out.clear();
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset + length overflows"))?;
    if file.metadata()?.file_type().is_block_device() {
        push_merged(out, offset, len);
        return Ok(());
    }
    let mut pos = offset;
    // Each iteration moves `pos` strictly forward, so the loop is bounded by
    // the number of data extents in the range.
    while pos < end {
        let data_start = match seek_data_or_hole(file, pos, libc::SEEK_DATA) {
            Ok(Some(data_start)) => data_start,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                push_merged(out, pos, end - pos);
                break;
            }
            Err(e) => return Err(e),
        };
        if data_start >= end {
            break;
        }
        // The file always ends in an implicit hole, so SEEK_HOLE from a data
        // offset succeeds; ENXIO here means the file shrank under us.
        let hole_start = seek_data_or_hole(file, data_start, libc::SEEK_HOLE)?.unwrap_or(end);
        let data_end = hole_start.min(end);
        if data_end <= data_start {
            return Err(io::Error::other(format!(
                "SEEK_HOLE from {data_start} returned {hole_start}; the file changed during the scan"
            )));
        }
        push_merged(out, data_start, data_end - data_start);
        pos = data_end;
    }
    Ok(())
}

/// Bytes the file system really allocated for `path` (st_blocks × 512); 0 if
/// it cannot be stat'ed. Meant for tests and reports.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |meta| meta.blocks().saturating_mul(512))
}
