//! The receiver's resume journal: per target, the byte ranges known to be
//! durable on it, and the identity of the source they came from.
//!
//! * [`codec`]: [`Journal`] and its sans-IO binary encoding (magic, version,
//!   length-prefixed fields, BLAKE3 checksum). Every bound is checked before
//!   anything is allocated.
//! * [`ranges`]: [`RangeSet`], the merged durable ranges, with the
//!   drop-the-smallest cap that keeps the journal bounded whatever the disk
//!   size.
//! * [`store`]: [`JournalStore`], one file per target in `--state-dir`,
//!   replaced atomically (write, fsync, rename, fsync the directory), and
//!   [`Checkpointer`], when to take the next checkpoint.
//! * [`decide`]: [`decide()`], what a HELLO gets given the journal found
//!   and the pass it asks for (full, incremental, delta): a fresh copy, a
//!   resume, "already complete", an incremental's planned set, a delta
//!   pass, or a refusal.
//!
//! The journal is advanced only after the ranges it adds were flushed
//! (fdatasync / NBD FLUSH); that ordering is the caller's duty.
#![forbid(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

pub mod codec;
pub mod decide;
pub mod ranges;
mod reader;
pub mod store;

#[cfg(test)]
mod codec_tests;
#[cfg(test)]
mod codec_v2_tests;
#[cfg(test)]
mod store_tests;

use std::path::PathBuf;

pub use codec::{
    JOURNAL_VERSION, Journal, MAGIC, MAX_JOURNAL_BYTES, MAX_RANGES_DEFAULT, MAX_RANGES_HARD,
    MAX_STRING_BYTES, TargetStamp,
};
pub use decide::{Decision, RefuseReason, ResumeRequest, decide};
pub use ranges::RangeSet;
pub use store::{
    CHECKPOINT_BYTES_DEFAULT, CHECKPOINT_INTERVAL_DEFAULT, Checkpointer, JournalStore,
};

/// What to tell an operator whose journal cannot be trusted.
const RESTART_HINT: &str = "rerun with --restart to start a clean full copy";

