//! A stream's timers, from the time its driver passes in (no clock is read
//! here): the HELLO must come within [`HELLO_TIMEOUT_MS`] of connecting,
//! and after it a stream that receives nothing, not even a PING, for
//! [`IDLE_TIMEOUT_MS`] ends.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use super::events::End;
use super::job::Refusal;
use super::limits::HELLO_TIMEOUT_MS;
use crate::wire::ErrorCode;

/// A stream that receives nothing (not even a PING) for this long is
/// ended with ERROR(TIMEOUT).
pub const IDLE_TIMEOUT_MS: u64 = 300_000;

#[derive(Debug, Clone, Copy)]
pub(super) struct Timers {
    /// When the stream started, for [`HELLO_TIMEOUT_MS`].
    started: Instant,
    /// When bytes last arrived, for [`IDLE_TIMEOUT_MS`].
    last_input: Instant,
}

impl Timers {
    pub(super) fn new(now: Instant) -> Self {
        Timers {
            started: now,
            last_input: now,
        }
    }

    /// Bytes arrived at `now`.
    pub(super) fn received(&mut self, now: Instant) {
        self.last_input = now;
    }

    pub(super) fn last_input(&self) -> Instant {
        self.last_input
    }

    /// Refused once a stream still waiting for its HELLO waited too long.
    pub(super) fn check_hello(&self, is_awaiting_hello: bool, now: Instant) -> Result<(), End> {
        let waited = now.saturating_duration_since(self.started);
        if is_awaiting_hello && waited > Duration::from_millis(HELLO_TIMEOUT_MS) {
            return Err(End::Refuse(Refusal::new(
                ErrorCode::Timeout,
                format!("no HELLO within {HELLO_TIMEOUT_MS} ms of connecting"),
            )));
        }
        Ok(())
    }

    /// Refused once nothing arrived for [`IDLE_TIMEOUT_MS`].
    pub(super) fn check_idle(&self, now: Instant) -> Result<(), End> {
        let quiet = now.saturating_duration_since(self.last_input);
        if quiet > Duration::from_millis(IDLE_TIMEOUT_MS) {
            return Err(End::Refuse(Refusal::new(
                ErrorCode::Timeout,
                format!(
                    "nothing received for {} s; the sender must PING on idle streams",
                    IDLE_TIMEOUT_MS / 1000
                ),
            )));
        }
        Ok(())
    }
}
