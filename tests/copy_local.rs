//! `diskferry copy` end to end against real qemu-nbd and nbdkit servers and
//! real files, on both I/O engines. Every case compares the target byte for
//! byte with the source and checks that holes stayed holes. How a copy
//! uses the machine (cores, cache, queue depth, lanes) is in `copy_tuning.rs`.

mod common;

use common::*;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Source regions used by several tests: data at odd places incl. the tail.
fn regions(size: u64) -> Vec<(u64, usize)> {
    vec![
        (0, 4096),
        (3 * MIB + 17, 200_000),
        (40 * MIB, 5 * MIB as usize),
        (size - 5000, 5000),
    ]
}

fn data_len(r: &[(u64, usize)]) -> u64 {
    r.iter().map(|&(_, l)| l as u64).sum()
}

/// The target is identical and not much more allocated than the data.
fn check_copy(src: &Path, dst: &Path, data_bytes: u64) {
    assert_same(src, dst);
    let alloc = allocated(dst);
    assert!(
        alloc <= data_bytes + 2 * MIB,
        "target {} has {alloc} bytes allocated for {data_bytes} bytes of data: holes were filled",
        dst.display()
    );
}

#[test]
fn file_to_file_odd_size_sparse() {
    let d = tempfile::tempdir().unwrap();
    let size = 1024 * MIB + 4097;
    let src = d.path().join("src.img");
    let r = regions(size);
    sparse_file(&src, size, &r, 1);
    for e in ENGINES {
        let dst = d.path().join(format!("dst-{e}.img"));
        let out = copy_ok(src.to_str().unwrap(), dst.to_str().unwrap(), e, &["--json"]);
        check_copy(&src, &dst, data_len(&r));
        let done = last_json(&out);
        assert_eq!(done["event"], "done");
        assert_eq!(done["engine"], e);
        // The plan covers the data blocks (fs-block rounded), not the capacity.
        let planned = done["bytes_planned"].as_u64().unwrap();
        assert!(
            planned >= data_len(&r) && planned < data_len(&r) + MIB,
            "planned {planned}"
        );
        assert_eq!(done["bytes_read"].as_u64().unwrap(), planned);
        for k in ["bytes_written", "bytes_zeroed", "elapsed_s"] {
            assert!(done[k].is_number(), "done event lacks {k}: {done}");
        }
    }
}

#[test]
fn qemu_nbd_source_to_file() {
    let d = tempfile::tempdir().unwrap();
    let size = 96 * MIB + 512;
    let src = d.path().join("src.img");
    let r = regions(size);
    sparse_file(&src, size, &r, 2);
    let srv = qemu_nbd(d.path(), "src", &src, "raw", true, &[]);
    for e in ENGINES {
        let dst = d.path().join(format!("dst-{e}.img"));
        copy_ok(&srv.uri(), dst.to_str().unwrap(), e, &[]);
        check_copy(&src, &dst, data_len(&r));
    }
}

#[test]
fn all_hole_all_zero_and_dense_files() {
    let d = tempfile::tempdir().unwrap();
    let hole = d.path().join("hole.img");
    std::fs::File::create(&hole)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let zero = d.path().join("zero.img");
    write_at(&zero, 0, &vec![0u8; 32 * MIB as usize]);
    let dense = d.path().join("dense.img");
    dense_file(&dense, 48 * MIB as usize + 3, 7);
    for e in ENGINES {
        for (src, data) in [(&hole, 0), (&zero, 0), (&dense, 48 * MIB + 3)] {
            let dst = d.path().join(format!("out-{e}.img"));
            let out = copy_ok(src.to_str().unwrap(), dst.to_str().unwrap(), e, &["--json"]);
            check_copy(src, &dst, data);
            let done = last_json(&out);
            if data == 0 {
                assert_eq!(done["bytes_written"].as_u64(), Some(0), "{done}");
            }
        }
    }
}

#[test]
fn nbdkit_plugins_to_file() {
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "sparse",
            vec![
                "sparse-random",
                "size=200M",
                "seed=3",
                "percent=30",
                "random-content=true",
            ],
        ),
        (
            "data",
            vec![
                "data",
                "data=1 2 3 @0x1000000 0xff*4096 @0x3000001 9",
                "size=64M",
            ],
        ),
        ("pattern", vec!["pattern", "size=33M"]),
        ("memory", vec!["memory", "size=20M"]),
    ];
    for (name, args) in cases {
        let srv = nbdkit(d.path(), name, &args);
        let reference = d.path().join(format!("{name}-ref.img"));
        nbd_to_file(&srv.uri(), &reference);
        for e in ENGINES {
            let dst = d.path().join(format!("{name}-{e}.img"));
            copy_ok(&srv.uri(), dst.to_str().unwrap(), e, &[]);
            assert_same(&reference, &dst);
            assert!(
                allocated(&dst) <= allocated(&reference) + 2 * MIB,
                "{name}: target less sparse than nbdcopy's"
            );
        }
    }
}

