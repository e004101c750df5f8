//! Unit and property tests of the sans-IO transmission phase.

use super::*;
use crate::nbd::MAX_PAYLOAD_BYTES;
use crate::nbd::proto::{ChunkHeader, encode_chunk_header, encode_simple_reply};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

fn info(structured: bool, flags: u16) -> ExportInfo {
    ExportInfo {
        size_bytes: SIZE,
        transmission_flags: proto::TFLAG_HAS_FLAGS | flags,
        block_min: 512,
        block_pref: 4096,
        block_max: 64 * 1024,
        structured_replies: structured,
        meta_contexts: if structured {
            vec![("base:allocation".into(), 3)]
        } else {
            vec![]
        },
    }
}

fn rw() -> u16 {
    proto::TFLAG_SEND_FLUSH | proto::TFLAG_SEND_WRITE_ZEROES | proto::TFLAG_SEND_TRIM
}

fn chunk(flags: u16, ty: u16, cookie: u64, body: &[u8]) -> Vec<u8> {
    let h = ChunkHeader {
        flags,
        reply_type: ty,
        cookie,
        len_bytes: u32::try_from(body.len()).unwrap(),
    };
    let mut v = encode_chunk_header(&h).to_vec();
    v.extend_from_slice(body);
    v
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut body = offset.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    chunk(flags, proto::REPLY_TYPE_OFFSET_DATA, cookie, &body)
}

fn hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut body = offset.to_be_bytes().to_vec();
    body.extend_from_slice(&len.to_be_bytes());
    chunk(flags, proto::REPLY_TYPE_OFFSET_HOLE, cookie, &body)
}

fn bs_chunk(flags: u16, cookie: u64, ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut body = ctx.to_be_bytes().to_vec();
    for (l, f) in extents {
        body.extend_from_slice(&l.to_be_bytes());
        body.extend_from_slice(&f.to_be_bytes());
    }
    chunk(flags, proto::REPLY_TYPE_BLOCK_STATUS, cookie, &body)
}

const DONE: u16 = proto::REPLY_FLAG_DONE;

/// Feed `input` to `conn` in pieces of at most `step` bytes, writing payload
/// into `buf` and zeroing holes, like a driver would.
fn feed(
    conn: &mut ClientConn,
    input: &[u8],
    step: usize,
    buf: &mut [u8],
) -> (Vec<ReplyEvent>, Result<(), NbdError>) {
    let mut events = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let avail = &input[pos..];
        let n = match conn.recv_target() {
            RecvTarget::Scratch { len } => {
                let n = len.min(step).min(avail.len());
                conn.scratch_mut()[..n].copy_from_slice(&avail[..n]);
                n
            }
            RecvTarget::Payload {
                buf_offset, len, ..
            } => {
                let n = (len as usize).min(step).min(avail.len());
                let at = buf_offset as usize;
                buf[at..at + n].copy_from_slice(&avail[..n]);
                n
            }
        };
        let before = events.len();
        if let Err(e) = conn.advance(n, &mut events) {
            return (events, Err(e));
        }
        for ev in &events[before..] {
            if let ReplyEvent::Hole {
                buf_offset, len, ..
            } = ev
            {
                buf[*buf_offset as usize..(*buf_offset + *len) as usize].fill(0);
            }
        }
        pos += n;
    }
    (events, Ok(()))
}

fn encode(conn: &mut ClientConn, cookie: u64, cmd: Cmd) -> Result<(), NbdError> {
    let mut out = [0u8; 28];
    conn.encode_request(cookie, cmd, &mut out)
}