/// Everything that can go wrong reading, checking or writing a journal.
/// Decode failures say what is wrong and that `--restart` recovers.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Shorter than any journal.
    #[error(
        "journal is damaged (truncated: {len_bytes} bytes is shorter than any journal); {RESTART_HINT}"
    )]
    TooShort {
        /// The file's length.
        len_bytes: usize,
    },
    /// Not a diskferry journal.
    #[error("journal is damaged (not a diskferry journal: bad magic); {RESTART_HINT}")]
    BadMagic,
    /// Written by another journal version.
    #[error(
        "journal has version {found}, this diskferry reads version {JOURNAL_VERSION}; \
         run the release that wrote it, or {RESTART_HINT}"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The checksum does not match.
    #[error("journal is damaged (checksum mismatch); {RESTART_HINT}")]
    ChecksumMismatch,
    /// Ends inside a field.
    #[error("journal is damaged (truncated in field `{field}`); {RESTART_HINT}")]
    Truncated {
        /// The field.
        field: &'static str,
    },
    /// Flag bits this build does not know.
    #[error("journal is damaged (unknown flag bits {flags:#x}); {RESTART_HINT}")]
    UnknownFlags {
        /// The flags found.
        flags: u32,
    },
    /// A string over its bound.
    #[error(
        "journal is damaged (field `{field}` is {len_bytes} bytes, more than {MAX_STRING_BYTES}); \
         {RESTART_HINT}"
    )]
    StringTooLong {
        /// The field.
        field: &'static str,
        /// The string's length.
        len_bytes: u64,
    },
    /// A string that is not UTF-8.
    #[error("journal is damaged (field `{field}` is not UTF-8); {RESTART_HINT}")]
    StringNotUtf8 {
        /// The field.
        field: &'static str,
    },
    /// More ranges than allowed.
    #[error(
        "journal is damaged ({count} {field}, more than {MAX_RANGES_HARD} or than the \
         file holds); {RESTART_HINT}"
    )]
    TooManyRanges {
        /// Which list.
        field: &'static str,
        /// Ranges claimed.
        count: u64,
    },
    /// A range that is empty or past the source.
    #[error(
        "journal is damaged ({field} #{index} at {offset}+{len_bytes} is empty or beyond \
         the {size_bytes}-byte source); {RESTART_HINT}"
    )]
    RangeOutOfBounds {
        /// Which list.
        field: &'static str,
        /// Which range.
        index: usize,
        /// The range's offset.
        offset: u64,
        /// The range's length.
        len_bytes: u64,
        /// The source's size.
        size_bytes: u64,
    },
    /// Ranges unsorted, overlapping or unmerged.
    #[error(
        "journal is damaged ({field} #{index} is not after the previous one: unsorted, \
         overlapping or unmerged); {RESTART_HINT}"
    )]
    RangesNotCanonical {
        /// Which list.
        field: &'static str,
        /// Which range.
        index: usize,
    },
    /// Marked complete without covering the source.
    #[error(
        "journal is damaged (marked complete but only {covered_bytes} of {size_bytes} bytes \
         are durable); {RESTART_HINT}"
    )]
    CompleteButNotCovered {
        /// Bytes the ranges cover.
        covered_bytes: u64,
        /// The source's size.
        size_bytes: u64,
    },
    /// Pass fields (v2) that contradict each other or the pass mode.
    #[error("journal is damaged (pass fields: {why}); {RESTART_HINT}")]
    BadPassFields {
        /// What is wrong.
        why: &'static str,
    },
    /// Bytes after the ranges.
    #[error("journal is damaged ({extra_bytes} unexpected bytes after the ranges); {RESTART_HINT}")]
    TrailingBytes {
        /// Bytes left over.
        extra_bytes: usize,
    },
    /// A file larger than any journal.
    #[error(
        "journal is damaged (the file is {len_bytes} bytes, more than any journal can be, \
         {MAX_JOURNAL_BYTES}); {RESTART_HINT}"
    )]
    TooLarge {
        /// The file's length.
        len_bytes: u64,
    },
    /// The journal path is not a regular file.
    #[error("journal is not a regular file ({what}); remove it, or {RESTART_HINT}")]
    NotAFile {
        /// What it is instead.
        what: &'static str,
    },
    /// The state directory is a symbolic link.
    #[error(
        "state directory {path} is a symbolic link: name the real directory instead",
        path = path.display()
    )]
    StateDirSymlink {
        /// The path.
        path: PathBuf,
    },
    /// The state directory is not a directory.
    #[error("state directory {path} is not a directory", path = path.display())]
    StateDirNotDir {
        /// The path.
        path: PathBuf,
    },
    /// The state directory belongs to another user.
    #[error(
        "state directory {path} is owned by uid {owner_uid}, not by this user (uid {uid}): \
         run `chown {uid} {path}` or use a directory of your own",
        path = path.display()
    )]
    StateDirOwner {
        /// The path.
        path: PathBuf,
        /// The directory's owner.
        owner_uid: u32,
        /// Our effective uid.
        uid: u32,
    },
    /// The state directory is writable by others.
    #[error(
        "state directory {path} is writable by group or others (mode {mode:04o}): \
         run `chmod 0700 {path}`",
        path = path.display()
    )]
    StateDirWritable {
        /// The path.
        path: PathBuf,
        /// The directory's mode.
        mode: u32,
    },
    /// An error of the journal file at `path`.
    #[error("{path}: {source}", path = path.display())]
    At {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<JournalError>,
    },
    /// A journal that would not decode (a bug).
    #[error(
        "refusing to save a journal that would not read back ({source}); this is a bug: \
         please report it"
    )]
    Unencodable {
        /// Why it would not decode.
        #[source]
        source: Box<JournalError>,
    },
    /// A system call on the journal or its directory failed.
    #[error(
        "cannot {action} {path}: {source} (check that --state-dir is a writable local \
         directory with free space)",
        path = path.display()
    )]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

impl JournalError {
    /// True if the journal exists but cannot be trusted: the receiver refuses
    /// to resume (wire `JOURNAL_DAMAGED`) unless the sender asks to restart.
    /// False for I/O errors on the state directory and for bugs.
    pub fn is_damaged(&self) -> bool {
        match self {
            JournalError::At { source, .. } => source.is_damaged(),
            JournalError::Io { .. }
            | JournalError::Unencodable { .. }
            | JournalError::StateDirSymlink { .. }
            | JournalError::StateDirNotDir { .. }
            | JournalError::StateDirOwner { .. }
            | JournalError::StateDirWritable { .. } => false,
            _ => true,
        }
    }

    /// The error without the receiver's own paths, for a message to a peer
    /// (the full error goes to the receiver's log).
    pub fn peer_text(&self) -> String {
        match self {
            JournalError::At { source, .. } => source.peer_text(),
            JournalError::Io { action, source, .. } => {
                format!("the receiver cannot {action} its journal: {source} (see its log)")
            }
            other => other.to_string(),
        }
    }

    pub(crate) fn at(self, path: PathBuf) -> Self {
        JournalError::At {
            path,
            source: Box::new(self),
        }
    }
}
