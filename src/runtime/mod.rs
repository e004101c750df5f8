//! The long-lived engine every job runs on: one pinned worker thread per
//! core (each with its own io_uring or threaded I/O engine, made on that
//! thread and kept for the engine's life), one memory budget from which
//! each job takes its buffer pool, and the jobs themselves as handles.
//!
//! * [`thread`]: a worker thread's loop, multiplexing the work contexts
//!   attached to it.
//! * [`budget`]: the memory budget and the workers' op capacity.
//! * [`job`]: what is submitted ([`JobSpec`]) and what comes back
//!   ([`JobHandle`]: progress, pause, resume, cancel, rate, wait).
//!
//! Nothing here exits the process, installs signal handlers or reads the
//! environment: the command line and (later) the daemon are clients.

#![forbid(unsafe_code)]

use crate::sync::lock;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::engine::{self, EngineKind};

pub mod budget;
pub mod job;
pub mod thread;

pub use job::{DiskProgress, JobHandle, JobPhase, JobProgress, JobReport, JobSpec};

/// The memory budget when none is given: 256 MiB of buffers.
pub const MEMORY_DEFAULT_BYTES: u64 = 256 << 20;

/// Ops one worker's contexts keep in flight at most, together (the
/// worker's doorbell is one more: its ring has 4096 entries).
pub const OPS_PER_WORKER: usize = 4095;

/// How the engine is started.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Worker threads (`None`: one per online core).
    pub threads: Option<u32>,
    /// Bytes of data buffers shared by every job.
    pub memory_bytes: u64,
    /// The I/O engine (`None`: io_uring when its probe passes).
    pub kind: Option<EngineKind>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            threads: None,
            memory_bytes: MEMORY_DEFAULT_BYTES,
            kind: None,
        }
    }
}

/// Why the engine did not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The asked I/O engine cannot run here.
    #[error("I/O engine: {0}")]
    Engine(String),
    #[error("the memory budget must be at least 4096 bytes, not {0}")]
    MemoryTooSmall(u64),
    #[error("starting worker {index}: {source}")]
    Worker {
        index: usize,
        source: std::io::Error,
    },
    #[error("allocating the {bytes}-byte memory budget: {source}")]
    Memory { bytes: u64, source: std::io::Error },
}

impl From<RuntimeError> for crate::pipeline::CopyError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::MemoryTooSmall(_) => crate::pipeline::CopyError::Usage(e.to_string()),
            RuntimeError::Engine(why) => crate::pipeline::CopyError::Engine(why),
            _ => crate::pipeline::CopyError::Engine(e.to_string()),
        }
    }
}

/// A handle on the engine; clones share it. The workers stop when the last
/// clone (and every job, which holds one) is gone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    mailboxes: Vec<Arc<thread::Mailbox>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    budget: Arc<budget::Budget>,
    kind: EngineKind,
    jobs: Mutex<Vec<Weak<job::JobState>>>,
    next_job_id: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// Start the workers. The I/O engine is chosen (and io_uring probed)
    /// here; a fallback to threads is logged.
    pub fn start(opts: &EngineOptions) -> Result<Self, RuntimeError> {
        if opts.memory_bytes < 4096 {
            return Err(RuntimeError::MemoryTooSmall(opts.memory_bytes));
        }
        let (kind, why) = engine::choose(opts.kind).map_err(RuntimeError::Engine)?;
        if let Some(why) = why {
            tracing::warn!("{why}");
        }
        let cpus = engine::pin::online_cpus().max(1);
        let workers = opts.threads.map_or(cpus, |t| t.max(1) as usize);
        let memory = usize::try_from(opts.memory_bytes).unwrap_or(usize::MAX);
        let budget = budget::Budget::new(memory, workers, OPS_PER_WORKER).map_err(|source| {
            RuntimeError::Memory {
                bytes: opts.memory_bytes,
                source,
            }
        })?;
        let mut mailboxes = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for index in 0..workers {
            let ops = u32::try_from(OPS_PER_WORKER).unwrap_or(u32::MAX);
            match thread::spawn(index, index % cpus, kind, ops) {
                Ok((mailbox, handle)) => {
                    mailboxes.push(mailbox);
                    threads.push(handle);
                }
                Err(source) => {
                    stop_and_join(&mailboxes, threads);
                    return Err(RuntimeError::Worker { index, source });
                }
            }
        }
        tracing::debug!(workers, %kind, memory_bytes = opts.memory_bytes, "engine started");
        Ok(Self {
            inner: Arc::new(Inner {
                mailboxes,
                threads: Mutex::new(threads),
                budget: Arc::new(budget),
                kind,
                jobs: Mutex::new(Vec::new()),
                next_job_id: std::sync::atomic::AtomicU64::new(1),
            }),
        })
    }

    /// The I/O engine the workers run.
    pub fn kind(&self) -> EngineKind {
        self.inner.kind
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.inner.mailboxes.len()
    }

    /// The memory budget in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.inner.budget.total_bytes()
    }

    /// Start a job; it runs on the engine's workers alongside any others.
    pub fn submit(&self, spec: JobSpec) -> JobHandle {
        let id = self
            .inner
            .next_job_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let handle = job::start(self.clone(), id, spec);
        let mut jobs = lock(&self.inner.jobs);
        jobs.retain(|j| j.strong_count() > 0);
        jobs.push(handle.state_weak());
        handle
    }

    /// Progress of every job still held by someone (running or not yet
    /// waited for).
    pub fn jobs(&self) -> Vec<JobProgress> {
        let jobs = lock(&self.inner.jobs);
        jobs.iter()
            .filter_map(Weak::upgrade)
            .map(|j| j.progress())
            .collect()
    }

    pub(crate) fn budget(&self) -> &Arc<budget::Budget> {
        &self.inner.budget
    }

    /// Hand a context to worker `index`.
    pub(crate) fn attach(&self, index: usize, seed: thread::Seed) {
        self.inner.mailboxes[index].post(seed);
    }

    /// Wake every worker (after a resume, a cancel or a new rate) so each
    /// steps its contexts at once.
    pub(crate) fn wake_all(&self) {
        for m in &self.inner.mailboxes {
            m.ring();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let threads = std::mem::take(
            self.threads
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        stop_and_join(&self.mailboxes, threads);
    }
}

fn stop_and_join(mailboxes: &[Arc<thread::Mailbox>], threads: Vec<std::thread::JoinHandle<()>>) {
    for m in mailboxes {
        m.stop();
    }
    for t in threads {
        let _ = t.join();
    }
}
