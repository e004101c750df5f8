//! The work of an incremental pass: its changed extents (copy and zero;
//! unchanged ones are not planned), what a round still has to move of
//! them, and the exact work items for the workers.
//!
//! Unlike a full pass, which plans whole chunk windows, a pass plans
//! exactly its extents: a 4 KiB change costs a 4 KiB read, not a window.
//! Copy extents are cut at chunk boundaries into [`Work::Copy`] items
//! (partial windows: the whole item is changed data, so every byte of it,
//! zero runs found in it included, is sent); zero extents become
//! [`Work::Zero`] items, which the target must apply (it holds data
//! there).

use super::windows::{MapError, Work, ZERO_ITEM_MAX_BYTES};
use super::{PassExtent, PassKind, PassPlan, PlanError};

/// The changed extents of a pass: copy and zero extents, sorted,
/// disjoint, adjacent extents of one kind merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassWork {
    extents: Vec<PassExtent>,
    size_bytes: u64,
}

impl PassWork {
    /// The copy and zero extents of `plan`.
    pub fn from_plan(plan: &PassPlan) -> Self {
        PassWork {
            extents: plan
                .extents()
                .iter()
                .filter(|e| e.kind != PassKind::Unchanged)
                .copied()
                .collect(),
            size_bytes: plan.size_bytes(),
        }
    }

    /// The extents, in order.
    pub fn extents(&self) -> &[PassExtent] {
        &self.extents
    }

    /// Bytes of `kind`.
    pub fn bytes(&self, kind: PassKind) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.len)
            .sum()
    }

    /// Bytes the pass changes (copy and zero).
    pub fn changed_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// The changed set as `(offset, len)` ranges, adjacent ones merged
    /// (what a PLAN frame carries).
    pub fn changed_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.extents.len());
        for e in &self.extents {
            match out.last_mut() {
                Some((o, l)) if *o + *l == e.offset => *l += e.len,
                _ => out.push((e.offset, e.len)),
            }
        }
        out
    }

    /// Add `ranges` (any order, may overlap the set; clipped to the disk)
    /// to the pass, planned from the source's current `data` ranges
    /// (sorted, disjoint): data → copy, the rest → zero. Returns the bytes
    /// added.
    pub fn add(&mut self, ranges: &[(u64, u64)], data: &[(u64, u64)]) -> Result<u64, PlanError> {
        let wanted = normalize(ranges, self.size_bytes);
        let new = subtract(&wanted, &self.changed_ranges());
        if new.is_empty() {
            return Ok(0);
        }
        let added = PassPlan::from_changed(&new, data, self.size_bytes)?;
        let added = PassWork::from_plan(&added);
        let bytes = added.changed_bytes();
        let mut all: Vec<PassExtent> = self.extents.drain(..).chain(added.extents).collect();
        all.sort_by_key(|e| e.offset);
        for e in all {
            match self.extents.last_mut() {
                Some(last) if last.end() == e.offset && last.kind == e.kind => last.len += e.len,
                _ => self.extents.push(e),
            }
        }
        Ok(bytes)
    }

    /// Join the changed ranges across their smallest gaps until at most
    /// `max_ranges` remain (a PLAN's bound), the gaps planned from the
    /// source's `data` like [`Self::add`]. Sending an unchanged gap again
    /// is harmless: the source holds there what the target holds. Returns
    /// the bytes added.
    pub fn coalesce(&mut self, max_ranges: usize, data: &[(u64, u64)]) -> Result<u64, PlanError> {
        let ranges = self.changed_ranges();
        let Some(excess) = ranges.len().checked_sub(max_ranges.max(1)) else {
            return Ok(0);
        };
        if excess == 0 {
            return Ok(0);
        }
        let mut gaps: Vec<(u64, u64)> = ranges
            .windows(2)
            .map(|w| (w[1].0 - (w[0].0 + w[0].1), w[0].0 + w[0].1))
            .collect();
        gaps.select_nth_unstable(excess - 1);
        let joined: Vec<(u64, u64)> = gaps[..excess].iter().map(|&(len, at)| (at, len)).collect();
        self.add(&joined, data)
    }

    /// The parts of the pass inside `spans` (sorted, disjoint): what a
    /// round still has to move.
    pub fn within(&self, spans: &[(u64, u64)]) -> Vec<PassExtent> {
        let mut out = Vec::new();
        let mut s = 0;
        for e in &self.extents {
            while spans.get(s).is_some_and(|&(o, l)| o + l <= e.offset) {
                s += 1;
            }
            let mut i = s;
            while let Some(&(o, l)) = spans.get(i).filter(|&&(o, _)| o < e.end()) {
                let (start, end) = (o.max(e.offset), (o + l).min(e.end()));
                out.push(PassExtent {
                    offset: start,
                    len: end - start,
                    kind: e.kind,
                });
                i += 1;
            }
        }
        out
    }
}

