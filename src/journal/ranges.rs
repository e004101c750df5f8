//! [`RangeSet`]: a merged set of byte ranges. The journal records the
//! durable ones in this form; the receiver also keeps each stream's ranges
//! written since its last ACK or flush in it, and the sender the ranges it
//! sent. Ranges are kept merged: sorted, disjoint and non-adjacent, which
//! is also the only form the journal codec accepts. Callers cap how many
//! ranges a set may hold ([`RangeSet::len`], [`RangeSet::retain_largest`]).

use std::cmp::Reverse;
use std::collections::BTreeMap;

/// Sorted, disjoint, non-adjacent byte ranges `[offset, offset + len)`.
/// Memory: one map entry per separate range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (exclusive).
    ends_by_start: BTreeMap<u64, u64>,
    covered_bytes: u64,
}

impl RangeSet {
    /// No range.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `[offset, offset + len_bytes)`, joining ranges it touches or
    /// overlaps. Empty and overflowing ranges are ignored. Returns the number
    /// of bytes that were not covered before.
    pub fn insert(&mut self, offset: u64, len_bytes: u64) -> u64 {
        let Some(mut end) = offset.checked_add(len_bytes) else {
            return 0;
        };
        if len_bytes == 0 {
            return 0;
        }
        let before_bytes = self.covered_bytes;
        let mut start = offset;
        if let Some((&prev_start, &prev_end)) = self.ends_by_start.range(..=start).next_back()
            && prev_end >= start
        {
            start = prev_start;
            end = end.max(prev_end);
            self.remove_entry(prev_start, prev_end);
        }
        // Each iteration removes one entry: bounded by the set's size.
        while let Some((&next_start, &next_end)) = self.ends_by_start.range(start..=end).next() {
            end = end.max(next_end);
            self.remove_entry(next_start, next_end);
        }
        self.ends_by_start.insert(start, end);
        self.covered_bytes += end - start;
        self.covered_bytes - before_bytes
    }

    fn remove_entry(&mut self, start: u64, end: u64) {
        self.ends_by_start.remove(&start);
        self.covered_bytes -= end - start;
    }

    /// True if every byte of `[offset, offset + len_bytes)` is covered
    /// (an empty range is covered; an overflowing one is not).
    pub fn contains(&self, offset: u64, len_bytes: u64) -> bool {
        let Some(end) = offset.checked_add(len_bytes) else {
            return false;
        };
        if len_bytes == 0 {
            return true;
        }
        match self.ends_by_start.range(..=offset).next_back() {
            Some((_, &range_end)) => range_end >= end,
            None => false,
        }
    }

    /// Bytes covered.
    pub fn covered_bytes(&self) -> u64 {
        self.covered_bytes
    }

    /// Number of separate ranges.
    pub fn len(&self) -> usize {
        self.ends_by_start.len()
    }

    /// Whether no byte is covered.
    pub fn is_empty(&self) -> bool {
        self.ends_by_start.is_empty()
    }

    /// The ranges as `(offset, len_bytes)`, in offset order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u64, u64)> + '_ {
        self.ends_by_start.iter().map(|(&s, &e)| (s, e - s))
    }

    /// The complement within `[0, size_bytes)` as `(offset, len_bytes)`, in
    /// order: what still has to be sent. Parts of the set beyond
    /// `size_bytes` are ignored.
    pub fn missing(&self, size_bytes: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cursor = 0u64;
        for (&start, &end) in &self.ends_by_start {
            if start >= size_bytes {
                break;
            }
            if start > cursor {
                out.push((cursor, start - cursor));
            }
            cursor = cursor.max(end);
        }
        if cursor < size_bytes {
            out.push((cursor, size_bytes - cursor));
        }
        out
    }

    /// Removes and returns up to `max_ranges` ranges from the start, in
    /// offset order, as `(offset, len_bytes)`.
    pub fn take_first(&mut self, max_ranges: usize) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(max_ranges.min(self.len()));
        while out.len() < max_ranges {
            let Some((start, end)) = self.ends_by_start.pop_first() else {
                break;
            };
            self.covered_bytes -= end - start;
            out.push((start, end - start));
        }
        out
    }

    /// The `max_ranges` longest ranges (ties: the lower offset wins), in
    /// offset order. Never more bytes than the set covers: ranges are
    /// dropped, never widened.
    pub fn largest(&self, max_ranges: usize) -> Vec<(u64, u64)> {
        let mut all: Vec<(u64, u64)> = self.iter().collect();
        if all.len() > max_ranges {
            let key = |&(offset, len): &(u64, u64)| (Reverse(len), offset);
            if max_ranges > 0 {
                all.select_nth_unstable_by_key(max_ranges - 1, key);
            }
            all.truncate(max_ranges);
            all.sort_unstable_by_key(|&(offset, _)| offset);
        }
        all
    }

    /// Keeps at most `max_ranges` ranges by dropping the smallest (they will
    /// simply be sent again on resume). Merging over the gaps instead would
    /// claim bytes that are not durable. Returns the bytes dropped.
    pub fn retain_largest(&mut self, max_ranges: usize) -> u64 {
        if self.len() <= max_ranges {
            return 0;
        }
        let before_bytes = self.covered_bytes;
        let kept = self.largest(max_ranges);
        *self = kept.into_iter().collect();
        before_bytes - self.covered_bytes
    }
}

impl FromIterator<(u64, u64)> for RangeSet {
    fn from_iter<I: IntoIterator<Item = (u64, u64)>>(iter: I) -> Self {
        let mut set = RangeSet::new();
        set.extend(iter);
        set
    }
}