#[test]
fn file_to_qemu_nbd_and_nbdkit_memory_targets() {
    let d = tempfile::tempdir().unwrap();
    let size = 80 * MIB + 4097;
    let src = d.path().join("src.img");
    let r = regions(size);
    sparse_file(&src, size, &r, 4);
    for e in ENGINES {
        // qemu-nbd target over a pre-filled file: holes must be zeroed.
        let tgt = d.path().join(format!("tgt-{e}.img"));
        dense_file(&tgt, size as usize, 99);
        {
            let srv = qemu_nbd(d.path(), "tgt", &tgt, "raw", false, &["--discard=unmap"]);
            copy_ok(
                src.to_str().unwrap(),
                &srv.uri(),
                e,
                &["--connections", "2"],
            );
        }
        assert_same(&src, &tgt);
        // nbdkit memory target, read back with nbdcopy.
        let mem = nbdkit(d.path(), "mem", &["memory", &format!("size={size}")]);
        copy_ok(src.to_str().unwrap(), &mem.uri(), e, &[]);
        let back = d.path().join(format!("back-{e}.img"));
        nbd_to_file(&mem.uri(), &back);
        assert_same(&src, &back);
    }
}

#[test]
fn qcow2_source_through_qemu_nbd_child() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("vm.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("100M")
        .status()
        .unwrap();
    assert!(st.success());
    for cmd in [
        "write -P 0xab 1M 64k",
        "write -P 0x11 50M 3M",
        "write -z 60M 1M",
    ] {
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(&q)
            .output()
            .unwrap();
        assert!(st.status.success(), "qemu-io {cmd}");
    }
    let reference = d.path().join("ref.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&q)
        .arg(&reference)
        .status()
        .unwrap();
    assert!(st.success());
    for e in ENGINES {
        let dst = d.path().join(format!("vm-{e}.raw"));
        copy_ok(q.to_str().unwrap(), dst.to_str().unwrap(), e, &[]);
        check_copy(&reference, &dst, 64 * 1024 + 3 * MIB);
    }
    // raw → qcow2 (a qemu-nbd child on the target side), then back.
    let q2 = d.path().join("copy.qcow2");
    copy_ok(
        reference.to_str().unwrap(),
        q2.to_str().unwrap(),
        "uring",
        &[],
    );
    let back = d.path().join("back.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&q2)
        .arg(&back)
        .status()
        .unwrap();
    assert!(st.success());
    assert_same(&reference, &back);
}

#[test]
fn falls_back_to_threads_when_io_uring_is_unavailable() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    sparse_file(&src, 8 * MIB, &[(MIB, 100_000)], 11);
    let dst = d.path().join("dst.img");
    let out = diskferry()
        .args([
            "copy",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--json",
            "-v",
        ])
        .env("DISKFERRY_DISABLE_URING", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("running the threaded engine"),
        "the fallback was not logged: {log}"
    );
    assert_eq!(last_json(&out)["engine"], "threads");
    assert_same(&src, &dst);
}

/// The CLI reads `DISKFERRY_DISABLE_URING` (the library reads no
/// environment): an explicit `--io-engine uring` under it is refused with
/// the variable named, exit 5, before anything is opened or dialled.
#[test]
fn explicit_io_uring_under_disable_uring_is_refused_before_anything_is_opened() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    sparse_file(&src, MIB, &[(0, 4096)], 3);
    let dst = d.path().join("dst.img");
    let copy = diskferry()
        .args(["copy", src.to_str().unwrap(), dst.to_str().unwrap()])
        .args(["--io-engine", "uring"])
        .env("DISKFERRY_DISABLE_URING", "1")
        .output()
        .unwrap();
    // Nothing listens on port 9 of this host: a dial would fail with 6.
    let send = diskferry()
        .args(["send", src.to_str().unwrap(), "--to", "127.0.0.1:9"])
        .args([
            "--target",
            "t",
            "--insecure-plaintext",
            "--io-engine",
            "uring",
        ])
        .env("DISKFERRY_DISABLE_URING", "1")
        .output()
        .unwrap();
    for (what, out) in [("copy", &copy), ("send", &send)] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{what}: {err}");
        assert!(err.contains("DISKFERRY_DISABLE_URING=1"), "{what}: {err}");
    }
    assert!(!dst.exists(), "the target was created");
}
