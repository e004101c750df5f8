// Test data sizes are small: truncating casts cannot truncate here.
#![allow(clippy::cast_possible_truncation)]

use proptest::prelude::*;

use super::*;
use crate::pipeline::zero;

fn digest(bytes: &[u8]) -> [u8; 16] {
    crate::wire::block_digest(bytes)
}

/// The source's runs as the workers find them (4 KiB granules).
fn runs_of(bytes: &[u8]) -> Vec<SinkRun> {
    let mut runs = Vec::new();
    zero::runs(bytes, 4096, &mut runs);
    runs.iter()
        .map(|r| SinkRun {
            rel: r.offset as u32,
            len: r.len as u32,
            zero: r.zero,
            digest: [0; 32],
        })
        .collect()
}

fn target_digests(target: &[u8], block: u32) -> Vec<[u8; 16]> {
    target.chunks(block as usize).map(digest).collect()
}

fn plan_for(source: &[u8], target: &[u8], block: u32) -> DeltaPlan {
    let runs = runs_of(source);
    let src = SourceBytes::Read {
        bytes: source,
        runs: &runs,
    };
    plan_delta(src, block, &target_digests(target, block), digest).expect("plan")
}

/// `target` after the plan's pieces were applied.
fn apply(plan: &DeltaPlan, source: &[u8], target: &mut [u8]) {
    for p in &plan.pieces {
        let (rel, len) = p.range();
        let r = rel as usize..(rel + len) as usize;
        match p {
            Piece::Data { .. } => target[r.clone()].copy_from_slice(&source[r]),
            Piece::Zero { .. } => target[r].fill(0),
        }
    }
}

const K64: u32 = 64 << 10;

