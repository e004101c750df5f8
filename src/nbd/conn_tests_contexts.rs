//! BLOCK_STATUS replies carrying several meta contexts (`base:allocation`
//! and `qemu:dirty-bitmap:NAME`): one extent chunk per context, in any
//! order, each bounded by the request.

use super::*;
use crate::nbd::proto::{ChunkHeader, encode_chunk_header};

const ALLOCATION: u32 = 3;
const BITMAP: u32 = 9;
const DONE: u16 = proto::REPLY_FLAG_DONE;

fn conn() -> ClientConn {
    let info = ExportInfo {
        size_bytes: 1 << 20,
        transmission_flags: proto::TFLAG_HAS_FLAGS,
        block_min: 512,
        block_pref: 4096,
        block_max: 64 * 1024,
        structured_replies: true,
        meta_contexts: vec![
            ("base:allocation".into(), ALLOCATION),
            ("qemu:dirty-bitmap:b0".into(), BITMAP),
        ],
    };
    let mut c = ClientConn::new(&info);
    let mut out = [0u8; 28];
    let cmd = Cmd::BlockStatus {
        offset: 65536,
        len: 8192,
    };
    c.encode_request(1, cmd, &mut out).unwrap();
    c
}

fn raw_chunk(flags: u16, body: &[u8]) -> Vec<u8> {
    let h = ChunkHeader {
        flags,
        reply_type: proto::REPLY_TYPE_BLOCK_STATUS,
        cookie: 1,
        len_bytes: u32::try_from(body.len()).unwrap(),
    };
    let mut v = encode_chunk_header(&h).to_vec();
    v.extend_from_slice(body);
    v
}

fn bs(flags: u16, ctx: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut body = ctx.to_be_bytes().to_vec();
    for (l, f) in extents {
        body.extend_from_slice(&l.to_be_bytes());
        body.extend_from_slice(&f.to_be_bytes());
    }
    raw_chunk(flags, &body)
}

/// Feed `input` in pieces of at most `step` bytes (no payload states
/// occur in BLOCK_STATUS replies).
fn feed(c: &mut ClientConn, input: &[u8], step: usize) -> Result<Vec<ReplyEvent>, NbdError> {
    let mut events = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let RecvTarget::Scratch { len } = c.recv_target() else {
            panic!("a BLOCK_STATUS reply never goes to a payload buffer");
        };
        let n = len.min(step).min(input.len() - pos);
        c.scratch_mut()[..n].copy_from_slice(&input[pos..pos + n]);
        c.advance(n, &mut events)?;
        pos += n;
    }
    Ok(events)
}

fn ext(len: u32, flags: u32) -> Extent {
    Extent { len, flags }
}

#[test]
fn two_contexts_in_either_order_are_decoded_per_context() {
    for bitmap_first in [false, true] {
        let alloc = bs(0, ALLOCATION, &[(4096, 0), (4096, 3)]);
        let dirty = bs(0, BITMAP, &[(65536, 1)]);
        let mut input: Vec<u8> = if bitmap_first {
            [dirty, alloc].concat()
        } else {
            [alloc, dirty].concat()
        };
        // A NONE chunk with DONE ends the reply.
        let none = ChunkHeader {
            flags: DONE,
            reply_type: proto::REPLY_TYPE_NONE,
            cookie: 1,
            len_bytes: 0,
        };
        input.extend(encode_chunk_header(&none));
        let mut c = conn();
        let events = feed(&mut c, &input, 7).unwrap();
        let mut by_context: Vec<(u32, Vec<Extent>)> = events
            .iter()
            .filter_map(|e| match e {
                ReplyEvent::BlockStatus {
                    context_id,
                    extents,
                    ..
                } => Some((*context_id, extents.clone())),
                _ => None,
            })
            .collect();
        by_context.sort_by_key(|(id, _)| *id);
        assert_eq!(
            by_context,
            vec![
                (ALLOCATION, vec![ext(4096, 0), ext(4096, 3)]),
                // Truncated to the request's end.
                (BITMAP, vec![ext(8192, 1)]),
            ]
        );
        assert_eq!(events.last(), Some(&ReplyEvent::Done { cookie: 1 }));
    }
}

#[test]
fn a_reply_missing_one_context_is_refused() {
    let mut c = conn();
    let e = feed(&mut c, &bs(DONE, ALLOCATION, &[(8192, 0)]), 64).unwrap_err();
    assert!(
        e.to_string()
            .contains("without extents for context \"qemu:dirty-bitmap:b0\""),
        "{e}"
    );
}

#[test]
fn bad_second_context_chunks_are_errors_not_panics() {
    let ok = bs(0, ALLOCATION, &[(8192, 0)]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            bs(DONE, ALLOCATION, &[(8192, 0)]),
            "two BLOCK_STATUS chunks",
        ),
        (bs(DONE, BITMAP, &[(8192, 1), (512, 0)]), "past the end"),
        (bs(DONE, BITMAP, &[(9000, 1), (512, 0)]), "reaches past"),
        (bs(DONE, BITMAP, &[(0, 1)]), "zero-length"),
        (bs(DONE, 77, &[(8192, 1)]), "not negotiated"),
        (
            raw_chunk(DONE, &BITMAP.to_be_bytes()),
            "4 + a positive multiple of 8",
        ),
        (
            raw_chunk(
                DONE,
                &[BITMAP.to_be_bytes().as_slice(), &[0u8; 12]].concat(),
            ),
            "4 + a positive multiple of 8",
        ),
    ];
    for (second, want) in cases {
        let mut c = conn();
        let e = feed(&mut c, &[ok.clone(), second].concat(), 64).unwrap_err();
        assert!(e.to_string().contains(want), "{e} should mention {want}");
    }
}
