//! How `diskferry copy` uses the machine, end to end against real
//! qemu-nbd and nbdkit servers and real files: every core for a local
//! NBD-to-NBD copy, a page cache left unfilled, the queue depth probed or
//! pinned by `--requests`, and the lanes that spread the first reads over
//! the disk. The endpoints themselves are tested in `copy_local.rs`.

mod common;
#[path = "support/nbdlog.rs"]
mod nbdlog;

use common::*;
use nbdlog::logged_reads;
use std::path::Path;

const MIB: u64 = 1 << 20;

#[test]
fn a_copy_between_two_nbd_servers_on_this_machine_uses_every_core() {
    let d = tempfile::tempdir().unwrap();
    let size = "96M";
    let src = nbdkit(
        d.path(),
        "src",
        &[
            "sparse-random",
            &format!("size={size}"),
            "seed=7",
            "percent=40",
            "random-content=true",
        ],
    );
    let reference = d.path().join("ref.img");
    nbd_to_file(&src.uri(), &reference);
    // Every core, up to one worker per connection (4 by default).
    let cores = diskferry::engine::pin::online_cpus().clamp(1, 4);
    for e in ENGINES {
        let mem = nbdkit(d.path(), "mem", &["memory", &format!("size={size}")]);
        let out = copy_ok(&src.uri(), &mem.uri(), e, &["--json"]);
        let done = last_json(&out);
        assert_eq!(done["event"], "done", "{e}: {done}");
        assert_eq!(
            done["workers"].as_u64(),
            Some(cores as u64),
            "{e}: a local NBD-to-NBD copy did not use every core: {done}"
        );
        let back = d.path().join(format!("back-{e}.img"));
        nbd_to_file(&mem.uri(), &back);
        assert_same(&reference, &back);
    }
}

/// Bytes of `path` resident in the page cache (mincore over a mapping).
fn resident_bytes(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096usize;
    // SAFETY: a read-only shared mapping of a file we keep open for the
    // mapping's whole life; unmapped before returning.
    unsafe {
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED, "mmap {}", path.display());
        let mut vec = vec![0u8; len.div_ceil(page)];
        let rc = libc::mincore(ptr, len, vec.as_mut_ptr());
        libc::munmap(ptr, len);
        assert_eq!(rc, 0, "mincore {}", path.display());
        vec.iter().filter(|&&v| v & 1 == 1).count() as u64 * page as u64
    }
}

#[test]
fn a_copy_into_a_file_does_not_fill_the_page_cache_with_it() {
    // On the disk the build is on, not a tmpfs /tmp: tmpfs pages are the
    // file itself and cannot be dropped.
    let d = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let src = d.path().join("src.img");
    let size = 128 * MIB;
    dense_file(&src, size as usize, 21);
    for e in ENGINES {
        let dst = d.path().join(format!("dst-{e}.img"));
        copy_ok(src.to_str().unwrap(), dst.to_str().unwrap(), e, &[]);
        let resident = resident_bytes(&dst);
        eprintln!(
            "{e}: {} MiB of the target resident after the copy",
            resident / MIB
        );
        // Writeback is started per chunk and each range is dropped from
        // the cache once written: a few windows per worker stay.
        assert!(
            resident <= size / 4,
            "{e}: {} MiB of a {} MiB target left in the page cache",
            resident / MIB,
            size / MIB
        );
        assert_same(&src, &dst);
    }
}

/// nbdkit's `pattern` plugin: every 8-byte word holds its own offset, big
/// endian. Check a few words spread over `path`.
fn assert_pattern(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    for i in 0..64u64 {
        let at = (size / 64 * i + 4096 * i) / 8 * 8 % size;
        let mut word = [0u8; 8];
        f.read_exact_at(&mut word, at).unwrap();
        assert_eq!(
            u64::from_be_bytes(word),
            at,
            "word at {at} of {}",
            path.display()
        );
    }
}

