//! EIO on the receiver's target: an allow-listed loop device whose backing
//! file (nbdkit `memory` behind the `error` filter, mounted by `nbdfuse`)
//! fails writes. `send` must fail with the target-failed exit code (4),
//! never report success, and the receiver's journal must vouch only for
//! ranges that really hold the source's bytes; once the device heals, a
//! rerun resumes and completes with the target equal to the source.
//!
//! (This kernel has no device-mapper, so the issue's "nbdkit-backed loop
//! device" stands in for a dm `error`/`flakey` table.)

#[path = "support/blockdev.rs"]
mod blockdev;
mod common;
#[path = "support/rx.rs"]
mod rx;

use blockdev::*;
use common::*;
use std::path::Path;
use std::time::Duration;

const MIB: u64 = 1 << 20;
const SIZE_BYTES: u64 = 32 * MIB;

fn source(p: &Path) {
    let regions: Vec<(u64, usize)> = (0..SIZE_BYTES / MIB)
        .filter(|i| i % 3 != 1)
        .map(|i| (i * MIB, MIB as usize))
        .collect();
    sparse_file(p, SIZE_BYTES, &regions, 404);
}

/// A send that must fail because the target does: exit 4, no `done`.
fn send_fails_on_the_target(rx: &rx::Rx, src: &str, what: &str) {
    let cmd = rx.send_cmd(
        src,
        "disk",
        &["--retry-for", "20s", "--stall-timeout", "5s"],
    );
    let out = rx::Bg::spawn(cmd).wait(Duration::from_secs(90));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("\"event\":\"done\""),
        "{what}: a send onto a failing target reported success: {stdout}"
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "{what}: want the target-failed exit code 4; stderr: {}",
        rx::stderr(&out)
    );
    eprintln!(
        "{what}: send failed as it should: {}",
        rx::stderr(&out).trim()
    );
}

/// Every range the receiver's journal calls durable holds the source's
/// bytes on the device; returns the durable bytes.
fn journal_tells_the_truth(rx: &rx::Rx, src: &Path, dev: &Path, what: &str) -> u64 {
    let Some(j) = rx.journal("disk") else {
        return 0;
    };
    assert!(
        !j.complete,
        "{what}: journal marked complete after a failed send"
    );
    let mut at = 0;
    for (o, n) in j
        .durable
        .missing(SIZE_BYTES)
        .into_iter()
        .chain([(SIZE_BYTES, 0)])
    {
        if o > at {
            assert_range_same(src, dev, at, o - at);
        }
        at = o + n;
    }
    let durable = j.durable.covered_bytes();
    eprintln!(
        "{what}: journal vouches for {durable} bytes in {} ranges, all equal to the source",
        j.durable.len()
    );
    durable
}

/// Sends onto a failing device, then heals it and sends again: the
/// journal stays true throughout and the healed send completes.
fn fail_then_heal(d: &Path, dev: &LoopDevice, fail: impl Fn(), heal: impl Fn()) {
    let src = d.join("src.img");
    source(&src);
    let src_s = src.to_str().unwrap();
    let allow = format!("disk={}", dev.path_str());
    let rx = rx::Rx::start(d, &["--allow", &allow, "--checkpoint-interval", "100ms"]);

    fail();
    send_fails_on_the_target(&rx, src_s, "first send");
    let first = journal_tells_the_truth(&rx, &src, &dev.path, "after the first send");
    send_fails_on_the_target(&rx, src_s, "second send, still failing");
    let second = journal_tells_the_truth(&rx, &src, &dev.path, "after the second send");
    assert!(
        second >= first,
        "the journal lost durable ranges: {first} then {second}"
    );

    heal();
    let done = rx::done(&rx.send(src_s, "disk", &["--verify"]));
    assert_eq!(done["verified"], true, "{done}");
    assert_range_same(&src, &dev.path, 0, SIZE_BYTES);
    let j = rx.journal("disk").expect("journal after a completed send");
    assert!(j.complete, "journal not complete after the healed send");
    if second > 0 {
        assert_eq!(
            done["resumed"], true,
            "a journal of {second} bytes was not resumed: {done}"
        );
    }
}

/// The device's backing file lives on a 12 MiB tmpfs: writes past what it
/// holds fail (the loop device turns ENOSPC into EIO); growing the tmpfs
/// heals it.
#[test]
fn eio_from_a_full_backing_store_fails_the_send_and_keeps_the_journal_true() {
    let d = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&d.path().join("small"), "12M").expect("mount a tmpfs (needs root)");
    let backing = d.path().join("small/backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(SIZE_BYTES)
        .unwrap();
    let dev = LoopDevice::attach(&backing);
    fail_then_heal(d.path(), &dev, || {}, || fs.resize("64M"));
    drop(dev);
}

/// The device's backing file is an NBD export (nbdkit `memory` behind the
/// `error` filter, mounted by nbdfuse) failing 30 % of writes at random.
#[test]
fn random_eio_fails_the_send_and_keeps_the_journal_true() {
    let d = tempfile::tempdir().unwrap();
    let failing = FailingFile::start(d.path(), "32M", 30);
    let dev = LoopDevice::attach(&failing.file());
    fail_then_heal(d.path(), &dev, || failing.fail_writes(), || failing.heal());
    drop(dev);
}
