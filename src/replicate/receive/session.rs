//! One receiver stream's protocol as a sans-IO state machine: HELLO (and
//! PLAN for an incremental pass) → WELCOME, then DATA / ZERO / BARRIER →
//! ACK, DONE, VERIFY_REQUEST → VERIFY_RESULT, PING → PONG.
//!
//! [`Session`] is fed what happened ([`Input`]: a decoded frame, bytes
//! arriving, a quiet poll interval, a stop, the connection ending) and the
//! result of what it asked for ([`ActionResult`]), and answers with
//! [`Action`]s (attach to the job, write or zero a range of the target,
//! flush, count ranges durable, send a frame, read back, close). It holds
//! no socket, file or clock: time comes in with every call, and the driver
//! (`conn.rs`, a thread per connection today) does the I/O. One action
//! that asks for a result is outstanding at a time; the driver carries it
//! out and gives its [`ActionResult`] back before anything else.
//!
//! The machine is in parts: this file the stream's life (HELLO and its
//! attach, DONE, VERIFY_REQUEST, PING, timeouts), `intake.rs` the data path
//! (DATA / ZERO written only after their checks, flushes, durable counts,
//! ACKs), `ending.rs` how a stream ends, `timers.rs` its timeouts.
//!
//! Memory is bounded by the protocol: one decompression buffer of at most
//! the job's chunk size, and written ranges capped by `written`.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::Instant;

use tracing::{debug, warn};

use super::digests::{self, Compared, DigestSpan};
use super::ending::Ending;
use super::events::{Action, ActionResult, AttachRequest, End, Health, Input, JobInfo};
use super::intake::{Intake, IntakeState, hashes_arriving};
use super::job::Refusal;
use super::pass::check_plan;
use super::timers::Timers;
use super::verify::VerifyError;
use crate::wire::{ByteRange, Codec, ErrorCode, Features, Frame, Hello, PassMode, Welcome};

/// Features this receiver supports.
pub const SUPPORTED_FEATURES: Features = Features(
    Features::BLAKE3.0 | Features::LZ4.0 | Features::ZSTD.0 | Features::RESUME.0 | Features::XXH3.0,
);

#[derive(Debug)]
enum Phase {
    AwaitHello,
    /// An incremental HELLO came: its PLAN must follow.
    AwaitPlan(Box<Hello>),
    Streaming,
    /// DONE received: only VERIFY_REQUEST (once) and PING may follow.
    Finished,
    /// The stream is ending: only the ending's own actions follow.
    Ending(Ending),
    /// [`Action::Close`] was given: nothing follows.
    Closed,
}

/// The action whose [`ActionResult`] the machine waits for.
#[derive(Debug)]
enum Wait {
    Attach {
        offered: Features,
    },
    /// The data path's action (see `intake.rs`).
    Intake,
    FinishStream,
    ReadBack,
    /// A delta pass's DIGEST_REQUEST being read.
    Digests(DigestSpan),
    Send,
    /// The ending's last action.
    Ending,
}

/// One stream's protocol state.
pub struct Session {
    phase: Phase,
    /// The job, once attached.
    job: Option<JobInfo>,
    features: Features,
    /// DATA, ZERO, BARRIER and what they write, flush and count.
    intake: Intake,
    /// A verify pass was asked for on this stream (one is allowed).
    verify_asked: bool,
    /// A delta pass: the ranges compared since the last BARRIER
    /// (`digests.rs`).
    compared: Compared,
    /// Frames received after HELLO.
    frames: u64,
    timers: Timers,
    /// Actions not handed out yet; the last one may wait for a result.
    actions: VecDeque<Action>,
    /// The action whose [`ActionResult`] is awaited, and what follows it.
    waiting: Option<Wait>,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> End {
    End::Refuse(Refusal::new(code, message))
}

impl Session {
    /// A stream accepted at `now`; `max_ranges_per_job` is
    /// [`super::limits::PeerLimits::max_ranges_per_job`].
    pub fn new(max_ranges_per_job: usize, now: Instant) -> Self {
        Session {
            phase: Phase::AwaitHello,
            job: None,
            features: Features::default(),
            intake: Intake::new(max_ranges_per_job, now),
            verify_asked: false,
            compared: Compared::default(),
            frames: 0,
            timers: Timers::new(now),
            actions: VecDeque::new(),
            waiting: None,
        }
    }

