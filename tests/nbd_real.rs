//! The NBD client against real servers (qemu-nbd, nbdkit) that each test
//! starts on a Unix socket in a temporary directory and kills at the end.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diskferry::nbd::NbdError;
use diskferry::nbd::blocking::Client;
use diskferry::nbd::conn::Extent;
use diskferry::nbd::proto;

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A server process killed (and reaped) on drop.
struct Server {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Start `program args…` where the literal `SOCK` is replaced by a socket
    /// path in a fresh temporary directory; wait until it accepts.
    fn start(dir: tempfile::TempDir, program: &str, args: &[&str]) -> Server {
        let sock = dir.path().join("nbd.sock");
        let sock_str = sock.to_str().unwrap().to_string();
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if *a == "SOCK" {
                    sock_str.clone()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut server = Server {
            child,
            sock,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        // The socket file appears before the server listens: wait for a connect.
        while UnixStream::connect(&server.sock).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("{program} exited early with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not create its socket in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn stream(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    }

    fn client(&self, meta: &[&str]) -> Client<UnixStream> {
        Client::connect(self.stream(), "", meta).unwrap()
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

fn nbdkit(args: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut full = vec!["-f", "-U", "SOCK"];
    full.extend_from_slice(args);
    Server::start(dir, "nbdkit", &full)
}

/// A 1 MiB sparse raw file: data at 64 KiB..128 KiB and 512 KiB..516 KiB.
fn sparse_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("disk.img");
    let mut content = vec![0u8; 1 << 20];
    for (i, b) in content[64 * 1024..128 * 1024].iter_mut().enumerate() {
        *b = (i % 253) as u8 + 1;
    }
    content[512 * 1024..516 * 1024].fill(0xa5);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&content[64 * 1024..128 * 1024], 64 * 1024)
        .unwrap();
    f.write_all_at(&content[512 * 1024..516 * 1024], 512 * 1024)
        .unwrap();
    (path, content)
}

fn qemu_nbd(extra: &[&str]) -> (Server, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (img, content) = sparse_image(dir.path());
    let img_str = img.to_str().unwrap().to_string();
    let mut args = vec!["-t", "-f", "raw", "-k", "SOCK", "-e", "4"];
    args.extend_from_slice(extra);
    args.push(&img_str);
    (Server::start(dir, "qemu-nbd", &args), img, content)
}

/// (offset, length, flags) runs with adjacent equal flags merged.
fn merge(runs: impl IntoIterator<Item = (u64, u64, u32)>) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for (off, len, flags) in runs {
        match out.last_mut() {
            Some(last) if last.2 == flags && last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len, flags)),
        }
    }
    out
}

/// The whole map of `context` through our client, one request at a time.
fn our_map(c: &mut Client<UnixStream>, context: &str) -> Vec<(u64, u64, u32)> {
    let size = c.info().size_bytes;
    let mut runs = Vec::new();
    let mut off = 0u64;
    while off < size {
        let len = (size - off).min(1 << 30) as u32;
        let extents: Vec<Extent> = c.block_status(off, len, context).unwrap();
        assert!(!extents.is_empty());
        for e in extents {
            runs.push((off, u64::from(e.len), e.flags));
            off += u64::from(e.len);
        }
    }
    assert_eq!(off, size, "extents must add up to the export size");
    merge(runs)
}

/// What `nbdinfo --map` prints for the same server.
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = Command::new("nbdinfo")
        .args(["--map", uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    merge(text.lines().map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    }))
}

#[test]
fn qemu_nbd_negotiates_and_reads_the_file() {
    let (server, _img, content) = qemu_nbd(&[]);
    let mut c = server.client(&["base:allocation"]);
    let info = c.info().clone();
    assert_eq!(info.size_bytes, 1 << 20);
    assert!(info.structured_replies);
    assert!(info.context_id("base:allocation").is_some());
    assert!(info.can_flush() && !info.read_only() && info.can_write_zeroes());
    assert!(info.block_max >= 64 * 1024 && info.block_max <= diskferry::nbd::MAX_PAYLOAD_BYTES);
    let mut buf = vec![0xeeu8; 1 << 20];
    c.read(0, &mut buf).unwrap();
    assert!(buf == content, "read data differs from the file");
    // An unaligned piece in the middle of a data region.
    let mut small = vec![0u8; 1000];
    c.read(64 * 1024 + 3, &mut small).unwrap();
    assert_eq!(small, content[64 * 1024 + 3..64 * 1024 + 1003]);
    c.disconnect().unwrap();
}

