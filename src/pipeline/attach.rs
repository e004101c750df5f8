//! Attaching a job's contexts to the engine's workers: its share of the
//! buffer budget, and one context per worker with its buffers and ends.

#![forbid(unsafe_code)]

use std::sync::{Arc, mpsc};

use super::control::JobControl;
use super::exits::Exits;
use super::pool::PoolShare;
use super::run::PipelineConfig;
use super::worker::{DstIo, SrcIo, WorkerConfig};
use super::{CopyError, Shared, zero};
use crate::runtime::Engine;
use crate::runtime::budget::{BudgetError, Grant};
use crate::runtime::thread::Seed;

/// Reserve the job's buffers and ops from the engine's budget, waiting
/// while other jobs hold it (unless the job is cancelled meanwhile).
pub(super) fn reserve(
    engine: &Engine,
    control: &JobControl,
    cfg: &PipelineConfig,
    want_slots: usize,
    workers: usize,
) -> Result<Grant, CopyError> {
    engine
        .budget()
        .reserve(want_slots, cfg.chunk_bytes as usize, workers, &|| {
            control.is_cancelled()
        })
        .map_err(|e| match e {
            BudgetError::GaveUp => CopyError::Cancelled,
            BudgetError::TooSmall { .. } => CopyError::Usage(e.to_string()),
            BudgetError::Pool(_) => CopyError::Engine(e.to_string()),
        })
}

/// What every context of a job starts with.
pub(super) struct ContextCommon<'a> {
    pub(super) read_retries: u32,
    pub(super) shared: &'a Arc<Shared>,
    pub(super) exits: &'a Arc<Exits>,
    /// The job's start depth, shared out between its contexts.
    pub(super) depth_start: usize,
    pub(super) zero_max_bytes: u64,
    pub(super) ops_max: usize,
}

/// Attach one context per worker in `on`, each with its share of the
/// buffers and its ends; returns where each sends its connections back.
pub(super) fn attach_contexts(
    engine: &Engine,
    on: &[usize],
    shares: Vec<PoolShare>,
    ends: Vec<(SrcIo, DstIo)>,
    common: &ContextCommon<'_>,
) -> Vec<mpsc::Receiver<(SrcIo, DstIo)>> {
    let mut handles = Vec::with_capacity(on.len());
    for (i, (share, (src, dst))) in shares.into_iter().zip(ends).enumerate() {
        let (back, back_rx) = mpsc::channel();
        let cfg = WorkerConfig {
            depth_start: common.depth_start.min(share.slots()).max(1),
            index: i,
            granule_bytes: zero::GRANULE_BYTES,
            zero_max_bytes: common.zero_max_bytes,
            read_retries: common.read_retries,
        };
        let seed = Seed {
            cfg,
            shared: Arc::clone(common.shared),
            share,
            src,
            dst,
            ops_max: common.ops_max,
            back,
            exit: common.exits.enter(),
        };
        engine.attach(on[i], seed);
        handles.push(back_rx);
    }
    handles
}
