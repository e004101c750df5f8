//! Jobs on the receiver and the registry the connection threads share.
//!
//! The first HELLO of a `job_id` resolves and opens the target and creates
//! the [`Job`]; later HELLOs of the same job attach to it after checking
//! they describe the same job. A target is written by one job at a time.
//! A job leaves the registry when all its streams sent DONE (complete), or
//! when its last stream disconnects before that (incomplete: without a
//! journal nothing of it can be resumed yet, so a new HELLO starts over).
//!
//! [`Job::durable`] is the set of ranges known to be on stable storage;
//! the resume journal will persist it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tracing::{info, warn};

use super::ranges::RangeSet;
use super::target::{Target, TargetError, resolve};
use crate::wire::{ErrorCode, Hello};

/// A refusal or a failure to report to the sender in an ERROR frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<TargetError> for Refusal {
    fn from(e: TargetError) -> Self {
        let code = match e {
            TargetError::Open { .. } => ErrorCode::TargetIo,
            _ => ErrorCode::TargetNotAllowed,
        };
        Refusal::new(code, e.to_string())
    }
}

/// Job id as 32 hex digits, for logs and messages.
pub fn job_id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Default)]
struct StreamBits {
    /// Streams with a live connection.
    attached: u64,
    /// Streams that sent DONE.
    done: u64,
}

/// One replication job: a target, its geometry and its progress.
#[derive(Debug)]
pub struct Job {
    pub id: [u8; 16],
    pub target_name: String,
    pub target: Target,
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    pub stream_count: u16,
    pub source_identity: String,
    started: Instant,
    streams: Mutex<StreamBits>,
    /// Ranges flushed to stable storage (merged, all streams).
    durable: Mutex<RangeSet>,
    /// Raw DATA bytes written (not necessarily durable yet).
    pub bytes_written: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<Refusal>>,
    complete: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the receiver down with it; the
    // protected values stay consistent (plain counters and sets).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Job {
    pub fn id_hex(&self) -> String {
        job_id_hex(&self.id)
    }

    /// Marks the job failed (the first failure wins); every stream then
    /// ends with this error.
    pub fn fail(&self, refusal: Refusal) {
        let mut slot = lock(&self.failure);
        if slot.is_none() {
            warn!(job = %self.id_hex(), code = ?refusal.code, "job failed: {}", refusal.message);
            *slot = Some(refusal);
            self.failed.store(true, Ordering::Release);
        }
    }

    /// The failure, if the job failed.
    pub fn failure(&self) -> Option<Refusal> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.failure).clone()
    }

    /// Records ranges made durable by a flush; returns the job's durable
    /// byte total.
    pub fn add_durable(&self, ranges: &RangeSet) -> u64 {
        let mut durable = lock(&self.durable);
        for r in ranges.ranges() {
            durable.insert(r.offset, r.len_bytes);
        }
        durable.total_bytes()
    }

    pub fn bytes_durable_total(&self) -> u64 {
        lock(&self.durable).total_bytes()
    }

    /// Marks `stream_index` done; true when it was the last stream.
    pub fn stream_done(&self, stream_index: u16) -> bool {
        let mut bits = lock(&self.streams);
        bits.done |= 1u64 << stream_index;
        bits.done.count_ones() == u32::from(self.stream_count)
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }
}

/// Jobs by id, and which job writes which target.
#[derive(Debug)]
pub struct Registry {
    root: PathBuf,
    allow: Vec<(String, PathBuf)>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<[u8; 16], Arc<Job>>,
    /// Target path → job writing it.
    targets: HashMap<PathBuf, [u8; 16]>,
}

/// A stream's membership of a job; detaches the stream when dropped.
#[derive(Debug)]
pub struct Attachment {
    registry: Arc<Registry>,
    pub job: Arc<Job>,
    pub stream_index: u16,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.registry.detach(&self.job, self.stream_index);
    }
}