#[test]
fn qemu_nbd_block_status_matches_nbdinfo() {
    let (server, _img, _) = qemu_nbd(&[]);
    let mut c = server.client(&["base:allocation"]);
    let ours = our_map(&mut c, "base:allocation");
    assert_eq!(ours, nbdinfo_map(&server.uri()));
    // The data regions are reported as allocated (flags 0).
    assert!(
        ours.iter()
            .any(|&(o, l, f)| f == 0 && o <= 64 * 1024 && o + l >= 128 * 1024),
        "{ours:?}"
    );
    assert!(ours.iter().any(|&(o, _, f)| f == 3 && o == 0), "{ours:?}");
}

#[test]
fn qemu_nbd_write_flush_zero_read_back() {
    let (server, img, mut content) = qemu_nbd(&["--cache=writeback"]);
    let mut c = server.client(&["base:allocation"]);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    c.write(300_000, &data).unwrap();
    content[300_000..500_000].copy_from_slice(&data);
    c.write_zeroes(64 * 1024, 32 * 1024).unwrap();
    content[64 * 1024..96 * 1024].fill(0);
    c.flush().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    c.read(0, &mut buf).unwrap();
    assert!(buf == content, "read back differs from what was written");
    c.disconnect().unwrap();
    assert!(
        std::fs::read(&img).unwrap() == content,
        "file differs after flush"
    );
    drop(server);
}

#[test]
fn qemu_nbd_read_past_the_end_is_a_command_error() {
    let (server, _img, _) = qemu_nbd(&[]);
    let mut c = server.client(&[]);
    let mut buf = vec![0u8; 4096];
    match c.read((1 << 20) - 512, &mut buf) {
        Err(NbdError::Command {
            command: "READ",
            errno,
            ..
        }) => assert_eq!(errno, proto::NBD_EINVAL),
        other => panic!("expected a READ command error, got {other:?}"),
    }
    // The connection is still usable after a server-side error.
    c.read(0, &mut buf).unwrap();
}

#[test]
fn qemu_nbd_unknown_export_is_refused_with_the_server_message() {
    let (server, _img, _) = qemu_nbd(&["-x", "disk0"]);
    match Client::connect(server.stream(), "nope", &[]) {
        Err(e @ NbdError::Refused { .. }) => assert!(e.to_string().contains("nope"), "{e}"),
        Err(e) => panic!("expected Refused, got {e}"),
        Ok(_) => panic!("unknown export accepted"),
    }
    let c = Client::connect(server.stream(), "disk0", &[]).unwrap();
    assert_eq!(c.info().size_bytes, 1 << 20);
}

#[test]
fn nbdkit_pattern_reads_offsets() {
    let server = nbdkit(&["pattern", "size=1M"]);
    let mut c = server.client(&["base:allocation"]);
    assert!(c.info().read_only());
    let mut buf = vec![0u8; 64 * 1024];
    c.read(256 * 1024, &mut buf).unwrap();
    for (i, word) in buf.chunks(8).enumerate() {
        let expect = 256 * 1024 + 8 * i as u64;
        assert_eq!(u64::from_be_bytes(word.try_into().unwrap()), expect);
    }
    let e = c.write(0, &[0u8; 512]).unwrap_err();
    assert!(matches!(e, NbdError::Invalid(_)), "{e}");
}

