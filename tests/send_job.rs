//! `diskferry send --job FILE`: every disk of a VM at once, each to its own
//! target on a real receiver (`diskferry serve` over mutual TLS on
//! loopback), from real qemu-nbd servers and image files, on both I/O
//! engines; bad job files refused before anything is dialled; a killed job
//! rerun resumes; `--rate` is one budget shared fairly by the disks.

mod common;
#[path = "support/rx.rs"]
mod rx;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use rx::{Bg, Rx};

const MIB: u64 = 1 << 20;

/// Write a job file of `disks` (source, target) named `name` in `dir`.
fn job_file(dir: &Path, name: &str, disks: &[(String, String)]) -> PathBuf {
    let mut text = format!("name = \"{name}\"\n");
    for (s, t) in disks {
        text.push_str(&format!("[[disk]]\nsource = \"{s}\"\ntarget = \"{t}\"\n"));
    }
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// `send --job JOB` to `to` with TLS from `tls`, JSON events.
fn send_job_cmd(dir: &Path, job: &Path, to: &str, tls: &Path, extra: &[&str]) -> Command {
    let mut cmd = diskferry();
    cmd.current_dir(dir)
        .args(["send", "--job"])
        .arg(job)
        .args(["--to", to, "--tls-dir"])
        .arg(tls)
        .args(["--json", "--no-progress"])
        .args(extra);
    cmd
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

fn done_of(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let done = json_lines(out).pop().expect("some output");
    assert_eq!(done["event"], "done", "{what}: {done}");
    done
}

#[test]
fn three_disks_qcow2_sparse_and_dense_by_send_job_are_byte_identical_on_the_receiver() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let raw_q = dir.join("sys.raw");
        sparse_file(&raw_q, 48 * MIB, &[(MIB, 700_000), (30 * MIB, 1 << 20)], 1);
        let qcow2 = dir.join("sys.qcow2");
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw_q)
            .arg(&qcow2)
            .status()
            .expect("qemu-img runs");
        assert!(st.success());
        let sparse = dir.join("data.img");
        sparse_file(
            &sparse,
            200 * MIB + 4096,
            &[(3, 5000), (150 * MIB, 300_000)],
            2,
        );
        let dense = dir.join("dense.img");
        dense_file(&dense, 24 * MIB as usize, 3);
        let server = qemu_nbd(dir, "dense", &dense, "raw", true, &[]);
        let rx = Rx::start(&dir.join("rx"), &[]);
        std::fs::create_dir(rx.root.join("vm1")).unwrap();
        let job = job_file(
            dir,
            "vm1",
            &[
                (qcow2.to_str().unwrap().into(), "vm1/sda.img".into()),
                ("data.img".into(), "vm1/sdb.img".into()),
                (server.uri(), "vm1/sdc.img".into()),
            ],
        );
        let out = send_job_cmd(dir, &job, &rx.addr, &rx.tls, &["--io-engine", engine])
            .output()
            .unwrap();
        let done = done_of(&out, engine);
        assert_same(&raw_q, &rx.target("vm1/sda.img"));
        assert_same(&sparse, &rx.target("vm1/sdb.img"));
        assert_same(&dense, &rx.target("vm1/sdc.img"));
        assert_eq!(done["job"], "vm1");
        assert_eq!(done["disks_ok"], 3, "{engine}: {done}");
        assert_eq!(done["disks_failed"], 0, "{engine}: {done}");
        let disks = done["disks"].as_array().unwrap();
        let names: Vec<&str> = disks.iter().map(|v| v["disk"].as_str().unwrap()).collect();
        assert_eq!(names, ["vm1/sda.img", "vm1/sdb.img", "vm1/sdc.img"]);
        assert!(disks.iter().all(|v| v["outcome"] == "done"), "{done}");
        assert!(disks.iter().all(|v| v["engine"] == engine), "{done}");
        assert_eq!(disks[2]["bytes_written"].as_u64().unwrap(), 24 * MIB);
        let on_wire: u64 = disks
            .iter()
            .map(|v| v["bytes_on_wire"].as_u64().unwrap())
            .sum();
        assert_eq!(done["bytes_on_wire"].as_u64().unwrap(), on_wire);
        assert!(on_wire > 0);
        assert_eq!(done["bytes_resumed_skipped"], 0, "{done}");
        let lines = json_lines(&out);
        let progress = |key: &str| {
            lines
                .iter()
                .filter(|v| v["event"] == "progress" && v.get(key).is_some())
                .count()
        };
        assert!(progress("disk") >= 3, "{engine}: per-disk progress events");
        assert!(progress("job") >= 1, "{engine}: job progress events");
    }
}