#[test]
fn encode_checks_limits() {
    let mut c = ClientConn::new(&info(true, rw()));
    encode(
        &mut c,
        1,
        Cmd::Read {
            offset: 0,
            len: 4096,
        },
    )
    .unwrap();
    assert!(
        matches!(encode(&mut c, 1, Cmd::Flush), Err(NbdError::Invalid(m)) if m.contains("already in flight"))
    );
    let e = encode(
        &mut c,
        2,
        Cmd::Read {
            offset: 0,
            len: 128 * 1024,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("maximum block size"), "{e}");
    let e = encode(
        &mut c,
        3,
        Cmd::Write {
            offset: 100,
            len: 512,
            fua: false,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
    encode(
        &mut c,
        4,
        Cmd::WriteZeroes {
            offset: 0,
            len: 1 << 20,
            no_hole: false,
            fast: false,
        },
    )
    .unwrap();
    assert_eq!(c.in_flight(), 2);

    let mut ro = ClientConn::new(&info(false, proto::TFLAG_READ_ONLY | rw()));
    let e = encode(
        &mut ro,
        1,
        Cmd::Write {
            offset: 0,
            len: 512,
            fua: false,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = encode(
        &mut ro,
        2,
        Cmd::Trim {
            offset: 0,
            len: 512,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    let e = encode(
        &mut ro,
        3,
        Cmd::BlockStatus {
            offset: 0,
            len: 512,
        },
    )
    .unwrap_err();
    assert!(matches!(e, NbdError::Unsupported(_)), "{e}");
    let mut noflush = ClientConn::new(&info(false, 0));
    assert!(matches!(
        encode(&mut noflush, 1, Cmd::Flush),
        Err(NbdError::Unsupported(_))
    ));
    assert_eq!(ro.in_flight() + noflush.in_flight(), 0);
}

#[test]
fn request_header_on_the_wire() {
    let mut c = ClientConn::new(&info(true, rw()));
    let mut out = [0u8; 28];
    c.encode_request(
        0xabcd,
        Cmd::WriteZeroes {
            offset: 4096,
            len: 512,
            no_hole: true,
            fast: false,
        },
        &mut out,
    )
    .unwrap();
    let h = proto::decode_request_header(&out).unwrap();
    assert_eq!(h.cmd_type, proto::CMD_WRITE_ZEROES);
    assert_eq!(h.flags, proto::CMD_FLAG_NO_HOLE);
    assert_eq!((h.cookie, h.offset, h.len_bytes), (0xabcd, 4096, 512));
}

#[test]
fn simple_read_reply_goes_straight_to_the_buffer() {
    let mut c = ClientConn::new(&info(false, 0));
    encode(
        &mut c,
        9,
        Cmd::Read {
            offset: 512,
            len: 1024,
        },
    )
    .unwrap();
    let mut input = encode_simple_reply(0, 9).to_vec();
    input.extend((0..1024u32).map(|i| i.to_le_bytes()[0]));
    let mut buf = vec![0xffu8; 1024];
    let (events, r) = feed(&mut c, &input, 7, &mut buf);
    r.unwrap();
    assert_eq!(events, vec![ReplyEvent::Done { cookie: 9 }]);
    assert!(
        buf.iter()
            .enumerate()
            .all(|(i, b)| *b == i.to_le_bytes()[0])
    );
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn structured_read_with_data_and_hole_out_of_order() {
    let mut c = ClientConn::new(&info(true, 0));
    encode(
        &mut c,
        5,
        Cmd::Read {
            offset: 4096,
            len: 2048,
        },
    )
    .unwrap();
    let mut input = data_chunk(0, 5, 4096 + 1024, &[7u8; 1024]);
    input.extend(hole_chunk(0, 5, 4096, 1024));
    input.extend(chunk(DONE, proto::REPLY_TYPE_NONE, 5, &[]));
    let mut buf = vec![0xffu8; 2048];
    let (events, r) = feed(&mut c, &input, 3, &mut buf);
    r.unwrap();
    assert_eq!(
        events,
        vec![
            ReplyEvent::Hole {
                cookie: 5,
                buf_offset: 0,
                len: 1024
            },
            ReplyEvent::Done { cookie: 5 }
        ]
    );
    assert!(buf[..1024].iter().all(|b| *b == 0) && buf[1024..].iter().all(|b| *b == 7));
}

#[test]
fn read_done_without_all_bytes_is_a_protocol_error() {
    let mut c = ClientConn::new(&info(true, 0));
    encode(
        &mut c,
        5,
        Cmd::Read {
            offset: 0,
            len: 2048,
        },
    )
    .unwrap();
    let input = data_chunk(DONE, 5, 0, &[1u8; 1024]);
    let (_, r) = feed(&mut c, &input, 4096, &mut [0u8; 2048]);
    let e = r.unwrap_err();
    assert!(e.to_string().contains("only 1024 of its bytes"), "{e}");
    // Poisoned from now on.
    assert_eq!(c.recv_target(), RecvTarget::Scratch { len: 0 });
    assert!(
        encode(
            &mut c,
            6,
            Cmd::Read {
                offset: 0,
                len: 512
            }
        )
        .is_err()
    );
}

#[test]
fn overlapping_chunks_are_refused() {
    let mut c = ClientConn::new(&info(true, 0));
    encode(
        &mut c,
        5,
        Cmd::Read {
            offset: 0,
            len: 2048,
        },
    )
    .unwrap();
    let mut input = data_chunk(0, 5, 0, &[1u8; 1024]);
    input.extend(hole_chunk(DONE, 5, 512, 1536));
    let (_, r) = feed(&mut c, &input, 4096, &mut [0u8; 2048]);
    assert!(r.unwrap_err().to_string().contains("overlaps"));
}

#[test]
fn block_status_extents_and_truncation() {
    let mut c = ClientConn::new(&info(true, 0));
    encode(
        &mut c,
        1,
        Cmd::BlockStatus {
            offset: 0,
            len: 8192,
        },
    )
    .unwrap();
    let input = bs_chunk(DONE, 1, 3, &[(4096, 0), (65536, 3)]);
    let (events, r) = feed(&mut c, &input, 5, &mut []);
    r.unwrap();
    assert_eq!(
        events,
        vec![
            ReplyEvent::BlockStatus {
                cookie: 1,
                context_id: 3,
                extents: vec![
                    Extent {
                        len: 4096,
                        flags: 0
                    },
                    Extent {
                        len: 4096,
                        flags: 3
                    }
                ]
            },
            ReplyEvent::Done { cookie: 1 }
        ]
    );
}

#[test]
fn block_status_bad_extents() {
    for (extents, want) in [
        (vec![(8192u32, 0u32), (512, 0)], "past the end"),
        (vec![(9000, 0), (512, 0)], "reaches past"),
        (vec![(512, 0), (0, 0)], "zero-length"),
    ] {
        let mut c = ClientConn::new(&info(true, 0));
        encode(
            &mut c,
            1,
            Cmd::BlockStatus {
                offset: 0,
                len: 8192,
            },
        )
        .unwrap();
        let (_, r) = feed(&mut c, &bs_chunk(DONE, 1, 3, &extents), 4096, &mut []);
        let e = r.unwrap_err();
        assert!(e.to_string().contains(want), "{e} should mention {want}");
    }
    let mut c = ClientConn::new(&info(true, 0));
    encode(
        &mut c,
        1,
        Cmd::BlockStatus {
            offset: 0,
            len: 8192,
        },
    )
    .unwrap();
    let (_, r) = feed(&mut c, &bs_chunk(DONE, 1, 99, &[(512, 0)]), 4096, &mut []);
    assert!(r.unwrap_err().to_string().contains("not negotiated"));
}

#[test]
fn error_chunks_fail_the_command_after_done() {
    let mut c = ClientConn::new(&info(true, 0));
    encode(
        &mut c,
        1,
        Cmd::Read {
            offset: 0,
            len: 4096,
        },
    )
    .unwrap();
    let mut body = proto::NBD_EIO.to_be_bytes().to_vec();
    body.extend_from_slice(&5u16.to_be_bytes());
    body.extend_from_slice(b"disk!");
    body.extend_from_slice(&1024u64.to_be_bytes());
    let mut input = chunk(0, proto::REPLY_TYPE_ERROR_OFFSET, 1, &body);
    input.extend(chunk(DONE, proto::REPLY_TYPE_NONE, 1, &[]));
    let (events, r) = feed(&mut c, &input, 4096, &mut [0u8; 4096]);
    r.unwrap();
    assert_eq!(
        events,
        vec![ReplyEvent::Failed {
            cookie: 1,
            errno: proto::NBD_EIO,
            message: "disk!".into()
        }]
    );
}

#[test]
fn unknown_cookie_and_wrong_magic() {
    let mut c = ClientConn::new(&info(true, 0));
    encode(&mut c, 1, Cmd::Flush).unwrap_err();
    let (_, r) = feed(&mut c, &encode_simple_reply(0, 42), 16, &mut []);
    assert!(r.unwrap_err().to_string().contains("unknown cookie 42"));
    let mut c = ClientConn::new(&info(true, 0));
    let (_, r) = feed(
        &mut c,
        &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        16,
        &mut [],
    );
    assert!(r.unwrap_err().to_string().contains("0xdeadbeef"));
}

#[test]
fn huge_chunk_length_is_refused_before_allocation() {
    let mut c = ClientConn::new(&info(true, 0));
    encode(
        &mut c,
        1,
        Cmd::BlockStatus {
            offset: 0,
            len: 8192,
        },
    )
    .unwrap();
    let h = ChunkHeader {
        flags: DONE,
        reply_type: proto::REPLY_TYPE_BLOCK_STATUS,
        cookie: 1,
        len_bytes: 0xffff_fff0,
    };
    let (_, r) = feed(&mut c, &encode_chunk_header(&h), 20, &mut []);
    assert!(r.unwrap_err().to_string().contains("payload limit"));
    assert!(c.scratch.capacity() <= SCRATCH_KEEP_BYTES);
}

/// Byte streams that start like a real reply to one of the in-flight
/// requests, then go wild.
fn hostile_input() -> impl Strategy<Value = Vec<u8>> {
    let prefix = prop_oneof![
        Just(encode_simple_reply(0, 1).to_vec()),
        Just(encode_simple_reply(0, 2).to_vec()),
        (any::<u16>(), any::<u16>(), 1u64..=3, any::<u32>()).prop_map(
            |(flags, ty, cookie, len)| {
                encode_chunk_header(&ChunkHeader {
                    flags,
                    reply_type: (ty % 8) | (ty & 0x8000),
                    cookie,
                    len_bytes: len,
                })
                .to_vec()
            }
        ),
        (1u64..=3, any::<u16>(), 0u64..5000)
            .prop_map(|(cookie, flags, off)| data_chunk(flags, cookie, off, &[1u8; 64])),
        Just(Vec::new()),
    ];
    (
        proptest::collection::vec(prefix, 1..4),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(ps, tail)| {
            let mut v: Vec<u8> = ps.concat();
            v.extend(tail);
            v
        })
}

proptest! {
    #[test]
    fn hostile_replies_never_panic_nor_overallocate(input in hostile_input(), step in 1usize..64) {
        let mut c = ClientConn::new(&info(true, rw()));
        encode(&mut c, 1, Cmd::Read { offset: 0, len: 4096 }).unwrap();
        encode(&mut c, 2, Cmd::Write { offset: 0, len: 512, fua: false }).unwrap();
        encode(&mut c, 3, Cmd::BlockStatus { offset: 0, len: 8192 }).unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = feed(&mut c, &input, step, &mut buf);
        prop_assert!(c.scratch.capacity() <= (MAX_PAYLOAD_BYTES + 8) as usize);
    }

    /// A READ split at arbitrary points into data and hole chunks, delivered
    /// in arbitrary small pieces, reassembles to the same bytes.
    #[test]
    fn partial_deliveries_reassemble(cuts in proptest::collection::btree_set(1u32..4095, 0..8), holes: u8, step in 1usize..50) {
        let src: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut bounds: Vec<u32> = vec![0];
        bounds.extend(cuts);
        bounds.push(4096);
        let mut input = Vec::new();
        let pieces = bounds.len() - 1;
        for (i, w) in bounds.windows(2).enumerate() {
            let flags = if i + 1 == pieces { DONE } else { 0 };
            if holes & (1 << (i % 8)) != 0 {
                input.extend(hole_chunk(flags, 7, u64::from(w[0]), w[1] - w[0]));
            } else {
                input.extend(data_chunk(flags, 7, u64::from(w[0]), &src[w[0] as usize..w[1] as usize]));
            }
        }
        let mut c = ClientConn::new(&info(true, 0));
        encode(&mut c, 7, Cmd::Read { offset: 0, len: 4096 }).unwrap();
        let mut buf = vec![0xeeu8; 4096];
        let (events, r) = feed(&mut c, &input, step, &mut buf);
        prop_assert!(r.is_ok(), "{:?}", r);
        prop_assert_eq!(events.last(), Some(&ReplyEvent::Done { cookie: 7 }));
        for (i, w) in bounds.windows(2).enumerate() {
            let (a, b) = (w[0] as usize, w[1] as usize);
            if holes & (1 << (i % 8)) != 0 {
                prop_assert!(buf[a..b].iter().all(|x| *x == 0));
            } else {
                prop_assert_eq!(&buf[a..b], &src[a..b]);
            }
        }
    }
}
