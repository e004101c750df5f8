//! Progress of a job of several disks: a bar per disk and a total bar on a
//! terminal (indicatif's multi-bar), or JSON events: a `progress` event per
//! disk carrying `disk` (its target name) and one for the whole job
//! carrying `job`.

use std::time::Duration;

use super::{emit_json, progress_event};
use crate::pipeline::stats::Snapshot;
use crate::runtime::{JobPhase, JobProgress};

/// How a job's progress is shown.
pub enum JobView {
    Quiet,
    Bars {
        // Kept alive for the bars it draws.
        _multi: indicatif::MultiProgress,
        disks: Vec<indicatif::ProgressBar>,
        total: indicatif::ProgressBar,
    },
    Json {
        /// Per disk, then the job: bytes done and when, at the last event.
        last: Vec<(u64, Duration)>,
    },
}

const DISK_TEMPLATE: &str =
    "{prefix:<20!} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}";
const TOTAL_TEMPLATE: &str = "{prefix:<20!} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} [{elapsed_precise}]";

impl JobView {
    /// A view for the disks with these targets.
    pub fn new(json: bool, no_progress: bool, targets: &[String]) -> Self {
        use std::io::IsTerminal;
        if json {
            return JobView::Json {
                last: vec![(0, Duration::ZERO); targets.len() + 1],
            };
        }
        if no_progress || !std::io::stderr().is_terminal() {
            return JobView::Quiet;
        }
        let multi = indicatif::MultiProgress::new();
        let style = |t: &str| {
            indicatif::ProgressStyle::with_template(t)
                .expect("static template")
                .progress_chars("=> ")
        };
        let disks = targets
            .iter()
            .map(|t| {
                let bar = multi.add(indicatif::ProgressBar::new(0));
                bar.set_style(style(DISK_TEMPLATE));
                bar.set_prefix(t.clone());
                bar
            })
            .collect();
        let total = multi.add(indicatif::ProgressBar::new(0));
        total.set_style(style(TOTAL_TEMPLATE));
        total.set_prefix("total");
        JobView::Bars {
            _multi: multi,
            disks,
            total,
        }
    }

    /// New counters (about once a second).
    pub fn update(&mut self, p: &JobProgress, elapsed: Duration) {
        match self {
            JobView::Quiet => {}
            JobView::Bars { disks, total, .. } => {
                for (bar, d) in disks.iter().zip(&p.disks) {
                    bar.set_length(d.counters.bytes_planned);
                    bar.set_position(d.counters.bytes_done);
                    bar.set_message(phase_word(d.state));
                }
                total.set_length(p.bytes_planned);
                total.set_position(p.bytes_done);
            }
            JobView::Json { last } => {
                for (i, d) in p.disks.iter().enumerate() {
                    if d.state == JobPhase::Starting {
                        continue;
                    }
                    let mut line = progress_event(&d.counters, last[i].0, last[i].1, elapsed);
                    line["disk"] = d.target.clone().into();
                    line["state"] = phase_word(d.state).into();
                    emit_json(&line);
                    last[i] = (d.counters.bytes_done, elapsed);
                }
                let sum = total_of(p);
                let j = last.len() - 1;
                let mut line = progress_event(&sum, last[j].0, last[j].1, elapsed);
                line["job"] = p.name.clone().into();
                line["state"] = phase_word(p.state).into();
                line["disks"] = p.disks.len().into();
                line["disks_over"] = p.disks.iter().filter(|d| d.state.is_over()).count().into();
                emit_json(&line);
                last[j] = (sum.bytes_done, elapsed);
            }
        }
    }

    /// The job ended; `done` is the final JSON event (printed in JSON mode).
    pub fn finish(&mut self, done: &serde_json::Value) {
        match self {
            JobView::Quiet => {}
            JobView::Bars { disks, total, .. } => {
                for bar in disks {
                    bar.finish();
                }
                total.finish();
            }
            JobView::Json { .. } => emit_json(done),
        }
    }
}

/// The counters of every disk added up.
pub fn total_of(p: &JobProgress) -> Snapshot {
    let mut sum = Snapshot {
        planning_done: true,
        ..Snapshot::default()
    };
    for d in &p.disks {
        let c = &d.counters;
        sum.bytes_planned += c.bytes_planned;
        sum.planning_done &= c.planning_done;
        sum.bytes_done += c.bytes_done;
        sum.bytes_read += c.bytes_read;
        sum.bytes_written += c.bytes_written;
        sum.bytes_zeroed += c.bytes_zeroed;
        sum.read_retries += c.read_retries;
    }
    sum
}

fn phase_word(p: JobPhase) -> &'static str {
    match p {
        JobPhase::Starting => "starting",
        JobPhase::Running => "running",
        JobPhase::Paused => "paused",
        JobPhase::Flushing => "flushing",
        JobPhase::Done => "done",
        JobPhase::Failed => "failed",
        JobPhase::Cancelled => "cancelled",
    }
}
