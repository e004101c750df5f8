//! `diskferry send` → `diskferry serve` end to end, with the real binary on
//! both sides, real qemu-nbd / nbdkit sources, mutual TLS on loopback and
//! between two network namespaces joined by a veth pair.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Tests in this file that time things, or load both cores, run one at a
/// time (cargo runs the tests of a file in parallel).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running `diskferry serve`, stopped with SIGTERM on drop.
struct Receiver {
    child: Child,
    addr: String,
    root: PathBuf,
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

fn certs(dir: &Path) -> PathBuf {
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
fn serve(dir: &Path, tls: Option<&Path>, listen: &str, netns: Option<&str>) -> Receiver {
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

fn send(
    src: &str,
    rx: &Receiver,
    target: &str,
    tls: Option<&Path>,
    extra: &[&str],
) -> std::process::Output {
    send_to(src, &rx.addr, target, tls, None, extra)
}

fn send_to(
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

fn ok(out: &std::process::Output) -> serde_json::Value {
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

/// The main round trip, on each I/O engine (`send --io-engine`), like
/// every `copy` test.
#[test]
fn qemu_nbd_and_nbdkit_sources_over_mutual_tls() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let tls = certs(d.path());
    let rx = serve(d.path(), Some(&tls), "127.0.0.1:0", None);
    for e in ENGINES {
        let dir = d.path().join(e);
        std::fs::create_dir_all(&dir).unwrap();
        round_trip(&dir, &rx, &tls, e);
    }
}

/// Sends of qemu-nbd, nbdkit and file sources with the `engine` I/O
/// engine; each target compared byte for byte with its source.
fn round_trip(dir: &Path, rx: &Receiver, tls: &Path, engine: &str) {
    let send = |src: &str, target: &str, extra: &[&str]| {
        let mut all = vec!["--io-engine", engine];
        all.extend_from_slice(extra);
        let out = send(src, rx, &format!("{engine}-{target}"), Some(tls), &all);
        let done = ok(&out);
        assert_eq!(done["engine"], engine, "{done}");
        out
    };
    let target = |name: &str| rx.root.join(format!("{engine}-{name}"));
    // qemu-nbd source: a sparse file with data in odd places (qemu-nbd
    // exports sizes rounded up to 512 bytes; copy's tests cover odd sizes).
    let size = 64 * MIB + 3584;
    let src = dir.join("src.img");
    let regions = [
        (0, 4096),
        (3 * MIB + 17, 300_000),
        (40 * MIB, 6 * MIB as usize),
        (size - 5000, 5000),
    ];
    sparse_file(&src, size, &regions, 21);
    let q = qemu_nbd(dir, "src", &src, "raw", true, &[]);
    let done = ok(&send(&q.uri(), "vm1.img", &["--verify"]));
    let dst = target("vm1.img");
    assert_same(&src, &dst);
    assert!(
        allocated(&dst) <= allocated(&src) + 2 * MIB,
        "target is not sparse"
    );
    assert_eq!(done["verified"], true);
    assert_eq!(done["image_digest"].as_str().map(str::len), Some(64));
    for k in [
        "bytes_on_wire",
        "compression_ratio",
        "bytes_planned",
        "bytes_read",
        "bytes_written",
        "bytes_zeroed",
        "elapsed_s",
    ] {
        assert!(done[k].is_number(), "done lacks {k}: {done}");
    }
    // nbdkit sparse-random (random content) with 2 streams and zstd.
    let k = nbdkit(
        dir,
        "sr",
        &[
            "sparse-random",
            "size=96M",
            "seed=5",
            "percent=40",
            "random-content=true",
        ],
    );
    let reference = dir.join("sr.img");
    nbd_to_file(&k.uri(), &reference);
    send(
        &k.uri(),
        "vm2.img",
        &["--streams", "2", "--compress", "zstd"],
    );
    assert_same(&reference, &target("vm2.img"));
    // Compressible data with lz4: fewer bytes on the wire than data.
    let text = dir.join("text.img");
    let mut t = Vec::new();
    while t.len() < 16 * MIB as usize {
        t.extend_from_slice(
            format!("line {} of a very compressible log file\n", t.len()).as_bytes(),
        );
    }
    std::fs::write(&text, &t).unwrap();
    let done = ok(&send(
        text.to_str().unwrap(),
        "text.img",
        &["--compress", "lz4"],
    ));
    assert_same(&text, &target("text.img"));
    assert!(
        done["bytes_on_wire"].as_u64().unwrap() < t.len() as u64 / 2,
        "{done}"
    );
    // The same data with auto to a receiver on this host: compressing
    // saves no bandwidth on loopback, so only exploring chunks compress.
    let done = ok(&send(
        text.to_str().unwrap(),
        "text-auto.img",
        &["--compress", "auto"],
    ));
    assert_same(&text, &target("text-auto.img"));
    let c = &done["compression"];
    let compressed = c["chunks_lz4"].as_u64().unwrap() + c["chunks_zstd"].as_u64().unwrap();
    assert!(
        compressed <= c["chunks_explored"].as_u64().unwrap(),
        "{done}"
    );
}

#[test]
fn foreign_or_missing_certificates_are_refused_and_nothing_is_written() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let tls = certs(d.path());
    let other = tempfile::tempdir().unwrap();
    let foreign = certs(other.path());
    let rx = serve(d.path(), Some(&tls), "127.0.0.1:0", None);
    let src = d.path().join("src.img");
    dense_file(&src, MIB as usize, 3);
    let out = send(src.to_str().unwrap(), &rx, "a.img", Some(&foreign), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CA") || err.contains("certificate"), "{err}");
    let out = send(src.to_str().unwrap(), &rx, "b.img", None, &[]);
    assert!(
        !out.status.success(),
        "plaintext sender accepted by a TLS receiver"
    );
    assert!(!rx.root.join("a.img").exists() && !rx.root.join("b.img").exists());
    let out = send(src.to_str().unwrap(), &rx, "../escape.img", Some(&tls), &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TargetNotAllowed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.path().join("escape.img").exists());
    // The receiver still serves a good sender afterwards.
    ok(&send(src.to_str().unwrap(), &rx, "c.img", Some(&tls), &[]));
    assert_same(&src, &rx.root.join("c.img"));
}

#[test]
fn rate_limit_holds_within_ten_percent() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let tls = certs(d.path());
    let rx = serve(d.path(), Some(&tls), "127.0.0.1:0", None);
    let src = d.path().join("src.img");
    dense_file(&src, 300 * MIB as usize, 4);
    let t = Instant::now();
    let done = ok(&send(
        src.to_str().unwrap(),
        &rx,
        "r.img",
        Some(&tls),
        &["--rate", "50M", "--compress", "none"],
    ));
    let secs = t.elapsed().as_secs_f64();
    let rate = done["bytes_on_wire"].as_u64().unwrap() as f64 / secs;
    assert!(secs >= 5.0, "too fast to judge: {secs:.1}s");
    assert!(
        (45e6..=55e6).contains(&rate),
        "rate {rate:.0} B/s is not within 10% of 50 MB/s ({secs:.2}s)"
    );
    assert_same(&src, &rx.root.join("r.img"));
}

/// Two network namespaces joined by a veth pair, optionally shaped.
struct Netns {
    a: String,
    b: String,
}

impl Netns {
    /// Panics when the namespaces cannot be made: these machines allow them
    /// (root, iproute2, veth, tc tbf), so a test that cannot run fails
    /// rather than passing unrun.
    fn new(tag: &str, shape: Option<&str>) -> Self {
        let id = format!("{}{}", tag, std::process::id() % 100_000);
        let (a, b) = (format!("dfa{id}"), format!("dfb{id}"));
        let run = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        assert!(
            run(&["netns", "add", &a]),
            "cannot create network namespaces here (ip netns add {a})"
        );
        let ns = Netns {
            a: a.clone(),
            b: b.clone(),
        };
        let va = format!("va{id}");
        let vb = format!("vb{id}");
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), b.clone()],
            vec![
                "link".into(),
                "add".into(),
                va.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                vb.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                va.clone(),
                "netns".into(),
                a.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                vb.clone(),
                "netns".into(),
                b.clone(),
            ],
            vec![
                "-n".into(),
                a.clone(),
                "addr".into(),
                "add".into(),
                "10.213.7.1/24".into(),
                "dev".into(),
                va.clone(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "addr".into(),
                "add".into(),
                "10.213.7.2/24".into(),
                "dev".into(),
                vb.clone(),
            ],
            vec![
                "-n".into(),
                a.clone(),
                "link".into(),
                "set".into(),
                va.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "link".into(),
                "set".into(),
                vb.clone(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                a.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
            vec![
                "-n".into(),
                b.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for s in steps {
            let args: Vec<&str> = s.iter().map(String::as_str).collect();
            assert!(run(&args), "ip {} failed", args.join(" "));
        }
        if let Some(rate) = shape {
            let st = Command::new("ip")
                .args([
                    "netns", "exec", &a, "tc", "qdisc", "add", "dev", &va, "root", "tbf", "rate",
                    rate, "burst", "256kb", "latency", "50ms",
                ])
                .status()
                .unwrap();
            assert!(st.success(), "tc qdisc add … tbf rate {rate} refused");
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn between_two_network_namespaces() {
    let _serial = serial();
    let ns = Netns::new("e", None);
    let d = tempfile::tempdir().unwrap();
    let tls = certs(d.path());
    let rx = serve(d.path(), Some(&tls), "10.213.7.2:0", Some(&ns.b));
    let src = d.path().join("src.img");
    sparse_file(
        &src,
        48 * MIB,
        &[(MIB, 3 * MIB as usize), (30 * MIB, 100_000)],
        8,
    );
    let rx_addr = rx.addr.clone();
    for e in ENGINES {
        let name = format!("ns-{e}.img");
        let out = send_to(
            src.to_str().unwrap(),
            &rx_addr,
            &name,
            Some(&tls),
            Some(&ns.a),
            &["--verify", "--io-engine", e],
        );
        let done = ok(&out);
        assert_eq!(done["verified"], true);
        assert_eq!(done["engine"], e, "{done}");
        assert_same(&src, &rx.root.join(&name));
    }
}

#[test]
fn auto_compression_beats_raw_on_a_slow_link() {
    let _serial = serial();
    let ns = Netns::new("c", Some("200mbit"));
    let d = tempfile::tempdir().unwrap();
    // A real ext4 file system holding real files (documentation and
    // message catalogues, ~280 MB, hard-linked into a staging folder).
    let stage = d.path().join("stage");
    std::fs::create_dir(&stage).unwrap();
    for dir in ["/usr/share/doc", "/usr/share/locale"] {
        let st = Command::new("cp")
            .args(["-al", dir])
            .arg(&stage)
            .status()
            .unwrap();
        if !st.success() {
            let st = Command::new("cp")
                .args(["-a", dir])
                .arg(&stage)
                .status()
                .unwrap();
            assert!(st.success(), "cannot stage {dir}");
        }
    }
    let img = d.path().join("fs.img");
    let st = Command::new("truncate")
        .args(["-s", "1G"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&stage)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 -d failed");
    let tls = certs(d.path());
    let rx = serve(d.path(), Some(&tls), "10.213.7.2:0", Some(&ns.b));
    let run = |mode: &str, name: &str| {
        let t = Instant::now();
        let done = ok(&send_to(
            img.to_str().unwrap(),
            &rx.addr,
            name,
            Some(&tls),
            Some(&ns.a),
            &["--compress", mode],
        ));
        (t.elapsed().as_secs_f64(), done)
    };
    let (t_none, _) = run("none", "none.img");
    let (t_auto, done) = run("auto", "auto.img");
    assert_same(&img, &rx.root.join("none.img"));
    assert_same(&img, &rx.root.join("auto.img"));
    eprintln!(
        "200mbit link: none {t_none:.1}s, auto {t_auto:.1}s (ratio {}), {done}",
        done["compression_ratio"]
    );
    // On a 200 Mbit/s link auto must compress. How much faster that makes
    // the send is a benchmark's question (scripts/bench-net, measured
    // alternating against `none`), not a timed test's: with the cores
    // shared by other work the speed-up here fell from 1.8–2.1x on a quiet
    // machine to 1.3x. The test keeps the sign: auto must not lose.
    let ratio = done["compression_ratio"].as_f64().unwrap_or(0.0);
    assert!(ratio >= 1.6, "auto compressed only {ratio:.2}x: {done}");
    let wire = done["bytes_on_wire"].as_u64().unwrap_or(u64::MAX);
    let read = done["bytes_read"].as_u64().unwrap_or(0);
    assert!(
        wire.saturating_mul(8) <= read.saturating_mul(5),
        "auto put {wire} bytes on the wire for {read} read: {done}"
    );
    assert!(
        t_auto < t_none,
        "auto ({t_auto:.1}s) is slower than none ({t_none:.1}s) on a 200 Mbit/s link"
    );
}

/// `diskferry copy` picks its queue depth by where the source is: 2
/// requests per connection on this host (cache-resident buffers), 64 from a
/// server across a network (here qemu-nbd in another namespace, over veth);
/// `--requests` overrides both. Each copy is checked byte for byte.
#[test]
fn copy_queue_depth_follows_where_the_source_is() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    sparse_file(&src, 24 * MIB, &[(MIB, 5 * MIB as usize)], 11);
    let depth = |out: &std::process::Output, dst: &Path| {
        assert!(
            out.status.success(),
            "copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same(&src, dst);
        last_json(out)["requests_per_connection"].as_u64().unwrap()
    };

    let local = qemu_nbd(d.path(), "near", &src, "raw", true, &[]);
    let dst = d.path().join("near.img");
    let out = copy(&local.uri(), dst.to_str().unwrap(), "uring", &["--json"]);
    assert_eq!(depth(&out, &dst), 2);
    std::fs::remove_file(&dst).unwrap();
    let out = copy(
        &local.uri(),
        dst.to_str().unwrap(),
        "uring",
        &["--json", "--requests", "5"],
    );
    assert_eq!(depth(&out, &dst), 5);

    let ns = Netns::new("q", None);
    let pid = d.path().join("far.pid");
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.a, "qemu-nbd", "-r", "-t", "-e", "8"])
        .args(["-f", "raw", "-b", "10.213.7.1", "-p", "10811", "--fork"])
        .arg("--pid-file")
        .arg(&pid)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-nbd in {} did not start", ns.a);
    struct Kill(PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            if let Ok(p) = std::fs::read_to_string(&self.0) {
                let _ = Command::new("kill").arg(p.trim()).status();
            }
        }
    }
    let _kill = Kill(pid);
    let dst = d.path().join("far.img");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.b, env!("CARGO_BIN_EXE_diskferry")])
        .args(["copy", "nbd://10.213.7.1:10811", dst.to_str().unwrap()])
        .args(["--json", "--no-progress"])
        .output()
        .unwrap();
    assert_eq!(depth(&out, &dst), 64);
}

/// A slow server behind a local socket (nbdkit's delay filter: 5 ms per
/// read, as a plugin fetching from a remote hypervisor would be) starts at
/// the shallow local depth, and the workers deepen their queues because
/// the reads do not wait for each other. `--requests` pins the depth.
#[test]
fn a_slow_local_source_gets_a_deeper_queue() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let slow = nbdkit(
        d.path(),
        "slow",
        &["--filter=delay", "pattern", "size=96M", "delay-read=5ms"],
    );
    let reference = d.path().join("ref.img");
    nbd_to_file(&slow.uri(), &reference);
    let run = |extra: &[&str]| {
        let dst = d.path().join("out.img");
        let _ = std::fs::remove_file(&dst);
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let out = copy(&slow.uri(), dst.to_str().unwrap(), "uring", &args);
        assert!(
            out.status.success(),
            "copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same(&reference, &dst);
        let done = last_json(&out);
        let start = done["requests_per_connection"].as_u64().unwrap()
            * done["source_connections"].as_u64().unwrap();
        (start, done["chunks_in_flight_peak"].as_u64().unwrap())
    };
    let (start, peak) = run(&[]);
    assert_eq!(start, 8, "4 connections × 2 requests on this host");
    assert!(peak >= 2 * start, "the queue did not deepen: peak {peak}");
    let (start, peak) = run(&["--requests", "2"]);
    assert_eq!((start, peak), (8, 8));
}
