//! Helpers of the resume and fault tests (`resume_faults.rs`,
//! `resume_outages.rs`): sparse sources, sends slowed in the background,
//! waits, checks that a failed send invented no data, a report of what a
//! `done` event measured.
//!
//! Include with `#[path = "support/faulted.rs"] mod faulted;` next to
//! `mod common;` and `#[path = "support/rx.rs"] mod rx;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::{allocated, sparse_file};
use crate::rx::{Bg, Rng, Rx, stderr};

pub const MIB: u64 = 1 << 20;
/// Size of the sparse sources.
pub const SOURCE_BYTES: u64 = 160 * MIB;
/// Data regions in a sparse source, each this long.
pub const REGIONS: u64 = 8;
pub const REGION_BYTES: u64 = 12 * MIB;
/// Slow enough that ~96 MiB of data take ~1.6 s: faults land mid-transfer.
pub const RATE: &str = "60M";
/// Progress seen before a fault is injected.
pub const FAULT_AFTER_BYTES: u64 = 16 * MIB;
/// Longest a send in these tests may take.
pub const SEND_LIMIT: Duration = Duration::from_secs(40);

/// Tests using this load both cores and time things: one at a time.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A sparse source of [`SOURCE_BYTES`] with [`REGIONS`] random data
/// regions, one in each 20 MiB slot at a seeded MiB offset.
pub fn sparse_source(dir: &Path, rng: &mut Rng) -> PathBuf {
    let p = dir.join("src.img");
    let slot = SOURCE_BYTES / REGIONS;
    let regions: Vec<(u64, usize)> = (0..REGIONS)
        .map(|i| {
            let shift = rng.range(0, (slot - REGION_BYTES) / MIB + 1) * MIB;
            (i * slot + shift, REGION_BYTES as usize)
        })
        .collect();
    sparse_file(&p, SOURCE_BYTES, &regions, rng.next());
    p
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Polls `cond` every 10 ms; panics after `limit` naming `what`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes allocated for `p` (0 while it does not exist).
pub fn allocated_or_zero(p: &Path) -> u64 {
    if p.exists() { allocated(p) } else { 0 }
}

pub fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("done event has no {key}: {v}"))
}

/// Prints the figures of a `done` event a reader of `--nocapture` wants.
pub fn report(test: &str, d: &serde_json::Value, elapsed: Duration) {
    eprintln!(
        "{test}: exit 0 in {:.2} s; reconnects {}, rounds {}, bytes_resent {}, \
         bytes_resumed_skipped {}, resumed {}, bytes_written {}, bytes_on_wire {}",
        elapsed.as_secs_f64(),
        d["reconnects"],
        d["rounds"],
        d["bytes_resent"],
        d["bytes_resumed_skipped"],
        d["resumed"],
        d["bytes_written"],
        d["bytes_on_wire"],
    );
}

/// A failed send: not a success, no `done` event.
pub fn assert_failed(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}; stderr: {}",
        stderr(out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("\"event\":\"done\""),
        "a failed send printed a done event: {stdout}"
    );
}

/// The receiver never invents data: every byte of `dst` is the source's
/// byte at that offset, or zero (not written yet). Returns the bytes of
/// `dst` that hold source data other than zero.
pub fn assert_no_invented(src: &Path, dst: &Path) -> u64 {
    let s = std::fs::read(src).unwrap();
    let t = std::fs::read(dst).unwrap();
    assert_eq!(s.len(), t.len(), "target size differs from the source's");
    let mut present = 0u64;
    for (i, (a, b)) in s.iter().zip(&t).enumerate() {
        if b != a && *b != 0 {
            panic!(
                "target byte {i} is {b:#04x}: neither the source's {a:#04x} nor zero (invented data)"
            );
        }
        present += u64::from(*b != 0);
    }
    present
}

/// A send in the background through `to` (a proxy or the receiver).
pub fn send_bg(rx: &Rx, to: &str, src: &Path, target: &str, extra: &[&str]) -> Bg {
    Bg::spawn(rx.send_cmd_to(to, path_str(src), target, extra))
}
