//! Unit and property tests of changed-areas lists.

use super::*;
use crate::plan::PassKind;
use proptest::prelude::*;
use serde_json::json;

const DISK: u64 = 1 << 30;

fn err(text: &str) -> String {
    parse(text, DISK).unwrap_err().to_string()
}

#[test]
fn one_page_parses_sorts_and_merges() {
    let text = r#"{"startOffset": 0, "length": 1073741824, "changeId": "52 de/17",
        "dynamicType": null,
        "changedArea": [{"start": 131072, "length": 65536},
                        {"start": 65536, "length": 65536},
                        {"start": 1048576, "length": 4096}]}"#;
    let l = parse(text, DISK).unwrap();
    assert_eq!(l.areas, vec![(65536, 131072), (1048576, 4096)]);
    assert_eq!(l.change_id.as_deref(), Some("52 de/17"));
    assert_eq!(l.changed_bytes(), 135168);
}

#[test]
fn pages_in_an_array_join() {
    let text = json!([
        {"startOffset": 1024, "length": 1024, "changedArea": [{"start": 1024, "length": 512}]},
        {"startOffset": 0, "length": 1024, "changedArea": [{"start": 512, "length": 512}]},
        {"startOffset": 2048, "length": 0, "changedArea": []},
    ])
    .to_string();
    let l = parse(&text, DISK).unwrap();
    assert_eq!(l.areas, vec![(512, 1024)]);
    assert_eq!(l.change_id, None);
}

