//! Jobs on the receiver ([`Job`]); the registry the connection threads
//! share is in `registry.rs`.
//!
//! The first HELLO of a `job_id` opens the target, reads its journal
//! (`--state-dir`) and decides ([`crate::journal::decide`]) between a fresh
//! copy (a new journal written first, then the target truncated; an
//! existing non-empty file no journal of ours describes only if the sender
//! asked to overwrite it), a resume (the target is opened as it is; the
//! durable ranges go back in WELCOME), "already complete" (opened as it
//! is, too), and a refusal (another source, a damaged journal: the sender
//! must ask for `RESTART`); protocol v2 adds incremental and delta passes
//! (`pass.rs`: journaled before any write, recorded on completion). Later HELLOs of the same job attach to it after
//! checking they describe the same job; a HELLO for a stream that is still
//! attached takes the stream over (the sender reconnected after a stall the
//! receiver did not notice). A target is written by one job at a time.
//!
//! [`Job`] keeps the ranges known to be on stable storage (added only after
//! a successful fdatasync) and checkpoints them into the journal at least
//! every `--checkpoint-interval` or `--checkpoint-bytes` of new durable
//! data, when its last stream leaves, and when it completes. A job leaves
//! the registry when all its streams sent DONE or when its last stream
//! disconnects; a later HELLO resumes from the journal.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tracing::{debug, info, warn};

use super::pass::{PassState, record_completion};
use super::registry::unix_now;
use super::target::TargetFile;
use super::written::RangeCapError;
use crate::journal::{Checkpointer, Journal, JournalStore, RangeSet};
use crate::sync::lock;
use crate::wire::{ErrorCode, Hello};

