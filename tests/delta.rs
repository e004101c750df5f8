//! `send --delta`: the receiver digests its existing target block by block,
//! the sender sends only the blocks that differ. Real files, a real
//! `diskferry serve` over mutual TLS on loopback, real `qemu-img` and
//! `qemu-io`, a real loop device; the CLI on both I/O engines. Every test
//! ends with a byte comparison of source and target; the faults are in
//! `delta_faults.rs`.

#[path = "support/blockdev.rs"]
mod blockdev;
mod common;
#[path = "support/rx.rs"]
mod rx;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::*;
use rx::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;
const CHUNK: u64 = diskferry::replicate::send::CHUNK_BYTES_DEFAULT as u64;

/// What the digests cost the sender's side of the wire: one DIGEST_REQUEST
/// (a 16-byte payload and its header) per window or 32 MiB of a hole, with
/// room for HELLO, BARRIERs and DONE.
fn digest_allowance(size: u64) -> u64 {
    (size / CHUNK + 64) * 64 + 64 * 1024
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fills 64 KiB block `i` of `p` with `fill` (None: pseudo-random bytes).
fn set_block(p: &Path, i: u64, fill: Option<u8>, seed: u64) {
    let bytes = match fill {
        Some(b) => vec![b; BLOCK as usize],
        None => random_bytes(BLOCK as usize, seed),
    };
    write_at(p, i * BLOCK, &bytes);
}

#[test]
fn one_percent_of_blocks_changed_some_zeroed_becomes_identical_and_only_they_cross_the_wire() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let size = 256 * MIB;
    let blocks = size / BLOCK;
    // The source: data everywhere but two holes.
    let src = dir.join("src.img");
    let holes = [(64 * MIB, 16 * MIB), (200 * MIB, 8 * MIB)];
    let in_hole = |i: u64| {
        holes
            .iter()
            .any(|&(o, l)| i * BLOCK >= o && i * BLOCK < o + l)
    };
    let regions = [
        (0, (64 * MIB) as usize),
        (80 * MIB, (120 * MIB) as usize),
        (208 * MIB, (48 * MIB) as usize),
    ];
    sparse_file(&src, size, &regions, 7);
    // The old copy: the source as it was, then 1 % of its blocks changed.
    let old = dir.join("old.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&src)
        .arg(&old));
    let mut rng = Rng::from_env("delta_one_percent");
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < (blocks / 100) as usize {
        changed.insert(rng.range(0, blocks));
    }
    // Two blocks in a source hole hold data on the target.
    changed.insert(66 * MIB / BLOCK);
    changed.insert(203 * MIB / BLOCK + 1);
    // Blocks the source has as zeros over target data: sent as ZERO.
    let mut zeroed_bytes = 0;
    for (k, &i) in changed.iter().enumerate() {
        match (in_hole(i), k % 3) {
            (true, _) => {
                set_block(&old, i, None, 1000 + i);
                zeroed_bytes += BLOCK;
            }
            (false, 0) => set_block(&old, i, None, 1000 + i),
            // The target lost data the source has.
            (false, 1) => set_block(&old, i, Some(0), 0),
            // The source was zeroed where the target holds data.
            (false, _) => {
                set_block(&src, i, Some(0), 0);
                zeroed_bytes += BLOCK;
            }
        }
    }
    let changed_bytes = changed.len() as u64 * BLOCK;
    for engine in ENGINES {
        let rx = Rx::start(&dir.join(format!("rx-{engine}")), &[]);
        let target = rx.target("t.img");
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&old)
            .arg(&target));
        let inode = std::fs::metadata(&target).unwrap().ino();
        let out = rx.send(
            src.to_str().unwrap(),
            "t.img",
            &["--delta", "--io-engine", engine],
        );
        let done = done(&out);
        assert_eq!(done["engine"], engine, "{done}");
        assert_same(&src, &target);
        assert_eq!(
            std::fs::metadata(&target).unwrap().ino(),
            inode,
            "{engine}: the target was replaced, not updated"
        );
        assert_eq!(u(&done, "bytes_changed"), changed_bytes, "{engine}: {done}");
        assert_eq!(u(&done, "bytes_zeroed"), zeroed_bytes, "{engine}: {done}");
        assert_eq!(
            u(&done, "bytes_written"),
            changed_bytes - zeroed_bytes,
            "{engine}: {done}"
        );
        let wire = u(&done, "bytes_on_wire");
        eprintln!(
            "{engine}: {changed_bytes} bytes changed, {wire} on the wire, {:.2} s",
            done["elapsed_s"].as_f64().unwrap_or(0.0)
        );
        let bound = changed_bytes + changed_bytes / 10 + digest_allowance(size);
        assert!(
            wire <= bound,
            "{engine}: {wire} bytes on the wire for {changed_bytes} changed (bound {bound})"
        );
        assert!(done["sync_id"].as_str().is_some_and(|s| s.len() == 32));
        drop(rx);
        std::fs::remove_file(&target).unwrap();
    }
}

