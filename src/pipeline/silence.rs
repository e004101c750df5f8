//! The NBD I/O timeout: each connection's [`IoWatch`] says since when it
//! has waited for its server without a byte back; the control thread's
//! [`SilenceWatch`] (from [`super::run::Pipeline::tick`]) fails the job when
//! that passes the timeout and shuts the socket down (shutdown(2)), so the
//! recv the kernel holds completes and the worker drains and stops without
//! freeing a buffer still in flight ("buffers named by an in-flight op
//! belong to the kernel", docs/internals.md).

#![forbid(unsafe_code)]
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::nbd_io::NbdIo;
use super::{CopyError, Shared};

/// How long a connection has waited for its server without hearing from it.
/// Written by the worker that owns the connection, read by the control
/// thread.
#[derive(Debug)]
pub struct IoWatch {
    epoch: Instant,
    /// Milliseconds since `epoch` (plus 1, so never 0) when the connection
    /// began waiting or last received bytes while replies were still
    /// outstanding; 0 when nothing is outstanding.
    waiting_since_ms: AtomicU64,
}

impl IoWatch {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            waiting_since_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Replies are awaited: start the clock unless it already runs.
    pub fn waiting(&self) {
        if self.waiting_since_ms.load(Ordering::Relaxed) == 0 {
            self.waiting_since_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The server sent bytes: restart the clock, or stop it when nothing
    /// more is awaited.
    pub fn heard(&self, still_waiting: bool) {
        let at = if still_waiting { self.now_ms() } else { 0 };
        self.waiting_since_ms.store(at, Ordering::Relaxed);
    }

    /// How long the connection has waited without hearing from its
    /// server; `None` when nothing is outstanding.
    pub fn silent_for(&self) -> Option<Duration> {
        match self.waiting_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(self.now_ms().saturating_sub(since))),
        }
    }
}

impl Default for IoWatch {
    fn default() -> Self {
        Self::new()
    }
}

/// One NBD connection as the control thread watches it.
pub struct Watched {
    watch: Arc<IoWatch>,
    /// A second handle on the socket, to shut it down.
    socket: crate::nbd::uri::NbdStream,
    is_source: bool,
    server: String,
    cut: bool,
}

/// The watches of the NBD connections among `ios`.
pub fn watch_all<'a>(ios: impl Iterator<Item = &'a NbdIo>, is_source: bool) -> Vec<Watched> {
    ios.filter_map(|io| {
        let socket = io.stream.try_clone().ok()?;
        Some(Watched {
            watch: Arc::clone(&io.watch),
            server: socket.peer(),
            socket,
            is_source,
            cut: false,
        })
    })
    .collect()
}

/// Every NBD connection of a pipeline, against the I/O timeout.
pub struct SilenceWatch {
    watched: Vec<Watched>,
    io_timeout: Duration,
}

impl SilenceWatch {
    pub fn new(watched: Vec<Watched>, io_timeout: Duration) -> Self {
        Self {
            watched,
            io_timeout,
        }
    }

    /// A connection waiting for its server longer than the I/O timeout
    /// fails the job (that error first), then is shut down: the recv the
    /// kernel holds completes, and its worker drains and stops without
    /// having freed a buffer still in flight. The unread window is never
    /// written.
    pub fn check(&mut self, shared: &Shared) {
        for w in &mut self.watched {
            if w.cut || w.watch.silent_for().is_none_or(|t| t < self.io_timeout) {
                continue;
            }
            w.cut = true;
            let why = format!(
                "from {}: no reply within the I/O timeout ({} s); the server may be hung (or, if it is only slow, give it a longer I/O timeout)",
                w.server,
                self.io_timeout.as_secs_f64()
            );
            tracing::debug!("{why}");
            shared.fail(if w.is_source {
                CopyError::SourceRead(why)
            } else {
                CopyError::TargetWrite(why)
            });
            let _ = w.socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_runs_only_while_replies_are_awaited() {
        let w = IoWatch::new();
        assert_eq!(w.silent_for(), None, "nothing outstanding yet");
        w.waiting();
        std::thread::sleep(Duration::from_millis(30));
        let silent = w.silent_for().expect("waiting");
        assert!(silent >= Duration::from_millis(25), "{silent:?}");
        // A second request does not restart the clock.
        w.waiting();
        assert!(w.silent_for().unwrap() >= silent);
        // Bytes from the server restart it …
        w.heard(true);
        assert!(w.silent_for().unwrap() < silent, "{:?}", w.silent_for());
        // … and the last reply stops it.
        w.heard(false);
        assert_eq!(w.silent_for(), None);
    }
}
