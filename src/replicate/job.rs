//! Jobs on the receiver and the registry the connection threads share.
//!
//! The first HELLO of a `job_id` resolves the target, reads its journal
//! (`--state-dir`) and decides ([`crate::journal::decide`]) between a fresh
//! copy (the target is truncated, a new journal written first), a resume
//! (the target is opened as it is; the durable ranges go back in WELCOME),
//! "already complete", and a refusal (another source, a damaged journal:
//! the sender must ask for `RESTART`). Later HELLOs of the same job attach
//! to it after checking they describe the same job; a HELLO for a stream
//! that is still attached takes the stream over (the sender reconnected
//! after a stall the receiver did not notice). A target is written by one
//! job at a time.
//!
//! [`Job`] keeps the ranges known to be on stable storage (added only after
//! a successful fdatasync) and checkpoints them into the journal at least
//! every `--checkpoint-interval` or `--checkpoint-bytes` of new durable
//! data, when its last stream leaves, and when it completes. A job leaves
//! the registry when all its streams sent DONE or when its last stream
//! disconnects; a later HELLO resumes from the journal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tracing::{debug, info, warn};

use super::target::{Target, TargetError, resolve};
use crate::journal::{
    self, Checkpointer, Decision, Journal, JournalStore, RangeSet, RefuseReason, ResumeRequest,
};
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
    /// Per stream index, bumped by every HELLO: only the newest connection
    /// of a stream is current.
    generation: Vec<u64>,
}

/// Where and how often journals are written.
#[derive(Debug, Clone)]
pub struct JournalPolicy {
    pub store: JournalStore,
    pub interval: std::time::Duration,
    pub bytes: u64,
}

/// The journal of a job as last written, and when to write it again.
#[derive(Debug)]
struct JournalState {
    journal: Journal,
    checkpointer: Checkpointer,
    /// Durable bytes in the last journal written.
    saved_bytes: u64,
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
    /// How this job started: `resumed` with this many bytes already durable.
    pub resumed_bytes: u64,
    /// Random, told in every WELCOME: a sender seeing a new value knows
    /// the receiver started this job again from its journal.
    pub instance: u64,
    journal: Mutex<JournalState>,
    store: JournalStore,
    checkpoint_interval: std::time::Duration,
    checkpoint_bytes: u64,
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

    /// Records ranges made durable by a flush (the caller flushed after
    /// writing them), `data_bytes` of them DATA (the rest zero ranges);
    /// checkpoints the journal when one is due (zero ranges cost nothing to
    /// send again, so only data counts towards `--checkpoint-bytes`).
    /// Returns the job's durable byte total.
    pub fn add_durable(&self, ranges: impl Iterator<Item = (u64, u64)>, data_bytes: u64) -> u64 {
        let total = {
            let mut durable = lock(&self.durable);
            for (o, l) in ranges {
                durable.insert(o, l);
            }
            durable.covered_bytes()
        };
        let due = {
            let mut j = lock(&self.journal);
            j.checkpointer.note_written(data_bytes);
            j.checkpointer.due(Instant::now())
        };
        if due {
            self.checkpoint(false);
        }
        total
    }

    pub fn bytes_durable_total(&self) -> u64 {
        lock(&self.durable).covered_bytes()
    }

    /// Separate ranges in the durable set (the receiver caps them per job).
    pub fn durable_range_count(&self) -> usize {
        lock(&self.durable).len()
    }

    /// The durable ranges (at most `max`, the largest, in order).
    pub fn durable_ranges(&self, max: usize) -> Vec<(u64, u64)> {
        lock(&self.durable).largest(max)
    }

    /// Writes the journal (atomically) with the durable ranges as they are
    /// now. A failure is logged: the data stays safe, a later resume just
    /// re-sends more.
    pub fn checkpoint(&self, complete: bool) {
        let durable = lock(&self.durable).clone();
        let mut j = lock(&self.journal);
        let covered = durable.covered_bytes();
        if !complete && covered == j.saved_bytes && j.saved_bytes != 0 {
            j.checkpointer.taken(Instant::now());
            return;
        }
        j.journal.durable = durable;
        j.journal.complete = complete;
        j.journal.updated_unix_s = unix_now();
        match self.store.save(&j.journal) {
            Ok(()) => {
                j.saved_bytes = covered;
                j.checkpointer.taken(Instant::now());
                debug!(job = %self.id_hex(), durable_bytes = covered, complete, "journal checkpoint");
            }
            Err(e) => warn!(job = %self.id_hex(), "journal checkpoint failed: {e}"),
        }
    }

