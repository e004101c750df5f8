//! Journal version 2: the pass fields, their agreement, and version 1
//! journals read by this build.

use super::codec_tests::{complete_sample, incremental_sample, reseal, sample};
use super::*;
use crate::wire::PassMode;

/// Offsets of the v2 fixed fields.
const FLAGS_AT: usize = 12;
const MODE_AT: usize = 52;
const LAST_SYNC_AT: usize = 56;
const BASE_AT: usize = 72;
const PLAN_DIGEST_AT: usize = 88;
const STAMP_AT: usize = 120;

fn pass_error(bytes: &[u8]) -> &'static str {
    match Journal::decode(bytes) {
        Err(JournalError::BadPassFields { why }) => why,
        other => panic!("expected BadPassFields, got {other:?}"),
    }
}

#[test]
fn pass_fields_sit_where_the_layout_says() {
    let j = incremental_sample();
    let bytes = j.encode();
    assert_eq!(bytes[8..12], 2u32.to_le_bytes());
    assert_eq!(bytes[FLAGS_AT], 0b10, "stamp, not complete");
    assert_eq!(bytes[MODE_AT], 1);
    assert_eq!(bytes[LAST_SYNC_AT..LAST_SYNC_AT + 16], [5; 16]);
    assert_eq!(bytes[BASE_AT..BASE_AT + 16], [5; 16]);
    assert_eq!(bytes[PLAN_DIGEST_AT..PLAN_DIGEST_AT + 32], [9; 32]);
    assert_eq!(bytes[STAMP_AT..STAMP_AT + 8], 77u64.to_le_bytes());
    assert_eq!(bytes[STAMP_AT + 8..STAMP_AT + 16], (-3i64).to_le_bytes());
}

#[test]
fn disagreeing_pass_fields_are_refused_behind_a_valid_checksum() {
    let inc = incremental_sample().encode();
    let full = sample().encode();
    let edit = |good: &[u8], f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.to_vec();
        f(&mut b);
        reseal(b)
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (edit(&full, &|b| b[MODE_AT] = 3), "unknown pass mode"),
        (
            edit(&inc, &|b| b[BASE_AT..BASE_AT + 16].fill(0)),
            "an incremental pass in progress without a base",
        ),
        (
            edit(&inc, &|b| b[BASE_AT] = 6),
            "an incremental pass in progress on another base than the last sync",
        ),
        (
            edit(&inc, &|b| b[MODE_AT] = 0),
            "a base, plan digest or planned ranges without an incremental pass",
        ),
        (
            edit(&full, &|b| b[PLAN_DIGEST_AT] = 1),
            "a base, plan digest or planned ranges without an incremental pass",
        ),
        (
            edit(&full, &|b| b[STAMP_AT] = 1),
            "a target stamp without its flag",
        ),
    ];
    for (bytes, why) in cases {
        assert_eq!(pass_error(&bytes), why);
        let e = Journal::decode(&bytes).unwrap_err();
        assert!(e.is_damaged() && e.to_string().contains("--restart"), "{e}");
    }
}

#[test]
fn a_complete_pass_keeps_no_plan() {
    let mut j = complete_sample();
    j.pass_mode = PassMode::Incremental;
    j.last_sync_id = Some([1; 16]);
    j.base_sync_id = Some([1; 16]);
    assert_eq!(
        pass_error(&j.encode()),
        "a base, plan digest or planned ranges without an incremental pass"
    );
}

#[test]
fn planned_ranges_are_checked_like_durable_ones() {
    let mut j = incremental_sample();
    j.planned.insert(j.size_bytes - 10, 10);
    let good = j.encode();
    assert_eq!(Journal::decode(&good).unwrap(), j);
    // Push the last planned range past the source's end.
    let mut bad = good.clone();
    let len_at = bad.len() - 32 - 8;
    bad[len_at..len_at + 8].copy_from_slice(&11u64.to_le_bytes());
    let err = Journal::decode(&reseal(bad)).unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::RangeOutOfBounds {
                field: "planned ranges",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn planned_ranges_are_never_capped() {
    let mut j = incremental_sample();
    j.size_bytes = 1 << 40;
    for i in 0..500u64 {
        j.planned.insert(i * 10_000, 100);
    }
    let decoded = Journal::decode(&j.encode_capped(2)).unwrap();
    assert_eq!(decoded.durable.len(), 2, "durable ranges are capped");
    assert_eq!(decoded.planned, j.planned, "planned ranges are not");
}

#[test]
fn a_version_1_journal_decodes_without_a_sync_and_is_rewritten_as_version_2() {
    let v1 = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/journal_decode/valid-v1-complete"),
    )
    .expect("the committed v1 seed");
    let j = Journal::decode(&v1).unwrap();
    assert_eq!(j.version, 1);
    assert!(j.complete);
    assert_eq!(j.last_sync_id, None, "a v1 journal can be no base");
    assert_eq!(j.pass_mode, PassMode::Full);
    let again = Journal::decode(&j.encode()).unwrap();
    assert_eq!(again.version, JOURNAL_VERSION);
    assert_eq!(
        again,
        Journal {
            version: JOURNAL_VERSION,
            ..j
        }
    );
}
