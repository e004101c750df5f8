//! The planner thread: turns the extent list into work items for the
//! job's contexts, waiting on the bounded queue when it is full.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::run::PipelineConfig;
use super::stats::Stats;
use super::{CopyError, Shared};
use crate::plan::PassExtent;
use crate::plan::lanes::plan_lanes;
use crate::plan::maps::ExtentList;
use crate::plan::pass_work::emit_exact;
use crate::plan::windows::Work;

pub(super) fn spawn_planner(
    cfg: &PipelineConfig,
    extents: ExtentList,
    size_bytes: u64,
    fresh_zero: bool,
    shared: &Arc<Shared>,
) -> Result<JoinHandle<()>, CopyError> {
    let shared = Arc::clone(shared);
    let spans = cfg.spans.clone();
    let exact = cfg.exact.clone();
    let (chunk_bytes, lanes) = (cfg.chunk_bytes, cfg.lanes);
    std::thread::Builder::new()
        .name("planner".into())
        .spawn(move || {
            run_planner(
                extents,
                exact,
                spans,
                size_bytes,
                chunk_bytes,
                lanes,
                fresh_zero,
                &shared,
            )
        })
        .map_err(|e| CopyError::Internal(format!("spawning the planner: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn run_planner(
    mut extents: ExtentList,
    exact: Option<Vec<PassExtent>>,
    spans: Option<Vec<(u64, u64)>>,
    size_bytes: u64,
    chunk_bytes: u32,
    lanes: u32,
    fresh_zero: bool,
    shared: &Shared,
) {
    let mut emit = |work: Work| -> Result<(), crate::plan::windows::MapError> {
        if let Work::Zero { len, .. } = work
            && fresh_zero
        {
            Stats::add(&shared.stats.bytes_zeroed, len);
            return Ok(());
        }
        let mut item = work;
        let mut backoff = 0u32;
        loop {
            if shared.aborted() {
                return Ok(());
            }
            match shared.queue.push(item) {
                Ok(()) => return Ok(()),
                Err(back) => {
                    item = back;
                    backoff = backoff.saturating_add(1);
                    if backoff < 16 {
                        std::thread::yield_now();
                    } else {
                        // The queue holds thousands of items: no hurry.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    };
    let whole = [(0, size_bytes)];
    let spans = spans.as_deref().unwrap_or(&whole);
    let planned = match exact {
        // An incremental pass: its extents, exactly, in ascending order.
        Some(items) => emit_exact(&items, chunk_bytes, &mut emit),
        None => plan_lanes(
            &mut extents,
            spans,
            size_bytes,
            chunk_bytes,
            lanes,
            &mut emit,
        ),
    };
    if let Err(e) = planned {
        shared.fail(e.into());
    }
    shared.set_planner_done();
}
