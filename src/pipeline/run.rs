//! The generic pipeline behind `copy` and `send`: planner thread, one
//! pinned worker per core, the buffer pool, and what happens when a job
//! fails (drain, then cut off). The caller owns the control loop.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::control::JobControl;
use super::exits::Exits;
use super::lanes::plan_lanes;
use super::maps::ExtentList;
use super::nbd_io::NbdIo;
use super::open::{Access, NbdConnection};
use super::plan::Work;
use super::pool::BufferPool;
use super::silence::{SilenceWatch, watch_all};
use super::sink::Sink;
use super::stats::{Snapshot, Stats};
use super::worker::{DstIo, SinkIo, SrcIo, WorkerConfig};
use super::{CopyError, Shared, zero};
use crate::engine::EngineKind;
use crate::runtime::Engine;
use crate::runtime::budget::BudgetError;
use crate::runtime::thread::Seed;

/// Smallest work queue (items).
const QUEUE_ITEMS_MIN: usize = 4096;

/// How often control loops wake up.
pub const TICK: Duration = Duration::from_millis(10);

/// How long an NBD server may leave a connection, its handshake or a
/// request unanswered (`--io-timeout`'s default).
pub const IO_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// Sizing of a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Most workers this job runs on (`None`: every worker of the engine,
    /// or half of them for a send from a server on this host).
    pub threads: Option<u32>,
    /// NBD connections per side (also sizes the pool with `requests`).
    pub connections: u32,
    pub requests: Requests,
    pub chunk_bytes: u32,
    /// Plan only these whole-window spans ([`super::plan::plan_windows`]);
    /// `None`: the whole disk.
    pub spans: Option<Vec<(u64, u64)>>,
    /// Retries of a source read that failed with an error that may pass
    /// (default [`super::retry::READ_RETRIES_DEFAULT`]; 0: fail at once).
    pub read_retries: u32,
    /// Regions of the disk planned side by side ([`super::lanes`]); 1 plans
    /// in ascending order.
    pub lanes: u32,
    /// An NBD connection waiting this long for its server without a byte
    /// back fails the job ([`Pipeline::tick`]).
    pub io_timeout: Duration,
}

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
    /// (docs/benchmarks.md, session 4), and shallow queues keep the
    /// target's writeback steady instead of bursty. A server across a
    /// network needs a queue as deep as its bandwidth-delay product.
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
        if !(1..=super::lanes::LANES_MAX).contains(&lanes) {
            return Err(CopyError::Usage(format!(
                "--lanes must be 1..={}",
                super::lanes::LANES_MAX
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

/// Where the workers put what they read.
pub enum DstPlan {
    /// Write to a file, block device or NBD export.
    Access { access: Access, fresh_zero: bool },
    /// Lend chunks to other threads (network senders).
    Sink {
        window_digests: bool,
        run_digest: crate::wire::ChunkDigest,
    },
}

/// What must stay alive until every user of the data buffers is gone.
pub struct Keep {
    pub pool: BufferPool,
    pub src_file: Option<std::fs::File>,
    pub dst_files: Option<DstFiles>,
}

/// The target's descriptors, owned by the coordinator for the whole job.
pub struct DstFiles {
    pub file: std::fs::File,
    pub direct: Option<std::fs::File>,
}

/// Result of [`Pipeline::join`].
pub struct Joined {
    pub result: Result<Snapshot, CopyError>,
    pub src_back: Vec<SrcIo>,
    pub dst_back: Vec<DstIo>,
    pub keep: Keep,
}

/// A running pipeline.
pub struct Pipeline {
    engine: Engine,
    shared: Arc<Shared>,
    /// Each worker context's connections, sent back when it finished.
    handles: Vec<mpsc::Receiver<(SrcIo, DstIo)>>,
    /// Counts the workers out (see [`Self::wait_finished`]).
    exits: Arc<Exits>,
    planner: JoinHandle<()>,
    emergency: Vec<crate::nbd::uri::NbdStream>,
    /// Every NBD connection's silence, watched against the I/O timeout.
    silence: SilenceWatch,
    doorbells: Vec<UnixStream>,
    sink: Option<Arc<Sink>>,
    keep: Keep,
    abort_seen: Option<Instant>,
    requests: u32,
    kind: EngineKind,
}

fn is_local_nbd(access: &Access) -> bool {
    matches!(access, Access::Nbd { conns } if matches!(conns.first(), Some((crate::nbd::uri::NbdStream::Unix(_), _))))
}

fn conns_of(access: &Access) -> Option<usize> {
    match access {
        Access::File { .. } => None,
        Access::Nbd { conns } => Some(conns.len()),
    }
}

impl Pipeline {
    /// Start the planner and attach one context per worker used to the
    /// engine's workers. `control` is the job's pause, cancel and rate.
    pub fn start(
        engine: &Engine,
        control: Arc<JobControl>,
        cfg: &PipelineConfig,
        src_access: Access,
        extents: ExtentList,
        size_bytes: u64,
        dst: DstPlan,
    ) -> Result<Self, CopyError> {
        let engine_workers = engine.workers().max(1);
        // Every worker for a copy. `send` with an NBD server on this
        // machine (a Unix socket: qemu-nbd, nbdkit, our own qemu-nbd child)
        // leaves that server and its TLS senders half the cores.
        //
        // A copy used to leave the half too unless the target was a file.
        // Each worker is one chain of reads and writes (it keeps one
        // buffered write in flight, see `Worker::issue_write`), and with one
        // chain a 2-core copy waited on it (same-run A/Bs in
        // docs/benchmarks.md, sessions 4 and 6).
        let local_server = is_local_nbd(&src_access)
            || matches!(&dst, DstPlan::Access { access, .. } if is_local_nbd(access));
        let default_threads = match dst {
            DstPlan::Sink { .. } if local_server => (engine_workers / 2).max(1),
            _ => engine_workers,
        };
        let threads = cfg
            .threads
            .map_or(default_threads, |t| t.max(1) as usize)
            .min(engine_workers);
        let src_conns = conns_of(&src_access);
        let dst_conns = match &dst {
            DstPlan::Access { access, .. } => conns_of(access),
            DstPlan::Sink { .. } => None,
        };
        let workers = [Some(threads), src_conns, dst_conns]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(1)
            .max(1);
        let conns_max = src_conns
            .unwrap_or(0)
            .max(dst_conns.unwrap_or(0))
            .max(cfg.connections as usize);
        let (requests, requests_max) = cfg.requests.resolve(&src_access, &dst);
        // The pool is asked for the deepest queue; its pages are touched
        // only as slots are used, and workers use their lowest slots first.
        // The engine's budget may grant less (see `runtime::budget`).
        let want_slots = (conns_max * requests_max as usize).max(workers);
        let chunk_bytes = cfg.chunk_bytes;
        let grant = engine
            .budget()
            .reserve(want_slots, chunk_bytes as usize, workers, &|| {
                control.is_cancelled()
            })
            .map_err(|e| match e {
                BudgetError::GaveUp => CopyError::Cancelled,
                BudgetError::TooSmall { .. } => CopyError::Usage(e.to_string()),
                BudgetError::Pool(_) => CopyError::Engine(e.to_string()),
            })?;
        let mut pool = grant.pool;
        let workers = grant.workers.len();
        let slots = pool.slots();
        tracing::debug!(
            requests,
            requests_max,
            workers,
            slots,
            "requests in flight per connection"
        );
        let shares = pool.shares(workers);
        // A deep queue: items are small (a window and its run list), and the
        // planner, which sleeps when the queue is full, must never leave the
        // workers waiting.
        let shared = Arc::new(Shared::new(
            (slots * 64).max(QUEUE_ITEMS_MIN),
            Arc::clone(&control),
        ));
        let planned_bytes = match &cfg.spans {
            Some(spans) => extents.data_bytes_within(spans),
            None => extents.data_bytes(),
        };
        shared
            .stats
            .bytes_planned
            .store(planned_bytes, std::sync::atomic::Ordering::Relaxed);
        shared
            .stats
            .planning_done
            .store(true, std::sync::atomic::Ordering::Relaxed);

        let mut emergency = socket_clones(&src_access);
        let (src_ios, src_file) = split_src(src_access, workers, cfg.io_timeout);
        let mut watched = watch_all(
            src_ios
                .iter()
                .flat_map(|s| match s {
                    SrcIo::Nbd(conns) => conns.as_slice(),
                    SrcIo::File { .. } => &[],
                })
                .map(|c| &**c),
            true,
        );
        let mut doorbells = Vec::new();
        let (dst_ios, dst_files, fresh_zero, sink) = match dst {
            DstPlan::Access { access, fresh_zero } => {
                emergency.extend(socket_clones(&access));
                let (ios, files) = split_dst(access, fresh_zero, workers, cfg.io_timeout);
                watched.extend(watch_all(
                    ios.iter()
                        .flat_map(|d| match d {
                            DstIo::Nbd(conns) => conns.as_slice(),
                            DstIo::File { .. } | DstIo::Sink(_) => &[],
                        })
                        .map(|c| &**c),
                    false,
                ));
                (ios, files, fresh_zero, None)
            }
            DstPlan::Sink {
                window_digests,
                run_digest,
            } => {
                let per: Vec<usize> = shares.iter().map(|s| s.slots()).collect();
                let (sink, rx) =
                    Sink::new(&per).map_err(|e| CopyError::Internal(format!("sink: {e}")))?;
                let sink = Arc::new(sink);
                let mut ios = Vec::new();
                for r in rx {
                    doorbells.push(
                        r.try_clone()
                            .map_err(|e| CopyError::Internal(format!("doorbell: {e}")))?,
                    );
                    ios.push(DstIo::Sink(SinkIo::new(
                        Arc::clone(&sink),
                        r,
                        window_digests,
                        run_digest,
                    )));
                }
                (ios, None, false, Some(sink))
            }
        };

        let planner = {
            let shared = Arc::clone(&shared);
            let spans = cfg.spans.clone();
            let lanes = cfg.lanes;
            std::thread::Builder::new()
                .name("planner".into())
                .spawn(move || {
                    run_planner(
                        extents,
                        spans,
                        size_bytes,
                        chunk_bytes,
                        lanes,
                        fresh_zero,
                        &shared,
                    )
                })
                .map_err(|e| CopyError::Internal(format!("spawning the planner: {e}")))?
        };
        let zero_max_bytes = match &dst_ios[0] {
            DstIo::Nbd(c) => u64::from(c[0].info.block_max.max(4096)).min(1 << 30),
            DstIo::File { .. } | DstIo::Sink(_) => 1 << 30,
        };
        let mut handles = Vec::with_capacity(workers);
        // The last context out tells the senders (if any) that nothing more
        // will reach the sink, without waiting for a control-loop tick.
        let exits = Exits::new(
            sink.clone()
                .map(|s| Box::new(move || s.set_producers_done()) as Box<dyn Fn() + Send + Sync>),
        );
        // Each context starts at its part of the start depth.
        let depth_start = (conns_max * requests as usize).div_ceil(workers);
        for (i, ((share, src), dst)) in shares.into_iter().zip(src_ios).zip(dst_ios).enumerate() {
            let (back, back_rx) = mpsc::channel();
            let cfg = WorkerConfig {
                depth_start: depth_start.min(share.slots()).max(1),
                index: i,
                granule_bytes: zero::GRANULE_BYTES,
                zero_max_bytes,
                read_retries: cfg.read_retries,
            };
            let seed = Seed {
                cfg,
                shared: Arc::clone(&shared),
                share,
                src,
                dst,
                ops_max: grant.ops_per_context,
                back,
                exit: exits.enter(),
            };
            engine.attach(grant.workers[i], seed);
            handles.push(back_rx);
        }
        Ok(Self {
            engine: engine.clone(),
            shared,
            handles,
            exits,
            planner,
            emergency,
            silence: SilenceWatch::new(watched, cfg.io_timeout),
            doorbells,
            sink,
            keep: Keep {
                pool,
                src_file,
                dst_files,
            },
            abort_seen: None,
            requests,
            kind: engine.kind(),
        })
    }

    /// The I/O engine the workers run.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn sink(&self) -> Option<Arc<Sink>> {
        self.sink.clone()
    }

    /// Workers this job runs on.
    pub fn workers(&self) -> usize {
        self.handles.len()
    }

    /// Requests in flight per connection at the start, as resolved for
    /// these ends.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// True once every worker has stopped, waiting up to `timeout` for the
    /// last one and returning as soon as it did.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        self.exits.wait_all(timeout)
    }

    /// Call from the control loop: fails the job and cuts off a
    /// connection whose server has been silent for the I/O timeout, and
    /// cuts off workers that cannot drain within [`DRAIN_TIMEOUT`] after a
    /// failure.
    pub fn tick(&mut self) {
        self.silence.check(&self.shared);
        if self.shared.aborted() {
            if self.abort_seen.is_none() {
                // Contexts parked by a pause must see the abort too.
                self.engine.wake_all();
            }
            let seen = *self.abort_seen.get_or_insert_with(Instant::now);
            if seen.elapsed() > DRAIN_TIMEOUT {
                for s in &self.emergency {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                for d in &self.doorbells {
                    let _ = d.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }

    /// Wait for the workers and the planner; check that every planned byte
    /// was handled.
    pub fn join(self) -> Joined {
        let mut src_back = Vec::new();
        let mut dst_back = Vec::new();
        for h in self.handles {
            match h.recv() {
                Ok((s, d)) => {
                    src_back.push(s);
                    dst_back.push(d);
                }
                Err(_) => self
                    .shared
                    .fail(CopyError::Internal("a worker panicked".into())),
            }
        }
        if self.planner.join().is_err() {
            self.shared
                .fail(CopyError::Internal("the planner panicked".into()));
        }
        let result = match self.shared.take_error() {
            Some(e) => Err(e),
            None => {
                let snap = self.shared.stats.snapshot();
                if snap.bytes_done == snap.bytes_planned {
                    Ok(snap)
                } else {
                    Err(CopyError::Internal(format!(
                        "handled {} of {} planned bytes; refusing to report success",
                        snap.bytes_done, snap.bytes_planned
                    )))
                }
            }
        };
        Joined {
            result,
            src_back,
            dst_back,
            keep: self.keep,
        }
    }
}

fn run_planner(
    mut extents: ExtentList,
    spans: Option<Vec<(u64, u64)>>,
    size_bytes: u64,
    chunk_bytes: u32,
    lanes: u32,
    fresh_zero: bool,
    shared: &Shared,
) {
    let mut emit = |work: Work| -> Result<(), super::plan::PlanError> {
        if let Work::Zero { len, .. } = work
            && fresh_zero
        {
            Stats::add(&shared.stats.bytes_zeroed, len);
            return Ok(());
        }
        let mut item = work;
        let mut backoff = 0u32;
        loop {
            if shared.aborted() {
                return Ok(());
            }
            match shared.queue.push(item) {
                Ok(()) => return Ok(()),
                Err(back) => {
                    item = back;
                    backoff = backoff.saturating_add(1);
                    if backoff < 16 {
                        std::thread::yield_now();
                    } else {
                        // The queue holds thousands of items: no hurry.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    };
    let whole = [(0, size_bytes)];
    let spans = spans.as_deref().unwrap_or(&whole);
    let planned = plan_lanes(
        &mut extents,
        spans,
        size_bytes,
        chunk_bytes,
        lanes,
        &mut emit,
    );
    if let Err(e) = planned {
        shared.fail(e.into());
    }
    shared.set_planner_done();
}

/// How long workers may take to finish outstanding requests after an error.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Clones of every NBD socket, to cut off workers that cannot drain.
fn socket_clones(access: &Access) -> Vec<crate::nbd::uri::NbdStream> {
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
fn distribute(
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
fn split_src(
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
fn split_dst(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::uri::NbdStream;

    const AUTO: Requests = Requests::Auto { near: 2, far: 64 };

    fn nbd(stream: NbdStream) -> Access {
        Access::Nbd {
            conns: vec![(stream, Default::default())],
        }
    }

    fn sink() -> DstPlan {
        DstPlan::Sink {
            window_digests: false,
            run_digest: crate::wire::ChunkDigest::Xxh3,
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