    /// (interval, bytes) of the journal checkpoints.
    pub fn checkpoint_policy(&self) -> (std::time::Duration, u64) {
        (self.checkpoint_interval, self.checkpoint_bytes)
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
    journals: JournalPolicy,
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
    generation: u64,
}

impl Attachment {
    /// False once a newer connection took this stream over.
    pub fn is_current(&self) -> bool {
        let bits = lock(&self.job.streams);
        bits.generation.get(self.stream_index as usize) == Some(&self.generation)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.registry
            .detach(&self.job, self.stream_index, self.generation);
    }
}

impl Registry {
    /// `root` must be canonical.
    pub fn new(root: PathBuf, allow: Vec<(String, PathBuf)>, journals: JournalPolicy) -> Self {
        Registry {
            root,
            allow,
            journals,
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
                if resolved.path.starts_with(self.journals.store.dir()) {
                    return Err(Refusal::new(
                        ErrorCode::TargetNotAllowed,
                        format!(
                            "target {:?} is inside the receiver's state directory",
                            hello.target
                        ),
                    ));
                }
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
                let job = Arc::new(self.start_job(hello, &resolved)?);
                inner.targets.insert(resolved.path, hello.job_id);
                inner.jobs.insert(hello.job_id, Arc::clone(&job));
                job
            }
        };
        let bit = 1u64 << hello.stream_index;
        let mut bits = lock(&job.streams);
        if bits.attached & bit != 0 {
            info!(
                job = %job.id_hex(),
                stream = hello.stream_index,
                "stream reconnected while its old connection looked alive: the new one takes over"
            );
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
        let index = usize::from(hello.stream_index);
        if bits.generation.len() <= index {
            bits.generation.resize(index + 1, 0);
        }
        bits.generation[index] += 1;
        let generation = bits.generation[index];
        drop(bits);
        Ok(Attachment {
            registry: Arc::clone(self),
            job,
            stream_index: hello.stream_index,
            generation,
        })
    }

    /// A job's first HELLO: read the journal, decide, open the target.
    fn start_job(
        &self,
        hello: &Hello,
        resolved: &super::target::ResolvedTarget,
    ) -> Result<Job, Refusal> {
        let store = &self.journals.store;
        let restart = hello.flags.restart();
        let existing = match store.load(&hello.target) {
            Ok(j) => j,
            Err(e) if restart => {
                info!(target = %hello.target, "discarding the journal on RESTART: {e}");
                None
            }
            Err(e) if e.is_damaged() => {
                return Err(Refusal::new(
                    ErrorCode::JournalDamaged,
                    format!("refusing to resume target {:?}: {e}", hello.target),
                ));
            }
            Err(e) => return Err(Refusal::new(ErrorCode::TargetIo, e.to_string())),
        };
        let request = ResumeRequest {
            target_name: hello.target.clone(),
            source_identity: hello.source_identity.clone(),
            size_bytes: hello.size_bytes,
            chunk_size_bytes: hello.chunk_size_bytes,
            restart,
        };
        let hint = resolved.path.display().to_string();
        let fresh_journal = || {
            Journal::new(
                &hello.target,
                &hint,
                &hello.source_identity,
                hello.size_bytes,
                hello.chunk_size_bytes,
                hello.job_id,
                unix_now(),
            )
        };
        let (target, journal, durable, how) = match journal::decide(existing.as_ref(), &request) {
            Decision::Fresh => {
                // The new, empty journal replaces any old one before the
                // target is truncated: a crash in between must never leave
                // a journal that vouches for bytes no longer there.
                let journal = fresh_journal();
                store
                    .save(&journal)
                    .map_err(|e| Refusal::new(ErrorCode::TargetIo, e.to_string()))?;
                let target = Target::open_fresh(resolved, hello.size_bytes)?;
                (
                    target,
                    journal,
                    RangeSet::new(),
                    if restart { "restarted" } else { "fresh" },
                )
            }
            Decision::Resume { durable } => {
                let target = open_resumed(resolved, hello)?;
                let mut journal = existing.clone().unwrap_or_else(fresh_journal);
                journal.job_id = hello.job_id;
                journal.chunk_size_bytes = hello.chunk_size_bytes;
                (target, journal, durable, "resumed")
            }
            Decision::AlreadyComplete => {
                let target = open_resumed(resolved, hello)?;
                let journal = existing.clone().unwrap_or_else(fresh_journal);
                let mut all = RangeSet::new();
                all.insert(0, hello.size_bytes);
                (target, journal, all, "already complete")
            }
            Decision::Refuse { reason, message } => {
                let code = match reason {
                    RefuseReason::TargetMismatch => ErrorCode::JournalDamaged,
                    RefuseReason::SizeMismatch | RefuseReason::SourceIdentityMismatch => {
                        ErrorCode::SourceMismatch
                    }
                };
                return Err(Refusal::new(code, message));
            }
        };
        let saved_bytes = journal.durable.covered_bytes();
        let job = Job {
            id: hello.job_id,
            target_name: hello.target.clone(),
            target,
            size_bytes: hello.size_bytes,
            chunk_size_bytes: hello.chunk_size_bytes,
            stream_count: hello.stream_count,
            source_identity: hello.source_identity.clone(),
            started: Instant::now(),
            streams: Mutex::new(StreamBits::default()),
            resumed_bytes: durable.covered_bytes(),
            instance: {
                let mut b = [0u8; 8];
                super::random_bytes(&mut b);
                u64::from_le_bytes(b)
            },
            durable: Mutex::new(durable),
            journal: Mutex::new(JournalState {
                journal,
                checkpointer: Checkpointer::new(self.journals.interval, self.journals.bytes),
                saved_bytes,
            }),
            store: store.clone(),
            checkpoint_interval: self.journals.interval,
            checkpoint_bytes: self.journals.bytes,
            bytes_written: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            complete: AtomicBool::new(false),
        };
        info!(
            job = %job.id_hex(),
            target = %hello.target,
            path = %resolved.path.display(),
            kind = ?job.target.kind(),
            source = %job.source_identity,
            size_bytes = hello.size_bytes,
            durable_bytes = job.resumed_bytes,
            chunk_size_bytes = hello.chunk_size_bytes,
            streams = hello.stream_count,
            "job started ({how})"
        );
        Ok(job)
    }

