//! Progress for people (a bar on a terminal) and for scripts
//! (newline-delimited JSON events on stdout).

#![forbid(unsafe_code)]
use std::io::Write;
use std::time::Duration;

use crate::pipeline::stats::Snapshot;

pub mod job;
pub use job::JobView;

/// How progress is shown.
pub enum Progress {
    /// Nothing (not a terminal, or `--no-progress`).
    Quiet,
    /// A bar on stderr.
    Bar(indicatif::ProgressBar),
    /// JSON lines on stdout.
    Json {
        last_done: u64,
        last_elapsed: Duration,
    },
}

impl Progress {
    pub fn new(json: bool, no_progress: bool) -> Self {
        use std::io::IsTerminal;
        if json {
            return Progress::Json {
                last_done: 0,
                last_elapsed: Duration::ZERO,
            };
        }
        if no_progress || !std::io::stderr().is_terminal() {
            return Progress::Quiet;
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        Progress::Bar(bar)
    }

    /// New counters (called about once a second).
    pub fn update(&mut self, s: &Snapshot, elapsed: Duration) {
        match self {
            Progress::Quiet => {}
            Progress::Bar(bar) => {
                bar.set_length(s.bytes_planned);
                bar.set_position(s.bytes_done);
            }
            Progress::Json {
                last_done,
                last_elapsed,
            } => {
                let line = progress_event(s, *last_done, *last_elapsed, elapsed);
                emit_json(&line);
                *last_done = s.bytes_done;
                *last_elapsed = elapsed;
            }
        }
    }

    /// The job ended; `done` is the final JSON event (printed in JSON mode).
    pub fn finish(&mut self, done: Option<&serde_json::Value>) {
        match self {
            Progress::Quiet => {}
            Progress::Bar(bar) => bar.finish_and_clear(),
            Progress::Json { .. } => {
                if let Some(v) = done {
                    emit_json(v);
                }
            }
        }
    }
}

/// Print one JSON event on its own line and flush.
pub fn emit_json(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// A `progress` event for counters `s` at `elapsed`, the previous event
/// having seen `last_done` bytes done at `last_elapsed`.
pub(crate) fn progress_event(
    s: &Snapshot,
    last_done: u64,
    last_elapsed: Duration,
    elapsed: Duration,
) -> serde_json::Value {
    let dt = elapsed.saturating_sub(last_elapsed).as_secs_f64();
    let rate = if dt > 0.0 {
        s.bytes_done.saturating_sub(last_done) as f64 / dt
    } else {
        0.0
    };
    let avg = if elapsed.as_secs_f64() > 0.0 {
        s.bytes_done as f64 / elapsed.as_secs_f64()
    } else {
        0.0
    };
    let left = s.bytes_planned.saturating_sub(s.bytes_done) as f64;
    let eta = if avg > 0.0 { Some(left / avg) } else { None };
    serde_json::json!({
        "event": "progress",
        "bytes_planned": s.bytes_planned,
        "bytes_done": s.bytes_done,
        "bytes_read": s.bytes_read,
        "bytes_written": s.bytes_written,
        "bytes_zeroed": s.bytes_zeroed,
        "rate_bytes_per_s": rate.round(),
        "eta_s": eta.map(|e| (e * 10.0).round() / 10.0),
        "elapsed_s": elapsed.as_secs_f64(),
    })
}
