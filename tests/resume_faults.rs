//! Resume and fault tolerance of `diskferry send` → `diskferry serve`, end
//! to end with the real binary: streams reset, stalled and corrupted by a
//! fault proxy, a corrupted chunk caught by the receiver's digest check, a
//! full target file system, a failing source, a receiver stopped and
//! restarted, a receiver that never comes back. Every test ends with a
//! byte comparison of source and target and prints what it measured
//! (reconnects, bytes sent again, durations): run with `--nocapture`.
//!
//! Sources are small (≤ 160 MiB) and sends are slowed with `--rate` so a
//! fault lands while data flows; faults are injected only after the test
//! has seen progress (bytes through the proxy, or on the target).

mod common;
#[path = "support/faultproxy.rs"]
mod faultproxy;
#[path = "support/rx.rs"]
mod rx;

use common::*;
use faultproxy::{Direction, FaultProxy};
use rx::{Bg, Rng, Rx, done, stderr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Size of the sparse sources.
const SOURCE_BYTES: u64 = 160 * MIB;
/// Data regions in a sparse source, each this long.
const REGIONS: u64 = 8;
const REGION_BYTES: u64 = 12 * MIB;
/// Slow enough that ~96 MiB of data take ~1.6 s: faults land mid-transfer.
const RATE: &str = "60M";
/// Progress seen before a fault is injected.
const FAULT_AFTER_BYTES: u64 = 16 * MIB;
/// Longest a send in these tests may take.
const SEND_LIMIT: Duration = Duration::from_secs(40);

/// Tests in this file load both cores and time things: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A sparse source of [`SOURCE_BYTES`] with [`REGIONS`] random data
/// regions, one in each 20 MiB slot at a seeded MiB offset.
fn sparse_source(dir: &Path, rng: &mut Rng) -> PathBuf {
    let p = dir.join("src.img");
    let slot = SOURCE_BYTES / REGIONS;
    let regions: Vec<(u64, usize)> = (0..REGIONS)
        .map(|i| {
            let shift = rng.range(0, (slot - REGION_BYTES) / MIB + 1) * MIB;
            (i * slot + shift, REGION_BYTES as usize)
        })
        .collect();
    sparse_file(&p, SOURCE_BYTES, &regions, rng.next());
    p
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Polls `cond` every 10 ms; panics after `limit` naming `what`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes allocated for `p` (0 while it does not exist).
fn allocated_or_zero(p: &Path) -> u64 {
    if p.exists() { allocated(p) } else { 0 }
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("done event has no {key}: {v}"))
}

/// Prints the figures of a `done` event a reader of `--nocapture` wants.
fn report(test: &str, d: &serde_json::Value, elapsed: Duration) {
    eprintln!(
        "{test}: exit 0 in {:.2} s; reconnects {}, rounds {}, bytes_resent {}, \
         bytes_resumed_skipped {}, resumed {}, bytes_written {}, bytes_on_wire {}",
        elapsed.as_secs_f64(),
        d["reconnects"],
        d["rounds"],
        d["bytes_resent"],
        d["bytes_resumed_skipped"],
        d["resumed"],
        d["bytes_written"],
        d["bytes_on_wire"],
    );
}

/// A failed send: not a success, no `done` event.
fn assert_failed(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}; stderr: {}",
        stderr(out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("\"event\":\"done\""),
        "a failed send printed a done event: {stdout}"
    );
}

/// The receiver never invents data: every byte of `dst` is the source's
/// byte at that offset, or zero (not written yet). Returns the bytes of
/// `dst` that hold source data other than zero.
fn assert_no_invented(src: &Path, dst: &Path) -> u64 {
    let s = std::fs::read(src).unwrap();
    let t = std::fs::read(dst).unwrap();
    assert_eq!(s.len(), t.len(), "target size differs from the source's");
    let mut present = 0u64;
    for (i, (a, b)) in s.iter().zip(&t).enumerate() {
        if b != a && *b != 0 {
            panic!(
                "target byte {i} is {b:#04x}: neither the source's {a:#04x} nor zero (invented data)"
            );
        }
        present += u64::from(*b != 0);
    }
    present
}

/// A send in the background through `to` (a proxy or the receiver).
fn send_bg(rx: &Rx, to: &str, src: &Path, target: &str, extra: &[&str]) -> Bg {
    Bg::spawn(rx.send_cmd_to(to, path_str(src), target, extra))
}

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

