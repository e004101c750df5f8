//! Codec tests: round trips, every byte flip and every truncation detected,
//! hostile fields refused, arbitrary bytes never panic, the range cap.

use proptest::prelude::*;

use super::*;
use crate::wire::PassMode;

pub(super) fn sample() -> Journal {
    let mut j = Journal::new(
        "vm1/disk0",
        "/dev/vg0/vm1-disk0",
        "size=1048576;gen=42",
        1 << 20,
        2 << 20,
        *b"0123456789abcdef",
        1_700_000_000,
    );
    j.durable.insert(0, 4096);
    j.durable.insert(65536, 8192);
    j.durable.insert(1_000_000, 48_576);
    j
}

pub(super) fn complete_sample() -> Journal {
    let mut j = sample();
    j.durable.insert(0, j.size_bytes);
    j.complete = true;
    j
}

/// A journal with an incremental pass in progress on top of sync `[5; 16]`.
pub(super) fn incremental_sample() -> Journal {
    let mut j = sample();
    j.pass_mode = PassMode::Incremental;
    j.last_sync_id = Some([5; 16]);
    j.base_sync_id = Some([5; 16]);
    j.plan_digest = [9; 32];
    j.change_id = "CHG-7".into();
    j.target_stamp = Some(TargetStamp {
        inode: 77,
        mtime_ns: -3,
        size_bytes: 1 << 20,
    });
    j.planned.insert(0, 8192);
    j.planned.insert(500_000, 4096);
    j
}

/// A complete journal of an incremental pass: its sync recorded.
pub(super) fn complete_incremental_sample() -> Journal {
    let mut j = complete_sample();
    j.pass_mode = PassMode::Incremental;
    j.last_sync_id = Some([6; 16]);
    j.change_id = "CHG-8".into();
    j.target_stamp = Some(TargetStamp {
        inode: 77,
        mtime_ns: 1_700_000_000_123_456_789,
        size_bytes: 1 << 20,
    });
    j
}

/// Re-seals `body` (everything but the checksum) so a test reaches the
/// checks behind the checksum (with the checksum of the version it names).
pub(super) fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let body_len = bytes.len() - 32;
    let context = if bytes[8] == 1 {
        "diskferry journal v1 checksum"
    } else {
        "diskferry journal v2 checksum"
    };
    let mut hasher = blake3::Hasher::new_derive_key(context);
    hasher.update(&bytes[..body_len]);
    bytes.truncate(body_len);
    bytes.extend_from_slice(hasher.finalize().as_bytes());
    bytes
}

#[test]
fn round_trips() {
    for j in [
        sample(),
        complete_sample(),
        incremental_sample(),
        complete_incremental_sample(),
    ] {
        assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
    }
    let empty = Journal::new("", "", "", 0, 0, [0; 16], 0);
    assert_eq!(Journal::decode(&empty.encode()).unwrap(), empty);
}

#[test]
fn every_byte_flip_is_detected() {
    for j in [sample(), complete_sample(), incremental_sample()] {
        let good = j.encode();
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    Journal::decode(&bad).is_err(),
                    "flip of byte {i} bit {bit} accepted"
                );
            }
        }
    }
}

#[test]
fn every_truncation_and_extension_is_detected() {
    let good = sample().encode();
    for len in 0..good.len() {
        let err = Journal::decode(&good[..len]).unwrap_err();
        assert!(err.is_damaged(), "{err}");
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(Journal::decode(&longer).is_err());
}

#[test]
fn errors_are_distinct_and_say_what_to_do() {
    let good = sample().encode();
    let msg = |bytes: &[u8]| Journal::decode(bytes).unwrap_err().to_string();

    assert!(matches!(
        Journal::decode(&good[..10]),
        Err(JournalError::TooShort { .. })
    ));
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(Journal::decode(&bad), Err(JournalError::BadMagic)));
    let mut bad = good.clone();
    bad[8] = 3;
    assert!(matches!(
        Journal::decode(&bad),
        Err(JournalError::UnsupportedVersion { found: 3 })
    ));
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        Journal::decode(&bad),
        Err(JournalError::ChecksumMismatch)
    ));
    assert_eq!(
        msg(&bad),
        "journal is damaged (checksum mismatch); rerun with --restart to start a clean full copy"
    );

    // Behind a valid checksum (a forged file): flags, strings, ranges.
    let mut bad = good.clone();
    bad[12] = 0x80;
    assert!(matches!(
        Journal::decode(&reseal(bad)),
        Err(JournalError::UnknownFlags { flags: 0x80 })
    ));
    let mut bad = good.clone();
    bad[12] = 1; // complete, but only part is durable
    assert!(matches!(
        Journal::decode(&reseal(bad)),
        Err(JournalError::CompleteButNotCovered { .. })
    ));
    let mut bad = good.clone();
    bad.extend_from_slice(&[0; 32]); // room for the new checksum
    assert!(matches!(
        Journal::decode(&reseal(bad)),
        Err(JournalError::TrailingBytes { extra_bytes: 32 })
    ));
    for e in [
        JournalError::BadMagic,
        JournalError::Truncated { field: "ranges" },
    ] {
        assert!(e.to_string().contains("--restart") && e.is_damaged(), "{e}");
    }
}

