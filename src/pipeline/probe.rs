//! Probing whether a deeper queue moves more bytes: the whole copy's
//! throughput, not each worker's latency.
//!
//! [`super::depth::DepthCtl`] deepens a worker's queue only while its reads
//! do not wait on each other. A disk that serves several reads at once still
//! makes each read wait longer as the queue deepens, so that rule keeps the
//! shallow start even where a deeper queue reads faster: dense 2 GiB from
//! qemu-nbd into an nbdkit memory target took 2.34 s at the shallow depth
//! and 2.05 s with this probe (nbdcopy 2.03 s). Where reads and writes share
//! one disk, depth only queues, and the probe must find no gain.
//!
//! So the control thread measures bytes read per [`EPOCH`] for all workers
//! together (each worker's own throughput would rise by taking the other's
//! share of a shared disk), and every so often doubles every worker's
//! window for two epochs: one to settle, one to judge. At least [`GAIN`]
//! times the rate before: keep it and probe again; otherwise go back and
//! wait twice as long as last time before the next probe (at most
//! [`BACKOFF_MAX_EPOCHS`]). The scale never exceeds [`SCALE_MAX`].

#![forbid(unsafe_code)]
use std::time::Duration;

/// One measurement interval.
pub const EPOCH: Duration = Duration::from_millis(150);
/// A deeper queue is kept only if it reads this much faster.
pub const GAIN: f64 = 1.15;
/// Largest multiple of the workers' own windows.
pub const SCALE_MAX: usize = 8;
/// Epochs measured before the first probe (start-up, the first reads).
/// Copies shorter than this never probe: a probe's two epochs at a depth
/// that does not pay cost a short copy more than it can win (ext4 into
/// nbdkit memory, 0.78 s: 2 % slower with probes from the third epoch).
const WARMUP_EPOCHS: usize = 5;
/// Longest wait between failed probes.
const BACKOFF_MAX_EPOCHS: usize = 32;

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Measuring at the current scale; probe when `wait` reaches 0.
    Steady { wait: usize },
    /// The scale was just doubled: let the deeper queue fill.
    Settling { before: f64 },
    /// Judge this epoch against `before`.
    Judging { before: f64 },
}

#[derive(Debug, Clone)]
pub struct DepthProbe {
    scale: usize,
    state: State,
    backoff: usize,
    /// The last two epochs' rates at the current scale.
    recent: [f64; 2],
    /// Probes judged so far.
    probes: usize,
}

impl Default for DepthProbe {
    fn default() -> Self {
        Self {
            scale: 1,
            state: State::Steady {
                wait: WARMUP_EPOCHS,
            },
            backoff: 1,
            recent: [0.0; 2],
            probes: 0,
        }
    }
}

impl DepthProbe {
    /// The multiple of every worker's window in force now.
    pub fn scale(&self) -> usize {
        self.scale
    }

    /// Probes judged so far, kept or not.
    pub fn probes(&self) -> usize {
        self.probes
    }

    /// An epoch ended having read `rate` bytes per second; returns the
    /// scale for the next epoch.
    pub fn epoch(&mut self, rate: f64) -> usize {
        self.state = match std::mem::replace(&mut self.state, State::Steady { wait: 0 }) {
            State::Steady { wait } => {
                self.recent = [self.recent[1], rate];
                if wait > 0 {
                    State::Steady { wait: wait - 1 }
                } else if self.scale >= SCALE_MAX || self.recent.contains(&0.0) {
                    // At the deepest scale, or nothing moved in one of the
                    // last two epochs (a stretch of holes, a stalled
                    // source): no rate to beat, so no probe.
                    State::Steady { wait: 0 }
                } else {
                    // The mean of two epochs: one quick epoch does not set
                    // the bar low.
                    let before = (self.recent[0] + self.recent[1]) / 2.0;
                    self.scale *= 2;
                    State::Settling { before }
                }
            }
            State::Settling { before } => State::Judging { before },
            State::Judging { before } => {
                self.probes += 1;
                let kept = rate >= before * GAIN;
                tracing::debug!(
                    scale = self.scale,
                    rate_mb_s = rate / 1e6,
                    before_mb_s = before / 1e6,
                    kept,
                    "depth probe"
                );
                if kept {
                    self.backoff = 1;
                    // Two epochs at the new scale before the next probe,
                    // so its bar is measured there.
                    self.recent = [rate, rate];
                    State::Steady { wait: 1 }
                } else {
                    self.scale /= 2;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX_EPOCHS);
                    State::Steady { wait: self.backoff }
                }
            }
        };
        self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive `p` for `epochs` with a source whose rate is `rate(scale)`.
    fn run(p: &mut DepthProbe, epochs: usize, rate: impl Fn(usize) -> f64) -> Vec<usize> {
        (0..epochs).map(|_| p.epoch(rate(p.scale()))).collect()
    }

