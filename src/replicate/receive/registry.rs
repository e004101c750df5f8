//! The job registry the connection threads share: jobs by id, and which
//! job writes which target (keyed by device and inode, so two names of one
//! file are one target).
//!
//! No file I/O happens under the registry's lock. A job's first HELLO
//! reserves the job id (`Starting`) and releases the lock; the target is
//! opened, its key reserved, the journal read, the target prepared and the
//! journal written without it; then the job is published (or the
//! reservation dropped). A job whose last stream left is `Closing` while
//! its journal is written. HELLOs of a job that is starting or closing wait
//! for it (a condition variable), then attach or start it again.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{info, warn};

use super::events::AttachRequest;
use super::job::{Job, JobStart, JournalPolicy, Refusal, check_same_job, job_id_hex};
use super::pass::{self, PassState, refusal_for};
use super::target::{Opened, TargetError, TargetFile, TargetKey, Targets, stamp_of};
use crate::journal::{self, Decision, Journal, RangeSet};
use crate::sync::lock;
use crate::wire::{ErrorCode, Hello, PassMode};

/// How long a HELLO waits at a time for a job that is starting or
/// closing before it looks again (the other thread always finishes; this
/// only bounds one wait).
const WAIT_SLICE_MS: u64 = 100;

/// Jobs by id, and which job writes which target.
#[derive(Debug)]
pub struct Registry {
    targets: Targets,
    journals: JournalPolicy,
    inner: Mutex<Inner>,
    /// Signalled whenever a job leaves `Starting` or `Closing`.
    changed: Condvar,
}

#[derive(Debug)]
enum Slot {
    /// The first HELLO is opening the target and reading the journal.
    Starting,
    Running(Arc<Job>),
    /// Every stream left; the journal is being written.
    Closing,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<[u8; 16], Slot>,
    /// Target → job writing it (or starting / closing on it).
    targets: HashMap<TargetKey, [u8; 16]>,
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
        self.job.is_current(self.stream_index, self.generation)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.registry
            .detach(&self.job, self.stream_index, self.generation);
    }
}

impl Registry {
    pub fn new(targets: Targets, journals: JournalPolicy) -> Self {
        Registry {
            targets,
            journals,
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
        }
    }

    pub fn root(&self) -> &std::path::Path {
        self.targets.root()
    }

    /// Number of jobs in progress.
    pub fn job_count(&self) -> usize {
        lock(&self.inner)
            .jobs
            .values()
            .filter(|s| matches!(s, Slot::Running(_)))
            .count()
    }

    /// Attaches the stream a HELLO opens to its job, starting the job (and
    /// opening its target) on the job's first HELLO.
    pub fn attach(self: &Arc<Self>, request: &AttachRequest) -> Result<Attachment, Refusal> {
        let hello = &request.hello;
        let (inner, job) = self.job_for(request)?;
        // Under the lock: a detach cannot close the job in between.
        let generation = job.attach_stream(hello.stream_index)?;
        drop(inner);
        Ok(Attachment {
            registry: Arc::clone(self),
            job,
            stream_index: hello.stream_index,
            generation,
        })
    }

