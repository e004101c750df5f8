//! `send --delta` under faults: the sender killed -9, the receiver killed
//! -9 with a simulated power loss, every stream reset with digest requests
//! in flight. Real files, a real `diskferry serve` over mutual TLS on
//! loopback (behind a fault proxy for the resets); both I/O engines; each
//! ends with a byte comparison.

mod common;
#[path = "support/faultproxy.rs"]
mod faultproxy;
#[path = "support/rx.rs"]
mod rx;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rx::*;

const MIB: u64 = 1 << 20;

/// The durable bytes of the receiver's journal file `path`, read directly
/// while the receiver runs (opening the journal store would remove its
/// in-flight temporary files).
fn journaled_bytes(path: &Path) -> u64 {
    std::fs::read(path)
        .ok()
        .and_then(|b| diskferry::journal::Journal::decode(&b).ok())
        .map_or(0, |j| j.durable.covered_bytes())
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

/// An older copy of `src` at `target`: every other MiB from `first` on
/// holds other bytes.
fn older_copy(src: &Path, target: &Path, size: u64, first: u64, seed: u64) {
    run(Command::new("cp").arg(src).arg(target));
    for i in (first..size / MIB).step_by(2) {
        write_at(target, i * MIB, &random_bytes(MIB as usize, seed + i));
    }
}

#[test]
fn sender_killed_mid_delta_reruns_to_identical_without_sending_it_all_again() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let size = 64 * MIB;
    let src = dir.join("src.img");
    dense_file(&src, size as usize, 5);
    for engine in ENGINES {
        let rx = Rx::start(
            &dir.join(format!("rx-{engine}")),
            &["--checkpoint-interval", "200ms"],
        );
        let target = rx.target("t.img");
        // An older copy: every other MiB differs.
        older_copy(&src, &target, size, 0, 900);
        let args = ["--delta", "--io-engine", engine, "--rate", "8M"];
        let journal = rx.journal_path("t.img");
        let mut bg = Bg::spawn(rx.send_cmd(src.to_str().unwrap(), "t.img", &args));
        let started = Instant::now();
        let journaled = loop {
            std::thread::sleep(Duration::from_millis(100));
            let held = journaled_bytes(&journal);
            if held >= 8 * MIB {
                break held;
            }
            assert!(
                bg.running(),
                "{engine}: the send ended before it was killed"
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{engine}: nothing journaled"
            );
        };
        bg.kill9();
        assert!(journaled < size, "{engine}: killed too late");
        let out = rx.send(
            src.to_str().unwrap(),
            "t.img",
            &["--delta", "--io-engine", engine],
        );
        let done = done(&out);
        assert_same(&src, &target);
        // What was durable is not compared again, and what arrived but was
        // not journaled compares equal: less than the whole change moves.
        assert!(
            u(&done, "bytes_on_wire") < size / 2 - MIB,
            "{engine}: the rerun sent {}",
            done
        );
    }
}

#[test]
fn receiver_killed_mid_delta_with_a_power_loss_is_repaired_and_the_send_completes_verified() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let size = 64 * MIB;
    let src = dir.join("src.img");
    dense_file(&src, size as usize, 8);
    let mut rng = Rng::from_env("delta_receiver_killed");
    for engine in ENGINES {
        let mut rx = Rx::start(
            &dir.join(format!("rx-{engine}")),
            &["--checkpoint-interval", "200ms"],
        );
        let target = rx.target("t.img");
        older_copy(&src, &target, size, 1, 700);
        let args = [
            "--delta",
            "--io-engine",
            engine,
            "--rate",
            "8M",
            "--retry-for",
            "60s",
            "--verify",
        ];
        let journal_file = rx.journal_path("t.img");
        let mut bg = Bg::spawn(rx.send_cmd(src.to_str().unwrap(), "t.img", &args));
        let started = Instant::now();
        while journaled_bytes(&journal_file) < 4 * MIB {
            if !bg.running() {
                let out = bg.wait(Duration::from_secs(1));
                panic!("{engine}: the send ended before the kill: {}", stderr(&out));
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{engine}: nothing journaled; receiver log: {}",
                rx.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(rng.range(0, 500)));
        rx.kill9();
        // A power loss: whatever was not journaled may be garbage now.
        let journal = rx.journal("t.img");
        let garbage = garbage_outside_journal(&target, journal.as_ref(), size, rng.next());
        assert!(garbage > 0, "{engine}: the job was over before the kill");
        rx.spawn();
        let out = bg.wait(Duration::from_secs(120));
        let done = done(&out);
        assert_eq!(done["verified"], true, "{done}");
        assert!(u(&done, "reconnects") >= 1, "{done}");
        assert_same(&src, &target);
    }
}

#[test]
fn every_stream_reset_mid_delta_reconnects_and_the_pass_completes_identical() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let size = 64 * MIB;
    let src = dir.join("src.img");
    dense_file(&src, size as usize, 13);
    for engine in ENGINES {
        let rx = Rx::start(&dir.join(format!("rx-{engine}")), &[]);
        let target = rx.target("t.img");
        older_copy(&src, &target, size, 0, 300);
        let proxy = faultproxy::FaultProxy::start(rx.addr.parse().unwrap());
        let args = [
            "--delta",
            "--io-engine",
            engine,
            "--rate",
            "8M",
            "--stall-timeout",
            "3s",
        ];
        let to = proxy.addr().to_string();
        let mut bg = Bg::spawn(rx.send_cmd_to(&to, src.to_str().unwrap(), "t.img", &args));
        let started = Instant::now();
        while proxy.bytes_forwarded() < 8 * MIB {
            assert!(bg.running(), "{engine}: the send ended before the reset");
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{engine}: no progress through the proxy"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Every stream loses its connection with digest requests in flight.
        proxy.reset_all();
        let out = bg.wait(Duration::from_secs(120));
        let done = done(&out);
        assert!(u(&done, "reconnects") >= 1, "{engine}: {done}");
        assert!(proxy.connections() > 4, "{engine}: no new connection");
        assert!(u(&done, "bytes_changed") >= size / 2, "{engine}: {done}");
        assert_same(&src, &target);
    }
}
