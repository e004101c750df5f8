//! Decisions of the `auto` policy (`src/compress/policy.rs`), with injected
//! estimates so they do not depend on the speed of this machine.

use std::time::Duration;

use diskferry::compress::{
    Codec, CodecEstimate, CompressStats, Compressors, Estimates, LinkState, Mode, Policy, Reason,
};

const CHUNK_BYTES: usize = 2 * 1024 * 1024;

fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text from /usr/share/common-licenses when present, else generated logs,
/// repeated to `len`.
fn text(len: usize) -> Vec<u8> {
    let mut seed = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/usr/share/common-licenses") {
        let mut paths: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            seed.extend(std::fs::read(path).unwrap_or_default());
        }
    }
    if seed.len() < 4096 {
        for i in 0..2000u32 {
            seed.extend(
                format!(
                    "Jan {i:>4} kernel: eth0 link up, rx {} tx {}\n",
                    i * 7,
                    i * 3
                )
                .bytes(),
            );
        }
    }
    seed.iter().copied().cycle().take(len).collect()
}

fn estimates() -> Estimates {
    Estimates {
        lz4: CodecEstimate {
            bytes_per_s: 470e6,
            ratio: 1.9,
        },
        zstd1: CodecEstimate {
            bytes_per_s: 310e6,
            ratio: 2.3,
        },
        zstd3: CodecEstimate {
            bytes_per_s: 150e6,
            ratio: 2.5,
        },
        zstd9: CodecEstimate {
            bytes_per_s: 40e6,
            ratio: 2.7,
        },
    }
}

fn link(bytes_per_s: Option<f64>) -> LinkState {
    LinkState {
        link_bytes_per_s: bytes_per_s,
        cores_for_compression: 1.0,
    }
}

fn auto() -> Policy {
    Policy::with_estimates(Mode::Auto, estimates()).with_explore_every(0)
}

#[test]
fn fast_or_unknown_link_sends_everything_raw_without_probing() {
    let data = text(CHUNK_BYTES);
    for rate in [None, Some(1.6e9), Some(600e6)] {
        let mut policy = auto();
        for _ in 0..10 {
            let choice = policy.choose(&data, &link(rate));
            assert_eq!(choice.codec, Codec::None, "{rate:?}");
            assert_eq!(choice.reason, Reason::LinkFaster, "{rate:?}");
        }
        assert_eq!(policy.stats().probes, 0);
        assert_eq!(policy.stats().chunks_raw, 10);
        assert_eq!(policy.stats().raw_bytes, 10 * CHUNK_BYTES as u64);
    }
}

#[test]
fn more_cores_make_compression_pay_on_a_faster_link() {
    let data = text(CHUNK_BYTES);
    let mut policy = auto();
    let one = LinkState {
        link_bytes_per_s: Some(600e6),
        cores_for_compression: 1.0,
    };
    let four = LinkState {
        link_bytes_per_s: Some(600e6),
        cores_for_compression: 4.0,
    };
    assert_eq!(policy.choose(&data, &one).codec, Codec::None);
    assert_ne!(policy.choose(&data, &four).codec, Codec::None);
}

#[test]
fn incompressible_data_goes_raw_on_any_link() {
    let data = random_bytes(CHUNK_BYTES, 42);
    let mut policy = auto();
    for rate in [1e6, 25e6, 300e6] {
        let choice = policy.choose(&data, &link(Some(rate)));
        assert_eq!(choice.codec, Codec::None, "{rate}");
        assert_eq!(choice.reason, Reason::Incompressible, "{rate}");
    }
    assert_eq!(policy.stats().probes, 3);
    assert_eq!(policy.stats().probes_incompressible, 3);
}

#[test]
fn slow_link_gets_zstd_and_a_very_slow_one_a_higher_level() {
    let data = text(CHUNK_BYTES);
    let mut policy = auto();
    let at_25 = policy.choose(&data, &link(Some(25e6)));
    assert_eq!((at_25.codec, at_25.reason), (Codec::Zstd, Reason::Cheapest));
    let at_2 = policy.choose(&data, &link(Some(2e6)));
    assert_eq!(at_2.codec, Codec::Zstd);
    assert!(at_2.level > at_25.level, "{at_2:?} vs {at_25:?}");
}

#[test]
fn medium_link_gets_lz4() {
    let data = text(CHUNK_BYTES);
    let mut policy = auto();
    for _ in 0..5 {
        let choice = policy.choose(&data, &link(Some(300e6)));
        assert_eq!(
            (choice.codec, choice.reason),
            (Codec::Lz4, Reason::Cheapest)
        );
    }
}

