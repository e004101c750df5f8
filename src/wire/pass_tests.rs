//! Protocol v2: the pass fields of HELLO / WELCOME, PLAN, DIGEST_REQUEST,
//! DIGESTS, the plan and block digests, sync id text, and the checks each
//! malformed variant meets.

use super::header::{FrameType, HEADER_LEN, Header};
use super::pass::{MAX_DIGESTS, MAX_PLAN_RANGES, PLAN_DIGEST_CONTEXT};
use super::tests::{corrupt, hello, ranges, set_len};
use super::*;

fn incremental_hello(plan: &[ByteRange]) -> Hello {
    Hello {
        mode: PassMode::Incremental,
        base_sync_id: [0x22; 16],
        plan_digest: plan_digest(plan),
        ..hello()
    }
}

fn encode_err(frame: Frame) -> WireError {
    let mut out = Vec::new();
    let err = frame.encode(&mut out).expect_err("the encoder refuses it");
    assert!(out.is_empty(), "nothing is written for a refused frame");
    err
}

fn bad_field(err: &WireError) -> &'static str {
    match err {
        WireError::BadField { field, .. } => field,
        other => panic!("expected BadField, got {other:?}"),
    }
}

#[test]
fn the_version_byte_is_2() {
    assert_eq!(PROTOCOL_VERSION, 2);
    assert_eq!(Header::new(FrameType::Ping, 8).unwrap().encode()[4], 2);
}

#[test]
fn hello_pass_fields_sit_after_the_flags() {
    let h = incremental_hello(&ranges(3));
    let mut bytes = Vec::new();
    Frame::Hello(h.clone()).encode(&mut bytes).unwrap();
    let p = &bytes[HEADER_LEN..];
    assert_eq!(p[40], PassMode::Incremental.as_u8());
    assert_eq!(p[41..57], h.sync_id);
    assert_eq!(p[57..73], h.base_sync_id);
    assert_eq!(p[73..105], h.plan_digest);
    let change_id_at = p.len() - 2 - h.change_id.len();
    assert_eq!(p[change_id_at..change_id_at + 2], [5, 0]);
    assert_eq!(&p[change_id_at + 2..], b"CHG-1");
}

#[test]
fn hello_pass_fields_must_agree_with_the_mode() {
    let plan = ranges(2);
    assert_eq!(
        bad_field(&encode_err(Frame::Hello(Hello {
            sync_id: [0; 16],
            ..hello()
        }))),
        "sync_id"
    );
    assert_eq!(
        bad_field(&encode_err(Frame::Hello(Hello {
            base_sync_id: [0; 16],
            ..incremental_hello(&plan)
        }))),
        "base_sync_id"
    );
    for mode in [PassMode::Full, PassMode::Delta] {
        let with_base = Hello {
            mode,
            ..incremental_hello(&plan)
        };
        assert_eq!(
            bad_field(&encode_err(Frame::Hello(with_base))),
            "base_sync_id / plan_digest"
        );
        let with_digest = Hello {
            mode,
            plan_digest: [1; 32],
            ..hello()
        };
        assert_eq!(
            bad_field(&encode_err(Frame::Hello(with_digest))),
            "base_sync_id / plan_digest"
        );
    }
    let long = Hello {
        change_id: "c".repeat(MAX_STRING_BYTES + 1),
        ..hello()
    };
    assert!(matches!(
        encode_err(Frame::Hello(long)),
        WireError::StringTooLong {
            field: "HELLO change_id",
            ..
        }
    ));
}