/// Sort, merge and clip `(offset, len)` ranges to `[0, size_bytes)`,
/// dropping empty ones.
fn normalize(ranges: &[(u64, u64)], size_bytes: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .filter_map(|&(o, l)| {
            let end = o.saturating_add(l).min(size_bytes);
            (end > o).then_some((o, end))
        })
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (start, end) in v {
        match out.last_mut() {
            Some((o, l)) if *o + *l >= start => *l = (*o + *l).max(end) - *o,
            _ => out.push((start, end - start)),
        }
    }
    out
}

/// `a ∖ b`, both sorted, disjoint `(offset, len)` lists.
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(o, l) in a {
        let end = o + l;
        let mut pos = o;
        while b.get(j).is_some_and(|&(bo, bl)| bo + bl <= pos) {
            j += 1;
        }
        let mut k = j;
        while let Some(&(bo, bl)) = b.get(k).filter(|&&(bo, _)| bo < end) {
            if bo > pos {
                out.push((pos, bo - pos));
            }
            pos = pos.max(bo + bl);
            k += 1;
        }
        if pos < end {
            out.push((pos, end - pos));
        }
    }
    out
}

/// Emit the work items of `items` (sorted, disjoint copy and zero
/// extents) in order: copy extents cut at `chunk_bytes` boundaries, each
/// piece all data; zero extents in pieces of at most
/// [`ZERO_ITEM_MAX_BYTES`]. Returns the copy bytes planned.
pub fn emit_exact(
    items: &[PassExtent],
    chunk_bytes: u32,
    emit: &mut dyn FnMut(Work) -> Result<(), MapError>,
) -> Result<u64, MapError> {
    let chunk = u64::from(chunk_bytes.max(1));
    let mut planned = 0;
    for e in items {
        let mut pos = e.offset;
        while pos < e.end() {
            match e.kind {
                PassKind::Copy => {
                    let next = (pos - pos % chunk + chunk).min(e.end());
                    let len = u32::try_from(next - pos).expect("at most one chunk");
                    emit(Work::Copy {
                        offset: pos,
                        len,
                        data: vec![(0, len)],
                    })?;
                    planned += u64::from(len);
                    pos = next;
                }
                PassKind::Zero => {
                    let len = (e.end() - pos).min(ZERO_ITEM_MAX_BYTES);
                    emit(Work::Zero { offset: pos, len })?;
                    pos += len;
                }
                PassKind::Unchanged => pos = e.end(),
            }
        }
    }
    Ok(planned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, kind: PassKind) -> PassExtent {
        PassExtent { offset, len, kind }
    }

    fn work(size: u64, changed: &[(u64, u64)], data: &[(u64, u64)]) -> PassWork {
        PassWork::from_plan(&PassPlan::from_changed(changed, data, size).unwrap())
    }

    #[test]
    fn a_pass_keeps_copy_and_zero_extents_only() {
        let w = work(1 << 20, &[(0, 8192), (65536, 4096)], &[(4096, 65536)]);
        assert_eq!(
            w.extents(),
            &[
                ext(0, 4096, PassKind::Zero),
                ext(4096, 4096, PassKind::Copy),
                ext(65536, 4096, PassKind::Copy),
            ]
        );
        assert_eq!(w.changed_bytes(), 12288);
        assert_eq!(w.bytes(PassKind::Copy), 8192);
        assert_eq!(w.changed_ranges(), vec![(0, 8192), (65536, 4096)]);
    }

    #[test]
    fn a_4k_change_is_one_4k_item_not_a_window() {
        let w = work(1 << 30, &[(5 << 20, 4096)], &[(0, 1 << 30)]);
        let mut items = Vec::new();
        let planned = emit_exact(w.extents(), 512 << 10, &mut |x| {
            items.push(x);
            Ok(())
        })
        .unwrap();
        assert_eq!(planned, 4096);
        assert_eq!(
            items,
            vec![Work::Copy {
                offset: 5 << 20,
                len: 4096,
                data: vec![(0, 4096)]
            }]
        );
    }

    #[test]
    fn copy_extents_are_cut_at_chunk_boundaries_and_zeros_kept_whole() {
        let items = [
            ext(1000, 3000, PassKind::Copy),
            ext(4000, 5000, PassKind::Zero),
        ];
        let mut out = Vec::new();
        let planned = emit_exact(&items, 1024, &mut |x| {
            out.push(x);
            Ok(())
        })
        .unwrap();
        assert_eq!(planned, 3000);
        let copies: Vec<(u64, u32)> = out
            .iter()
            .filter_map(|w| match w {
                Work::Copy { offset, len, .. } => Some((*offset, *len)),
                Work::Zero { .. } => None,
            })
            .collect();
        assert_eq!(
            copies,
            vec![(1000, 24), (1024, 1024), (2048, 1024), (3072, 928)]
        );
        assert_eq!(
            out.last(),
            Some(&Work::Zero {
                offset: 4000,
                len: 5000
            })
        );
    }

    #[test]
    fn within_cuts_the_pass_to_what_is_missing() {
        let w = work(
            100_000,
            &[(0, 10_000), (50_000, 10_000)],
            &[(5_000, 50_000)],
        );
        let cut = w.within(&[(2_000, 6_000), (55_000, 100), (59_000, 41_000)]);
        assert_eq!(
            cut,
            vec![
                ext(2_000, 3_000, PassKind::Zero),
                ext(5_000, 3_000, PassKind::Copy),
                ext(55_000, 100, PassKind::Zero),
                ext(59_000, 1_000, PassKind::Zero),
            ]
        );
        assert!(w.within(&[]).is_empty());
    }

    #[test]
    fn replanned_ranges_join_the_pass_from_the_current_allocation() {
        let mut w = work(100_000, &[(10_000, 10_000)], &[(0, 15_000)]);
        // Overlaps the pass, reaches past the disk, out of order.
        let added = w
            .add(
                &[(90_000, 20_000), (15_000, 10_000), (0, 2_000)],
                &[(0, 15_000), (95_000, 1_000)],
            )
            .unwrap();
        assert_eq!(added, 2_000 + 5_000 + 10_000);
        assert_eq!(
            w.extents(),
            &[
                ext(0, 2_000, PassKind::Copy),
                ext(10_000, 5_000, PassKind::Copy),
                ext(15_000, 10_000, PassKind::Zero),
                ext(90_000, 5_000, PassKind::Zero),
                ext(95_000, 1_000, PassKind::Copy),
                ext(96_000, 4_000, PassKind::Zero),
            ]
        );
        assert_eq!(w.add(&[(10_000, 5_000)], &[]).unwrap(), 0);
    }

    #[test]
    fn too_many_ranges_are_joined_across_their_smallest_gaps() {
        let changed = [(0, 10), (12, 10), (100, 10), (113, 10), (200, 10)];
        let mut w = work(1000, &changed, &[(0, 1000)]);
        assert_eq!(w.coalesce(5, &[]).unwrap(), 0);
        assert_eq!(w.coalesce(3, &[(0, 20)]).unwrap(), 2 + 3);
        assert_eq!(w.changed_ranges(), vec![(0, 22), (100, 23), (200, 10)]);
        // The gap at 10 holds data now, the one at 110 does not.
        assert!(w.extents().contains(&ext(0, 22, PassKind::Copy)));
        assert!(w.extents().contains(&ext(110, 3, PassKind::Zero)));
        assert_eq!(w.coalesce(1, &[(0, 1000)]).unwrap(), 78 + 77);
        assert_eq!(w.changed_ranges(), vec![(0, 210)]);
    }

    #[test]
    fn subtract_and_normalize_handle_edges() {
        assert_eq!(
            subtract(&[(0, 100)], &[(0, 10), (20, 10), (90, 20)]),
            vec![(10, 10), (30, 60)]
        );
        assert_eq!(subtract(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(
            normalize(&[(5, 5), (0, 6), (20, 0), (u64::MAX, 5)], 100),
            vec![(0, 10)]
        );
    }
}
