//! decide(): property tests of the range arithmetic behind widening.

use proptest::collection::vec;
use proptest::prelude::*;

use super::tests::{BASE, incremental, interrupted};
use super::*;

/// Up to 12 ranges in a 256-byte space.
fn arb_set() -> impl Strategy<Value = RangeSet> {
    vec((0u64..256, 1u64..40), 0..12).prop_map(|raw| {
        raw.into_iter()
            .map(|(o, l)| (o, l.min(256 - o).max(1)))
            .collect()
    })
}

fn bits(set: &RangeSet) -> Vec<bool> {
    let mut out = vec![false; 300];
    for (o, l) in set.iter() {
        let (start, end) = (usize::try_from(o).unwrap(), usize::try_from(o + l).unwrap());
        for b in &mut out[start..end] {
            *b = true;
        }
    }
    out
}

proptest! {
    #[test]
    fn subtract_matches_a_byte_model(a in arb_set(), b in arb_set()) {
        let want: Vec<bool> = bits(&a).iter().zip(bits(&b)).map(|(x, y)| *x && !y).collect();
        prop_assert_eq!(bits(&subtract(&a, &b)), want);
    }

    /// Widening: the union is planned, the replan is exactly what only
    /// the old plan named, and the new plan plus the replan cover it.
    #[test]
    fn widening_plans_the_union_and_replans_old_minus_new(old in arb_set(), new in arb_set()) {
        let to_list = |s: &RangeSet| s.iter().collect::<Vec<_>>();
        // Everything the old pass planned is durable.
        let mut j = interrupted(&to_list(&old), &to_list(&old));
        j.size_bytes = 1000;
        let r = ResumeRequest { size_bytes: 1000, ..incremental(BASE, &to_list(&new)) };
        let Decision::Incremental { planned, durable, replan } = decide(Some(&j), &r) else {
            panic!("same base: an incremental");
        };
        let union: Vec<bool> = bits(&old).iter().zip(bits(&new)).map(|(x, y)| *x || y).collect();
        prop_assert_eq!(bits(&planned), union.clone());
        prop_assert_eq!(bits(&replan), bits(&subtract(&old, &new)));
        let mut sent = new.clone();
        sent.extend(replan.iter());
        prop_assert_eq!(bits(&sent), union);
        if old == new {
            prop_assert_eq!(durable, old, "the same plan resumes");
        } else {
            prop_assert!(durable.is_empty(), "another plan counts nothing durable");
        }
    }
}