    /// The next action to carry out, if any. An action that asks for a
    /// result ([`Action::needs_completion`]) is the last one until its
    /// [`ActionResult`] came back through [`Session::complete`].
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// True while the machine waits for the driver (actions to carry out, a
    /// result to give back) rather than for the peer.
    pub fn is_busy(&self) -> bool {
        !self.actions.is_empty() || self.waiting.is_some()
    }

    /// Bytes of a DATA payload just read, `progress` being the decoder's
    /// [`crate::wire::FrameDecoder::data_payload_progress`] before them: a
    /// raw payload with an XXH3 digest is hashed while it is still in cache.
    pub fn payload_arrived(&mut self, progress: Option<(Codec, usize)>, bytes: &[u8]) {
        if let Some(got_before) = hashes_arriving(progress, self.features) {
            self.intake.hash_arriving(got_before, bytes);
        }
    }

    /// Something happened on the connection at `now`.
    pub fn input(&mut self, input: Input, now: Instant) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        if self.is_busy() || matches!(self.phase, Phase::Ending(_)) {
            self.internal(format!(
                "{input:?} arrived while the stream was not reading"
            ));
            return;
        }
        let result = match input {
            Input::Frame(frame, health) => self.on_frame(frame, health, now),
            Input::Malformed(refusal) => Err(End::Refuse(refusal)),
            Input::Received => {
                self.timers.received(now);
                self.check_hello(now)
            }
            Input::Idle(health) => self.on_idle(health, now),
            Input::Stop => Err(End::Stopped),
            Input::Closed { is_mid_frame } => Err(if is_mid_frame {
                End::Lost("the sender hung up in the middle of a frame (connection cut)".into())
            } else {
                End::PeerClosed
            }),
            Input::Lost(why) => Err(End::Lost(why)),
        };
        if let Err(end) = result {
            self.begin_end(end);
        }
    }

    /// The result of the action the machine waits for.
    pub fn complete(&mut self, completion: ActionResult, now: Instant) {
        let Some(wait) = self.waiting.take() else {
            self.internal(format!("{completion:?} came with no action waiting for it"));
            return;
        };
        if let Phase::Ending(ending) = &mut self.phase {
            let action = ending.next(completion, self.intake.written_mut());
            self.push_ending(action);
        } else if let Err(end) = self.on_completion(wait, completion, now) {
            self.begin_end(end);
        }
    }

    /// The driver broke the machine's rules (a bug): the stream ends.
    fn internal(&mut self, message: String) {
        warn!("receiver stream state machine: {message} (a bug)");
        match &mut self.phase {
            Phase::Closed => {}
            Phase::Ending(ending) => {
                let action = ending.close();
                self.actions.clear();
                self.push_ending(action);
            }
            _ => {
                self.actions.clear();
                self.begin_end(refuse(ErrorCode::Internal, message));
            }
        }
    }

    fn push(&mut self, action: Action, wait: Option<Wait>) {
        self.actions.push_back(action);
        self.waiting = wait;
    }

    fn send(&mut self, frame: Frame) {
        self.push(Action::Send(frame), Some(Wait::Send));
    }

    fn check_hello(&self, now: Instant) -> Result<(), End> {
        // The PLAN of an incremental is part of the HELLO's time.
        let is_awaiting_hello = matches!(self.phase, Phase::AwaitHello | Phase::AwaitPlan(_));
        self.timers.check_hello(is_awaiting_hello, now)
    }

    fn on_idle(&mut self, health: Health, now: Instant) -> Result<(), End> {
        self.check_hello(now)?;
        health.check()?;
        self.timers.check_idle(now)
    }