#[test]
fn nbdkit_sparse_random_matches_nbdinfo_and_nbdcopy() {
    let server = nbdkit(&[
        "sparse-random",
        "size=64M",
        "seed=1",
        "percent=50",
        "random-content=true",
    ]);
    let mut c = server.client(&["base:allocation"]);
    let ours = our_map(&mut c, "base:allocation");
    assert!(
        ours.len() > 2,
        "a 50% sparse disk has several extents: {ours:?}"
    );
    assert_eq!(ours, nbdinfo_map(&server.uri()));

    // Our reads (with holes zero-filled) equal what nbdcopy copies.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.img");
    let st = Command::new("nbdcopy")
        .arg(server.uri())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let expected = std::fs::read(&copy).unwrap();
    let mut buf = vec![0xeeu8; expected.len()];
    c.read(0, &mut buf).unwrap();
    assert!(buf == expected, "our read differs from nbdcopy's copy");
}

#[test]
fn nbdkit_memory_write_trim_zero() {
    let server = nbdkit(&["memory", "1M"]);
    let mut c = server.client(&["base:allocation"]);
    assert!(c.info().can_trim() && c.info().can_write_zeroes() && !c.info().read_only());
    c.write(4096, &[0x5a; 8192]).unwrap();
    c.flush().unwrap();
    let mut buf = vec![0u8; 12288];
    c.read(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|b| *b == 0) && buf[4096..].iter().all(|b| *b == 0x5a));
    let map = our_map(&mut c, "base:allocation");
    assert!(
        map.iter()
            .any(|&(o, l, f)| f == 0 && o <= 4096 && o + l >= 12288),
        "{map:?}"
    );
    c.trim(4096, 4096).unwrap();
    c.write_zeroes(8192, 4096).unwrap();
    c.read(0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|b| *b == 0),
        "trimmed and zeroed ranges read as zeroes"
    );
}

#[test]
fn nbdkit_error_filter_gives_command_error() {
    let server = nbdkit(&[
        "--filter=error",
        "memory",
        "1M",
        "error-pread-rate=1",
        "error-pread=EIO",
    ]);
    let mut c = server.client(&[]);
    let mut buf = vec![0u8; 4096];
    match c.read(0, &mut buf) {
        Err(e @ NbdError::Command { .. }) => {
            let NbdError::Command { command, errno, .. } = &e else {
                unreachable!()
            };
            assert_eq!((*command, *errno), ("READ", proto::NBD_EIO), "{e}");
            assert!(e.to_string().contains("EIO"), "{e}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    // Writes are not affected by error-pread.
    c.write(0, &buf).unwrap();
}

#[test]
fn qemu_nbd_dirty_bitmap_context() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("inc.qcow2");
    let img_s = img.to_str().unwrap();
    let run = |prog: &str, args: &[&str]| {
        let st = Command::new(prog)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{prog} {args:?} failed");
    };
    run("qemu-img", &["create", "-q", "-f", "qcow2", img_s, "4M"]);
    run("qemu-img", &["bitmap", "--add", img_s, "b0"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xab 1M 64k", img_s],
    );
    let server = Server::start(
        dir,
        "qemu-nbd",
        &[
            "-r", "-t", "-e", "4", "-f", "qcow2", "-B", "b0", "-k", "SOCK", img_s,
        ],
    );
    let ctx = "qemu:dirty-bitmap:b0";
    let mut c = server.client(&["base:allocation", ctx]);
    assert!(
        c.info().context_id(ctx).is_some(),
        "{:?}",
        c.info().meta_contexts
    );
    let map = our_map(&mut c, ctx);
    // Exactly 1M..1M+64k is dirty (flag 1).
    let dirty: Vec<_> = map.iter().filter(|r| r.2 & 1 != 0).collect();
    assert_eq!(dirty, vec![&(1 << 20, 64 * 1024, 1)], "{map:?}");
    c.disconnect().unwrap();
    assert_eq!(map, nbdinfo_map_context(&server.uri(), ctx));
}

fn nbdinfo_map_context(uri: &str, ctx: &str) -> Vec<(u64, u64, u32)> {
    let out = Command::new("nbdinfo")
        .arg(format!("--map={ctx}"))
        .arg(uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    merge(text.lines().map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    }))
}
