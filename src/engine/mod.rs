//! I/O engines. Both engines execute the same [`Op`]s and report
//! [`Completion`]s; the pipeline's workers are written once against
//! [`IoEngine`] and run unchanged on either.
//!
//! Buffers inside an [`Op`] are raw pointers: the caller (the buffer pool and
//! the NBD connection state, both owned by the worker) guarantees that the
//! memory stays valid and untouched until the op's completion is returned by
//! [`IoEngine::wait`]. A worker never drops an engine with ops in flight: it
//! drains completions first.
// One of the two places unsafe code may live (see lib.rs): the engines and `sys` are where the tree talks to the kernel;
// every block carries a `// SAFETY:` note.
#![allow(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

use std::os::fd::RawFd;

pub mod iovec;
pub mod pin;
pub mod sys;
pub mod tcpinfo;
pub mod threads;
pub mod uring;

/// One I/O operation. Results follow syscall conventions: bytes transferred
/// (or 0) on success, `-errno` on failure.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// pread(2).
    Read {
        /// The file.
        fd: RawFd,
        /// Where the bytes go: `len` writable bytes.
        buf: *mut u8,
        /// Bytes to read.
        len: u32,
        /// Where in the file.
        offset: u64,
    },
    /// pwrite(2).
    Write {
        /// The file.
        fd: RawFd,
        /// The bytes: `len` readable bytes.
        buf: *const u8,
        /// Bytes to write.
        len: u32,
        /// Where in the file.
        offset: u64,
    },
    /// writev(2) on a socket (no offset). `iov` points to `iovcnt` iovecs
    /// that stay valid until completion.
    Writev {
        /// The socket.
        fd: RawFd,
        /// The first iovec.
        iov: *const libc::iovec,
        /// How many iovecs.
        iovcnt: u32,
    },
    /// recv(2) on a socket; `waitall` sets MSG_WAITALL.
    Recv {
        /// The socket.
        fd: RawFd,
        /// Where the bytes go: `len` writable bytes.
        buf: *mut u8,
        /// Bytes to receive (at most).
        len: u32,
        /// Wait until `len` bytes came (or the peer closed).
        waitall: bool,
    },
    /// fdatasync(2) (or fsync when `datasync` is false).
    Fsync {
        /// The file.
        fd: RawFd,
        /// fdatasync rather than fsync.
        datasync: bool,
    },
    /// fallocate(2) with the given mode (punch hole, zero range).
    Fallocate {
        /// The file.
        fd: RawFd,
        /// `FALLOC_FL_*` flags.
        mode: i32,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// sync_file_range(2): start (and optionally wait for) writeback of a
    /// range, so written data streams to disk instead of piling up dirty.
    SyncFileRange {
        /// The file.
        fd: RawFd,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u32,
        /// `SYNC_FILE_RANGE_*` flags.
        flags: u32,
    },
    /// posix_fadvise(2), e.g. POSIX_FADV_DONTNEED on ranges already on disk.
    Fadvise {
        /// The file.
        fd: RawFd,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u32,
        /// `POSIX_FADV_*` advice.
        advice: i32,
    },
}

// SAFETY: an Op is a plain description; the pointers it carries are only
// dereferenced by an engine while the submitter guarantees their validity
// (memory valid and untouched until the op's completion is returned, see the
// module docs). That guarantee is about time, not about which thread looks:
// the threaded engine's pool thread dereferences them on the submitter's
// behalf, and the submitter does not touch the memory meanwhile, so there is
// no data race.
unsafe impl Send for Op {}

/// The result of one [`Op`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The value given to [`IoEngine::push`].
    pub user_data: u64,
    /// Bytes transferred (>= 0) or `-errno`.
    pub result: i32,
}

/// Which engine to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring (default where the kernel allows it).
    Uring,
    /// Plain threads doing blocking pread/pwrite/send/recv.
    Threads,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Threads => "threads",
        })
    }
}

/// An I/O engine owned by exactly one worker thread.
pub trait IoEngine {
    /// Queue one op. It may not start until the next [`IoEngine::wait`].
    fn push(&mut self, user_data: u64, op: Op) -> std::io::Result<()>;
    /// Submit queued ops and block until at least `min_complete` completions
    /// are available (0 = do not block); append them to `out`.
    fn wait(&mut self, min_complete: usize, out: &mut Vec<Completion>) -> std::io::Result<()>;
    /// Number of ops pushed whose completion has not yet been returned.
    fn in_flight(&self) -> usize;
    /// Which engine this is.
    fn kind(&self) -> EngineKind;
}

/// Misuse of an engine that both engines report the same way. Turned into
/// [`std::io::Error`] at the trait boundary (`ErrorKind::WouldBlock` for
/// [`EngineError::Full`], `ErrorKind::InvalidInput` for the others).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The caller pushed more ops than the `max_in_flight` the engine was
    /// built for; wait for completions before pushing more.
    #[error("engine is full: {max_in_flight} ops already in flight; wait for completions first")]
    Full {
        /// The limit given to the engine's constructor.
        max_in_flight: u32,
    },
    /// `wait` was asked for more completions than there are ops in flight,
    /// which would block forever.
    #[error("asked to wait for {min_complete} completions but only {in_flight} ops are in flight")]
    WaitTooMany {
        /// What the caller asked for.
        min_complete: usize,
        /// Ops pushed whose completion has not been returned yet.
        in_flight: usize,
    },
    /// `max_in_flight` must be at least 1.
    #[error("max_in_flight must be at least 1")]
    ZeroDepth,
}

impl From<EngineError> for std::io::Error {
    fn from(e: EngineError) -> Self {
        let kind = match e {
            EngineError::Full { .. } => std::io::ErrorKind::WouldBlock,
            EngineError::WaitTooMany { .. } | EngineError::ZeroDepth => {
                std::io::ErrorKind::InvalidInput
            }
        };
        std::io::Error::new(kind, e)
    }
}

/// Build an engine of the requested kind for a worker that keeps at most
/// `max_in_flight` ops in flight.
pub fn build(kind: EngineKind, max_in_flight: u32) -> std::io::Result<Box<dyn IoEngine>> {
    match kind {
        EngineKind::Uring => Ok(Box::new(uring::UringEngine::new(max_in_flight)?)),
        EngineKind::Threads => Ok(Box::new(threads::ThreadsEngine::new(max_in_flight)?)),
    }
}

/// Decide which engine to run: probe io_uring (ring setup plus every opcode
/// diskferry uses) when `requested` is `None` or `Uring`.
/// Returns the engine kind to use and, when falling back, the reason to log.
pub fn choose(requested: Option<EngineKind>) -> Result<(EngineKind, Option<String>), String> {
    match requested {
        Some(EngineKind::Threads) => Ok((EngineKind::Threads, None)),
        Some(EngineKind::Uring) => uring::probe().map(|()| (EngineKind::Uring, None)),
        None => match uring::probe() {
            Ok(()) => Ok((EngineKind::Uring, None)),
            Err(why) => Ok((
                EngineKind::Threads,
                Some(format!("{why}; running the threaded engine")),
            )),
        },
    }
}
