//! The receiver's handling of target files and its state, end to end with
//! real `diskferry serve` and `diskferry send` processes: nothing a journal
//! vouches for is truncated (allow-listed files included), an existing
//! file that is not ours needs `send --overwrite`, hard links are refused,
//! new files get `--target-mode`, the state directory is checked at start,
//! and refusals name the target, never the receiver's paths.

mod common;
#[path = "support/rx.rs"]
mod rx;

use common::*;
use rx::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A sparse source: random 1 MiB regions every other MiB.
fn source(dir: &Path, size: u64, seed: u64) -> std::path::PathBuf {
    let p = dir.join(format!("src{seed}.img"));
    let regions: Vec<(u64, usize)> = (0..size / MIB)
        .filter(|i| i % 2 == 0)
        .map(|i| (i * MIB, MIB as usize))
        .collect();
    sparse_file(&p, size, &regions, seed);
    p
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn wait_for_log(rx: &Rx, needle: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if rx.log_text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Expects a send refused with exit 4 whose message contains `what`.
fn refused_with(out: &std::process::Output, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains(what), "expected {what:?} in: {err}");
    err
}

#[test]
fn allow_listed_file_is_never_truncated_on_rerun_or_resume() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let (done_path, resumed_path) = (elsewhere.join("done.raw"), elsewhere.join("resumed.raw"));
    let allow_done = format!("done={}", done_path.display());
    let allow_resumed = format!("resumed={}", resumed_path.display());
    let src = source(d.path(), 64 * MIB, 1);
    let src_s = src.to_str().unwrap();
    let rx = Rx::start(
        d.path(),
        &[
            "--allow",
            &allow_done,
            "--allow",
            &allow_resumed,
            "--checkpoint-interval",
            "100ms",
        ],
    );

    // A finished job sent again: "already complete", the file untouched.
    let first = done(&rx.send(src_s, "done", &[]));
    assert_eq!(first["resumed"], false);
    assert_same(&src, &done_path);
    let again = done(&rx.send(src_s, "done", &["--verify"]));
    assert_eq!(again["bytes_written"], 0, "{again}");
    assert_eq!(again["verified"], true, "{again}");
    assert_same(&src, &done_path);

    // Interrupted, then resumed: what the journal holds stays on disk.
    let mut bg = Bg::spawn(rx.send_cmd(src_s, "resumed", &["--rate", "20M"]));
    assert!(
        wait_until_bytes(&resumed_path, 8 * MIB, Duration::from_secs(20)),
        "the send never wrote 8 MiB"
    );
    bg.kill9();
    assert!(
        wait_for_log(&rx, "job paused", Duration::from_secs(10)),
        "the receiver never paused the job: {}",
        rx.log_text()
    );
    let j = rx
        .journal("resumed")
        .expect("a journal of the interrupted job");
    assert!(!j.complete && j.durable.covered_bytes() > 0, "{j:?}");
    let rerun = done(&rx.send(src_s, "resumed", &["--verify"]));
    assert_eq!(rerun["resumed"], true, "{rerun}");
    assert!(
        rerun["bytes_resumed_skipped"].as_u64().unwrap() > 0,
        "{rerun}"
    );
    assert_eq!(rerun["verified"], true, "{rerun}");
    assert_same(&src, &resumed_path);
}

/// Waits until `path` has at least `bytes` allocated.
fn wait_until_bytes(path: &Path, bytes: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if path.exists() && allocated(path) >= bytes {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn an_existing_file_that_is_not_ours_needs_overwrite() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path(), 8 * MIB, 2);
    let src_s = src.to_str().unwrap();
    let rx = Rx::start(d.path(), &[]);
    let foreign = rx.target("foreign.img");
    std::fs::write(&foreign, b"somebody's data").unwrap();

    let out = rx.send(src_s, "foreign.img", &[]);
    let err = refused_with(&out, "--overwrite");
    assert!(err.contains("foreign.img"), "{err}");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"somebody's data");
    assert!(rx.journal("foreign.img").is_none(), "a journal was written");
    // --restart alone does not make a foreign file ours.
    let out = rx.send(src_s, "foreign.img", &["--restart"]);
    refused_with(&out, "--overwrite");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"somebody's data");

    let v = done(&rx.send(src_s, "foreign.img", &["--overwrite"]));
    assert_eq!(v["resumed"], false);
    assert_same(&src, &foreign);
    assert!(
        rx.log_text().contains("overwriting an existing file"),
        "the receiver did not log the overwrite"
    );
    // Ours now (a journal names it): a new source under --restart needs
    // no --overwrite.
    let other = source(d.path(), 8 * MIB, 3);
    done(&rx.send(other.to_str().unwrap(), "foreign.img", &["--restart"]));
    assert_same(&other, &foreign);

    // An empty existing file needs no flag.
    let empty = rx.target("empty.img");
    std::fs::write(&empty, b"").unwrap();
    done(&rx.send(src_s, "empty.img", &[]));
    assert_same(&src, &empty);
}

