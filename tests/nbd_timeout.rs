//! `--io-timeout`: an NBD server that accepts and then says nothing, or
//! stops answering reads or writes, fails the copy with a message naming the
//! server and the timeout, within a few seconds, on both engines: exit 3
//! when it is the source, 4 when it is the target, and nothing is written
//! for the window a source did not answer.

mod common;
#[path = "support/rx.rs"]
mod rx;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// Well within "a few seconds" for a 2 s timeout on a loaded machine.
const FAIL_WITHIN: Duration = Duration::from_secs(15);

/// `diskferry copy` killed (and the test failed) if it runs past
/// [`FAIL_WITHIN`]: a hang must fail the test, not stall the suite.
fn copy_bounded(src: &str, dst: &str, engine: &str, extra: &[&str]) -> Output {
    let mut cmd = diskferry();
    cmd.args(["copy", src, dst, "--io-engine", engine, "--no-progress"])
        .args(extra);
    rx::Bg::spawn(cmd).wait(FAIL_WITHIN)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Accept every connection on `listener` and never send a byte.
fn hold_silently<S: Send + 'static>(accept: impl Fn() -> std::io::Result<S> + Send + 'static) {
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok(conn) = accept() {
            held.push(conn);
        }
    });
}

/// A Unix socket whose server accepts and stays silent.
fn silent_unix(dir: &Path) -> String {
    let sock = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    hold_silently(move || listener.accept().map(|(c, _)| c));
    sock.display().to_string()
}

/// A loopback TCP port whose server accepts and stays silent.
fn silent_tcp() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    hold_silently(move || listener.accept().map(|(c, _)| c));
    addr
}

/// Exit `code` (3: the source, 4: the target), in time, naming `server`
/// and the 2 s timeout.
fn assert_timed_out(what: &str, out: &Output, elapsed: Duration, server: &str, code: i32) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{what}: {err}");
    assert!(elapsed < FAIL_WITHIN, "{what} took {elapsed:?}: {err}");
    assert!(
        err.contains(server) && err.contains("I/O timeout") && err.contains("2 s"),
        "{what}: the message should name {server} and the timeout: {err}"
    );
}

/// The target, if it was created, holds nothing but zeros.
fn assert_nothing_written(target: &Path) {
    if let Ok(bytes) = std::fs::read(target) {
        assert!(
            bytes.iter().all(|&b| b == 0),
            "data was written to {} for reads that never completed",
            target.display()
        );
    }
}

#[test]
fn a_server_that_never_greets_fails_the_copy_in_time() {
    let d = tempfile::tempdir().unwrap();
    let sock = silent_unix(d.path());
    let tcp = silent_tcp();
    for e in ENGINES {
        for (uri, server) in [
            (format!("nbd+unix:///?socket={sock}"), sock.clone()),
            (format!("nbd://{tcp}/"), tcp.clone()),
        ] {
            let target = d.path().join(format!("never-{e}.img"));
            let started = Instant::now();
            let out = copy_bounded(&uri, target.to_str().unwrap(), e, &["--io-timeout", "2s"]);
            assert_timed_out(
                &format!("copy {uri} ({e})"),
                &out,
                started.elapsed(),
                &server,
                3,
            );
            assert!(
                !target.exists(),
                "no target may be made for a source that never opened"
            );
        }
    }
}

#[test]
fn a_silent_target_fails_the_copy_in_time_with_exit_4() {
    let d = tempfile::tempdir().unwrap();
    let sock = silent_unix(d.path());
    let tcp = silent_tcp();
    let src = d.path().join("src.img");
    sparse_file(&src, 4 << 20, &[(0, 100_000)], 2);
    for e in ENGINES {
        for (uri, server) in [
            (format!("nbd+unix:///?socket={sock}"), sock.clone()),
            (format!("nbd://{tcp}/"), tcp.clone()),
        ] {
            let started = Instant::now();
            let out = copy_bounded(src.to_str().unwrap(), &uri, e, &["--io-timeout", "2s"]);
            let what = format!("copy to {uri} ({e})");
            assert_timed_out(&what, &out, started.elapsed(), &server, 4);
        }
    }
}

