//! One receiver stream's protocol as a sans-IO state machine: HELLO →
//! WELCOME, then DATA / ZERO / BARRIER → ACK, DONE, VERIFY_REQUEST →
//! VERIFY_RESULT, PING → PONG.
//!
//! [`Session`] is fed what happened ([`Input`]: a decoded frame, bytes
//! arriving, a quiet poll interval, a stop, the connection ending) and the
//! result of what it asked for ([`Completion`]), and answers with
//! [`Action`]s (attach to the job, write or zero a range of the target,
//! flush, count ranges durable, send a frame, read back, close). It holds
//! no socket, file or clock: time comes in with every call, and the driver
//! (`conn.rs`, a thread per connection today) does the I/O. One action
//! that asks for a result is outstanding at a time; the driver carries it
//! out and gives its [`Completion`] back before anything else.
//!
//! The pairs the protocol rests on are decided here: a chunk is written
//! only after its digest matched; an ACK is sent only after the flush
//! covering the stream's writes completed and the job counted them
//! durable; a failed write or flush fails the job, and nothing after it is
//! counted durable.
//!
//! Memory is bounded by the protocol: one decompression buffer of at most
//! the job's chunk size, and written ranges capped by `written`.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::Instant;

use tracing::{debug, warn};

use super::ending::{Ending, not_counted};
use super::events::{Action, Completion, End, Health, Input, JobInfo};
use super::job::Refusal;
use super::timers::Timers;
use super::unpack::{Chunk, UnpackError, Unpacker};
use super::verify::VerifyError;
use super::written::Written;
use crate::wire::{Ack, ByteRange, Codec, Data, ErrorCode, Features, Frame, Hello, Welcome};

/// Features this receiver supports.
pub const SUPPORTED_FEATURES: Features = Features(
    Features::BLAKE3.0 | Features::LZ4.0 | Features::ZSTD.0 | Features::RESUME.0 | Features::XXH3.0,
);

#[derive(Debug)]
enum Phase {
    AwaitHello,
    Streaming,
    /// DONE received: only VERIFY_REQUEST (once) and PING may follow.
    Finished,
    /// The stream is ending: only the ending's own actions follow.
    Ending(Ending),
    /// [`Action::Close`] was given: nothing follows.
    Closed,
}

/// What follows a settle (a flush, then the ranges counted durable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterSettle {
    /// Nothing: a settle of the stream's own (or of its ending).
    Continue,
    /// ACK this BARRIER.
    Ack(u64),
    /// Finish the stream (DONE); a failed settle is only logged.
    Done,
}