/// Builds a version 1 journal's bytes field by field (to forge bad ones;
/// the range checks are the same in both versions).
fn forge(strings: [&[u8]; 3], size_bytes: u64, ranges: &[(u64, u64)], count: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&size_bytes.to_le_bytes());
    out.extend_from_slice(&4096u32.to_le_bytes());
    out.extend_from_slice(&[7; 16]);
    out.extend_from_slice(&9u64.to_le_bytes());
    for s in strings {
        out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_le_bytes());
        out.extend_from_slice(s);
    }
    out.extend_from_slice(&count.to_le_bytes());
    for &(o, l) in ranges {
        out.extend_from_slice(&o.to_le_bytes());
        out.extend_from_slice(&l.to_le_bytes());
    }
    out.extend_from_slice(&[0; 32]);
    reseal(out)
}

type ErrorCheck = fn(&JournalError) -> bool;

#[test]
fn forged_fields_are_refused() {
    let ok = forge([b"t", b"p", b"s"], 100, &[(0, 10), (20, 10)], 2);
    let v1 = Journal::decode(&ok).unwrap();
    assert_eq!(v1.durable.covered_bytes(), 20);
    assert_eq!((v1.version, v1.last_sync_id), (1, None));

    let long = vec![b'a'; MAX_STRING_BYTES + 1];
    let max = vec![b'a'; MAX_STRING_BYTES];
    assert!(Journal::decode(&forge([&max, b"", b""], 0, &[], 0)).is_ok());
    let cases: Vec<(Vec<u8>, ErrorCheck)> = vec![
        (forge([b"t", &long, b"s"], 100, &[], 0), |e| {
            matches!(
                e,
                JournalError::StringTooLong {
                    field: "target_path_hint",
                    ..
                }
            )
        }),
        (forge([b"t", b"p", b"\xff"], 100, &[], 0), |e| {
            matches!(
                e,
                JournalError::StringNotUtf8 {
                    field: "source_identity"
                }
            )
        }),
        // A count far beyond what the file holds: refused before allocating.
        (forge([b"t", b"p", b"s"], 100, &[], u32::MAX), |e| {
            matches!(e, JournalError::TooManyRanges { .. })
        }),
        (forge([b"t", b"p", b"s"], 100, &[(0, 10)], 2), |e| {
            matches!(e, JournalError::TooManyRanges { .. })
        }),
        (forge([b"t", b"p", b"s"], 100, &[(95, 10)], 1), |e| {
            matches!(e, JournalError::RangeOutOfBounds { index: 0, .. })
        }),
        (forge([b"t", b"p", b"s"], 100, &[(5, 0)], 1), |e| {
            matches!(e, JournalError::RangeOutOfBounds { .. })
        }),
        (
            forge([b"t", b"p", b"s"], u64::MAX, &[(u64::MAX - 1, 5)], 1),
            |e| matches!(e, JournalError::RangeOutOfBounds { .. }),
        ),
        (
            forge([b"t", b"p", b"s"], 100, &[(20, 10), (0, 10)], 2),
            |e| matches!(e, JournalError::RangesNotCanonical { index: 1, .. }),
        ),
        (
            forge([b"t", b"p", b"s"], 100, &[(0, 10), (5, 10)], 2),
            |e| matches!(e, JournalError::RangesNotCanonical { index: 1, .. }),
        ),
        (
            forge([b"t", b"p", b"s"], 100, &[(0, 10), (10, 10)], 2),
            |e| matches!(e, JournalError::RangesNotCanonical { index: 1, .. }),
        ),
    ];
    for (i, (bytes, check)) in cases.iter().enumerate() {
        let err = Journal::decode(bytes).unwrap_err();
        assert!(check(&err), "case {i}: {err}");
        assert!(err.to_string().contains("--restart"), "case {i}: {err}");
    }
}

#[test]
fn cap_keeps_the_largest_and_claims_nothing_extra() {
    let mut j = sample();
    j.size_bytes = 1 << 40;
    j.durable = RangeSet::new();
    // 1000 ranges, lengths 1..=1000, 10_000 bytes apart.
    for i in 1..=1000u64 {
        j.durable.insert(i * 10_000, i);
    }
    let decoded = Journal::decode(&j.encode_capped(100)).unwrap();
    assert_eq!(decoded.durable.len(), 100);
    for (offset, len) in decoded.durable.iter() {
        assert!(len > 900, "kept a small range {offset}+{len}");
        assert!(j.durable.contains(offset, len));
        assert_eq!(offset, len * 10_000);
    }
    assert_eq!(decoded.durable.covered_bytes(), (901..=1000).sum::<u64>());
    // Uncapped: everything.
    assert_eq!(Journal::decode(&j.encode()).unwrap(), j);
}

/// Raw pass fields: mode byte, last sync id, (inode, mtime) of a stamp,
/// change id, planned ranges.
type PassFields = (u8, [u8; 16], Option<(u64, i64)>, String, Vec<(u64, u64)>);

