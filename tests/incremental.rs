//! Incremental sends (issue 16) against real tools: a qcow2 source with a
//! persistent dirty bitmap (`qemu-img bitmap --add`), changed with
//! `qemu-io` (writes of random data, zero writes, discards), served by
//! diskferry's own qemu-nbd child (`--bitmap=NAME`), sent to a real
//! `diskferry serve` over mutual TLS on loopback, on both I/O engines. The
//! target is compared with the source by `qemu-img compare`.

mod common;
#[path = "support/rx.rs"]
mod rx;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::ENGINES;
use diskferry::journal::Journal;
use diskferry::wire::PassMode;
use rx::{Bg, Rng, Rx, done, stderr};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// The qcow2 bitmap's default granularity.
const GRANULE: u64 = 64 * KIB;
const DISK: u64 = 64 * MIB;

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One change made with qemu-io.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// Random bytes.
    Write(u64, u64),
    /// `write -z`: zeros.
    Zero(u64, u64),
    /// `discard`: unmapped (reads as zeros in qcow2 v3).
    Discard(u64, u64),
}

impl Change {
    fn range(&self) -> (u64, u64) {
        match *self {
            Change::Write(o, l) | Change::Zero(o, l) | Change::Discard(o, l) => (o, l),
        }
    }
}

/// A qcow2 of [`DISK`] bytes: random data over its first 40 MiB (a hole
/// after), then bitmap `b0` (recording from here on).
fn source_image(dir: &Path, seed: u64) -> PathBuf {
    let raw = dir.join("base.raw");
    common::sparse_file(&raw, DISK, &[(0, 40 * MIB as usize)], seed);
    let img = dir.join("src.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&img),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    img
}

/// Random changes: `n` of them, 512-aligned, 4 KiB..256 KiB, mostly
/// writes, some zero writes and discards.
fn random_changes(rng: &mut Rng, n: usize) -> Vec<Change> {
    (0..n)
        .map(|_| {
            let len = (rng.range(0, 64) + 1) * 4 * KIB;
            let offset = rng.range(0, (DISK - len) / 512) * 512;
            match rng.range(0, 10) {
                0 => Change::Zero(offset, len),
                1 => Change::Discard(offset, len),
                _ => Change::Write(offset, len),
            }
        })
        .collect()
}

/// Apply `changes` with qemu-io (one process); random data comes from a
/// scratch file.
fn apply(dir: &Path, img: &Path, changes: &[Change], seed: u64) {
    let data = dir.join("pattern.bin");
    std::fs::write(&data, common::random_bytes(256 * KIB as usize, seed)).unwrap();
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    for c in changes {
        let cmd = match *c {
            Change::Write(o, l) => format!("write -q -s {} {o} {l}", s(&data)),
            Change::Zero(o, l) => format!("write -q -z {o} {l}"),
            Change::Discard(o, l) => format!("discard -q {o} {l}"),
        };
        args.push("-c".into());
        args.push(cmd);
    }
    args.push(s(img).into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &args);
    std::fs::remove_file(&data).unwrap();
}

/// The changed ranges, merged (sorted, disjoint, adjacent ones joined).
fn merged(changes: &[Change]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = changes.iter().map(|c| c.range()).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*po + *pl).max(o + l) - *po,
            _ => out.push((o, l)),
        }
    }
    out
}

/// Bytes of `ranges` rounded out to bitmap granules.
fn granule_bytes(ranges: &[(u64, u64)]) -> u64 {
    let mut granules = std::collections::BTreeSet::new();
    for &(o, l) in ranges {
        for g in o / GRANULE..(o + l).div_ceil(GRANULE) {
            granules.insert(g);
        }
    }
    granules.len() as u64 * GRANULE
}

/// A changed-areas list (VMware's QueryChangedDiskAreas shape) of `ranges`.
fn changed_areas_json(path: &Path, ranges: &[(u64, u64)]) {
    let areas: Vec<_> = ranges
        .iter()
        .map(|&(o, l)| serde_json::json!({"start": o, "length": l}))
        .collect();
    let page = serde_json::json!({"startOffset": 0, "length": DISK, "changedArea": areas});
    std::fs::write(path, page.to_string()).unwrap();
}

