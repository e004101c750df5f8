//! Resume and fault tolerance of `diskferry send` → `diskferry serve`, end
//! to end with the real binary: streams reset, stalled and corrupted by a
//! fault proxy, a corrupted chunk caught by the receiver's digest check.
//! A full target, a failing source and a receiver that goes away are in
//! `resume_outages.rs`; the helpers of both in `support/faulted.rs`. Every test ends with a
//! byte comparison of source and target and prints what it measured
//! (reconnects, bytes sent again, durations): run with `--nocapture`.
//!
//! Sources are small (≤ 160 MiB) and sends are slowed with `--rate` so a
//! fault lands while data flows; faults are injected only after the test
//! has seen progress (bytes through the proxy, or on the target).

mod common;
#[path = "support/faulted.rs"]
mod faulted;
#[path = "support/faultproxy.rs"]
mod faultproxy;
#[path = "support/rx.rs"]
mod rx;

use common::*;
use faulted::{
    FAULT_AFTER_BYTES, MIB, RATE, SEND_LIMIT, assert_failed, assert_no_invented, num, path_str,
    report, send_bg, serial, sparse_source, wait_until,
};
use faultproxy::{Direction, FaultProxy};
use rx::{Rng, Rx, done, stderr};
use std::time::{Duration, Instant};

/// A send through a proxy hit by `fault` once `FAULT_AFTER_BYTES` went
/// through; checks completion by itself and a byte-identical target.
fn proxied_fault(test: &str, extra: &[&str], fault: impl FnOnce(&FaultProxy, &mut Rng)) {
    let _g = serial();
    let mut rng = Rng::from_env(test);
    let d = tempfile::tempdir().unwrap();
    let src = sparse_source(d.path(), &mut rng);
    let rx = Rx::start(d.path(), &[]);
    let proxy = FaultProxy::start(rx.addr.parse().unwrap());
    let started = Instant::now();
    let mut args = vec!["--rate", RATE];
    args.extend_from_slice(extra);
    let bg = send_bg(&rx, &proxy.addr().to_string(), &src, "t", &args);
    wait_until("progress through the proxy", SEND_LIMIT, || {
        proxy.bytes_forwarded() >= FAULT_AFTER_BYTES
    });
    let fault_at = started.elapsed();
    fault(&proxy, &mut rng);
    let out = bg.wait(SEND_LIMIT);
    let d_ev = done(&out);
    report(test, &d_ev, started.elapsed());
    eprintln!(
        "{test}: fault at {:.2} s after {} MiB through the proxy; {} connections accepted, {} MiB forwarded",
        fault_at.as_secs_f64(),
        FAULT_AFTER_BYTES / MIB,
        proxy.connections(),
        proxy.bytes_forwarded() / MIB
    );
    assert!(
        num(&d_ev, "reconnects") >= 1,
        "no reconnect counted: {d_ev}\nstderr: {}",
        stderr(&out)
    );
    assert!(
        proxy.connections() > 4,
        "no new connection reached the proxy: {}",
        proxy.connections()
    );
    assert_eq!(d_ev["verified"], false);
    assert_same(&src, &rx.target("t"));
}

#[test]
fn one_stream_reset_mid_transfer_reconnects_and_completes() {
    proxied_fault(
        "one_stream_reset",
        &["--stall-timeout", "3s"],
        |proxy, rng| {
            let i = rng.range(0, 4) as usize;
            eprintln!("one_stream_reset: resetting connection {i}");
            proxy.reset_one(i);
        },
    );
}

#[test]
fn all_streams_reset_mid_transfer_reconnect_and_complete() {
    proxied_fault(
        "all_streams_reset",
        &["--stall-timeout", "3s"],
        |proxy, _| proxy.reset_all(),
    );
}

#[test]
fn stalled_link_longer_than_stall_timeout_reconnects_and_completes() {
    // The stall holds every connection of the proxy, new ones too: the
    // reconnects made during the stall get through once it ends.
    // A blocked write returns short counts before SO_SNDTIMEO fires and
    // starts over, so the sender's watchdog (no byte acknowledged by the
    // peer for --stall-timeout while busy) must be what cuts the streams.
    proxied_fault("stalled_link", &["--stall-timeout", "2s"], |proxy, _| {
        proxy.stall(true);
        std::thread::sleep(Duration::from_millis(3500));
        proxy.stall(false);
    });
}

