//! Codec round trips and hostile payloads (`src/compress/codec.rs`).

use diskferry::compress::{
    Codec, CompressError, Compressors, MAX_RAW_BYTES, Mode, compress, decompress, max_payload_bytes,
};
use diskferry::wire::WireError;
use proptest::prelude::*;

const CODECS: [(Codec, i32); 5] = [
    (Codec::None, 0),
    (Codec::Lz4, 0),
    (Codec::Zstd, 1),
    (Codec::Zstd, 3),
    (Codec::Zstd, 19),
];

/// Deterministic pseudo-random bytes (xorshift64*).
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

/// Log-like text: repetitive structure with varying numbers.
fn log_text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut i = 0u64;
    while out.len() < len {
        let line = format!(
            "2024-05-{:02}T12:{:02}:{:02} host{} sshd[{}]: Accepted publickey for user{} from 10.0.{}.{}\n",
            i % 28 + 1,
            i % 60,
            (i * 7) % 60,
            i % 5,
            1000 + i * 13 % 9000,
            i % 17,
            i % 256,
            (i * 31) % 256
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

fn round_trip(ctx: &mut Compressors, codec: Codec, level: i32, raw: &[u8]) -> usize {
    let mut payload = Vec::new();
    ctx.compress(codec, level, raw, &mut payload).unwrap();
    assert!(payload.len() <= max_payload_bytes(codec, raw.len()));
    let mut back = vec![0xa5u8; raw.len()];
    ctx.decompress(codec, &payload, raw.len(), &mut back)
        .unwrap();
    assert!(
        back == raw,
        "{codec} level {level} round trip of {} bytes",
        raw.len()
    );
    payload.len()
}

#[test]
fn round_trips_every_codec_on_every_kind_of_data() {
    let mut ctx = Compressors::new();
    for len in [0, 1, 7, 4095, 4097, 65_537, 2 * 1024 * 1024 + 3] {
        for data in [
            random_bytes(len, len as u64 + 1),
            vec![0u8; len],
            log_text(len),
        ] {
            for (codec, level) in CODECS {
                // zstd -19 is too slow in a debug build for the 2 MiB case.
                if level < 19 || len < 100_000 {
                    round_trip(&mut ctx, codec, level, &data);
                }
            }
        }
    }
}

#[test]
fn compressible_data_shrinks_and_random_data_does_not() {
    let mut ctx = Compressors::new();
    let text = log_text(1 << 20);
    let random = random_bytes(1 << 20, 9);
    for (codec, level) in &CODECS[1..] {
        let text_len = round_trip(&mut ctx, *codec, *level, &text);
        assert!(
            text_len * 3 < text.len(),
            "{codec}:{level} text -> {text_len}"
        );
        let random_len = round_trip(&mut ctx, *codec, *level, &random);
        assert!(
            random_len >= random.len(),
            "{codec}:{level} random -> {random_len}"
        );
    }
}

#[test]
fn round_trips_the_largest_chunk() {
    let mut ctx = Compressors::new();
    let mut data = log_text(MAX_RAW_BYTES);
    data[MAX_RAW_BYTES / 2..MAX_RAW_BYTES / 2 + 4096].copy_from_slice(&random_bytes(4096, 5));
    for (codec, level) in [(Codec::Lz4, 0), (Codec::Zstd, 1)] {
        round_trip(&mut ctx, codec, level, &data);
    }
}

#[test]
fn one_shot_functions_match_contexts_and_reused_contexts_switch_levels() {
    let text = log_text(100_000);
    let mut ctx = Compressors::new();
    for (codec, level) in CODECS {
        let mut one_shot = Vec::new();
        compress(codec, level, &text, &mut one_shot).unwrap();
        let mut reused = vec![1, 2, 3];
        ctx.compress(codec, level, &text, &mut reused).unwrap();
        assert_eq!(one_shot, reused, "{codec}:{level}");
        let mut back = vec![0u8; text.len()];
        decompress(codec, &one_shot, text.len(), &mut back).unwrap();
        assert!(back == text);
    }
}

#[test]
fn oversized_and_mismatched_lengths_are_refused() {
    let mut ctx = Compressors::new();
    let too_big = vec![0u8; MAX_RAW_BYTES + 1];
    for (codec, level) in CODECS {
        let mut out = Vec::new();
        assert!(matches!(
            ctx.compress(codec, level, &too_big, &mut out),
            Err(CompressError::RawTooLarge { .. })
        ));
        let mut back = vec![0u8; MAX_RAW_BYTES + 1];
        assert!(matches!(
            ctx.decompress(codec, &[0u8; 16], MAX_RAW_BYTES + 1, &mut back),
            Err(CompressError::RawTooLarge { .. })
        ));
        let mut short = vec![0u8; 10];
        assert!(matches!(
            ctx.decompress(codec, &[0u8; 4], 11, &mut short),
            Err(CompressError::OutputLen { .. })
        ));
        let huge_payload = vec![0u8; max_payload_bytes(codec, 100) + 1];
        let mut out100 = vec![0u8; 100];
        assert!(matches!(
            ctx.decompress(codec, &huge_payload, 100, &mut out100),
            Err(CompressError::PayloadTooLarge { .. })
        ));
    }
    let mut out = Vec::new();
    for level in [0, 20, -1] {
        assert!(matches!(
            ctx.compress(Codec::Zstd, level, b"abc", &mut out),
            Err(CompressError::ZstdLevel { .. })
        ));
    }
}

#[test]
fn wrong_declared_length_or_truncated_payload_is_an_error() {
    let mut ctx = Compressors::new();
    let text = log_text(200_000);
    for (codec, level) in CODECS {
        let mut payload = Vec::new();
        ctx.compress(codec, level, &text, &mut payload).unwrap();
        for declared in [
            text.len() - 1,
            text.len() + 1,
            text.len() / 2,
            text.len() * 2,
        ] {
            let mut out = vec![0u8; declared];
            let result = ctx.decompress(codec, &payload, declared, &mut out);
            assert!(
                result.is_err(),
                "{codec}:{level} declared {declared} accepted"
            );
        }
        for cut in [1, payload.len() / 2, payload.len() - 1] {
            let mut out = vec![0u8; text.len()];
            let result = ctx.decompress(codec, &payload[..cut], text.len(), &mut out);
            assert!(
                result.is_err(),
                "{codec}:{level} truncated to {cut} accepted"
            );
        }
    }
}

#[test]
fn codec_ids_round_trip_and_unknown_ids_are_refused() {
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
        assert_eq!(Codec::from_u8(codec.as_u8()).unwrap(), codec);
    }
    for id in [3u8, 4, 127, 255] {
        let err = Codec::from_u8(id).unwrap_err();
        assert!(matches!(err, WireError::UnknownCodec { code } if code == id));
        assert!(err.to_string().contains("upgrade"), "{err}");
    }
}

#[test]
fn mode_strings_parse_as_documented() {
    let good = [
        ("none", Mode::None),
        ("lz4", Mode::Lz4),
        ("zstd", Mode::Zstd(3)),
        ("zstd:1", Mode::Zstd(1)),
        ("zstd:19", Mode::Zstd(19)),
        ("ZSTD:07", Mode::Zstd(7)),
        (" auto ", Mode::Auto),
    ];
    for (text, mode) in good {
        assert_eq!(text.parse::<Mode>().unwrap(), mode, "{text:?}");
        assert_eq!(mode.to_string().parse::<Mode>().unwrap(), mode);
    }
    let bad = [
        "", "zstd:", "zstd:0", "zstd:20", "zstd:-1", "zstd:+3", "zstd:3x", "zstd:999", "gzip",
        "lz4:1", "zstd 3",
    ];
    for text in bad {
        let err = text.parse::<Mode>().unwrap_err();
        assert!(
            err.to_string().contains("zstd:LEVEL (1..=19)"),
            "{text:?}: {err}"
        );
    }
}

fn any_codec() -> impl Strategy<Value = Codec> {
    prop_oneof![Just(Codec::None), Just(Codec::Lz4), Just(Codec::Zstd)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random payloads never panic, and whatever is accepted filled exactly
    /// the declared length.
    #[test]
    fn random_payloads_never_panic(
        codec in any_codec(),
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
        raw_len in 0usize..70_000,
    ) {
        let mut out = vec![0u8; raw_len];
        let result = decompress(codec, &payload, raw_len, &mut out);
        if codec == Codec::None {
            prop_assert_eq!(result.is_ok(), payload.len() == raw_len);
        }
    }

    /// Corrupting one byte of a valid payload never panics, and an accepted
    /// result still has the declared length (the digest catches the rest).
    #[test]
    fn corrupted_payloads_never_panic(
        codec in any_codec(),
        seed in any::<u64>(),
        len in 1usize..50_000,
        flip_at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut raw = log_text(len);
        raw[..len / 2].copy_from_slice(&random_bytes(len / 2, seed | 1));
        let mut payload = Vec::new();
        compress(codec, 1, &raw, &mut payload).unwrap();
        let i = flip_at.index(payload.len());
        payload[i] ^= flip;
        let mut out = vec![0u8; len];
        let result = decompress(codec, &payload, len, &mut out);
        if codec == Codec::None {
            prop_assert!(result.is_ok());
            prop_assert!(out != raw);
        }
    }
}
