//! Resume: the sender or the receiver killed at seeded random points (with
//! a simulated power loss on the receiver), reruns of finished jobs, and
//! journals that cannot be trusted. Every test ends with a byte comparison.
//! Seeds are printed; rerun one with `DISKFERRY_TEST_SEED=N`.

mod common;
#[path = "support/rx.rs"]
mod rx;

use common::*;
use rx::*;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The sender's chunk size (`send --chunk-size` default): resumes re-send
/// whole chunks at the edges of the journal's ranges. One constant, the
/// library's; `send_chunk_size_default_is_the_library_constant` checks the
/// command line uses the same.
const CHUNK: u64 = diskferry::replicate::send::CHUNK_BYTES_DEFAULT as u64;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A sparse source: `size` bytes with random 1 MiB regions every other MiB.
fn source(dir: &Path, size: u64, seed: u64) -> (std::path::PathBuf, Vec<(u64, usize)>) {
    let p = dir.join("src.img");
    let regions: Vec<(u64, usize)> = (0..size / MIB)
        .filter(|i| i % 2 == 0)
        .map(|i| (i * MIB, MIB as usize))
        .collect();
    sparse_file(&p, size, &regions, seed);
    (p, regions)
}

/// Data bytes of `regions` outside the journal's durable ranges.
fn data_missing(regions: &[(u64, usize)], j: Option<&diskferry::journal::Journal>) -> u64 {
    regions
        .iter()
        .map(|&(o, l)| {
            let l = l as u64;
            match j {
                None => l,
                Some(j) => {
                    let covered: u64 = j
                        .durable
                        .iter()
                        .map(|(s, n)| {
                            let a = s.max(o);
                            let b = (s + n).min(o + l);
                            b.saturating_sub(a)
                        })
                        .sum();
                    l - covered
                }
            }
        })
        .sum()
}

