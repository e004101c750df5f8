//! A send disk through the library: a job on a runtime `Engine` whose
//! target is a sink drained into a real receiver (`diskferry serve` over
//! mutual TLS on loopback), paused, resumed, cancelled and rerun through its
//! `JobHandle`, on both I/O engines.

mod common;
#[path = "support/rx.rs"]
mod rx;

use std::time::{Duration, Instant};

use common::*;
use diskferry::engine::EngineKind;
use diskferry::pipeline::CopyError;
use diskferry::replicate::send::SendOptions;
use diskferry::runtime::{Engine, EngineOptions, JobHandle, JobPhase, JobSpec};
use rx::Rx;

const MIB: u64 = 1 << 20;

fn done_bytes(h: &JobHandle) -> u64 {
    h.progress().disks[0].counters.bytes_done
}

fn wait_for(h: &JobHandle, what: &str, mut ok: impl FnMut(&JobHandle) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok(h) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_send_disk_pauses_resumes_and_a_cancelled_one_reruns_from_what_is_durable() {
    for (engine, kind) in [
        ("uring", EngineKind::Uring),
        ("threads", EngineKind::Threads),
    ] {
        assert!(ENGINES.contains(&engine));
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let src = dir.join("a.img");
        dense_file(&src, 48 * MIB as usize, 21);
        let rx = Rx::start(&dir.join("rx"), &["--checkpoint-interval", "200ms"]);
        let mut opts = SendOptions::new(src.to_str().unwrap(), &rx.addr, "a.img");
        opts.tls_dir = Some(rx.tls.clone());
        opts.compress = diskferry::compress::Mode::None;
        let eng = Engine::start(&EngineOptions {
            kind: Some(kind),
            ..EngineOptions::default()
        })
        .unwrap();
        let spec = |rate| JobSpec {
            name: "vm".into(),
            disks: vec![opts.clone().into()],
            rate_bytes_per_s: rate,
        };
        let h = eng.submit(spec(Some(8_000_000)));
        wait_for(&h, "4 MiB sent", |h| done_bytes(h) >= 4 * MIB);
        // Paused: no new reads; what was read already is sent (at the
        // job's rate), then nothing moves.
        let at_pause = done_bytes(&h);
        h.pause();
        let mut paused_at = at_pause;
        let settle = Instant::now() + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(400));
            let now = done_bytes(&h);
            if now == paused_at {
                break;
            }
            assert!(Instant::now() < settle, "{engine}: a paused send goes on");
            paused_at = now;
        }
        assert!(
            paused_at - at_pause <= 16 * MIB,
            "{engine}: {} bytes sent after the pause",
            paused_at - at_pause
        );
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            done_bytes(&h),
            paused_at,
            "{engine}: a paused send advanced"
        );
        assert_eq!(h.progress().state, JobPhase::Paused, "{engine}");
        h.resume();
        wait_for(&h, "progress after resume", |h| {
            done_bytes(h) >= paused_at + 2 * MIB
        });
        // Cancelled: the disk ends Cancelled, the receiver keeps its journal.
        h.cancel();
        let report = h.wait();
        assert!(
            matches!(report.disks[0].result, Err(CopyError::Cancelled)),
            "{engine}: {:?}",
            report.disks[0].result
        );
        std::thread::sleep(Duration::from_millis(1000));
        let held = rx.journal("a.img").map_or(0, |j| j.durable.covered_bytes());
        assert!(held >= 4 * MIB, "{engine}: {held} bytes durable");
        // The rerun, on the same engine, sends only what is missing.
        let report = eng.submit(spec(None)).wait();
        let r = report.disks[0]
            .result
            .as_ref()
            .expect("the rerun completes");
        let r = r.as_send().expect("a send report");
        assert!(r.resumed, "{engine}: {r:?}");
        assert!(
            r.bytes_resumed_skipped >= 4 * MIB && r.bytes_resumed_skipped <= held,
            "{engine}: skipped {} of {held}",
            r.bytes_resumed_skipped
        );
        assert_eq!(r.engine, kind);
        assert_same(&src, &rx.target("a.img"));
    }
}
