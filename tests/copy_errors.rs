//! Failures end with a clear message and a non-zero exit, and never with
//! invented data on the target.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn source_read_errors_fail_the_copy() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 16 * MIB as usize, 5);
    let srv = nbdkit(
        d.path(),
        "err",
        &[
            "--filter=error",
            "file",
            src.to_str().unwrap(),
            "error-pread-rate=0.5",
            "error=EIO",
        ],
    );
    for e in ENGINES {
        let dst = d.path().join(format!("dst-{e}.img"));
        // Retries off: the first error fails the job (with retries, a 50 %
        // error rate lets most copies through).
        let out = copy(
            &srv.uri(),
            dst.to_str().unwrap(),
            e,
            &["--json", "--chunk-size", "256k", "--read-retries", "0"],
        );
        assert_eq!(out.status.code(), Some(3), "{e}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("reading the source"),
            "{}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("retries are off"), "{}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !stdout.contains("\"done\""),
            "a done event was printed: {stdout}"
        );
        // Whatever reached the target is source data, never invented bytes:
        // every 64 KiB block is either untouched (zero) or equal to the source.
        let s = std::fs::read(&src).unwrap();
        let t = std::fs::read(&dst).unwrap();
        for (i, (a, b)) in s.chunks(65536).zip(t.chunks(65536)).enumerate() {
            assert!(
                b.iter().all(|&x| x == 0) || a == b,
                "block {i} holds bytes that are not the source's"
            );
        }
    }
}

/// Every 64 KiB block of `target` is either zero (never written) or equal
/// to the same block of `source`: nothing invented reached the target.
fn assert_only_source_data(source: &std::path::Path, target: &std::path::Path) {
    let s = std::fs::read(source).unwrap();
    let t = std::fs::read(target).unwrap();
    for (i, (a, b)) in s.chunks(65536).zip(t.chunks(65536)).enumerate() {
        assert!(
            b.iter().all(|&x| x == 0) || a == b,
            "block {i} holds bytes that are not the source's"
        );
    }
}

#[test]
fn source_reads_are_retried_until_they_pass() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 4 * MIB as usize, 11);
    // Every read fails with EIO on its first attempt and succeeds on the
    // next: the retries are counted exactly.
    let seen = d.path().join("seen");
    std::fs::create_dir(&seen).unwrap();
    let (s, m) = (src.to_str().unwrap(), seen.to_str().unwrap());
    let pread = format!(
        "pread=if [ -e {m}/$4 ]; then dd if={s} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none; \
         else touch {m}/$4; echo EIO injected >&2; exit 1; fi"
    );
    let srv = nbdkit(
        d.path(),
        "once",
        &["eval", &format!("get_size=echo {}", 4 * MIB), &pread],
    );
    for e in ENGINES {
        for f in std::fs::read_dir(&seen).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        let dst = d.path().join(format!("dst-{e}.img"));
        let out = copy_ok(
            &srv.uri(),
            dst.to_str().unwrap(),
            e,
            &["--json", "--chunk-size", "256k"],
        );
        assert_same(&src, &dst);
        let done = last_json(&out);
        assert_eq!(done["event"], "done", "{done}");
        assert_eq!(done["read_retries"], 16, "{e}: one retry per read: {done}");
        assert!(
            stderr(&out).contains("retry 1 of 3"),
            "{e}: no retry was logged: {}",
            stderr(&out)
        );
    }
}