#[test]
fn bad_job_files_and_options_exit_2_naming_the_line_and_nothing_is_dialled() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    sparse_file(&dir.join("a.img"), 4 * MIB, &[(0, 10_000)], 1);
    let tls = rx::certs(dir);
    // A listener that would see any connection attempt.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let to = listener.local_addr().unwrap().to_string();
    let disk = |s: &str, t: &str| format!("[[disk]]\nsource = \"{s}\"\ntarget = \"{t}\"\n");
    let good = format!("name = \"vm\"\n{}", disk("a.img", "x.img"));
    let cases: Vec<(&str, String, &[&str], &str)> = vec![
        (
            "missing field",
            format!(
                "name = \"vm\"\n[[disk]]\nsource = \"a.img\"\n{}",
                disk("a.img", "x.img")
            ),
            &[],
            "line 2",
        ),
        (
            "unknown key",
            format!("name = \"vm\"\n{}formt = \"raw\"\n", disk("a.img", "x.img")),
            &[],
            "line 5",
        ),
        (
            "duplicate target",
            format!(
                "name = \"vm\"\n{}{}",
                disk("a.img", "x.img"),
                disk("a.img", "x.img")
            ),
            &[],
            "line 7",
        ),
        ("no disk", "\nname = \"vm\"\n".to_string(), &[], "line 2"),
        ("zero streams", good.clone(), &["--streams", "0"], "streams"),
        (
            "zero io timeout",
            good,
            &["--io-timeout", "0s"],
            "io-timeout",
        ),
    ];
    for (what, text, extra, word) in cases {
        let job = dir.join("bad.toml");
        std::fs::write(&job, text).unwrap();
        let out = send_job_cmd(dir, &job, &to, &tls, extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(stderr.contains(word), "{what}: {stderr}");
        assert_eq!(last_json(&out)["event"], "error", "{what}");
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{what}: the receiver was dialled: {other:?}"),
        }
    }
}

#[test]
fn a_failing_disk_does_not_stop_the_others_and_sets_the_exit_code() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let ok = dir.join("ok.img");
    dense_file(&ok, 8 * MIB as usize, 5);
    let rx = Rx::start(&dir.join("rx"), &[]);
    std::fs::create_dir(rx.root.join("vm2")).unwrap();
    let job = job_file(
        dir,
        "vm2",
        &[
            ("missing.img".into(), "vm2/a.img".into()),
            ("ok.img".into(), "vm2/b.img".into()),
        ],
    );
    let out = send_job_cmd(dir, &job, &rx.addr, &rx.tls, &[])
        .output()
        .unwrap();
    assert_same(&ok, &rx.target("vm2/b.img"));
    let done = json_lines(&out).pop().unwrap();
    let code = done["disks"][0]["exit_code"].as_i64().unwrap();
    assert!(code != 0, "{done}");
    assert_eq!(out.status.code(), Some(code as i32), "{}", rx::stderr(&out));
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["disks_ok"], 1, "{done}");
    assert_eq!(done["disks_failed"], 1, "{done}");
    assert_eq!(done["disks"][0]["outcome"], "failed", "{done}");
    assert_eq!(done["disks"][1]["outcome"], "done", "{done}");
}