#[test]
fn bad_lists_are_refused_with_the_entry_named() {
    let p =
        |areas: &str| format!(r#"{{"startOffset": 0, "length": 8192, "changedArea": [{areas}]}}"#);
    let cases = [
        ("{", "not valid JSON".to_string()),
        ("42", "top level".into()),
        ("[1]", "page 0: expected an object".into()),
        (
            r#"{"startOffset": 0, "changedArea": []}"#,
            "page 0: missing field length".into(),
        ),
        (
            r#"{"startOffset": 0, "length": 1}"#,
            "missing field changedArea".into(),
        ),
        (
            r#"{"startOffset": 0, "length": 1, "changedArea": {}}"#,
            "page 0, changedArea: expected an array".into(),
        ),
        (
            r#"{"startOffset": "0", "length": 1, "changedArea": []}"#,
            "page 0.startOffset: expected a non-negative integer".into(),
        ),
        (
            &p(r#"{"start": 0, "length": -1}"#),
            "changedArea[0].length: expected a non-negative integer".into(),
        ),
        (
            &p(r#"{"start": 0.5, "length": 1}"#),
            "changedArea[0].start".into(),
        ),
        (
            &p(r#"{"start": 0, "length": 1}, 7"#),
            "changedArea[1]: expected an object".into(),
        ),
        (
            &p(r#"{"start": 0, "length": 0}"#),
            "changedArea[0].length: is 0".into(),
        ),
        (
            &p(r#"{"start": 4096, "length": 8192}"#),
            "changedArea[0]: [4096, 12288) lies outside".into(),
        ),
        (
            &p(r#"{"start": 0, "length": 4096}, {"start": 4095, "length": 2}"#),
            "page 0, changedArea[1]: areas overlap: [4095, 4097) overlaps page 0, changedArea[0]"
                .into(),
        ),
        (
            &p(r#"{"start": 18446744073709551615, "length": 2}"#),
            "overflows".into(),
        ),
        (
            r#"{"startOffset": 1073741823, "length": 2, "changedArea": []}"#,
            "past the disk".into(),
        ),
        (
            r#"[{"startOffset": 0, "length": 10, "changedArea": []}, {"startOffset": 5, "length": 10, "changedArea": []}]"#,
            "page 1: pages overlap".into(),
        ),
        (
            r#"[{"startOffset": 0, "length": 1, "changeId": "a", "changedArea": []}, {"startOffset": 1, "length": 1, "changeId": "b", "changedArea": []}]"#,
            "page 1, changeId: \"b\" differs".into(),
        ),
        (
            r#"{"startOffset": 0, "length": 1, "changeId": 5, "changedArea": []}"#,
            "page 0, changeId: expected a string".into(),
        ),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.contains(&want), "{text}: {e:?} should contain {want:?}");
    }
}

#[test]
fn size_and_count_are_bounded() {
    let big = " ".repeat(MAX_TEXT_BYTES + 1);
    assert!(matches!(
        parse(&big, DISK),
        Err(ChangedAreasError::TooLarge { .. })
    ));
    let areas = |n: usize| {
        let list: Vec<_> = (0..n).map(|i| (2 * i as u64, 1)).collect();
        page_json(0, DISK, &list).to_string()
    };
    assert_eq!(
        parse_within(&areas(101), DISK, 1 << 20, 100),
        Err(ChangedAreasError::TooManyAreas { max: 100 })
    );
    assert_eq!(
        parse_within(&areas(100), DISK, 1 << 20, 100)
            .unwrap()
            .areas
            .len(),
        100
    );
    let pages = json!([
        page_json(0, 1000, &[(0, 1), (2, 1)]),
        page_json(1000, 1000, &[(1000, 1)])
    ]);
    assert!(
        parse_within(&pages.to_string(), DISK, 1 << 20, 2).is_err(),
        "the bound counts every page"
    );
    let text = areas(10);
    assert!(matches!(
        parse_within(&text, DISK, text.len() - 1, 100),
        Err(ChangedAreasError::TooLarge { .. })
    ));
}

#[test]
fn texts_the_walk_cannot_name_get_serdes_position() {
    // A duplicate key: the walk keeps the last, serde refuses it.
    let e = err(r#"{"startOffset": 0, "startOffset": 1, "length": 1, "changedArea": []}"#);
    assert!(e.contains("duplicate field") && e.contains("column"), "{e}");
    // Past MAX_DETAILED_ERROR_BYTES the text is not walked again.
    let mut text = String::from(r#"{"startOffset": 0, "length": 1, "changedArea": ["#);
    text.push_str(&" ".repeat(MAX_DETAILED_ERROR_BYTES));
    text.push_str(r#"{"start": -1, "length": 1}]}"#);
    let e = err(&text);
    assert!(e.contains("not valid JSON") && e.contains("column"), "{e}");
}

#[test]
fn plan_crosses_changes_with_allocation() {
    let l = parse(
        r#"{"startOffset": 0, "length": 100, "changeId": "x",
            "changedArea": [{"start": 10, "length": 30}, {"start": 60, "length": 10}]}"#,
        100,
    )
    .unwrap();
    let plan = l.plan(&[(0, 20), (30, 35)]).unwrap();
    assert_eq!(plan.bytes(PassKind::Copy), 25);
    assert_eq!(plan.bytes(PassKind::Zero), 15);
    assert_eq!(plan.bytes(PassKind::Unchanged), 60);
    assert!(
        l.plan(&[(0, 101)]).is_err(),
        "data past the disk is refused"
    );
}

/// Disjoint areas (cut points) in a disk of `size`, as (start, len).
fn areas_from(mut cuts: Vec<u64>, size: u64) -> Vec<(u64, u64)> {
    cuts.iter_mut().for_each(|c| *c %= size + 1);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.chunks_exact(2).map(|p| (p[0], p[1] - p[0])).collect()
}

fn page_json(start: u64, len: u64, areas: &[(u64, u64)]) -> Value {
    let areas: Vec<Value> = areas
        .iter()
        .map(|&(s, l)| json!({"start": s, "length": l}))
        .collect();
    json!({"startOffset": start, "length": len, "changedArea": areas, "changeId": "cid"})
}

proptest! {
    /// Valid lists, split into pages and shuffled, parse back to the
    /// merged areas; the plan partitions the disk.
    #[test]
    fn valid_lists_round_trip(
        size in 1u64..1_000_000,
        cuts in proptest::collection::vec(any::<u64>(), 0..40),
        split in any::<u64>(),
        rotate in any::<usize>(),
        data_cuts in proptest::collection::vec(any::<u64>(), 0..40),
    ) {
        let mut areas = areas_from(cuts, size);
        let split = split % (size + 1);
        let (lo, hi): (Vec<_>, Vec<_>) = areas.iter().partition(|&&(s, l)| s + l <= split);
        let hi: Vec<_> = hi.into_iter().filter(|&(s, _)| s >= split).collect();
        areas = lo.iter().chain(hi.iter()).copied().collect();
        let mut shuffled = hi.clone();
        if !shuffled.is_empty() {
            let n = rotate % shuffled.len();
            shuffled.rotate_left(n);
        }
        let text = json!([page_json(split, size - split, &shuffled), page_json(0, split, &lo)]).to_string();
        let l = parse(&text, size).unwrap();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for &(s, len) in &areas {
            match merged.last_mut() {
                Some((o, ml)) if *o + *ml == s => *ml += len,
                _ => merged.push((s, len)),
            }
        }
        prop_assert_eq!(&l.areas, &merged);
        prop_assert_eq!(l.change_id.as_deref(), Some("cid"));
        let plan = l.plan(&areas_from(data_cuts, size)).unwrap();
        prop_assert_eq!(plan.extents().iter().map(|e| e.len).sum::<u64>(), size);
        prop_assert_eq!(plan.bytes(PassKind::Copy) + plan.bytes(PassKind::Zero), l.changed_bytes());
    }

    /// Random byte mutations of a valid list never panic; what is accepted
    /// is sorted, disjoint and inside the disk.
    #[test]
    fn mutations_never_panic(
        cuts in proptest::collection::vec(0u64..5000, 0..12),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let size = 5000;
        let text = page_json(0, size, &areas_from(cuts, size)).to_string();
        let mut bytes = text.into_bytes();
        for (at, b) in edits {
            let i = at % bytes.len();
            bytes[i] = b;
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(l) = parse(&text, size) {
            let mut pos = 0;
            for &(s, len) in &l.areas {
                prop_assert!(s >= pos && len > 0 && s + len <= size);
                pos = s + len + 1;
            }
        }
    }
}
