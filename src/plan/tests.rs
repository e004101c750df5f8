//! Unit and property tests of [`PassPlan`].

use super::*;
use proptest::prelude::*;

fn ext(offset: u64, len: u64, kind: PassKind) -> PassExtent {
    PassExtent { offset, len, kind }
}

#[test]
fn new_merges_adjacent_extents_of_one_kind() {
    let p = PassPlan::new(
        vec![
            ext(0, 10, PassKind::Copy),
            ext(10, 5, PassKind::Copy),
            ext(15, 5, PassKind::Zero),
        ],
        20,
    )
    .unwrap();
    assert_eq!(
        p.extents(),
        &[ext(0, 15, PassKind::Copy), ext(15, 5, PassKind::Zero)]
    );
    assert_eq!(p.bytes(PassKind::Copy), 15);
    assert_eq!(p.bytes(PassKind::Unchanged), 0);
}

#[test]
fn new_refuses_gaps_overlaps_empties_and_wrong_ends() {
    let u = PassKind::Unchanged;
    let cases = [
        (vec![ext(0, 10, u), ext(11, 9, u)], "expected 10"),
        (vec![ext(0, 10, u), ext(9, 11, u)], "expected 10"),
        (vec![ext(0, 10, u), ext(10, 0, u), ext(10, 10, u)], "empty"),
        (vec![ext(0, 10, u)], "covers [0, 10)"),
        (vec![ext(0, 30, u)], "covers [0, 30)"),
        (vec![ext(0, u64::MAX, u), ext(u64::MAX, 2, u)], "disk"),
        (vec![ext(5, 15, u)], "expected 0"),
    ];
    for (extents, want) in cases {
        let e = PassPlan::new(extents.clone(), 20).unwrap_err();
        assert!(e.to_string().contains(want), "{extents:?}: {e}");
    }
    assert_eq!(PassPlan::new(vec![], 0).unwrap().extents(), &[]);
}

#[test]
fn from_changed_intersects_with_data() {
    // changed [10,40) [60,70); data [0,20) [30,65)
    let p = PassPlan::from_changed(&[(10, 30), (60, 10)], &[(0, 20), (30, 35)], 100).unwrap();
    assert_eq!(
        p.extents(),
        &[
            ext(0, 10, PassKind::Unchanged),
            ext(10, 10, PassKind::Copy),
            ext(20, 10, PassKind::Zero),
            ext(30, 10, PassKind::Copy),
            ext(40, 20, PassKind::Unchanged),
            ext(60, 5, PassKind::Copy),
            ext(65, 5, PassKind::Zero),
            ext(70, 30, PassKind::Unchanged),
        ]
    );
}

#[test]
fn from_changed_refuses_bad_lists() {
    for (changed, data, want) in [
        (vec![(10u64, 10u64), (5, 2)], vec![], "changed range #1"),
        (vec![(10, 10), (15, 2)], vec![], "changed range #1"),
        (vec![(10, 0)], vec![], "changed range #0"),
        (vec![(90, 11)], vec![], "changed range #0"),
        (vec![], vec![(u64::MAX, 2)], "data range #0"),
    ] {
        let e = PassPlan::from_changed(&changed, &data, 100).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
    }
}

/// Sorted, disjoint, non-empty ranges inside `[0, size)` from cut points.
fn ranges_from(mut cuts: Vec<u64>, size: u64) -> Vec<(u64, u64)> {
    cuts.iter_mut().for_each(|c| *c %= size + 1);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.chunks_exact(2).map(|p| (p[0], p[1] - p[0])).collect()
}

proptest! {
    /// The plan partitions the disk exactly and every byte has the kind
    /// the definition gives it.
    #[test]
    fn from_changed_partitions_and_matches_bytewise(
        size in 0u64..300,
        changed in proptest::collection::vec(any::<u64>(), 0..20),
        data in proptest::collection::vec(any::<u64>(), 0..20),
    ) {
        let changed = ranges_from(changed, size);
        let data = ranges_from(data, size);
        let p = PassPlan::from_changed(&changed, &data, size).unwrap();
        // Re-checking through new() proves the partition.
        prop_assert_eq!(&PassPlan::new(p.extents().to_vec(), size).unwrap(), &p);
        let within = |r: &[(u64, u64)], b: u64| r.iter().any(|&(o, l)| o <= b && b < o + l);
        for e in p.extents() {
            for b in e.offset..e.end() {
                let want = match (within(&changed, b), within(&data, b)) {
                    (false, _) => PassKind::Unchanged,
                    (true, true) => PassKind::Copy,
                    (true, false) => PassKind::Zero,
                };
                prop_assert_eq!(e.kind, want, "byte {}", b);
            }
        }
        for w in p.extents().windows(2) {
            prop_assert_ne!(w[0].kind, w[1].kind, "adjacent extents of one kind are merged");
        }
    }
}
