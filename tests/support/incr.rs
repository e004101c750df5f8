//! Incremental-send test helpers: a qcow2 source with a persistent dirty
//! bitmap, random changes made with `qemu-io`, the ranges they change,
//! changed-areas lists, comparison with `qemu-img compare`, and a wait
//! for an incremental pass's durable progress in a receiver's journal.
//!
//! Include with `#[path = "support/incr.rs"] mod incr;` next to `mod common;`
//! and `#[path = "support/rx.rs"] mod rx;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::rx::{Bg, Rng, stderr};
use diskferry::journal::Journal;
use diskferry::wire::PassMode;

pub const MIB: u64 = 1 << 20;
pub const KIB: u64 = 1 << 10;
/// The qcow2 bitmap's default granularity.
pub const GRANULE: u64 = 64 * KIB;
pub const DISK: u64 = 64 * MIB;

pub fn run(program: &str, args: &[&str]) -> Output {
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

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One change made with qemu-io.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// Random bytes.
    Write(u64, u64),
    /// `write -z`: zeros.
    Zero(u64, u64),
    /// `discard`: unmapped (reads as zeros in qcow2 v3).
    Discard(u64, u64),
}

impl Change {
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Change::Write(o, l) | Change::Zero(o, l) | Change::Discard(o, l) => (o, l),
        }
    }
}

/// A qcow2 of [`DISK`] bytes: random data over its first 40 MiB (a hole
/// after), then bitmap `b0` (recording from here on).
pub fn source_image(dir: &Path, seed: u64) -> PathBuf {
    let raw = dir.join("base.raw");
    crate::common::sparse_file(&raw, DISK, &[(0, 40 * MIB as usize)], seed);
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
pub fn random_changes(rng: &mut Rng, n: usize) -> Vec<Change> {
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
pub fn apply(dir: &Path, img: &Path, changes: &[Change], seed: u64) {
    let data = dir.join("pattern.bin");
    std::fs::write(&data, crate::common::random_bytes(256 * KIB as usize, seed)).unwrap();
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
pub fn merged(changes: &[Change]) -> Vec<(u64, u64)> {
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
pub fn granule_bytes(ranges: &[(u64, u64)]) -> u64 {
    let mut granules = std::collections::BTreeSet::new();
    for &(o, l) in ranges {
        for g in o / GRANULE..(o + l).div_ceil(GRANULE) {
            granules.insert(g);
        }
    }
    granules.len() as u64 * GRANULE
}

/// A changed-areas list (VMware's QueryChangedDiskAreas shape) of `ranges`.
pub fn changed_areas_json(path: &Path, ranges: &[(u64, u64)]) {
    let areas: Vec<_> = ranges
        .iter()
        .map(|&(o, l)| serde_json::json!({"start": o, "length": l}))
        .collect();
    let page = serde_json::json!({"startOffset": 0, "length": DISK, "changedArea": areas});
    std::fs::write(path, page.to_string()).unwrap();
}

/// The target equals the source (qemu-img reads the qcow2 as the guest
/// sees it).
pub fn assert_identical(src: &Path, target: &Path, what: &str) {
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

pub fn digest(p: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(p).unwrap())
}

pub fn text<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Frame headers, barriers and the like: at most this per changed range
/// plus a fixed allowance.
pub fn overhead_bytes(ranges: usize) -> u64 {
    64 * KIB + 256 * ranges as u64
}

/// Wait until the receiver has journaled part of an incremental pass as
/// durable in its journal file `journal` (at most a minute), while `bg`
/// (the send) runs. The file is read directly: opening the journal store
/// would remove the receiver's in-flight temporary files.
pub fn wait_for_pass_progress(journal: &Path, bg: &mut Bg) {
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