/// Kill points: `var` from the environment (`scripts/soak` raises them), or
/// `default`.
fn points(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .max(1)
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// Waits until the receiver has logged `n` paused jobs (the sender's
/// connections closed and the journal was written), at most `limit`.
fn wait_paused(rx: &Rx, n: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if count(&rx.log_text(), "job paused") >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn sender_killed_at_seeded_points_resumes_and_resends_little() {
    let _s = serial();
    let mut rng = Rng::from_env("sender_killed_at_seeded_points");
    let d = tempfile::tempdir().unwrap();
    let size = 96 * MIB;
    let (src, regions) = source(d.path(), size, 11);
    let src_s = src.to_str().unwrap();
    let rx = Rx::start(d.path(), &[]);
    let points = points("DISKFERRY_KILL_POINTS", 10);
    let mut paused = 0u64;
    let (mut total_skipped, mut total_kept) = (0u64, 0u64);
    for k in 0..points {
        let name = format!("p{k}.img");
        let kill_ms = rng.range(80, 600);
        let mut bg = Bg::spawn(rx.send_cmd(src_s, &name, &["--rate", "100M"]));
        std::thread::sleep(Duration::from_millis(kill_ms));
        let finished = !bg.running();
        bg.kill9();
        if !finished && wait_paused(&rx, paused as usize + 1, Duration::from_secs(5)) {
            paused += 1;
        }
        let j = rx.journal(&name);
        let missing = data_missing(&regions, j.as_ref());
        let ranges = j.as_ref().map_or(0, |j| j.durable.len() as u64);
        let out = rx.send(src_s, &name, &[]);
        let v = done(&out);
        let sent = v["bytes_written"].as_u64().unwrap();
        let skipped = v["bytes_resumed_skipped"].as_u64().unwrap();
        eprintln!(
            "point {k}: killed at {kill_ms} ms; journal kept {} data bytes in {ranges} ranges; \
             rerun sent {sent}, skipped {skipped}",
            regions.iter().map(|r| r.1 as u64).sum::<u64>() - missing
        );
        // Everything the journal holds is skipped, except whole-window
        // rounding at the edges of its ranges; nothing missing is skipped.
        assert!(
            sent >= missing,
            "point {k}: sent {sent} < missing {missing}"
        );
        let rounding = 2 * CHUNK * (ranges + 1);
        assert!(
            sent <= missing + rounding,
            "point {k}: re-sent {} bytes the journal held (bound {rounding})",
            sent - missing
        );
        if j.as_ref()
            .is_some_and(|j| j.durable.covered_bytes() >= 2 * CHUNK)
        {
            assert_eq!(v["resumed"], true, "point {k}: {v}");
        }
        total_skipped += skipped;
        total_kept += sent;
        assert_same(&src, &rx.target(&name));
    }
    eprintln!(
        "{points} kill points, {paused} killed mid-transfer; reruns sent {total_kept} bytes and \
         skipped {total_skipped}"
    );
    assert!(
        paused >= points / 2,
        "only {paused} of {points} kills hit a transfer"
    );
    assert!(total_skipped > 0, "no rerun skipped anything");
}

#[test]
fn receiver_killed_with_power_loss_is_repaired_while_the_sender_waits() {
    let _s = serial();
    let mut rng = Rng::from_env("receiver_killed_with_power_loss");
    let d = tempfile::tempdir().unwrap();
    let size = 96 * MIB;
    let (src, regions) = source(d.path(), size, 12);
    let data_total: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let src_s = src.to_str().unwrap();
    let mut rx = Rx::start(d.path(), &["--checkpoint-interval", "200ms"]);
    let points = points("DISKFERRY_RX_KILL_POINTS", 3);
    for k in 0..points {
        let name = format!("r{k}.img");
        let kill_ms = rng.range(250, 700);
        let bg = Bg::spawn(rx.send_cmd(
            src_s,
            &name,
            &[
                "--rate",
                "60M",
                "--stall-timeout",
                "3s",
                "--retry-for",
                "60s",
                "--verify",
            ],
        ));
        std::thread::sleep(Duration::from_millis(kill_ms));
        rx.kill9();
        let j = rx.journal(&name);
        // A power loss: whatever was not journaled may be garbage now.
        let garbage = if rx.target(&name).exists() {
            garbage_outside_journal(&rx.target(&name), j.as_ref(), size, rng.next())
        } else {
            0
        };
        std::thread::sleep(Duration::from_millis(rng.range(100, 800)));
        rx.spawn();
        let out = bg.wait(Duration::from_secs(90));
        let v = done(&out);
        eprintln!(
            "point {k}: receiver killed at {kill_ms} ms with {} bytes journaled; {garbage} bytes \
             overwritten with garbage; reconnects {}, rounds {}, re-sent {}",
            j.as_ref().map_or(0, |j| j.durable.covered_bytes()),
            v["reconnects"],
            v["rounds"],
            v["bytes_resent"]
        );
        assert_eq!(v["verified"], true);
        assert!(v["reconnects"].as_u64().unwrap() >= 1, "{v}");
        // Every data byte went out once, plus what was re-sent; and nothing
        // the journal held at the crash was re-sent (only what the
        // receiver had not journaled, rounded to whole windows).
        let resent = v["bytes_resent"].as_u64().unwrap();
        assert_eq!(
            v["bytes_written"].as_u64().unwrap(),
            data_total + resent,
            "{v}"
        );
        let unjournaled = data_missing(&regions, j.as_ref());
        let ranges = j.as_ref().map_or(0, |j| j.durable.len() as u64);
        assert!(
            resent <= unjournaled + 2 * CHUNK * (ranges + 1),
            "point {k}: re-sent {resent} bytes but only {unjournaled} were not journaled"
        );
        assert_same(&src, &rx.target(&name));
    }
}

/// The bound on re-sent bytes above holds only if the sender really uses
/// `CHUNK`: the command line's default must be the library constant.
#[test]
fn send_chunk_size_default_is_the_library_constant() {
    use clap::Parser;
    let cli = diskferry::cli::Cli::try_parse_from([
        "diskferry",
        "send",
        "src.img",
        "--to",
        "127.0.0.1:1",
        "--target",
        "t",
        "--tls-dir",
        "tls",
    ])
    .unwrap();
    let diskferry::cli::Command::Send(a) = cli.command else {
        panic!("not a send: {:?}", cli.command);
    };
    assert_eq!(u64::from(a.chunk_size), CHUNK);
    assert_eq!(CHUNK, 512 * 1024, "the chunk size the issue names");
}

#[test]
fn a_finished_job_sent_again_sends_nothing() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let (src, _) = source(d.path(), 24 * MIB, 13);
    let src_s = src.to_str().unwrap();
    let rx = Rx::start(d.path(), &[]);
    let first = done(&rx.send(src_s, "vm.img", &[]));
    assert_eq!(first["resumed"], false);
    assert!(first["bytes_written"].as_u64().unwrap() >= 12 * MIB);
    let j = rx.journal("vm.img").expect("journal");
    assert!(j.complete, "journal not marked complete");
    let t = Instant::now();
    let again = done(&rx.send(src_s, "vm.img", &["--verify"]));
    eprintln!("rerun of a finished job: {:?}", t.elapsed());
    assert_eq!(again["bytes_written"], 0, "{again}");
    assert_eq!(again["resumed"], true);
    assert_eq!(again["rounds"], 0);
    assert_eq!(again["verified"], true);
    assert_eq!(
        again["bytes_resumed_skipped"].as_u64(),
        first["bytes_written"].as_u64()
    );
    assert_same(&src, &rx.target("vm.img"));
}

/// Expects a refusal naming `what` and `--restart`, with the target as it was.
fn refused(rx: &Rx, src: &str, name: &str, what: &str) {
    let before = std::fs::read(rx.target(name)).ok();
    let out = rx.send(src, name, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(what), "expected {what:?} in: {err}");
    assert!(err.contains("--restart"), "no hint to --restart: {err}");
    assert_eq!(
        std::fs::read(rx.target(name)).ok(),
        before,
        "the target changed"
    );
}

#[test]
fn untrustworthy_journals_and_other_sources_are_refused_until_restart() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let (src, _) = source(d.path(), 16 * MIB, 14);
    let src_s = src.to_str().unwrap();
    let rx = Rx::start(d.path(), &[]);
    done(&rx.send(src_s, "a.img", &[]));
    done(&rx.send(src_s, "b.img", &[]));
    let jpath = rx.journal_path("a.img");
    let good = std::fs::read(&jpath).unwrap();

    // Truncated journal.
    std::fs::write(&jpath, &good[..good.len() / 2]).unwrap();
    refused(&rx, src_s, "a.img", "damaged");
    // One bit flipped.
    let mut flipped = good.clone();
    flipped[good.len() / 3] ^= 0x10;
    std::fs::write(&jpath, &flipped).unwrap();
    refused(&rx, src_s, "a.img", "damaged");
    // A journal of another target copied over this one's (forged or
    // misplaced): it must not steer writes into this target.
    std::fs::copy(rx.journal_path("b.img"), &jpath).unwrap();
    refused(&rx, src_s, "a.img", "belongs to target");
    // --restart: a clean full copy.
    let v = done(&rx.send(src_s, "a.img", &["--restart"]));
    assert_eq!(v["resumed"], false);
    assert_same(&src, &rx.target("a.img"));

    // A source of another size under the same name.
    let bigger = d.path().join("bigger.img");
    sparse_file(&bigger, 20 * MIB, &[(0, MIB as usize)], 15);
    refused(&rx, bigger.to_str().unwrap(), "a.img", "bytes");
    // The same size, other content.
    let other = d.path().join("other.img");
    sparse_file(&other, 16 * MIB, &[(0, 3 * MIB as usize)], 16);
    refused(&rx, other.to_str().unwrap(), "a.img", "identity");
    let v = done(&rx.send(other.to_str().unwrap(), "a.img", &["--restart"]));
    assert_eq!(v["resumed"], false);
    assert_same(&other, &rx.target("a.img"));
    // The target of another job was never touched.
    assert_same(&src, &rx.target("b.img"));
}