/// nbdkit's memory plugin whose writes each take 30 s: the handshake
/// goes through, then the target stops answering.
#[test]
fn a_target_that_stops_answering_writes_fails_the_copy_with_exit_4() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    sparse_file(&src, 8 << 20, &[(0, 1 << 20), (5 << 20, 300_000)], 3);
    for e in ENGINES {
        // One server per run, as for the stalled reads below.
        let server = nbdkit(
            d.path(),
            &format!("stalled-writes-{e}"),
            &["--filter=delay", "memory", "size=8M", "delay-write=30"],
        );
        let sock = server.sock.display().to_string();
        let started = Instant::now();
        let out = copy_bounded(
            src.to_str().unwrap(),
            &server.uri(),
            e,
            &["--io-timeout", "2s"],
        );
        let elapsed = started.elapsed();
        assert_timed_out(&format!("copy ({e})"), &out, elapsed, &sock, 4);
        assert!(
            stderr(&out).contains("no reply"),
            "the handshake went through; the writes must be what timed out: {}",
            stderr(&out)
        );
        assert!(
            elapsed >= Duration::from_secs(2),
            "failed before the timeout: {elapsed:?}"
        );
    }
}

/// nbdkit serving a 64 MiB pattern (all data) whose reads each take 30 s.
/// One per client run: nbdkit 1.32 may abort (`raw_send_socket: Assertion
/// sock >= 0 failed`) when a client shuts down its connections while a
/// delayed read sleeps.
fn stalled_reads(dir: &Path, name: &str) -> Server {
    nbdkit(
        dir,
        name,
        &["--filter=delay", "pattern", "size=64M", "delay-read=30"],
    )
}

#[test]
fn a_server_that_stops_answering_reads_fails_the_copy_in_time() {
    let d = tempfile::tempdir().unwrap();
    for e in ENGINES {
        let server = stalled_reads(d.path(), &format!("stalled-{e}"));
        let sock = server.sock.display().to_string();
        let target = d.path().join(format!("stalled-{e}.img"));
        let started = Instant::now();
        let out = copy_bounded(
            &server.uri(),
            target.to_str().unwrap(),
            e,
            &["--io-timeout", "2s"],
        );
        let elapsed = started.elapsed();
        assert_timed_out(&format!("copy ({e})"), &out, elapsed, &sock, 3);
        assert!(
            stderr(&out).contains("no reply"),
            "the handshake went through; the reads must be what timed out: {}",
            stderr(&out)
        );
        assert!(
            elapsed >= Duration::from_secs(2),
            "failed before the timeout: {elapsed:?}"
        );
        assert_nothing_written(&target);
    }
}

#[test]
fn send_fails_in_time_on_a_silent_or_stalled_source() {
    let d = tempfile::tempdir().unwrap();
    let rx = rx::Rx::start(&d.path().join("rx"), &[]);
    let sock = silent_unix(d.path());
    for e in ENGINES {
        // (extra flags, what timed out: the blocking client's "did not
        // answer", or the worker's watchdog's "no reply").
        let cases: [(&[&str], &str); 3] = [
            // The handshake.
            (&[], "did not answer"),
            // A fixed identity: the workers' reads stall, not the sampling.
            (&["--source-id", "fixed"], "no reply"),
            // The identity's sampled reads (the blocking client) stall.
            (&[], "did not answer"),
        ];
        for (i, (extra, why)) in cases.into_iter().enumerate() {
            let server = stalled_reads(d.path(), &format!("stalled-{e}-{i}"));
            let (uri, name) = if i == 0 {
                (format!("nbd+unix:///?socket={sock}"), sock.clone())
            } else {
                (server.uri(), server.sock.display().to_string())
            };
            let target = format!("t-{e}-{i}.img");
            let mut args = vec!["--io-engine", e, "--io-timeout", "2s"];
            args.extend(extra);
            let started = Instant::now();
            let out = rx::Bg::spawn(rx.send_cmd(&uri, &target, &args)).wait(FAIL_WITHIN);
            assert_timed_out(
                &format!("send {uri} ({e}, case {i})"),
                &out,
                started.elapsed(),
                &name,
                3,
            );
            assert!(stderr(&out).contains(why), "case {i}: {}", stderr(&out));
            assert_nothing_written(&rx.target(&target));
        }
    }
}

#[test]
fn a_zero_io_timeout_is_a_usage_error() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    sparse_file(&src, 1 << 20, &[(0, 4096)], 1);
    let dst = d.path().join("dst.img");
    let out = copy_bounded(
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "uring",
        &["--io-timeout", "0s"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--io-timeout"), "{}", stderr(&out));
}