impl Extend<(u64, u64)> for RangeSet {
    fn extend<I: IntoIterator<Item = (u64, u64)>>(&mut self, iter: I) {
        for (offset, len_bytes) in iter {
            self.insert(offset, len_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(set: &RangeSet) -> Vec<(u64, u64)> {
        set.iter().collect()
    }

    #[test]
    fn insert_merges_and_counts_new_bytes() {
        let mut set = RangeSet::new();
        assert_eq!(set.insert(10, 10), 10);
        assert_eq!(set.insert(30, 10), 10);
        assert_eq!(pairs(&set), vec![(10, 10), (30, 10)]);
        assert_eq!(set.insert(15, 20), 10); // bridges the gap [20, 30)
        assert_eq!(pairs(&set), vec![(10, 30)]);
        assert_eq!(set.insert(40, 5), 5); // adjacent: joins
        assert_eq!(pairs(&set), vec![(10, 35)]);
        assert_eq!(set.insert(12, 3), 0);
        assert_eq!(set.insert(7, 0), 0);
        assert_eq!(set.insert(u64::MAX, 2), 0);
        assert_eq!(set.covered_bytes(), 35);
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn contains_and_missing() {
        let set: RangeSet = [(10, 10), (30, 10)].into_iter().collect();
        assert!(set.contains(10, 10) && set.contains(12, 3) && set.contains(0, 0));
        assert!(!set.contains(5, 10) && !set.contains(15, 20) && !set.contains(25, 1));
        assert!(!set.contains(u64::MAX, 2));
        assert_eq!(set.missing(50), vec![(0, 10), (20, 10), (40, 10)]);
        assert_eq!(set.missing(35), vec![(0, 10), (20, 10)]);
        assert_eq!(set.missing(5), vec![(0, 5)]);
        assert_eq!(set.missing(0), vec![]);
        let full: RangeSet = [(0, 64)].into_iter().collect();
        assert_eq!(full.missing(64), vec![]);
    }

    #[test]
    fn retain_largest_drops_the_smallest_never_widens() {
        // Lengths 1..=10 at offsets 100 apart.
        let mut set: RangeSet = (1..=10u64).map(|i| (i * 100, i)).collect();
        let dropped = set.retain_largest(3);
        assert_eq!(dropped, (1..=7).sum::<u64>());
        assert_eq!(pairs(&set), vec![(800, 8), (900, 9), (1000, 10)]);
        assert_eq!(set.covered_bytes(), 27);
        assert_eq!(set.retain_largest(3), 0);
        assert_eq!(set.retain_largest(0), 27);
        assert!(set.is_empty());
    }

    #[test]
    fn take_first_leaves_the_rest() {
        let mut set: RangeSet = (0..5u64).map(|i| (i * 100, 10)).collect();
        let first = set.take_first(3);
        assert_eq!(first, vec![(0, 10), (100, 10), (200, 10)]);
        assert_eq!(pairs(&set), vec![(300, 10), (400, 10)]);
        assert_eq!(set.covered_bytes(), 20);
        assert_eq!(set.take_first(10).len(), 2);
        assert!(set.is_empty() && set.covered_bytes() == 0);
    }

    #[test]
    fn retain_largest_ties_keep_exactly_the_cap() {
        let mut set: RangeSet = (0..100u64).map(|i| (i * 10, 4)).collect();
        set.retain_largest(7);
        assert_eq!(set.len(), 7);
        assert_eq!(set.covered_bytes(), 28);
        assert_eq!(set.iter().next(), Some((0, 4)));
    }

    fn model_covers(model: &[(u64, u64)], byte: u64) -> bool {
        model.iter().any(|&(o, l)| byte >= o && byte < o + l)
    }

    proptest! {
        #[test]
        fn matches_a_byte_model(
            inserts in proptest::collection::vec((0u64..200, 0u64..30), 0..40),
            cap in 0usize..8,
        ) {
            let set: RangeSet = inserts.iter().copied().collect();
            // Canonical form: sorted, non-empty, non-adjacent.
            let ranges = pairs(&set);
            for w in ranges.windows(2) {
                prop_assert!(w[0].0 + w[0].1 < w[1].0);
            }
            prop_assert!(ranges.iter().all(|&(_, l)| l > 0));
            let mut covered = 0;
            for byte in 0..240u64 {
                let want = model_covers(&inserts, byte);
                prop_assert_eq!(set.contains(byte, 1), want);
                covered += u64::from(want);
                let in_missing = set.missing(240).iter().any(|&(o, l)| byte >= o && byte < o + l);
                prop_assert_eq!(in_missing, !want);
            }
            prop_assert_eq!(set.covered_bytes(), covered);
            // Capping keeps a subset: nothing claimed that was not inserted.
            let mut capped = set.clone();
            let dropped = capped.retain_largest(cap);
            prop_assert!(capped.len() <= cap);
            prop_assert_eq!(capped.covered_bytes() + dropped, set.covered_bytes());
            for (o, l) in capped.iter() {
                prop_assert!(set.contains(o, l));
                prop_assert!(ranges.contains(&(o, l)));
            }
            // Every dropped range is no longer than every kept one.
            let min_kept = capped.iter().map(|(_, l)| l).min().unwrap_or(u64::MAX);
            for &(o, l) in &ranges {
                if !capped.contains(o, l) {
                    prop_assert!(l <= min_kept);
                }
            }
        }
    }
}
