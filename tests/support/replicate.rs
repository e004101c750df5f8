//! Replication test helpers shared by tests/replicate.rs and
//! tests/replicate_links.rs: a `diskferry serve` (optionally inside a
//! network namespace) stopped on drop, `diskferry send --json` to it, and
//! certificates that also name the namespace receiver's address.
//!
//! Include with `#[path = "support/replicate.rs"] mod replicate;` next to
//! `mod common;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{diskferry, last_json};

pub const MIB: u64 = 1 << 20;

/// Tests of one file that time things, or load both cores, run one at a
/// time (cargo runs the tests of a file in parallel).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running `diskferry serve`, stopped with SIGTERM on drop.
pub struct Receiver {
    pub child: Child,
    pub addr: String,
    pub root: PathBuf,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // SIGTERM: the receiver stops cleanly.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `certs init DIR/tls`, the server certificate also naming 10.213.7.2
/// (the receiver's side of the namespaces of support/netns.rs).
pub fn certs(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    let st = diskferry()
        .args(["certs", "init", "--san", "10.213.7.2"])
        .arg(&tls)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "certs init: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    tls
}

/// Start a receiver (optionally inside network namespace `netns`) and read
/// the address it listens on from its first line of output.
pub fn serve(dir: &Path, tls: Option<&Path>, listen: &str, netns: Option<&str>) -> Receiver {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_diskferry")]);
            c
        }
        None => diskferry(),
    };
    cmd.args(["serve", "--listen", listen, "--target-root"])
        .arg(&root);
    match tls {
        Some(t) => cmd.arg("--tls-dir").arg(t),
        None => cmd.arg("--insecure-plaintext"),
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(
        addr.contains(':'),
        "receiver did not say where it listens: {line:?}"
    );
    Receiver { child, addr, root }
}

pub fn send(
    src: &str,
    rx: &Receiver,
    target: &str,
    tls: Option<&Path>,
    extra: &[&str],
) -> std::process::Output {
    send_to(src, &rx.addr, target, tls, None, extra)
}

pub fn send_to(
    src: &str,
    to: &str,
    target: &str,
    tls: Option<&Path>,
    netns: Option<&str>,
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_diskferry")]);
            c
        }
        None => diskferry(),
    };
    cmd.args([
        "send",
        src,
        "--to",
        to,
        "--target",
        target,
        "--no-progress",
        "--json",
    ]);
    match tls {
        Some(t) => cmd.arg("--tls-dir").arg(t),
        None => cmd.arg("--insecure-plaintext"),
    };
    cmd.args(extra).output().unwrap()
}

pub fn ok(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "send failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let done = last_json(out);
    assert_eq!(done["event"], "done", "{done}");
    done
}
