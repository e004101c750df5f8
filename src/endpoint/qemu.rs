//! qemu-nbd child processes for non-raw images, and the qemu-img calls
//! around them (create, virtual size). Every call names the image's format
//! (`-f`): qemu never guesses it from the file's contents.
//!
//! A [`QemuNbdChild`] serves one image on a Unix socket inside a fresh
//! private (0700) directory. The child never outlives diskferry:
//! * dropping the handle sends SIGTERM, waits up to [`STOP_TIMEOUT`], then
//!   SIGKILLs, reaps the child and removes the directory;
//! * the child is started with `PR_SET_PDEATHSIG = SIGTERM`, so if diskferry
//!   is killed outright the kernel terminates qemu-nbd too. Linux delivers
//!   that signal when the *thread* that spawned the child exits, so start
//!   children from a thread that lives as long as the copy (e.g. main).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::EndpointError;
use crate::engine::sys;
use crate::nbd::uri::{NbdUri, Transport};

/// How long qemu-nbd may take to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long qemu-nbd may take to exit after SIGTERM before it is SIGKILLed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll interval while waiting for qemu-nbd.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long one readiness check waits for qemu-nbd's greeting.
const GREETING_TIMEOUT: Duration = Duration::from_secs(1);
/// Most parallel connections asked of one qemu-nbd.
pub const MAX_CONNECTIONS: u32 = 255;
/// Longest Unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH_BYTES: usize = 107;
/// Most stderr quoted in an error message.
const MAX_LOG_QUOTE_BYTES: u64 = 4096;

/// A running qemu-nbd serving one image on a private Unix socket.
#[derive(Debug)]
pub struct QemuNbdChild {
    child: Child,
    dir: PathBuf,
    socket_path: PathBuf,
    image_path: PathBuf,
}

fn qemu_nbd_error(path: &Path, why: impl Into<String>) -> EndpointError {
    EndpointError::QemuNbd {
        path: path.display().to_string(),
        why: why.into(),
    }
}

fn qemu_img_error(path: &Path, why: impl Into<String>) -> EndpointError {
    EndpointError::QemuImg {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// Create a fresh 0700 directory under the system temp dir.
fn private_temp_dir() -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    let mut last_error = io::Error::other("no attempt made");
    for _attempt in 0..16 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!(
            "diskferry-nbd-{}-{n}-{nanos:08x}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = e,
            Err(e) => return Err(e),
        }
    }
    Err(last_error)
}

/// The first [`MAX_LOG_QUOTE_BYTES`] of a log file, trimmed, for messages.
fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(file) = File::open(path) {
        let _ = file.take(MAX_LOG_QUOTE_BYTES).read_to_string(&mut text);
    }
    let text = text.trim();
    if text.is_empty() {
        "(no output)".into()
    } else {
        text.into()
    }
}

/// Whether the server at `socket` has sent an NBD greeting. A socket that
/// accepts connections is not enough: qemu-nbd listens before it enters its
/// main loop, and a SIGTERM in between is lost (60 of 60 qemu-nbd 10.0
/// processes outlived a SIGTERM sent as soon as the socket accepted; none
/// outlived one sent after the greeting). The greeting comes from the main
/// loop, so after it the parent-death signal is sure to stop the child.
fn greets(socket: &Path) -> bool {
    let Ok(mut conn) = UnixStream::connect(socket) else {
        return false;
    };
    let mut magic = [0u8; 8];
    conn.set_read_timeout(Some(GREETING_TIMEOUT)).is_ok()
        && conn.read_exact(&mut magic).is_ok()
        && &magic == b"NBDMAGIC"
}

impl QemuNbdChild {
    /// Start `qemu-nbd -f FORMAT -k SOCK -e CONNECTIONS -t [-r]` on `path`
    /// and wait (at most [`START_TIMEOUT`]) until its socket accepts
    /// connections. Writable targets also get `--discard=unmap
    /// --detect-zeroes=unmap` so trims and zero writes free space. The
    /// cache mode is qemu-nbd's default (writeback), which works on every
    /// file system (`--cache=none` does not on tmpfs).
    ///
    /// An image in use by a running VM cannot be opened (qemu's image
    /// locking); stop the VM or copy from a snapshot.
    pub fn start(
        path: &Path,
        format: &str,
        read_only: bool,
        connections: u32,
    ) -> Result<QemuNbdChild, EndpointError> {
        Self::start_with_bitmap(path, format, read_only, connections, None)
    }

