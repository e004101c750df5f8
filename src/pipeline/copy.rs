//! The coordinator of `diskferry copy`: opens both ends, starts the planner
//! and one pinned worker per core, reports progress from the control
//! thread, and flushes the target before reporting success.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::maps::ExtentList;
use super::open::{Access, NbdConnection, Source, Target, open_source, open_target};
use super::plan::{Work, plan};
use super::pool::BufferPool;
use super::stats::{Snapshot, Stats};
use super::worker::{DstIo, SrcIo, Worker, WorkerConfig};
use super::{CopyError, Shared, nbd_io::NbdIo, zero};
use crate::engine::{self, EngineKind};
use crate::nbd::conn::Cmd;

/// Largest request the NBD protocol lets diskferry use.
pub const CHUNK_MAX_BYTES: u32 = 32 * 1024 * 1024;

/// What `diskferry copy` was asked to do.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub source: String,
    pub target: String,
    /// NBD connections per side (when the server allows multi-conn).
    pub connections: u32,
    /// Requests in flight per connection.
    pub requests: u32,
    pub chunk_bytes: u32,
    /// Worker threads (default: online CPUs).
    pub threads: Option<u32>,
    pub engine: Option<EngineKind>,
}

/// The result of a successful copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    pub source: String,
    pub target: String,
    pub size_bytes: u64,
    pub bytes_planned: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_zeroed: u64,
    pub elapsed_s: f64,
    pub engine: EngineKind,
    pub workers: usize,
    pub source_connections: usize,
    pub target_connections: usize,
}

/// Called about every `interval` with the counters, and once at the start.
pub type ProgressFn<'a> = &'a mut dyn FnMut(&Snapshot, Duration);

/// Run a copy to completion (target flushed) or to its first error.
pub fn run(opts: &CopyOptions, progress: ProgressFn<'_>) -> Result<CopyReport, CopyError> {
    if opts.chunk_bytes < 4096
        || opts.chunk_bytes > CHUNK_MAX_BYTES
        || !opts.chunk_bytes.is_power_of_two()
    {
        return Err(CopyError::Usage(format!(
            "--chunk-size must be a power of two between 4KiB and 32MiB, not {}",
            opts.chunk_bytes
        )));
    }
    if opts.connections == 0 || opts.connections > 64 || opts.requests == 0 || opts.requests > 1024
    {
        return Err(CopyError::Usage(
            "--connections must be 1..=64 and --requests 1..=1024".into(),
        ));
    }
    let started = Instant::now();
    let (kind, why) = engine::choose(opts.engine).map_err(CopyError::Engine)?;
    if let Some(why) = why {
        tracing::warn!("{why}");
    }
    let source = open_source(&opts.source, opts.connections)?;
    let target = open_target(&opts.target, source.size_bytes, opts.connections)?;
    tracing::info!(
        source = %source.display,
        target = %target.display,
        size_bytes = source.size_bytes,
        data_bytes = source.extents.data_bytes(),
        data_extents = source.extents.len(),
        engine = %kind,
        "copy starting"
    );
    run_opened(opts, kind, source, target, started, progress)
}

fn conns_of(access: &Access) -> Option<usize> {
    match access {
        Access::File { .. } => None,
        Access::Nbd { conns } => Some(conns.len()),
    }
}

