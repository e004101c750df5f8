//! The generic pipeline behind `copy` and `send`: a job's planner thread,
//! its contexts on the engine's workers, its share of the buffer budget,
//! and what happens when a job fails (drain, then cut off). The caller owns
//! the control loop.

#![forbid(unsafe_code)]

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::attach::{ContextCommon, attach_contexts, reserve};
use super::control::JobControl;
use super::exits::Exits;
use super::planner::spawn_planner;
use super::pool::BufferPool;
pub use super::requests::Requests;
use super::silence::{SilenceWatch, watch_all};
use super::sink::Sink;
use super::split::{socket_clones, split_dst, split_src};
use super::stats::Snapshot;
use super::worker::{DstIo, SinkIo, SrcIo};
use super::{CopyError, Shared};
use crate::endpoint::open::Access;
use crate::engine::EngineKind;
use crate::plan::maps::ExtentList;
use crate::runtime::Engine;

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
    /// Plan only these whole-window spans ([`crate::plan::windows::plan_windows`]);
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
    /// Plan exactly these copy and zero extents (an incremental pass,
    /// [`crate::plan::pass_work`]) instead of the source's windows; `spans`
    /// and `lanes` are then unused.
    pub exact: Option<Vec<crate::plan::PassExtent>>,
}

/// Where the workers put what they read.
pub enum DstPlan {
    /// Write to a file, block device or NBD export.
    Access { access: Access, fresh_zero: bool },
    /// Lend chunks to other threads (network senders).
    Sink {
        window_digests: bool,
        /// The digest each data run takes right after its read (`None`:
        /// none; a delta pass digests only the pieces it sends).
        run_digest: Option<crate::wire::ChunkDigest>,
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
        let (workers, conns_max) = size_job(engine, cfg, &src_access, &dst);
        let (requests, requests_max) = cfg.requests.resolve(&src_access, &dst);
        // The pool is asked for the deepest queue; its pages are touched
        // only as slots are used, and workers use their lowest slots first.
        // The engine's budget may grant less (see `runtime::budget`).
        let want_slots = (conns_max * requests_max as usize).max(workers);
        let grant = reserve(engine, &control, cfg, want_slots, workers)?;
        let mut pool = grant.pool;
        let workers = grant.workers.len();
        let slots = pool.slots();
        tracing::debug!(requests, requests_max, workers, slots, "job sized");
        let shares = pool.shares(workers);
        // A deep queue: items are small (a window and its run list), and the
        // planner, which sleeps when the queue is full, must never leave the
        // workers waiting.
        let shared = Arc::new(Shared::new(
            (slots * 64).max(QUEUE_ITEMS_MIN),
            Arc::clone(&control),
        ));
        let planned_bytes = match (&cfg.exact, &cfg.spans) {
            (Some(items), _) => items
                .iter()
                .filter(|e| e.kind == crate::plan::PassKind::Copy)
                .map(|e| e.len)
                .sum(),
            (None, Some(spans)) => extents.data_bytes_within(spans),
            (None, None) => extents.data_bytes(),
        };
        shared.stats.bytes_planned.store(planned_bytes, Relaxed);
        shared.stats.planning_done.store(true, Relaxed);

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
        let slots_per: Vec<usize> = shares.iter().map(|s| s.slots()).collect();
        let side = dst_side(dst, &slots_per, cfg.io_timeout)?;
        emergency.extend(side.emergency);
        watched.extend(side.watched);
        let planner = spawn_planner(cfg, extents, size_bytes, side.fresh_zero, &shared)?;
        // The last context out tells the senders (if any) that nothing more
        // will reach the sink, without waiting for a control-loop tick.
        let exits = Exits::new(
            side.sink
                .clone()
                .map(|s| Box::new(move || s.set_producers_done()) as Box<dyn Fn() + Send + Sync>),
        );
        let zero_max_bytes = match &side.ios[0] {
            DstIo::Nbd(c) => u64::from(c[0].info.block_max.max(4096)).min(1 << 30),
            DstIo::File { .. } | DstIo::Sink(_) => 1 << 30,
        };
        // Each context starts at its part of the start depth.
        let depth_start = (conns_max * requests as usize).div_ceil(workers);
        let common = ContextCommon {
            read_retries: cfg.read_retries,
            shared: &shared,
            exits: &exits,
            depth_start,
            zero_max_bytes,
            ops_max: grant.ops_per_context,
        };
        let ends = src_ios.into_iter().zip(side.ios).collect();
        let handles = attach_contexts(engine, &grant.workers, shares, ends, &common);
        Ok(Self {
            engine: engine.clone(),
            shared,
            handles,
            exits,
            planner,
            emergency,
            silence: SilenceWatch::new(watched, cfg.io_timeout),
            doorbells: side.doorbells,
            sink: side.sink,
            keep: Keep {
                pool,
                src_file,
                dst_files: side.files,
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

/// How many of the engine's workers a job runs on, and the most NBD
/// connections on either side.
fn size_job(
    engine: &Engine,
    cfg: &PipelineConfig,
    src_access: &Access,
    dst: &DstPlan,
) -> (usize, usize) {
    let engine_workers = engine.workers().max(1);
    // Every worker for a copy. `send` with an NBD server on this machine
    // (a Unix socket: qemu-nbd, nbdkit, our own qemu-nbd child) leaves
    // that server and its TLS senders half the cores.
    //
    // A copy used to leave the half too unless the target was a file.
    // Each worker is one chain of reads and writes (it keeps one buffered
    // write in flight, see `Worker::issue_write`), and with one chain a
    // 2-core copy waited on it (same-run A/Bs of sessions 3 and 6 in
    // docs/bench/history.md#workers).
    let local_server = is_local_nbd(src_access)
        || matches!(dst, DstPlan::Access { access, .. } if is_local_nbd(access));
    let default_threads = match dst {
        DstPlan::Sink { .. } if local_server => (engine_workers / 2).max(1),
        _ => engine_workers,
    };
    let threads = cfg
        .threads
        .map_or(default_threads, |t| t.max(1) as usize)
        .min(engine_workers);
    let src_conns = src_access.nbd_connections();
    let dst_conns = match dst {
        DstPlan::Access { access, .. } => access.nbd_connections(),
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
    (workers, conns_max)
}

/// The target as the contexts see it, and what the coordinator keeps.
struct DstSide {
    ios: Vec<DstIo>,
    files: Option<DstFiles>,
    fresh_zero: bool,
    sink: Option<Arc<Sink>>,
    doorbells: Vec<UnixStream>,
    emergency: Vec<crate::nbd::uri::NbdStream>,
    watched: Vec<crate::pipeline::silence::Watched>,
}

/// Deal out the target to contexts holding `slots_per` slots each.
fn dst_side(dst: DstPlan, slots_per: &[usize], io_timeout: Duration) -> Result<DstSide, CopyError> {
    let workers = slots_per.len();
    match dst {
        DstPlan::Access { access, fresh_zero } => {
            let emergency = socket_clones(&access);
            let (ios, files) = split_dst(access, fresh_zero, workers, io_timeout);
            let watched = watch_all(
                ios.iter()
                    .flat_map(|d| match d {
                        DstIo::Nbd(conns) => conns.as_slice(),
                        DstIo::File { .. } | DstIo::Sink(_) => &[],
                    })
                    .map(|c| &**c),
                false,
            );
            Ok(DstSide {
                ios,
                files,
                fresh_zero,
                sink: None,
                doorbells: Vec::new(),
                emergency,
                watched,
            })
        }
        DstPlan::Sink {
            window_digests,
            run_digest,
        } => {
            let (sink, rx) =
                Sink::new(slots_per).map_err(|e| CopyError::Internal(format!("sink: {e}")))?;
            let sink = Arc::new(sink);
            let mut ios = Vec::new();
            let mut doorbells = Vec::new();
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
            Ok(DstSide {
                ios,
                files: None,
                fresh_zero: false,
                sink: Some(sink),
                doorbells,
                emergency: Vec::new(),
                watched: Vec::new(),
            })
        }
    }
}

/// How long workers may take to finish outstanding requests after an error.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
