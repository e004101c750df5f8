//! `diskferry copy`: a thin client of the engine. It starts an
//! [`Engine`], submits one job (one disk, or every disk of a job file),
//! shows its progress and turns its outcome into an exit code.

use std::time::{Duration, Instant};

use super::{done_event, finish};
use crate::engine::EngineKind;
use crate::pipeline::CopyError;
use crate::pipeline::copy::CopyOptions;
use crate::progress::Progress;
use crate::runtime::{Engine, EngineOptions, JobHandle, JobPhase, JobSpec};

#[derive(clap::Args, Debug)]
pub struct CopyArgs {
    /// Source: nbd://host[:port]/export, nbd+unix:///export?socket=PATH, a file, a block device or an image.
    #[arg(required_unless_present = "job")]
    pub src: Option<String>,
    /// Target: as SRC; a missing file is created (its extension picks the format, raw otherwise).
    #[arg(required_unless_present = "job")]
    pub dst: Option<String>,
    /// Copy every disk of a job file (TOML: `name`, then `[[disk]]` tables
    /// with `source` and `target`) at once, on one set of workers.
    #[arg(long, conflicts_with_all = ["src", "dst", "src_format", "dst_format"])]
    pub job: Option<std::path::PathBuf>,
    /// Memory for data buffers, shared by every disk (e.g. 256Mi, 1Gi).
    #[arg(long, default_value = "256Mi", value_parser = crate::size::parse_size)]
    pub memory: u64,
    /// Cap on the bytes read per second, shared by every disk: 100M or 1G
    /// bytes/s (SI), 64Mi (binary), 250Mbit (bits/s).
    #[arg(long, value_parser = crate::net::rate::parse_rate)]
    pub rate: Option<u64>,
    /// The source file's image format (default: the one its extension
    /// names — .qcow2, .vmdk, .vhdx, .vdi, .vhd/.vpc, .qed — else raw; a
    /// file's contents never choose it).
    #[arg(long, value_enum)]
    pub src_format: Option<crate::endpoint::ImageFormat>,
    /// The target file's image format (default: as for --src-format).
    #[arg(long, value_enum)]
    pub dst_format: Option<crate::endpoint::ImageFormat>,
    /// NBD connections per side, when the server allows several (multi-conn).
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    /// Requests in flight per connection (default: 2 when both ends are on
    /// this host — files, Unix sockets, loopback addresses — deepening if
    /// the source proves slow or a deeper queue moves more; 64 across a
    /// network). Sets a fixed depth.
    #[arg(long)]
    pub requests: Option<u32>,
    /// Bytes per request (power of two, 4KiB..32MiB; k/M suffixes are binary).
    #[arg(long, default_value = "256k", value_parser = super::parse_chunk)]
    pub chunk_size: u32,
    /// Worker threads, shared by every disk (default: one per online CPU).
    #[arg(long)]
    pub threads: Option<u32>,
    /// I/O engine (default: io_uring when the kernel allows it, else threads).
    #[arg(long, value_enum)]
    pub io_engine: Option<EngineKind>,
    /// How file and block-device targets are written: auto (O_DIRECT for
    /// block devices, page cache with streamed writeback for files), direct, cached.
    #[arg(long, value_enum, default_value = "auto")]
    pub write_mode: crate::endpoint::open::WriteMode,
    /// Regions of the disk copied side by side, one request from each in
    /// turn, so the requests in flight spread over the disk (1: in
    /// ascending order).
    #[arg(long, default_value_t = crate::plan::lanes::LANES_DEFAULT)]
    pub lanes: u32,
    /// Times a source read that failed with EIO (or a similar error that may pass) is retried, 0..=10.
    #[arg(long, default_value_t = crate::pipeline::retry::READ_RETRIES_DEFAULT)]
    pub read_retries: u32,
    /// Fail when an NBD server leaves a connection attempt, the handshake or
    /// a request unanswered this long (e.g. 60s, 500ms), instead of waiting forever.
    #[arg(long, default_value = "60s", value_parser = crate::size::parse_duration)]
    pub io_timeout: std::time::Duration,
    /// Print newline-delimited JSON events on stdout instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// How often progress is reported (the bar, or a `progress` event with
    /// --json), e.g. 100ms; 10ms at least.
    #[arg(long, default_value = "1s", value_parser = parse_progress_interval)]
    pub progress_interval: Duration,
}