#[test]
fn full_target_fails_with_enospc_keeps_the_journal_and_resumes_after_growing() {
    let _g = serial();
    let test = "enospc";
    let mut rng = Rng::from_env(test);
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, (96 * MIB) as usize, rng.next());
    // The receiver's target root (Rx uses DIR/root) is a 48 MiB tmpfs; its
    // state directory stays on the normal disk. Declared before the
    // receiver, so the receiver is stopped before the unmount.
    let fs = Tmpfs::mount(&d.path().join("root"), "48m").unwrap_or_else(|why| {
        panic!("{test}: cannot mount a tmpfs ({why}); the tests run as root")
    });
    let rx = Rx::start(d.path(), &[]);
    let started = Instant::now();
    let out = rx.send(path_str(&src), "t", &[]);
    let err = stderr(&out);
    eprintln!(
        "{test}: send into 48 MiB ended with {} in {:.2} s: {}",
        out.status,
        started.elapsed().as_secs_f64(),
        err.trim()
    );
    assert_failed(&out, 4);
    let lower = err.to_lowercase();
    assert!(
        lower.contains("no space") || lower.contains("enospc"),
        "the message does not say the target is full: {err}"
    );
    // The journal is there and decodes (rx.journal panics otherwise).
    let journal = rx.journal("t");
    assert!(journal.is_some(), "the failed job left no journal");
    let durable = journal.as_ref().map_or(0, |j| j.durable.covered_bytes());
    eprintln!(
        "{test}: journal {} with {durable} durable bytes",
        if journal.is_some() {
            "present"
        } else {
            "absent"
        }
    );
    if let Some(j) = &journal {
        assert!(!j.complete, "a failed job's journal says complete");
        assert!(durable <= 48 * MIB, "more durable than the tmpfs holds");
    }
    assert_no_invented(&src, &rx.target("t"));

    fs.resize("256m");
    let started = Instant::now();
    let out = rx.send(path_str(&src), "t", &[]);
    let d_ev = done(&out);
    report(test, &d_ev, started.elapsed());
    if durable > 0 {
        assert!(
            d_ev["resumed"] == true || num(&d_ev, "bytes_resumed_skipped") > 0,
            "the journal held {durable} durable bytes but nothing was resumed: {d_ev}"
        );
    }
    assert_same(&src, &rx.target("t"));
}

#[test]
fn failing_source_exits_3_without_invented_data_and_a_rerun_completes() {
    let _g = serial();
    let test = "source_errors";
    let mut rng = Rng::from_env(test);
    let d = tempfile::tempdir().unwrap();
    let src = sparse_source(d.path(), &mut rng);
    // Reads fail (EIO) while the trigger file exists.
    let trigger = d.path().join("fail-reads");
    let srv = nbdkit(
        d.path(),
        "flaky",
        &[
            "--filter=error",
            "file",
            path_str(&src),
            "error-pread=EIO",
            "error-pread-rate=100%",
            &format!("error-file={}", trigger.display()),
        ],
    );
    let rx = Rx::start(d.path(), &[]);
    let target = rx.target("t");
    let started = Instant::now();
    let bg = send_bg(&rx, &rx.addr, Path::new(&srv.uri()), "t", &["--rate", RATE]);
    wait_until("data on the target", SEND_LIMIT, || {
        allocated_or_zero(&target) >= FAULT_AFTER_BYTES
    });
    std::fs::write(&trigger, b"").unwrap();
    let failing_since = Instant::now();
    let out = bg.wait(SEND_LIMIT);
    let err = stderr(&out);
    eprintln!(
        "{test}: source failing after {:.2} s; send ended {:.2} s later with {}: {}",
        (failing_since - started).as_secs_f64(),
        failing_since.elapsed().as_secs_f64(),
        out.status,
        err.trim()
    );
    assert_failed(&out, 3);
    assert!(err.contains("reading the source"), "{err}");
    assert!(err.contains("EIO"), "{err}");
    // Bounded: the read retries (50 + 200 + 800 ms) and the teardown.
    assert!(
        failing_since.elapsed() < Duration::from_secs(15),
        "the send took {:?} to give up",
        failing_since.elapsed()
    );
    let present = assert_no_invented(&src, &target);
    eprintln!("{test}: target holds {present} non-zero source bytes, none invented");

    std::fs::remove_file(&trigger).unwrap();
    let started = Instant::now();
    let out = rx.send(&srv.uri(), "t", &[]);
    let d_ev = done(&out);
    report(test, &d_ev, started.elapsed());
    assert_same(&src, &target);
}