    /// Called once every stream sent DONE: the final flush, then the job
    /// leaves the registry (its target is free for the next job).
    pub fn complete(&self, job: &Job) -> Result<(), Refusal> {
        let flushed = job
            .target
            .sync()
            .map_err(|e| {
                Refusal::new(
                    ErrorCode::TargetIo,
                    format!("final flush of {} failed: {e}", job.target.path().display()),
                )
            })
            .and_then(|()| {
                let durable = job.bytes_durable_total();
                if durable == job.size_bytes {
                    Ok(())
                } else {
                    Err(Refusal::new(
                        ErrorCode::Protocol,
                        format!(
                            "every stream sent DONE but only {durable} of {} bytes are durable: \
                             the job is not complete (a sender bug); send it again",
                            job.size_bytes
                        ),
                    ))
                }
            });
        if let Err(refusal) = &flushed {
            job.fail(refusal.clone());
        } else {
            job.checkpoint(true);
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

    fn detach(&self, job: &Arc<Job>, stream_index: u16, generation: u64) {
        let mut inner = lock(&self.inner);
        let mut bits = lock(&job.streams);
        if bits.generation.get(usize::from(stream_index)) != Some(&generation) {
            // A newer connection of this stream is attached.
            return;
        }
        bits.attached &= !(1u64 << stream_index);
        let orphaned = bits.attached == 0 && !job.is_complete();
        let done = bits.done.count_ones();
        drop(bits);
        let registered = inner.jobs.get(&job.id).is_some_and(|j| Arc::ptr_eq(j, job));
        if orphaned && registered {
            // The journal first: the log line says it is written.
            job.checkpoint(false);
            warn!(
                job = %job.id_hex(),
                target = %job.target_name,
                streams_done = done,
                streams = job.stream_count,
                durable_bytes = job.bytes_durable_total(),
                "job paused: every stream disconnected before all sent DONE; \
                 what is durable is in the journal and a new HELLO resumes from it"
            );
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A resumed target must still be the one the journal describes.
fn open_resumed(
    resolved: &super::target::ResolvedTarget,
    hello: &Hello,
) -> Result<Target, Refusal> {
    Target::open_existing(resolved, hello.size_bytes).map_err(|e| {
        Refusal::new(
            ErrorCode::JournalDamaged,
            format!(
                "refusing to resume target {:?}: the journal says part of it is durable, but {e}; \
                 rerun with --restart to start a clean full copy",
                hello.target
            ),
        )
    })
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
