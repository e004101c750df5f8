//! When to stop: the convergence model of a series of passes. Sans-IO:
//! the driver records what each pass did and gets a [`Verdict`].
//!
//! A pass costs a fixed part (connecting, planning, and for a delta the
//! reads of both disks) plus the bytes it moves at some rate:
//! `duration = fixed + changed / rate`. The two parameters are fitted to
//! the passes seen so far (least squares over the last [`FIT_PASSES`];
//! one pass gives `fixed = 0`). The source changes while a pass runs:
//! pass `n` carries what changed between the starts of passes `n − 1` and
//! `n`, so `dirty_rate = changed(n) / (start(n) − start(n − 1))`, and the
//! next pass will carry about `dirty_rate × (start(n + 1) − start(n))`,
//! where that gap is pass `n`'s own wall time. The final pass (with the
//! source stopped) carries the same, so its predicted duration is the
//! predicted downtime.

use std::time::Duration;

/// Passes the fit looks back on: the rate of change and the link drift.
pub const FIT_PASSES: usize = 4;
/// A pass predicted to take more than this share of the one before it is
/// not converging…
pub const SHRINK_RATIO: f64 = 0.9;
/// …and this many of those in a row end the series.
pub const STALLED_PASSES_MAX: u32 = 2;
/// Default bound on the number of passes before the final one.
pub const MAX_PASSES_DEFAULT: u32 = 10;

/// What one finished pass did, as the driver measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassFigures {
    /// Its number, from 1.
    pub pass: u32,
    /// Bytes the pass had to bring over (its plan; for a delta the bytes
    /// of the blocks that differed).
    pub bytes_changed: u64,
    /// Bytes it put on the wire.
    pub bytes_on_wire: u64,
    /// When it started (the change list was taken), from the start of the
    /// first pass.
    pub started: Duration,
    /// Its wall time, change command included.
    pub duration: Duration,
}

/// What to do after a pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Run another pass while the source keeps running.
    Another {
        /// How long the next pass should take.
        predicted_next: Duration,
    },
    /// The next pass fits the downtime budget: stop the source and run the
    /// final pass.
    Ready {
        /// How long the final pass should take.
        predicted_downtime: Duration,
    },
    /// The passes do not get short enough: the source changes about as
    /// fast as they move it, or the pass bound was reached.
    NotConverging {
        /// How long the next pass would take.
        predicted_next: Duration,
        /// Why, for the operator.
        reason: String,
    },
}

/// The series of passes and its budget.
#[derive(Debug, Clone)]
pub struct Convergence {
    max_downtime: Duration,
    max_passes: u32,
    history: Vec<PassFigures>,
    stalled: u32,
}

impl Convergence {
    /// A series that should end with a final pass no longer than
    /// `max_downtime`, after at most `max_passes` passes.
    pub fn new(max_downtime: Duration, max_passes: u32) -> Self {
        Convergence {
            max_downtime,
            max_passes: max_passes.max(1),
            history: Vec::new(),
            stalled: 0,
        }
    }

    /// The passes recorded so far.
    pub fn history(&self) -> &[PassFigures] {
        &self.history
    }

    /// Records a finished pass and decides what comes next.
    pub fn record(&mut self, figures: PassFigures) -> Verdict {
        self.history.push(figures);
        let n = self.history.len();
        if n < 2 {
            // The first pass (usually a full copy) says nothing about how
            // fast the source changes.
            let predicted_next = figures.duration;
            return if self.max_passes <= 1 {
                self.not_converging(predicted_next, "the pass bound was reached")
            } else {
                Verdict::Another { predicted_next }
            };
        }
        let predicted = self.predict_next();
        if predicted <= self.max_downtime {
            return Verdict::Ready {
                predicted_downtime: predicted,
            };
        }
        if predicted.as_secs_f64() > SHRINK_RATIO * figures.duration.as_secs_f64() {
            self.stalled += 1;
        } else {
            self.stalled = 0;
        }
        if self.stalled >= STALLED_PASSES_MAX {
            let (dirty, rate) = (self.dirty_rate(), self.fit().1);
            return self.not_converging(
                predicted,
                &format!(
                    "the source changes at about {:.1} MB/s and passes move about {:.1} MB/s: \
                     each pass is not getting shorter",
                    dirty / 1e6,
                    rate / 1e6
                ),
            );
        }
        if n as u32 >= self.max_passes {
            return self.not_converging(predicted, "the pass bound was reached");
        }
        Verdict::Another {
            predicted_next: predicted,
        }
    }

    fn not_converging(&self, predicted_next: Duration, why: &str) -> Verdict {
        Verdict::NotConverging {
            predicted_next,
            reason: format!(
                "{why}; the next pass would take about {:.1}s, over the {:.1}s budget",
                predicted_next.as_secs_f64(),
                self.max_downtime.as_secs_f64()
            ),
        }
    }

    /// Bytes per second the source changed during the last pass interval.
    fn dirty_rate(&self) -> f64 {
        let n = self.history.len();
        let (prev, last) = (&self.history[n - 2], &self.history[n - 1]);
        let gap = last.started.saturating_sub(prev.started).as_secs_f64();
        last.bytes_changed as f64 / gap.max(1e-3)
    }

    /// `(fixed_s, bytes_per_s)` fitted to the recent passes (the first
    /// full or delta pass included: it is the same model with more bytes,
    /// and it pins the slope while the later passes are alike).
    fn fit(&self) -> (f64, f64) {
        let recent: Vec<(f64, f64)> = self
            .history
            .iter()
            .rev()
            .take(FIT_PASSES)
            .map(|p| (p.bytes_changed as f64, p.duration.as_secs_f64()))
            .collect();
        fit_line(&recent)
    }

    fn predict_next(&self) -> Duration {
        let last = self.history[self.history.len() - 1];
        let next_bytes = self.dirty_rate() * last.duration.as_secs_f64();
        let (fixed_s, rate) = self.fit();
        Duration::from_secs_f64((fixed_s + next_bytes / rate).clamp(0.0, 1e9))
    }
}

/// Least squares `duration = fixed + bytes / rate` over `(bytes, seconds)`
/// points, clamped to `fixed ≥ 0` and a positive rate. With one point (or
/// points of one size) the fixed part is 0.
fn fit_line(points: &[(f64, f64)]) -> (f64, f64) {
    let through_origin = |pts: &[(f64, f64)]| {
        let bytes: f64 = pts.iter().map(|p| p.0).sum();
        let secs: f64 = pts.iter().map(|p| p.1).sum();
        (0.0, (bytes / secs.max(1e-6)).max(1.0))
    };
    let n = points.len() as f64;
    if points.len() < 2 {
        return through_origin(points);
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    if sxx <= f64::EPSILON * mean_x.max(1.0).powi(2) || sxy <= 0.0 {
        // One size only, or bigger passes were not slower: no slope to
        // trust; take the mean time as fixed cost and the mean rate.
        let (_, rate) = through_origin(points);
        let fixed = (mean_y - mean_x / rate).max(0.0);
        return (fixed, rate);
    }
    let slope = sxy / sxx; // seconds per byte
    let fixed = mean_y - slope * mean_x;
    if fixed < 0.0 {
        return through_origin(points);
    }
    (fixed, 1.0 / slope)
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
