//! Knowing at once when a group of threads has stopped.
//!
//! `JoinHandle` has no timed join, so control loops used to poll
//! `is_finished` every [`super::run::TICK`]: up to 10 ms lost at the end of
//! each stage of a job. A thread now carries an [`ExitGuard`] that counts it
//! out when it drops (also when the thread panics), and the control loop
//! waits on [`Exits::wait_all`], which returns as soon as the last one left.

#![forbid(unsafe_code)]
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::sync::lock;

/// Runs once, on the thread that leaves last.
type OnLast = Box<dyn Fn() + Send + Sync>;

/// A count of running threads and a condition variable for "none left".
pub struct Exits {
    running: Mutex<usize>,
    none_left: Condvar,
    on_last: Option<OnLast>,
}

/// Held by one thread of the group; counts it out when dropped.
pub struct ExitGuard(Arc<Exits>);

impl Exits {
    /// `on_last` runs on the last thread out, before any waiter wakes.
    pub fn new(on_last: Option<OnLast>) -> Arc<Self> {
        Arc::new(Self {
            running: Mutex::new(0),
            none_left: Condvar::new(),
            on_last,
        })
    }

    /// Counts one more thread in. Call it before spawning the thread (so a
    /// waiter can never see zero before the thread started) and move the
    /// guard into the thread.
    pub fn enter(self: &Arc<Self>) -> ExitGuard {
        *lock(&self.running) += 1;
        ExitGuard(Arc::clone(self))
    }

    /// True once no thread is in, waiting at most `timeout` for that.
    pub fn wait_all(&self, timeout: Duration) -> bool {
        let running = lock(&self.running);
        let (running, _) = self
            .none_left
            .wait_timeout_while(running, timeout, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner);
        *running == 0
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut running = lock(&self.0.running);
        *running -= 1;
        if *running == 0 {
            if let Some(f) = &self.0.on_last {
                f();
            }
            self.0.none_left.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn waits_for_the_last_thread_and_wakes_at_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let exits = Exits::new(Some(Box::new(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        })));
        let handles: Vec<_> = [20u64, 60]
            .into_iter()
            .map(|ms| {
                let g = exits.enter();
                std::thread::spawn(move || {
                    let _g = g;
                    std::thread::sleep(Duration::from_millis(ms));
                })
            })
            .collect();
        assert!(
            !exits.wait_all(Duration::from_millis(1)),
            "both still running"
        );
        let t = Instant::now();
        assert!(exits.wait_all(Duration::from_secs(10)));
        // Woken by the last exit, not by the 10 s timeout.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "on_last runs once");
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_panicking_thread_is_counted_out() {
        let exits = Exits::new(None);
        let g = exits.enter();
        let h = std::thread::spawn(move || {
            let _g = g;
            panic!("worker failed");
        });
        assert!(exits.wait_all(Duration::from_secs(10)));
        assert!(h.join().is_err());
    }

    #[test]
    fn an_empty_group_is_done() {
        assert!(Exits::new(None).wait_all(Duration::ZERO));
    }
}
