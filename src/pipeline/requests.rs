//! How deep each connection's queue is: fixed by the user, or chosen by
//! where the ends are (this host or across a network).

#![forbid(unsafe_code)]

use super::CopyError;
use super::run::DstPlan;
use crate::endpoint::open::Access;

/// Requests in flight per connection: how deep the source's queue is, and
/// with the chunk size how many bytes of buffers are in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requests {
    /// As the user asked (`--requests N`).
    Fixed(u32),
    /// Start at `near` when every end is on this host (a file, an NBD
    /// server on a Unix socket or on a loopback address) and let each
    /// worker deepen towards `far` while its reads show no queueing
    /// ([`super::depth::DepthCtl`]: a slow server behind a local socket);
    /// `far` from the start otherwise.
    ///
    /// A queue only has to cover the source's latency. On this host that
    /// is microseconds, and a shallow queue keeps the buffers in the
    /// cores' L2 caches while a chunk is read, scanned, hashed and written:
    /// on the 2-core bench machine (2 MiB of L2 per core) 8 requests of
    /// 256 KiB in flight beat 16, 32 and 256 in every same-run A/B
    /// (docs/bench/history.md#queue-depth-and-working-set-session-4), and
    /// shallow queues keep the target's writeback steady instead of
    /// bursty. A server across a network needs a queue as deep as its
    /// bandwidth-delay product.
    Auto { near: u32, far: u32 },
}

impl Requests {
    /// `--requests N` as given, or [`Requests::Auto`] when it was not.
    pub fn from_flag(requests: Option<u32>, near: u32, far: u32) -> Self {
        requests.map_or(Requests::Auto { near, far }, Requests::Fixed)
    }

    /// Refuse `--connections`, `--requests` and `--lanes` out of range.
    pub fn check_flags(
        connections: u32,
        requests: Option<u32>,
        lanes: u32,
    ) -> Result<(), CopyError> {
        if connections == 0 || connections > 64 || requests.is_some_and(|r| r == 0 || r > 1024) {
            return Err(CopyError::Usage(
                "--connections must be 1..=64 and --requests 1..=1024".into(),
            ));
        }
        if !(1..=crate::plan::lanes::LANES_MAX).contains(&lanes) {
            return Err(CopyError::Usage(format!(
                "--lanes must be 1..={}",
                crate::plan::lanes::LANES_MAX
            )));
        }
        Ok(())
    }

    /// Requests per connection for these ends: where each worker starts,
    /// and the most it may grow to.
    pub fn resolve(self, src: &Access, dst: &DstPlan) -> (u32, u32) {
        match self {
            Requests::Fixed(n) => (n, n),
            Requests::Auto { near, far } => {
                let dst_near = match dst {
                    DstPlan::Access { access, .. } => is_near(access),
                    // The network senders hold a chunk only until it is in
                    // the socket: the link's depth is the socket buffers'.
                    DstPlan::Sink { .. } => true,
                };
                if is_near(src) && dst_near {
                    (near.min(far), far)
                } else {
                    (far, far)
                }
            }
        }
    }
}

/// Whether an endpoint answers with this host's latency.
fn is_near(access: &Access) -> bool {
    match access {
        Access::File { .. } => true,
        Access::Nbd { conns } => conns
            .first()
            .is_none_or(|(stream, _)| stream_is_near(stream)),
    }
}

fn stream_is_near(stream: &crate::nbd::uri::NbdStream) -> bool {
    match stream {
        crate::nbd::uri::NbdStream::Unix(_) => true,
        crate::nbd::uri::NbdStream::Tcp(t) => t
            .peer_addr()
            .is_ok_and(|a| a.ip().to_canonical().is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::uri::NbdStream;
    use crate::pipeline::run::DstPlan;

    const AUTO: Requests = Requests::Auto { near: 2, far: 64 };

    fn nbd(stream: NbdStream) -> Access {
        Access::Nbd {
            conns: vec![(stream, Default::default())],
        }
    }

    fn sink() -> DstPlan {
        DstPlan::Sink {
            window_digests: false,
            run_digest: Some(crate::wire::ChunkDigest::Xxh3),
        }
    }

    #[test]
    fn unix_sockets_files_and_loopback_are_near() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(AUTO.resolve(&nbd(NbdStream::Unix(a)), &sink()), (2, 64));

        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = std::net::TcpListener::bind(host) else {
                continue; // no IPv6 here
            };
            let t = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            assert!(stream_is_near(&NbdStream::Tcp(t.try_clone().unwrap())));
            assert_eq!(
                AUTO.resolve(&nbd(NbdStream::Tcp(t)), &sink()),
                (2, 64),
                "{host}"
            );
        }

        let f = tempfile::tempfile().unwrap();
        let file = || Access::File {
            file: f.try_clone().unwrap(),
            kind: crate::endpoint::FileKind::Regular,
            direct: None,
        };
        let to_file = DstPlan::Access {
            access: file(),
            fresh_zero: true,
        };
        assert_eq!(AUTO.resolve(&file(), &to_file), (2, 64));
    }

    #[test]
    fn a_fixed_depth_is_kept() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            Requests::Fixed(7).resolve(&nbd(NbdStream::Unix(a)), &sink()),
            (7, 7)
        );
    }
}
