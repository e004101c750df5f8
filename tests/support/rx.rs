//! Replication test helpers: a `diskferry serve` process that can be
//! killed (-9) and restarted on the same address with the same state
//! directory, `diskferry send` run to completion or in the background,
//! journals read back, a seeded random generator.
//!
//! Include with `#[path = "support/rx.rs"] mod rx;` next to `mod common;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use diskferry::journal::{Journal, JournalStore};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diskferry"))
}

/// `certs init DIR/tls`.
pub fn certs(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    let st = bin().args(["certs", "init"]).arg(&tls).output().unwrap();
    assert!(
        st.status.success(),
        "certs init: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    tls
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A receiver: `root`, `state` and `tls` under one directory, a fixed
/// address so a restart listens where senders reconnect.
pub struct Rx {
    pub child: Option<Child>,
    pub addr: String,
    pub root: PathBuf,
    pub state: PathBuf,
    pub tls: PathBuf,
    pub extra: Vec<String>,
    pub log: PathBuf,
}

impl Rx {
    /// Starts a receiver in `dir` (creates root/, state/, tls/).
    pub fn start(dir: &Path, extra: &[&str]) -> Rx {
        let root = dir.join("root");
        std::fs::create_dir_all(&root).unwrap();
        let tls = if dir.join("tls/ca.pem").exists() {
            dir.join("tls")
        } else {
            certs(dir)
        };
        let mut rx = Rx {
            child: None,
            addr: format!("127.0.0.1:{}", free_port()),
            root,
            state: dir.join("state"),
            tls,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: dir.join("serve.log"),
        };
        rx.spawn();
        rx
    }

    /// (Re)starts the process on the same address and state directory.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "receiver already running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let mut child = bin()
                .args(["serve", "--listen", &self.addr, "--target-root"])
                .arg(&self.root)
                .arg("--tls-dir")
                .arg(&self.tls)
                .arg("--state-dir")
                .arg(&self.state)
                .args(&self.extra)
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut line = String::new();
            let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
            if line.starts_with("listening on") {
                self.child = Some(child);
                return;
            }
            // The port may still be held by the previous process's sockets.
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "receiver would not start on {}: see {}",
                self.addr,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no flush, no journal at exit.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn target(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The journal of `name` as the receiver left it (None if there is none).
    pub fn journal(&self, name: &str) -> Option<Journal> {
        JournalStore::reader(&self.state)
            .load(name)
            .unwrap_or_else(|e| panic!("journal of {name}: {e}"))
    }

    pub fn journal_path(&self, name: &str) -> PathBuf {
        JournalStore::reader(&self.state).path_for(name)
    }

    /// The receiver's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A `send` command to this receiver (TLS, JSON, no progress bar).
    pub fn send_cmd(&self, src: &str, target: &str, extra: &[&str]) -> Command {
        self.send_cmd_to(&self.addr, src, target, extra)
    }

    /// As [`Rx::send_cmd`] but to another address (a proxy in front).
    pub fn send_cmd_to(&self, to: &str, src: &str, target: &str, extra: &[&str]) -> Command {
        let mut cmd = bin();
        cmd.args(["send", src, "--to", to, "--target", target])
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(["--json", "--no-progress"])
            .args(extra);
        cmd
    }

    /// Runs a send to the end.
    pub fn send(&self, src: &str, target: &str, extra: &[&str]) -> Output {
        self.send_cmd(src, target, extra).output().unwrap()
    }
}

impl Drop for Rx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `done` event of a successful send (panics with stderr otherwise).
pub fn done(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "send failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s.lines().last().expect("no output");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["event"], "done", "{v}");
    v
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A background process killed on drop.
pub struct Bg(pub Option<Child>);

impl Bg {
    pub fn spawn(mut cmd: Command) -> Bg {
        Bg(Some(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.0.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits at most `limit` for the process to end; its output.
    pub fn wait(mut self, limit: Duration) -> Output {
        let deadline = Instant::now() + limit;
        let mut c = self.0.take().unwrap();
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return c.wait_with_output().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let out = c.wait_with_output().unwrap();
        panic!(
            "process did not finish within {limit:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// xorshift64*: a small seeded generator (tests print the seed).
pub struct Rng(pub u64);

impl Rng {
    /// Seed from `DISKFERRY_TEST_SEED` or the clock; prints it.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("DISKFERRY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("{test}: seed {seed} (rerun with DISKFERRY_TEST_SEED={seed})");
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// Overwrites every range of `[0, size)` not in the journal's durable set
/// with garbage: what a power loss may leave of writes that were not
/// journaled yet. Returns the garbage bytes written.
pub fn garbage_outside_journal(
    target: &Path,
    journal: Option<&Journal>,
    size: u64,
    seed: u64,
) -> u64 {
    use std::os::unix::fs::FileExt;
    let missing: Vec<(u64, u64)> = match journal {
        Some(j) => j.durable.missing(size),
        None => vec![(0, size)],
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .unwrap();
    let mut rng = Rng(seed | 1);
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    for (offset, len) in missing {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            for b in buf[..n].chunks_mut(8) {
                let r = rng.next().to_le_bytes();
                b.copy_from_slice(&r[..b.len()]);
            }
            f.write_all_at(&buf[..n], offset + done).unwrap();
            done += n as u64;
        }
        total += len;
    }
    f.sync_all().unwrap();
    total
}
