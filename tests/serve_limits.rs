//! Authenticated but hostile senders, as raw peers over plaintext: a
//! verify pass only after DONE and bounded in memory, and range sets that
//! a flood of tiny frames cannot grow without bound.

mod serve_support;

use diskferry::wire::{ByteRange, Codec, ErrorCode, Frame};
use serve_support::*;

const MIB: u64 = 1 << 20;
/// The per-job range cap the cap tests run with.
const CAP: usize = 100;

fn zero(c: &mut Client, offset: u64, len_bytes: u64) {
    c.send(&Frame::Zero(ByteRange { offset, len_bytes }));
}

#[test]
fn verify_before_done_is_refused() {
    let h = Harness::start(true);
    let mut c = h.connect();
    c.welcome(&hello(1, "early.img", MIB, 0, 1));
    c.data(0, &random_bytes(MIB as usize, 1), Codec::None);
    c.send(&Frame::VerifyRequest {
        window_bytes: 64 * 1024,
    });
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::Protocol, "{message}");
    assert!(message.contains("before DONE"), "{message}");
}

#[test]
fn verify_in_32_mib_windows_reads_in_pieces_and_matches() {
    let h = Harness::start(true);
    let size_bytes = 40 * MIB + 4096;
    let mut image = vec![0u8; size_bytes as usize];
    let mut c = h.connect();
    c.welcome(&hello(2, "wide.img", size_bytes, 0, 1));
    // Data at the start, across a 1 MiB piece boundary, in the short last
    // window; holes in between.
    for (offset, seed) in [(0u64, 1u64), (3 * MIB, 2), (33 * MIB, 3), (40 * MIB, 4)] {
        let bytes = random_bytes(MIB as usize, seed);
        let len = bytes.len().min((size_bytes - offset) as usize);
        image[offset as usize..offset as usize + len].copy_from_slice(&bytes[..len]);
        c.data(offset, &bytes[..len], Codec::None);
    }
    let mut covered = 0u64;
    for (offset, len) in [(MIB, 2 * MIB), (4 * MIB, 29 * MIB), (34 * MIB, 6 * MIB)] {
        zero(&mut c, offset, len);
        covered += len;
    }
    assert_eq!(covered + 3 * MIB + 4096, size_bytes);
    c.barrier(1);
    c.done();
    let window_bytes = 32 * MIB as u32;
    c.send(&Frame::VerifyRequest { window_bytes });
    match c.recv() {
        Some(Frame::VerifyResult { digest, bytes_read }) => {
            assert_eq!(bytes_read, size_bytes);
            assert_eq!(digest, image_digest(&image, window_bytes));
        }
        other => panic!("expected VERIFY_RESULT, got {other:?}"),
    }
}

#[test]
fn scattered_tiny_frames_past_the_range_cap_end_the_job() {
    let h = Harness::start_with(true, |o| o.limits.max_ranges_per_job = CAP);
    let size_bytes = MIB;
    let mut watcher = h.connect();
    watcher.welcome(&hello(3, "scatter.img", size_bytes, 1, 2));
    let mut c = h.connect();
    c.welcome(&hello(3, "scatter.img", size_bytes, 0, 2));
    // Many frames that merge into one range are fine: the cap counts
    // ranges, not frames.
    for i in 0..(3 * CAP as u64) {
        zero(&mut c, i, 1);
    }
    assert_eq!(
        c.barrier(1).durable_added,
        vec![ByteRange {
            offset: 0,
            len_bytes: 3 * CAP as u64
        }]
    );
    // Then 1-byte frames a byte apart, ZERO and DATA in turn: one range
    // each, and the one past the cap ends the stream.
    let base = 4096u64;
    for i in 0..=(CAP as u64) {
        let offset = base + 2 * i;
        if i % 2 == 0 {
            zero(&mut c, offset, 1);
        } else {
            c.data(offset, &[0xA5], Codec::None);
        }
    }
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::Protocol, "{message}");
    assert!(
        message.contains(&format!("{} separate ranges", CAP + 1))
            && message.contains(&format!("({CAP})")),
        "{message}"
    );
    // The job failed: its other stream is ended with the same error.
    watcher.send(&Frame::Ping { nonce: 1 });
    let (code, other) = watcher.expect_error();
    assert_eq!((code, other), (ErrorCode::Protocol, message));
    // The receiver keeps serving other jobs.
    let mut next = h.connect();
    next.welcome(&hello(4, "next.img", MIB, 0, 1));
    next.data(0, &random_bytes(MIB as usize, 4), Codec::None);
    assert_eq!(next.barrier(1).bytes_durable_total, MIB);
}

#[test]
fn a_job_whose_durable_ranges_would_pass_the_cap_is_refused_at_a_barrier() {
    let h = Harness::start_with(true, |o| o.limits.max_ranges_per_job = CAP);
    let mut c = h.connect();
    c.welcome(&hello(5, "fragments.img", MIB, 0, 1));
    let burst = CAP as u64 * 3 / 5;
    for i in 0..burst {
        zero(&mut c, 2 * i, 1);
    }
    let ack = c.barrier(1);
    assert_eq!(ack.durable_added.len() as u64, burst);
    assert_eq!(ack.bytes_durable_total, burst);
    // Each burst is within the stream's cap, but together they pass the
    // job's.
    for i in 0..burst {
        zero(&mut c, 8192 + 2 * i, 1);
    }
    c.send(&Frame::Barrier { seq: 2 });
    let (code, message) = c.expect_error();
    assert_eq!(code, ErrorCode::Protocol, "{message}");
    assert!(
        message.contains(&format!("{} separate durable ranges", 2 * burst))
            && message.contains(&format!("({CAP} per job)")),
        "{message}"
    );
}
