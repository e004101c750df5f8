//! [`RangeSet`]: a merged set of byte ranges, for "written since the last
//! ACK" per stream and "durable" per job (what the journal will persist).

use std::collections::BTreeMap;

use crate::wire::ByteRange;

/// Disjoint, non-adjacent ranges kept merged: inserting a range that
/// touches or overlaps others joins them. Memory: one map entry per
/// separate range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RangeSet {
    /// start → end (exclusive).
    ends_by_start: BTreeMap<u64, u64>,
    total_bytes: u64,
}

impl RangeSet {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds `[offset, offset + len_bytes)`; empty or overflowing ranges are
    /// ignored (callers checked them against the image size).
    pub(crate) fn insert(&mut self, offset: u64, len_bytes: u64) {
        let Some(mut end) = offset.checked_add(len_bytes) else {
            return;
        };
        if len_bytes == 0 {
            return;
        }
        let mut start = offset;
        // A range starting before `start` that reaches it joins.
        if let Some((&prev_start, &prev_end)) = self.ends_by_start.range(..=start).next_back()
            && prev_end >= start
        {
            start = prev_start;
            end = end.max(prev_end);
            self.remove(prev_start, prev_end);
        }
        // Every range starting within [start, end] joins; each iteration
        // removes one entry, so the loop is bounded by the set's size.
        while let Some((&next_start, &next_end)) = self.ends_by_start.range(start..=end).next() {
            end = end.max(next_end);
            self.remove(next_start, next_end);
        }
        self.ends_by_start.insert(start, end);
        self.total_bytes += end - start;
    }

    fn remove(&mut self, start: u64, end: u64) {
        self.ends_by_start.remove(&start);
        self.total_bytes -= end - start;
    }

    /// Bytes covered.
    #[cfg(test)]
    pub(crate) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Number of separate ranges.
    pub(crate) fn len(&self) -> usize {
        self.ends_by_start.len()
    }

    /// Removes and returns up to `max` ranges from the start, in order.
    pub(crate) fn take_first(&mut self, max: usize) -> Vec<ByteRange> {
        let mut out = Vec::with_capacity(max.min(self.len()));
        while out.len() < max {
            let Some((start, end)) = self.ends_by_start.pop_first() else {
                break;
            };
            self.total_bytes -= end - start;
            out.push(ByteRange {
                offset: start,
                len_bytes: end - start,
            });
        }
        out
    }

    /// The ranges in order (for tests and the future journal).
    pub(crate) fn ranges(&self) -> impl Iterator<Item = ByteRange> + '_ {
        self.ends_by_start.iter().map(|(&s, &e)| ByteRange {
            offset: s,
            len_bytes: e - s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(set: &RangeSet) -> Vec<(u64, u64)> {
        set.ranges().map(|r| (r.offset, r.len_bytes)).collect()
    }

    #[test]
    fn merges_adjacent_and_overlapping() {
        let mut set = RangeSet::new();
        set.insert(10, 10);
        set.insert(30, 10);
        assert_eq!(pairs(&set), vec![(10, 10), (30, 10)]);
        set.insert(20, 10); // touches both
        assert_eq!(pairs(&set), vec![(10, 30)]);
        set.insert(0, 100); // swallows everything
        assert_eq!(pairs(&set), vec![(0, 100)]);
        assert_eq!(set.total_bytes(), 100);
        set.insert(50, 10); // inside
        assert_eq!(set.total_bytes(), 100);
        set.insert(200, 0); // empty: ignored
        set.insert(u64::MAX, 2); // overflow: ignored
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn take_first_leaves_the_rest() {
        let mut set = RangeSet::new();
        for i in 0..5u64 {
            set.insert(i * 100, 10);
        }
        let first = set.take_first(3);
        assert_eq!(first.len(), 3);
        assert_eq!(first[2].offset, 200);
        assert_eq!(pairs(&set), vec![(300, 10), (400, 10)]);
        assert_eq!(set.total_bytes(), 20);
        assert!(set.take_first(10).len() == 2 && set.len() == 0);
    }
}
