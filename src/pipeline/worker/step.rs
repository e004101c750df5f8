//! A worker context as its thread drives it: stepped without blocking,
//! fed its completions, drained after a failure or a cancel, and handed
//! back (its connections) once nothing of it is in flight.

use std::time::Instant;

use crate::engine::Completion;
use crate::pipeline::CopyError;

use super::{DstIo, Phase, SrcIo, Worker, engine_err_ref};

/// What a worker context asks of its thread after [`Worker::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Its I/O is in flight: the thread may block in its engine.
    Waiting,
    /// Nothing in flight; work may come from the planner at any moment:
    /// poll.
    Hungry,
    /// Step again at this instant at the latest (a read retry, the rate
    /// budget), or at a completion.
    Until(Instant),
    /// Paused with nothing in flight: step again when woken.
    Parked,
    /// Nothing in flight and nothing more to do: [`Worker::into_ends`].
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Running,
    /// The job failed or was cancelled: finish what is in flight.
    Draining,
    Finished,
}

impl Worker {
    /// Advance this context without blocking: start work, issue due
    /// retries, send what its connections have queued. Says what the
    /// thread should do before calling again.
    pub fn step(&mut self) -> Step {
        match self.stage {
            Stage::Running => match self.advance() {
                Ok(step) => step,
                Err(e) => {
                    self.shared.fail(e);
                    self.stage = Stage::Draining;
                    self.drain_step()
                }
            },
            Stage::Draining => self.drain_step(),
            Stage::Finished => Step::Finished,
        }
    }

    /// One completion of this context's I/O (the context bits of its
    /// `user_data` already removed).
    pub fn complete(&mut self, c: Completion) {
        match self.stage {
            Stage::Running => {
                if let Err(e) = self.on_completion(c) {
                    self.shared.fail(e);
                    self.stage = Stage::Draining;
                }
            }
            Stage::Draining | Stage::Finished => {
                if let Err(e) = self.on_completion(c) {
                    tracing::debug!("while draining: {e}");
                }
            }
        }
    }

    /// The engine failed under this context: stop issuing anything.
    pub fn engine_failed(&mut self, e: &std::io::Error) {
        self.shared.fail(engine_err_ref(e));
        self.stage = Stage::Draining;
        self.drain_broken = true;
        self.shutdown_sockets();
    }

    /// The connections, handed back once [`Step::Finished`] so the
    /// coordinator can flush and disconnect them.
    pub fn into_ends(self) -> (SrcIo, DstIo) {
        (self.src, self.dst)
    }

    fn advance(&mut self) -> Result<Step, CopyError> {
        if self.shared.aborted() {
            self.stage = Stage::Draining;
            return Ok(self.drain_step());
        }
        self.fill_slots()?;
        self.issue_due_retries()?;
        self.kick_sockets()?;
        let wake_at = match (self.retries.next_at(), self.rate_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.engine.in_flight() > 0 {
            // With a retry or the rate cap pending, poll the engine instead
            // of blocking in it, so the retry goes out on time.
            return Ok(wake_at.map_or(Step::Waiting, Step::Until));
        }
        let all_idle = self.slots.iter().all(|s| s.phase == Phase::Idle);
        if all_idle
            && self.held.is_none()
            && self.shared.planner_done()
            && self.shared.queue.is_empty()
        {
            self.finished();
            return Ok(Step::Finished);
        }
        if let Some(at) = wake_at {
            return Ok(Step::Until(at));
        }
        if all_idle && self.shared.control.is_paused() {
            return Ok(Step::Parked);
        }
        if all_idle {
            // Waiting for the planner.
            return Ok(Step::Hungry);
        }
        Err(CopyError::Internal(format!(
            "worker {} stalled: busy slots but no I/O in flight",
            self.cfg.index
        )))
    }

    /// After an abort: finish outstanding NBD requests without starting
    /// anything new (some servers misbehave when a client vanishes with
    /// requests outstanding). An error ends the drain and closes the
    /// sockets (the coordinator also shuts them down if this takes too
    /// long). Buffers the kernel still owns are never dropped: the context
    /// finishes only with nothing in flight.
    fn drain_step(&mut self) -> Step {
        if !self.drain_broken
            && let Err(e) = self.kick_sockets()
        {
            tracing::debug!("while draining: {e}");
            self.drain_broken = true;
            self.shutdown_sockets();
        }
        if self.engine.in_flight() > 0 {
            return Step::Waiting;
        }
        self.finished();
        Step::Finished
    }

    fn finished(&mut self) {
        if self.stage != Stage::Finished {
            self.shared
                .depth_peak
                .fetch_add(self.window_peak, std::sync::atomic::Ordering::Relaxed);
        }
        self.stage = Stage::Finished;
    }
}
