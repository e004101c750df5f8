//! `diskferry copy --job FILE`: every disk of a VM at once on one set of
//! workers, against real qemu-nbd / nbdkit servers and image files, on both
//! I/O engines; bad job files refused before anything is opened.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

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

fn copy_job(dir: &Path, job: &Path, engine: &str, extra: &[&str]) -> Output {
    diskferry()
        .current_dir(dir)
        .args(["copy", "--job"])
        .arg(job)
        .args(["--io-engine", engine, "--json"])
        .args(extra)
        .output()
        .expect("diskferry runs")
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
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
fn three_disks_qcow2_sparse_and_dense_by_copy_job_are_byte_identical() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // A qcow2 image (converted from a raw file with islands of data).
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
        // A sparse raw file, larger, little data.
        let sparse = dir.join("data.img");
        sparse_file(
            &sparse,
            200 * MIB + 4096,
            &[(3, 5000), (150 * MIB, 300_000)],
            2,
        );
        // A dense disk served by qemu-nbd.
        let dense = dir.join("dense.img");
        dense_file(&dense, 24 * MIB as usize, 3);
        let server = qemu_nbd(dir, "dense", &dense, "raw", true, &[]);
        std::fs::create_dir(dir.join("vm1")).unwrap();
        let job = job_file(
            dir,
            "vm1",
            &[
                (qcow2.to_str().unwrap().into(), "vm1/sda.img".into()),
                ("data.img".into(), "vm1/sdb.img".into()),
                (server.uri(), "vm1/sdc.img".into()),
            ],
        );
        let out = copy_job(dir, &job, engine, &[]);
        assert!(
            out.status.success(),
            "{engine}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same(&raw_q, &dir.join("vm1/sda.img"));
        assert_same(&sparse, &dir.join("vm1/sdb.img"));
        assert_same(&dense, &dir.join("vm1/sdc.img"));
        let lines = json_lines(&out);
        let done = lines.last().unwrap();
        assert_eq!(done["event"], "done", "{engine}: {done}");
        assert_eq!(done["job"], "vm1");
        assert_eq!(done["disks_ok"], 3, "{engine}: {done}");
        let disks = done["disks"].as_array().unwrap();
        let names: Vec<&str> = disks.iter().map(|v| v["disk"].as_str().unwrap()).collect();
        assert_eq!(names, ["vm1/sda.img", "vm1/sdb.img", "vm1/sdc.img"]);
        let planned: u64 = disks
            .iter()
            .map(|v| v["bytes_planned"].as_u64().unwrap())
            .sum();
        assert_eq!(done["bytes_planned"].as_u64().unwrap(), planned);
        assert_eq!(disks[2]["bytes_written"].as_u64().unwrap(), 24 * MIB);
        assert!(
            disks
                .iter()
                .all(|v| v["outcome"] == "done" && v["engine"] == engine)
        );
        // Progress events: per disk (with `disk`) and for the job.
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

/// Names of the threads of `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

#[test]
fn a_job_runs_one_worker_per_core_however_many_disks() {
    let cpus = online_cpus();
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // Six slow sources: the job runs for seconds.
        let servers: Vec<Server> = (0..6)
            .map(|i| {
                nbdkit(
                    dir,
                    &format!("slow{i}"),
                    &["--filter=delay", "pattern", "size=16M", "delay-read=20ms"],
                )
            })
            .collect();
        let disks: Vec<(String, String)> = servers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.uri(), format!("d{i}.img")))
            .collect();
        let job = job_file(dir, "six", &disks);
        let mut child = diskferry()
            .current_dir(dir)
            .args(["copy", "--job"])
            .arg(&job)
            .args(["--io-engine", engine, "--json", "--rate", "32M"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut samples = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            let names = thread_names(pid);
            let workers = names.iter().filter(|n| n.starts_with("worker-")).count();
            let disks = names.iter().filter(|n| n.starts_with("disk-")).count();
            if disks == 6 {
                samples.push((Instant::now(), workers));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = child.wait_with_output().unwrap();
        // The workers stop as the last disk thread ends: leave out the
        // samples of the job's last moments.
        let ended = Instant::now();
        let samples: Vec<usize> = samples
            .into_iter()
            .filter(|(at, _)| ended.duration_since(*at) > Duration::from_millis(400))
            .map(|(_, w)| w)
            .collect();
        assert!(
            out.status.success(),
            "{engine}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            samples.len() >= 5,
            "{engine}: only {} samples while all six disks ran",
            samples.len()
        );
        assert!(
            samples.iter().all(|&w| w == cpus),
            "{engine}: worker threads while six disks ran: {samples:?} (cores: {cpus})"
        );
        for (i, _) in servers.iter().enumerate() {
            let t = dir.join(format!("d{i}.img"));
            assert_eq!(std::fs::metadata(&t).unwrap().len(), 16 * MIB);
        }
    }
}

#[test]
fn eight_disks_at_once_stay_under_the_memory_budget() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        // Slow sources, and a fixed depth of 64 requests of 256 KiB per
        // connection: 64 MiB of buffers in use per disk, so without one
        // budget eight disks would hold 512 MiB.
        let servers: Vec<Server> = (0..8)
            .map(|i| {
                nbdkit(
                    dir,
                    &format!("s{i}"),
                    &["--filter=delay", "pattern", "size=32M", "delay-read=10ms"],
                )
            })
            .collect();
        let disks: Vec<(String, String)> = servers
            .iter()
            .enumerate()
            .map(|(i, s)| (s.uri(), format!("d{i}.img")))
            .collect();
        let job = job_file(dir, "eight", &disks);
        let out = Command::new("/usr/bin/time")
            .arg("-v")
            .arg(env!("CARGO_BIN_EXE_diskferry"))
            .current_dir(dir)
            .args(["copy", "--job"])
            .arg(&job)
            .args(["--io-engine", engine, "--json", "--memory", "32Mi"])
            .args(["--requests", "64"])
            .output()
            .expect("/usr/bin/time runs (install time)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{engine}: {stderr}");
        let peak_kib: u64 = stderr
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Maximum resident set size (kbytes): ")
            })
            .expect("time -v reports the peak RSS")
            .parse()
            .unwrap();
        let done = last_json(&out);
        assert_eq!(done["disks_ok"], 8, "{engine}: {done}");
        eprintln!("{engine}: peak RSS {peak_kib} KiB");
        assert!(
            peak_kib * 1024 < 32 * MIB + 64 * MIB,
            "{engine}: peak RSS {peak_kib} KiB over the 32 MiB budget + 64 MiB"
        );
    }
}

