//! The engine as a library: jobs submitted to one long-lived engine, and
//! their handles (progress, pause, resume, cancel, rate, wait), against real
//! nbdkit servers, on both I/O engines.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use diskferry::engine::EngineKind;
use diskferry::pipeline::CopyError;
use diskferry::pipeline::copy::CopyOptions;
use diskferry::runtime::{Engine, EngineOptions, JobHandle, JobPhase, JobSpec};

const KINDS: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Threads];
const MIB: u64 = 1 << 20;

fn disk(source: String, target: &Path) -> CopyOptions {
    CopyOptions {
        source,
        target: target.to_str().unwrap().to_string(),
        source_format: None,
        target_format: None,
        connections: 4,
        requests: None,
        chunk_bytes: 256 * 1024,
        threads: None,
        write_mode: diskferry::endpoint::open::WriteMode::Auto,
        read_retries: 3,
        lanes: 8,
        io_timeout: Duration::from_secs(60),
    }
}

fn engine(kind: EngineKind) -> Engine {
    Engine::start(&EngineOptions {
        threads: None,
        memory_bytes: 64 * MIB,
        kind: Some(kind),
    })
    .expect("engine starts")
}

/// Wait until the job has done more than `bytes`.
fn wait_done_over(h: &JobHandle, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.progress().bytes_done <= bytes {
        assert!(!h.is_over(), "the job ended early: {:?}", h.progress());
        assert!(Instant::now() < deadline, "no progress: {:?}", h.progress());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nbdkit's pattern plugin (every 8-byte word holds its offset) behind the
/// delay filter, and the same bytes as a file for comparison.
fn slow_pattern(dir: &Path, name: &str, size: &str) -> (Server, std::path::PathBuf) {
    let server = nbdkit(
        dir,
        name,
        &[
            "--filter=delay",
            "pattern",
            &format!("size={size}"),
            "delay-read=5ms",
        ],
    );
    let reference = dir.join(format!("{name}.ref"));
    let fast = nbdkit(
        dir,
        &format!("{name}-ref"),
        &["pattern", &format!("size={size}")],
    );
    nbd_to_file(&fast.uri(), &reference);
    (server, reference)
}

#[test]
fn a_paused_job_does_not_advance_and_finishes_after_resume() {
    for kind in KINDS {
        let d = tempfile::tempdir().unwrap();
        let (src, reference) = slow_pattern(d.path(), "src", "48M");
        let dst = d.path().join("dst.img");
        let eng = engine(kind);
        // 16 MB/s: about three seconds for 48 MiB, room to pause.
        let h = eng.submit(JobSpec {
            name: "vm-pause".into(),
            disks: vec![disk(src.uri(), &dst).into()],
            rate_bytes_per_s: Some(16_000_000),
        });
        wait_done_over(&h, 2 * MIB);
        h.pause();
        // What was in flight drains within a window or so.
        std::thread::sleep(Duration::from_millis(500));
        let paused = h.progress();
        assert_eq!(paused.state, JobPhase::Paused, "{kind}: {paused:?}");
        std::thread::sleep(Duration::from_millis(1000));
        let later = h.progress();
        assert_eq!(
            paused.bytes_done, later.bytes_done,
            "{kind}: bytes done moved while paused"
        );
        assert!(later.bytes_done < later.bytes_planned, "{kind}: {later:?}");
        let listed = eng.jobs();
        assert!(
            listed
                .iter()
                .any(|j| j.name == "vm-pause" && j.state == JobPhase::Paused),
            "{kind}: the engine lists the paused job: {listed:?}"
        );
        h.resume();
        h.set_rate(None);
        let report = h.wait();
        let outcome = &report.disks[0];
        let r = outcome
            .result
            .as_ref()
            .expect("the resumed job completes")
            .as_copy()
            .unwrap();
        assert_eq!(r.bytes_planned, 48 * MIB, "{kind}");
        assert_same(&reference, &dst);
    }
}

#[test]
fn a_rate_cap_holds_the_job_back_and_lifting_it_lets_it_run() {
    for kind in KINDS {
        let d = tempfile::tempdir().unwrap();
        let (src, reference) = slow_pattern(d.path(), "src", "64M");
        let dst = d.path().join("dst.img");
        let eng = engine(kind);
        let h = eng.submit(JobSpec {
            name: "vm-rate".into(),
            disks: vec![disk(src.uri(), &dst).into()],
            rate_bytes_per_s: Some(8_000_000),
        });
        wait_done_over(&h, MIB);
        let (t0, b0) = (Instant::now(), h.progress().bytes_done);
        std::thread::sleep(Duration::from_millis(1500));
        let moved = h.progress().bytes_done - b0;
        let rate = moved as f64 / t0.elapsed().as_secs_f64();
        // Windows in flight when the sample starts add to it: a loose
        // upper bound, far below what the uncapped copy moves.
        assert!(rate < 12e6, "{kind}: {rate:.0} B/s under an 8 MB/s cap");
        assert!(rate > 4e6, "{kind}: {rate:.0} B/s under an 8 MB/s cap");
        h.set_rate(None);
        let t = Instant::now();
        let report = h.wait();
        assert!(report.disks[0].result.is_ok(), "{kind}: {report:?}");
        // The rest (over 50 MiB) at the cap would take over 6 s.
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{kind}: lifting the cap did not speed the job up ({:?})",
            t.elapsed()
        );
        assert_same(&reference, &dst);
    }
}

#[test]
fn a_cancelled_job_ends_cancelled_with_what_it_wrote_in_its_target() {
    for kind in KINDS {
        let d = tempfile::tempdir().unwrap();
        let (src, reference) = slow_pattern(d.path(), "src", "64M");
        let dst = d.path().join("dst.img");
        let eng = engine(kind);
        let h = eng.submit(JobSpec {
            name: "vm-cancel".into(),
            disks: vec![disk(src.uri(), &dst).into()],
            rate_bytes_per_s: Some(8_000_000),
        });
        wait_done_over(&h, 4 * MIB);
        h.cancel();
        assert!(
            h.wait_timeout(Duration::from_secs(10)),
            "{kind}: cancel ends the job"
        );
        assert_eq!(h.progress().state, JobPhase::Cancelled, "{kind}");
        let report = h.wait();
        let outcome = &report.disks[0];
        assert!(
            matches!(outcome.result, Err(CopyError::Cancelled)),
            "{kind}: {:?}",
            outcome.result
        );
        let written = outcome.counters.bytes_written;
        assert!((4 * MIB..64 * MIB).contains(&written), "{kind}: {written}");
        // Every window in the target is either untouched (zero) or the
        // source's, and the source's windows add up to what was written.
        let (got, want) = (
            std::fs::read(&dst).unwrap(),
            std::fs::read(&reference).unwrap(),
        );
        assert_eq!(got.len(), want.len(), "{kind}: target sized to the source");
        let mut copied = 0u64;
        for (g, w) in got.chunks(256 * 1024).zip(want.chunks(256 * 1024)) {
            if g == w {
                copied += g.len() as u64;
            } else {
                assert!(g.iter().all(|&b| b == 0), "{kind}: a window holds garbage");
            }
        }
        assert_eq!(copied, written, "{kind}: the target holds what was written");
    }
}

#[test]
fn jobs_submitted_together_share_the_engine_and_all_complete() {
    for kind in KINDS {
        let d = tempfile::tempdir().unwrap();
        let eng = engine(kind);
        let mut jobs = Vec::new();
        for i in 0..3u64 {
            let src = d.path().join(format!("src{i}.img"));
            sparse_file(
                &src,
                (8 + i * 8) * MIB,
                &[(MIB, 300_000), (5 * MIB, 70_000)],
                i,
            );
            let dst = d.path().join(format!("dst{i}.img"));
            let h = eng.submit(JobSpec {
                name: format!("vm{i}"),
                disks: vec![disk(src.to_str().unwrap().into(), &dst).into()],
                rate_bytes_per_s: None,
            });
            jobs.push((h, src, dst));
        }
        for (h, src, dst) in jobs {
            let report = h.wait();
            let r = report.disks[0]
                .result
                .as_ref()
                .expect("each job completes")
                .as_copy()
                .unwrap();
            assert!(r.workers <= eng.workers(), "{kind}: {r:?}");
            assert_same(&src, &dst);
        }
    }
}
