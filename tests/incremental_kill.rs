//! Interrupted incremental sends (issue 16) against real tools: the
//! sender or the receiver killed in the middle of a pass, and a rerun
//! with another plan after an interrupted one; the target ends identical
//! to the source (`qemu-img compare`), on both I/O engines. The source and
//! its changes are made as in `incremental.rs` (`support/incr.rs`).

mod common;
#[path = "support/incr.rs"]
mod incr;
#[path = "support/rx.rs"]
mod rx;

use std::path::Path;
use std::time::Duration;

use common::ENGINES;
use incr::{
    Change, GRANULE, KIB, MIB, apply, assert_identical, changed_areas_json, merged, random_changes,
    s, source_image, text, wait_for_pass_progress,
};
use rx::{Bg, Rng, Rx, done, json_u64};

#[test]
fn sender_killed_mid_incremental_reruns_to_an_identical_target() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut rng = Rng::from_env(&format!("incremental kill -9 ({engine})"));
        let img = source_image(dir, rng.next());
        let rx = Rx::start(&dir.join("rx"), &["--checkpoint-interval", "200ms"]);
        let target = rx.target("t.img");
        let journal = rx.journal_path("t.img");
        let args = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = ["--io-engine", engine, "--compress", "none"]
                .map(String::from)
                .to_vec();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let full = done(&rx.send(s(&img), "t.img", &[]));
        let sync1 = text(&full, "sync_id").to_string();
        // About 24 MiB of writes, sent at 6 MB/s: killed once part of the
        // pass is durable on the receiver.
        let changes: Vec<Change> = (0..24)
            .map(|i| Change::Write(i * 2 * MIB + rng.range(0, 4) * 4 * KIB, MIB))
            .collect();
        apply(dir, &img, &changes, rng.next());
        let extra = args(&["--changed", "dirty-bitmap:b0", "--base", &sync1]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut slow = extra.clone();
        slow.extend(["--rate", "6M"]);
        let mut bg = Bg::spawn(rx.send_cmd(s(&img), "t.img", &slow));
        wait_for_pass_progress(&journal, &mut bg);
        assert!(bg.running(), "{engine}: the pass ended before the kill");
        bg.kill9();
        let again = done(&rx.send(s(&img), "t.img", &extra));
        eprintln!(
            "{engine}: rerun after kill -9: {} bytes skipped, {} written",
            json_u64(&again, "bytes_resumed_skipped"),
            json_u64(&again, "bytes_written")
        );
        assert_identical(&img, &target, "rerun after kill -9");
        assert_eq!(text(&again, "base_sync_id"), sync1);
        assert!(
            json_u64(&again, "bytes_resumed_skipped") > 0,
            "{engine}: the rerun sent the whole pass again: {again}"
        );
        assert!(
            json_u64(&again, "bytes_written") < 24 * MIB + 2 * GRANULE * 24,
            "{engine}: {again}"
        );
    }
}

#[test]
fn receiver_killed_mid_incremental_the_send_reconnects_and_the_target_is_identical() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut rng = Rng::from_env(&format!("incremental, receiver kill -9 ({engine})"));
        let img = source_image(dir, rng.next());
        let mut rx = Rx::start(&dir.join("rx"), &["--checkpoint-interval", "200ms"]);
        let target = rx.target("t.img");
        let journal = rx.journal_path("t.img");
        let full = done(&rx.send(s(&img), "t.img", &[]));
        let sync1 = text(&full, "sync_id").to_string();
        let changes: Vec<Change> = (0..24)
            .map(|i| Change::Write(i * 2 * MIB + rng.range(0, 4) * 4 * KIB, MIB))
            .collect();
        apply(dir, &img, &changes, rng.next());
        let mut bg = Bg::spawn(rx.send_cmd(
            s(&img),
            "t.img",
            &[
                "--io-engine",
                engine,
                "--compress",
                "none",
                "--changed",
                "dirty-bitmap:b0",
                "--base",
                &sync1,
                "--rate",
                "6M",
                "--stall-timeout",
                "3s",
                "--retry-for",
                "60s",
            ],
        ));
        wait_for_pass_progress(&journal, &mut bg);
        rx.kill9();
        std::thread::sleep(Duration::from_millis(500));
        rx.spawn();
        let inc = done(&bg.wait(Duration::from_secs(120)));
        assert!(json_u64(&inc, "reconnects") >= 1, "{engine}: {inc}");
        assert_eq!(text(&inc, "base_sync_id"), sync1);
        assert_identical(&img, &target, "incremental after the receiver's kill -9");
        // The receiver recorded this pass as its last sync: the next pass
        // starts from it.
        let next = rx.send(
            s(&img),
            "t.img",
            &[
                "--changed",
                "dirty-bitmap:b0",
                "--base",
                text(&inc, "sync_id"),
            ],
        );
        done(&next);
    }
}

#[test]
fn a_rerun_with_another_plan_also_sends_what_the_interrupted_pass_may_have_changed() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let mut rng = Rng::from_env(&format!("incremental replan ({engine})"));
        let img = source_image(dir, rng.next());
        let rx = Rx::start(&dir.join("rx"), &["--checkpoint-interval", "200ms"]);
        let target = rx.target("t.img");
        let journal = rx.journal_path("t.img");
        let sync1 = text(&done(&rx.send(s(&img), "t.img", &[])), "sync_id").to_string();
        // Pass A (24 MiB at 6 MB/s), killed part way.
        let a: Vec<Change> = (0..24)
            .map(|i| Change::Write(i * 2 * MIB + rng.range(0, 4) * 4 * KIB, MIB))
            .collect();
        apply(dir, &img, &a, rng.next());
        let list_a = dir.join("a.json");
        changed_areas_json(&list_a, &merged(&a));
        let flags = |list: &Path, rate: Option<&'static str>| -> Vec<String> {
            let mut v: Vec<String> = ["--io-engine", engine, "--compress", "none", "--base"]
                .map(String::from)
                .to_vec();
            v.push(sync1.clone());
            v.push("--changed-areas".into());
            v.push(s(list).into());
            if let Some(r) = rate {
                v.extend(["--rate".into(), r.into()]);
            }
            v
        };
        let slow = flags(&list_a, Some("6M"));
        let slow: Vec<&str> = slow.iter().map(String::as_str).collect();
        let mut bg = Bg::spawn(rx.send_cmd(s(&img), "t.img", &slow));
        wait_for_pass_progress(&journal, &mut bg);
        assert!(bg.running(), "{engine}: pass A ended before the kill");
        bg.kill9();
        // Then other changes, and a pass that names only those (B): the
        // receiver asks for A ∖ B too, which the sender plans from the
        // source's allocation.
        let b = random_changes(&mut rng, 20);
        apply(dir, &img, &b, rng.next());
        let list_b = dir.join("b.json");
        changed_areas_json(&list_b, &merged(&b));
        let rerun = flags(&list_b, None);
        let rerun: Vec<&str> = rerun.iter().map(String::as_str).collect();
        let inc = done(&rx.send(s(&img), "t.img", &rerun));
        assert_identical(&img, &target, "rerun with another plan");
        let only_b: u64 = merged(&b).iter().map(|r| r.1).sum();
        assert!(
            json_u64(&inc, "bytes_changed") > only_b,
            "{engine}: the rerun sent only its own plan: {inc}"
        );
    }
}
