//! `diskferry copy --job FILE`: every disk of a job file at once, on one
//! engine. A bad job file exits 2 naming its line before anything is
//! opened; a disk that fails does not stop the others; the exit code is the
//! worst disk's.

use std::io::Read;
use std::time::Instant;

use super::copy::{CopyArgs, start, watch};
use super::exit_code;
use crate::jobfile::{self, JOB_FILE_MAX_BYTES, JobFile};
use crate::progress::{JobView, emit_json, job::total_of};
use crate::runtime::job::DiskOutcome;
use crate::runtime::{Engine, JobProgress, JobReport, JobSpec};

pub(super) fn run_copy_job(a: &CopyArgs) -> i32 {
    let Some(path) = &a.job else {
        unreachable!("called with --job")
    };
    let job = match read(path).and_then(|text| {
        let job = jobfile::parse(&text).map_err(|e| e.to_string())?;
        same_file_check(&job)?;
        Ok(job)
    }) {
        Ok(job) => job,
        Err(msg) => return refuse(a.json, &format!("{}: {msg}", path.display())),
    };
    let disks: Vec<_> = job
        .disks
        .iter()
        .map(|d| a.disk(d.source.clone(), d.target.clone()))
        .collect();
    if let Some(e) = disks.iter().find_map(|d| d.check().err()) {
        return refuse(a.json, &e.to_string());
    }
    let engine = match start(a) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("diskferry: {e}");
            return exit_code(&e);
        }
    };
    let spec = JobSpec {
        name: job.name.clone(),
        disks: disks.into_iter().map(Into::into).collect(),
        rate_bytes_per_s: a.rate,
    };
    let (report, last, worst) = run_job(
        &engine,
        &job,
        spec,
        (a.json, a.no_progress, a.progress_interval),
        |r| done_event(r, engine.kind()),
    );
    if worst == 0 && !a.json && !a.no_progress {
        let total = total_of(&last);
        eprintln!(
            "copied {} disks of job {}: {} data bytes ({} zero/hole bytes skipped) in {:.2}s",
            report.disks.len(),
            report.name,
            total.bytes_written,
            total.bytes_zeroed,
            report.elapsed.as_secs_f64()
        );
    }
    worst
}

/// Runs a job to its end on `engine`: one progress view (a line per disk
/// and a total), the `done` event `done_of` makes, each failed disk's
/// error, reporting progress about every `every`. Returns the report, the last progress and the worst disk's exit
/// code (0 when every disk succeeded).
pub(super) fn run_job(
    engine: &Engine,
    job: &JobFile,
    spec: JobSpec,
    (json, no_progress, every): (bool, bool, std::time::Duration),
    done_of: impl Fn(&JobReport) -> serde_json::Value,
) -> (JobReport, JobProgress, i32) {
    let targets: Vec<String> = job.disks.iter().map(|d| d.target.clone()).collect();
    let started = Instant::now();
    let handle = engine.submit(spec);
    let mut view = JobView::new(json, no_progress, &targets);
    watch(&handle, started, every, |p, el| view.update(p, el));
    let last = handle.progress();
    view.update(&last, started.elapsed());
    let report = handle.wait();
    view.finish(&done_of(&report));
    let mut worst = 0;
    for d in &report.disks {
        if let Err(e) = &d.result {
            eprintln!("diskferry: disk {}: {e}", d.target);
            worst = worst.max(exit_code(e));
        }
    }
    (report, last, worst)
}

/// Print why the job was refused (exit 2).
pub(super) fn refuse(json: bool, msg: &str) -> i32 {
    if json {
        emit_json(&serde_json::json!({"event": "error", "message": msg}));
    }
    eprintln!("diskferry: {msg}");
    2
}

/// The job file's text, bounded.
pub(super) fn read(path: &std::path::Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read the job file: {e}"))?;
    let mut text = String::new();
    file.take(JOB_FILE_MAX_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the job file: {e}"))?;
    Ok(text)
}

/// Two targets that exist already and are one file (links, symlinks) are
/// refused like two equal names. Only stat(2): nothing is opened.
fn same_file_check(job: &JobFile) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: Vec<((u64, u64), usize)> = Vec::new();
    for d in &job.disks {
        let Ok(meta) = std::fs::metadata(&d.target) else {
            continue;
        };
        let id = (meta.dev(), meta.ino());
        if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
            return Err(format!(
                "line {}: target {:?} is the same file as the target of the disk at line {first}",
                d.line, d.target
            ));
        }
        seen.push((id, d.line));
    }
    Ok(())
}

/// The final event: per disk its report (or error) under `disks`, and the
/// totals at the top.
pub(super) fn done_event(report: &JobReport, kind: crate::engine::EngineKind) -> serde_json::Value {
    let disks: Vec<serde_json::Value> = report.disks.iter().map(disk_done).collect();
    let mut total = crate::pipeline::stats::Snapshot::default();
    let mut size_bytes = 0;
    for d in &report.disks {
        total.bytes_planned += d.counters.bytes_planned;
        total.bytes_done += d.counters.bytes_done;
        total.bytes_read += d.counters.bytes_read;
        total.bytes_written += d.counters.bytes_written;
        total.bytes_zeroed += d.counters.bytes_zeroed;
        total.read_retries += d.counters.read_retries;
        size_bytes += d.result.as_ref().map_or(0, |r| r.size_bytes());
    }
    let failed = report.disks.iter().filter(|d| d.result.is_err()).count();
    serde_json::json!({
        "event": "done",
        "job": report.name,
        "disks_ok": report.disks.len() - failed,
        "disks_failed": failed,
        "size_bytes": size_bytes,
        "bytes_planned": total.bytes_planned,
        "bytes_done": total.bytes_done,
        "bytes_read": total.bytes_read,
        "bytes_written": total.bytes_written,
        "bytes_zeroed": total.bytes_zeroed,
        "read_retries": total.read_retries,
        "elapsed_s": report.elapsed.as_secs_f64(),
        "engine": kind,
        "disks": disks,
    })
}

fn disk_done(d: &DiskOutcome) -> serde_json::Value {
    let mut v = match &d.result {
        Ok(r) => serde_json::to_value(r).unwrap_or_else(|_| serde_json::json!({})),
        Err(e) => {
            let mut v = serde_json::to_value(d.counters).unwrap_or_else(|_| serde_json::json!({}));
            v["error"] = e.to_string().into();
            v["exit_code"] = exit_code(e).into();
            v
        }
    };
    v["disk"] = d.target.clone().into();
    v["outcome"] = match &d.result {
        Ok(_) => "done",
        Err(crate::pipeline::CopyError::Cancelled) => "cancelled",
        Err(_) => "failed",
    }
    .into();
    v
}
