//! Content never chooses how a file is opened: a file is raw unless the
//! user names its format (`--src-format` / `--dst-format`) or its extension
//! does. A raw disk whose guest wrote a qcow2 header pointing at a host file
//! is copied (and sent) as the raw bytes it is, and that host file is never
//! read. Real qemu-img / qemu-io make the images.

mod common;
#[path = "support/rx.rs"]
mod rx;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;
/// What the host file holds: must never show up in a target.
const SECRET: &[u8] = b"HOST-SECRET-diskferry-must-never-read-this-file!";

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A host file with the secret repeated (1 MiB), and `disk.img`: a raw
/// disk of 2 MiB whose first bytes are a 64 MiB qcow2 header with that
/// file as its raw backing file, and a pattern at 1 MiB.
fn hostile_raw_disk(dir: &Path) -> (PathBuf, PathBuf) {
    let secret = dir.join("secret");
    let mut bytes = Vec::new();
    while bytes.len() < MIB as usize {
        bytes.extend_from_slice(SECRET);
    }
    std::fs::write(&secret, &bytes).unwrap();
    let disk = dir.join("disk.img");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            secret.to_str().unwrap(),
            "-F",
            "raw",
            disk.to_str().unwrap(),
            "64M",
        ],
    );
    write_at(&disk, MIB, &random_bytes(MIB as usize, 7));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 2 * MIB);
    let header = std::fs::read(&disk).unwrap();
    assert_eq!(
        &header[..4],
        b"QFI\xfb",
        "the raw disk must start with a qcow2 header"
    );
    (disk, secret)
}

/// The target holds exactly the raw disk's bytes and nothing of the host
/// file (which a qcow2 reading would have shown through its backing file).
fn assert_raw_copy(disk: &Path, target: &Path) {
    assert_eq!(
        std::fs::metadata(target).unwrap().len(),
        2 * MIB,
        "the target must have the raw file's size, not the qcow2 header's virtual 64 MiB"
    );
    assert_same(disk, target);
    let copied = std::fs::read(target).unwrap();
    assert!(
        !copied.windows(SECRET.len()).any(|w| w == SECRET),
        "the backing file's contents reached the target"
    );
}

#[test]
fn a_raw_disk_with_a_qcow2_header_is_copied_as_raw() {
    let d = tempfile::tempdir().unwrap();
    let (disk, _secret) = hostile_raw_disk(d.path());
    for e in ENGINES {
        let target = d.path().join(format!("out-{e}.img"));
        copy_ok(disk.to_str().unwrap(), target.to_str().unwrap(), e, &[]);
        assert_raw_copy(&disk, &target);
    }
    // `--src-format raw` says the same of a file named .qcow2.
    let named = d.path().join("guest.qcow2");
    std::fs::copy(&disk, &named).unwrap();
    let target = d.path().join("out-named.img");
    copy_ok(
        named.to_str().unwrap(),
        target.to_str().unwrap(),
        "uring",
        &["--src-format", "raw"],
    );
    assert_raw_copy(&disk, &target);
}

#[test]
fn a_raw_target_with_a_qcow2_header_is_written_as_raw() {
    let d = tempfile::tempdir().unwrap();
    let (disk, secret) = hostile_raw_disk(d.path());
    let source = d.path().join("source.img");
    sparse_file(
        &source,
        2 * MIB,
        &[(0, 64 * 1024), (MIB + 4096, 100_000)],
        3,
    );
    for e in ENGINES {
        // The existing target carries a qcow2 header (with a backing file).
        let target = d.path().join(format!("target-{e}.img"));
        std::fs::copy(&disk, &target).unwrap();
        copy_ok(source.to_str().unwrap(), target.to_str().unwrap(), e, &[]);
        assert_same(&source, &target);
    }
    assert_eq!(std::fs::read(&secret).unwrap()[..SECRET.len()], *SECRET);
}

#[test]
fn a_raw_disk_with_a_qcow2_header_is_sent_as_raw() {
    let d = tempfile::tempdir().unwrap();
    let (disk, _secret) = hostile_raw_disk(d.path());
    let rx = rx::Rx::start(&d.path().join("rx"), &[]);
    for e in ENGINES {
        let name = format!("sent-{e}.img");
        let out = rx.send(disk.to_str().unwrap(), &name, &["--io-engine", e]);
        rx::done(&out);
        assert_raw_copy(&disk, &rx.target(&name));
    }
}

/// A qcow2 image with 64 KiB of 0xab at 1 MiB, named `name`, and its
/// contents as qemu-img reads them.
fn qcow2_named(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let image = dir.join(name);
    let path = image.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", path, "16M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xab 1M 64k", path],
    );
    let reference = dir.join(format!("{name}.ref"));
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            path,
            reference.to_str().unwrap(),
        ],
    );
    (image, reference)
}

#[test]
fn a_named_format_opens_a_file_whatever_its_name() {
    let d = tempfile::tempdir().unwrap();
    let (image, reference) = qcow2_named(d.path(), "x.img");
    for e in ENGINES {
        let target = d.path().join(format!("virtual-{e}.raw"));
        copy_ok(
            image.to_str().unwrap(),
            target.to_str().unwrap(),
            e,
            &["--src-format", "qcow2"],
        );
        assert_same(&reference, &target);
    }
    // Without the flag the same file is raw: its own bytes, header and all.
    let target = d.path().join("bytes.raw");
    copy_ok(
        image.to_str().unwrap(),
        target.to_str().unwrap(),
        "uring",
        &[],
    );
    assert_same(&image, &target);

    // --dst-format: a new target named .img written as qcow2.
    let target = d.path().join("new.img");
    copy_ok(
        reference.to_str().unwrap(),
        target.to_str().unwrap(),
        "uring",
        &["--dst-format", "qcow2"],
    );
    let back = d.path().join("back.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            target.to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    );
    assert_same(&reference, &back);

    // send --src-format qcow2 sends the virtual disk.
    let rx = rx::Rx::start(&d.path().join("rx"), &[]);
    let out = rx.send(
        image.to_str().unwrap(),
        "virtual.raw",
        &["--src-format", "qcow2"],
    );
    rx::done(&out);
    assert_same(&reference, &rx.target("virtual.raw"));
}

#[test]
fn a_bad_format_is_a_usage_error() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    sparse_file(&src, MIB, &[(0, 4096)], 1);
    let dst = d.path().join("dst.img");
    let (s, t) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let cases: [&[&str]; 3] = [
        &["copy", s, t, "--src-format", "qcow3"],
        &["copy", s, t, "--dst-format", "iso"],
        &[
            "send",
            s,
            "--to",
            "127.0.0.1:9",
            "--target",
            "x",
            "--insecure-plaintext",
            "--src-format",
            "bochs",
        ],
    ];
    for args in cases {
        let out = diskferry().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("qcow2")
                && (stderr.contains("possible values") || stderr.contains("format")),
            "{args:?} should list the formats or name the problem: {stderr}"
        );
    }
    assert!(!dst.exists(), "nothing may be created on a usage error");
}
