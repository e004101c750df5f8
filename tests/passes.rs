//! `send --passes auto`: converging passes against a real receiver while a
//! writer keeps changing the source, with the changes handed over as
//! changed-areas files by a `--changed-cmd`, and with `--delta`; the final
//! pass after `--final-cmd` leaves the target identical to the source; a
//! writer faster than `--rate` is reported as not converging (exit 7).

mod common;
#[path = "support/rx.rs"]
mod rx;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use rx::Rx;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;

/// A thread that writes random 64 KiB blocks into `src` at a scheduled
/// rate and answers the change command: for request `req.N` it writes
/// `resp.N` naming a changed-areas file of every block written since the
/// previous request (`full` for the first). `stop` (the final command's
/// file) ends the writing; it then answers `stopped`.
struct Writer {
    dir: PathBuf,
    done: Arc<AtomicBool>,
    handle: Option<JoinHandle<u64>>,
}

impl Writer {
    /// `rate(t)`: bytes per second to write at `t` seconds.
    fn start(dir: &Path, src: &Path, size: u64, rate: fn(f64) -> f64) -> Writer {
        let done = Arc::new(AtomicBool::new(false));
        let (dir2, src2, done2) = (dir.to_path_buf(), src.to_path_buf(), Arc::clone(&done));
        let handle = std::thread::spawn(move || writer_loop(&dir2, &src2, size, rate, &done2));
        Writer {
            dir: dir.to_path_buf(),
            done,
            handle: Some(handle),
        }
    }

    /// The change command for `--changed-cmd`.
    fn changed_cmd(&self) -> String {
        let d = self.dir.display();
        format!(
            "touch {d}/req.$DISKFERRY_PASS; while [ ! -e {d}/resp.$DISKFERRY_PASS ]; do sleep 0.01; done; \
             cat {d}/resp.$DISKFERRY_PASS"
        )
    }

    /// The final command: stop writing, wait until the writer has stopped.
    fn final_cmd(&self) -> String {
        let d = self.dir.display();
        format!("touch {d}/stop; while [ ! -e {d}/stopped ]; do sleep 0.01; done")
    }