/// The action whose [`Completion`] the machine waits for.
#[derive(Debug)]
enum Wait {
    Attach {
        offered: Features,
    },
    Write {
        offset: u64,
        len_bytes: u64,
        /// The buffer is the DATA payload (else the decompression buffer).
        is_payload: bool,
    },
    Zero(ByteRange),
    Flush(AfterSettle),
    Durable(AfterSettle),
    FinishStream,
    ReadBack,
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
    unpacker: Unpacker,
    /// What this stream wrote, not yet acknowledged or not yet flushed.
    written: Written,
    /// A verify pass was asked for on this stream (one is allowed).
    verify_asked: bool,
    last_seq: Option<u64>,
    /// DATA payload bytes (as sent) received on this stream.
    payload_bytes: u64,
    /// Frames received after HELLO.
    frames: u64,
    timers: Timers,
    /// Actions not handed out yet; the last one may wait for a result.
    actions: VecDeque<Action>,
    /// The action whose [`Completion`] is awaited, and what follows it.
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
            unpacker: Unpacker::new(),
            written: Written::new(max_ranges_per_job, now),
            verify_asked: false,
            last_seq: None,
            payload_bytes: 0,
            frames: 0,
            timers: Timers::new(now),
            actions: VecDeque::new(),
            waiting: None,
        }
    }

    /// The next action to carry out, if any. An action that asks for a
    /// result ([`Action::needs_completion`]) is the last one until its
    /// [`Completion`] came back through [`Session::complete`].
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
        if let Some((Codec::None, got_before)) = progress
            && self.features.contains(Features::XXH3)
        {
            self.unpacker.hash_arriving(got_before, bytes);
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
    pub fn complete(&mut self, completion: Completion, now: Instant) {
        let Some(wait) = self.waiting.take() else {
            self.internal(format!("{completion:?} came with no action waiting for it"));
            return;
        };
        if let Phase::Ending(ending) = &mut self.phase {
            let action = ending.next(completion, &mut self.written);
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
        let is_awaiting_hello = matches!(self.phase, Phase::AwaitHello);
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
        self.frames += 1;
        health.check()?;
        match (&self.phase, frame) {
            (Phase::Streaming, Frame::Data(data)) => self.on_data(data),
            (Phase::Streaming, Frame::Zero(range)) => self.on_zero(range),
            (Phase::Streaming, Frame::Barrier { seq }) => self.on_barrier(seq, now),
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
                "the sender does not offer BLAKE3 digests, which protocol v1 requires",
            ));
        }
        let offered = hello.features;
        self.push(
            Action::Attach(Box::new(hello)),
            Some(Wait::Attach { offered }),
        );
        Ok(())
    }

    fn job(&self) -> Result<&JobInfo, End> {
        self.job
            .as_ref()
            .ok_or_else(|| refuse(ErrorCode::Internal, "stream has no job after HELLO"))
    }

    /// Checks that `[offset, offset + len)` lies within the image.
    fn check_range(&self, offset: u64, len_bytes: u64, what: &str) -> Result<(), End> {
        let size_bytes = self.job()?.size_bytes;
        match offset.checked_add(len_bytes) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "{what} past the end of the target: offset {offset} + {len_bytes} bytes \
                     is beyond the image size {size_bytes}"
                ),
            )),
        }
    }

    /// Fails the job (every stream of it ends) and ends this stream.
    fn fail_job(&mut self, code: ErrorCode, message: String) -> End {
        let refusal = Refusal::new(code, message);
        if self.job.is_some() {
            self.actions.push_back(Action::FailJob(refusal.clone()));
        }
        End::Refuse(refusal)
    }

    fn on_data(&mut self, data: Data) -> Result<(), End> {
        let head = data.head;
        self.check_range(head.offset, u64::from(head.raw_len_bytes), "data")?;
        let chunk_size_bytes = self.job()?.chunk_size_bytes;
        let chunk = match self.unpacker.unpack(&data, self.features, chunk_size_bytes) {
            Ok(chunk) => chunk,
            Err(UnpackError::Refuse(refusal)) => return Err(End::Refuse(refusal)),
            Err(UnpackError::Damaged(refusal)) => {
                return Err(self.fail_job(refusal.code, refusal.message));
            }
        };
        self.payload_bytes += data.payload.len() as u64;
        let (buf, is_payload) = match chunk {
            Chunk::AsSent => (data.payload, true),
            Chunk::Decompressed(raw) => (raw, false),
        };
        let wait = Wait::Write {
            offset: head.offset,
            len_bytes: u64::from(head.raw_len_bytes),
            is_payload,
        };
        self.push(
            Action::Write {
                offset: head.offset,
                buf,
            },
            Some(wait),
        );
        Ok(())
    }

    fn on_zero(&mut self, range: ByteRange) -> Result<(), End> {
        self.check_range(range.offset, range.len_bytes, "zero range")?;
        self.push(
            Action::Zero {
                offset: range.offset,
                len_bytes: range.len_bytes,
            },
            Some(Wait::Zero(range)),
        );
        Ok(())
    }

    fn on_barrier(&mut self, seq: u64, now: Instant) -> Result<(), End> {
        if self.last_seq.is_some_and(|last| seq <= last) {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "BARRIER {seq} does not follow BARRIER {:?}: sequence numbers must increase",
                    self.last_seq
                ),
            ));
        }
        self.last_seq = Some(seq);
        self.settle(AfterSettle::Ack(seq), now);
        Ok(())
    }

    fn on_done(&mut self, total_bytes_sent: u64, frames: u64, now: Instant) -> Result<(), End> {
        if total_bytes_sent != self.payload_bytes {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "DONE says {total_bytes_sent} DATA payload bytes were sent on this stream, \
                     but {} arrived: a sender bug",
                    self.payload_bytes
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
        if self.written.has_unsynced() {
            self.settle(AfterSettle::Done, now);
        } else {
            self.finish_stream();
        }
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

    /// Flushes what this stream wrote, then counts it durable for the job;
    /// `then` says what follows.
    fn settle(&mut self, then: AfterSettle, now: Instant) {
        let flush = self.written.flush(now);
        self.push(flush, Some(Wait::Flush(then)));
    }

    /// A settle is due after a write ([`Written::settle_due`]).
    fn maybe_settle(&mut self, now: Instant) -> Result<(), End> {
        let job = self.job()?;
        let share_bytes = job.checkpoint_bytes / u64::from(job.stream_count.max(1));
        let interval = job.checkpoint_interval;
        if self.written.has_unsynced() && self.written.settle_due(now, interval, share_bytes) {
            self.settle(AfterSettle::Continue, now);
        }
        Ok(())
    }

    fn make_durable(&mut self, then: AfterSettle) {
        let count = self.written.make_durable();
        self.push(count, Some(Wait::Durable(then)));
    }

    fn on_completion(&mut self, wait: Wait, done: Completion, now: Instant) -> Result<(), End> {
        match (wait, done) {
            (Wait::Attach { offered }, Completion::Attached(job)) => {
                self.on_attached(offered, *job);
                Ok(())
            }
            (Wait::Attach { .. }, Completion::AttachRefused(refusal)) => Err(End::Refuse(refusal)),
            (
                Wait::Write {
                    offset,
                    len_bytes,
                    is_payload,
                },
                Completion::Written { buf, result },
            ) => {
                if is_payload {
                    self.actions.push_back(Action::Recycle(buf));
                } else {
                    self.unpacker.give_back(buf);
                }
                self.on_written(offset, len_bytes, len_bytes, result, now)
            }
            (Wait::Zero(range), Completion::Zeroed(result)) => {
                self.on_written(range.offset, range.len_bytes, 0, result, now)
            }
            (Wait::Flush(then), Completion::Flushed(result)) => self.on_flushed(then, result),
            (Wait::Durable(then), Completion::MadeDurable(result)) => self.on_durable(then, result),
            (Wait::FinishStream, Completion::StreamFinished(result)) => result.map_err(End::Refuse),
            (Wait::ReadBack, Completion::ReadBack(result)) => match result {
                Ok((digest, bytes_read)) => {
                    let frame = Frame::VerifyResult { digest, bytes_read };
                    self.send(frame);
                    Ok(())
                }
                Err(VerifyError::Stopped) => Err(End::Stopped),
                Err(VerifyError::Refused(refusal)) => Err(End::Refuse(refusal)),
            },
            (Wait::Send, Completion::Sent(result)) => {
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
            durable: job.durable.clone(),
        };
        self.job = Some(job);
        self.phase = Phase::Streaming;
        self.send(Frame::Welcome(welcome));
    }

    /// A write or zero of `[offset, offset + len_bytes)` (`data_bytes` of
    /// it DATA) finished with `result`: the flush number covering it.
    fn on_written(
        &mut self,
        offset: u64,
        len_bytes: u64,
        data_bytes: u64,
        result: std::io::Result<u64>,
        now: Instant,
    ) -> Result<(), End> {
        let sync_point = match result {
            Ok(sync_point) => sync_point,
            Err(e) => {
                let target = self.job()?.target_name.clone();
                let verb = if data_bytes > 0 { "writing" } else { "zeroing" };
                let message = format!(
                    "{verb} {len_bytes} bytes at offset {offset} of target {target:?} failed: {e}"
                );
                return Err(self.fail_job(ErrorCode::TargetIo, message));
            }
        };
        if let Err(e) = self.written.note(offset, len_bytes, data_bytes, sync_point) {
            return Err(self.fail_job(ErrorCode::Protocol, e.to_string()));
        }
        self.maybe_settle(now)
    }

    fn on_flushed(&mut self, then: AfterSettle, result: std::io::Result<()>) -> Result<(), End> {
        match result {
            Ok(()) => {
                self.make_durable(then);
                Ok(())
            }
            Err(e) if matches!(then, AfterSettle::Done) => {
                not_counted(&e.to_string());
                self.finish_stream();
                Ok(())
            }
            Err(e) => {
                let target = self.job()?.target_name.clone();
                let message = format!("flushing target {target:?} failed: {e}");
                Err(self.fail_job(ErrorCode::TargetIo, message))
            }
        }
    }

    fn on_durable(
        &mut self,
        then: AfterSettle,
        result: Result<u64, super::written::RangeCapError>,
    ) -> Result<(), End> {
        let bytes_durable_total = match result {
            Ok(total) => {
                self.written.settled();
                total
            }
            Err(e) if matches!(then, AfterSettle::Done) => {
                not_counted(&e.to_string());
                self.finish_stream();
                return Ok(());
            }
            Err(e) => return Err(self.fail_job(ErrorCode::Protocol, e.to_string())),
        };
        match then {
            AfterSettle::Continue => {}
            AfterSettle::Ack(seq) => {
                let durable_added = self.written.take_acked();
                let ack = Ack {
                    seq,
                    bytes_durable_total,
                    durable_added,
                };
                self.send(Frame::Ack(ack));
            }
            AfterSettle::Done => self.finish_stream(),
        }
        Ok(())
    }

    /// The stream ends (see `ending.rs`).
    fn begin_end(&mut self, end: End) {
        let is_attached = self.job.is_some();
        let (ending, action) = Ending::start(
            end,
            is_attached,
            &mut self.written,
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

#[cfg(test)]
#[path = "session_tests/mod.rs"]
mod tests;
