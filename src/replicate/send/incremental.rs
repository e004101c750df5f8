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
const MAX_PLAN_RANGES: usize = wire::pass::MAX_PLAN_RANGES as usize;

/// What a HELLO says of the pass, and the PLAN that follows it.
pub(super) struct PassHello {
    pub mode: wire::PassMode,
    pub base_sync_id: SyncId,
    pub plan_digest: [u8; 32],
    pub plan: Option<Frame>,
}

impl PassHello {
    /// For `opts`'s pass; an incremental's plan is `job`'s changed ranges
    /// now (before any WELCOME adds to them).
    pub(super) fn new(opts: &SendOptions, job: &JobShared) -> Self {
        let none = PassHello {
            mode: wire::PassMode::Full,
            base_sync_id: wire::pass::NO_SYNC_ID,
            plan_digest: [0; 32],
            plan: None,
        };
        match (&opts.pass, &job.pass) {
            (PassRequest::Incremental { base, .. }, Some(pass)) => {
                let ranges: Vec<ByteRange> = lock(pass)
                    .changed_ranges()
                    .into_iter()
                    .map(|(offset, len_bytes)| ByteRange { offset, len_bytes })
                    .collect();
                PassHello {
                    mode: wire::PassMode::Incremental,
                    base_sync_id: *base,
                    plan_digest: wire::plan_digest(&ranges),
                    plan: Some(Frame::Plan(ranges)),
                }
            }
            (PassRequest::Delta { .. }, _) => PassHello {
                mode: wire::PassMode::Delta,
                ..none
            },
            _ => none,
        }
    }
}

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
    let mut work = work;
    let ranges = work.changed_ranges().len();
    if ranges > MAX_PLAN_RANGES {
        let added = work
            .coalesce(MAX_PLAN_RANGES, source.extents.extents())
            .map_err(|e| CopyError::Internal(format!("joining the pass's ranges: {e}")))?;
        info!(
            ranges,
            added_bytes = added,
            "the pass has more ranges than a plan holds: joined across the smallest gaps"
        );
    }
    let ranges = work.changed_ranges().len();
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
    pub(super) fn push_replan(&self, ranges: &[ByteRange]) {
        if self.pass.is_some() && !ranges.is_empty() {
            lock(&self.replan).extend(ranges.iter().map(|r| (r.offset, r.len_bytes)));
        }
    }

    /// A WELCOME's sync id: the one the receiver records for this job.
    pub(super) fn note_sync_id(&self, id: SyncId) {
        *lock(&self.welcome_sync_id) = Some(id);
    }

    /// The sync id to report: the receiver's, else this run's.
    pub(super) fn sync_id_or(&self, own: SyncId) -> SyncId {
        lock(&self.welcome_sync_id).unwrap_or(own)
    }

    /// Whether WELCOMEs asked for ranges not yet added to the pass.
    pub(super) fn has_replan(&self) -> bool {
        !lock(&self.replan).is_empty()
    }

    /// Add the ranges WELCOMEs asked for to the pass, planned from
    /// `source`'s allocation (data → copy, holes → zero).
    pub(super) fn apply_replan(&self, source: &Source) -> Result<(), CopyError> {
        self.apply_replan_with(source.extents.extents())
    }

    /// [`Self::apply_replan`] with the source's `data` ranges.
    fn apply_replan_with(&self, data: &[(u64, u64)]) -> Result<(), CopyError> {
        let (Some(pass), ranges) = (&self.pass, std::mem::take(&mut *lock(&self.replan))) else {
            return Ok(());
        };
        if ranges.is_empty() {
            return Ok(());
        }
        let added = lock(pass)
            .add(&ranges, data)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PassPlan;

    fn pass(size: u64, changed: &[(u64, u64)], data: &[(u64, u64)]) -> PassWork {
        PassWork::from_plan(&PassPlan::from_changed(changed, data, size).unwrap())
    }

    fn exact(job: &JobShared) -> Vec<(u64, u64, PassKind)> {
        match job.next_round(1 << 20, 4096) {
            Some((RoundPlan::Exact(items), bytes)) => {
                assert_eq!(bytes, items.iter().map(|e| e.len).sum::<u64>());
                items.iter().map(|e| (e.offset, e.len, e.kind)).collect()
            }
            Some((RoundPlan::Windows(_), _)) => panic!("a pass planned windows"),
            None => Vec::new(),
        }
    }

    fn range(offset: u64, len_bytes: u64) -> ByteRange {
        ByteRange { offset, len_bytes }
    }

    #[test]
    fn rounds_of_a_pass_move_planned_minus_acknowledged() {
        let job = JobShared::new(
            1,
            Some(pass(1 << 20, &[(0, 8192), (65536, 4096)], &[(4096, 65536)])),
        );
        assert_eq!(
            exact(&job),
            vec![
                (0, 4096, PassKind::Zero),
                (4096, 4096, PassKind::Copy),
                (65536, 4096, PassKind::Copy)
            ]
        );
        // The receiver resumes the pass: its durable ranges are not sent.
        job.apply_welcome(7, &[range(0, 6000)]);
        assert_eq!(
            exact(&job),
            vec![(6000, 2192, PassKind::Copy), (65536, 4096, PassKind::Copy)]
        );
        assert_eq!(job.pass_copy_bytes_held(1 << 20), Some(1904));
        assert!(job.apply_ack(7, &[range(6000, 2192), range(65536, 4096)]));
        assert!(job.next_round(1 << 20, 4096).is_none());
        assert_eq!(job.pass_changed_bytes(), Some(12288));
    }

    #[test]
    fn replanned_ranges_are_sent_from_the_allocation_at_the_next_round() {
        let job = JobShared::new(1, Some(pass(1 << 20, &[(0, 4096)], &[(0, 4096)])));
        job.apply_welcome(1, &[range(0, 4096)]);
        assert!(job.next_round(1 << 20, 4096).is_none());
        job.push_replan(&[range(8192, 8192)]);
        assert!(job.has_replan());
        job.apply_replan_with(&[(0, 12288)]).unwrap();
        assert!(!job.has_replan());
        assert_eq!(
            exact(&job),
            vec![(8192, 4096, PassKind::Copy), (12288, 4096, PassKind::Zero)]
        );
        assert_eq!(job.pass_changed_bytes(), Some(4096 + 8192));
    }

    #[test]
    fn a_full_pass_plans_windows_and_ignores_replan() {
        let job = JobShared::new(1, None);
        job.push_replan(&[range(0, 4096)]);
        assert!(!job.has_replan());
        assert!(matches!(
            job.next_round(1 << 20, 4096),
            Some((RoundPlan::Windows(None), 1_048_576))
        ));
        job.apply_welcome(1, &[range(0, 5000)]);
        match job.next_round(1 << 20, 4096) {
            Some((RoundPlan::Windows(Some(spans)), bytes)) => {
                assert_eq!(spans, vec![(4096, (1 << 20) - 4096)]);
                assert_eq!(bytes, (1 << 20) - 5000);
            }
            _ => panic!("a resumed full pass plans the windows it misses"),
        }
    }
}
