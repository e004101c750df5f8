//! How many slots a worker keeps busy: the source's queue depth.
//!
//! A source on this host starts shallow ([`super::run::Requests::Auto`]):
//! its buffers stay in the cores' caches. Not every source on this host is
//! quick, though. An nbdkit plugin behind a Unix socket may be fetching from
//! a remote hypervisor (vddk, curl, ssh), and then a shallow queue starves
//! the copy. [`DepthCtl`] watches how long each window takes to read and
//! deepens the queue only while that time does not grow with the depth, in
//! the manner of TCP Vegas:
//!
//! * `base` is the shortest read seen recently (the source's own latency);
//! * `avg` is the mean over the last epoch (several reads per slot);
//! * `waiting = 1 − base / avg` is the share of a read's time spent queued
//!   somewhere (the server, the disk) rather than being served. Vegas
//!   multiplies it by the window to count queued reads; a fraction is
//!   steadier against a remote source's jitter.
//!
//! Below [`GROW_BELOW`] in two epochs running: reads do not wait for each
//! other, the source is latency-bound, half as many slots again. Above
//! [`SHRINK_ABOVE`]: the extra depth only queues, one slot less. A source
//! that serves one read at a time shows `waiting = (w − 1) / (w + 1)` at
//! window `w`: 0.6 at the usual start of 4 slots per worker, so it never
//! grows. The window never leaves `[start, max]`.

#![forbid(unsafe_code)]
use std::time::Duration;

/// Deepen while reads spend less than this share of their time queued.
pub const GROW_BELOW: f64 = 0.25;
/// Back off when reads spend more than this share of their time queued.
pub const SHRINK_ABOVE: f64 = 0.5;
/// Reads per epoch: this many per slot of the window, at least [`EPOCH_MIN`].
const EPOCH_PER_SLOT: usize = 4;
const EPOCH_MIN: usize = 16;

#[derive(Debug, Clone)]
pub struct DepthCtl {
    window: usize,
    min: usize,
    max: usize,
    peak: usize,
    n: usize,
    sum: Duration,
    epoch_min: Duration,
    prev_min: Duration,
    /// The last epoch also asked to grow (growth needs two in a row: one
    /// quiet epoch on a busy disk is noise).
    grow_pending: bool,
}

impl DepthCtl {
    /// Start at `start` slots, adapting within `[start, max]`.
    pub fn new(start: usize, max: usize) -> Self {
        let min = start.clamp(1, max.max(1));
        Self {
            window: min,
            min,
            max: max.max(min),
            peak: min,
            n: 0,
            sum: Duration::ZERO,
            epoch_min: Duration::MAX,
            prev_min: Duration::MAX,
            grow_pending: false,
        }
    }

    /// Slots that may be busy now.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The largest window so far.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// A window's reads took `latency`, from issue to the last byte.
    pub fn sample(&mut self, latency: Duration) {
        if self.min == self.max {
            return;
        }
        self.n += 1;
        self.sum += latency;
        self.epoch_min = self.epoch_min.min(latency);
        if self.n < (self.window * EPOCH_PER_SLOT).max(EPOCH_MIN) {
            return;
        }
        let avg = self.sum.as_secs_f64() / self.n as f64;
        let base = self.epoch_min.min(self.prev_min).as_secs_f64();
        let waiting = if avg > 0.0 { 1.0 - base / avg } else { 0.0 };
        tracing::trace!(
            window = self.window,
            avg_us = avg * 1e6,
            base_us = base * 1e6,
            waiting,
            "read depth epoch"
        );
        if waiting < GROW_BELOW {
            if self.grow_pending {
                // Half again: a remote source may need ten times the
                // start, and each epoch costs several of its round trips.
                self.window = (self.window + self.window.div_ceil(2)).min(self.max);
            }
            self.grow_pending = !self.grow_pending;
        } else {
            self.grow_pending = false;
            if waiting > SHRINK_ABOVE {
                self.window = (self.window - 1).max(self.min);
            }
        }
        self.peak = self.peak.max(self.window);
        self.prev_min = self.epoch_min;
        self.epoch_min = Duration::MAX;
        self.n = 0;
        self.sum = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers each read after `rtt` however many are queued
    /// (a remote API behind a local socket): the window grows to the cap.
    #[test]
    fn a_latency_bound_source_gets_the_full_depth() {
        let mut c = DepthCtl::new(4, 64);
        for i in 0..20_000u64 {
            // ±20 % jitter around 5 ms.
            let jitter = i * 7919 % 100;
            c.sample(Duration::from_micros(4_000 + jitter * 20));
        }
        assert_eq!(c.window(), 64);
        assert_eq!(c.peak(), 64);
    }

    /// A server that serves one read at a time (a disk): each read waits
    /// for the ones before it, so latency grows with the window and the
    /// window stays near its floor.
    #[test]
    fn a_throughput_bound_source_stays_shallow() {
        let mut c = DepthCtl::new(4, 64);
        let service = Duration::from_micros(250);
        for i in 0..20_000u32 {
            // Reads complete in turn: the k-th of a window waited k services.
            let k = i % u32::try_from(c.window()).unwrap() + 1;
            c.sample(service * k);
        }
        assert_eq!(c.window(), 4);
        assert_eq!(c.peak(), 4);
    }

    #[test]
    fn a_fixed_depth_never_moves() {
        let mut c = DepthCtl::new(8, 8);
        for _ in 0..1000 {
            c.sample(Duration::from_millis(5));
        }
        assert_eq!((c.window(), c.peak()), (8, 8));
        let mut c = DepthCtl::new(100, 8);
        assert_eq!(c.window(), 8);
        c.sample(Duration::from_millis(1));
        assert_eq!(c.window(), 8);
    }
}
