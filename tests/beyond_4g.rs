//! A disk with data beyond 4 GiB (offsets that do not fit in 32 bits):
//! a 6 GiB sparse source with islands at 0, straddling the 4 GiB boundary
//! and at 5.5 GiB, through `copy` (file and NBD source) and `send`, on both
//! I/O engines. Only the islands are compared (the rest must be holes: the
//! target stays sparse and its data extents are the islands).

#[path = "support/blockdev.rs"]
mod blockdev;
mod common;
#[path = "support/rx.rs"]
mod rx;

use blockdev::assert_range_same;
use common::*;
use diskferry::endpoint::file::data_extents;
use std::path::Path;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SIZE_BYTES: u64 = 6 * GIB;

/// The islands: (offset, bytes).
const ISLANDS: [(u64, u64); 4] = [
    (0, 64 * KIB),
    // Straddles 4 GiB: starts 4 KiB below it, ends 1 MiB above.
    (4 * GIB - 4 * KIB, MIB + 4 * KIB),
    (5 * GIB + GIB / 2, 3 * MIB),
    (SIZE_BYTES - 4 * KIB, 4 * KIB),
];

fn source(p: &Path) {
    let regions: Vec<(u64, usize)> = ISLANDS.iter().map(|&(o, n)| (o, n as usize)).collect();
    sparse_file(p, SIZE_BYTES, &regions, 4242);
}

/// The target equals the source over the islands, has the source's size,
/// and holds data only where the islands are (within 1 MiB of them).
fn check(src: &Path, dst: &Path, what: &str) {
    assert_eq!(std::fs::metadata(dst).unwrap().len(), SIZE_BYTES, "{what}");
    for &(o, n) in &ISLANDS {
        assert_range_same(src, dst, o, n);
    }
    let f = std::fs::File::open(dst).unwrap();
    let mut extents = Vec::new();
    data_extents(&f, 0, SIZE_BYTES, &mut extents).unwrap();
    for &(o, n) in &extents {
        assert!(
            ISLANDS
                .iter()
                .any(|&(io, in_)| o + MIB >= io && o + n <= io + in_ + MIB),
            "{what}: data at {o} ({n} bytes) is no island's: {extents:?}"
        );
    }
    let island_bytes: u64 = ISLANDS.iter().map(|i| i.1).sum();
    assert!(
        allocated(dst) <= island_bytes + 8 * MIB,
        "{what}: target is not sparse ({} bytes allocated)",
        allocated(dst)
    );
}

#[test]
fn copy_of_a_disk_with_data_beyond_4_gib() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    source(&src);
    let q = qemu_nbd(d.path(), "src", &src, "raw", true, &[]);
    for e in ENGINES {
        for (kind, from) in [
            ("file", src.to_str().unwrap().to_string()),
            ("nbd", q.uri()),
        ] {
            let dst = d.path().join(format!("{kind}-{e}.img"));
            copy_ok(&from, dst.to_str().unwrap(), e, &[]);
            check(&src, &dst, &format!("copy from {kind} ({e})"));
            std::fs::remove_file(&dst).unwrap();
        }
    }
}

#[test]
fn send_of_a_disk_with_data_beyond_4_gib() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    source(&src);
    let rx = rx::Rx::start(d.path(), &[]);
    for e in ENGINES {
        let name = format!("big-{e}.img");
        let done = rx::done(&rx.send(
            src.to_str().unwrap(),
            &name,
            &["--io-engine", e, "--verify"],
        ));
        assert_eq!(done["verified"], true, "{done}");
        assert_eq!(done["size_bytes"], SIZE_BYTES, "{done}");
        check(&src, &rx.target(&name), &format!("send ({e})"));
    }
}