    #[test]
    fn a_source_that_reads_faster_deeper_gets_the_deepest_scale() {
        let mut p = DepthProbe::default();
        // Each doubling reads 40 % faster.
        let scales = run(&mut p, 40, |s| {
            1e9 * 1.4f64.powi(i32::try_from(s.trailing_zeros()).unwrap())
        });
        assert_eq!(p.scale(), SCALE_MAX, "{scales:?}");
        assert!(
            scales[..WARMUP_EPOCHS].iter().all(|&s| s == 1),
            "{scales:?}"
        );
    }

    #[test]
    fn a_source_that_does_not_gets_back_to_one_and_probes_ever_less_often() {
        let mut p = DepthProbe::default();
        let scales = run(&mut p, 200, |_| 1e9);
        assert_eq!(p.scale(), 1);
        // Two epochs at scale 2 per probe; probes spread out to every
        // BACKOFF_MAX_EPOCHS epochs.
        let deep = scales.iter().filter(|&&s| s > 1).count();
        assert!(
            deep <= 2 * 12,
            "{deep} epochs deeper than 1 in 200: {scales:?}"
        );
        assert!(scales.iter().all(|&s| s <= 2), "{scales:?}");
        // Every stretch at scale 2 was one probe, judged.
        let stretches = scales
            .iter()
            .enumerate()
            .filter(|(i, s)| **s == 2 && (*i == 0 || scales[i - 1] == 1))
            .count();
        assert_eq!(p.probes(), stretches, "{scales:?}");
        let last_probes: Vec<usize> = scales
            .iter()
            .enumerate()
            .filter(|(i, s)| **s == 2 && (*i == 0 || scales[i - 1] == 1))
            .map(|(i, _)| i)
            .collect();
        let gaps: Vec<usize> = last_probes.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.windows(2).all(|g| g[1] >= g[0]),
            "probes did not back off: {gaps:?}"
        );
    }

    #[test]
    fn epochs_that_move_nothing_never_probe() {
        let mut p = DepthProbe::default();
        // Nothing measured (a stalled source, or a counter that never
        // moves): 0 >= 0 × GAIN must not pass for a gain.
        let scales = run(&mut p, 50, |_| 0.0);
        assert!(scales.iter().all(|&s| s == 1), "{scales:?}");
        assert_eq!(p.probes(), 0);
    }

    #[test]
    fn a_gain_below_the_bar_is_not_kept() {
        let mut p = DepthProbe::default();
        // 10 % faster when deeper: not worth the queue.
        run(&mut p, 100, |s| if s > 1 { 1.1e9 } else { 1e9 });
        assert_eq!(p.scale(), 1);
    }

    #[test]
    fn a_source_that_gains_up_to_a_point_stops_there() {
        let mut p = DepthProbe::default();
        // Faster up to 4× the window, flat after.
        run(&mut p, 120, |s| 1e9 * (s.min(4) as f64).sqrt());
        assert_eq!(p.scale(), 4);
    }
}
