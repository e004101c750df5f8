//! The order in which the planner hands out work: several regions of the
//! disk side by side ("lanes"), one data window from each in turn.
//!
//! In ascending order, every request in flight lands in the same few
//! megabytes of the source and of the target, and the block layer merges
//! the target's writeback into a few large requests. The bench machine's
//! virtual disk serves more at once when the requests in flight are spread
//! over the disk: dense 2 GiB from qemu-nbd into a file on the same disk
//! went from 2.28 s to 2.11 s with 16 lanes (nbdcopy, whose threads each
//! copy their own region, 2.16 s), with 3–5 times as many requests in
//! flight at the disk (docs/bench/history.md#lanes-session-8).
//!
//! Lanes hold about equal amounts of data, not equal spans of the disk, so
//! they run out together and the copy ends with every lane busy until the
//! last window. A lane is a sorted list of whole windows; each step plans
//! the stretch from its cursor to the end of its next data window, so a
//! hole before it stays one zero item and never costs a request per window.

#![forbid(unsafe_code)]
use super::maps::ExtentList;
use super::windows::{Emit, MapError, plan_span};

/// Lanes by default: more than the requests in flight at the local depth
/// (2 workers × 4 slots), so those never share a region.
pub const LANES_DEFAULT: u32 = 8;
/// The most lanes `--lanes` accepts.
pub const LANES_MAX: u32 = 256;

struct Lane {
    /// Whole windows, sorted and disjoint.
    spans: Vec<(u64, u64)>,
    idx: usize,
    pos: u64,
}

impl Lane {
    /// The next stretch to plan: from the cursor to the end of the next
    /// data window, or to the end of the span when no data is left in it.
    fn next(&mut self, list: &ExtentList, chunk: u64) -> Option<(u64, u64)> {
        loop {
            let &(start, len) = self.spans.get(self.idx)?;
            let end = start + len;
            self.pos = self.pos.max(start);
            if self.pos >= end {
                self.idx += 1;
                continue;
            }
            let stop = match list.next_data(self.pos) {
                Some(d) if d < end => (d - d % chunk + chunk).min(end),
                _ => end,
            };
            let piece = (self.pos, stop);
            self.pos = stop;
            return Some(piece);
        }
    }
}

/// Plan `spans` (sorted, disjoint, whole windows of `chunk_bytes`) in
/// `lanes` lanes of about equal data, one data window from each lane in
/// turn. With one lane the items come out as [`super::windows::plan_windows`]
/// gives them. Returns the number of data bytes planned.
pub fn plan_lanes(
    list: &mut ExtentList,
    spans: &[(u64, u64)],
    size_bytes: u64,
    chunk_bytes: u32,
    lanes: u32,
    emit: Emit<'_>,
) -> Result<u64, MapError> {
    let chunk = u64::from(chunk_bytes.max(1));
    let mut lanes: Vec<Lane> = split(list, spans, size_bytes, chunk, lanes.max(1))
        .into_iter()
        .map(|spans| Lane {
            spans,
            idx: 0,
            pos: 0,
        })
        .collect();
    let mut planned = 0;
    while !lanes.is_empty() {
        let mut i = 0;
        while i < lanes.len() {
            match lanes[i].next(list, chunk) {
                Some((from, to)) => {
                    planned += plan_span(list, from, to, size_bytes, chunk_bytes, &mut *emit)?;
                    i += 1;
                }
                None => {
                    lanes.remove(i);
                }
            }
        }
    }
    Ok(planned)
}

