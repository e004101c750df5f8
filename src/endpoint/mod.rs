//! What a SRC or DST argument means, and opening it.
//!
//! * an NBD URI (`nbd://`, `nbd+unix://`) — used directly;
//! * a raw regular file or a block device — opened directly (io_uring /
//!   pread on the fd);
//! * an image in another format (qcow2, vmdk, vhdx, vdi, vpc, …) — served by
//!   a qemu-nbd child process ([`qemu::QemuNbdChild`]) on a private Unix
//!   socket, then used as an NBD URI.

use std::path::PathBuf;

pub mod file;
pub mod qemu;

use crate::nbd::uri::NbdUri;

/// Errors opening or preparing an endpoint. Each message names the path or
/// URI and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad NBD URI {uri:?}: {why}")]
    BadUri { uri: String, why: String },
    #[error("{0}")]
    Nbd(#[from] crate::nbd::NbdError),
    #[error("qemu-nbd for {path}: {why}")]
    QemuNbd { path: String, why: String },
    #[error(
        "target {target} is {target_bytes} bytes, smaller than the source ({source_bytes} bytes); refusing to write anything"
    )]
    TargetTooSmall {
        target: String,
        target_bytes: u64,
        source_bytes: u64,
    },
    #[error("{0}")]
    Other(String),
}

/// What kind of thing a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    BlockDevice,
}

/// A parsed SRC/DST argument, before anything is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Nbd(NbdUri),
    /// A raw file or block device (a path that does not exist yet, as a
    /// target, is a raw file unless its extension names a format).
    Raw(PathBuf),
    /// An image in a non-raw format, to be served by qemu-nbd.
    Image {
        path: PathBuf,
        format: String,
    },
}
