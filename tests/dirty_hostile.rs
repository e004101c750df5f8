//! Dirty-bitmap planning against a scripted NBD server (a thread on the
//! other end of a Unix socket pair): replies no real server sends, such as
//! the two contexts' extents ending at different offsets, or one context
//! missing. Real qemu-nbd runs in tests/dirty_bitmap.rs.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use diskferry::nbd::proto::{self, ChunkHeader};
use diskferry::plan::dirty::{self, DirtyMapError};
use diskferry::plan::{PassExtent, PassKind};

const SIZE_BYTES: u64 = 1 << 20;
const KIB: u32 = 1024;
const ALLOCATION: u32 = 5;
const BITMAP: u32 = 8;
const DONE: u16 = proto::REPLY_FLAG_DONE;

fn opt_reply(option: u32, ty: u32, data: &[u8]) -> Vec<u8> {
    let mut v = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend(option.to_be_bytes());
    v.extend(ty.to_be_bytes());
    v.extend(u32::try_from(data.len()).unwrap().to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Greeting, structured replies, the meta contexts `accepted`, NBD_OPT_GO.
fn handshake(accepted: &[(u32, &str)]) -> Vec<u8> {
    let mut v = proto::INIT_MAGIC.to_be_bytes().to_vec();
    v.extend(proto::OPTS_MAGIC.to_be_bytes());
    v.extend(3u16.to_be_bytes());
    v.extend(opt_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]));
    for (id, name) in accepted {
        let mut mc = id.to_be_bytes().to_vec();
        mc.extend_from_slice(name.as_bytes());
        v.extend(opt_reply(
            proto::OPT_SET_META_CONTEXT,
            proto::REP_META_CONTEXT,
            &mc,
        ));
    }
    v.extend(opt_reply(proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]));
    let mut export = proto::INFO_EXPORT.to_be_bytes().to_vec();
    export.extend(SIZE_BYTES.to_be_bytes());
    export.extend((proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY).to_be_bytes());
    v.extend(opt_reply(proto::OPT_GO, proto::REP_INFO, &export));
    v.extend(opt_reply(proto::OPT_GO, proto::REP_ACK, &[]));
    v
}

fn both() -> Vec<u8> {
    handshake(&[
        (ALLOCATION, "base:allocation"),
        (BITMAP, "qemu:dirty-bitmap:b0"),
    ])
}

/// One BLOCK_STATUS chunk of `cookie` for context `ctx`.
fn extents(flags: u16, cookie: u64, ctx: u32, list: &[(u32, u32)]) -> Vec<u8> {
    let mut body = ctx.to_be_bytes().to_vec();
    for (l, f) in list {
        body.extend(l.to_be_bytes());
        body.extend(f.to_be_bytes());
    }
    let mut v = proto::encode_chunk_header(&ChunkHeader {
        flags,
        reply_type: proto::REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len_bytes: u32::try_from(body.len()).unwrap(),
    })
    .to_vec();
    v.extend(body);
    v
}

/// Play `script` to a client planning bitmap `b0`; the plan or the error.
fn plan_against(script: Vec<u8>) -> Result<Vec<PassExtent>, DirtyMapError> {
    let (client_end, mut server) = UnixStream::pair().unwrap();
    client_end
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let player = std::thread::spawn(move || {
        let _ = server.write_all(&script);
        let _ = server.shutdown(Shutdown::Write);
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut sink = [0u8; 4096];
        while matches!(server.read(&mut sink), Ok(n) if n > 0) {}
    });
    let result = dirty::connect(client_end, "", "b0")
        .and_then(|mut c| dirty::map_pass(&mut c, "b0"))
        .map(|p| p.extents().to_vec());
    player.join().unwrap();
    result
}

#[test]
fn contexts_ending_at_different_offsets_are_planned_from_what_both_cover_and_holes_are_copied() {
    let mut script = both();
    // Request 1 [0, 1 MiB): allocation answers 256 KiB of data, the bitmap
    // only 128 KiB dirty. The plan may only use [0, 128 KiB).
    script.extend(extents(0, 1, ALLOCATION, &[(256 * KIB, 0)]));
    script.extend(extents(DONE, 1, BITMAP, &[(128 * KIB, 1)]));
    // Request 2 [128 KiB, 1 MiB): bitmap first. A hole that is not
    // NBD_STATE_ZERO (flags 1) may not read as zeros: it is copied.
    script.extend(extents(0, 2, BITMAP, &[(256 * KIB, 1), (640 * KIB, 0)]));
    script.extend(extents(
        DONE,
        2,
        ALLOCATION,
        &[(128 * KIB, 1), (768 * KIB, 3)],
    ));
    let kib = |k: u32| u64::from(k * KIB);
    let e = |offset, len, kind| PassExtent { offset, len, kind };
    assert_eq!(
        plan_against(script).unwrap(),
        vec![
            e(0, kib(256), PassKind::Copy),
            e(kib(256), kib(128), PassKind::Zero),
            e(kib(384), kib(640), PassKind::Unchanged),
        ]
    );
}

#[test]
fn hostile_replies_end_in_clean_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            handshake(&[(ALLOCATION, "base:allocation")]),
            "does not export dirty bitmap \"b0\"",
        ),
        (
            handshake(&[(BITMAP, "qemu:dirty-bitmap:b0")]),
            "did not accept the meta context base:allocation",
        ),
        (
            [both(), extents(DONE, 1, ALLOCATION, &[(1 << 20, 0)])].concat(),
            "without extents for context \"qemu:dirty-bitmap:b0\"",
        ),
        (
            [
                both(),
                extents(0, 1, ALLOCATION, &[(1 << 20, 0)]),
                extents(DONE, 1, BITMAP, &[(1 << 19, 1), (1 << 20, 0), (1, 0)]),
            ]
            .concat(),
            "past the end of the request",
        ),
        (
            [both(), extents(0, 1, ALLOCATION, &[(1 << 20, 0)])].concat(),
            "closed the connection",
        ),
    ];
    for (script, want) in cases {
        let e = plan_against(script).expect_err(want).to_string();
        assert!(e.contains(want), "{e:?} should contain {want:?}");
    }
}