    fn on_frame(&mut self, frame: Frame, health: Health, now: Instant) -> Result<(), End> {
        if matches!(self.phase, Phase::AwaitHello) {
            return match frame {
                Frame::Hello(hello) => self.on_hello(hello),
                other => Err(refuse(
                    ErrorCode::BadRequest,
                    format!(
                        "the first frame of a stream must be HELLO, got {}",
                        other.frame_type().name()
                    ),
                )),
            };
        }
        if let Phase::AwaitPlan(_) = self.phase {
            return self.on_plan(frame);
        }
        self.frames += 1;
        health.check()?;
        match (&self.phase, frame) {
            (Phase::Streaming, Frame::Data(data)) => {
                let features = self.features;
                let job = attached(&self.job)?;
                let progress = self.intake.data(job, features, data, &mut self.actions)?;
                self.after_intake(progress);
                Ok(())
            }
            (Phase::Streaming, Frame::Zero(range)) => {
                let job = attached(&self.job)?;
                let progress = self.intake.zero(job, range, &mut self.actions)?;
                self.after_intake(progress);
                Ok(())
            }
            (Phase::Streaming, Frame::Barrier { seq }) => {
                self.note_compared()?;
                let progress = self.intake.barrier(seq, now, &mut self.actions)?;
                self.after_intake(progress);
                Ok(())
            }
            (
                Phase::Streaming,
                Frame::Done {
                    total_bytes_sent,
                    frames,
                },
            ) => self.on_done(total_bytes_sent, frames, now),
            (Phase::Finished, Frame::VerifyRequest { window_bytes }) => {
                self.on_verify(window_bytes)
            }
            (
                Phase::Streaming,
                Frame::DigestRequest {
                    offset,
                    len_bytes,
                    block_bytes,
                },
            ) => self.on_digest_request(offset, len_bytes, block_bytes),
            (Phase::Streaming, Frame::VerifyRequest { .. }) => Err(refuse(
                ErrorCode::Protocol,
                "VERIFY_REQUEST before DONE: a stream asks for a verify pass only after its DONE",
            )),
            (_, Frame::Ping { nonce }) => {
                self.send(Frame::Pong { nonce });
                Ok(())
            }
            (_, Frame::Pong { .. }) => Ok(()),
            (_, Frame::Error(e)) => Err(End::Lost(format!(
                "the sender reported an error ({:?}): {}",
                e.code, e.message
            ))),
            (phase, other) => Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "unexpected {} frame {}",
                    other.frame_type().name(),
                    match phase {
                        Phase::Finished => "after DONE",
                        _ => "from a sender",
                    }
                ),
            )),
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<(), End> {
        if !hello.features.contains(Features::BLAKE3) {
            return Err(refuse(
                ErrorCode::BadRequest,
                "the sender does not offer BLAKE3 digests, which the protocol requires",
            ));
        }
        if hello.mode == PassMode::Incremental {
            self.phase = Phase::AwaitPlan(Box::new(hello));
            return Ok(());
        }
        self.attach(hello, Vec::new());
        Ok(())
    }

    /// The frame after an incremental HELLO: its PLAN, whose digest must
    /// be the HELLO's (the frame's size was bounded before it was read).
    fn on_plan(&mut self, frame: Frame) -> Result<(), End> {
        let Frame::Plan(plan) = frame else {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "an incremental HELLO must be followed by PLAN, got {}",
                    frame.frame_type().name()
                ),
            ));
        };
        let Phase::AwaitPlan(hello) = std::mem::replace(&mut self.phase, Phase::AwaitHello) else {
            return Err(refuse(ErrorCode::Internal, "PLAN without its HELLO"));
        };
        check_plan(&hello, &plan).map_err(End::Refuse)?;
        self.attach(*hello, plan);
        Ok(())
    }

    fn attach(&mut self, hello: Hello, plan: Vec<ByteRange>) {
        let offered = hello.features;
        let request = AttachRequest { hello, plan };
        self.push(
            Action::Attach(Box::new(request)),
            Some(Wait::Attach { offered }),
        );
    }

    /// DIGEST_REQUEST, delta jobs only, before DONE.
    fn on_digest_request(
        &mut self,
        offset: u64,
        len_bytes: u32,
        block_bytes: u32,
    ) -> Result<(), End> {
        // The target is read by the driver (`digests.rs`); the span is
        // noted at the reply and counted at the next BARRIER or DONE.
        let span = (offset, len_bytes, block_bytes);
        let action = digests::request(attached(&self.job)?, span)?;
        self.push(action, Some(Wait::Digests(span)));
        Ok(())
    }

    /// At a BARRIER or DONE the ranges compared since count as written
    /// (the sender sent their corrections before it).
    fn note_compared(&mut self) -> Result<(), End> {
        if let Some((ranges, sync_point)) = self.compared.take() {
            for (offset, len_bytes) in ranges {
                self.intake.note_compared(offset, len_bytes, sync_point)?;
            }
        }
        Ok(())
    }

    /// What the data path's last step leaves to the machine.
    fn after_intake(&mut self, progress: IntakeState) {
        match progress {
            IntakeState::Waiting => self.waiting = Some(Wait::Intake),
            IntakeState::Ready => {}
            IntakeState::Settled => self.finish_stream(),
        }
    }

    fn on_done(&mut self, total_bytes_sent: u64, frames: u64, now: Instant) -> Result<(), End> {
        let payload_bytes = self.intake.payload_bytes();
        if total_bytes_sent != payload_bytes {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "DONE says {total_bytes_sent} DATA payload bytes were sent on this stream, \
                     but {payload_bytes} arrived: a sender bug"
                ),
            ));
        }
        // The frame count is informational: senders may or may not count
        // HELLO and DONE themselves, so only the byte count is enforced.
        debug!(
            frames_said = frames,
            frames_after_hello = self.frames,
            "stream sent DONE"
        );
        self.note_compared()?;
        let progress = self.intake.done(now, &mut self.actions);
        self.after_intake(progress);
        Ok(())
    }

    fn finish_stream(&mut self) {
        self.phase = Phase::Finished;
        self.push(Action::FinishStream, Some(Wait::FinishStream));
    }

    fn on_verify(&mut self, window_bytes: u32) -> Result<(), End> {
        if self.verify_asked {
            return Err(refuse(
                ErrorCode::Protocol,
                "a second VERIFY_REQUEST on this stream: one verify pass per stream",
            ));
        }
        self.verify_asked = true;
        self.push(Action::ReadBack { window_bytes }, Some(Wait::ReadBack));
        Ok(())
    }

    fn on_completion(&mut self, wait: Wait, done: ActionResult, now: Instant) -> Result<(), End> {
        match (wait, done) {
            (Wait::Attach { offered }, ActionResult::Attached(job)) => {
                self.on_attached(offered, *job);
                Ok(())
            }
            (Wait::Attach { .. }, ActionResult::AttachRefused(refusal)) => {
                Err(End::Refuse(refusal))
            }
            (Wait::Intake, done) => {
                let job = attached(&self.job)?;
                let progress = self.intake.complete(job, done, now, &mut self.actions)?;
                self.after_intake(progress);
                Ok(())
            }
            (Wait::FinishStream, ActionResult::StreamFinished(result)) => {
                result.map_err(End::Refuse)
            }
            (Wait::ReadBack, ActionResult::ReadBack(result)) => match result {
                Ok((digest, bytes_read)) => {
                    let frame = Frame::VerifyResult { digest, bytes_read };
                    self.send(frame);
                    Ok(())
                }
                Err(VerifyError::Stopped) => Err(End::Stopped),
                Err(VerifyError::Refused(refusal)) => Err(End::Refuse(refusal)),
            },
            (Wait::Digests(span), ActionResult::Digests(result)) => {
                let target_name = &attached(&self.job)?.target_name;
                let frame = digests::answer(span, result, &mut self.compared, target_name)?;
                self.send(frame);
                Ok(())
            }
            (Wait::Send, ActionResult::Sent(result)) => {
                result.map_err(|e| End::Lost(format!("write failed: {e}")))
            }
            (wait, done) => Err(refuse(
                ErrorCode::Internal,
                format!("{done:?} does not answer {wait:?}"),
            )),
        }
    }

    fn on_attached(&mut self, offered: Features, job: JobInfo) {
        self.features = offered.intersect(SUPPORTED_FEATURES);
        // Every WELCOME lists what is durable now: a sender that believed
        // more (acknowledged before this receiver restarted from an older
        // checkpoint) sends the difference again.
        let welcome = Welcome {
            features: self.features,
            instance: job.instance,
            sync_id: job.sync_id,
            durable: job.durable.clone(),
            replan: job.replan.clone(),
        };
        self.job = Some(job);
        self.phase = Phase::Streaming;
        self.send(Frame::Welcome(welcome));
    }

    /// The stream ends (see `ending.rs`).
    fn begin_end(&mut self, end: End) {
        let is_attached = self.job.is_some();
        let (ending, action) = Ending::start(
            end,
            is_attached,
            self.intake.written_mut(),
            self.timers.last_input(),
        );
        self.phase = Phase::Ending(ending);
        self.push_ending(action);
    }

    fn push_ending(&mut self, action: Action) {
        let wait = action.needs_completion().then_some(Wait::Ending);
        if matches!(action, Action::Close(_)) {
            self.phase = Phase::Closed;
        }
        self.push(action, wait);
    }
}

/// The stream's job (the data path runs only after HELLO attached it).
fn attached(job: &Option<JobInfo>) -> Result<&JobInfo, End> {
    job.as_ref()
        .ok_or_else(|| refuse(ErrorCode::Internal, "stream has no job after HELLO"))
}

#[cfg(test)]
#[path = "session_tests/mod.rs"]
mod tests;