/// Into a file too, the control thread tries deeper queues (measured as
/// bytes that reached the target's storage): a target on faster storage
/// than the source's reads faster deeper. `--requests` turns it off.
#[test]
fn a_copy_into_a_file_probes_deeper_queues_unless_requests_fixes_the_depth() {
    let d = tempfile::tempdir().unwrap();
    // 30 ms per read: the copy lasts about 2 s whatever the depth the
    // workers' own latency rule reaches, past the first probe (which
    // starts at the sixth 150 ms epoch and is judged two epochs later).
    let src = nbdkit(
        d.path(),
        "slow",
        &["--filter=delay", "pattern", "size=640M", "delay-read=30ms"],
    );
    let out_path = d.path().join("out.img");
    let out_s = out_path.to_str().unwrap();
    // On both engines: the probe's measure, bytes written back, comes from
    // each engine's sync_file_range; were it never counted, no probe would
    // run (a rate of 0 is no rate to beat).
    for engine in ["uring", "threads"] {
        let auto = last_json(&copy_ok(&src.uri(), out_s, engine, &["--json"]));
        assert!(
            auto["depth_probes"].as_u64().unwrap() >= 1,
            "no probe into a file ({engine}): {auto}"
        );
        assert_pattern(&out_path);
        std::fs::remove_file(&out_path).unwrap();
    }

    let fixed = last_json(&copy_ok(
        &src.uri(),
        out_s,
        "uring",
        &["--json", "--requests", "4"],
    ));
    assert_eq!(fixed["depth_probes"].as_u64(), Some(0), "{fixed}");
    // 4 connections of 4 requests: 16 chunks in flight, never more.
    assert_eq!(fixed["chunks_in_flight_peak"].as_u64(), Some(16), "{fixed}");
    assert!(
        fixed["elapsed_s"].as_f64().unwrap() > 1.5,
        "too quick for a probe to have had a chance: {fixed}"
    );
    assert_pattern(&out_path);
}

/// Into an NBD target the control thread may deepen every worker's queue
/// while that reads faster (`src/pipeline/probe.rs`); `--requests` still
/// fixes the depth, for the whole copy.
#[test]
fn requests_pins_the_depth_into_an_nbd_target() {
    let d = tempfile::tempdir().unwrap();
    // 20 ms per read: at 8 reads in flight, 128 MiB takes about 1.3 s,
    // past the probe's first probe (its sixth 150 ms epoch).
    let src = nbdkit(
        d.path(),
        "slow",
        &["--filter=delay", "pattern", "size=128M", "delay-read=20ms"],
    );
    let reference = d.path().join("ref.img");
    nbd_to_file(&src.uri(), &reference);
    let mem = nbdkit(d.path(), "mem", &["memory", "size=128M"]);
    let out = copy_ok(
        &src.uri(),
        &mem.uri(),
        "uring",
        &["--json", "--requests", "2"],
    );
    let done = last_json(&out);
    let start = done["requests_per_connection"].as_u64().unwrap()
        * done["source_connections"].as_u64().unwrap();
    assert_eq!(start, 8, "{done}");
    assert_eq!(done["chunks_in_flight_peak"].as_u64(), Some(8), "{done}");
    assert_eq!(done["depth_probes"].as_u64(), Some(0), "{done}");
    assert!(
        done["elapsed_s"].as_f64().unwrap() > 1.0,
        "too quick for the probe to have had a chance: {done}"
    );
    let back = d.path().join("back.img");
    nbd_to_file(&mem.uri(), &back);
    assert_same(&reference, &back);
}