fn patterned(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn an_equal_window_sends_nothing() {
    let source = patterned(512 << 10, 3);
    let plan = plan_for(&source, &source.clone(), K64);
    assert_eq!(plan, DeltaPlan::default());
}

#[test]
fn one_changed_block_is_one_data_piece_of_that_block() {
    let source = patterned(512 << 10, 3);
    let mut target = source.clone();
    target[3 * 65536 + 17] ^= 0x40;
    let plan = plan_for(&source, &target, K64);
    assert_eq!(
        plan.pieces,
        vec![Piece::Data {
            rel: 3 * K64,
            len: K64
        }]
    );
    assert_eq!(plan.bytes_changed, u64::from(K64));
}

#[test]
fn adjacent_changed_blocks_merge_into_one_piece() {
    let source = patterned(512 << 10, 3);
    let mut target = source.clone();
    target[65536] ^= 1;
    target[2 * 65536 + 5] ^= 1;
    target[7 * 65536] ^= 1;
    let plan = plan_for(&source, &target, K64);
    assert_eq!(
        plan.pieces,
        vec![
            Piece::Data {
                rel: K64,
                len: 2 * K64
            },
            Piece::Data {
                rel: 7 * K64,
                len: K64
            }
        ]
    );
    assert_eq!(plan.bytes_changed, 3 * u64::from(K64));
}

#[test]
fn a_source_zero_run_over_target_data_is_zeroed_and_a_mixed_block_split_at_the_run() {
    let mut source = patterned(256 << 10, 9);
    // Block 1 is all zeros; block 2 is half zeros, half data.
    source[65536..2 * 65536 + 32768].fill(0);
    let mut target = patterned(256 << 10, 9);
    target[2 * 65536 + 40000] ^= 2;
    let plan = plan_for(&source, &target, K64);
    assert_eq!(
        plan.pieces,
        vec![
            Piece::Zero {
                rel: K64,
                len: K64 + 32768
            },
            Piece::Data {
                rel: 2 * K64 + 32768,
                len: 32768
            }
        ]
    );
    assert_eq!(plan.bytes_changed, 2 * u64::from(K64));
}

#[test]
fn a_source_hole_zeroes_only_the_target_blocks_that_hold_data() {
    let len = 1u32 << 20;
    let mut target = vec![0u8; len as usize];
    target[5 * 65536 + 100] = 7;
    let digests = target_digests(&target, K64);
    let plan = plan_delta(SourceBytes::Zeros { len_bytes: len }, K64, &digests, digest).unwrap();
    assert_eq!(
        plan.pieces,
        vec![Piece::Zero {
            rel: 5 * K64,
            len: K64
        }]
    );
    assert_eq!(plan.bytes_changed, u64::from(K64));
}

#[test]
fn a_short_last_block_is_compared_by_its_own_length() {
    let source = patterned(3 * 65536 + 1000, 1);
    let mut target = source.clone();
    let same = plan_for(&source, &target, K64);
    assert!(same.pieces.is_empty());
    *target.last_mut().unwrap() ^= 4;
    let plan = plan_for(&source, &target, K64);
    assert_eq!(
        plan.pieces,
        vec![Piece::Data {
            rel: 3 * K64,
            len: 1000
        }]
    );
    assert_eq!(plan.bytes_changed, 1000);
}

#[test]
fn a_reply_with_the_wrong_number_of_digests_is_refused() {
    let source = patterned(256 << 10, 1);
    let runs = runs_of(&source);
    let src = SourceBytes::Read {
        bytes: &source,
        runs: &runs,
    };
    let e = plan_delta(src, K64, &[[0; 16]; 3], digest).unwrap_err();
    assert!(
        matches!(
            e,
            DeltaError::DigestCount {
                got: 3,
                want: 4,
                ..
            }
        ),
        "{e}"
    );
    assert!(check_reply((4096, 1000, 4096), (4096, 4096), 1).is_ok());
    assert!(check_reply((4096, 1000, 4096), (0, 4096), 1).is_err());
    assert!(check_reply((4096, 1000, 4096), (4096, 8192), 1).is_err());
    assert!(check_reply((4096, 8193, 4096), (4096, 4096), 2).is_err());
}

#[test]
fn runs_clipped_to_a_request_are_relative_to_it() {
    let run = |rel, len, zero| SinkRun {
        rel,
        len,
        zero,
        digest: [1; 32],
    };
    let runs = [
        run(0, 5000, false),
        run(5000, 3192, true),
        run(8192, 8192, false),
    ];
    let clipped = clip_runs(&runs, 4096, 8192);
    let got: Vec<_> = clipped.iter().map(|r| (r.rel, r.len, r.zero)).collect();
    assert_eq!(
        got,
        vec![(0, 904, false), (904, 3192, true), (4096, 4096, false)]
    );
    assert!(clipped.iter().all(|r| r.digest == [0; 32]));
}

/// A source of `granules` 4 KiB granules, each zero or data.
fn source_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(any::<bool>(), 1..96),
        any::<u8>(),
        0usize..4096,
    )
        .prop_map(|(granules, seed, tail)| {
            let mut out = Vec::new();
            for (i, is_data) in granules.iter().enumerate() {
                let g = if *is_data {
                    patterned(4096, seed.wrapping_add(i as u8))
                } else {
                    vec![0; 4096]
                };
                out.extend_from_slice(&g);
            }
            out.truncate(out.len() - tail.min(out.len() - 1));
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the target holds, applying the plan makes it the source;
    /// only blocks that differ are touched and counted.
    #[test]
    fn applying_the_plan_makes_the_target_equal_to_the_source(
        source in source_strategy(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0usize..3), 0..12),
        block_log2 in 12u32..17,
    ) {
        let block = 1u32 << block_log2;
        let mut target = source.clone();
        for (at, byte, kind) in &edits {
            let i = at.index(target.len());
            match kind {
                0 => target[i] = *byte,
                1 => { let end = (i + 5000).min(target.len()); target[i..end].fill(0) }
                _ => { let end = (i + 300).min(target.len()); target[i..end].fill(byte | 1) }
            }
        }
        let before = target.clone();
        let plan = plan_for(&source, &target, block);
        apply(&plan, &source, &mut target);
        prop_assert_eq!(&target, &source);
        let differing: u64 = source
            .chunks(block as usize)
            .zip(before.chunks(block as usize))
            .filter(|(s, t)| s != t)
            .map(|(s, _)| s.len() as u64)
            .sum();
        prop_assert_eq!(plan.bytes_changed, differing);
        let mut last_end = 0;
        for p in &plan.pieces {
            let (rel, len) = p.range();
            prop_assert!(len > 0 && rel >= last_end);
            last_end = rel + len;
            let r = rel as usize..last_end as usize;
            if matches!(p, Piece::Zero { .. }) {
                prop_assert!(source[r].iter().all(|&b| b == 0));
            }
        }
    }
}