#[test]
fn a_target_filled_by_qemu_img_convert_from_an_older_copy_becomes_identical() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let size = 64 * MIB;
    let older = dir.join("older.raw");
    sparse_file(
        &older,
        size,
        &[(0, 8 << 20), (20 << 20, 3 << 20), (40 << 20, 12 << 20)],
        3,
    );
    // The source: a qcow2 of the older copy, changed since with qemu-io
    // (writes, zeroed ranges, a discard, data where there was a hole).
    let src = dir.join("src.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&older)
        .arg(&src));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 3M 200k",
            "-c",
            "write -z 21M 1M",
            "-c",
            "discard 44M 2M",
            "-c",
            "write -P 0x11 30M 64k",
            "-c",
            "write -P 0x77 63M 1M",
        ])
        .arg(&src));
    let changed_at_most = 5 * MIB;
    for engine in ENGINES {
        let rx = Rx::start(&dir.join(format!("rx-{engine}")), &[]);
        let target = rx.target("t.img");
        // Another tool filled the target from the older copy.
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&older)
            .arg(&target));
        let out = rx.send(
            src.to_str().unwrap(),
            "t.img",
            &["--delta", "--delta-block", "64k", "--io-engine", engine],
        );
        let done = done(&out);
        run(Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&src)
            .arg(&target));
        let changed = u(&done, "bytes_changed");
        assert!(
            changed > 0 && changed <= changed_at_most,
            "{engine}: {changed} bytes changed: {done}"
        );
        assert!(
            u(&done, "bytes_on_wire") <= changed + changed / 10 + digest_allowance(size),
            "{engine}: {done}"
        );
        // Again: every block is equal now, nothing but digest requests moves.
        let again = rx.send(
            src.to_str().unwrap(),
            "t.img",
            &["--delta", "--io-engine", engine],
        );
        let again = rx::done(&again);
        assert_eq!(u(&again, "bytes_changed"), 0, "{engine}: {again}");
        assert!(
            u(&again, "bytes_on_wire") <= digest_allowance(size),
            "{engine}: {again}"
        );
        assert_ne!(again["sync_id"], done["sync_id"], "a new pass, a new sync");
    }
}

#[test]
fn an_empty_or_short_target_is_extended_and_becomes_identical() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let size = 24 * MIB;
    let src = dir.join("src.img");
    sparse_file(&src, size, &[(0, 5 << 20), (9 << 20, 7 << 20)], 11);
    for engine in ENGINES {
        let rx = Rx::start(&dir.join(format!("rx-{engine}")), &[]);
        // Empty: every data block of the source differs.
        let empty = rx.target("empty.img");
        std::fs::File::create(&empty).unwrap();
        let out = rx.send(
            src.to_str().unwrap(),
            "empty.img",
            &["--delta", "--io-engine", engine],
        );
        let done_empty = done(&out);
        assert_same(&src, &empty);
        assert_eq!(u(&done_empty, "bytes_changed"), 12 * MIB, "{done_empty}");
        // Short: its first 10 MiB are the source's. 8 MiB windows in 4 KiB
        // blocks take two digest requests each (1024 digests per reply).
        let short = rx.target("short.img");
        std::fs::write(&short, &std::fs::read(&src).unwrap()[..(10 << 20)]).unwrap();
        let out = rx.send(
            src.to_str().unwrap(),
            "short.img",
            &[
                "--delta",
                "--delta-block",
                "4k",
                "--chunk-size",
                "8M",
                "--io-engine",
                engine,
            ],
        );
        let done_short = done(&out);
        assert_same(&src, &short);
        assert_eq!(u(&done_short, "bytes_changed"), 6 * MIB, "{done_short}");
    }
}

#[test]
fn a_target_longer_than_the_source_is_refused_and_left_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let src = dir.join("src.img");
    dense_file(&src, 8 * MIB as usize, 2);
    let rx = Rx::start(&dir.join("rx"), &[]);
    let target = rx.target("t.img");
    dense_file(&target, 12 * MIB as usize, 3);
    let before = std::fs::read(&target).unwrap();
    let out = rx.send(src.to_str().unwrap(), "t.img", &["--delta"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("t.img"),
        "the refusal names the target: {}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        before,
        "the target changed"
    );
}

#[test]
fn an_allow_listed_loop_device_holding_an_older_copy_becomes_identical() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let size = 32 * MIB;
    let src = dir.join("src.img");
    sparse_file(&src, size, &[(0, 6 << 20), (10 << 20, 14 << 20)], 21);
    // The device: the source's bytes, garbage in its holes, and 20 blocks
    // of its data changed.
    let backing = dir.join("backing.img");
    let mut bytes = std::fs::read(&src).unwrap();
    let garbage = random_bytes(size as usize, 77);
    for (o, l) in [(6 << 20, 4 << 20), (24 << 20, 8 << 20)] {
        bytes[o..o + l].copy_from_slice(&garbage[o..o + l]);
    }
    for k in 0..20u64 {
        let at = (k * 17 % 96) * BLOCK + if k % 2 == 0 { 0 } else { 10 * MIB };
        let at = at as usize;
        bytes[at..at + BLOCK as usize].copy_from_slice(&random_bytes(BLOCK as usize, 500 + k));
    }
    std::fs::write(&backing, &bytes).unwrap();
    drop(bytes);
    let dev = blockdev::LoopDevice::attach(&backing);
    let allow = format!("disk={}", dev.path_str());
    let rx = Rx::start(&dir.join("rx"), &["--allow", &allow]);
    for engine in ENGINES {
        let out = rx.send(
            src.to_str().unwrap(),
            "disk",
            &["--delta", "--io-engine", engine],
        );
        let done = done(&out);
        blockdev::assert_range_same(&src, &dev.path, 0, size);
        let changed = u(&done, "bytes_changed");
        // First engine: 12 MiB of holes over garbage and the changed blocks;
        // second: nothing left to change.
        let want = if engine == ENGINES[0] {
            12 * MIB + 20 * BLOCK
        } else {
            0
        };
        assert_eq!(changed, want, "{engine}: {done}");
    }
}