    /// [`Self::start`], also exporting the image's persistent dirty bitmap
    /// `bitmap` as the meta context `qemu:dirty-bitmap:NAME` (qemu-nbd
    /// `-B NAME`); qemu-nbd refuses to start when the image lacks it.
    pub fn start_with_bitmap(
        path: &Path,
        format: &str,
        read_only: bool,
        connections: u32,
        bitmap: Option<&str>,
    ) -> Result<QemuNbdChild, EndpointError> {
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            return Err(qemu_nbd_error(
                path,
                format!("{connections} connections asked; use 1 to {MAX_CONNECTIONS}"),
            ));
        }
        if format.is_empty()
            || !format
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(qemu_nbd_error(
                path,
                format!("format {format:?} is not a qemu format name"),
            ));
        }
        let dir = private_temp_dir()
            .map_err(|e| qemu_nbd_error(path, format!("cannot create a private temp dir: {e}")))?;
        let socket_path = dir.join("nbd.sock");
        let log_path = dir.join("qemu-nbd.log");
        let cleanup = |why: String| {
            let _ = std::fs::remove_dir_all(&dir);
            qemu_nbd_error(path, why)
        };
        if socket_path.as_os_str().len() > MAX_SOCKET_PATH_BYTES {
            return Err(cleanup(format!(
                "socket path {} is too long for a Unix socket; set TMPDIR to a shorter directory",
                socket_path.display()
            )));
        }
        let log = File::create(&log_path)
            .map_err(|e| cleanup(format!("cannot create {}: {e}", log_path.display())))?;

        let mut command = Command::new("qemu-nbd");
        command.arg("-f").arg(format).arg("-k").arg(&socket_path);
        command.arg("-e").arg(connections.to_string()).arg("-t");
        if read_only {
            command.arg("-r");
        } else {
            command.arg("--discard=unmap").arg("--detect-zeroes=unmap");
        }
        if let Some(name) = bitmap {
            // One argument, so a name starting with '-' stays a name.
            command.arg(format!("--bitmap={name}"));
        }
        command.arg("--").arg(path);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        sys::terminate_with_parent(&mut command);
        let child = command.spawn().map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::NotFound {
                " (install qemu-utils)"
            } else {
                ""
            };
            cleanup(format!("cannot run qemu-nbd: {e}{hint}"))
        })?;
        tracing::debug!(image = %path.display(), format, read_only, connections, pid = child.id(), "started qemu-nbd");
        let mut this = QemuNbdChild {
            child,
            dir,
            socket_path,
            image_path: path.to_path_buf(),
        };
        this.wait_until_ready(&log_path)?;
        Ok(this)
    }

    /// Poll until the socket accepts a connection; on error `self` is
    /// dropped by the caller, which stops the child and removes the dir.
    fn wait_until_ready(&mut self, log_path: &Path) -> Result<(), EndpointError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(qemu_nbd_error(
                        &self.image_path,
                        format!(
                            "qemu-nbd exited ({status}) before serving: {}",
                            read_log(log_path)
                        ),
                    ));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(qemu_nbd_error(
                        &self.image_path,
                        format!("cannot check qemu-nbd: {e}"),
                    ));
                }
            }
            if greets(&self.socket_path) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(qemu_nbd_error(
                    &self.image_path,
                    format!(
                        "qemu-nbd did not accept connections within {} s: {}",
                        START_TIMEOUT.as_secs(),
                        read_log(log_path)
                    ),
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// `nbd+unix:///?socket=SOCK` for the served image.
    pub fn uri(&self) -> NbdUri {
        NbdUri {
            transport: Transport::Unix {
                path: self.socket_path.clone(),
            },
            export: String::new(),
            tls: false,
        }
    }

    /// Process id of the qemu-nbd child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The private directory holding the socket (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Unix socket qemu-nbd listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }
}

impl Drop for QemuNbdChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Our own child, not reaped (try_wait returned None and only
            // this struct waits on it), so its pid names no other process.
            if sys::terminate(&self.child).is_err() {
                let _ = self.child.kill();
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                tracing::warn!(
                    pid = self.child.id(),
                    "qemu-nbd ignored SIGTERM; killing it"
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove qemu-nbd temp dir");
        }
    }
}

/// Run `qemu-img ARGS` and return its stdout; errors quote stderr.
fn run_qemu_img(path: &Path, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, EndpointError> {
    let output = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::NotFound {
                " (install qemu-utils)"
            } else {
                ""
            };
            qemu_img_error(path, format!("cannot run qemu-img: {e}{hint}"))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr: String = stderr.trim().chars().take(4096).collect();
        return Err(qemu_img_error(
            path,
            format!(
                "qemu-img {} failed ({}): {stderr}",
                args[0].display(),
                output.status
            ),
        ));
    }
    Ok(output.stdout)
}

/// `qemu-img info --output=json -U -f FORMAT PATH` as JSON.
fn qemu_img_info(path: &Path, format: &str) -> Result<serde_json::Value, EndpointError> {
    let args = [
        "info".as_ref(),
        "--output=json".as_ref(),
        "-U".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        "--".as_ref(),
        path.as_os_str(),
    ];
    let stdout = run_qemu_img(path, &args)?;
    serde_json::from_slice(&stdout)
        .map_err(|e| qemu_img_error(path, format!("unreadable qemu-img info output: {e}")))
}

/// Create a new image: `qemu-img create -f FORMAT PATH SIZE`. Refuses to
/// overwrite an existing file.
pub fn create_image(path: &Path, format: &str, size_bytes: u64) -> Result<(), EndpointError> {
    if path.exists() {
        return Err(qemu_img_error(
            path,
            "already exists; remove it first or write into it as an existing target",
        ));
    }
    let size = size_bytes.to_string();
    let args = [
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        "--".as_ref(),
        path.as_os_str(),
        size.as_ref(),
    ];
    run_qemu_img(path, &args)?;
    Ok(())
}

/// Virtual (guest-visible) size of an image of `format`, from `qemu-img info`.
pub fn image_virtual_size(path: &Path, format: &str) -> Result<u64, EndpointError> {
    let info = qemu_img_info(path, format)?;
    info.get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| qemu_img_error(path, "qemu-img info gave no \"virtual-size\""))
}
