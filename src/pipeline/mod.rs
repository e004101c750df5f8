//! The copy pipeline: planner → workers (read → zero detection → write).
//!
//! * [`planner`]: the planner thread, feeding the workers the
//!   [`crate::plan::windows::Work`] items the plan cuts from the extent map.
//! * [`pool`]: the buffer pool allocated at start-up.
//! * [`zero`]: zero detection.
//! * [`worker`]: the pinned per-core state machine.
//! * [`nbd_io`]: an NBD connection driven through an engine.
//! * [`retry`]: bounded retries of source reads that failed.
//! * [`silence`]: the NBD I/O timeout (a silent server fails the job).
//! * [`exits`]: waking a control loop as soon as a group of threads stopped.
//! * [`probe`]: deepening every worker's queue while that reads faster.
//! * [`control`]: pause, cancel and rate of a job, set by its handle.
//! * [`copy`]: the coordinator behind `diskferry copy`.
//!
//! Opening SRC / DST lives in [`crate::endpoint::open`]; mapping a source,
//! cutting it into windows and lanes in [`crate::plan`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_queue::ArrayQueue;

mod attach;
pub mod control;
pub mod copy;
pub mod depth;
pub mod exits;
pub mod nbd_io;
mod planner;
pub mod pool;
pub mod probe;
pub mod requests;
pub mod retry;
pub mod run;
pub mod silence;
pub mod sink;
mod split;
pub mod stats;
pub mod worker;
pub mod zero;

/// Why a copy failed. Each message says which side and where.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("bad arguments: {0}")]
    Usage(String),
    /// Opening, negotiating with or mapping the source failed.
    #[error("{0}")]
    Endpoint(#[from] crate::endpoint::EndpointError),
    /// The same for the target ([`CopyError::on_target`]): an NBD server
    /// that never answers fails the same way on either side, and the exit
    /// code says which.
    #[error("{0}")]
    TargetEndpoint(crate::endpoint::EndpointError),
    #[error("reading the source failed {0}; nothing was written in place of unread data")]
    SourceRead(String),
    #[error("writing the target failed {0}")]
    TargetWrite(String),
    #[error("{0}")]
    Map(#[from] crate::plan::windows::MapError),
    #[error("I/O engine: {0}")]
    Engine(String),
    #[error("flushing the target failed: {0}; the copy is NOT durable")]
    Flush(String),
    #[error("internal error (please report): {0}")]
    Internal(String),
    /// The job stopped before every byte was durable but can go on: what
    /// the receiver holds is in its journal and a rerun of the same
    /// command resumes.
    #[error("{0}; the job is resumable: run the same command again to continue")]
    Interrupted(String),
    /// The job's owner cancelled it; what was written was flushed.
    #[error("cancelled")]
    Cancelled,
}

impl CopyError {
    /// The same error, an endpoint error now the target's: for what
    /// opening the target met.
    pub fn on_target(self) -> Self {
        match self {
            CopyError::Endpoint(e) => CopyError::TargetEndpoint(e),
            other => other,
        }
    }
    pub fn source(offset: u64, e: crate::nbd::NbdError) -> Self {
        CopyError::SourceRead(format!("at offset {offset}: {e}"))
    }
    pub fn target(offset: u64, e: crate::nbd::NbdError) -> Self {
        CopyError::TargetWrite(format!("at offset {offset}: {e}"))
    }
}

/// State shared by the planner, the workers and the control thread.
pub struct Shared {
    pub queue: ArrayQueue<crate::plan::windows::Work>,
    planner_done: AtomicBool,
    abort: AtomicBool,
    error: Mutex<Option<CopyError>>,
    pub stats: stats::Stats,
    /// Sum of each worker's largest window (its [`depth::DepthCtl`] window
    /// times `depth_scale`), added as each worker finishes.
    pub depth_peak: std::sync::atomic::AtomicUsize,
    /// Multiple of every worker's window, set by the control thread's
    /// [`probe::DepthProbe`] (1 when it does not run).
    pub depth_scale: std::sync::atomic::AtomicUsize,
    /// Pause and rate, set by the job's owner.
    pub control: std::sync::Arc<control::JobControl>,
}

impl Shared {
    pub fn new(queue_len: usize, control: std::sync::Arc<control::JobControl>) -> Self {
        Self {
            control,
            queue: ArrayQueue::new(queue_len.max(1)),
            planner_done: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            error: Mutex::new(None),
            stats: stats::Stats::default(),
            depth_peak: std::sync::atomic::AtomicUsize::new(0),
            depth_scale: std::sync::atomic::AtomicUsize::new(1),
        }
    }
    /// Record the first error and make everyone stop.
    pub fn fail(&self, e: CopyError) {
        let mut slot = crate::sync::lock(&self.error);
        if slot.is_none() {
            tracing::debug!("job failing: {e}");
            *slot = Some(e);
        }
        self.abort.store(true, Ordering::SeqCst);
    }
    /// Make everyone stop; the caller records the error with [`Shared::fail`].
    pub fn abort_now(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
    pub fn planner_done(&self) -> bool {
        self.planner_done.load(Ordering::Acquire)
    }
    pub fn set_planner_done(&self) {
        self.planner_done.store(true, Ordering::Release);
    }
    pub fn take_error(&self) -> Option<CopyError> {
        crate::sync::lock(&self.error).take()
    }
}
