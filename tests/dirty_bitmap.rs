//! The plan of a pass from a qcow2 dirty bitmap, against real qemu-img,
//! qemu-io, qemu-nbd (`-B NAME`) and, as a cross-check, nbdinfo's view of
//! the same contexts. Every tool is started by the test; a missing one
//! fails it.

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use diskferry::plan::changed_areas;
use diskferry::plan::dirty::{self, DirtyMapError};
use diskferry::plan::{PassKind, PassPlan};

const MIB: u64 = 1 << 20;
const GRANULE: u64 = 64 * 1024;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A 16 MiB qcow2 with 0xcd over its first 8 MiB, then bitmap `b0`, then
/// the `changes` (qemu-io commands) made after the bitmap.
fn image(dir: &Path, changes: &[&str]) -> String {
    image_of(dir, "16M", changes)
}

fn image_of(dir: &Path, size: &str, changes: &[&str]) -> String {
    let img = dir.join("img.qcow2").to_str().unwrap().to_string();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, size]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xcd 0 8M", &img],
    );
    run("qemu-img", &["bitmap", "--add", &img, "b0"]);
    let mut args = vec!["-f", "qcow2"];
    for c in changes {
        args.extend(["-c", c]);
    }
    args.push(&img);
    run("qemu-io", &args);
    img
}

fn stream(server: &common::Server) -> UnixStream {
    let s = UnixStream::connect(&server.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn ranges(plan: &PassPlan, kind: PassKind) -> Vec<(u64, u64)> {
    plan.of_kind(kind).map(|e| (e.offset, e.len)).collect()
}

/// `nbdinfo --map=CONTEXT --json`: (offset, length, type) of each extent.
fn nbdinfo_map(server: &common::Server, context: &str) -> Vec<(u64, u64, u64)> {
    let json = run(
        "nbdinfo",
        &[&format!("--map={context}"), "--json", &server.uri()],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let f = |k: &str| e[k].as_u64().unwrap();
            (f("offset"), f("length"), f("type"))
        })
        .collect()
}

/// Sorted, merged ranges of the extents whose type passes `keep`.
fn merged(map: &[(u64, u64, u64)], keep: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l, _) in map.iter().filter(|e| keep(e.2)) {
        match out.last_mut() {
            Some((lo, ll)) if *lo + *ll == o => *ll += l,
            _ => out.push((o, l)),
        }
    }
    out
}

/// Copy ∪ Zero is exactly what nbdinfo calls dirty; Copy is what it calls
/// dirty and not zero, Zero dirty and zero.
fn cross_check_with_nbdinfo(server: &common::Server, plan: &PassPlan) {
    let bitmap = nbdinfo_map(server, "qemu:dirty-bitmap:b0");
    let alloc = nbdinfo_map(server, "base:allocation");
    let is_dirty = |b: u64| {
        bitmap
            .iter()
            .any(|&(o, l, t)| t & 1 != 0 && o <= b && b < o + l)
    };
    let is_zero = |b: u64| {
        alloc
            .iter()
            .any(|&(o, l, t)| t & 2 != 0 && o <= b && b < o + l)
    };
    let changed = merged(
        &plan
            .extents()
            .iter()
            .filter(|e| e.kind != PassKind::Unchanged)
            .map(|e| (e.offset, e.len, 1))
            .collect::<Vec<_>>(),
        |_| true,
    );
    assert_eq!(changed, merged(&bitmap, |t| t & 1 != 0), "changed = dirty");
    // Granule by granule (extents are granule-aligned here).
    for e in plan.extents() {
        for g in (e.offset..e.offset + e.len).step_by(GRANULE as usize) {
            let want = match (is_dirty(g), is_zero(g)) {
                (false, _) => PassKind::Unchanged,
                (true, false) => PassKind::Copy,
                (true, true) => PassKind::Zero,
            };
            assert_eq!(e.kind, want, "granule at {g}");
        }
    }
}

#[test]
fn dirty_bitmap_plan_covers_exactly_the_writes_and_discards() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(
        dir.path(),
        &[
            "write -P 0xab 1M 64k",
            "discard 4M 64k",
            "write -P 0x11 10M 100k",
            "write -z 12M 128k",
        ],
    );
    let server = common::qemu_nbd(
        dir.path(),
        "src",
        Path::new(&img),
        "qcow2",
        true,
        &["-B", "b0"],
    );
    let mut client = dirty::connect(stream(&server), "", "b0").unwrap();
    let plan = dirty::map_pass(&mut client, "b0").unwrap();
    assert_eq!(plan.size_bytes(), 16 * MIB);
    // 100 KiB at 10 MiB dirties two 64 KiB granules, both allocated data.
    assert_eq!(
        ranges(&plan, PassKind::Copy),
        vec![(MIB, GRANULE), (10 * MIB, 2 * GRANULE)]
    );
    assert_eq!(
        ranges(&plan, PassKind::Zero),
        vec![(4 * MIB, GRANULE), (12 * MIB, 2 * GRANULE)]
    );
    assert_eq!(plan.bytes(PassKind::Unchanged), 16 * MIB - 6 * GRANULE);
    // What Copy names holds the new bytes; what Zero names reads as zeros.
    let mut buf = vec![0u8; GRANULE as usize];
    client.read(MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xab));
    for (o, _) in ranges(&plan, PassKind::Zero) {
        client.read(o, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "zero extent at {o}");
    }
    cross_check_with_nbdinfo(&server, &plan);
}

