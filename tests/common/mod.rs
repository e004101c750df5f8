//! Shared helpers for the integration tests: real qemu-nbd and nbdkit
//! servers started and stopped by the tests, the diskferry binary, byte
//! comparison and allocation checks.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Both I/O engines: every copy test runs on each.
pub const ENGINES: [&str; 2] = ["uring", "threads"];

pub fn diskferry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diskferry"))
}

/// A server process killed (and reaped) on drop.
pub struct Server {
    pub child: Child,
    pub sock: PathBuf,
}

impl Server {
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(child: &mut Child, sock: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("{what} exited early ({status}): {err}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not open {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-nbd` serving `file` (raw unless `format` says otherwise) on a
/// unix socket in `dir`.
pub fn qemu_nbd(
    dir: &Path,
    name: &str,
    file: &Path,
    format: &str,
    read_only: bool,
    extra: &[&str],
) -> Server {
    let sock = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-t", "-e", "8", "-f", format, "-k"]).arg(&sock);
    if read_only {
        cmd.arg("-r");
    }
    cmd.args(extra)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("qemu-nbd runs (install qemu-utils)");
    wait_for_socket(&mut child, &sock, "qemu-nbd");
    Server { child, sock }
}

/// `nbdkit` with `args` (plugin, params, filters) on a unix socket in `dir`.
pub fn nbdkit(dir: &Path, name: &str, args: &[&str]) -> Server {
    let sock = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("nbdkit")
        .args(["-f", "--exit-with-parent", "-U"])
        .arg(&sock)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdkit runs (install nbdkit)");
    wait_for_socket(&mut child, &sock, "nbdkit");
    Server { child, sock }
}

/// Run diskferry copy with `engine` and extra args; returns the output.
pub fn copy(src: &str, dst: &str, engine: &str, extra: &[&str]) -> Output {
    diskferry()
        .args(["copy", src, dst, "--io-engine", engine, "--no-progress"])
        .args(extra)
        .output()
        .expect("diskferry runs")
}

/// Run and require success, printing diagnostics otherwise.
pub fn copy_ok(src: &str, dst: &str, engine: &str, extra: &[&str]) -> Output {
    let out = copy(src, dst, engine, extra);
    assert!(
        out.status.success(),
        "diskferry copy {src} {dst} ({engine}) failed: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Dump an NBD export to a file with nbdcopy (the reference client).
pub fn nbd_to_file(uri: &str, out: &Path) {
    let st = Command::new("nbdcopy")
        .arg(uri)
        .arg(out)
        .status()
        .expect("nbdcopy runs");
    assert!(st.success(), "nbdcopy {uri} failed");
}

/// Byte-compare two files; panics at the first difference.
pub fn assert_same(a: &Path, b: &Path) {
    let (ma, mb) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    assert_eq!(
        ma.len(),
        mb.len(),
        "sizes differ: {} vs {}",
        a.display(),
        b.display()
    );
    let mut fa = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a).unwrap());
    let mut fb = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b).unwrap());
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        assert_eq!(n, m);
        if n == 0 {
            return;
        }
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                off + i as u64
            );
        }
        off += n as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Bytes allocated on disk for `p`.
pub fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Write `data` at `offset` of `p` (creating it).
pub fn write_at(p: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(p)
        .unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// A sparse file of `size` bytes with pseudo-random data at `regions`.
pub fn sparse_file(p: &Path, size: u64, regions: &[(u64, usize)], seed: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
    drop(f);
    for (i, &(off, len)) in regions.iter().enumerate() {
        write_at(p, off, &random_bytes(len, seed + i as u64));
    }
}

/// Deterministic pseudo-random bytes (xorshift), never all zero.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Dense random file.
pub fn dense_file(p: &Path, size: usize, seed: u64) {
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(&random_bytes(size, seed)).unwrap();
}

/// The last line of stdout parsed as JSON.
pub fn last_json(out: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s.lines().last().unwrap_or_else(|| {
        panic!(
            "no JSON output; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

/// A tmpfs mounted on a directory, unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    pub fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount of {} failed", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.0).status();
        if !matches!(st, Ok(s) if s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}