/// A `--progress-interval`: a duration of 10 ms or more.
pub(super) fn parse_progress_interval(s: &str) -> Result<Duration, String> {
    let d = crate::size::parse_duration(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s} is shorter than 10ms"));
    }
    Ok(d)
}

impl CopyArgs {
    /// The options of one disk from `source` to `target`.
    pub(super) fn disk(&self, source: String, target: String) -> CopyOptions {
        CopyOptions {
            source,
            target,
            source_format: self.src_format,
            target_format: self.dst_format,
            connections: self.connections,
            requests: self.requests,
            chunk_bytes: self.chunk_size,
            threads: None,
            write_mode: self.write_mode,
            read_retries: self.read_retries,
            lanes: self.lanes,
            io_timeout: self.io_timeout,
        }
    }

    fn engine_options(&self, kind: Option<EngineKind>) -> EngineOptions {
        EngineOptions {
            threads: self.threads,
            memory_bytes: self.memory,
            kind,
        }
    }
}

pub(super) fn run_copy(a: CopyArgs) -> i32 {
    if a.job.is_some() {
        return super::copy_job::run_copy_job(&a);
    }
    let (Some(src), Some(dst)) = (a.src.clone(), a.dst.clone()) else {
        unreachable!("clap requires SRC and DST without --job")
    };
    let opts = a.disk(src, dst.clone());
    let mut progress = Progress::new(a.json, a.no_progress);
    let started = Instant::now();
    let handle = match opts.check().and_then(|()| start(&a)) {
        Ok(engine) => engine.submit(JobSpec {
            name: dst,
            disks: vec![opts.into()],
            rate_bytes_per_s: a.rate,
        }),
        Err(e) => return finish(&mut progress, a.json, a.no_progress, Err(e)),
    };
    watch(&handle, started, a.progress_interval, |p, el| {
        if let Some(d) = p.disks.first() {
            progress.update(&d.counters, el);
        }
    });
    let mut report = handle.wait();
    let outcome = report.disks.remove(0);
    let result = outcome.result.and_then(|r| r.into_copy()).map(|r| {
        progress.update(&outcome.counters, started.elapsed());
        let rate = r.bytes_planned as f64 / r.elapsed_s.max(1e-9) / 1e6;
        let line = format!(
            "copied {} data bytes of {} ({} zero/hole bytes skipped) in {:.2}s, {:.0} MB/s, engine {}",
            r.bytes_written, r.size_bytes, r.bytes_zeroed, r.elapsed_s, rate, r.engine
        );
        (done_event(&r), line)
    });
    finish(&mut progress, a.json, a.no_progress, result)
}

/// Start the engine for these arguments.
pub(super) fn start(a: &CopyArgs) -> Result<Engine, CopyError> {
    let kind = super::io_engine::resolve(a.io_engine).map_err(CopyError::Engine)?;
    Engine::start(&a.engine_options(kind)).map_err(|e| match e {
        crate::runtime::RuntimeError::MemoryTooSmall(_) => {
            CopyError::Usage(format!("--memory: {e}"))
        }
        e => e.into(),
    })
}

/// Call `report` once the job's disks are open and then about `every`
/// until the job is over.
pub(super) fn watch(
    handle: &JobHandle,
    started: Instant,
    every: Duration,
    mut report: impl FnMut(&crate::runtime::JobProgress, Duration),
) {
    let mut last: Option<Instant> = None;
    loop {
        let over = handle.wait_timeout(every.min(Duration::from_millis(50)));
        if over {
            return;
        }
        let p = handle.progress();
        let due = match last {
            None => p.state != JobPhase::Starting,
            Some(at) => at.elapsed() >= every,
        };
        if due {
            report(&p, started.elapsed());
            last = Some(Instant::now());
        }
    }
}
