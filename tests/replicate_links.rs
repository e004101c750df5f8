//! Replication and copies over links that are not plain loopback: a
//! receiver in another network namespace across a veth pair, `--compress
//! auto` on a shaped 200 Mbit/s link, and the queue depth `copy` picks by
//! where its source is (local, across a network, or a slow local server).

mod common;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/replicate.rs"]
mod replicate;

use common::*;
use netns::Netns;
use replicate::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

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
