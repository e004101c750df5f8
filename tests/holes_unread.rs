//! Holes are never read from an NBD source: nbdkit's `log` filter records
//! every read a `copy` or a `send` makes of a sparse source, and each one
//! lies inside an allocated extent of that source (as `nbdinfo --map`
//! reports it), while every data byte is read exactly once. On both I/O
//! engines, with a file of many data islands and nbdkit's sparse-random.

mod common;
#[path = "support/nbdlog.rs"]
mod nbdlog;
#[path = "support/rx.rs"]
mod rx;

use common::*;
use nbdlog::*;
use std::path::Path;

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 48 * MIB;

/// A sparse file: islands at odd places, and in [16, 24) MiB a 4 KiB
/// island every 64 KiB (128 holes in a row smaller than a chunk).
fn islands_file(p: &Path) {
    let mut regions: Vec<(u64, usize)> = vec![
        (0, 4096),
        (MIB + 3 * 4096, 8192),
        (3 * MIB, 3 * MIB as usize),
        (9 * MIB - 4096, 12288),
        (SIZE_BYTES - 4096, 4096),
    ];
    regions.extend((0..128).map(|i| (16 * MIB + i * 65536, 4096)));
    sparse_file(p, SIZE_BYTES, &regions, 77);
}

/// Bytes `send` reads a second time on purpose: the source identity
/// (`src/replicate/source.rs`) samples the first MiB of data and 15 blocks
/// of 4 KiB, all inside data extents.
const IDENTITY_SAMPLE_BYTES_MAX: u64 = MIB + 15 * 4096;

/// Checks the reads in `log` against the source's `map`: every read inside
/// an allocated extent, every data byte read, and at most
/// `reread_bytes_max` bytes read more than once.
fn check_reads(log: &Path, map: &[Extent], reread_bytes_max: u64, what: &str) {
    let allocated = ranges_where(map, |e| !e.is_hole);
    let data = ranges_where(map, |e| !e.is_hole && !e.is_zero);
    let holes = ranges_where(map, |e| e.is_hole);
    assert!(
        holes.len() >= 8 && data.len() >= 8,
        "{what}: the source is not sparse enough to test anything: {map:?}"
    );
    let reads = logged_reads(log);
    assert!(
        !reads.is_empty(),
        "{what}: no read logged in {}",
        log.display()
    );
    for &(o, n) in &reads {
        assert!(
            inside(&allocated, o, n),
            "{what}: read of {n} bytes at {o} touches a hole; allocated: {allocated:?}"
        );
    }
    let mut sorted = reads.clone();
    sorted.sort();
    if reread_bytes_max == 0 {
        for w in sorted.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{what}: bytes read twice: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
    }
    let read = coalesce(sorted);
    let read_bytes: u64 = reads.iter().map(|r| r.1).sum();
    let distinct_bytes: u64 = read.iter().map(|r| r.1).sum();
    assert!(
        read_bytes - distinct_bytes <= reread_bytes_max,
        "{what}: {} bytes read more than once (at most {reread_bytes_max} may be)",
        read_bytes - distinct_bytes
    );
    for &(o, n) in &data {
        assert!(
            inside(&read, o, n),
            "{what}: data at {o} ({n} bytes) was not read; reads: {read:?}"
        );
    }
    eprintln!(
        "{what}: {} reads, all inside {} allocated extents; {} holes never read",
        reads.len(),
        allocated.len(),
        holes.len()
    );
}

/// The sources: a file of islands behind nbdkit's file plugin, and
/// sparse-random; each as nbdkit arguments (before the logfile).
fn sources(dir: &Path) -> Vec<(&'static str, Vec<String>)> {
    let file = dir.join("islands.img");
    islands_file(&file);
    vec![
        (
            "islands",
            vec!["file".into(), format!("file={}", file.display())],
        ),
        (
            "sparse-random",
            [
                "sparse-random",
                "size=48M",
                "seed=9",
                "percent=20",
                "runlength=65536",
                "random-content=true",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ]
}

/// nbdkit serving `args` through the log filter into `log`.
fn logged(dir: &Path, args: &[String], log: &Path) -> Server {
    let _ = std::fs::remove_file(log);
    let mut all: Vec<String> = vec!["--filter=log".into()];
    all.extend(args.iter().cloned());
    all.push(format!("logfile={}", log.display()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    nbdkit(dir, "logged", &refs)
}

#[test]
fn copy_never_reads_a_hole_of_an_nbd_source() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out.img");
    for (name, args) in sources(d.path()) {
        let plain = nbdkit(
            d.path(),
            "plain",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let map = nbd_map(&plain.uri());
        let reference = d.path().join("reference.img");
        nbd_to_file(&plain.uri(), &reference);
        drop(plain);
        for e in ENGINES {
            let log = d.path().join(format!("copy-{name}-{e}.log"));
            let src = logged(d.path(), &args, &log);
            copy_ok(&src.uri(), out.to_str().unwrap(), e, &[]);
            drop(src);
            assert_same(&reference, &out);
            check_reads(&log, &map, 0, &format!("copy of {name} ({e})"));
            std::fs::remove_file(&out).unwrap();
        }
    }
}

#[test]
fn send_never_reads_a_hole_of_an_nbd_source() {
    let d = tempfile::tempdir().unwrap();
    let rx = rx::Rx::start(d.path(), &[]);
    for (name, args) in sources(d.path()) {
        let plain = nbdkit(
            d.path(),
            "plain",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let map = nbd_map(&plain.uri());
        let reference = d.path().join("reference.img");
        nbd_to_file(&plain.uri(), &reference);
        drop(plain);
        for e in ENGINES {
            let log = d.path().join(format!("send-{name}-{e}.log"));
            let src = logged(d.path(), &args, &log);
            let target = format!("{name}-{e}.img");
            let done = rx::done(&rx.send(&src.uri(), &target, &["--io-engine", e]));
            drop(src);
            assert_eq!(done["engine"], e, "{done}");
            assert_same(&reference, &rx.target(&target));
            check_reads(
                &log,
                &map,
                IDENTITY_SAMPLE_BYTES_MAX,
                &format!("send of {name} ({e})"),
            );
        }
    }
}