#[test]
fn malformed_pass_fields_on_the_wire_are_refused() {
    let full = Frame::Hello(hello());
    let inc = Frame::Hello(incremental_hello(&ranges(1)));
    let mode_at = HEADER_LEN + 40;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("mode 3", corrupt(&full, |b| b[mode_at] = 3), "mode"),
        (
            "zero sync id",
            corrupt(&full, |b| b[mode_at + 1..mode_at + 17].fill(0)),
            "sync_id",
        ),
        (
            "full with a base",
            corrupt(&full, |b| b[mode_at + 17] = 1),
            "base_sync_id / plan_digest",
        ),
        (
            "full with a plan digest",
            corrupt(&full, |b| b[mode_at + 64] = 1),
            "base_sync_id / plan_digest",
        ),
        (
            "incremental without a base",
            corrupt(&inc, |b| b[mode_at + 17..mode_at + 33].fill(0)),
            "base_sync_id",
        ),
    ];
    for (name, bytes, field) in cases {
        let err = decode_any(&bytes).expect_err(name);
        assert_eq!(bad_field(&err), field, "{name}");
        assert_eq!(err.code(), ErrorCode::Protocol, "{name}");
    }
}

#[test]
fn welcome_needs_a_sync_id_and_an_ordered_replan() {
    let welcome = Welcome {
        features: Features::BLAKE3,
        instance: 1,
        sync_id: [0; 16],
        durable: vec![],
        replan: vec![],
    };
    assert_eq!(
        bad_field(&encode_err(Frame::Welcome(welcome.clone()))),
        "sync_id"
    );
    let mut replan = ranges(2);
    replan.reverse();
    let err = encode_err(Frame::Welcome(Welcome {
        sync_id: [1; 16],
        replan,
        ..welcome
    }));
    assert!(
        matches!(
            err,
            WireError::BadRange {
                field: "WELCOME replan",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn plan_digest_is_keyed_blake3_of_the_plan_payload() {
    let plan = ranges(7);
    let mut bytes = Vec::new();
    Frame::Plan(plan.clone()).encode(&mut bytes).unwrap();
    let want = blake3::Hasher::new_derive_key(PLAN_DIGEST_CONTEXT)
        .update(&bytes[HEADER_LEN..])
        .finalize();
    assert_eq!(plan_digest(&plan), *want.as_bytes());
    assert_ne!(plan_digest(&plan), plan_digest(&plan[..6]));
    assert_ne!(plan_digest(&[]), [0; 32]);
    let mut moved = plan.clone();
    moved[3].len_bytes += 1;
    assert_ne!(plan_digest(&plan), plan_digest(&moved));
}

#[test]
fn block_digest_is_xxh3_128_little_endian() {
    let block = vec![0x5au8; 65536];
    let chunk = ChunkDigest::Xxh3.digest(&block);
    assert_eq!(block_digest(&block)[..], chunk[..16]);
    assert_ne!(block_digest(&block), block_digest(&block[..4096]));
    assert_ne!(block_digest(&[]), [0; 16]);
}

#[test]
fn sync_ids_print_as_32_lowercase_hex_and_parse_back() {
    let id: SyncId = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ];
    let text = sync_id_hex(&id);
    assert_eq!(text, "00112233445566778899aabbccddeeff");
    assert_eq!(parse_sync_id(&text), Some(id));
    assert_eq!(parse_sync_id(&text.to_uppercase()), Some(id));
    for bad in [
        "",
        "00112233445566778899aabbccddeef",
        "00112233445566778899aabbccddeeff0",
        "0011223344556677 8899aabbccddeeff",
        "+0112233445566778899aabbccddeeff",
        "g0112233445566778899aabbccddeeff",
        "00000000000000000000000000000000",
        "é0112233445566778899aabbccddeef",
    ] {
        assert_eq!(parse_sync_id(bad), None, "{bad:?}");
    }
}

#[test]
fn digest_request_bounds() {
    let ok = |offset, len_bytes, block_bytes| {
        Frame::DigestRequest {
            offset,
            len_bytes,
            block_bytes,
        }
        .validate()
    };
    assert!(ok(0, 1, 4096).is_ok());
    assert!(ok(0, 32 << 20, 1 << 20).is_ok());
    for (name, offset, len, block, field) in [
        ("empty span", 0, 0, 4096, "len"),
        ("span above 32 MiB", 0, (32 << 20) + 1, 4096, "len"),
        ("block below 4 KiB", 0, 4096, 2048, "block"),
        ("block not a power of two", 0, 1 << 20, 3 * 4096, "block"),
        ("block above 1 MiB", 0, 4 << 20, 2 << 20, "block"),
        ("span overflows", u64::MAX - 10, 4096, 4096, "offset + len"),
    ] {
        let err = ok(offset, len, block).expect_err(name);
        assert_eq!(bad_field(&err), field, "{name}");
    }
}

#[test]
fn digests_bounds() {
    let frame = |offset, block_bytes, count| Frame::Digests {
        offset,
        block_bytes,
        digests: vec![[7; 16]; count],
    };
    assert!(frame(0, 4096, MAX_DIGESTS as usize).validate().is_ok());
    assert!(frame(0, 1 << 20, 32).validate().is_ok());
    assert!(
        frame(u64::MAX - 100, 4096, 1).validate().is_ok(),
        "a short last block"
    );
    assert!(matches!(
        frame(0, 1 << 20, 33).validate(),
        Err(WireError::ListTooLong { max: 32, .. })
    ));
    assert_eq!(
        bad_field(&frame(0, 4096, 0).validate().unwrap_err()),
        "digests"
    );
    assert_eq!(
        bad_field(&frame(0, 1000, 1).validate().unwrap_err()),
        "block"
    );
    assert_eq!(
        bad_field(&frame(u64::MAX - 100, 4096, 2).validate().unwrap_err()),
        "offset of the last block"
    );
}

#[test]
fn a_plan_claiming_more_than_the_bound_is_refused_before_allocating() {
    // By its header length: refused as soon as the header is complete.
    let mut header = Header::new(FrameType::Plan, 4).unwrap().encode();
    set_len(&mut header, 4 + 16 * (MAX_PLAN_RANGES + 1));
    let mut d = FrameDecoder::new();
    assert_eq!(d.feed(&header), HEADER_LEN);
    assert!(matches!(
        d.next_frame(),
        Err(WireError::FrameTooLarge { frame: "PLAN", .. })
    ));
    assert_eq!(d.buffered_capacity_bytes(), 0);
    // By its count: refused before the list is allocated.
    let small = corrupt(&Frame::Plan(ranges(1)), |b| {
        b[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(MAX_PLAN_RANGES + 1).to_le_bytes())
    });
    assert!(matches!(
        decode_any(&small),
        Err(WireError::ListTooLong { field: "PLAN", .. })
    ));
}

#[test]
fn the_largest_plan_round_trips() {
    let plan: Vec<ByteRange> = (0..u64::from(MAX_PLAN_RANGES))
        .map(|i| ByteRange {
            offset: i * 8192,
            len_bytes: 4096,
        })
        .collect();
    let mut bytes = Vec::new();
    Frame::Plan(plan.clone()).encode(&mut bytes).unwrap();
    assert_eq!(bytes.len(), HEADER_LEN + 4 + 16 * plan.len());
    let (back, _) = decode_frame(&bytes).unwrap();
    assert_eq!(back, Frame::Plan(plan));
}

#[test]
fn base_mismatch_is_code_14_and_pass_modes_are_bytes_0_to_2() {
    assert_eq!(ErrorCode::BaseMismatch.to_u16(), 14);
    assert_eq!(ErrorCode::from_u16(14), ErrorCode::BaseMismatch);
    for (mode, byte) in [
        (PassMode::Full, 0),
        (PassMode::Incremental, 1),
        (PassMode::Delta, 2),
    ] {
        assert_eq!(mode.as_u8(), byte);
        assert_eq!(PassMode::from_u8(byte).unwrap(), mode);
    }
    assert!(PassMode::from_u8(3).is_err());
}