#[test]
fn random_writes_and_discards_match_nbdinfo() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed pseudo-random set of unaligned writes, discards and zero
    // writes (seed printed on failure by the assertion messages' offsets).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    let mut cmds = Vec::new();
    for i in 0..24 {
        let off = next(16 * MIB - 300 * 1024);
        let len = 1 + next(300 * 1024);
        cmds.push(match i % 3 {
            0 => format!("write -P {} {off} {len}", 1 + next(254)),
            1 => format!("discard {off} {len}"),
            _ => format!("write -z {off} {len}"),
        });
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let img = image(dir.path(), &refs);
    let server = common::qemu_nbd(
        dir.path(),
        "src",
        Path::new(&img),
        "qcow2",
        true,
        &["-B", "b0"],
    );
    let mut client = dirty::connect(stream(&server), "", "b0").unwrap();
    let plan = dirty::map_pass(&mut client, "b0").unwrap();
    assert!(plan.bytes(PassKind::Copy) > 0 && plan.bytes(PassKind::Zero) > 0);
    cross_check_with_nbdinfo(&server, &plan);
}

/// A disk larger than one BLOCK_STATUS request (1 GiB): changes that
/// straddle a request boundary are planned whole.
#[test]
fn changes_across_block_status_requests_are_planned_whole() {
    let dir = tempfile::tempdir().unwrap();
    let img = image_of(
        dir.path(),
        "3G",
        &[
            "write -P 0xab 1023M 2M",
            "write -P 0x22 2047M 2M",
            "discard 1M 1M",
            "write -P 0x33 3071M 1M",
        ],
    );
    let server = common::qemu_nbd(
        dir.path(),
        "src",
        Path::new(&img),
        "qcow2",
        true,
        &["-B", "b0"],
    );
    let mut client = dirty::connect(stream(&server), "", "b0").unwrap();
    let plan = dirty::map_pass(&mut client, "b0").unwrap();
    assert_eq!(plan.size_bytes(), 3 << 30);
    assert_eq!(
        ranges(&plan, PassKind::Copy),
        vec![
            (1023 * MIB, 2 * MIB),
            (2047 * MIB, 2 * MIB),
            (3071 * MIB, MIB)
        ]
    );
    assert_eq!(ranges(&plan, PassKind::Zero), vec![(MIB, MIB)]);
    cross_check_with_nbdinfo(&server, &plan);
}

/// The same changes given as a changed-areas list (the qemu-io write and
/// discard list, granule-aligned) plan exactly like the bitmap does.
#[test]
fn a_changed_areas_list_of_the_same_writes_plans_like_the_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let changes = [
        (MIB, GRANULE),
        (4 * MIB, GRANULE),
        (10 * MIB, 2 * GRANULE),
        (12 * MIB, 2 * GRANULE),
    ];
    let img = image(
        dir.path(),
        &[
            "write -P 0xab 1M 64k",
            "discard 4M 64k",
            "write -P 0x11 10M 128k",
            "write -z 12M 128k",
        ],
    );
    let server = common::qemu_nbd(
        dir.path(),
        "src",
        Path::new(&img),
        "qcow2",
        true,
        &["-B", "b0"],
    );
    let mut client = dirty::connect(stream(&server), "", "b0").unwrap();
    let from_bitmap = dirty::map_pass(&mut client, "b0").unwrap();
    // Two pages, the second first, areas out of order.
    let area = |&(o, l): &(u64, u64)| serde_json::json!({"start": o, "length": l});
    let text = serde_json::json!([
        {"startOffset": 8 * MIB, "length": 8 * MIB, "changeId": "cbt-1",
         "changedArea": [area(&changes[3]), area(&changes[2])]},
        {"startOffset": 0, "length": 8 * MIB, "changeId": "cbt-1",
         "changedArea": [area(&changes[0]), area(&changes[1])]},
    ])
    .to_string();
    let list = changed_areas::parse(&text, 16 * MIB).unwrap();
    assert_eq!(list.areas, changes);
    assert_eq!(list.change_id.as_deref(), Some("cbt-1"));
    let data = merged(&nbdinfo_map(&server, "base:allocation"), |t| t & 2 == 0);
    assert_eq!(list.plan(&data).unwrap(), from_bitmap);
}

#[test]
fn a_missing_bitmap_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), &["write -P 0xab 1M 64k"]);
    // Exported with another bitmap name asked for, and with none exported.
    for extra in [&["-B", "b0"][..], &[][..]] {
        let server = common::qemu_nbd(dir.path(), "src", Path::new(&img), "qcow2", true, extra);
        let e = dirty::connect(stream(&server), "", "nightly")
            .err()
            .expect("a missing bitmap must be refused");
        assert!(matches!(e, DirtyMapError::BitmapMissing { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("\"nightly\"") && msg.contains("qemu-nbd -B nightly"),
            "{msg}"
        );
        drop(server);
    }
}