impl Registry {
    /// `root` must be canonical.
    pub fn new(root: PathBuf, allow: Vec<(String, PathBuf)>) -> Self {
        Registry {
            root,
            allow,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of jobs in progress.
    pub fn job_count(&self) -> usize {
        lock(&self.inner).jobs.len()
    }

    /// Attaches the stream a HELLO opens to its job, creating the job (and
    /// opening its target) on the job's first HELLO.
    pub fn attach(self: &Arc<Self>, hello: &Hello) -> Result<Attachment, Refusal> {
        let mut inner = lock(&self.inner);
        let job = match inner.jobs.get(&hello.job_id) {
            Some(job) => {
                check_same_job(job, hello)?;
                Arc::clone(job)
            }
            None => {
                let resolved = resolve(&hello.target, &self.root, &self.allow)?;
                if let Some(other) = inner.targets.get(&resolved.path) {
                    return Err(Refusal::new(
                        ErrorCode::Busy,
                        format!(
                            "target {:?} is being written by job {}; wait for it to finish",
                            hello.target,
                            job_id_hex(other)
                        ),
                    ));
                }
                let target = Target::open_fresh(&resolved, hello.size_bytes)?;
                let job = Arc::new(new_job(hello, target));
                info!(
                    job = %job.id_hex(),
                    target = %hello.target,
                    path = %resolved.path.display(),
                    kind = ?job.target.kind(),
                    source = %job.source_identity,
                    size_bytes = hello.size_bytes,
                    chunk_size_bytes = hello.chunk_size_bytes,
                    streams = hello.stream_count,
                    "job started"
                );
                inner.targets.insert(resolved.path, hello.job_id);
                inner.jobs.insert(hello.job_id, Arc::clone(&job));
                job
            }
        };
        let bit = 1u64 << hello.stream_index;
        let mut bits = lock(&job.streams);
        if bits.attached & bit != 0 {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "stream {} of this job is already connected",
                    hello.stream_index
                ),
            ));
        }
        if bits.done & bit != 0 {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "stream {} of this job already sent DONE",
                    hello.stream_index
                ),
            ));
        }
        bits.attached |= bit;
        drop(bits);
        Ok(Attachment {
            registry: Arc::clone(self),
            job,
            stream_index: hello.stream_index,
        })
    }

    /// Called once every stream sent DONE: the final flush, then the job
    /// leaves the registry (its target is free for the next job).
    pub fn complete(&self, job: &Job) -> Result<(), Refusal> {
        let flushed = job.target.sync().map_err(|e| {
            Refusal::new(
                ErrorCode::TargetIo,
                format!("final flush of {} failed: {e}", job.target.path().display()),
            )
        });
        if let Err(refusal) = &flushed {
            job.fail(refusal.clone());
        } else {
            job.complete.store(true, Ordering::Release);
            let secs = job.started.elapsed().as_secs_f64();
            let bytes = job.bytes_written.load(Ordering::Relaxed);
            info!(
                job = %job.id_hex(),
                target = %job.target_name,
                bytes_written = bytes,
                bytes_durable = job.bytes_durable_total(),
                duration_s = format!("{secs:.3}"),
                rate_mb_per_s = format!("{:.1}", bytes as f64 / secs.max(1e-9) / 1e6),
                "job finished"
            );
        }
        self.remove(job);
        flushed
    }

    fn detach(&self, job: &Arc<Job>, stream_index: u16) {
        let mut inner = lock(&self.inner);
        let mut bits = lock(&job.streams);
        bits.attached &= !(1u64 << stream_index);
        let orphaned = bits.attached == 0 && !job.is_complete();
        let done = bits.done.count_ones();
        drop(bits);
        let registered = inner.jobs.get(&job.id).is_some_and(|j| Arc::ptr_eq(j, job));
        if orphaned && registered {
            warn!(
                job = %job.id_hex(),
                target = %job.target_name,
                streams_done = done,
                streams = job.stream_count,
                "job ended incomplete: every stream disconnected before all sent DONE; \
                 the sender must send it again"
            );
            // Data already written stays; a new HELLO starts the job over.
            let _ = job.target.sync();
            remove_locked(&mut inner, job);
        }
    }

    fn remove(&self, job: &Job) {
        remove_locked(&mut lock(&self.inner), job);
    }
}

fn remove_locked(inner: &mut Inner, job: &Job) {
    if inner
        .jobs
        .get(&job.id)
        .is_some_and(|j| std::ptr::eq(Arc::as_ptr(j), job))
    {
        inner.jobs.remove(&job.id);
        inner.targets.retain(|_, id| *id != job.id);
    }
}

fn new_job(hello: &Hello, target: Target) -> Job {
    Job {
        id: hello.job_id,
        target_name: hello.target.clone(),
        target,
        size_bytes: hello.size_bytes,
        chunk_size_bytes: hello.chunk_size_bytes,
        stream_count: hello.stream_count,
        source_identity: hello.source_identity.clone(),
        started: Instant::now(),
        streams: Mutex::new(StreamBits::default()),
        durable: Mutex::new(RangeSet::new()),
        bytes_written: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        failure: Mutex::new(None),
        complete: AtomicBool::new(false),
    }
}

/// A later HELLO of a job must describe the same job.
fn check_same_job(job: &Job, hello: &Hello) -> Result<(), Refusal> {
    if let Some(failure) = job.failure() {
        return Err(Refusal::new(
            failure.code,
            format!("job {} already failed: {}", job.id_hex(), failure.message),
        ));
    }
    let mismatch = if hello.target != job.target_name {
        Some(format!(
            "target {:?} (the job writes {:?})",
            hello.target, job.target_name
        ))
    } else if hello.size_bytes != job.size_bytes {
        Some(format!(
            "size {} bytes (the job has {})",
            hello.size_bytes, job.size_bytes
        ))
    } else if hello.chunk_size_bytes != job.chunk_size_bytes {
        Some(format!(
            "chunk size {} bytes (the job uses {})",
            hello.chunk_size_bytes, job.chunk_size_bytes
        ))
    } else if hello.stream_count != job.stream_count {
        Some(format!(
            "{} streams (the job has {})",
            hello.stream_count, job.stream_count
        ))
    } else {
        None
    };
    match mismatch {
        Some(what) => Err(Refusal::new(
            ErrorCode::BadRequest,
            format!(
                "HELLO for job {} names {what}: every stream of a job must send the same HELLO fields",
                job.id_hex()
            ),
        )),
        None => Ok(()),
    }
}
