//! Jobs as handles. A job is one or more disks (a VM's) replicated
//! together on the engine's workers; its handle reads progress and
//! pauses, resumes, cancels, re-rates and waits for it. Each disk has a
//! coordinator thread (`disk-N`) that opens its ends, runs its pipeline on
//! the shared workers and flushes its target; a disk that fails does not
//! stop the others.
//!
//! A copy disk writes a local target. A `send` disk is the same job whose
//! target is a sink drained by the network senders
//! ([`crate::replicate::send`]); it may run in several rounds (one
//! pipeline each), whose counters add up.

use crate::sync::lock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::Engine;
use crate::pipeline::control::JobControl;
use crate::pipeline::copy::{CopyOptions, CopyReport};
use crate::pipeline::stats::Snapshot;
use crate::pipeline::{CopyError, Shared};
use crate::replicate::send::{SendOptions, SendReport};

/// One disk of a job: a copy to a local target, or a send to a receiver.
#[derive(Debug, Clone)]
pub enum DiskSpec {
    Copy(CopyOptions),
    Send(Box<SendOptions>),
}

impl DiskSpec {
    /// The disk's target (a local path, or the name on the receiver).
    pub fn target(&self) -> &str {
        match self {
            DiskSpec::Copy(o) => &o.target,
            DiskSpec::Send(o) => &o.target,
        }
    }
}

impl From<CopyOptions> for DiskSpec {
    fn from(o: CopyOptions) -> Self {
        DiskSpec::Copy(o)
    }
}

impl From<SendOptions> for DiskSpec {
    fn from(o: SendOptions) -> Self {
        DiskSpec::Send(Box::new(o))
    }
}

/// How a disk that succeeded ended.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum DiskReport {
    Copy(CopyReport),
    Send(Box<SendReport>),
}

impl DiskReport {
    /// The disk's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        match self {
            DiskReport::Copy(r) => r.size_bytes,
            DiskReport::Send(r) => r.size_bytes,
        }
    }

    /// The copy's report (`None` for a send).
    pub fn as_copy(&self) -> Option<&CopyReport> {
        match self {
            DiskReport::Copy(r) => Some(r),
            DiskReport::Send(_) => None,
        }
    }

    /// The copy's report; a send's is an internal error.
    pub fn into_copy(self) -> Result<CopyReport, CopyError> {
        match self {
            DiskReport::Copy(r) => Ok(r),
            DiskReport::Send(_) => Err(CopyError::Internal("a copy disk ran as a send".into())),
        }
    }

    /// The send's report; a copy's is an internal error.
    pub fn into_send(self) -> Result<SendReport, CopyError> {
        match self {
            DiskReport::Send(r) => Ok(*r),
            DiskReport::Copy(_) => Err(CopyError::Internal("a send disk ran as a copy".into())),
        }
    }

    /// The send's report (`None` for a copy).
    pub fn as_send(&self) -> Option<&SendReport> {
        match self {
            DiskReport::Send(r) => Some(r),
            DiskReport::Copy(_) => None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The job's name (the VM's), for logs and listings.
    pub name: String,
    /// Its disks, run side by side.
    pub disks: Vec<DiskSpec>,
    /// A cap on the bytes read per second, shared by every disk (`None`:
    /// no cap).
    pub rate_bytes_per_s: Option<u64>,
}

/// Where a job or one of its disks is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPhase {
    /// Opening its ends, mapping the source, waiting for memory.
    Starting,
    Running,
    /// Paused by its owner: no new reads.
    Paused,
    /// Flushing the target.
    Flushing,
    Done,
    Failed,
    Cancelled,
}

impl JobPhase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => JobPhase::Starting,
            1 => JobPhase::Running,
            2 => JobPhase::Paused,
            3 => JobPhase::Flushing,
            4 => JobPhase::Done,
            5 => JobPhase::Failed,
            _ => JobPhase::Cancelled,
        }
    }

    /// Whether the phase is final.
    pub fn is_over(self) -> bool {
        matches!(
            self,
            JobPhase::Done | JobPhase::Failed | JobPhase::Cancelled
        )
    }
}

/// One disk's progress.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskProgress {
    /// The disk's target, as given.
    pub target: String,
    pub state: JobPhase,
    #[serde(flatten)]
    pub counters: Snapshot,
}

/// A job's progress at one instant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobProgress {
    pub id: u64,
    pub name: String,
    pub state: JobPhase,
    pub bytes_planned: u64,
    pub bytes_done: u64,
    pub elapsed_s: f64,
    pub disks: Vec<DiskProgress>,
}

