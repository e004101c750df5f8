//! Hostile and broken senders: each gets the expected ERROR (or a clean
//! close), nothing is written for it, and the receiver keeps serving.

mod serve_support;

use diskferry::wire::{Codec, ErrorCode, Frame, HEADER_LEN, MAGIC, PROTOCOL_VERSION, chunk_digest};
use serve_support::*;

const MIB: u64 = 1 << 20;

fn header(magic: [u8; 4], version: u8, frame_type: u8, payload_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&magic);
    h.push(version);
    h.push(frame_type);
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&payload_len.to_le_bytes());
    h
}

/// A HELLO exactly as a protocol v1 sender writes it (version byte 1, no
/// pass fields).
fn v1_hello() -> Vec<u8> {
    let mut payload = vec![3u8; 16]; // job id
    payload.extend_from_slice(&MIB.to_le_bytes());
    payload.extend_from_slice(&(1u32 << 20).to_le_bytes());
    payload.extend_from_slice(&0b100u32.to_le_bytes()); // BLAKE3
    payload.extend_from_slice(&0u16.to_le_bytes());
    payload.extend_from_slice(&1u16.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    for s in ["v1.img", "test-source"] {
        payload.extend_from_slice(&u16::try_from(s.len()).unwrap().to_le_bytes());
        payload.extend_from_slice(s.as_bytes());
    }
    let mut bytes = header(MAGIC, 1, 1, u32::try_from(payload.len()).unwrap());
    bytes.extend_from_slice(&payload);
    bytes
}

enum Expect {
    Error(ErrorCode),
    Close,
}

#[test]
fn malformed_frames_are_refused_and_the_receiver_keeps_serving() {
    let h = Harness::start(false);
    type Case = (&'static str, Box<dyn Fn(&mut Client)>, Expect);
    let cases: Vec<Case> = vec![
        (
            "bad magic",
            Box::new(|c| c.send_raw(&header(*b"NOPE", PROTOCOL_VERSION, 1, 44))),
            Expect::Error(ErrorCode::Protocol),
        ),
        (
            "oversized DATA length",
            Box::new(|c| {
                c.send_raw(&header(
                    MAGIC,
                    PROTOCOL_VERSION,
                    3,
                    48 + 32 * 1024 * 1024 + 1,
                ))
            }),
            Expect::Error(ErrorCode::Protocol),
        ),
        (
            "a whole v1 HELLO (a v1 sender)",
            Box::new(|c| c.send_raw(&v1_hello())),
            Expect::Error(ErrorCode::Version),
        ),
        (
            "version 3",
            Box::new(|c| c.send_raw(&header(MAGIC, 3, 1, 111))),
            Expect::Error(ErrorCode::Version),
        ),
        (
            "unknown frame type",
            Box::new(|c| c.send_raw(&header(MAGIC, PROTOCOL_VERSION, 99, 8))),
            Expect::Error(ErrorCode::Protocol),
        ),
        (
            "truncated HELLO, then the sender hangs up",
            Box::new(|c| {
                let mut bytes = Vec::new();
                Frame::Hello(hello(10, "cut.img", MIB, 0, 1))
                    .encode(&mut bytes)
                    .unwrap();
                c.send_raw(&bytes[..bytes.len() / 2]);
                c.close_write();
            }),
            Expect::Close,
        ),
        (
            "DATA before HELLO",
            Box::new(|c| c.data(0, &[1u8; 4096], Codec::None)),
            Expect::Error(ErrorCode::BadRequest),
        ),
        (
            "data past the end of the target",
            Box::new(|c| {
                c.welcome(&hello(11, "past.img", MIB, 0, 1));
                c.data(MIB - 100, &[7u8; 4096], Codec::None);
            }),
            Expect::Error(ErrorCode::BadRequest),
        ),
        (
            "zero range past the end of the target",
            Box::new(|c| {
                c.welcome(&hello(12, "zpast.img", MIB, 0, 1));
                c.send(&Frame::Zero(diskferry::wire::ByteRange {
                    offset: 0,
                    len_bytes: MIB + 1,
                }));
            }),
            Expect::Error(ErrorCode::BadRequest),
        ),
        (
            "digest mismatch",
            Box::new(|c| {
                c.welcome(&hello(13, "digest.img", MIB, 0, 1));
                let raw = random_bytes(8192, 3);
                let mut wrong = chunk_digest(&raw);
                wrong[0] ^= 1;
                c.data_raw(4096, 8192, Codec::None, wrong, &raw);
            }),
            Expect::Error(ErrorCode::DigestMismatch),
        ),
        (
            "corrupt lz4 payload",
            Box::new(|c| {
                c.welcome(&hello(14, "lz4.img", MIB, 0, 1));
                let raw = vec![5u8; 8192];
                c.data_raw(0, 8192, Codec::Lz4, chunk_digest(&raw), &[0xff; 64]);
            }),
            Expect::Error(ErrorCode::DigestMismatch),
        ),
        (
            "a second HELLO",
            Box::new(|c| {
                c.welcome(&hello(15, "twice.img", MIB, 0, 1));
                c.send(&Frame::Hello(hello(15, "twice.img", MIB, 0, 1)));
            }),
            Expect::Error(ErrorCode::Protocol),
        ),
        (
            "DONE with the wrong byte count",
            Box::new(|c| {
                c.welcome(&hello(16, "count.img", MIB, 0, 1));
                c.data(0, &[9u8; 4096], Codec::None);
                c.send(&Frame::Done {
                    total_bytes_sent: 1,
                    frames: 2,
                });
            }),
            Expect::Error(ErrorCode::Protocol),
        ),
    ];
    for (name, act, expect) in cases {
        let mut c = h.connect();
        act(&mut c);
        match expect {
            Expect::Error(code) => {
                let (got, message) = c.expect_error();
                assert_eq!(got, code, "{name}: {message}");
                assert!(!message.is_empty(), "{name}: empty message");
            }
            Expect::Close => assert!(c.recv().is_none(), "{name}: expected a close"),
        }
    }
    // Nothing was written for refused chunks.
    for name in ["past.img", "digest.img", "lz4.img"] {
        let bytes = std::fs::read(h.root.join(name)).unwrap();
        assert!(bytes.iter().all(|&b| b == 0), "{name} was written");
    }
    assert!(!h.root.join("cut.img").exists());
    assert!(
        !h.root.join("v1.img").exists(),
        "a v1 sender creates nothing"
    );

    // The receiver still serves a good job.
    let mut good = h.connect();
    good.welcome(&hello(20, "good.img", MIB, 0, 1));
    let raw = random_bytes(MIB as usize, 20);
    good.data(0, &raw, Codec::None);
    assert_eq!(good.barrier(1).bytes_durable_total, MIB);
    good.done();
    assert_eq!(std::fs::read(h.root.join("good.img")).unwrap(), raw);
}

#[test]
fn a_digest_mismatch_fails_the_whole_job() {
    let h = Harness::start(false);
    let mut s0 = h.connect();
    let mut s1 = h.connect();
    s0.welcome(&hello(30, "failed.img", MIB, 0, 2));
    s1.welcome(&hello(30, "failed.img", MIB, 1, 2));
    let raw = random_bytes(4096, 30);
    s0.data_raw(0, 4096, Codec::None, [0u8; 32], &raw);
    assert_eq!(s0.expect_error().0, ErrorCode::DigestMismatch);
    // The other stream learns it at its next frame (or while idle).
    s1.send(&Frame::Ping { nonce: 1 });
    assert_eq!(s1.expect_error().0, ErrorCode::DigestMismatch);
}
