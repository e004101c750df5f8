//! How a stream ends, as a small sans-IO machine of its own: what the
//! stream wrote and was not acknowledged yet is flushed and counted durable
//! (it reaches the journal at the job's next checkpoint, at the latest when
//! its last stream leaves), so a sender that reconnects or resumes re-sends
//! only what never arrived; then the peer is told why, if it can be (a
//! stop flushes the target first, so the ERROR says whether what was
//! acknowledged is durable), and the connection closes. A failure on the
//! way is logged and the ending goes on: every ending reaches
//! [`Action::Close`].

#![forbid(unsafe_code)]

use std::io;
use std::time::Instant;

use tracing::{debug, warn};

use super::events::{Action, ActionResult, End};
use super::written::Written;
use crate::wire::{ErrorCode, ErrorFrame, Frame};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Flush,
    Durable,
    SyncForStop,
    Send,
    Closed,
}

/// A stream on its way out.
#[derive(Debug)]
pub(super) struct Ending {
    end: End,
    is_attached: bool,
    step: Step,
}

impl Ending {
    /// The stream ends with `end` at `now`; `is_attached`: it has a job.
    /// Returns the ending and its first action.
    pub(super) fn start(
        end: End,
        is_attached: bool,
        written: &mut Written,
        now: Instant,
    ) -> (Ending, Action) {
        let mut ending = Ending {
            end,
            is_attached,
            step: Step::Flush,
        };
        let action = if is_attached && written.has_unsynced() {
            written.flush(now)
        } else {
            ending.tell_peer()
        };
        (ending, action)
    }

    /// The next action once the last one completed with `done`.
    pub(super) fn next(&mut self, done: ActionResult, written: &mut Written) -> Action {
        match (self.step, done) {
            (Step::Flush, ActionResult::Flushed(Ok(()))) => {
                self.step = Step::Durable;
                written.make_durable()
            }
            (Step::Flush, ActionResult::Flushed(Err(e))) => {
                not_counted(&e.to_string());
                self.tell_peer()
            }
            (Step::Durable, ActionResult::MadeDurable(result)) => {
                match result {
                    Ok(_) => written.settled(),
                    Err(e) => not_counted(&e.to_string()),
                }
                self.tell_peer()
            }
            (Step::SyncForStop, ActionResult::Synced(result)) => self.send_stopped(result),
            // The ERROR frame is the last word: whether it went out or
            // not, the connection closes.
            (Step::Send, ActionResult::Sent(_)) => self.close(),
            (step, done) => {
                warn!("{done:?} does not answer the ending's {step:?} step (a bug); closing");
                self.close()
            }
        }
    }

    fn tell_peer(&mut self) -> Action {
        match &self.end {
            End::Refuse(refusal) => {
                self.step = Step::Send;
                Action::Send(Frame::Error(ErrorFrame {
                    code: refusal.code,
                    message: truncate(refusal.message.clone()),
                }))
            }
            End::Stopped if self.is_attached => {
                self.step = Step::SyncForStop;
                Action::SyncForStop
            }
            End::Stopped => self.send_stopped(Ok(())),
            End::PeerClosed | End::Lost(_) => self.close(),
        }
    }

    fn send_stopped(&mut self, synced: io::Result<()>) -> Action {
        let message = match synced {
            Ok(()) => "the receiver is shutting down; what was acknowledged is durable: \
                       send the job again when it is back"
                .to_string(),
            Err(e) => format!("the receiver is shutting down and its last flush failed: {e}"),
        };
        debug!("stopping: {message}");
        self.step = Step::Send;
        let code = ErrorCode::Cancelled;
        Action::Send(Frame::Error(ErrorFrame { code, message }))
    }

    /// Closes at once (the driver broke the rules: a bug).
    pub(super) fn close(&mut self) -> Action {
        self.step = Step::Closed;
        Action::Close(self.end.clone())
    }
}

/// A settle at the end of a stream failed: logged, the stream goes on
/// ending.
pub(super) fn not_counted(e: &str) {
    warn!("what this stream wrote last is not counted durable: {e}; it will be sent again");
}

/// Error messages are bounded by the wire's string limit.
fn truncate(mut message: String) -> String {
    let max = crate::wire::MAX_STRING_BYTES;
    if message.len() > max {
        let mut cut = max;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}