/// The planner hands out work from several regions of the disk side by
/// side (`src/plan/lanes.rs`): the first requests in flight spread
/// over the whole disk, yet every byte is still read exactly once.
/// `--lanes 1` reads in ascending order.
#[test]
fn lanes_spread_the_first_reads_over_the_disk_and_read_every_byte_once() {
    const MIB: u64 = 1 << 20;
    let d = tempfile::tempdir().unwrap();
    let out_path = d.path().join("out.img");
    let out_s = out_path.to_str().unwrap();
    for (lanes, flag) in [(4u64, Some("4")), (1, Some("1")), (8, None)] {
        let log = d.path().join(format!("reads-{lanes}.log"));
        let logfile = format!("logfile={}", log.display());
        let src = nbdkit(
            d.path(),
            "logged",
            &["--filter=log", "pattern", "size=64M", &logfile],
        );
        let mut extra = vec!["--json"];
        if let Some(n) = flag {
            extra.extend(["--lanes", n]);
        }
        let done = last_json(&copy_ok(&src.uri(), out_s, "uring", &extra));
        drop(src);
        assert_eq!(done["lanes"].as_u64(), Some(lanes), "{done}");
        assert_pattern(&out_path);

        let reads = logged_reads(&log);
        let mut sorted = reads.clone();
        sorted.sort();
        let mut at = 0;
        for &(o, n) in &sorted {
            assert_eq!(o, at, "a gap or a second read at {o} with {lanes} lanes");
            at = o + n;
        }
        assert_eq!(at, 64 * MIB, "not every byte was read with {lanes} lanes");

        // The planner hands out one window from each lane (64 MiB / lanes
        // each) before any lane gets a second. Requests arrive out of that
        // order by at most the 8 in flight, so the first 16 to arrive
        // include every lane.
        let first: Vec<u64> = reads.iter().take(16).map(|&(o, _)| o).collect();
        let mut regions: Vec<u64> = first.iter().map(|o| o / (64 * MIB / lanes)).collect();
        regions.sort();
        regions.dedup();
        assert_eq!(
            regions.len() as u64,
            lanes,
            "first reads {first:?} with {lanes} lanes"
        );
        if lanes == 1 {
            assert!(first.iter().all(|&o| o < 8 * MIB), "{first:?}");
        }
        std::fs::remove_file(&out_path).unwrap();
    }

    let d2 = tempfile::tempdir().unwrap();
    let src = nbdkit(d2.path(), "p", &["pattern", "size=1M"]);
    let bad = copy(&src.uri(), out_s, "uring", &["--lanes", "0"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--lanes must be"),
        "{bad:?}"
    );
    assert!(!out_path.exists(), "a refused copy created its target");
}

/// The `progress` events of a `--json` run.
fn progress_events(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "progress")
        .collect()
}

#[test]
fn progress_interval_sets_how_often_progress_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    dense_file(&src, (48 * MIB) as usize, 3);
    // --rate 32M makes the copy last about 1.5 s on any machine.
    let slow = ["--json", "--rate", "32M"];
    let dst = d.path().join("every-second.img");
    let out = copy_ok(src.to_str().unwrap(), dst.to_str().unwrap(), "uring", &slow);
    let default_events = progress_events(&out).len();
    assert!(
        (1..=4).contains(&default_events),
        "{default_events} progress events in ~1.5 s at the default 1s interval"
    );
    for e in ENGINES {
        let dst = d.path().join(format!("{e}.img"));
        let args = [&slow[..], &["--progress-interval", "100ms"]].concat();
        let out = copy_ok(src.to_str().unwrap(), dst.to_str().unwrap(), e, &args);
        let events = progress_events(&out);
        assert!(
            events.len() >= 8,
            "{e}: only {} progress events in ~1.5 s at --progress-interval 100ms",
            events.len()
        );
        let at: Vec<f64> = events
            .iter()
            .map(|v| v["elapsed_s"].as_f64().unwrap())
            .collect();
        let done: Vec<u64> = events
            .iter()
            .map(|v| v["bytes_done"].as_u64().unwrap())
            .collect();
        assert!(
            at.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] < 0.6),
            "{e}: {at:?}"
        );
        assert!(done.windows(2).all(|w| w[1] >= w[0]), "{e}: {done:?}");
        assert_same(&src, &dst);
    }
    let refused = copy(
        src.to_str().unwrap(),
        d.path().join("x.img").to_str().unwrap(),
        "uring",
        &["--progress-interval", "5ms"],
    );
    assert_eq!(
        refused.status.code(),
        Some(2),
        "a 5ms interval was not refused"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("shorter than 10ms"));
}
