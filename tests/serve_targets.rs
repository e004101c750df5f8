//! The receiver's registry of targets, against an in-process receiver: one
//! file reached by two names is one target (keyed by device and inode),
//! and HELLOs of one job arriving together start it once.

mod serve_support;

use diskferry::wire::{ErrorCode, Frame, HelloFlags};
use serve_support::*;

const MIB: u64 = 1 << 20;

fn busy(h: &Harness, job: u8, name: &str) -> String {
    let mut c = h.connect();
    match c.hello(&hello(job, name, MIB, 0, 1)) {
        Frame::Error(e) => {
            assert_eq!(e.code, ErrorCode::Busy, "{name}: {}", e.message);
            e.message
        }
        other => panic!("{name}: expected BUSY, got {other:?}"),
    }
}

#[test]
fn one_file_under_two_names_is_one_target() {
    let elsewhere = tempfile::tempdir().unwrap();
    let link = elsewhere.path().join("link.img");
    let h = Harness::start_with(true, |o| {
        let shared = o.target_root.join("shared.img");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        o.allow.push(("alias".into(), shared));
        o.allow.push(("linked".into(), link));
    });
    let mut writer = h.connect();
    writer.welcome(&hello(1, "shared.img", MIB, 0, 1));
    // The same inode through an --allow entry, and through a second entry
    // whose path is a symbolic link to it: both busy.
    let message = busy(&h, 2, "alias");
    assert!(message.contains("alias"), "{message}");
    busy(&h, 3, "linked");
    drop(writer);

    // Once the job left, the file is free again. It is a file another name
    // wrote (no journal of "alias"), so replacing it takes OVERWRITE.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut c = h.connect();
        let mut take = hello(4, "alias", MIB, 0, 1);
        take.flags = HelloFlags::OVERWRITE;
        match c.hello(&take) {
            Frame::Welcome(w) => {
                assert!(w.durable.is_empty());
                break;
            }
            Frame::Error(e) if e.code == ErrorCode::Busy => {
                assert!(std::time::Instant::now() < deadline, "still busy");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }
}

#[test]
fn hellos_of_one_job_arriving_together_start_it_once() {
    const STREAMS: u16 = 8;
    let h = Harness::start(true);
    let barrier = std::sync::Barrier::new(usize::from(STREAMS));
    let instances: Vec<u64> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..STREAMS)
            .map(|i| {
                let (h, barrier) = (&h, &barrier);
                s.spawn(move || {
                    let mut c = h.connect();
                    barrier.wait();
                    match c.hello(&hello(9, "together.img", 64 * MIB, i, STREAMS)) {
                        Frame::Welcome(w) => (w.instance, c),
                        other => panic!("stream {i}: expected WELCOME, got {other:?}"),
                    }
                })
            })
            .collect();
        let joined: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        joined.iter().map(|(instance, _)| *instance).collect()
    });
    assert!(
        instances.iter().all(|&i| i == instances[0]),
        "more than one job instance: {instances:?}"
    );
    let len = std::fs::metadata(h.root.join("together.img"))
        .unwrap()
        .len();
    assert_eq!(len, 64 * MIB);
}
