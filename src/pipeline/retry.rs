//! Bounded retries of source reads.
//!
//! A read that fails with an error that may pass (an NBD server's error
//! reply such as EIO, or EIO / EINTR / EAGAIN from a file's pread) is issued
//! again after a short delay, at most [`READ_RETRIES_DEFAULT`] times unless
//! configured otherwise; then the job fails as it would have without
//! retries. A dead connection, a protocol violation or a read past the end
//! of the source is never retried. The worker keeps the schedule
//! ([`RetryQueue`]) and re-issues due reads from its event loop, so the
//! other slots keep moving while one waits; nothing of a window is written
//! until all of its reads succeeded.

#![forbid(unsafe_code)]
use std::time::{Duration, Instant};

use crate::nbd::proto;

/// Retries of one failed read before the job fails (so up to 4 attempts).
pub const READ_RETRIES_DEFAULT: u32 = 3;
/// Largest `--read-retries` accepted.
pub const READ_RETRIES_MAX: u32 = 10;
/// Delay before the first retry; each later one waits 4× longer, up to
/// [`BACKOFF_MAX`]: 50 ms, 200 ms, 800 ms, 800 ms, …
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(800);

/// How long to wait before retry number `retry` (1-based) of a read.
pub fn backoff(retry: u32) -> Duration {
    let factor = 4u32.saturating_pow(retry.saturating_sub(1));
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX)
}

/// An NBD error reply worth retrying: the server could not read (EIO) or
/// lacked memory (ENOMEM) this time. EINVAL, EPERM, EOVERFLOW, ENOTSUP,
/// ENOSPC and ESHUTDOWN say the request itself or the server's state is
/// wrong; asking again gives the same answer.
pub fn nbd_error_is_transient(errno: u32) -> bool {
    matches!(errno, proto::NBD_EIO | proto::NBD_ENOMEM)
}

/// A failed pread(2) of a file or block device worth retrying (`errno` is
/// positive): an I/O error of the device, or an interrupted or would-block
/// read.
pub fn os_error_is_transient(errno: i32) -> bool {
    matches!(errno, libc::EIO | libc::EINTR | libc::EAGAIN)
}

/// A read waiting to be issued again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub at: Instant,
    pub slot: usize,
    pub sub: usize,
}

/// A worker's scheduled retries. Holds at most one entry per sub-op in
/// flight (a sub-op waiting here has no I/O in flight), so it is bounded by
/// the worker's slots and never reallocates once warm.
#[derive(Debug, Default)]
pub struct RetryQueue {
    due: Vec<Due>,
}

impl RetryQueue {
    pub fn push(&mut self, d: Due) {
        self.due.push(d);
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }

    /// The earliest instant a retry is due, if any is scheduled.
    pub fn next_at(&self) -> Option<Instant> {
        self.due.iter().map(|d| d.at).min()
    }

    /// Move every retry due at `now` into `out` (in no particular order).
    pub fn take_due(&mut self, now: Instant, out: &mut Vec<Due>) {
        let mut i = 0;
        while i < self.due.len() {
            if self.due[i].at <= now {
                out.push(self.due.swap_remove(i));
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_fourfold_then_caps() {
        let ms: Vec<u128> = (1..=5).map(|r| backoff(r).as_millis()).collect();
        assert_eq!(ms, [50, 200, 800, 800, 800]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn only_errors_that_may_pass_are_transient() {
        assert!(nbd_error_is_transient(proto::NBD_EIO));
        assert!(nbd_error_is_transient(proto::NBD_ENOMEM));
        for e in [
            proto::NBD_EPERM,
            proto::NBD_EINVAL,
            proto::NBD_ENOSPC,
            proto::NBD_EOVERFLOW,
            proto::NBD_ENOTSUP,
            proto::NBD_ESHUTDOWN,
            999,
        ] {
            assert!(!nbd_error_is_transient(e), "{e}");
        }
        assert!(os_error_is_transient(libc::EIO));
        assert!(os_error_is_transient(libc::EINTR));
        assert!(!os_error_is_transient(libc::EBADF));
        assert!(!os_error_is_transient(libc::EINVAL));
    }

    #[test]
    fn take_due_takes_exactly_the_due_ones() {
        let t0 = Instant::now();
        let mut q = RetryQueue::default();
        for (i, ms) in [30u64, 10, 20, 40].into_iter().enumerate() {
            q.push(Due {
                at: t0 + Duration::from_millis(ms),
                slot: i,
                sub: 0,
            });
        }
        assert_eq!(q.next_at(), Some(t0 + Duration::from_millis(10)));
        let mut out = Vec::new();
        q.take_due(t0 + Duration::from_millis(25), &mut out);
        let mut slots: Vec<usize> = out.iter().map(|d| d.slot).collect();
        slots.sort_unstable();
        assert_eq!(slots, [1, 2]);
        assert_eq!(q.next_at(), Some(t0 + Duration::from_millis(30)));
        out.clear();
        q.take_due(t0 + Duration::from_millis(40), &mut out);
        assert_eq!(out.len(), 2);
        assert!(q.is_empty());
        assert_eq!(q.next_at(), None);
    }
}