#[test]
fn hard_linked_targets_are_refused() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path(), 4 * MIB, 4);
    let rx = Rx::start(d.path(), &[]);
    let linked = rx.target("linked.img");
    std::fs::write(&linked, b"").unwrap();
    std::fs::hard_link(&linked, d.path().join("second-name")).unwrap();
    let out = rx.send(src.to_str().unwrap(), "linked.img", &["--overwrite"]);
    refused_with(&out, "hard links");
    assert_eq!(std::fs::metadata(&linked).unwrap().len(), 0);
}

#[test]
fn new_targets_journals_and_state_are_private_and_target_mode_chooses() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path(), 4 * MIB, 5);
    let src_s = src.to_str().unwrap();
    {
        let rx = Rx::start(d.path(), &[]);
        done(&rx.send(src_s, "private.img", &[]));
        assert_eq!(mode_of(&rx.target("private.img")), 0o600);
        assert_eq!(mode_of(&rx.journal_path("private.img")), 0o600);
        assert_eq!(mode_of(&rx.state), 0o700);
    }
    let d2 = tempfile::tempdir().unwrap();
    let rx = Rx::start(d2.path(), &["--target-mode", "0640"]);
    done(&rx.send(src_s, "shared.img", &[]));
    assert_eq!(mode_of(&rx.target("shared.img")), 0o640);
    assert_eq!(mode_of(&rx.journal_path("shared.img")), 0o600);
    // A file that existed keeps its mode.
    let existing = rx.target("existing.img");
    std::fs::write(&existing, b"").unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o604)).unwrap();
    done(&rx.send(src_s, "existing.img", &[]));
    assert_eq!(mode_of(&existing), 0o604);

    let bad = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure-plaintext"])
        .args(["--target-root", d2.path().to_str().unwrap()])
        .args(["--target-mode", "0999"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("octal"), "{}", stderr(&bad));
}

/// `serve` with `state` as its state directory: exit code and stderr.
fn serve_with_state(dir: &Path, state: &Path) -> (Option<i32>, String) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--insecure-plaintext"])
        .arg("--target-root")
        .arg(&root)
        .arg("--state-dir")
        .arg(state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            return (out.status.code(), stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!(
        "serve started with state directory {}: {}",
        state.display(),
        stderr(&out)
    );
}

#[test]
fn a_state_directory_others_could_tamper_with_is_refused_at_start() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let real = d.path().join("real-state");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();

    let link = d.path().join("link-state");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (code, err) = serve_with_state(d.path(), &link);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("symbolic link"), "{err}");

    let open = d.path().join("open-state");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = serve_with_state(d.path(), &open);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("chmod 0700 {}", open.display())),
        "{err}"
    );

    let foreign = d.path().join("foreign-state");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&foreign, Some(4242), None)
        .expect("chown needs root: the suite runs as root");
    assert_eq!(std::fs::metadata(&foreign).unwrap().uid(), 4242);
    let (code, err) = serve_with_state(d.path(), &foreign);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("owned by uid 4242"), "{err}");
}

#[test]
fn refusals_name_the_target_not_the_receivers_paths() {
    let _s = serial();
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path(), 4 * MIB, 6);
    let src_s = src.to_str().unwrap();
    let rx = Rx::start(d.path(), &[]);
    let root = rx.root.canonicalize().unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::create_dir(rx.target("vm")).unwrap();
    // A directory below the root that is (or was swapped for) a symbolic
    // link to outside: refused, nothing created outside.
    std::os::unix::fs::symlink(&outside, rx.target("vm/link")).unwrap();
    std::fs::write(rx.target("vm/foreign.img"), b"x").unwrap();
    for (name, what) in [
        ("nodir/disk.img", "does not exist"),
        ("vm/link/disk.img", "symbolic link"),
        ("vm/foreign.img", "--overwrite"),
    ] {
        let out = rx.send(src_s, name, &[]);
        let err = refused_with(&out, what);
        assert!(err.contains(name), "{name}: {err}");
        assert!(
            !err.contains(root.to_str().unwrap()) && !err.contains(rx.root.to_str().unwrap()),
            "{name}: the receiver's root leaked: {err}"
        );
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}
