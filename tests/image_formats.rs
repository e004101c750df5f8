//! vmdk and vhdx sources end to end: images made by `qemu-img convert`
//! from a raw file with data islands (named `*.vmdk` / `*.vhdx`), copied
//! with `copy` on both I/O engines and replicated with `send`; every
//! result compared byte for byte with the raw original.

mod common;
#[path = "support/rx.rs"]
mod rx;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 40 * MIB;

fn raw_source(p: &Path) {
    let regions = [
        (0, 4096),
        (MIB + 4096, 200_000),
        (7 * MIB, 5 * MIB as usize),
        (SIZE_BYTES - 8192, 8192),
    ];
    sparse_file(p, SIZE_BYTES, &regions, 606);
}

/// `qemu-img convert -O FORMAT raw DIR/src.FORMAT`.
fn convert(raw: &Path, format: &str) -> PathBuf {
    let out = raw.with_file_name(format!("src.{format}"));
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", format])
        .arg(raw)
        .arg(&out)
        .output()
        .expect("qemu-img runs (install qemu-utils)");
    assert!(
        st.status.success(),
        "qemu-img convert to {format}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

#[test]
fn vmdk_and_vhdx_sources_copy_and_send() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("src.raw");
    raw_source(&raw);
    let rx = rx::Rx::start(d.path(), &[]);
    for format in ["vmdk", "vhdx"] {
        let image = convert(&raw, format);
        let image_s = image.to_str().unwrap();
        for e in ENGINES {
            let dst = d.path().join(format!("from-{format}-{e}.img"));
            copy_ok(image_s, dst.to_str().unwrap(), e, &[]);
            assert_same(&raw, &dst);
            assert!(
                allocated(&dst) <= allocated(&raw) + 2 * MIB,
                "copy of {format} ({e}): target is not sparse"
            );
            let name = format!("sent-{format}-{e}.img");
            let done = rx::done(&rx.send(image_s, &name, &["--io-engine", e, "--verify"]));
            assert_eq!(done["verified"], true, "{done}");
            assert_eq!(done["size_bytes"], SIZE_BYTES, "{done}");
            assert_same(&raw, &rx.target(&name));
        }
    }
}