#[test]
fn a_killed_send_job_rerun_completes_and_skips_what_was_durable() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    dense_file(&a, 64 * MIB as usize, 7);
    dense_file(&b, 48 * MIB as usize, 8);
    let rx = Rx::start(&dir.join("rx"), &["--checkpoint-interval", "200ms"]);
    std::fs::create_dir(rx.root.join("vm3")).unwrap();
    let job = job_file(
        dir,
        "vm3",
        &[
            ("a.img".into(), "vm3/a.img".into()),
            ("b.img".into(), "vm3/b.img".into()),
        ],
    );
    // Slow enough to be killed part-way: 16 MB/s for 112 MiB.
    let mut bg = Bg::spawn(send_job_cmd(
        dir,
        &job,
        &rx.addr,
        &rx.tls,
        &["--rate", "16M", "--compress", "none"],
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let durable = |name: &str| rx.journal(name).map_or(0, |j| j.durable.covered_bytes());
    while durable("vm3/a.img") < 8 * MIB || durable("vm3/b.img") < 8 * MIB {
        assert!(Instant::now() < deadline, "no journal progress");
        assert!(bg.running(), "the job ended before it was killed");
        std::thread::sleep(Duration::from_millis(50));
    }
    bg.kill9();
    // What the receiver holds once it has seen the streams end (it
    // journals what was flushed when they drop).
    std::thread::sleep(Duration::from_millis(1000));
    let held = durable("vm3/a.img") + durable("vm3/b.img");
    let out = send_job_cmd(dir, &job, &rx.addr, &rx.tls, &[])
        .output()
        .unwrap();
    let done = done_of(&out, "rerun");
    assert_same(&a, &rx.target("vm3/a.img"));
    assert_same(&b, &rx.target("vm3/b.img"));
    let skipped = done["bytes_resumed_skipped"].as_u64().unwrap();
    assert!(
        skipped >= 16 * MIB && skipped <= held,
        "skipped {skipped} of {held} durable: {done}"
    );
    for disk in done["disks"].as_array().unwrap() {
        assert_eq!(disk["resumed"], true, "{disk}");
        assert!(disk["bytes_resumed_skipped"].as_u64().unwrap() >= 8 * MIB);
    }
}

/// (elapsed_s, bytes_done) of each JSON progress event of `disk`.
fn disk_samples(lines: &[serde_json::Value], disk: &str) -> Vec<(f64, u64)> {
    lines
        .iter()
        .filter(|v| v["event"] == "progress" && v["disk"] == disk)
        .map(|v| {
            (
                v["elapsed_s"].as_f64().unwrap(),
                v["bytes_done"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Bytes done at `t` (seconds), interpolated.
fn done_at(samples: &[(f64, u64)], t: f64) -> f64 {
    let mut prev = (0.0, 0u64);
    for &(ts, b) in samples {
        if ts >= t {
            let f = if ts > prev.0 {
                (t - prev.0) / (ts - prev.0)
            } else {
                1.0
            };
            return prev.1 as f64 + f * (b as f64 - prev.1 as f64);
        }
        prev = (ts, b);
    }
    prev.1 as f64
}

/// The job's budget in the test below, MB/s. The figure is
/// 100M, but a debug build on a 2-core test machine moves only 80–95 MB/s
/// through TLS on loopback with both ends on it, and less while the other
/// tests of this file run beside it (at 40M the big disk alone fell to
/// 28–38 MB/s on a loaded machine): a budget the machine exceeds with room
/// is what shows the limiter and its sharing. The release check at 100M
/// is in docs/bench/history.md#jobs-issue-15-sessions-9-and-10.
const BUDGET_MB: f64 = 24.0;

#[test]
fn the_rate_is_one_budget_shared_fairly_by_the_disks() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let small = dir.join("small.img");
    let big = dir.join("big.img");
    let (small_mib, big_mib) = (40u64, 100u64);
    dense_file(&small, (small_mib * MIB) as usize, 9);
    dense_file(&big, (big_mib * MIB) as usize, 10);
    let rx = Rx::start(&dir.join("rx"), &[]);
    std::fs::create_dir(rx.root.join("vm4")).unwrap();
    // The big disk first: the small one must not wait behind it.
    let job = job_file(
        dir,
        "vm4",
        &[
            ("big.img".into(), "vm4/big.img".into()),
            ("small.img".into(), "vm4/small.img".into()),
        ],
    );
    let rate = format!("{BUDGET_MB}M");
    let out = send_job_cmd(
        dir,
        &job,
        &rx.addr,
        &rx.tls,
        &["--rate", &rate, "--compress", "none"],
    )
    .output()
    .unwrap();
    done_of(&out, "rate");
    assert_same(&small, &rx.target("vm4/small.img"));
    assert_same(&big, &rx.target("vm4/big.img"));
    let lines = json_lines(&out);
    let s = disk_samples(&lines, "vm4/small.img");
    let b = disk_samples(&lines, "vm4/big.img");
    let series = format!("small {s:?} big {b:?}");
    // The job as a whole, from its first to its last sample of progress.
    let (t_first, t_last) = (s[0].0.min(b[0].0), b.last().unwrap().0);
    let total = ((small_mib + big_mib) * MIB) as f64;
    let job_rate = total / (t_last - t_first) / 1e6;
    assert!(
        (0.9 * BUDGET_MB..=1.1 * BUDGET_MB).contains(&job_rate),
        "{job_rate:.1} MB/s for the job under {BUDGET_MB} MB/s: {series}"
    );
    // While both run (until the small one is nearly done), each has at
    // least 30 % of the budget, and together they hold it.
    let small_end = s
        .iter()
        .find(|&&(_, bytes)| bytes as f64 >= 0.9 * (small_mib * MIB) as f64)
        .expect("the small disk ends")
        .0;
    let (t0, t1) = (t_first + 0.5, small_end);
    assert!(t1 - t0 >= 1.0, "both ran for {:.1} s: {series}", t1 - t0);
    let mut both = 0.0;
    for (name, samples) in [("small", &s), ("big", &b)] {
        let r = (done_at(samples, t1) - done_at(samples, t0)) / (t1 - t0) / 1e6;
        assert!(
            r >= 0.3 * BUDGET_MB,
            "{name} got {r:.1} MB/s of {BUDGET_MB} while both ran ({t0:.1}..{t1:.1} s): {series}"
        );
        both += r;
    }
    assert!(
        (0.9 * BUDGET_MB..=1.1 * BUDGET_MB).contains(&both),
        "{both:.1} MB/s together: {series}"
    );
    // Once the small disk is done, the big one takes its share.
    let after = (small_end + 0.5, small_end + 1.5);
    let r = (done_at(&b, after.1) - done_at(&b, after.0)) / (after.1 - after.0) / 1e6;
    assert!(
        r >= 0.8 * BUDGET_MB,
        "the big disk alone: {r:.1} MB/s ({:.1}..{:.1} s): {series}",
        after.0,
        after.1
    );
}

fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

fn online_cpus() -> usize {
    let out = Command::new("getconf")
        .arg("_NPROCESSORS_ONLN")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn a_send_job_runs_one_worker_per_core_however_many_disks() {
    let cpus = online_cpus();
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let rx = Rx::start(&dir.join("rx"), &[]);
        let disks: Vec<(String, String)> = (0..4)
            .map(|i| {
                let name = format!("d{i}.img");
                dense_file(&dir.join(&name), 12 * MIB as usize, 30 + i);
                (name.clone(), name)
            })
            .collect();
        let job = job_file(dir, "four", &disks);
        let mut child = send_job_cmd(
            dir,
            &job,
            &rx.addr,
            &rx.tls,
            &["--io-engine", engine, "--rate", "16M"],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        let pid = child.id();
        let mut samples = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            let names = thread_names(pid);
            let count = |p: &str| names.iter().filter(|n| n.starts_with(p)).count();
            // Every disk sending (4 streams each): all four run.
            if count("disk-") == 4 && count("sender-") == 16 {
                samples.push(count("worker-"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().unwrap();
        done_of(&out, engine);
        assert!(
            samples.len() >= 5,
            "{engine}: only {} samples while all four disks sent",
            samples.len()
        );
        assert!(
            samples.iter().all(|&w| w == cpus),
            "{engine}: worker threads while four disks sent: {samples:?} (cores: {cpus})"
        );
        for (name, _) in &disks {
            assert_same(&dir.join(name), &rx.target(name));
        }
    }
}