#[test]
fn receiver_stopped_and_restarted_mid_transfer_the_send_carries_on() {
    let _g = serial();
    let test = "receiver_restart";
    let mut rng = Rng::from_env(test);
    let d = tempfile::tempdir().unwrap();
    let src = sparse_source(d.path(), &mut rng);
    let mut rx = Rx::start(d.path(), &["--checkpoint-interval", "500ms"]);
    let target = rx.target("t");
    let started = Instant::now();
    let bg = send_bg(
        &rx,
        &rx.addr.clone(),
        &src,
        "t",
        &[
            "--rate",
            RATE,
            "--stall-timeout",
            "3s",
            "--retry-for",
            "60s",
        ],
    );
    wait_until("data on the target", SEND_LIMIT, || {
        allocated_or_zero(&target) >= FAULT_AFTER_BYTES
    });
    let stop_at = Instant::now();
    rx.stop();
    let stopped_in = stop_at.elapsed();
    let journal = rx.journal("t");
    let durable = journal.as_ref().map_or(0, |j| j.durable.covered_bytes());
    std::thread::sleep(Duration::from_secs(1));
    rx.spawn();
    let out = bg.wait(SEND_LIMIT);
    let d_ev = done(&out);
    report(test, &d_ev, started.elapsed());
    eprintln!(
        "{test}: SIGTERM after {:.2} s took {:.2} s; journal at stop: {durable} durable bytes",
        (stop_at - started).as_secs_f64(),
        stopped_in.as_secs_f64()
    );
    assert!(
        num(&d_ev, "reconnects") >= 1,
        "no reconnect counted: {d_ev}\nstderr: {}",
        stderr(&out)
    );
    assert_same(&src, &target);
}

#[test]
fn receiver_gone_for_longer_than_retry_for_exits_6_and_a_rerun_completes() {
    let _g = serial();
    let test = "retry_for_expires";
    let mut rng = Rng::from_env(test);
    let d = tempfile::tempdir().unwrap();
    let src = sparse_source(d.path(), &mut rng);
    let mut rx = Rx::start(d.path(), &["--checkpoint-interval", "500ms"]);
    let target = rx.target("t");
    let bg = send_bg(
        &rx,
        &rx.addr.clone(),
        &src,
        "t",
        &["--rate", RATE, "--stall-timeout", "2s", "--retry-for", "2s"],
    );
    // Killed after the first checkpoint, so the rerun has a journal.
    wait_until("data on the target and in the journal", SEND_LIMIT, || {
        allocated_or_zero(&target) >= FAULT_AFTER_BYTES
            && rx.journal("t").is_some_and(|j| !j.durable.is_empty())
    });
    let killed_at = Instant::now();
    rx.kill9();
    let out = bg.wait(SEND_LIMIT);
    let gave_up_in = killed_at.elapsed();
    let err = stderr(&out);
    eprintln!(
        "{test}: receiver killed; send ended {:.2} s later with {}: {}",
        gave_up_in.as_secs_f64(),
        out.status,
        err.trim()
    );
    assert_failed(&out, 6);
    assert!(err.contains("resumable"), "{err}");
    // --retry-for 2 s + --stall-timeout 2 s + back-off and teardown.
    assert!(
        gave_up_in < Duration::from_secs(10),
        "gave up only after {gave_up_in:?}"
    );
    let present = assert_no_invented(&src, &target);
    let durable = rx.journal("t").map_or(0, |j| j.durable.covered_bytes());
    eprintln!("{test}: target holds {present} non-zero bytes; journal: {durable} durable bytes");

    rx.spawn();
    let started = Instant::now();
    let out = rx.send(path_str(&src), "t", &[]);
    let d_ev = done(&out);
    report(test, &d_ev, started.elapsed());
    if durable > 0 {
        assert!(
            d_ev["resumed"] == true || num(&d_ev, "bytes_resumed_skipped") > 0,
            "the journal held {durable} durable bytes but nothing was resumed: {d_ev}"
        );
    }
    assert_same(&src, &target);
}
