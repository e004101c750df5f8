//! `--write-mode direct` into a file, and a loop block device (written with
//! O_DIRECT, the default for block devices) as a `copy` target and as an
//! allow-listed `serve --allow NAME=/dev/loopN` target. The device starts
//! full of garbage, so a hole the copy failed to zero shows in the compare.
//! Loop devices are detached on drop, also when a test fails.

#[path = "support/blockdev.rs"]
mod blockdev;
mod common;
#[path = "support/rx.rs"]
mod rx;

use blockdev::*;
use common::*;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// A sparse source of `size` bytes with islands at odd places.
fn source(p: &Path, size: u64) {
    let regions = [
        (0, 4096),
        (MIB + 512, 70_000),
        (5 * MIB, 3 * MIB as usize),
        (size - 6000, 6000),
    ];
    sparse_file(p, size, &regions, 31);
}

/// A device-sized backing file full of garbage, and its loop device.
fn garbage_device(dir: &Path, size: u64) -> LoopDevice {
    let backing = dir.join("backing.img");
    dense_file(&backing, size as usize, 99);
    LoopDevice::attach(&backing)
}

#[test]
fn write_mode_direct_into_a_file() {
    let d = tempfile::tempdir().unwrap();
    // An odd size: the tail is not a whole O_DIRECT block.
    let src = d.path().join("src.img");
    source(&src, 24 * MIB + 1536);
    for e in ENGINES {
        let dst = d.path().join(format!("direct-{e}.img"));
        copy_ok(
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            e,
            &["--write-mode", "direct"],
        );
        assert_same(&src, &dst);
        assert!(
            allocated(&dst) <= allocated(&src) + 2 * MIB,
            "{e}: target is not sparse"
        );
    }
}

#[test]
fn a_loop_device_as_copy_target() {
    let d = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    let src = d.path().join("src.img");
    source(&src, size);
    // The device is larger than the source: the copy fills its start.
    let dev = garbage_device(d.path(), size + 4 * MIB);
    for e in ENGINES {
        for mode in ["auto", "direct"] {
            copy_ok(
                src.to_str().unwrap(),
                dev.path_str(),
                e,
                &["--write-mode", mode],
            );
            assert_range_same(&src, &dev.path, 0, size);
            // Scribble over it again for the next round.
            write_at(&dev.path, 0, &random_bytes(size as usize, 5));
        }
    }
}

#[test]
fn a_loop_device_as_an_allow_listed_serve_target() {
    let d = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    let src = d.path().join("src.img");
    source(&src, size);
    let dev = garbage_device(d.path(), size);
    let allow = format!("disk={}", dev.path_str());
    let rx = rx::Rx::start(d.path(), &["--allow", &allow]);
    for e in ENGINES {
        let done = rx::done(&rx.send(
            src.to_str().unwrap(),
            "disk",
            &["--io-engine", e, "--verify", "--restart"],
        ));
        assert_eq!(done["verified"], true, "{done}");
        assert_range_same(&src, &dev.path, 0, size);
        write_at(&dev.path, 0, &random_bytes(size as usize, 6));
    }
}