#[test]
fn bad_job_files_exit_2_naming_the_line_and_nothing_is_created() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    sparse_file(&dir.join("a.img"), 4 * MIB, &[(0, 10_000)], 1);
    std::fs::write(dir.join("t1.img"), b"keep").unwrap();
    std::os::unix::fs::symlink("t1.img", dir.join("t2.img")).unwrap();
    let disk = |s: &str, t: &str| format!("[[disk]]\nsource = \"{s}\"\ntarget = \"{t}\"\n");
    let cases: Vec<(&str, String, usize, &str)> = vec![
        (
            "missing field",
            format!(
                "name = \"vm\"\n[[disk]]\nsource = \"a.img\"\n{}",
                disk("a.img", "x.img")
            ),
            2,
            "target",
        ),
        (
            "unknown key",
            format!("name = \"vm\"\n{}formt = \"raw\"\n", disk("a.img", "x.img")),
            5,
            "formt",
        ),
        (
            "duplicate target",
            format!(
                "name = \"vm\"\n{}{}",
                disk("a.img", "x.img"),
                disk("a.img", "./x.img")
            ),
            7,
            "x.img",
        ),
        (
            "two disks on one file",
            format!(
                "name = \"vm\"\n{}{}",
                disk("a.img", "t1.img"),
                disk("a.img", "t2.img")
            ),
            7,
            "same file",
        ),
        ("no disk", "\nname = \"vm\"\n".to_string(), 2, "no [[disk]]"),
    ];
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".toml"))
            .collect();
        v.sort();
        v
    };
    let before = listing();
    for (what, text, line, word) in cases {
        let job = dir.join("bad.toml");
        std::fs::write(&job, text).unwrap();
        let out = copy_job(dir, &job, "threads", &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(stderr.contains(&format!("line {line}")), "{what}: {stderr}");
        assert!(stderr.contains(word), "{what}: {stderr}");
        assert!(
            stderr.contains("bad.toml"),
            "{what} names the file: {stderr}"
        );
        assert_eq!(listing(), before, "{what}: nothing created");
        assert_eq!(std::fs::read(dir.join("t1.img")).unwrap(), b"keep");
        let error = last_json(&out);
        assert_eq!(error["event"], "error", "{what}");
    }
}

#[test]
fn a_failing_disk_does_not_stop_the_others_and_sets_the_exit_code() {
    for engine in ENGINES {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        sparse_file(&dir.join("a.img"), 16 * MIB, &[(MIB, 200_000)], 5);
        let job = job_file(
            dir,
            "vm",
            &[
                ("a.img".into(), "a.out".into()),
                ("missing.img".into(), "m.out".into()),
            ],
        );
        let out = copy_job(dir, &job, engine, &[]);
        assert_eq!(out.status.code(), Some(3), "{engine}: source failed");
        assert_same(&dir.join("a.img"), &dir.join("a.out"));
        let done = last_json(&out);
        assert_eq!(done["disks_ok"], 1, "{engine}: {done}");
        assert_eq!(done["disks_failed"], 1);
        let failed = &done["disks"][1];
        assert_eq!(failed["disk"], "m.out");
        assert_eq!(failed["outcome"], "failed");
        assert_eq!(failed["exit_code"], 3);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("disk m.out"), "{stderr}");
    }
}