fn run_opened(
    opts: &CopyOptions,
    kind: EngineKind,
    source: Source,
    target: Target,
    started: Instant,
    progress: ProgressFn<'_>,
) -> Result<CopyReport, CopyError> {
    let cpus = engine::pin::online_cpus().max(1);
    let threads = opts.threads.map_or(cpus, |t| t.max(1) as usize);
    let src_conns = conns_of(&source.access);
    let dst_conns = conns_of(&target.access);
    let workers = [Some(threads), src_conns, dst_conns]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(1)
        .max(1);
    let conns_max = src_conns
        .unwrap_or(0)
        .max(dst_conns.unwrap_or(0))
        .max(opts.connections as usize);
    let slots = (conns_max * opts.requests as usize).max(workers);
    let chunk_bytes = opts.chunk_bytes;
    let mut pool = BufferPool::new(slots, chunk_bytes as usize)
        .map_err(|e| CopyError::Engine(e.to_string()))?;
    let shares = pool.shares(workers);
    let shared = Arc::new(Shared::new(slots * 4));
    shared.stats.bytes_planned.store(
        source.extents.data_bytes(),
        std::sync::atomic::Ordering::Relaxed,
    );
    shared
        .stats
        .planning_done
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let Source {
        size_bytes,
        access: src_access,
        extents,
        child: src_child,
        display: src_display,
    } = source;
    let Target {
        access: dst_access,
        fresh_zero,
        child: dst_child,
        display: dst_display,
        ..
    } = target;
    let src_conn_count = src_conns.unwrap_or(0);
    let dst_conn_count = dst_conns.unwrap_or(0);

    // Split connections over workers.
    let emergency = socket_clones(&src_access, &dst_access);
    let (src_ios, src_keep) = split_src(src_access, workers);
    let (dst_ios, dst_keep) = split_dst(dst_access, fresh_zero, workers);

    let planner = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("planner".into())
            .spawn(move || run_planner(extents, size_bytes, chunk_bytes, fresh_zero, &shared))
            .map_err(|e| CopyError::Internal(format!("spawning the planner: {e}")))?
    };

    let zero_max_bytes = match &dst_ios[0] {
        DstIo::Nbd(c) => u64::from(c[0].info.block_max.max(4096)).min(1 << 30),
        DstIo::File { .. } | DstIo::Sink(_) => 1 << 30,
    };
    let mut handles = Vec::with_capacity(workers);
    for (i, ((share, src), dst)) in shares.into_iter().zip(src_ios).zip(dst_ios).enumerate() {
        let shared = Arc::clone(&shared);
        let max_in_flight = (share.slots() as u32) * 8 + 64;
        let cfg = WorkerConfig {
            index: i,
            granule_bytes: zero::GRANULE_BYTES,
            zero_max_bytes,
        };
        let h = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || {
                if let Err(e) = engine::pin::pin_current_thread(i % cpus) {
                    tracing::debug!("could not pin worker {i}: {e}");
                }
                // The ring is created on the thread that uses it.
                match engine::build(kind, max_in_flight) {
                    Ok(engine) => Worker::new(cfg, shared, engine, share, src, dst).run(),
                    Err(e) => {
                        shared.fail(CopyError::Engine(format!(
                            "setting up the {kind} engine: {e}"
                        )));
                        (src, dst)
                    }
                }
            })
            .map_err(|e| CopyError::Internal(format!("spawning worker {i}: {e}")))?;
        handles.push(h);
    }

    // The control thread: progress until every worker is done.
    let tick = Duration::from_millis(100);
    let report_every = Duration::from_secs(1);
    let mut last_report = Instant::now();
    progress(&shared.stats.snapshot(), started.elapsed());
    let mut abort_seen: Option<Instant> = None;
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(tick);
        if shared.aborted() {
            let seen = *abort_seen.get_or_insert_with(Instant::now);
            if seen.elapsed() > DRAIN_TIMEOUT {
                // Workers could not finish outstanding requests: cut them off.
                for s in &emergency {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
        }
        if last_report.elapsed() >= report_every {
            progress(&shared.stats.snapshot(), started.elapsed());
            last_report = Instant::now();
        }
    }
    let mut src_back = Vec::new();
    let mut dst_back = Vec::new();
    for h in handles {
        match h.join() {
            Ok((s, d)) => {
                src_back.push(s);
                dst_back.push(d);
            }
            Err(_) => shared.fail(CopyError::Internal("a worker panicked".into())),
        }
    }
    shared.fail_if_planner_panicked(planner);
    if let Some(e) = shared.take_error() {
        return Err(e);
    }
    let snap = shared.stats.snapshot();
    if snap.bytes_done != snap.bytes_planned {
        return Err(CopyError::Internal(format!(
            "copied {} of {} planned bytes; refusing to report success",
            snap.bytes_done, snap.bytes_planned
        )));
    }
    flush_target(&dst_keep, &mut dst_back)?;
    disconnect(&mut src_back, &mut dst_back);
    drop(src_keep);
    drop(dst_keep);
    drop(dst_child);
    drop(src_child);
    drop(pool);
    progress(&snap, started.elapsed());
    Ok(CopyReport {
        source: src_display,
        target: dst_display,
        size_bytes,
        bytes_planned: snap.bytes_planned,
        bytes_read: snap.bytes_read,
        bytes_written: snap.bytes_written,
        bytes_zeroed: snap.bytes_zeroed,
        elapsed_s: started.elapsed().as_secs_f64(),
        engine: kind,
        workers,
        source_connections: src_conn_count,
        target_connections: dst_conn_count,
    })
}

