//! A hostile NBD server: a thread on the other end of a Unix socket pair
//! plays a scripted byte sequence from a table of cases. Every case must end
//! in a clean `NbdError` naming what is wrong: no panic, no hang.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use diskferry::nbd::NbdError;
use diskferry::nbd::blocking::Client;
use diskferry::nbd::proto::{self, ChunkHeader};

const SIZE_BYTES: u64 = 1 << 20;
const CASE_TIMEOUT: Duration = Duration::from_secs(5);

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn greeting(flags: u16) -> Vec<u8> {
    let mut v = be64(proto::INIT_MAGIC);
    v.extend(be64(proto::OPTS_MAGIC));
    v.extend(flags.to_be_bytes());
    v
}

fn opt_reply(option: u32, ty: u32, len: u32, data: &[u8]) -> Vec<u8> {
    let mut v = be64(proto::OPT_REPLY_MAGIC);
    v.extend(option.to_be_bytes());
    v.extend(ty.to_be_bytes());
    v.extend(len.to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_export() -> Vec<u8> {
    let mut d = proto::INFO_EXPORT.to_be_bytes().to_vec();
    d.extend(be64(SIZE_BYTES));
    d.extend((proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH).to_be_bytes());
    opt_reply(proto::OPT_GO, proto::REP_INFO, d.len() as u32, &d)
}

/// Greeting, structured replies, base:allocation as context 1, up to the
/// GO replies (not included).
fn handshake_until_go() -> Vec<u8> {
    let mut v = greeting(3);
    v.extend(opt_reply(
        proto::OPT_STRUCTURED_REPLY,
        proto::REP_ACK,
        0,
        &[],
    ));
    let mut mc = 1u32.to_be_bytes().to_vec();
    mc.extend_from_slice(b"base:allocation");
    v.extend(opt_reply(
        proto::OPT_SET_META_CONTEXT,
        proto::REP_META_CONTEXT,
        mc.len() as u32,
        &mc,
    ));
    v.extend(opt_reply(
        proto::OPT_SET_META_CONTEXT,
        proto::REP_ACK,
        0,
        &[],
    ));
    v
}

fn good_handshake() -> Vec<u8> {
    let mut v = handshake_until_go();
    v.extend(info_export());
    v.extend(opt_reply(proto::OPT_GO, proto::REP_ACK, 0, &[]));
    v
}

fn chunk(flags: u16, ty: u16, cookie: u64, len: u32, body: &[u8]) -> Vec<u8> {
    let mut v = proto::encode_chunk_header(&ChunkHeader {
        flags,
        reply_type: ty,
        cookie,
        len_bytes: len,
    })
    .to_vec();
    v.extend_from_slice(body);
    v
}

fn extents(ctx: u32, list: &[(u32, u32)]) -> Vec<u8> {
    let mut v = ctx.to_be_bytes().to_vec();
    for (l, f) in list {
        v.extend(l.to_be_bytes());
        v.extend(f.to_be_bytes());
    }
    v
}

fn after_handshake(reply: Vec<u8>) -> Vec<u8> {
    let mut v = good_handshake();
    v.extend(reply);
    v
}

const DONE: u16 = proto::REPLY_FLAG_DONE;

/// What the client does once connected.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Only the handshake (the error must come from it).
    Connect,
    Read {
        offset: u64,
        len: usize,
    },
    BlockStatus {
        offset: u64,
        len: u32,
    },
}

enum Want {
    Protocol,
    Closed,
    Refused,
    Command(u32),
}

struct Case {
    name: &'static str,
    script: Vec<u8>,
    op: Op,
    want: Want,
    /// Text the error message must contain.
    mentions: &'static str,
}

fn cases() -> Vec<Case> {
    let read = Op::Read {
        offset: 0,
        len: 4096,
    };
    let bs = Op::BlockStatus {
        offset: 0,
        len: 8192,
    };
    let mut data_hdr_then_close = after_handshake(chunk(
        DONE,
        proto::REPLY_TYPE_OFFSET_DATA,
        1,
        8 + 4096,
        &be64(0),
    ));
    data_hdr_then_close.extend([0x11u8; 1000]);
    let mut error_body = proto::NBD_EPERM.to_be_bytes().to_vec();
    error_body.extend(13u16.to_be_bytes());
    error_body.extend_from_slice(b"go away, you!");
    let mut huge_name = proto::INFO_NAME.to_be_bytes().to_vec();
    huge_name.extend([b'x'; 16]);
    vec![
        Case {
            name: "wrong init magic",
            script: {
                let mut g = greeting(3);
                g[0] = b'X';
                g
            },
            op: Op::Connect,
            want: Want::Protocol,
            mentions: "NBDMAGIC",
        },
        Case {
            name: "wrong option reply magic",
            script: {
                let mut v = greeting(3);
                let mut r = opt_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, 0, &[]);
                r[7] ^= 0xff;
                v.extend(r);
                v
            },
            op: Op::Connect,
            want: Want::Protocol,
            mentions: "option reply has magic",
        },
        Case {
            name: "oversized option reply length",
            script: {
                let mut v = greeting(3);
                v.extend(opt_reply(
                    proto::OPT_STRUCTURED_REPLY,
                    proto::REP_ACK,
                    0x4000_0000,
                    &[],
                ));
                v
            },
            op: Op::Connect,
            want: Want::Protocol,
            mentions: "1073741824 bytes long",
        },
        Case {
            name: "oversized export-info string",
            script: {
                let mut v = handshake_until_go();
                v.extend(opt_reply(
                    proto::OPT_GO,
                    proto::REP_INFO,
                    2 + 1_000_000,
                    &huge_name,
                ));
                v
            },
            op: Op::Connect,
            want: Want::Protocol,
            mentions: "1000002 bytes long",
        },
        Case {
            name: "close in the middle of the handshake",
            script: {
                let mut v = handshake_until_go();
                v.extend(&info_export()[..15]);
                v
            },
            op: Op::Connect,
            want: Want::Closed,
            mentions: "handshake",
        },
        Case {
            name: "export refused with a message",
            script: {
                let mut v = handshake_until_go();
                v.extend(opt_reply(
                    proto::OPT_GO,
                    proto::REP_ERR_UNKNOWN,
                    16,
                    b"no such export!!",
                ));
                v
            },
            op: Op::Connect,
            want: Want::Refused,
            mentions: "no such export!!",
        },
        Case {
            name: "GO without export info",
            script: {
                let mut v = handshake_until_go();
                v.extend(opt_reply(proto::OPT_GO, proto::REP_ACK, 0, &[]));
                v
            },
            op: Op::Connect,
            want: Want::Protocol,
            mentions: "NBD_INFO_EXPORT",
        },
        Case {
            name: "wrong reply magic",
            script: after_handshake({
                let mut r = proto::encode_simple_reply(0, 1).to_vec();
                r[0] = 0x12;
                r
            }),
            op: read,
            want: Want::Protocol,
            mentions: "neither simple",
        },
        Case {
            name: "unknown cookie",
            script: after_handshake(chunk(DONE, proto::REPLY_TYPE_NONE, 77, 0, &[])),
            op: read,
            want: Want::Protocol,
            mentions: "unknown cookie 77",
        },
        Case {
            name: "oversized structured chunk length",
            script: after_handshake(chunk(
                DONE,
                proto::REPLY_TYPE_BLOCK_STATUS,
                1,
                0xffff_0000,
                &[],
            )),
            op: bs,
            want: Want::Protocol,
            mentions: "payload limit",
        },
        Case {
            name: "OFFSET_DATA outside the read request",
            script: after_handshake(chunk(
                DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                1,
                8 + 4096,
                &be64(4096),
            )),
            op: read,
            want: Want::Protocol,
            mentions: "outside the request",
        },
        Case {
            name: "block-status extents past the request",
            script: after_handshake({
                let e = extents(1, &[(8192, 0), (4096, 3)]);
                chunk(DONE, proto::REPLY_TYPE_BLOCK_STATUS, 1, e.len() as u32, &e)
            }),
            op: bs,
            want: Want::Protocol,
            mentions: "past the end of the request",
        },
        Case {
            name: "zero-length extent",
            script: after_handshake({
                let e = extents(1, &[(4096, 0), (0, 3)]);
                chunk(DONE, proto::REPLY_TYPE_BLOCK_STATUS, 1, e.len() as u32, &e)
            }),
            op: bs,
            want: Want::Protocol,
            mentions: "zero-length extent",
        },
        Case {
            name: "block status for a context never negotiated",
            script: after_handshake({
                let e = extents(9, &[(4096, 0)]);
                chunk(DONE, proto::REPLY_TYPE_BLOCK_STATUS, 1, e.len() as u32, &e)
            }),
            op: bs,
            want: Want::Protocol,
            mentions: "not negotiated",
        },
        Case {
            name: "close in the middle of a reply",
            script: data_hdr_then_close,
            op: read,
            want: Want::Closed,
            mentions: "middle of a reply",
        },
        Case {
            name: "READ done without all its bytes",
            script: after_handshake(chunk(DONE, proto::REPLY_TYPE_OFFSET_HOLE, 1, 12, &{
                let mut b = be64(0);
                b.extend(1024u32.to_be_bytes());
                b
            })),
            op: read,
            want: Want::Protocol,
            mentions: "only 1024 of its bytes",
        },
        Case {
            name: "hole chunk in a block-status reply",
            script: after_handshake(chunk(DONE, proto::REPLY_TYPE_OFFSET_HOLE, 1, 12, &{
                let mut b = be64(0);
                b.extend(1024u32.to_be_bytes());
                b
            })),
            op: bs,
            want: Want::Protocol,
            mentions: "OFFSET_HOLE chunk in the reply to BLOCK_STATUS",
        },
        Case {
            name: "structured error reply",
            script: after_handshake(chunk(
                DONE,
                proto::REPLY_TYPE_ERROR,
                1,
                error_body.len() as u32,
                &error_body,
            )),
            op: read,
            want: Want::Command(proto::NBD_EPERM),
            mentions: "go away, you!",
        },
        Case {
            name: "error message longer than its chunk",
            script: after_handshake({
                let mut b = proto::NBD_EIO.to_be_bytes().to_vec();
                b.extend(500u16.to_be_bytes());
                b.extend([b'a'; 10]);
                chunk(DONE, proto::REPLY_TYPE_ERROR, 1, b.len() as u32, &b)
            }),
            op: read,
            want: Want::Protocol,
            mentions: "does not fit",
        },
        Case {
            name: "simple error reply",
            script: after_handshake(proto::encode_simple_reply(proto::NBD_ENOSPC, 1).to_vec()),
            op: read,
            want: Want::Command(proto::NBD_ENOSPC),
            mentions: "ENOSPC",
        },
    ]
}

