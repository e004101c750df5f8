//! Resume of `diskferry send` → `diskferry serve` through outages, end to
//! end with the real binary: a full target file system, a failing source,
//! a receiver stopped and restarted, a receiver that never comes back.
//! Every test ends with a byte comparison of source and target and prints
//! what it measured (reconnects, bytes sent again, durations): run with
//! `--nocapture`. Faults on the link are in `resume_faults.rs`.
//!
//! Sources are small (≤ 160 MiB) and sends are slowed with `--rate` so a
//! fault lands while data flows; faults are injected only after the test
//! has seen progress (on the target).

mod common;
#[path = "support/faulted.rs"]
mod faulted;
#[path = "support/rx.rs"]
mod rx;

use common::*;
use faulted::{
    FAULT_AFTER_BYTES, MIB, RATE, SEND_LIMIT, allocated_or_zero, assert_failed, assert_no_invented,
    num, path_str, report, send_bg, serial, sparse_source, wait_until,
};
use rx::{Rng, Rx, done, stderr};
use std::path::Path;
use std::time::{Duration, Instant};

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