impl Shared {
    fn fail_if_planner_panicked(&self, planner: std::thread::JoinHandle<()>) {
        if planner.join().is_err() {
            self.fail(CopyError::Internal("the planner panicked".into()));
        }
    }
}

fn run_planner(
    mut extents: ExtentList,
    size_bytes: u64,
    chunk_bytes: u32,
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
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            }
        }
    };
    if let Err(e) = plan(&mut extents, size_bytes, chunk_bytes, &mut emit) {
        shared.fail(e.into());
    }
    shared.set_planner_done();
}

/// How long workers may take to finish outstanding requests after an error.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Clones of every NBD socket, to cut off workers that cannot drain.
fn socket_clones(src: &Access, dst: &Access) -> Vec<crate::nbd::uri::NbdStream> {
    [src, dst]
        .into_iter()
        .filter_map(|a| match a {
            Access::Nbd { conns } => Some(conns.iter().filter_map(|(s, _)| s.try_clone().ok())),
            Access::File { .. } => None,
        })
        .flatten()
        .collect()
}

// Boxed so a connection never moves while the kernel holds pointers into it.
#[allow(clippy::vec_box)]
fn distribute(conns: Vec<NbdConnection>, workers: usize) -> Vec<Vec<Box<NbdIo>>> {
    let mut out: Vec<Vec<Box<NbdIo>>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, (stream, info)) in conns.into_iter().enumerate() {
        out[i % workers].push(NbdIo::new(stream, info));
    }
    out
}

/// Give each worker its view of the source. Files stay owned by the
/// coordinator (workers get the raw fd, valid until the file is dropped
/// after every worker has been joined); NBD connections move to workers.
fn split_src(access: Access, workers: usize) -> (Vec<SrcIo>, Option<std::fs::File>) {
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
            distribute(conns, workers)
                .into_iter()
                .map(SrcIo::Nbd)
                .collect(),
            None,
        ),
    }
}

/// Like [`split_src`]; the O_DIRECT descriptor (if any) is kept alive with
/// the file and synced with it.
fn split_dst(access: Access, fresh_zero: bool, workers: usize) -> (Vec<DstIo>, Option<DstFiles>) {
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
            distribute(conns, workers)
                .into_iter()
                .map(DstIo::Nbd)
                .collect(),
            None,
        ),
    }
}

/// The target's descriptors, owned by the coordinator for the whole job.
struct DstFiles {
    file: std::fs::File,
    direct: Option<std::fs::File>,
}

fn flush_target(files: &Option<DstFiles>, dst: &mut [DstIo]) -> Result<(), CopyError> {
    if let Some(f) = files {
        if let Some(d) = &f.direct {
            d.sync_data().map_err(|e| CopyError::Flush(e.to_string()))?;
        }
        return f
            .file
            .sync_data()
            .map_err(|e| CopyError::Flush(e.to_string()));
    }
    let mut cookie = 1u64 << 62;
    for d in dst.iter_mut() {
        if let DstIo::Nbd(conns) = d {
            for c in conns.iter_mut() {
                if !c.info.can_flush() {
                    continue;
                }
                cookie += 1;
                c.roundtrip_blocking(cookie, Cmd::Flush)
                    .map_err(|e| CopyError::Flush(e.to_string()))?;
            }
        }
    }
    Ok(())
}

fn disconnect(src: &mut [SrcIo], dst: &mut [DstIo]) {
    let mut cookie = 3u64 << 61;
    let mut bye = |c: &mut Box<NbdIo>| {
        cookie += 1;
        let _ = c.roundtrip_blocking(cookie, Cmd::Disconnect);
        c.shutdown();
    };
    for s in src.iter_mut() {
        if let SrcIo::Nbd(conns) = s {
            conns.iter_mut().for_each(&mut bye);
        }
    }
    for d in dst.iter_mut() {
        if let DstIo::Nbd(conns) = d {
            conns.iter_mut().for_each(&mut bye);
        }
    }
}
