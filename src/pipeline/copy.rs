//! The coordinator of one disk of a copy job (it runs on the job's `disk-N`
//! thread, see [`crate::runtime::job`]): opens both ends, starts the
//! planner and the disk's contexts on the engine's workers, watches the
//! I/O timeout and probes the depth, and flushes the target before
//! reporting success.

#![forbid(unsafe_code)]
use std::time::{Duration, Instant};

use super::probe::{self, DepthProbe};
use super::retry::READ_RETRIES_MAX;
use super::run::{DstFiles, DstPlan, Pipeline, PipelineConfig, Requests, TICK};
use super::worker::{DstIo, SrcIo};
use super::{CopyError, nbd_io::NbdIo};
use crate::endpoint::open::{Access, Source, Target, open_source, open_target};
use crate::engine::EngineKind;
use crate::nbd::conn::Cmd;
use crate::runtime::Engine;
use crate::runtime::job::DiskHooks;

/// Largest request the NBD protocol lets diskferry use.
pub const CHUNK_MAX_BYTES: u32 = 32 * 1024 * 1024;

/// Requests in flight per connection when every end is on this host
/// (see [`Requests::Auto`]): 4 connections of 2 requests of 256 KiB, 2 MiB
/// of buffers in all.
pub const REQUESTS_NEAR: u32 = 2;
/// Requests in flight per connection to a server across a network, as
/// nbdcopy's default (16 MiB per connection of 256 KiB requests), and the
/// most a slow server on this host grows to.
pub const REQUESTS_FAR: u32 = 64;

/// What `diskferry copy` was asked to do.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    pub source: String,
    pub target: String,
    /// The source file's format (`None`: its extension's, else raw).
    pub source_format: Option<crate::endpoint::ImageFormat>,
    /// The target file's format (`None`: its extension's, else raw).
    pub target_format: Option<crate::endpoint::ImageFormat>,
    /// NBD connections per side (when the server allows multi-conn).
    pub connections: u32,
    /// Requests in flight per connection (`None`: [`REQUESTS_NEAR`] or
    /// [`REQUESTS_FAR`], by where the ends are).
    pub requests: Option<u32>,
    pub chunk_bytes: u32,
    /// Most of the engine's workers this disk runs on (default: all).
    pub threads: Option<u32>,
    pub write_mode: crate::endpoint::open::WriteMode,
    /// Retries of a source read that failed with an error that may pass
    /// (`--read-retries`, 0..=[`READ_RETRIES_MAX`]).
    pub read_retries: u32,
    /// Regions of the disk copied side by side ([`super::lanes`]).
    pub lanes: u32,
    /// How long an NBD server may leave a connection attempt, the
    /// handshake or a request unanswered before the copy fails.
    pub io_timeout: Duration,
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
    /// Source reads issued again after a transient failure.
    pub read_retries: u64,
    pub elapsed_s: f64,
    pub engine: EngineKind,
    pub workers: usize,
    pub source_connections: usize,
    pub target_connections: usize,
    /// Requests in flight per connection (`--requests`, or the depth chosen
    /// for where the ends are).
    pub requests_per_connection: u32,
    /// The most chunks in flight at once, summed over the workers: above
    /// `connections × requests_per_connection` when a slow source on this
    /// host made the workers deepen their queues.
    pub chunks_in_flight_peak: usize,
    /// Times the control thread tried a deeper queue (see
    /// [`super::probe`]); 0 when `--requests` fixed the depth.
    pub depth_probes: usize,
    /// Regions of the disk copied side by side (`--lanes`, see
    /// [`super::lanes`]).
    pub lanes: u32,
}

impl CopyOptions {
    /// Refuse options out of range, before anything is opened.
    pub fn check(&self) -> Result<(), CopyError> {
        if self.chunk_bytes < 4096
            || self.chunk_bytes > CHUNK_MAX_BYTES
            || !self.chunk_bytes.is_power_of_two()
        {
            return Err(CopyError::Usage(format!(
                "--chunk-size must be a power of two between 4KiB and 32MiB, not {}",
                self.chunk_bytes
            )));
        }
        Requests::check_flags(self.connections, self.requests, self.lanes)?;
        if self.read_retries > READ_RETRIES_MAX {
            return Err(CopyError::Usage(format!(
                "--read-retries must be 0..={READ_RETRIES_MAX}, not {}",
                self.read_retries
            )));
        }
        if self.io_timeout.is_zero() {
            return Err(CopyError::Usage("--io-timeout must be more than 0".into()));
        }
        Ok(())
    }
}

/// Copy one disk on `engine` to completion (target flushed), to its first
/// error, or to a cancel (what was written is flushed, then
/// [`CopyError::Cancelled`]).
pub(crate) fn run_disk(
    engine: &Engine,
    opts: &CopyOptions,
    hooks: &DiskHooks<'_>,
) -> Result<CopyReport, CopyError> {
    opts.check()?;
    let started = Instant::now();
    let source = open_source(
        &opts.source,
        opts.source_format,
        opts.connections,
        opts.io_timeout,
    )?;
    let target = open_target(
        &opts.target,
        opts.target_format,
        source.size_bytes,
        opts.connections,
        opts.write_mode,
        opts.io_timeout,
    )
    .map_err(CopyError::on_target)?;
    tracing::info!(
        source = %source.display,
        target = %target.display,
        size_bytes = source.size_bytes,
        data_bytes = source.extents.data_bytes(),
        data_extents = source.extents.len(),
        engine = %engine.kind(),
        "copy starting"
    );
    run_opened(engine, opts, source, target, started, hooks)
}

