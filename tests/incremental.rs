//! Incremental sends (issue 16) against real tools: a qcow2 source with a
//! persistent dirty bitmap (`qemu-img bitmap --add`), changed with
//! `qemu-io` (writes of random data, zero writes, discards), served by
//! diskferry's own qemu-nbd child (`--bitmap=NAME`), sent to a real
//! `diskferry serve` over mutual TLS on loopback, on both I/O engines. The
//! target is compared with the source by `qemu-img compare`.

//! Interrupted passes are in `incremental_kill.rs`.

mod common;
#[path = "support/incr.rs"]
mod incr;
#[path = "support/rx.rs"]
mod rx;

use common::ENGINES;
use incr::{
    MIB, apply, assert_identical, changed_areas_json, digest, granule_bytes, merged,
    overhead_bytes, random_changes, run, s, source_image, text,
};
use rx::{Rng, Rx, done, json_u64, stderr};

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
        let bytes_changed = json_u64(&inc, "bytes_changed");
        // The bitmap marks whole granules: what it names covers the
        // changes and is no more than their granules.
        let granules = granule_bytes(&changed);
        assert!(
            bytes_changed >= changed.iter().map(|r| r.1).sum::<u64>() && bytes_changed <= granules,
            "{engine}: {bytes_changed} bytes changed; the writes touch {granules} bytes of granules"
        );
        let wire = json_u64(&inc, "bytes_on_wire");
        eprintln!(
            "{engine}: bitmap pass: {bytes_changed} bytes changed ({} written by qemu-io), {} read, {wire} on the wire",
            changed.iter().map(|r| r.1).sum::<u64>(),
            json_u64(&inc, "bytes_read")
        );
        let bound = bytes_changed + bytes_changed / 20 + overhead_bytes(changed.len());
        assert!(
            wire <= bound,
            "{engine}: {wire} bytes on the wire for {bytes_changed} changed (bound {bound})"
        );
        assert!(
            json_u64(&inc, "bytes_read") <= bytes_changed,
            "{engine}: read more than changed: {inc}"
        );
        // Progress counted what the pass moves, not the disk.
        let planned = json_u64(&inc, "bytes_planned");
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
        assert_eq!(json_u64(&inc, "bytes_changed"), exact, "{engine}: {inc}");
        assert_eq!(text(&inc, "change_id"), "52 de/17");
        assert_eq!(text(&inc, "base_sync_id"), sync2);
        let wire = json_u64(&inc, "bytes_on_wire");
        eprintln!("{engine}: changed-areas pass: {exact} bytes changed, {wire} on the wire");
        let bound = exact + exact / 20 + overhead_bytes(changed.len());
        assert!(
            wire <= bound,
            "{engine}: {wire} bytes on the wire for {exact} changed (bound {bound})"
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
            json_u64(&inc, "bytes_changed") <= granule_bytes(&merged(&changes)),
            "{engine}: {inc}"
        );
    }
}
