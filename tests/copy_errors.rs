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
        let out = copy(
            &srv.uri(),
            dst.to_str().unwrap(),
            e,
            &["--json", "--chunk-size", "256k"],
        );
        assert_eq!(out.status.code(), Some(3), "{e}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("reading the source"),
            "{}",
            stderr(&out)
        );
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
