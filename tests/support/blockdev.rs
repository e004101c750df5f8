//! Block devices for the tests: a loop device over a file, and a file that
//! fails writes on demand (nbdkit's `error` filter exported as a file by
//! `nbdfuse`, the "nbdkit-backed loop device" of issue 14; this machine's
//! kernel has no device-mapper). Each is torn down on drop, also when the
//! test fails. A missing tool or privilege fails the test: no silent skip.
//!
//! Include with `#[path = "support/blockdev.rs"] mod blockdev;`.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loop device backed by a file, detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
}

impl LoopDevice {
    /// `losetup -f --show BACKING`; panics (never skips) where loop devices
    /// cannot be attached.
    pub fn attach(backing: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(backing)
            .output()
            .expect("losetup runs (util-linux; the tests need root and /dev/loop-control)");
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && dev.starts_with("/dev/loop"),
            "losetup -f --show {} failed ({}): {} — the block-device tests need root and loop devices",
            backing.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        LoopDevice {
            path: PathBuf::from(dev),
        }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        for _ in 0..50 {
            match Command::new("losetup").arg("-d").arg(&self.path).status() {
                Ok(s) if s.success() => return,
                // Busy for a moment after a process that held it exits.
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!("could not detach {}", self.path.display());
    }
}

/// An NBD export of nbdkit's `memory` plugin behind the `error` filter,
/// mounted by `nbdfuse` as the file `MOUNT/nbd`. While the trigger file
/// exists, writes fail with EIO at `fail_percent` % (chosen at random per
/// write). Unmounted on drop.
pub struct FailingFile {
    child: Option<Child>,
    pub mount: PathBuf,
    pub trigger: PathBuf,
}

impl FailingFile {
    pub fn start(dir: &Path, size: &str, fail_percent: u32) -> FailingFile {
        let mount = dir.join("fuse");
        std::fs::create_dir_all(&mount).unwrap();
        let trigger = dir.join("fail-writes");
        let mut child = Command::new("nbdfuse")
            .arg(&mount)
            .args(["[", "nbdkit", "--filter=error", "memory"])
            .arg(format!("size={size}"))
            .arg("error=EIO")
            .arg(format!("error-pwrite-rate={fail_percent}%"))
            .arg(format!("error-file={}", trigger.display()))
            .arg("]")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nbdfuse runs (libnbd-bin; needs /dev/fuse)");
        let file = mount.join("nbd");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_fuse_mounted(&mount) || !file.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("nbdfuse exited early ({st}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not mount {}",
                mount.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        FailingFile {
            child: Some(child),
            mount,
            trigger,
        }
    }

    pub fn file(&self) -> PathBuf {
        self.mount.join("nbd")
    }

    /// From now on every write fails with EIO (until [`FailingFile::heal`]).
    pub fn fail_writes(&self) {
        std::fs::write(&self.trigger, b"").unwrap();
    }

    pub fn heal(&self) {
        let _ = std::fs::remove_file(&self.trigger);
    }
}

fn is_fuse_mounted(mount: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = mount.to_str().unwrap();
    m.lines()
        .any(|l| l.split_whitespace().nth(1) == Some(want) && l.contains("fuse"))
}

impl Drop for FailingFile {
    fn drop(&mut self) {
        self.heal();
        let _ = Command::new("umount").arg(&self.mount).status();
        if is_fuse_mounted(&self.mount) {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
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
}

/// Panics unless `[offset, offset+len)` of `a` and `b` hold the same bytes
/// (reads only that range: cheap on huge sparse files and devices).
pub fn assert_range_same(a: &Path, b: &Path, offset: u64, len: u64) {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(ba.len() as u64) as usize;
        fa.read_exact_at(&mut ba[..n], offset + at).unwrap();
        fb.read_exact_at(&mut bb[..n], offset + at).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                offset + at + i as u64
            );
        }
        at += n as u64;
    }
}