    /// Ends the thread; returns the bytes it wrote.
    fn finish(mut self) -> u64 {
        self.done.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn writer_loop(dir: &Path, src: &Path, size: u64, rate: fn(f64) -> f64, done: &AtomicBool) -> u64 {
    let file = std::fs::OpenOptions::new().write(true).open(src).unwrap();
    let blocks = size / BLOCK;
    let started = Instant::now();
    let mut written = 0u64;
    let mut since_snapshot: Vec<u64> = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut pass = 1u32;
    let mut stopped = false;
    while !done.load(Ordering::SeqCst) {
        if dir.join(format!("req.{pass}")).exists() {
            answer(dir, pass, size, &mut since_snapshot);
            pass += 1;
        }
        if !stopped && dir.join("stop").exists() {
            stopped = true;
            std::fs::write(dir.join("stopped"), b"").unwrap();
        }
        let t = started.elapsed().as_secs_f64();
        if stopped || (written as f64) >= rate(t) * t {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let block = seed % blocks;
        let data = random_bytes(BLOCK as usize, seed);
        file.write_all_at(&data, block * BLOCK).unwrap();
        since_snapshot.push(block);
        written += BLOCK;
    }
    written
}

/// Answers change request `pass`: `full` first, then a changed-areas file.
fn answer(dir: &Path, pass: u32, size: u64, blocks: &mut Vec<u64>) {
    let spec = if pass == 1 {
        "full".to_string()
    } else {
        blocks.sort_unstable();
        blocks.dedup();
        let areas: Vec<String> = blocks
            .iter()
            .map(|b| format!("{{\"start\":{},\"length\":{BLOCK}}}", b * BLOCK))
            .collect();
        let json = format!(
            "{{\"startOffset\":0,\"length\":{size},\"changedArea\":[{}]}}",
            areas.join(",")
        );
        let path = dir.join(format!("changed.{pass}.json"));
        std::fs::write(&path, json).unwrap();
        format!("changed-areas:{}", path.display())
    };
    blocks.clear();
    let tmp = dir.join(format!("resp.{pass}.tmp"));
    std::fs::write(&tmp, format!("{spec}\n")).unwrap();
    std::fs::rename(&tmp, dir.join(format!("resp.{pass}"))).unwrap();
}

fn events(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

fn of_kind<'a>(ev: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    ev.iter().filter(|e| e["event"] == kind).collect()
}

#[test]
fn passes_converge_while_a_writer_slows_down_and_the_final_pass_leaves_an_identical_target() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let rx = Rx::start(d.path(), &[]);
        let src = d.path().join("src.img");
        let size = 64 * MIB;
        dense_file(&src, size as usize, 3);
        // 4 MB/s for 3 s, then 256 KB/s.
        let writer = Writer::start(d.path(), &src, size, |t| if t < 3.0 { 4e6 } else { 2.56e5 });
        let out = rx.send(
            src.to_str().unwrap(),
            "vm.img",
            &[
                "--io-engine",
                engine,
                "--passes",
                "auto",
                "--max-downtime",
                "5s",
                "--changed-cmd",
                &writer.changed_cmd(),
                "--final-cmd",
                &writer.final_cmd(),
            ],
        );
        let wrote = writer.finish();
        assert!(
            out.status.success(),
            "{engine}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let ev = events(&out);
        let passes = of_kind(&ev, "pass");
        assert!(passes.len() >= 2, "{engine}: {ev:?}");
        assert_eq!(passes[0]["mode"], "full", "{engine}");
        for p in &passes[1..] {
            assert_eq!(p["mode"], "incremental", "{engine}: {p}");
            // Only the changed blocks moved, not the disk.
            assert!(p["bytes_changed"].as_u64().unwrap() < size, "{engine}: {p}");
            assert!(p["predicted_next_s"].as_f64().unwrap() >= 0.0, "{p}");
        }
        let cut = of_kind(&ev, "cutover");
        assert_eq!(cut.len(), 1, "{engine}: {ev:?}");
        let downtime = cut[0]["downtime_s"].as_f64().unwrap();
        assert!(downtime > 0.0 && downtime < 60.0, "{engine}: {}", cut[0]);
        assert!(wrote > 0, "the writer wrote nothing");
        assert_same(&src, &rx.target("vm.img"));
    }
}

#[test]
fn without_a_final_command_the_series_stops_ready_for_cutover() {
    let d = tempfile::tempdir().unwrap();
    let rx = Rx::start(d.path(), &[]);
    let src = d.path().join("src.img");
    let size = 32 * MIB;
    dense_file(&src, size as usize, 4);
    let writer = Writer::start(d.path(), &src, size, |_| 2.0e5);
    let out = rx.send(
        src.to_str().unwrap(),
        "vm.img",
        &[
            "--passes",
            "auto",
            "--max-downtime",
            "10s",
            "--changed-cmd",
            &writer.changed_cmd(),
        ],
    );
    writer.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out);
    let ready = of_kind(&ev, "ready_for_cutover");
    assert_eq!(ready.len(), 1, "{ev:?}");
    let last_pass = of_kind(&ev, "pass").pop().unwrap().clone();
    assert_eq!(ready[0]["sync_id"], last_pass["sync_id"]);
    assert!(of_kind(&ev, "cutover").is_empty());
}

#[test]
fn a_writer_faster_than_the_rate_is_reported_not_converging_with_exit_7() {
    let d = tempfile::tempdir().unwrap();
    let rx = Rx::start(d.path(), &[]);
    let src = d.path().join("src.img");
    let size = 8 * MIB;
    dense_file(&src, size as usize, 5);
    // 12 MB/s of changes against a 4 MB/s budget.
    let writer = Writer::start(d.path(), &src, size, |_| 12e6);
    let out = rx.send(
        src.to_str().unwrap(),
        "vm.img",
        &[
            "--rate",
            "4M",
            "--passes",
            "auto",
            "--max-downtime",
            "500ms",
            "--changed-cmd",
            &writer.changed_cmd(),
        ],
    );
    writer.finish();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out);
    let nc = of_kind(&ev, "not_converging");
    assert_eq!(nc.len(), 1, "{ev:?}");
    assert!(
        nc[0]["reason"].as_str().unwrap().contains("budget"),
        "{}",
        nc[0]
    );
    assert!(of_kind(&ev, "ready_for_cutover").is_empty());
}

#[test]
fn delta_passes_onto_a_stale_target_converge_and_match() {
    let d = tempfile::tempdir().unwrap();
    let rx = Rx::start(d.path(), &[]);
    let src = d.path().join("src.img");
    let size = 16 * MIB;
    dense_file(&src, size as usize, 6);
    // The target: an older copy, 1 % of its blocks different.
    std::fs::copy(&src, rx.target("vm.img")).unwrap();
    for i in 0..3u64 {
        write_at(
            &rx.target("vm.img"),
            i * 40 * BLOCK,
            &random_bytes(BLOCK as usize, 90 + i),
        );
    }
    let out = rx.send(
        src.to_str().unwrap(),
        "vm.img",
        &["--passes", "auto", "--delta", "--max-downtime", "30s"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out);
    let passes = of_kind(&ev, "pass");
    assert!(!passes.is_empty(), "{ev:?}");
    assert_eq!(passes[0]["mode"], "delta");
    assert!(
        passes[0]["bytes_changed"].as_u64().unwrap() <= 3 * BLOCK,
        "{}",
        passes[0]
    );
    assert_eq!(of_kind(&ev, "ready_for_cutover").len(), 1, "{ev:?}");
    assert_same(&src, &rx.target("vm.img"));
}