/// The target equals the source (qemu-img reads the qcow2 as the guest
/// sees it).
fn assert_identical(src: &Path, target: &Path, what: &str) {
    let out = Command::new("qemu-img")
        .args([
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(src),
            s(target),
        ])
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{what}: target differs from source: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn digest(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn text<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Frame headers, barriers and the like: at most this per changed range
/// plus a fixed allowance.
fn overhead_bytes(ranges: usize) -> u64 {
    64 * KIB + 256 * ranges as u64
}

/// Wait until the receiver has journaled part of an incremental pass as
/// durable in its journal file `journal` (at most a minute), while `bg`
/// (the send) runs. The file is read directly: opening the journal store
/// would remove the receiver's in-flight temporary files.
fn wait_for_pass_progress(journal: &Path, bg: &mut Bg) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state = std::fs::read(journal)
            .ok()
            .and_then(|b| Journal::decode(&b).ok())
            .map(|j| (j.complete, j.pass_mode, j.durable.covered_bytes()));
        if let Some((false, PassMode::Incremental, durable)) = state
            && durable > 0
        {
            return;
        }
        if !bg.running() {
            let out = bg.0.take().unwrap().wait_with_output().unwrap();
            panic!(
                "the pass ended before it was interrupted ({}): {}",
                out.status,
                stderr(&out)
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no durable progress of the pass within a minute: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn incremental_from_a_dirty_bitmap_then_a_changed_areas_list_is_identical_and_moves_only_changes() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut rng = Rng::from_env(&format!("incremental ({engine})"));
        let img = source_image(dir, rng.next());
        let rx = Rx::start(&dir.join("rx"), &[]);
        let target = rx.target("t.img");
        let send = |extra: &[&str]| {
            let mut args = vec!["--io-engine", engine, "--compress", "none"];
            args.extend_from_slice(extra);
            rx.send(s(&img), "t.img", &args)
        };

        // A full send: the first sync.
        let full = done(&send(&[]));
        let sync1 = text(&full, "sync_id").to_string();
        assert_eq!(sync1.len(), 32, "{full}");
        assert!(full.get("base_sync_id").is_none(), "{full}");
        assert_identical(&img, &target, "full");

        // Random writes, zero writes and discards; then the pass from the
        // bitmap.
        let changes = random_changes(&mut rng, 60);
        apply(dir, &img, &changes, rng.next());
        let changed = merged(&changes);
        let inc = done(&send(&["--changed", "dirty-bitmap:b0", "--base", &sync1]));
        assert_identical(&img, &target, "incremental from the bitmap");
        let sync2 = text(&inc, "sync_id").to_string();
        assert_ne!(sync2, sync1);
        assert_eq!(text(&inc, "base_sync_id"), sync1);
        let bytes_changed = num(&inc, "bytes_changed");
        // The bitmap marks whole granules: what it names covers the
        // changes and is no more than their granules.
        let granules = granule_bytes(&changed);
        assert!(
            bytes_changed >= changed.iter().map(|r| r.1).sum::<u64>() && bytes_changed <= granules,
            "{engine}: {bytes_changed} bytes changed; the writes touch {granules} bytes of granules"
        );
        let wire = num(&inc, "bytes_on_wire");
        eprintln!(
            "{engine}: bitmap pass: {bytes_changed} bytes changed ({} written by qemu-io), {} read, {wire} on the wire",
            changed.iter().map(|r| r.1).sum::<u64>(),
            num(&inc, "bytes_read")
        );
        let bound = bytes_changed + bytes_changed / 20 + overhead_bytes(changed.len());
        assert!(
            wire <= bound,
            "{engine}: {wire} bytes on the wire for {bytes_changed} changed (bound {bound})"
        );
        assert!(
            num(&inc, "bytes_read") <= bytes_changed,
            "{engine}: read more than changed: {inc}"
        );
        // Progress counted what the pass moves, not the disk.
        let planned = num(&inc, "bytes_planned");
        assert!(
            planned > 0 && planned <= bytes_changed,
            "{engine}: {planned} bytes planned for {bytes_changed} changed"
        );

        // More changes, described by a changed-areas list built from the
        // recorded writes (exact bytes, not granules).
        let changes = random_changes(&mut rng, 40);
        apply(dir, &img, &changes, rng.next());
        let changed = merged(&changes);
        let list = dir.join("changed.json");
        changed_areas_json(&list, &changed);
        // Against the wrong base (the sync before the last): refused,
        // exit 4, the target untouched.
        let before = digest(&target);
        let out = send(&["--changed-areas", s(&list), "--base", &sync1]);
        assert_eq!(out.status.code(), Some(4), "{engine}: {}", stderr(&out));
        let err = stderr(&out);
        eprintln!("{engine}: wrong base: {err}");
        assert!(
            err.contains(&sync2) && err.contains("--delta"),
            "{engine}: the refusal names the target's last sync and suggests --delta: {err}"
        );
        assert_eq!(digest(&target), before, "{engine}: a refused pass wrote");
        // Against the right one: identical.
        let inc = done(&send(&[
            "--changed-areas",
            s(&list),
            "--base",
            &sync2,
            "--change-id",
            "52 de/17",
        ]));
        assert_identical(&img, &target, "incremental from the changed-areas list");
        let exact: u64 = changed.iter().map(|r| r.1).sum();
        assert_eq!(num(&inc, "bytes_changed"), exact, "{engine}: {inc}");
        assert_eq!(text(&inc, "change_id"), "52 de/17");
        assert_eq!(text(&inc, "base_sync_id"), sync2);
        let wire = num(&inc, "bytes_on_wire");
        eprintln!("{engine}: changed-areas pass: {exact} bytes changed, {wire} on the wire");
        let bound = exact + exact / 20 + overhead_bytes(changed.len());
        assert!(
            wire <= bound,
            "{engine}: {wire} bytes on the wire for {exact} changed (bound {bound})"
        );
    }
}

#[test]
fn sender_killed_mid_incremental_reruns_to_an_identical_target() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut rng = Rng::from_env(&format!("incremental kill -9 ({engine})"));
        let img = source_image(dir, rng.next());
        let rx = Rx::start(&dir.join("rx"), &["--checkpoint-interval", "200ms"]);
        let target = rx.target("t.img");
        // Before any send: opening the store removes temporary files.
        let journal = rx.journal_path("t.img");
        let args = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = ["--io-engine", engine, "--compress", "none"]
                .map(String::from)
                .to_vec();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let full = done(&rx.send(s(&img), "t.img", &[]));
        let sync1 = text(&full, "sync_id").to_string();
        // About 24 MiB of writes, sent at 6 MB/s: killed once part of the
        // pass is durable on the receiver.
        let changes: Vec<Change> = (0..24)
            .map(|i| Change::Write(i * 2 * MIB + rng.range(0, 4) * 4 * KIB, MIB))
            .collect();
        apply(dir, &img, &changes, rng.next());
        let extra = args(&["--changed", "dirty-bitmap:b0", "--base", &sync1]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut slow = extra.clone();
        slow.extend(["--rate", "6M"]);
        let mut bg = Bg::spawn(rx.send_cmd(s(&img), "t.img", &slow));
        wait_for_pass_progress(&journal, &mut bg);
        assert!(bg.running(), "{engine}: the pass ended before the kill");
        bg.kill9();
        let again = done(&rx.send(s(&img), "t.img", &extra));
        eprintln!(
            "{engine}: rerun after kill -9: {} bytes skipped, {} written",
            num(&again, "bytes_resumed_skipped"),
            num(&again, "bytes_written")
        );
        assert_identical(&img, &target, "rerun after kill -9");
        assert_eq!(text(&again, "base_sync_id"), sync1);
        assert!(
            num(&again, "bytes_resumed_skipped") > 0,
            "{engine}: the rerun sent the whole pass again: {again}"
        );
        assert!(
            num(&again, "bytes_written") < 24 * MIB + 2 * GRANULE * 24,
            "{engine}: {again}"
        );
    }
}

#[test]
fn bad_incremental_input_is_refused_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let rx = Rx::start(&dir.join("rx"), &[]);
    let raw = dir.join("a.img");
    common::sparse_file(&raw, 4 * MIB, &[(0, 64 * 1024)], 5);
    let base = "00112233445566778899aabbccddeeff";
    // A raw file has no dirty bitmap.
    let out = rx.send(
        s(&raw),
        "a.img",
        &["--changed", "dirty-bitmap:b0", "--base", base],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no dirty bitmap"), "{}", stderr(&out));
    // A qcow2 without that bitmap: qemu-nbd refuses to export it.
    let img = dir.join("b.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    let out = rx.send(
        s(&img),
        "b.img",
        &["--changed", "dirty-bitmap:nope", "--base", base],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    // An overlapping changed-areas list: the entry is named.
    let list = dir.join("bad.json");
    std::fs::write(
        &list,
        r#"{"startOffset":0,"length":4194304,"changedArea":[{"start":0,"length":8192},{"start":4096,"length":4096}]}"#,
    )
    .unwrap();
    let out = rx.send(
        s(&raw),
        "a.img",
        &["--changed-areas", s(&list), "--base", base],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("changedArea["), "{}", stderr(&out));
    // Contradictory flags.
    for bad in [
        &["--base", base][..],
        &["--delta", "--base", base],
        &["--delta", "--changed", "dirty-bitmap:b0"],
        &["--changed", "bitmap:b0"],
        &["--changed", "dirty-bitmap:b0", "--base", "123"],
        &[
            "--changed-areas",
            "/nonexistent/changes.json",
            "--base",
            base,
        ],
        &["--delta", "--delta-block", "3000"],
        &["--delta-block", "64k"],
    ] {
        let out = rx.send(s(&raw), "a.img", bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }
    assert!(
        !rx.target("a.img").exists() && !rx.target("b.img").exists(),
        "a refused send created its target"
    );
}

#[test]
fn incremental_from_an_nbd_server_exporting_the_bitmap_is_identical_and_verifies() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut rng = Rng::from_env(&format!("incremental over NBD ({engine})"));
        let img = source_image(dir, rng.next());
        let rx = Rx::start(&dir.join("rx"), &[]);
        let target = rx.target("n.img");
        let send = |uri: &str, extra: &[&str]| {
            let mut args = vec!["--io-engine", engine, "--verify"];
            args.extend_from_slice(extra);
            rx.send(uri, "n.img", &args)
        };
        let sync1 = {
            let server = common::qemu_nbd(dir, "src", &img, "qcow2", true, &[]);
            let full = done(&send(&server.uri(), &[]));
            text(&full, "sync_id").to_string()
        };
        let changes = random_changes(&mut rng, 30);
        apply(dir, &img, &changes, rng.next());
        // An NBD server without the bitmap's context: refused, naming it.
        {
            let server = common::qemu_nbd(dir, "src", &img, "qcow2", true, &[]);
            let out = send(
                &server.uri(),
                &["--changed", "dirty-bitmap:b0", "--base", &sync1],
            );
            assert_eq!(out.status.code(), Some(3), "{engine}: {}", stderr(&out));
            assert!(stderr(&out).contains("qemu-nbd -B b0"), "{}", stderr(&out));
        }
        let server = common::qemu_nbd(dir, "src", &img, "qcow2", true, &["-B", "b0"]);
        let inc = done(&send(
            &server.uri(),
            &["--changed", "dirty-bitmap:b0", "--base", &sync1],
        ));
        drop(server);
        assert_identical(&img, &target, "incremental over NBD");
        assert_eq!(inc["verified"], true, "{engine}: {inc}");
        assert_eq!(text(&inc, "base_sync_id"), sync1);
        assert!(
            num(&inc, "bytes_changed") <= granule_bytes(&merged(&changes)),
            "{engine}: {inc}"
        );
    }
}

#[test]
fn receiver_killed_mid_incremental_the_send_reconnects_and_the_target_is_identical() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut rng = Rng::from_env(&format!("incremental, receiver kill -9 ({engine})"));
        let img = source_image(dir, rng.next());
        let mut rx = Rx::start(&dir.join("rx"), &["--checkpoint-interval", "200ms"]);
        let target = rx.target("t.img");
        // Before any send: opening the store removes temporary files.
        let journal = rx.journal_path("t.img");
        let full = done(&rx.send(s(&img), "t.img", &[]));
        let sync1 = text(&full, "sync_id").to_string();
        let changes: Vec<Change> = (0..24)
            .map(|i| Change::Write(i * 2 * MIB + rng.range(0, 4) * 4 * KIB, MIB))
            .collect();
        apply(dir, &img, &changes, rng.next());
        let mut bg = Bg::spawn(rx.send_cmd(
            s(&img),
            "t.img",
            &[
                "--io-engine",
                engine,
                "--compress",
                "none",
                "--changed",
                "dirty-bitmap:b0",
                "--base",
                &sync1,
                "--rate",
                "6M",
                "--stall-timeout",
                "3s",
                "--retry-for",
                "60s",
            ],
        ));
        wait_for_pass_progress(&journal, &mut bg);
        rx.kill9();
        std::thread::sleep(Duration::from_millis(500));
        rx.spawn();
        let inc = done(&bg.wait(Duration::from_secs(120)));
        assert!(num(&inc, "reconnects") >= 1, "{engine}: {inc}");
        assert_eq!(text(&inc, "base_sync_id"), sync1);
        assert_identical(&img, &target, "incremental after the receiver's kill -9");
        // The receiver recorded this pass as its last sync: the next pass
        // starts from it.
        let next = rx.send(
            s(&img),
            "t.img",
            &[
                "--changed",
                "dirty-bitmap:b0",
                "--base",
                text(&inc, "sync_id"),
            ],
        );
        done(&next);
    }
}