pub use super::registry::{Attachment, Registry};

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
    pub target: TargetFile,
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    pub stream_count: u16,
    pub source_identity: String,
    /// The pass the job runs (full, incremental, delta).
    pub pass: PassState,
    /// The first HELLO's pass fields: every stream of the job sends them.
    hello_sync_id: crate::wire::SyncId,
    base_sync_id: crate::wire::SyncId,
    plan_digest: [u8; 32],
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

    /// [`Job::add_durable`], unless the durable set could pass
    /// `max_ranges` (the ranges are counted before they merge, so the check
    /// errs on the safe side): then nothing is counted.
    pub(super) fn add_durable_capped(
        &self,
        ranges: &[(u64, u64)],
        data_bytes: u64,
        max_ranges: usize,
    ) -> Result<u64, RangeCapError> {
        let count = self.durable_range_count() + ranges.len();
        if count > max_ranges {
            return Err(RangeCapError::Job {
                ranges: count,
                max_ranges,
            });
        }
        Ok(self.add_durable(ranges.iter().copied(), data_bytes))
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
        self.checkpoint_with(complete.then_some(None));
    }

    /// [`Job::checkpoint`]; `completion` (the target's stamp) marks the
    /// job complete and records its sync.
    fn checkpoint_with(&self, completion: Option<Option<crate::journal::TargetStamp>>) {
        let complete = completion.is_some();
        let durable = lock(&self.durable).clone();
        let mut j = lock(&self.journal);
        let covered = durable.covered_bytes();
        if !complete && covered == j.saved_bytes && j.saved_bytes != 0 {
            j.checkpointer.taken(Instant::now());
            return;
        }
        j.journal.durable = durable;
        j.journal.complete = false;
        if let Some(stamp) = completion {
            record_completion(&mut j.journal, self.pass.record.as_ref(), stamp);
        }
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

    /// Builds a started job (its target prepared, its journal decided).
    pub(super) fn new(start: JobStart<'_>) -> Job {
        let JobStart {
            hello,
            target,
            journal,
            durable,
            policy,
            pass,
        } = start;
        let saved_bytes = journal.durable.covered_bytes();
        Job {
            id: hello.job_id,
            target_name: hello.target.clone(),
            target,
            size_bytes: hello.size_bytes,
            chunk_size_bytes: hello.chunk_size_bytes,
            stream_count: hello.stream_count,
            source_identity: hello.source_identity.clone(),
            pass,
            hello_sync_id: hello.sync_id,
            base_sync_id: hello.base_sync_id,
            plan_digest: hello.plan_digest,
            started: Instant::now(),
            streams: Mutex::new(StreamBits::default()),
            resumed_bytes: durable.covered_bytes(),
            instance: {
                let mut b = [0u8; 8];
                crate::replicate::random_bytes(&mut b);
                u64::from_le_bytes(b)
            },
            durable: Mutex::new(durable),
            journal: Mutex::new(JournalState {
                journal,
                checkpointer: Checkpointer::new(policy.interval, policy.bytes),
                saved_bytes,
            }),
            store: policy.store.clone(),
            checkpoint_interval: policy.interval,
            checkpoint_bytes: policy.bytes,
            bytes_written: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            complete: AtomicBool::new(false),
        }
    }

    /// Marks `stream_index` attached (a newer connection of a stream takes
    /// it over); returns the connection's generation.
    pub(super) fn attach_stream(&self, stream_index: u16) -> Result<u64, Refusal> {
        let bit = 1u64 << stream_index;
        let mut bits = lock(&self.streams);
        if bits.attached & bit != 0 {
            info!(
                job = %self.id_hex(),
                stream = stream_index,
                "stream reconnected while its old connection looked alive: the new one takes over"
            );
        }
        if bits.done & bit != 0 {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("stream {stream_index} of this job already sent DONE"),
            ));
        }
        bits.attached |= bit;
        let index = usize::from(stream_index);
        if bits.generation.len() <= index {
            bits.generation.resize(index + 1, 0);
        }
        bits.generation[index] += 1;
        Ok(bits.generation[index])
    }

    /// False once a newer connection took the stream over.
    pub(super) fn is_current(&self, stream_index: u16, generation: u64) -> bool {
        let bits = lock(&self.streams);
        bits.generation.get(usize::from(stream_index)) == Some(&generation)
    }

    /// Detaches a stream's connection: `None` if a newer connection of the
    /// stream is attached, else whether the job is left with no stream
    /// before it completed.
    pub(super) fn detach_stream(&self, stream_index: u16, generation: u64) -> Option<bool> {
        let mut bits = lock(&self.streams);
        if bits.generation.get(usize::from(stream_index)) != Some(&generation) {
            return None;
        }
        bits.attached &= !(1u64 << stream_index);
        Some(bits.attached == 0 && !self.is_complete())
    }

    /// Every stream left before all sent DONE: write the journal, say so.
    pub(super) fn pause(&self) {
        self.checkpoint(false);
        let done = lock(&self.streams).done.count_ones();
        warn!(
            job = %self.id_hex(),
            target = ?self.target_name,
            streams_done = done,
            streams = self.stream_count,
            durable_bytes = self.bytes_durable_total(),
            "job paused: every stream disconnected before all sent DONE; \
             what is durable is in the journal and a new HELLO resumes from it"
        );
    }

    /// Every stream sent DONE: the final flush, the check that every byte
    /// is durable, the journal marked complete.
    pub(super) fn finish(&self) -> Result<(), Refusal> {
        let flushed = self
            .target
            .sync()
            .map_err(|e| {
                Refusal::new(
                    ErrorCode::TargetIo,
                    format!("final flush of {} failed: {e}", self.target.describe()),
                )
            })
            .and_then(|()| {
                let durable = lock(&self.durable).clone();
                self.pass
                    .check_complete(&durable, self.size_bytes)
                    .map_err(|missing| {
                        Refusal::new(
                            ErrorCode::Protocol,
                            format!(
                                "every stream sent DONE but {missing}: the job is not complete \
                                 (a sender bug); send it again"
                            ),
                        )
                    })
            })
            .and_then(|()| {
                self.target.stamp().map_err(|e| {
                    Refusal::new(
                        ErrorCode::TargetIo,
                        format!(
                            "cannot stat {} after its final flush: {e}",
                            self.target.describe()
                        ),
                    )
                })
            });
        let stamp = match flushed {
            Ok(stamp) => stamp,
            Err(refusal) => {
                self.fail(refusal.clone());
                return Err(refusal);
            }
        };
        self.checkpoint_with(Some(stamp));
        self.complete.store(true, Ordering::Release);
        let secs = self.started.elapsed().as_secs_f64();
        let bytes = self.bytes_written.load(Ordering::Relaxed);
        info!(
            job = %self.id_hex(),
            target = ?self.target_name,
            bytes_written = bytes,
            bytes_durable = self.bytes_durable_total(),
            duration_s = format!("{secs:.3}"),
            rate_mb_per_s = format!("{:.1}", bytes as f64 / secs.max(1e-9) / 1e6),
            mode = %self.pass.mode,
            sync_id = %crate::wire::sync_id_hex(&self.pass.welcome_sync_id),
            "job finished"
        );
        Ok(())
    }
}

/// What [`Job::new`] is built from.
pub(super) struct JobStart<'a> {
    pub hello: &'a Hello,
    pub target: TargetFile,
    pub journal: Journal,
    pub durable: RangeSet,
    pub policy: &'a JournalPolicy,
    pub pass: PassState,
}

/// A later HELLO of a job must describe the same job.
pub(super) fn check_same_job(job: &Job, hello: &Hello) -> Result<(), Refusal> {
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
    } else if hello.mode != job.pass.mode || hello.sync_id != job.hello_sync_id {
        Some(format!(
            "a {} pass of sync {} (the job runs a {} pass of sync {})",
            hello.mode,
            crate::wire::sync_id_hex(&hello.sync_id),
            job.pass.mode,
            crate::wire::sync_id_hex(&job.hello_sync_id)
        ))
    } else if hello.base_sync_id != job.base_sync_id || hello.plan_digest != job.plan_digest {
        Some("another base or plan (the job's first HELLO named others)".to_string())
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
