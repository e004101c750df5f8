//! `diskferry send --job FILE`: every disk of a job file at once, on one
//! engine, each to its own target (and job, and journal) on the receiver.
//! A bad job file or bad options exit 2 naming the line before anything is
//! opened or dialled; a disk that fails does not stop the others; the exit
//! code is the worst disk's; `--rate` is one budget for the whole job.

use super::copy_job::{done_event, read, refuse, run_job};
use super::{SendArgs, exit_code};
use crate::jobfile;
use crate::pipeline::CopyError;
use crate::progress::job::total_of;
use crate::replicate::send::{self, SendError, SendOptions};
use crate::runtime::{Engine, EngineOptions, JobReport, JobSpec};

impl SendArgs {
    /// The options of one disk (`source` to the receiver's `target`) with
    /// these arguments' settings.
    pub(super) fn disk(&self, source: String, target: String) -> SendOptions {
        SendOptions {
            source,
            source_format: None,
            to: self.to.clone(),
            target,
            tls_dir: self.tls_dir.clone(),
            insecure_plaintext: self.insecure_plaintext,
            streams: self.streams,
            compress: self.compress,
            rate_bytes_per_s: self.rate,
            verify: self.verify,
            connections: self.connections,
            requests: self.requests,
            chunk_bytes: self.chunk_size,
            threads: self.threads,
            engine: self.io_engine,
            restart: self.restart,
            overwrite: self.overwrite,
            stall_timeout: self.stall_timeout,
            retry_for: self.retry_for,
            source_id: None,
            lanes: self.lanes,
            io_timeout: self.io_timeout,
            test_hooks: super::test_hooks::from_env(),
            // A job's disks take --delta; the other pass flags conflict
            // with --job (see `SendArgs::pass` for a single disk).
            pass: match self.delta {
                true => crate::replicate::send::PassRequest::Delta {
                    block_bytes: self
                        .delta_block
                        .unwrap_or(crate::replicate::send::pass::DELTA_BLOCK_DEFAULT_BYTES),
                },
                false => crate::replicate::send::PassRequest::Full,
            },
            change_id: None,
            progress_every: self.progress_interval,
        }
    }
}

/// A send's error as the command line says it: refused options name the
/// flags.
pub(super) fn cli_error(e: SendError) -> CopyError {
    let usage = |m: &str| CopyError::Usage(m.to_string());
    match e {
        SendError::NoTransportSecurity => {
            usage("--tls-dir is required (or --insecure-plaintext on both sides)")
        }
        SendError::TlsAndPlaintext => usage(
            "both --tls-dir and --insecure-plaintext given: choose one (TLS unless the network is trusted)",
        ),
        SendError::ZeroIoTimeout => usage("--io-timeout must be more than 0"),
        SendError::Streams { max, .. } => usage(&format!("--streams must be 1..={max}")),
        SendError::NoChangedSource => {
            usage("--changed needs dirty-bitmap:NAME or changed-areas:FILE")
        }
        SendError::DeltaBlock { min, max, got } => usage(&format!(
            "--delta-block must be a power of two in {min}..={max} bytes, not {got}"
        )),
        SendError::ChangeIdTooLong { max, got } => {
            usage(&format!("--change-id has {got} bytes; at most {max}"))
        }
        SendError::Copy(e) => e,
    }
}

pub(super) fn run_send_job(a: &SendArgs) -> i32 {
    let Some(path) = &a.job else {
        unreachable!("called with --job")
    };
    if let Err(msg) = a.pass() {
        return refuse(a.json, &msg);
    }
    let job = match read(path).and_then(|text| jobfile::parse(&text).map_err(|e| e.to_string())) {
        Ok(job) => job,
        Err(msg) => return refuse(a.json, &format!("{}: {msg}", path.display())),
    };
    let disks: Vec<SendOptions> = job
        .disks
        .iter()
        .map(|d| a.disk(d.source.clone(), d.target.clone()))
        .collect();
    if let Some(e) = disks.iter().find_map(|d| d.check().err()) {
        return refuse(a.json, &cli_error(e).to_string());
    }
    if a.insecure_plaintext {
        send::warn_plaintext();
    }
    let kind = match super::io_engine::resolve(a.io_engine) {
        Ok(kind) => kind,
        Err(why) => {
            let e = CopyError::Engine(why);
            eprintln!("diskferry: {e}");
            return exit_code(&e);
        }
    };
    let engine = match Engine::start(&EngineOptions {
        threads: a.threads,
        kind,
        ..EngineOptions::default()
    }) {
        Ok(engine) => engine,
        Err(e) => {
            let e = CopyError::from(e);
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
        |r| send_done_event(r, &engine),
    );
    if worst == 0 && !a.json && !a.no_progress {
        let total = total_of(&last);
        eprintln!(
            "sent {} disks of job {}: {} data bytes, {} bytes on the wire, in {:.2}s",
            report.disks.len(),
            report.name,
            total.bytes_written,
            send_done_event(&report, &engine)["bytes_on_wire"],
            report.elapsed.as_secs_f64()
        );
    }
    worst
}

/// The job's `done` event (as `copy --job`'s) with the send's totals:
/// bytes on the wire, resumed bytes skipped, bytes resent, reconnects.
fn send_done_event(report: &JobReport, engine: &Engine) -> serde_json::Value {
    let mut done = done_event(report, engine.kind());
    let sends: Vec<_> = report
        .disks
        .iter()
        .filter_map(|d| d.result.as_ref().ok().and_then(|r| r.as_send()))
        .collect();
    done["bytes_on_wire"] = sends.iter().map(|r| r.bytes_on_wire).sum::<u64>().into();
    done["bytes_resumed_skipped"] = sends
        .iter()
        .map(|r| r.bytes_resumed_skipped)
        .sum::<u64>()
        .into();
    done["bytes_resent"] = sends.iter().map(|r| r.bytes_resent).sum::<u64>().into();
    done["reconnects"] = sends.iter().map(|r| r.reconnects).sum::<u64>().into();
    done["bytes_changed"] = sends.iter().map(|r| r.bytes_changed).sum::<u64>().into();
    done["verified"] = (!sends.is_empty() && sends.iter().all(|r| r.verified)).into();
    done
}