#[test]
fn flaky_source_reads_are_retried() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 4 * MIB as usize, 12);
    let srv = nbdkit(
        d.path(),
        "flaky",
        &[
            "--filter=error",
            "file",
            src.to_str().unwrap(),
            "error-pread=EIO",
            "error-pread-rate=20%",
        ],
    );
    for e in ENGINES {
        let dst = d.path().join(format!("dst-{e}.img"));
        // 64 reads of 64 KiB: the chance that none fails is 0.8^64 (< 1e-6),
        // that one fails 11 times in a row 64 × 0.2^11 (< 2e-6).
        let out = copy_ok(
            &srv.uri(),
            dst.to_str().unwrap(),
            e,
            &["--json", "--chunk-size", "64k", "--read-retries", "10"],
        );
        assert_same(&src, &dst);
        let done = last_json(&out);
        assert_eq!(done["event"], "done", "{done}");
        assert!(
            done["read_retries"].as_u64().unwrap() > 0,
            "{e}: no retries counted: {done}"
        );
    }
}

#[test]
fn source_reads_that_keep_failing_fail_the_copy() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 2 * MIB as usize, 13);
    let srv = nbdkit(
        d.path(),
        "broken",
        &[
            "--filter=error",
            "file",
            src.to_str().unwrap(),
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    for e in ENGINES {
        let dst = d.path().join(format!("dst-{e}.img"));
        let started = std::time::Instant::now();
        let out = copy(
            &srv.uri(),
            dst.to_str().unwrap(),
            e,
            &["--json", "--chunk-size", "256k"],
        );
        assert_eq!(out.status.code(), Some(3), "{e}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("reading the source failed at offset"), "{err}");
        assert!(err.contains("on all 4 attempts"), "{err}");
        assert!(err.contains("EIO"), "{err}");
        assert!(err.contains("retry 3 of 3"), "{err}");
        // The backoff (50 + 200 + 800 ms) really was waited for.
        assert!(started.elapsed() >= std::time::Duration::from_millis(1050));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!stdout.contains("\"done\""), "a done event: {stdout}");
        // No read ever succeeded, so nothing at all was written.
        assert!(
            std::fs::read(&dst).unwrap().iter().all(|&b| b == 0),
            "{e}: the target holds data although no read succeeded"
        );
        assert_eq!(allocated(&dst), 0, "{e}: blocks were written");
    }
}

#[test]
fn source_read_errors_that_will_not_pass_are_not_retried() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 2 * MIB as usize, 14);
    let srv = nbdkit(
        d.path(),
        "eperm",
        &[
            "--filter=error",
            "file",
            src.to_str().unwrap(),
            "error-pread=EPERM",
            "error-pread-rate=100%",
        ],
    );
    for e in ENGINES {
        let dst = d.path().join(format!("dst-{e}.img"));
        let out = copy(&srv.uri(), dst.to_str().unwrap(), e, &[]);
        assert_eq!(out.status.code(), Some(3), "{e}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("answered EPERM"), "{err}");
        assert!(err.contains("not retried"), "{err}");
        assert!(!err.contains("retry 1 of"), "{e}: EPERM was retried: {err}");
        assert_only_source_data(&src, &dst);
    }
}

#[test]
fn target_write_errors_fail_the_copy() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 8 * MIB as usize, 6);
    let srv = nbdkit(
        d.path(),
        "tgt",
        &[
            "--filter=error",
            "memory",
            "size=8M",
            "error-pwrite-rate=0.5",
            "error=ENOSPC",
        ],
    );
    for e in ENGINES {
        let out = copy(
            src.to_str().unwrap(),
            &srv.uri(),
            e,
            &["--chunk-size", "256k"],
        );
        assert_eq!(out.status.code(), Some(4), "{e}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("writing the target"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn flush_errors_fail_the_copy() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 2 * MIB as usize, 8);
    // nbdkit's error filter cannot fail flushes in every version: use the
    // eval plugin over a real file, whose flush always fails with EIO.
    let back = d.path().join("back.img");
    std::fs::File::create(&back)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let b = back.to_str().unwrap();
    let pread =
        format!("pread=dd if={b} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none");
    let pwrite = format!("pwrite=dd of={b} seek=$4 oflag=seek_bytes conv=notrunc status=none");
    let srv = nbdkit(
        d.path(),
        "tgt",
        &[
            "eval",
            "get_size=echo 2097152",
            &pread,
            &pwrite,
            "can_write=exit 0",
            "can_flush=exit 0",
            "flush=echo EIO injected >&2; exit 1",
        ],
    );
    let out = copy(src.to_str().unwrap(), &srv.uri(), "uring", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("NOT durable"), "{}", stderr(&out));
}

#[test]
fn small_nbd_target_is_refused_before_writing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 4 * MIB as usize, 9);
    let tgt = d.path().join("small.img");
    std::fs::File::create(&tgt).unwrap().set_len(MIB).unwrap();
    let srv = qemu_nbd(d.path(), "small", &tgt, "raw", false, &[]);
    let out = copy(src.to_str().unwrap(), &srv.uri(), "uring", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("smaller than the source"),
        "{}",
        stderr(&out)
    );
    drop(srv);
    assert_eq!(
        allocated(&tgt),
        0,
        "something was written to the small target"
    );
}

