//! Giving each worker context its view of the source and the target: file
//! descriptors shared, NBD connections dealt out.

#![forbid(unsafe_code)]

use std::os::fd::AsRawFd;
use std::time::Duration;

use super::nbd_io::NbdIo;
use super::run::DstFiles;
use super::worker::{DstIo, SrcIo};
use crate::endpoint::open::{Access, NbdConnection};

/// Clones of every NBD socket, to cut off workers that cannot drain.
pub(super) fn socket_clones(access: &Access) -> Vec<crate::nbd::uri::NbdStream> {
    match access {
        Access::Nbd { conns } => conns
            .iter()
            .filter_map(|(s, _)| s.try_clone().ok())
            .collect(),
        Access::File { .. } => Vec::new(),
    }
}

// Boxed so a connection never moves while the kernel holds pointers into it.
#[allow(clippy::vec_box)]
pub(super) fn distribute(
    conns: Vec<NbdConnection>,
    workers: usize,
    io_timeout: Duration,
) -> Vec<Vec<Box<NbdIo>>> {
    let mut out: Vec<Vec<Box<NbdIo>>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, (stream, info)) in conns.into_iter().enumerate() {
        out[i % workers].push(NbdIo::new(stream, info, io_timeout));
    }
    out
}

/// Give each worker its view of the source. Files stay owned by the
/// coordinator (workers get the raw fd, valid until the file is dropped
/// after every worker has been joined); NBD connections move to workers.
pub(super) fn split_src(
    access: Access,
    workers: usize,
    io_timeout: Duration,
) -> (Vec<SrcIo>, Option<std::fs::File>) {
    match access {
        Access::File { file, .. } => (
            (0..workers)
                .map(|_| SrcIo::File {
                    fd: file.as_raw_fd(),
                })
                .collect(),
            Some(file),
        ),
        Access::Nbd { conns } => (
            distribute(conns, workers, io_timeout)
                .into_iter()
                .map(SrcIo::Nbd)
                .collect(),
            None,
        ),
    }
}

/// Like [`split_src`]; the O_DIRECT descriptor (if any) is kept alive with
/// the file and synced with it.
pub(super) fn split_dst(
    access: Access,
    fresh_zero: bool,
    workers: usize,
    io_timeout: Duration,
) -> (Vec<DstIo>, Option<DstFiles>) {
    match access {
        Access::File { file, direct, .. } => {
            let fd = file.as_raw_fd();
            let direct_fd = direct.as_ref().map(|d| d.as_raw_fd());
            let ios = (0..workers)
                .map(|_| DstIo::File {
                    fd,
                    direct_fd,
                    fresh_zero,
                })
                .collect();
            (ios, Some(DstFiles { file, direct }))
        }
        Access::Nbd { conns } => (
            distribute(conns, workers, io_timeout)
                .into_iter()
                .map(DstIo::Nbd)
                .collect(),
            None,
        ),
    }
}
