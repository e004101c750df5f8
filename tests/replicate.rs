//! `diskferry send` → `diskferry serve` end to end on loopback, with the
//! real binary on both sides, real qemu-nbd / nbdkit sources and mutual
//! TLS. Across network namespaces and slow links: tests/replicate_links.rs.

mod common;
#[path = "support/replicate.rs"]
mod replicate;

use common::*;
use replicate::*;
use std::path::Path;
use std::time::Instant;

/// The main round trip, on each I/O engine (`send --io-engine`), like
/// every `copy` test.
#[test]
fn qemu_nbd_and_nbdkit_sources_over_mutual_tls() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let tls = certs(d.path());
    let rx = serve(d.path(), Some(&tls), "127.0.0.1:0", None);
    for e in ENGINES {
        let dir = d.path().join(e);
        std::fs::create_dir_all(&dir).unwrap();
        round_trip(&dir, &rx, &tls, e);
    }
}

/// Sends of qemu-nbd, nbdkit and file sources with the `engine` I/O
/// engine; each target compared byte for byte with its source.
fn round_trip(dir: &Path, rx: &Receiver, tls: &Path, engine: &str) {
    let send = |src: &str, target: &str, extra: &[&str]| {
        let mut all = vec!["--io-engine", engine];
        all.extend_from_slice(extra);
        let out = send(src, rx, &format!("{engine}-{target}"), Some(tls), &all);
        let done = ok(&out);
        assert_eq!(done["engine"], engine, "{done}");
        out
    };
    let target = |name: &str| rx.root.join(format!("{engine}-{name}"));
    // qemu-nbd source: a sparse file with data in odd places (qemu-nbd
    // exports sizes rounded up to 512 bytes; copy's tests cover odd sizes).
    let size = 64 * MIB + 3584;
    let src = dir.join("src.img");
    let regions = [
        (0, 4096),
        (3 * MIB + 17, 300_000),
        (40 * MIB, 6 * MIB as usize),
        (size - 5000, 5000),
    ];
    sparse_file(&src, size, &regions, 21);
    let q = qemu_nbd(dir, "src", &src, "raw", true, &[]);
    let done = ok(&send(&q.uri(), "vm1.img", &["--verify"]));
    let dst = target("vm1.img");
    assert_same(&src, &dst);
    assert!(
        allocated(&dst) <= allocated(&src) + 2 * MIB,
        "target is not sparse"
    );
    assert_eq!(done["verified"], true);
    assert_eq!(done["image_digest"].as_str().map(str::len), Some(64));
    for k in [
        "bytes_on_wire",
        "compression_ratio",
        "bytes_planned",
        "bytes_read",
        "bytes_written",
        "bytes_zeroed",
        "elapsed_s",
    ] {
        assert!(done[k].is_number(), "done lacks {k}: {done}");
    }
    // nbdkit sparse-random (random content) with 2 streams and zstd.
    let k = nbdkit(
        dir,
        "sr",
        &[
            "sparse-random",
            "size=96M",
            "seed=5",
            "percent=40",
            "random-content=true",
        ],
    );
    let reference = dir.join("sr.img");
    nbd_to_file(&k.uri(), &reference);
    send(
        &k.uri(),
        "vm2.img",
        &["--streams", "2", "--compress", "zstd"],
    );
    assert_same(&reference, &target("vm2.img"));
    // Compressible data with lz4: fewer bytes on the wire than data.
    let text = dir.join("text.img");
    let mut t = Vec::new();
    while t.len() < 16 * MIB as usize {
        t.extend_from_slice(
            format!("line {} of a very compressible log file\n", t.len()).as_bytes(),
        );
    }
    std::fs::write(&text, &t).unwrap();
    let done = ok(&send(
        text.to_str().unwrap(),
        "text.img",
        &["--compress", "lz4"],
    ));
    assert_same(&text, &target("text.img"));
    assert!(
        done["bytes_on_wire"].as_u64().unwrap() < t.len() as u64 / 2,
        "{done}"
    );
    // The same data with auto to a receiver on this host: compressing
    // saves no bandwidth on loopback, so only exploring chunks compress.
    let done = ok(&send(
        text.to_str().unwrap(),
        "text-auto.img",
        &["--compress", "auto"],
    ));
    assert_same(&text, &target("text-auto.img"));
    let c = &done["compression"];
    let compressed = c["chunks_lz4"].as_u64().unwrap() + c["chunks_zstd"].as_u64().unwrap();
    assert!(
        compressed <= c["chunks_explored"].as_u64().unwrap(),
        "{done}"
    );
}

#[test]
fn foreign_or_missing_certificates_are_refused_and_nothing_is_written() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let tls = certs(d.path());
    let other = tempfile::tempdir().unwrap();
    let foreign = certs(other.path());
    let rx = serve(d.path(), Some(&tls), "127.0.0.1:0", None);
    let src = d.path().join("src.img");
    dense_file(&src, MIB as usize, 3);
    let out = send(src.to_str().unwrap(), &rx, "a.img", Some(&foreign), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CA") || err.contains("certificate"), "{err}");
    let out = send(src.to_str().unwrap(), &rx, "b.img", None, &[]);
    assert!(
        !out.status.success(),
        "plaintext sender accepted by a TLS receiver"
    );
    assert!(!rx.root.join("a.img").exists() && !rx.root.join("b.img").exists());
    let out = send(src.to_str().unwrap(), &rx, "../escape.img", Some(&tls), &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TargetNotAllowed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.path().join("escape.img").exists());
    // The receiver still serves a good sender afterwards.
    ok(&send(src.to_str().unwrap(), &rx, "c.img", Some(&tls), &[]));
    assert_same(&src, &rx.root.join("c.img"));
}

#[test]
fn rate_limit_holds_within_ten_percent() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let tls = certs(d.path());
    let rx = serve(d.path(), Some(&tls), "127.0.0.1:0", None);
    let src = d.path().join("src.img");
    // A budget well under what a debug build moves through TLS on a loaded
    // 2-core machine, so the limiter and not the machine sets the pace.
    dense_file(&src, 180 * MIB as usize, 4);
    let t = Instant::now();
    let done = ok(&send(
        src.to_str().unwrap(),
        &rx,
        "r.img",
        Some(&tls),
        &["--rate", "30M", "--compress", "none"],
    ));
    let secs = t.elapsed().as_secs_f64();
    let rate = done["bytes_on_wire"].as_u64().unwrap() as f64 / secs;
    assert!(secs >= 5.0, "too fast to judge: {secs:.1}s");
    assert!(
        (27e6..=33e6).contains(&rate),
        "rate {rate:.0} B/s is not within 10% of 30 MB/s ({secs:.2}s)"
    );
    assert_same(&src, &rx.root.join("r.img"));
}