#[test]
fn bit_flipped_in_a_tls_record_fails_that_stream_which_resumes() {
    let _g = serial();
    let test = "tls_bit_flip";
    let mut rng = Rng::from_env(test);
    let d = tempfile::tempdir().unwrap();
    let src = sparse_source(d.path(), &mut rng);
    let rx = Rx::start(d.path(), &[]);
    let proxy = FaultProxy::start(rx.addr.parse().unwrap());
    // The first connection (stream 0) carries a quarter of the ~96 MiB:
    // byte 5 MiB + a seeded bit of slack is well past the handshake.
    let flip_at = 5 * MIB + rng.range(0, MIB);
    proxy.flip_bit_after(flip_at, Direction::ClientToServer);
    let started = Instant::now();
    let bg = send_bg(
        &rx,
        &proxy.addr().to_string(),
        &src,
        "t",
        &["--rate", RATE, "--stall-timeout", "3s"],
    );
    let out = bg.wait(SEND_LIMIT);
    let d_ev = done(&out);
    report(test, &d_ev, started.elapsed());
    eprintln!(
        "{test}: flipped a bit at byte {flip_at} of connection 0; {} connections accepted",
        proxy.connections()
    );
    assert!(
        num(&d_ev, "reconnects") >= 1,
        "no reconnect counted: {d_ev}\nstderr: {}",
        stderr(&out)
    );
    assert!(proxy.connections() > 4, "no reconnection through the proxy");
    let log = rx.log_text();
    eprintln!(
        "{test}: receiver log lines mentioning the failure: {:?}",
        log.lines()
            .filter(|l| {
                let l = l.to_lowercase();
                l.contains("decrypt") || l.contains("tls") || l.contains("mac")
            })
            .take(3)
            .collect::<Vec<_>>()
    );
    assert_same(&src, &rx.target("t"));
}

#[test]
fn corrupted_chunk_is_refused_never_written_and_a_rerun_completes() {
    let _g = serial();
    let test = "corrupt_chunk";
    let mut rng = Rng::from_env(test);
    let d = tempfile::tempdir().unwrap();
    let src = sparse_source(d.path(), &mut rng);
    let rx = Rx::start(d.path(), &[]);
    let mut cmd = rx.send_cmd(path_str(&src), "t", &[]);
    cmd.env("DISKFERRY_TEST_CORRUPT_CHUNK", "3");
    let started = Instant::now();
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert!(
        err.contains("test hook armed"),
        "diskferry was built without the test-hooks feature, so DISKFERRY_TEST_CORRUPT_CHUNK did \
         nothing: run `cargo test --features test-hooks` (scripts/test does). stderr: {err}"
    );
    eprintln!(
        "{test}: corrupted send ended with {} in {:.2} s: {}",
        out.status,
        started.elapsed().as_secs_f64(),
        err.trim()
    );
    assert_failed(&out, 4);
    assert!(err.to_lowercase().contains("digest"), "{err}");
    let present = assert_no_invented(&src, &rx.target("t"));
    eprintln!(
        "{test}: after the refusal the target holds {present} non-zero source bytes, none invented"
    );
    // The refused chunk, as the receiver names it, was not written at all
    // (a flip of a 0x01 byte to 0x00 would pass the check above).
    if let Some((offset, len)) = refused_chunk(&err) {
        let t = std::fs::read(rx.target("t")).unwrap();
        let s = std::fs::read(&src).unwrap();
        let range = offset as usize..(offset + len) as usize;
        assert!(
            s[range.clone()].iter().any(|&b| b != 0),
            "refused chunk is a hole?"
        );
        assert!(
            t[range].iter().all(|&b| b == 0),
            "the refused chunk at {offset} ({len} bytes) was written"
        );
        eprintln!("{test}: refused chunk at {offset} ({len} bytes) is untouched on the target");
    } else {
        eprintln!("{test}: the message names no chunk; its range was not checked");
    }
    let durable = rx.journal("t").map_or(0, |j| j.durable.covered_bytes());
    let started = Instant::now();
    let out = rx.send(path_str(&src), "t", &[]);
    let d_ev = done(&out);
    report(test, &d_ev, started.elapsed());
    eprintln!("{test}: the journal held {durable} durable bytes before the rerun");
    if durable > 0 {
        assert!(
            d_ev["resumed"] == true || num(&d_ev, "bytes_resumed_skipped") > 0,
            "the journal held {durable} durable bytes but nothing was resumed: {d_ev}"
        );
    }
    assert_same(&src, &rx.target("t"));
}

/// `(offset, len)` of "chunk at offset N (L bytes)" in a refusal message.
fn refused_chunk(msg: &str) -> Option<(u64, u64)> {
    let rest = &msg[msg.find("chunk at offset ")? + "chunk at offset ".len()..];
    let (offset, rest) = rest.split_once(" (")?;
    let (len, _) = rest.split_once(" bytes)")?;
    Some((offset.parse().ok()?, len.parse().ok()?))
}
