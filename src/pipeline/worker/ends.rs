//! The source and target as a worker sees them: a file, NBD connections,
//! or (target only) a sink that lends chunks to network senders.

#![forbid(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::pipeline::nbd_io::NbdIo;
use crate::pipeline::sink::Sink;

/// The source as a worker sees it.
pub enum SrcIo {
    File { fd: RawFd },
    Nbd(Vec<Box<NbdIo>>),
}

/// The target as a worker sees it.
pub enum DstIo {
    /// A regular file or block device. `fresh_zero`: reads as zeros
    /// everywhere already (a file we just truncated), so zeros are skipped.
    /// `direct_fd`: the same file with O_DIRECT, used for writes whose
    /// offset and length are multiples of [`DIRECT_ALIGN_BYTES`].
    File {
        fd: RawFd,
        direct_fd: Option<RawFd>,
        fresh_zero: bool,
    },
    Nbd(Vec<Box<NbdIo>>),
    /// Chunks are lent to other threads (network senders) through `sink`.
    Sink(SinkIo),
}

/// A worker's end of a [`Sink`].
pub struct SinkIo {
    pub sink: Arc<Sink>,
    /// Receiving end of this worker's doorbell.
    pub doorbell: std::os::unix::net::UnixStream,
    /// Also take a digest of every whole window (for `--verify`).
    pub window_digests: bool,
    /// The digest of every data run (`None`: runs are not digested).
    pub run_digest: Option<crate::wire::ChunkDigest>,
    pub(super) bell_buf: Box<[u8; 64]>,
    pub(super) armed: bool,
    /// Slots lent and not yet returned.
    pub(super) lent: usize,
}

impl SinkIo {
    pub fn new(
        sink: Arc<Sink>,
        doorbell: std::os::unix::net::UnixStream,
        window_digests: bool,
        run_digest: Option<crate::wire::ChunkDigest>,
    ) -> Self {
        Self {
            sink,
            doorbell,
            window_digests,
            run_digest,
            bell_buf: Box::new([0; 64]),
            armed: false,
            lent: 0,
        }
    }
}

/// Alignment O_DIRECT writes need (buffers are page-aligned by the pool).
pub const DIRECT_ALIGN_BYTES: u64 = 4096;
