//! NBD transmission-phase codec throughput (`cargo bench --bench nbd_codec`).
//!
//! Drives the sans-IO [`ClientConn`] exactly as an engine does — encode
//! request headers, then hand it received bytes through `recv_target` /
//! `scratch_mut` / `advance` — but from an in-memory reply stream, so the
//! figure is the codec's own cost, with no socket in the way.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use diskferry::nbd::conn::{ClientConn, Cmd, RecvTarget, ReplyEvent};
use diskferry::nbd::handshake::ExportInfo;

// NBD protocol values (doc/proto.md in the NBD project); kept local so the
// bench does not depend on how `nbd::proto` names them.
const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const NBD_FLAG_SEND_DF: u16 = 1 << 7;
const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;

/// Requests per iteration: a realistic queue depth.
const REQUESTS: u64 = 64;
/// Bytes per READ: a common chunk size.
const READ_BYTES: u32 = 256 * 1024;

fn export_info(structured_replies: bool) -> ExportInfo {
    ExportInfo {
        size_bytes: 1 << 40,
        transmission_flags: NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_DF
            | NBD_FLAG_CAN_MULTI_CONN,
        block_min: 1,
        block_pref: 4096,
        block_max: 32 * 1024 * 1024,
        structured_replies,
        meta_contexts: Vec::new(),
    }
}

fn read_cmd(cookie: u64) -> Cmd {
    Cmd::Read {
        offset: cookie * u64::from(READ_BYTES),
        len: READ_BYTES,
    }
}

/// Which reply shape the server sends for every READ.
#[derive(Clone, Copy)]
enum Shape {
    /// Simple reply header followed by the data.
    Simple,
    /// One OFFSET_DATA chunk carrying all the data, flagged DONE.
    StructuredData,
    /// One OFFSET_HOLE chunk covering the whole read, flagged DONE.
    StructuredHole,
}

fn structured_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// The bytes a server would send in answer to `REQUESTS` reads.
fn reply_stream(shape: Shape) -> Vec<u8> {
    let mut out = Vec::new();
    for cookie in 0..REQUESTS {
        let offset = cookie * u64::from(READ_BYTES);
        match shape {
            Shape::Simple => {
                out.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                out.extend_from_slice(&cookie.to_be_bytes());
                out.resize(out.len() + READ_BYTES as usize, 0xa5);
            }
            Shape::StructuredData => {
                let len = 8 + READ_BYTES;
                structured_header(
                    &mut out,
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    len,
                );
                out.extend_from_slice(&offset.to_be_bytes());
                out.resize(out.len() + READ_BYTES as usize, 0xa5);
            }
            Shape::StructuredHole => {
                structured_header(
                    &mut out,
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_HOLE,
                    cookie,
                    12,
                );
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&READ_BYTES.to_be_bytes());
            }
        }
    }
    out
}

/// A connection with `REQUESTS` reads in flight.
fn conn_with_reads(info: &ExportInfo) -> ClientConn {
    let mut conn = ClientConn::new(info);
    let mut header = [0u8; 28];
    for cookie in 0..REQUESTS {
        conn.encode_request(cookie, read_cmd(cookie), &mut header)
            .expect("encode READ");
    }
    conn
}

/// Feed `stream` to `conn` the way an engine does; returns the number of
/// completed commands. Panics if the codec stops making progress.
fn drive(
    conn: &mut ClientConn,
    mut stream: &[u8],
    bufs: &mut [Vec<u8>],
    events: &mut Vec<ReplyEvent>,
) -> usize {
    let mut done = 0;
    // Every step consumes at least one byte, so this bounds the loop.
    let max_steps = stream.len() + 1;
    for _ in 0..max_steps {
        if stream.is_empty() {
            break;
        }
        let n = match conn.recv_target() {
            RecvTarget::Scratch { len } => {
                let scratch = conn.scratch_mut();
                let n = len.min(scratch.len()).min(stream.len());
                scratch[..n].copy_from_slice(&stream[..n]);
                n
            }
            RecvTarget::Payload {
                cookie,
                buf_offset,
                len,
            } => {
                let n = (len as usize).min(stream.len());
                let start = buf_offset as usize;
                bufs[cookie as usize][start..start + n].copy_from_slice(&stream[..n]);
                n
            }
        };
        assert!(n > 0, "codec asked for zero bytes");
        stream = &stream[n..];
        events.clear();
        conn.advance(n, events).expect("valid reply stream");
        for event in events.iter() {
            match event {
                ReplyEvent::Done { .. } => done += 1,
                ReplyEvent::Hole {
                    cookie,
                    buf_offset,
                    len,
                } => {
                    let start = *buf_offset as usize;
                    bufs[*cookie as usize][start..start + *len as usize].fill(0);
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
    assert!(stream.is_empty(), "codec did not consume the whole stream");
    done
}

fn bench_encode(c: &mut Criterion) {
    let info = export_info(true);
    let mut group = c.benchmark_group("nbd_encode");
    group.throughput(Throughput::Elements(REQUESTS));
    group.bench_function("64_reads", |b| {
        b.iter_batched(
            || ClientConn::new(&info),
            |mut conn| {
                let mut header = [0u8; 28];
                for cookie in 0..REQUESTS {
                    conn.encode_request(cookie, read_cmd(cookie), &mut header)
                        .expect("encode READ");
                    black_box(&header);
                }
                conn
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn bench_replies(c: &mut Criterion) {
    let mut group = c.benchmark_group("nbd_read_replies");
    group.throughput(Throughput::Bytes(REQUESTS * u64::from(READ_BYTES)));
    let cases = [
        ("simple_64x256KiB", Shape::Simple, false),
        ("structured_data_64x256KiB", Shape::StructuredData, true),
        ("structured_hole_64x256KiB", Shape::StructuredHole, true),
    ];
    for (name, shape, structured) in cases {
        let info = export_info(structured);
        let stream = reply_stream(shape);
        let mut bufs = vec![vec![0u8; READ_BYTES as usize]; REQUESTS as usize];
        let mut events = Vec::new();
        group.bench_function(name, |b| {
            b.iter_batched(
                || conn_with_reads(&info),
                |mut conn| {
                    let done = drive(&mut conn, black_box(&stream), &mut bufs, &mut events);
                    assert_eq!(done as u64, REQUESTS);
                    conn
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_encode, bench_replies);
criterion_main!(benches);