#[test]
fn bad_arguments_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let dst = d.path().join("x.img");
    let cases: [(&str, i32, &str); 4] = [
        ("nbd+unix:///?sock=/nope", 2, "sock"),
        ("/definitely/not/here.img", 3, "/definitely/not/here.img"),
        (
            "nbd+unix:///?socket=/nonexistent/dir/s.sock",
            3,
            "/nonexistent/dir/s.sock",
        ),
        ("ftp://example/disk", 2, "ftp"),
    ];
    for (src, code, needle) in cases {
        let out = copy(src, dst.to_str().unwrap(), "uring", &[]);
        assert_eq!(out.status.code(), Some(code), "{src}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(needle),
            "{src}: message {:?} lacks {needle:?}",
            stderr(&out)
        );
        assert_eq!(
            stderr(&out).lines().count(),
            1,
            "not a one-line error: {}",
            stderr(&out)
        );
    }
    assert!(
        !dst.exists(),
        "the target was created although the source was bad"
    );
}

#[test]
fn server_that_dies_mid_copy_fails_cleanly() {
    let d = tempfile::tempdir().unwrap();
    // A slow source (nbdkit delay filter) killed while the copy runs.
    let mut srv = nbdkit(
        d.path(),
        "slow",
        &["--filter=delay", "pattern", "size=64M", "rdelay=50ms"],
    );
    let dst = d.path().join("dst.img");
    let child = diskferry()
        .args([
            "copy",
            &srv.uri(),
            dst.to_str().unwrap(),
            "--no-progress",
            "--chunk-size",
            "256k",
            "--requests",
            "1",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    srv.child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

#[test]
fn a_full_target_file_system_fails_the_copy_and_a_rerun_after_growing_it_completes() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, 64 * MIB as usize, 9);
    // The target lives on a 16 MiB tmpfs: a quarter of the source fits.
    let fs = Tmpfs::mount(&d.path().join("small"), "16m")
        .unwrap_or_else(|why| panic!("cannot mount a tmpfs ({why}); the tests run as root"));
    for e in ENGINES {
        let dst = d.path().join("small").join(format!("dst-{e}.img"));
        let out = copy(src.to_str().unwrap(), dst.to_str().unwrap(), e, &["--json"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{e}: {err}");
        assert!(
            err.to_lowercase().contains("no space"),
            "{e}: the message does not say the target is full: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{e}: not one line: {err}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !stdout.contains("\"done\""),
            "{e}: a done event was printed: {stdout}"
        );
        assert_only_source_data(&src, &dst);
        std::fs::remove_file(&dst).unwrap();
    }
    fs.resize("128m");
    for e in ENGINES {
        let dst = d.path().join("small").join(format!("dst-{e}.img"));
        copy_ok(src.to_str().unwrap(), dst.to_str().unwrap(), e, &[]);
        assert_same(&src, &dst);
        std::fs::remove_file(&dst).unwrap();
    }
}