/// Cut `spans` into at most `lanes` lists of whole windows holding about
/// equal data. Cuts fall on window boundaries; lanes left without any span
/// are dropped.
fn split(
    list: &ExtentList,
    spans: &[(u64, u64)],
    size_bytes: u64,
    chunk: u64,
    lanes: u32,
) -> Vec<Vec<(u64, u64)>> {
    let spans: Vec<(u64, u64)> = spans
        .iter()
        .map(|&(s, l)| (s, s.saturating_add(l).min(size_bytes)))
        .filter(|&(s, e)| s < e)
        .collect();
    let data = list.data_bytes_within(&spans.iter().map(|&(s, e)| (s, e - s)).collect::<Vec<_>>());
    // Offsets where lane k ends, for k in 1..lanes: the window holding the
    // (data × k / lanes)-th data byte, rounded up to its end.
    let mut cuts = Vec::with_capacity(lanes as usize);
    if lanes > 1 && data > 0 {
        let mut seen = 0u64;
        let mut k = 1u64;
        let n = u64::from(lanes);
        'walk: for &(s, e) in &spans {
            let first = list.extents().partition_point(|&(o, l)| o + l <= s);
            for &(o, l) in &list.extents()[first..] {
                if o >= e {
                    break;
                }
                let (a, b) = (o.max(s), (o + l).min(e));
                // The (data × k / lanes)-th byte, without overflow (k <= n, so
                // it is at most `data`).
                let share = |k: u64| {
                    u64::try_from(u128::from(data) * u128::from(k) / u128::from(n)).unwrap_or(data)
                };
                while k < n && seen + (b - a) >= share(k) {
                    let at = a + (share(k) - seen);
                    let cut = at.div_ceil(chunk).saturating_mul(chunk).min(size_bytes);
                    if cuts.last() != Some(&cut) {
                        cuts.push(cut);
                    }
                    k += 1;
                }
                seen += b - a;
                if k >= n {
                    break 'walk;
                }
            }
        }
    }
    cuts.push(u64::MAX);
    let mut out = Vec::with_capacity(cuts.len());
    let mut from = 0u64;
    for &to in &cuts {
        let lane: Vec<(u64, u64)> = spans
            .iter()
            .filter_map(|&(s, e)| {
                let (a, b) = (s.max(from), e.min(to));
                (a < b).then(|| (a, b - a))
            })
            .collect();
        if !lane.is_empty() {
            out.push(lane);
        }
        from = to;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::windows::{Work, plan_windows};
    use super::*;
    use proptest::prelude::*;

    fn list(data: &[(u64, u64)], size: u64) -> ExtentList {
        ExtentList::from_data(data.to_vec(), size)
    }

    fn lanes_of(
        l: &mut ExtentList,
        spans: &[(u64, u64)],
        size: u64,
        chunk: u32,
        n: u32,
    ) -> (u64, Vec<Work>) {
        let mut v = Vec::new();
        let planned = plan_lanes(l, spans, size, chunk, n, &mut |w| {
            v.push(w);
            Ok(())
        })
        .unwrap();
        (planned, v)
    }

    /// Every byte of the disk, as (offset, len, is data) pieces, sorted:
    /// what a plan asks for, whatever its order and however its zero
    /// items are cut.
    fn coverage(items: &[Work]) -> Vec<(u64, u64, bool)> {
        let mut v: Vec<(u64, u64, bool)> = Vec::new();
        for w in items {
            match w {
                Work::Copy { offset, len, data } => {
                    let mut pos = 0u32;
                    for &(r, l) in data {
                        if r > pos {
                            v.push((offset + u64::from(pos), u64::from(r - pos), false));
                        }
                        v.push((offset + u64::from(r), u64::from(l), true));
                        pos = r + l;
                    }
                    if pos < *len {
                        v.push((offset + u64::from(pos), u64::from(len - pos), false));
                    }
                }
                Work::Zero { offset, len } => v.push((*offset, *len, false)),
            }
        }
        v.sort();
        // Merge neighbours of the same kind.
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for (o, l, d) in v {
            match out.last_mut() {
                Some((po, pl, pd)) if *pd == d && *po + *pl == o => *pl += l,
                _ => out.push((o, l, d)),
            }
        }
        out
    }

    #[test]
    fn one_lane_plans_exactly_what_plan_windows_plans() {
        let size = 10 << 20;
        let data = [
            (100_000, 50_000),
            (1 << 20, 3 << 20),
            ((7 << 20) + 5, 12_345),
        ];
        let spans = [(0, size)];
        let mut l = list(&data, size);
        let mut want = Vec::new();
        let want_planned = plan_windows(&mut list(&data, size), &spans, size, 65_536, &mut |w| {
            want.push(w);
            Ok(())
        })
        .unwrap();
        let (planned, got) = lanes_of(&mut l, &spans, size, 65_536, 1);
        assert_eq!(planned, want_planned);
        assert_eq!(got, want);
    }

    #[test]
    fn a_dense_disk_alternates_between_lanes_of_equal_size() {
        let size = 64 << 20;
        let chunk = 1 << 20;
        let mut l = list(&[(0, size)], size);
        let (planned, got) = lanes_of(&mut l, &[(0, size)], size, chunk, 4);
        assert_eq!(planned, size);
        let offsets: Vec<u64> = got
            .iter()
            .map(|w| match w {
                Work::Copy { offset, .. } => offset >> 20,
                Work::Zero { .. } => panic!("a dense disk has no zero items: {w:?}"),
            })
            .collect();
        assert_eq!(&offsets[..8], &[0, 16, 32, 48, 1, 17, 33, 49]);
        assert_eq!(offsets.len(), 64);
    }

    #[test]
    fn lanes_hold_equal_data_not_equal_spans() {
        // All the data in the first quarter: four lanes share it.
        let size = 64 << 20;
        let chunk = 1 << 20;
        let mut l = list(&[(0, 16 << 20)], size);
        let (_, got) = lanes_of(&mut l, &[(0, size)], size, chunk, 4);
        let first: Vec<u64> = got
            .iter()
            .take(4)
            .map(|w| match w {
                Work::Copy { offset, .. } => offset >> 20,
                Work::Zero { offset, .. } => offset >> 20,
            })
            .collect();
        assert_eq!(first, [0, 4, 8, 12]);
        // The 48 MiB hole after the data is one zero item, not 48.
        let zeros: Vec<&Work> = got
            .iter()
            .filter(|w| matches!(w, Work::Zero { .. }))
            .collect();
        assert_eq!(
            zeros,
            [&Work::Zero {
                offset: 16 << 20,
                len: 48 << 20
            }]
        );
    }

    #[test]
    fn spans_stay_within_themselves_in_lanes() {
        let size = 32 << 20;
        let chunk = 1 << 20;
        let spans = [(2 << 20, 3 << 20), (20 << 20, 4 << 20)];
        let mut l = list(&[(0, size)], size);
        let (planned, got) = lanes_of(&mut l, &spans, size, chunk, 3);
        assert_eq!(planned, 7 << 20);
        let mut offsets: Vec<u64> = got
            .iter()
            .map(|w| match w {
                Work::Copy { offset, .. } => offset >> 20,
                Work::Zero { .. } => panic!("{w:?}"),
            })
            .collect();
        offsets.sort();
        assert_eq!(offsets, [2, 3, 4, 20, 21, 22, 23]);
    }

    proptest! {
        /// Any map, any spans, any lane count: the same bytes are asked
        /// for as in ascending order, each once, and only inside the spans.
        #[test]
        fn lanes_cover_what_ascending_order_covers(
            raw in proptest::collection::vec((0u64..200, 1u64..40), 0..12),
            span_raw in proptest::collection::vec((0u64..60, 1u64..20), 1..5),
            size_k in 50u64..300,
            lanes in 1u32..12,
        ) {
            let chunk = 4096u32;
            let size = size_k * 4096 + 1000;
            let mut data: Vec<(u64, u64)> = Vec::new();
            let mut pos = 0;
            for (gap, len) in raw {
                let o = pos + gap * 1000;
                let e = (o + len * 1000).min(size);
                if o >= size { break; }
                data.push((o, e - o));
                pos = e + 1;
            }
            let windows: Vec<(u64, u64)> = span_raw
                .iter()
                .map(|&(s, l)| (s * 4096 * 5, l * 4096 * 3))
                .collect();
            let spans = super::super::windows::whole_windows(&windows, size, chunk);
            let mut want = Vec::new();
            let want_planned = plan_windows(&mut list(&data, size), &spans, size, chunk, &mut |w| {
                want.push(w);
                Ok(())
            })
            .unwrap();
            let (planned, got) = lanes_of(&mut list(&data, size), &spans, size, chunk, lanes);
            prop_assert_eq!(planned, want_planned);
            prop_assert_eq!(coverage(&got), coverage(&want));
            // Data windows are the same items, in some order.
            let copies = |v: &[Work]| {
                let mut c: Vec<Work> = v.iter().filter(|w| matches!(w, Work::Copy { .. })).cloned().collect();
                c.sort_by_key(|w| match w { Work::Copy { offset, .. } => *offset, Work::Zero { .. } => 0 });
                c
            };
            prop_assert_eq!(copies(&got), copies(&want));
        }
    }
}