/// How a job ended: each disk's report or error.
#[derive(Debug)]
pub struct JobReport {
    pub name: String,
    pub disks: Vec<DiskOutcome>,
    pub elapsed: Duration,
}

/// One disk's end.
#[derive(Debug)]
pub struct DiskOutcome {
    pub target: String,
    pub result: Result<DiskReport, CopyError>,
    /// The disk's last counters (also when it failed).
    pub counters: Snapshot,
}

/// One disk's live state.
pub(crate) struct DiskState {
    target: String,
    phase: AtomicU8,
    shared: Mutex<Option<Arc<Shared>>>,
    /// The counters of the rounds before the current one (a send's).
    base: Mutex<Snapshot>,
    last: Mutex<Snapshot>,
}

impl DiskState {
    fn set_phase(&self, phase: JobPhase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    fn phase(&self) -> JobPhase {
        JobPhase::from_u8(self.phase.load(Ordering::Acquire))
    }

    fn counters(&self) -> Snapshot {
        let shared = lock(&self.shared);
        match &*shared {
            Some(s) => lock(&self.base).plus(&s.stats.snapshot()),
            None => *lock(&self.last),
        }
    }
}

/// What the handle, the disk threads and the engine's listing share.
pub struct JobState {
    id: u64,
    name: String,
    started: Instant,
    control: Arc<JobControl>,
    disks: Vec<DiskState>,
    outcomes: Mutex<Vec<Option<DiskOutcome>>>,
    over: Condvar,
}

impl JobState {
    pub(crate) fn progress(&self) -> JobProgress {
        let disks: Vec<DiskProgress> = self
            .disks
            .iter()
            .map(|d| {
                let mut state = d.phase();
                if state == JobPhase::Running && self.control.is_paused() {
                    state = JobPhase::Paused;
                }
                DiskProgress {
                    target: d.target.clone(),
                    state,
                    counters: d.counters(),
                }
            })
            .collect();
        JobProgress {
            id: self.id,
            name: self.name.clone(),
            state: job_phase(&disks, self.control.is_paused()),
            bytes_planned: disks.iter().map(|d| d.counters.bytes_planned).sum(),
            bytes_done: disks.iter().map(|d| d.counters.bytes_done).sum(),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            disks,
        }
    }

    fn cancel_disks(&self) {
        for d in &self.disks {
            if let Some(s) = &*lock(&d.shared) {
                s.fail(CopyError::Cancelled);
            }
        }
    }
}

/// The job's phase from its disks': the worst final one once all are
/// over, else running (or paused, or starting while none runs yet).
fn job_phase(disks: &[DiskProgress], paused: bool) -> JobPhase {
    if disks.iter().all(|d| d.state.is_over()) {
        for worst in [JobPhase::Failed, JobPhase::Cancelled] {
            if disks.iter().any(|d| d.state == worst) {
                return worst;
            }
        }
        return JobPhase::Done;
    }
    if paused {
        return JobPhase::Paused;
    }
    if disks.iter().all(|d| d.state == JobPhase::Starting) {
        return JobPhase::Starting;
    }
    JobPhase::Running
}

/// The owner's side of a job.
pub struct JobHandle {
    state: Arc<JobState>,
    engine: Engine,
}

impl JobHandle {
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// Counters and state, per disk and in total.
    pub fn progress(&self) -> JobProgress {
        self.state.progress()
    }

    /// Issue no new reads (those in flight finish and are written).
    pub fn pause(&self) {
        self.state.control.set_paused(true);
    }

    pub fn resume(&self) {
        self.state.control.set_paused(false);
        self.engine.wake_all();
    }

    /// Stop: no new reads, what is in flight drains, what was written is
    /// flushed; every disk not yet done ends [`CopyError::Cancelled`].
    pub fn cancel(&self) {
        self.state.control.set_cancelled();
        self.state.cancel_disks();
        self.engine.wake_all();
    }

    /// Cap the job's read rate in bytes per second (`None`: no cap).
    pub fn set_rate(&self, rate_bytes_per_s: Option<u64>) {
        self.state.control.set_rate(rate_bytes_per_s);
        self.engine.wake_all();
    }

    /// True once every disk has ended.
    pub fn is_over(&self) -> bool {
        self.outcomes_ready()
    }

    /// Wait up to `timeout` for the end; true if it came.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let outcomes = lock(&self.state.outcomes);
        let (outcomes, _) = self
            .state
            .over
            .wait_timeout_while(outcomes, timeout, |o| o.iter().any(Option::is_none))
            .unwrap_or_else(PoisonError::into_inner);
        outcomes.iter().all(Option::is_some)
    }