#[test]
fn fixed_modes_do_what_they_say_even_on_random_data() {
    let data = random_bytes(65_536, 1);
    let fast = link(None);
    let cases = [
        (Mode::None, Codec::None, 0),
        (Mode::Lz4, Codec::Lz4, 0),
        (Mode::Zstd(7), Codec::Zstd, 7),
    ];
    for (mode, codec, level) in cases {
        let choice = Policy::new(mode).choose(&data, &fast);
        assert_eq!(
            (choice.codec, choice.level, choice.reason),
            (codec, level, Reason::Fixed)
        );
    }
}

#[test]
fn recorded_speed_moves_the_decision() {
    // A machine whose lz4 seems slower than the 300 MB/s link: raw.
    let mut seeds = estimates();
    seeds.lz4.bytes_per_s = 100e6;
    seeds.zstd1.bytes_per_s = 50e6;
    let mut policy = Policy::with_estimates(Mode::Auto, seeds).with_explore_every(0);
    let data = text(CHUNK_BYTES);
    let at_300 = link(Some(300e6));
    assert_eq!(policy.choose(&data, &at_300).codec, Codec::None);
    // Then lz4 turns out to run at 2 GB/s with ratio 3.
    for _ in 0..20 {
        policy.record(
            Codec::Lz4,
            0,
            CHUNK_BYTES,
            CHUNK_BYTES / 3,
            Duration::from_micros(1000),
        );
    }
    let lz4 = policy.estimates().lz4;
    assert!(lz4.bytes_per_s > 1.5e9, "{lz4:?}");
    assert!((lz4.ratio - 3.0).abs() < 0.1, "{lz4:?}");
    assert_eq!(policy.choose(&data, &at_300).codec, Codec::Lz4);
}

#[test]
fn exploration_measures_a_codec_now_and_then_even_on_a_fast_link() {
    let data = text(CHUNK_BYTES);
    let mut policy = Policy::with_estimates(Mode::Auto, estimates()).with_explore_every(8);
    let reasons: Vec<Reason> = (0..32)
        .map(|_| policy.choose(&data, &link(None)).reason)
        .collect();
    let explored = reasons.iter().filter(|r| **r == Reason::Explore).count();
    assert_eq!(explored, 4, "{reasons:?}");
    assert_eq!(policy.stats().chunks_explored, 4);
    assert_eq!(policy.stats().chunks_raw, 28);
}

#[test]
fn exploration_cycles_through_candidates_on_a_slow_link() {
    let data = text(CHUNK_BYTES);
    let mut policy = Policy::with_estimates(Mode::Auto, estimates()).with_explore_every(2);
    let explored: Vec<(Codec, i32)> = (0..8)
        .map(|_| policy.choose(&data, &link(Some(25e6))))
        .filter(|c| c.reason == Reason::Explore)
        .map(|c| (c.codec, c.level))
        .collect();
    assert_eq!(
        explored,
        [
            (Codec::Lz4, 0),
            (Codec::Zstd, 1),
            (Codec::Zstd, 3),
            (Codec::Zstd, 9)
        ]
    );
}

#[test]
fn stats_count_what_was_sent_and_add_up() {
    let mut ctx = Compressors::new();
    let data = text(CHUNK_BYTES);
    let mut policy = Policy::new(Mode::Zstd(1));
    let choice = policy.choose(&data, &link(None));
    let mut payload = Vec::new();
    ctx.compress(choice.codec, choice.level, &data, &mut payload)
        .unwrap();
    policy.record(
        choice.codec,
        choice.level,
        data.len(),
        payload.len(),
        Duration::from_millis(5),
    );
    // A payload that did not shrink is sent raw and counted raw.
    policy.record(Codec::Lz4, 0, 100, 101, Duration::from_micros(1));
    let stats = *policy.stats();
    assert_eq!(
        (stats.chunks_zstd, stats.chunks_lz4, stats.chunks_raw),
        (1, 0, 1)
    );
    assert_eq!(stats.raw_bytes, CHUNK_BYTES as u64 + 100);
    assert_eq!(stats.payload_bytes, payload.len() as u64 + 100);
    let mut total = CompressStats::default();
    total.add(&stats);
    total.add(&stats);
    assert_eq!(total.chunks_zstd, 2);
    assert_eq!(total.raw_bytes, 2 * stats.raw_bytes);
}

#[test]
fn tiny_empty_and_odd_inputs_are_handled() {
    let mut policy = auto();
    let slow = link(Some(1e6));
    assert_eq!(policy.choose(&[], &slow).codec, Codec::None);
    let one = policy.choose(b"x", &slow);
    assert_eq!(one.reason, Reason::Incompressible);
    let small = text(5000);
    assert_eq!(policy.choose(&small, &slow).codec, Codec::Zstd);
    let odd = LinkState {
        link_bytes_per_s: Some(f64::NAN),
        cores_for_compression: -3.0,
    };
    assert_eq!(policy.choose(&small, &odd).codec, Codec::None);
}