#[test]
fn a_rerun_with_another_plan_also_sends_what_the_interrupted_pass_may_have_changed() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut rng = Rng::from_env(&format!("incremental replan ({engine})"));
        let img = source_image(dir, rng.next());
        let rx = Rx::start(&dir.join("rx"), &["--checkpoint-interval", "200ms"]);
        let target = rx.target("t.img");
        // Before any send: opening the store removes temporary files.
        let journal = rx.journal_path("t.img");
        let sync1 = text(&done(&rx.send(s(&img), "t.img", &[])), "sync_id").to_string();
        // Pass A (24 MiB at 6 MB/s), killed part way.
        let a: Vec<Change> = (0..24)
            .map(|i| Change::Write(i * 2 * MIB + rng.range(0, 4) * 4 * KIB, MIB))
            .collect();
        apply(dir, &img, &a, rng.next());
        let list_a = dir.join("a.json");
        changed_areas_json(&list_a, &merged(&a));
        let flags = |list: &Path, rate: Option<&'static str>| -> Vec<String> {
            let mut v: Vec<String> = ["--io-engine", engine, "--compress", "none", "--base"]
                .map(String::from)
                .to_vec();
            v.push(sync1.clone());
            v.push("--changed-areas".into());
            v.push(s(list).into());
            if let Some(r) = rate {
                v.extend(["--rate".into(), r.into()]);
            }
            v
        };
        let slow = flags(&list_a, Some("6M"));
        let slow: Vec<&str> = slow.iter().map(String::as_str).collect();
        let mut bg = Bg::spawn(rx.send_cmd(s(&img), "t.img", &slow));
        wait_for_pass_progress(&journal, &mut bg);
        assert!(bg.running(), "{engine}: pass A ended before the kill");
        bg.kill9();
        // Then other changes, and a pass that names only those (B): the
        // receiver asks for A ∖ B too, which the sender plans from the
        // source's allocation.
        let b = random_changes(&mut rng, 20);
        apply(dir, &img, &b, rng.next());
        let list_b = dir.join("b.json");
        changed_areas_json(&list_b, &merged(&b));
        let rerun = flags(&list_b, None);
        let rerun: Vec<&str> = rerun.iter().map(String::as_str).collect();
        let inc = done(&rx.send(s(&img), "t.img", &rerun));
        assert_identical(&img, &target, "rerun with another plan");
        let only_b: u64 = merged(&b).iter().map(|r| r.1).sum();
        assert!(
            num(&inc, "bytes_changed") > only_b,
            "{engine}: the rerun sent only its own plan: {inc}"
        );
    }
}