    /// Wait for every disk to end.
    pub fn wait(self) -> JobReport {
        while !self.wait_timeout(Duration::from_secs(3600)) {}
        let mut outcomes = lock(&self.state.outcomes);
        JobReport {
            name: self.state.name.clone(),
            disks: outcomes.iter_mut().filter_map(Option::take).collect(),
            elapsed: self.state.started.elapsed(),
        }
    }

    pub(crate) fn state_weak(&self) -> Weak<JobState> {
        Arc::downgrade(&self.state)
    }

    fn outcomes_ready(&self) -> bool {
        lock(&self.state.outcomes).iter().all(Option::is_some)
    }
}

/// What a disk's coordinator tells its job while it runs.
pub(crate) struct DiskHooks<'a> {
    job: &'a JobState,
    disk: &'a DiskState,
}

impl DiskHooks<'_> {
    /// The pipeline started: its counters are live. A cancel that came
    /// while the disk was opening takes effect now.
    pub(crate) fn started(&self, shared: &Arc<Shared>) {
        *lock(&self.disk.shared) = Some(Arc::clone(shared));
        self.disk.set_phase(JobPhase::Running);
        if self.job.control.is_cancelled() {
            shared.fail(CopyError::Cancelled);
        }
    }

    /// The workers are done; the target is being flushed.
    pub(crate) fn flushing(&self, counters: Snapshot) {
        *lock(&self.disk.last) = counters;
        *lock(&self.disk.shared) = None;
        self.disk.set_phase(JobPhase::Flushing);
    }

    /// A round of a multi-round disk ended with these counters (the
    /// sum of every round so far); the next round's add to them.
    pub(crate) fn round_over(&self, totals: Snapshot) {
        *lock(&self.disk.base) = totals;
        *lock(&self.disk.last) = totals;
        *lock(&self.disk.shared) = None;
    }

    pub(crate) fn control(&self) -> &Arc<JobControl> {
        &self.job.control
    }
}

pub(crate) fn start(engine: Engine, id: u64, spec: JobSpec) -> JobHandle {
    let state = Arc::new(JobState {
        id,
        name: spec.name.clone(),
        started: Instant::now(),
        control: Arc::new(JobControl::new(spec.rate_bytes_per_s)),
        disks: spec
            .disks
            .iter()
            .map(|d| DiskState {
                target: d.target().to_string(),
                phase: AtomicU8::new(JobPhase::Starting as u8),
                shared: Mutex::new(None),
                base: Mutex::new(Snapshot::default()),
                last: Mutex::new(Snapshot::default()),
            })
            .collect(),
        outcomes: Mutex::new(spec.disks.iter().map(|_| None).collect()),
        over: Condvar::new(),
    });
    for (index, opts) in spec.disks.into_iter().enumerate() {
        let job = Arc::clone(&state);
        let eng = engine.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("disk-{index}"))
            .spawn(move || run_disk(&eng, &job, index, &opts));
        if let Err(e) = spawned {
            let err = CopyError::Internal(format!("spawning a disk thread: {e}"));
            end_disk(&state, index, Err(err));
        }
    }
    JobHandle { state, engine }
}

fn run_disk(engine: &Engine, job: &JobState, index: usize, spec: &DiskSpec) {
    let disk = &job.disks[index];
    let hooks = DiskHooks { job, disk };
    let span = tracing::info_span!("disk", job = %job.name, target = %disk.target);
    let _enter = span.enter();
    let result = if job.control.is_cancelled() {
        Err(CopyError::Cancelled)
    } else {
        match spec {
            DiskSpec::Copy(opts) => {
                crate::pipeline::copy::run_disk(engine, opts, &hooks).map(DiskReport::Copy)
            }
            DiskSpec::Send(opts) => crate::replicate::send::run_disk(engine, opts, &hooks)
                .map(|r| DiskReport::Send(Box::new(r))),
        }
    };
    end_disk(job, index, result);
}

fn end_disk(job: &JobState, index: usize, result: Result<DiskReport, CopyError>) {
    let disk = &job.disks[index];
    let counters = disk.counters();
    disk.set_phase(match &result {
        Ok(_) => JobPhase::Done,
        Err(CopyError::Cancelled) => JobPhase::Cancelled,
        Err(_) => JobPhase::Failed,
    });
    *lock(&disk.shared) = None;
    *lock(&disk.last) = counters;
    let mut outcomes = lock(&job.outcomes);
    outcomes[index] = Some(DiskOutcome {
        target: disk.target.clone(),
        result,
        counters,
    });
    job.over.notify_all();
}