fn pipeline_config(opts: &CopyOptions) -> PipelineConfig {
    PipelineConfig {
        threads: opts.threads,
        connections: opts.connections,
        requests: Requests::from_flag(opts.requests, REQUESTS_NEAR, REQUESTS_FAR),
        chunk_bytes: opts.chunk_bytes,
        spans: None,
        read_retries: opts.read_retries,
        lanes: opts.lanes,
        io_timeout: opts.io_timeout,
        exact: None,
    }
}

/// Tick the pipeline until every context finished; returns the depth
/// probe, if one ran.
///
/// `--requests N` fixes the depth. Otherwise probe whether a deeper queue
/// moves more: into a file, measured as bytes that reached the target's
/// storage, not the page cache. Where the target shares the source's disk,
/// deeper reads only delay the writes and the probes fail (dense 2 GiB: 1 %
/// slower than not probing, 16 rounds); into a file on faster storage the
/// shallow start read 15 % slower than nbdcopy
/// (docs/bench/history.md#the-throughput-probe-sessions-6-and-7).
fn control_loop(
    pipe: &mut Pipeline,
    cfg: &PipelineConfig,
    file_target: bool,
) -> Option<ProbeClock> {
    let mut probe =
        matches!(cfg.requests, Requests::Auto { .. }).then(|| ProbeClock::new(file_target));
    while !pipe.wait_finished(TICK) {
        pipe.tick();
        if let Some(p) = &mut probe {
            p.tick(pipe.shared());
        }
    }
    probe
}

fn run_opened(
    engine: &Engine,
    opts: &CopyOptions,
    source: Source,
    target: Target,
    started: Instant,
    hooks: &DiskHooks<'_>,
) -> Result<CopyReport, CopyError> {
    let cfg = pipeline_config(opts);
    let src_conn_count = source.access.nbd_connections().unwrap_or(0);
    let dst_conn_count = target.access.nbd_connections().unwrap_or(0);
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
    let file_target = matches!(dst_access, Access::File { .. });
    let mut pipe = Pipeline::start(
        engine,
        std::sync::Arc::clone(hooks.control()),
        &cfg,
        src_access,
        extents,
        size_bytes,
        DstPlan::Access {
            access: dst_access,
            fresh_zero,
        },
    )?;
    hooks.started(pipe.shared());
    let probe = control_loop(&mut pipe, &cfg, file_target);
    let workers = pipe.workers();
    let kind = pipe.kind();
    let requests_per_connection = pipe.requests();
    let shared = pipe.shared().clone();
    let mut joined = pipe.join();
    hooks.flushing(shared.stats.snapshot());
    let snap = match joined.result {
        Ok(snap) => snap,
        Err(CopyError::Cancelled) => {
            // Keep what was written: flush it before saying so.
            flush_target(&joined.keep.dst_files, &mut joined.dst_back)?;
            disconnect(&mut joined.src_back, &mut joined.dst_back);
            return Err(CopyError::Cancelled);
        }
        Err(e) => return Err(e),
    };
    flush_target(&joined.keep.dst_files, &mut joined.dst_back)?;
    disconnect(&mut joined.src_back, &mut joined.dst_back);
    drop(joined.keep);
    drop(dst_child);
    drop(src_child);
    Ok(CopyReport {
        source: src_display,
        target: dst_display,
        size_bytes,
        bytes_planned: snap.bytes_planned,
        bytes_read: snap.bytes_read,
        bytes_written: snap.bytes_written,
        bytes_zeroed: snap.bytes_zeroed,
        read_retries: snap.read_retries,
        elapsed_s: started.elapsed().as_secs_f64(),
        engine: kind,
        workers,
        source_connections: src_conn_count,
        target_connections: dst_conn_count,
        requests_per_connection,
        // Every worker has finished and added its peak.
        chunks_in_flight_peak: shared.depth_peak.load(std::sync::atomic::Ordering::Relaxed),
        depth_probes: probe.map_or(0, |p| p.probe.probes()),
        lanes: opts.lanes,
    })
}

pub fn flush_target(files: &Option<DstFiles>, dst: &mut [DstIo]) -> Result<(), CopyError> {
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

pub fn disconnect(src: &mut [SrcIo], dst: &mut [DstIo]) {
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

/// Feeds [`DepthProbe`] one epoch's rate at a time: bytes read, or for a
/// file target bytes landed ([`super::stats::Stats::bytes_landed`]).
struct ProbeClock {
    probe: DepthProbe,
    since: Instant,
    bytes: u64,
    landed: bool,
}

impl ProbeClock {
    fn new(landed: bool) -> Self {
        Self {
            probe: DepthProbe::default(),
            since: Instant::now(),
            bytes: 0,
            landed,
        }
    }

    fn tick(&mut self, shared: &super::Shared) {
        use std::sync::atomic::Ordering::Relaxed;
        let elapsed = self.since.elapsed();
        if elapsed < probe::EPOCH {
            return;
        }
        let counter = if self.landed {
            &shared.stats.bytes_landed
        } else {
            &shared.stats.bytes_read
        };
        let bytes = counter.load(Relaxed);
        let rate = bytes.saturating_sub(self.bytes) as f64 / elapsed.as_secs_f64();
        (self.since, self.bytes) = (Instant::now(), bytes);
        shared.depth_scale.store(self.probe.epoch(rate), Relaxed);
    }
}