    /// The running job of `hello` (started now if there is none), with the
    /// registry still locked.
    fn job_for(
        &self,
        request: &AttachRequest,
    ) -> Result<(MutexGuard<'_, Inner>, Arc<Job>), Refusal> {
        let hello = &request.hello;
        let id = hello.job_id;
        let mut inner = lock(&self.inner);
        loop {
            match inner.jobs.get(&id) {
                Some(Slot::Running(job)) => {
                    check_same_job(job, hello)?;
                    let job = Arc::clone(job);
                    return Ok((inner, job));
                }
                Some(Slot::Starting | Slot::Closing) => {
                    let slice = Duration::from_millis(WAIT_SLICE_MS);
                    inner = self
                        .changed
                        .wait_timeout(inner, slice)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                None => break,
            }
        }
        inner.jobs.insert(id, Slot::Starting);
        drop(inner);
        let reservation = Reservation { registry: self, id };
        let started = self.start_job(request);
        let mut inner = lock(&self.inner);
        std::mem::forget(reservation);
        self.changed.notify_all();
        match started {
            Ok(job) => {
                let job = Arc::new(job);
                inner.jobs.insert(id, Slot::Running(Arc::clone(&job)));
                Ok((inner, job))
            }
            Err(refusal) => {
                release(&mut inner, id);
                Err(refusal)
            }
        }
    }

    /// Reserves `key` for job `id`, or says who has it.
    fn reserve_target(&self, key: TargetKey, id: [u8; 16], name: &str) -> Result<(), Refusal> {
        let mut inner = lock(&self.inner);
        match inner.targets.get(&key) {
            Some(other) if *other != id => Err(Refusal::new(
                ErrorCode::Busy,
                format!(
                    "target {name:?} is being written by job {}; wait for it to finish",
                    job_id_hex(other)
                ),
            )),
            _ => {
                inner.targets.insert(key, id);
                Ok(())
            }
        }
    }

    /// A job's first HELLO (no registry lock held): open the target,
    /// reserve it, read the journal, decide, journal the pass, prepare the
    /// target.
    fn start_job(&self, request: &AttachRequest) -> Result<Job, Refusal> {
        let hello = &request.hello;
        let name = &hello.target;
        let restart = hello.flags.restart();
        if hello.mode == PassMode::Incremental {
            self.precheck_incremental(request)?;
        }
        let opened = self.targets.open(name).map_err(|e| self.refusal(name, e))?;
        self.reserve_target(opened.key, hello.job_id, name)?;
        let (existing, has_journal) = self.load_journal(name, restart)?;
        let stamp = stamp_of(&opened.file, opened.kind).map_err(|e| {
            Refusal::new(
                ErrorCode::TargetIo,
                format!("cannot stat target {name:?}: {e}"),
            )
        })?;
        let resume = pass::request(hello, &request.plan, stamp);
        let decision = journal::decide(existing.as_ref(), &resume);
        let pass = PassState::new(hello, &decision);
        let hint = opened.path.display().to_string();
        let new_journal = || pass::new_journal(hello, &hint, unix_now());
        let (target, journal, durable, how) = match decision {
            Decision::Fresh => {
                self.check_overwrite(&opened, has_journal, hello)?;
                // The new, empty journal replaces any old one before the
                // target is truncated: a crash in between must never leave
                // a journal that vouches for bytes no longer there.
                let journal = new_journal();
                self.save(name, &journal)?;
                let target = TargetFile::fresh(opened, hello.size_bytes)
                    .map_err(|e| self.refusal(name, e))?;
                let how = if restart { "restarted" } else { "fresh" };
                (target, journal, RangeSet::new(), how)
            }
            Decision::Resume { durable } => {
                let target = self.open_resumed(opened, hello)?;
                let journal = match &existing {
                    Some(j) => pass::resumed_full_journal(j, hello),
                    None => new_journal(),
                };
                // Before any write: it no longer vouches for an older sync.
                self.save(name, &journal)?;
                (target, journal, durable, "resumed")
            }
            Decision::AlreadyComplete { .. } => {
                let target = self.open_resumed(opened, hello)?;
                let journal = existing.clone().unwrap_or_else(new_journal);
                let mut all = RangeSet::new();
                all.insert(0, hello.size_bytes);
                (target, journal, all, "already complete")
            }
            Decision::Incremental {
                planned, durable, ..
            } => {
                let target = self.open_resumed(opened, hello)?;
                let Some(base) = &existing else {
                    return Err(Refusal::new(
                        ErrorCode::Internal,
                        "an incremental without a journal",
                    ));
                };
                let journal = pass::incremental_journal(base, hello, &planned, &durable);
                self.save(name, &journal)?;
                (target, journal, durable, "incremental")
            }
            Decision::Delta { durable } => {
                // A target the pass may not open gets no journal either.
                TargetFile::check_delta(&opened, hello.size_bytes)
                    .map_err(|e| self.refusal(name, e))?;
                let mut journal = new_journal();
                journal.durable = durable.clone();
                // Before the target is extended or written.
                self.save(name, &journal)?;
                let target = TargetFile::for_delta(opened, hello.size_bytes)
                    .map_err(|e| self.refusal(name, e))?;
                (target, journal, durable, "delta")
            }
            Decision::Refuse { reason, message } => return Err(refusal_for(reason, message)),
        };
        let job = Job::new(JobStart {
            hello,
            target,
            journal,
            durable,
            policy: &self.journals,
            pass,
        });
        info!(
            job = %job.id_hex(),
            target = ?name,
            path = ?job.target.path(),
            kind = ?job.target.kind(),
            source = %job.source_identity,
            mode = %hello.mode,
            sync_id = %crate::wire::sync_id_hex(&hello.sync_id),
            size_bytes = hello.size_bytes,
            durable_bytes = job.resumed_bytes,
            chunk_size_bytes = hello.chunk_size_bytes,
            streams = hello.stream_count,
            "job started ({how})"
        );
        Ok(job)
    }

    /// An incremental refused by its journal alone (no sync on record,
    /// another base, another size) is refused before its target is opened,
    /// so a missing target is not even created.
    fn precheck_incremental(&self, request: &AttachRequest) -> Result<(), Refusal> {
        let hello = &request.hello;
        let (existing, _) = self.load_journal(&hello.target, false)?;
        // The recorded stamp stands in for the target's: only the journal
        // is judged here; the target is compared once it is open.
        let stamp = existing.as_ref().and_then(|j| j.target_stamp);
        let resume = pass::request(hello, &request.plan, stamp);
        match journal::decide(existing.as_ref(), &resume) {
            Decision::Refuse { reason, message } => Err(refusal_for(reason, message)),
            _ => Ok(()),
        }
    }

    /// Saves `journal`; a failure refuses the job before anything is written.
    fn save(&self, name: &str, journal: &Journal) -> Result<(), Refusal> {
        self.journals.store.save(journal).map_err(|e| {
            warn!(target = ?name, "cannot write the journal: {e}");
            Refusal::new(ErrorCode::TargetIo, e.peer_text())
        })
    }

    /// The target's journal, if any, and whether one was there (a damaged
    /// one discarded on RESTART counts). A journal that cannot be read or
    /// trusted refuses the job, unless it is a RESTART.
    fn load_journal(&self, name: &str, restart: bool) -> Result<(Option<Journal>, bool), Refusal> {
        match self.journals.store.load(name) {
            Ok(j) => {
                let found = j.is_some();
                Ok((j, found))
            }
            Err(e) if restart => {
                info!(target = ?name, "discarding the journal on RESTART: {e}");
                Ok((None, true))
            }
            Err(e) if e.is_damaged() => {
                warn!(target = ?name, "journal cannot be trusted: {e}");
                Err(Refusal::new(
                    ErrorCode::JournalDamaged,
                    format!("refusing to resume target {name:?}: {}", e.peer_text()),
                ))
            }
            Err(e) => {
                warn!(target = ?name, "cannot read the journal: {e}");
                Err(Refusal::new(ErrorCode::TargetIo, e.peer_text()))
            }
        }
    }

    /// A fresh job may replace a regular file only if it is new or empty,
    /// its data is ours (a journal of this receiver names it), or the
    /// sender asked to overwrite it. Block devices are the operator's
    /// choice (`--allow`) and have no "empty".
    fn check_overwrite(
        &self,
        opened: &Opened,
        has_journal: bool,
        hello: &Hello,
    ) -> Result<(), Refusal> {
        let occupied = opened.kind == crate::endpoint::FileKind::Regular
            && !opened.created
            && opened.len_bytes > 0
            && !has_journal;
        if !occupied {
            return Ok(());
        }
        if hello.flags.overwrite() {
            // At default verbosity: data that was there is being replaced.
            warn!(
                target = ?opened.name,
                path = ?opened.path,
                len_bytes = opened.len_bytes,
                "overwriting an existing file that no journal of ours describes: the sender \
                 asked for it (OVERWRITE)"
            );
            return Ok(());
        }
        Err(self.refusal(
            &opened.name,
            TargetError::Occupied {
                name: opened.name.clone(),
                len_bytes: opened.len_bytes,
            },
        ))
    }

    /// A resumed target must still be the one the journal describes.
    fn open_resumed(&self, opened: Opened, hello: &Hello) -> Result<TargetFile, Refusal> {
        TargetFile::existing(opened, hello.size_bytes).map_err(|e| {
            let name = &hello.target;
            warn!(target = ?name, path = ?self.targets.local_path(name), "{e}");
            Refusal::new(
                ErrorCode::JournalDamaged,
                format!(
                    "refusing to resume target {name:?}: the journal says part of it is durable, \
                     but {e}; rerun with --restart to start a clean full copy"
                ),
            )
        })
    }

    /// The refusal sent to the sender (the name only); the receiver's log
    /// gets the path too.
    fn refusal(&self, name: &str, e: TargetError) -> Refusal {
        warn!(target = ?name, path = ?self.targets.local_path(name), "target refused: {e}");
        Refusal::from(e)
    }

    /// Called once every stream sent DONE: the final flush, then the job
    /// leaves the registry (its target is free for the next job).
    pub fn complete(&self, job: &Job) -> Result<(), Refusal> {
        // Closing while the final flush and journal run: a HELLO of this
        // job arriving meanwhile (a sender that reconnected, or ran the
        // same job again) waits and then starts it from the journal, as
        // complete, instead of finding streams that already sent DONE.
        let closing = {
            let mut inner = lock(&self.inner);
            let ours = matches!(
                inner.jobs.get(&job.id),
                Some(Slot::Running(j)) if std::ptr::eq(Arc::as_ptr(j), job)
            );
            if ours {
                inner.jobs.insert(job.id, Slot::Closing);
            }
            ours
        };
        // Released when dropped, also should `finish` panic (a bug).
        let _closing = closing.then_some(Reservation {
            registry: self,
            id: job.id,
        });
        job.finish()
    }

    fn detach(&self, job: &Arc<Job>, stream_index: u16, generation: u64) {
        let mut inner = lock(&self.inner);
        let Some(orphaned) = job.detach_stream(stream_index, generation) else {
            return;
        };
        let registered =
            matches!(inner.jobs.get(&job.id), Some(Slot::Running(j)) if Arc::ptr_eq(j, job));
        if !(orphaned && registered) {
            return;
        }
        inner.jobs.insert(job.id, Slot::Closing);
        drop(inner);
        // The journal first (without the lock): the log line says it is
        // written. The target stays reserved until then.
        job.pause();
        let mut inner = lock(&self.inner);
        if matches!(inner.jobs.get(&job.id), Some(Slot::Closing)) {
            release(&mut inner, job.id);
        }
        self.changed.notify_all();
    }
}

/// A job id held as `Starting` or `Closing`, released when dropped: also
/// should the start or the finish panic (a bug), so that other HELLOs of
/// the job do not wait for ever.
struct Reservation<'a> {
    registry: &'a Registry,
    id: [u8; 16],
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        release(&mut lock(&self.registry.inner), self.id);
        self.registry.changed.notify_all();
    }
}

/// Forgets job `id` and every target it reserved.
fn release(inner: &mut Inner, id: [u8; 16]) {
    inner.jobs.remove(&id);
    inner.targets.retain(|_, holder| *holder != id);
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

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