/// Serve `script` on `server`: send it all, close our sending side, then
/// swallow whatever the client sends until it goes away.
fn play(mut server: UnixStream, script: Vec<u8>) {
    let _ = server.write_all(&script);
    let _ = server.shutdown(Shutdown::Write);
    server.set_read_timeout(Some(CASE_TIMEOUT)).unwrap();
    let mut sink = [0u8; 4096];
    while let Ok(n) = server.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

fn run_op(client_end: UnixStream, op: Op) -> Result<(), NbdError> {
    let mut c = Client::connect(client_end, "", &["base:allocation"])?;
    match op {
        Op::Connect => panic!("handshake succeeded"),
        Op::Read { offset, len } => c.read(offset, &mut vec![0u8; len]),
        Op::BlockStatus { offset, len } => c.block_status(offset, len, "base:allocation").map(drop),
    }
}

#[test]
fn hostile_server_cases_end_in_clean_errors() {
    let mut failures = Vec::new();
    for case in cases() {
        let (client_end, server_end) = UnixStream::pair().unwrap();
        client_end.set_read_timeout(Some(CASE_TIMEOUT)).unwrap();
        client_end.set_write_timeout(Some(CASE_TIMEOUT)).unwrap();
        let script = case.script;
        let server = std::thread::spawn(move || play(server_end, script));
        let started = Instant::now();
        let result = std::panic::catch_unwind(|| run_op(client_end, case.op));
        let elapsed = started.elapsed();
        server.join().unwrap();
        let err = match result {
            Err(_) => {
                failures.push(format!("{}: client panicked", case.name));
                continue;
            }
            Ok(Ok(())) => {
                failures.push(format!("{}: no error", case.name));
                continue;
            }
            Ok(Err(e)) => e,
        };
        let variant_ok = match (&case.want, &err) {
            (Want::Protocol, NbdError::Protocol(_)) => true,
            (Want::Closed, NbdError::Closed(_)) => true,
            (Want::Refused, NbdError::Refused { .. }) => true,
            (Want::Command(want), NbdError::Command { errno, .. }) => want == errno,
            _ => false,
        };
        let text = err.to_string();
        if !variant_ok || !text.contains(case.mentions) {
            failures.push(format!(
                "{}: got {err:?} ({text}), want it to mention {:?}",
                case.name, case.mentions
            ));
        }
        if elapsed >= CASE_TIMEOUT {
            failures.push(format!(
                "{}: took {elapsed:?} (a hang ended by the timeout)",
                case.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "hostile cases failed:\n{}",
        failures.join("\n")
    );
}
