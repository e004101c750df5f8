//! What a job's owner can change while it runs: pause, cancel and the
//! byte rate. Shared by the job's handle, its coordinator and every worker
//! context of the job (through [`super::Shared`]); workers only read it.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use crate::net::rate::RateLimiter;

/// Pause, cancel and rate of one job.
#[derive(Debug, Default)]
pub struct JobControl {
    paused: AtomicBool,
    cancelled: AtomicBool,
    /// Whether `rate` has a cap (read without taking its lock).
    rate_capped: AtomicBool,
    /// Bytes read per second, shared by every disk of the job (unlimited
    /// by default).
    rate: RateLimiter,
}

impl JobControl {
    /// A control with the given rate cap (`None`: unlimited).
    pub fn new(rate_bytes_per_s: Option<u64>) -> Self {
        let control = Self::default();
        control.set_rate(rate_bytes_per_s);
        control
    }

    /// Workers issue no new reads while this is set.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
    }

    /// Set once the owner cancelled the job; never cleared.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    pub fn set_cancelled(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// The job's token bucket, charged with the bytes of each window read.
    pub fn rate(&self) -> &RateLimiter {
        &self.rate
    }

    /// Whether a rate cap is set.
    pub fn is_rate_capped(&self) -> bool {
        self.rate_capped.load(Ordering::Acquire)
    }

    /// Cap the job's read rate (`None`: no cap).
    pub fn set_rate(&self, rate_bytes_per_s: Option<u64>) {
        let rate = rate_bytes_per_s.unwrap_or(0);
        self.rate.set_rate(rate);
        self.rate_capped.store(rate != 0, Ordering::Release);
    }

    /// The cap set, if any.
    pub fn rate_bytes_per_s(&self) -> Option<u64> {
        self.rate.rate_bytes_per_s()
    }
}