/// The v2 pass fields of `j`, consistent with each other: a sync, a
/// stamp and a change id, or an incremental pass in progress on top of the
/// sync with planned ranges.
fn with_pass_fields(
    mut j: Journal,
    (mode, last, stamp, change_id, raw_planned): PassFields,
) -> Journal {
    j.pass_mode = PassMode::from_u8(mode % 3).unwrap();
    j.last_sync_id = (last != [0; 16]).then_some(last);
    j.target_stamp = stamp.map(|(inode, mtime_ns)| TargetStamp {
        inode,
        mtime_ns,
        size_bytes: j.size_bytes,
    });
    j.change_id = change_id;
    if j.pass_mode == PassMode::Incremental && !j.complete && j.last_sync_id.is_some() {
        j.base_sync_id = j.last_sync_id;
        j.plan_digest = [mode; 32];
        let size = j.size_bytes;
        for (o, l) in raw_planned {
            let o = o % size;
            j.planned.insert(o, l % (size - o) + 1);
        }
    } else if j.pass_mode == PassMode::Incremental && !j.complete {
        j.pass_mode = PassMode::Full;
    }
    j
}

fn arb_pass_fields() -> impl Strategy<Value = PassFields> {
    (
        any::<u8>(),
        prop_oneof![Just([0u8; 16]), any::<[u8; 16]>()],
        proptest::option::of((any::<u64>(), any::<i64>())),
        ".{0,20}",
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..20),
    )
}

fn arb_journal() -> impl Strategy<Value = Journal> {
    (arb_v1_journal(), arb_pass_fields()).prop_map(|(j, pass)| with_pass_fields(j, pass))
}

fn arb_v1_journal() -> impl Strategy<Value = Journal> {
    (
        (any::<String>(), ".{0,64}", any::<String>()),
        1u64..u64::MAX,
        any::<u32>(),
        any::<[u8; 16]>(),
        any::<u64>(),
        proptest::collection::vec((any::<u64>(), any::<u64>()), 0..50),
        any::<bool>(),
    )
        .prop_map(
            |((name, hint, identity), size, chunk, id, t, raw, complete)| {
                let mut j = Journal::new(&name, &hint, &identity, size, chunk, id, t);
                for (o, l) in raw {
                    let o = o % size;
                    j.durable.insert(o, l % (size - o) + 1);
                }
                if complete {
                    j.durable.insert(0, size);
                    j.complete = true;
                }
                j
            },
        )
}

proptest! {
    #[test]
    fn arbitrary_journals_round_trip(j in arb_journal()) {
        let bytes = j.encode();
        prop_assert_eq!(Journal::decode(&bytes).unwrap(), j);
    }

    #[test]
    fn capped_encoding_is_a_subset(j in arb_journal(), cap in 1usize..20) {
        let decoded = Journal::decode(&j.encode_capped(cap)).unwrap();
        prop_assert!(decoded.durable.len() <= cap);
        for (o, l) in decoded.durable.iter() {
            prop_assert!(j.durable.contains(o, l));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Journal::decode(&bytes);
    }

    #[test]
    fn mutated_journals_never_panic_nor_lie(
        j in arb_journal(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let good = j.encode();
        let mut bad = good.clone();
        for (i, b) in edits {
            let i = i % bad.len();
            bad[i] = b;
        }
        if let Ok(decoded) = Journal::decode(&bad) {
            // Only the unchanged encoding may decode, and to the same journal.
            prop_assert_eq!(&bad, &good);
            prop_assert_eq!(decoded, j);
        }
    }
}

/// The committed fuzz seeds: the `valid-*` ones must decode, the others not.
#[test]
fn fuzz_corpus_is_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/journal_decode");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let result = Journal::decode(&std::fs::read(&path).unwrap());
        assert_eq!(
            result.is_ok(),
            name.starts_with("valid-"),
            "{name}: {result:?}"
        );
        seen += 1;
    }
    assert!(seen >= 4, "seed corpus missing in {}", dir.display());
}

/// Rewrites the seed corpus: `cargo test --lib journal::codec_tests::write_fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes fuzz/corpus/journal_decode"]
fn write_fuzz_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/journal_decode");
    std::fs::create_dir_all(&dir).unwrap();
    let empty = Journal::new(
        "disk",
        "/var/lib/images/disk.raw",
        "size=0",
        0,
        65536,
        [0; 16],
        0,
    );
    let mut truncated = sample().encode();
    truncated.truncate(truncated.len() / 2);
    let mut flipped = sample().encode();
    flipped[60] ^= 4;
    // The valid-v1-* seeds were written by version 1 and are kept as they are.
    let seeds: [(&str, Vec<u8>); 8] = [
        ("valid-empty", empty.encode()),
        ("valid-partial", sample().encode()),
        ("valid-complete", complete_sample().encode()),
        ("valid-incremental", incremental_sample().encode()),
        (
            "valid-complete-incremental",
            complete_incremental_sample().encode(),
        ),
        (
            "valid-forged-ranges",
            forge([b"t", b"p", b"s"], 100, &[(0, 10), (20, 10)], 2),
        ),
        ("damaged-truncated", truncated),
        ("damaged-flipped", flipped),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
