//! An incremental pass on the sender: opening the source with what
//! changed (a dirty bitmap or a changed-areas list), the pass's planned
//! set across rounds, and ranges the receiver asks to be sent again.
//!
//! The pass's work ([`PassWork`]) is fixed when the source is opened and
//! only grows: by WELCOME's `replan` ranges (what an interrupted earlier
//! pass on the same base may have changed on the target outside this
//! plan), planned from the source's allocation at that time. Each round
//! moves `planned ∖ acknowledged`, exactly (no whole windows), so a round
//! after a failure, or a rerun after kill -9, sends only what the
//! receiver does not hold yet.

use std::io::Read;

use super::*;
use crate::endpoint::open::{Source, open_source_with_bitmap};
use crate::plan::pass_work::PassWork;
use crate::plan::{PassExtent, PassKind, changed_areas};

/// Most ranges a PLAN frame carries.
const MAX_PLAN_RANGES: usize = 1 << 20;

/// What the next round moves.
pub(super) enum RoundPlan {
    /// Whole windows of these spans (`None`: the whole disk).
    Windows(Option<Vec<(u64, u64)>>),
    /// These copy and zero extents of an incremental pass.
    Exact(Vec<PassExtent>),
}

/// Open the source as `opts.pass` needs it: with the plan of an
/// incremental pass, or alone.
pub(super) fn open_for_pass(opts: &SendOptions) -> Result<(Source, Option<PassWork>), CopyError> {
    let PassRequest::Incremental { changed, .. } = &opts.pass else {
        let source = open_source(
            &opts.source,
            opts.source_format,
            opts.connections,
            opts.io_timeout,
        )?;
        return Ok((source, None));
    };
    let (source, work) = match changed {
        ChangedSource::DirtyBitmap(name) => {
            let (source, plan) = open_source_with_bitmap(
                &opts.source,
                opts.source_format,
                opts.connections,
                opts.io_timeout,
                name,
            )?;
            (source, PassWork::from_plan(&plan))
        }
        ChangedSource::ChangedAreas(path) => {
            let text = read_changed_areas(path)?;
            let source = open_source(
                &opts.source,
                opts.source_format,
                opts.connections,
                opts.io_timeout,
            )?;
            let areas = changed_areas::parse(&text, source.size_bytes)
                .map_err(|e| CopyError::Usage(format!("{}: {e}", path.display())))?;
            let plan = areas
                .plan(source.extents.extents())
                .map_err(|e| CopyError::Internal(format!("planning the changed areas: {e}")))?;
            (source, PassWork::from_plan(&plan))
        }
    };
    let ranges = work.changed_ranges().len();
    if ranges > MAX_PLAN_RANGES {
        return Err(CopyError::Usage(format!(
            "the pass changes {ranges} separate ranges, more than the {} a plan may hold; \
             send it as a delta pass (no base needed) instead",
            MAX_PLAN_RANGES
        )));
    }
    info!(
        copy_bytes = work.bytes(PassKind::Copy),
        zero_bytes = work.bytes(PassKind::Zero),
        ranges,
        "incremental pass planned"
    );
    Ok((source, Some(work)))
}

/// A changed-areas file's text, at most [`changed_areas::MAX_TEXT_BYTES`].
fn read_changed_areas(path: &std::path::Path) -> Result<String, CopyError> {
    let usage = |e: std::io::Error| {
        CopyError::Usage(format!(
            "cannot read the changed-areas list {}: {e}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(usage)?;
    let mut text = String::new();
    let max = changed_areas::MAX_TEXT_BYTES as u64;
    file.take(max + 1)
        .read_to_string(&mut text)
        .map_err(usage)?;
    if text.len() as u64 > max {
        return Err(CopyError::Usage(format!(
            "the changed-areas list {} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(text)
}

impl JobShared {
    /// What the next round moves, and its bytes; `None` when the receiver
    /// holds everything the pass has to move.
    pub(super) fn next_round(&self, size_bytes: u64, chunk_bytes: u32) -> Option<(RoundPlan, u64)> {
        let missing = self.missing(size_bytes);
        if let Some(pass) = &self.pass {
            let todo = lock(pass).within(&missing);
            let bytes = todo.iter().map(|e| e.len).sum();
            return (!todo.is_empty()).then_some((RoundPlan::Exact(todo), bytes));
        }
        if missing.is_empty() {
            return None;
        }
        let bytes = missing.iter().map(|r| r.1).sum();
        // A first run plans the whole disk (lanes spread over it); a
        // resumed one only the windows not held yet.
        let spans = (self.covered() > 0).then(|| whole_windows(&missing, size_bytes, chunk_bytes));
        Some((RoundPlan::Windows(spans), bytes))
    }

    /// Remember ranges a WELCOME asks to be sent too (planned at the next
    /// round, from the source's allocation then).
    #[allow(dead_code)] // used once the receiver sends them (wire v2)
    pub(super) fn push_replan(&self, ranges: &[ByteRange]) {
        if self.pass.is_some() && !ranges.is_empty() {
            lock(&self.replan).extend(ranges.iter().map(|r| (r.offset, r.len_bytes)));
        }
    }

    /// Whether WELCOMEs asked for ranges not yet added to the pass.
    pub(super) fn has_replan(&self) -> bool {
        !lock(&self.replan).is_empty()
    }

    /// Add the ranges WELCOMEs asked for to the pass, planned from
    /// `source`'s allocation (data → copy, holes → zero).
    pub(super) fn apply_replan(&self, source: &Source) -> Result<(), CopyError> {
        let (Some(pass), ranges) = (&self.pass, std::mem::take(&mut *lock(&self.replan))) else {
            return Ok(());
        };
        if ranges.is_empty() {
            return Ok(());
        }
        let added = lock(pass)
            .add(&ranges, source.extents.extents())
            .map_err(|e| CopyError::Internal(format!("adding the receiver's ranges: {e}")))?;
        info!(
            added_bytes = added,
            "the receiver holds changes of an interrupted earlier pass outside this plan: sending those too"
        );
        Ok(())
    }

    /// Copy bytes of the pass the receiver holds already.
    pub(super) fn pass_copy_bytes_held(&self, size_bytes: u64) -> Option<u64> {
        let pass = lock(self.pass.as_ref()?);
        let todo: u64 = pass
            .within(&self.missing(size_bytes))
            .iter()
            .filter(|e| e.kind == PassKind::Copy)
            .map(|e| e.len)
            .sum();
        Some(pass.bytes(PassKind::Copy) - todo)
    }

    /// The pass's changed bytes (copy and zero), replanned ranges included.
    pub(super) fn pass_changed_bytes(&self) -> Option<u64> {
        Some(lock(self.pass.as_ref()?).changed_bytes())
    }
}
