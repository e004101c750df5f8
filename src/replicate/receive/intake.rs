//! The data path of one stream, inside its state machine (`session.rs`):
//! DATA and ZERO frames checked and turned into writes, each write noted
//! (`written.rs`), and settles (a flush, then the flushed ranges counted
//! durable for the job) on a BARRIER (then the ACK), at DONE, and on the
//! stream's own when the job's checkpoint policy says one is due.
//!
//! The pairs are kept here: a chunk is written only after its digest
//! matched (`unpack.rs`); ranges are counted durable only after the flush
//! that covers them completed; an ACK is sent only after they were
//! counted; a failed write or flush fails the job and counts nothing.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use super::ending::not_counted;
use super::events::{Action, ActionResult, End, JobInfo};
use super::job::Refusal;
use super::unpack::{Chunk, UnpackError, Unpacker};
use super::written::{RangeCapError, Written};
use crate::wire::{Ack, ByteRange, Codec, Data, ErrorCode, Features, Frame};

/// What follows a settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterSettle {
    /// Nothing: the stream settled on its own.
    Continue,
    /// ACK this BARRIER.
    Ack(u64),
    /// The stream sent DONE; a failed settle is only logged.
    Done,
}

/// The action whose completion the data path waits for.
#[derive(Debug)]
enum Pending {
    Write {
        offset: u64,
        len_bytes: u64,
        /// The buffer is the DATA payload (else the decompression buffer).
        is_payload: bool,
    },
    Zero(ByteRange),
    Flush(AfterSettle),
    Durable(AfterSettle),
    Ack,
}

/// How the data path stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IntakeState {
    /// It waits for the completion of the action it pushed last.
    Waiting,
    /// Nothing outstanding: the next frame may come.
    Ready,
    /// The settle DONE asked for is over: the stream finishes now.
    Settled,
}

/// One stream's data path.
pub(super) struct Intake {
    unpacker: Unpacker,
    /// What this stream wrote, not yet acknowledged or not yet flushed.
    written: Written,
    last_seq: Option<u64>,
    /// DATA payload bytes (as sent) received on this stream.
    payload_bytes: u64,
    pending: Option<Pending>,
}

/// Fails the job (every stream of it ends) and ends this stream.
fn fail_job(out: &mut VecDeque<Action>, code: ErrorCode, message: String) -> End {
    let refusal = Refusal::new(code, message);
    out.push_back(Action::FailJob(refusal.clone()));
    End::Refuse(refusal)
}

fn refuse(code: ErrorCode, message: String) -> End {
    End::Refuse(Refusal::new(code, message))
}

/// Checks that `[offset, offset + len)` lies within the image and, for an
/// incremental pass, within its planned ranges: a write anywhere else
/// would change the target where no journal says it may have changed.
fn check_range(job: &JobInfo, offset: u64, len_bytes: u64, what: &str) -> Result<(), End> {
    let size_bytes = job.size_bytes;
    match offset.checked_add(len_bytes) {
        Some(end) if end <= size_bytes => {}
        _ => {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "{what} past the end of the target: offset {offset} + {len_bytes} bytes \
                     is beyond the image size {size_bytes}"
                ),
            ));
        }
    }
    match &job.planned {
        Some(planned) if !planned.contains(offset, len_bytes) => Err(refuse(
            ErrorCode::BadRequest,
            format!(
                "{what} at offset {offset} + {len_bytes} bytes is outside the incremental \
                 pass's planned ranges (its PLAN and WELCOME replan): refusing to write it"
            ),
        )),
        _ => Ok(()),
    }
}

impl Intake {
    pub(super) fn new(max_ranges_per_job: usize, now: Instant) -> Self {
        Intake {
            unpacker: Unpacker::new(),
            written: Written::new(max_ranges_per_job, now),
            last_seq: None,
            payload_bytes: 0,
            pending: None,
        }
    }

    /// Bytes of a raw DATA payload as they arrive (see
    /// [`super::session::Session::payload_arrived`]).
    pub(super) fn hash_arriving(&mut self, got_before: usize, bytes: &[u8]) {
        self.unpacker.hash_arriving(got_before, bytes);
    }

    /// DATA payload bytes (as sent) received so far.
    pub(super) fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }

    /// What the stream wrote, for its ending.
    pub(super) fn written_mut(&mut self) -> &mut Written {
        &mut self.written
    }

    fn wait(
        &mut self,
        out: &mut VecDeque<Action>,
        action: Action,
        pending: Pending,
    ) -> IntakeState {
        out.push_back(action);
        self.pending = Some(pending);
        IntakeState::Waiting
    }

    pub(super) fn data(
        &mut self,
        job: &JobInfo,
        features: Features,
        data: Data,
        out: &mut VecDeque<Action>,
    ) -> Result<IntakeState, End> {
        let head = data.head;
        check_range(job, head.offset, u64::from(head.raw_len_bytes), "data")?;
        let chunk = match self.unpacker.unpack(&data, features, job.chunk_size_bytes) {
            Ok(chunk) => chunk,
            Err(UnpackError::Refuse(refusal)) => return Err(End::Refuse(refusal)),
            Err(UnpackError::Damaged(refusal)) => {
                return Err(fail_job(out, refusal.code, refusal.message));
            }
        };
        self.payload_bytes += data.payload.len() as u64;
        let (buf, is_payload) = match chunk {
            Chunk::AsSent => (data.payload, true),
            Chunk::Decompressed(raw) => (raw, false),
        };
        let pending = Pending::Write {
            offset: head.offset,
            len_bytes: u64::from(head.raw_len_bytes),
            is_payload,
        };
        let offset = head.offset;
        Ok(self.wait(out, Action::Write { offset, buf }, pending))
    }

    pub(super) fn zero(
        &mut self,
        job: &JobInfo,
        range: ByteRange,
        out: &mut VecDeque<Action>,
    ) -> Result<IntakeState, End> {
        check_range(job, range.offset, range.len_bytes, "zero range")?;
        let (offset, len_bytes) = (range.offset, range.len_bytes);
        Ok(self.wait(
            out,
            Action::Zero { offset, len_bytes },
            Pending::Zero(range),
        ))
    }

    pub(super) fn barrier(
        &mut self,
        seq: u64,
        now: Instant,
        out: &mut VecDeque<Action>,
    ) -> Result<IntakeState, End> {
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
        Ok(self.settle(AfterSettle::Ack(seq), now, out))
    }

    /// A delta pass's compared range (`digests.rs`), at a BARRIER or DONE:
    /// counted like a write that flush number `sync_point` covers.
    pub(super) fn note_compared(
        &mut self,
        offset: u64,
        len_bytes: u64,
        sync_point: u64,
    ) -> Result<(), End> {
        self.written
            .note(offset, len_bytes, 0, sync_point)
            .map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))
    }

    /// DONE: what this stream wrote is settled before it finishes.
    pub(super) fn done(&mut self, now: Instant, out: &mut VecDeque<Action>) -> IntakeState {
        if self.written.has_unsynced() {
            self.settle(AfterSettle::Done, now, out)
        } else {
            IntakeState::Settled
        }
    }

    fn settle(
        &mut self,
        then: AfterSettle,
        now: Instant,
        out: &mut VecDeque<Action>,
    ) -> IntakeState {
        let flush = self.written.flush(now);
        self.wait(out, flush, Pending::Flush(then))
    }

    /// The completion of the data path's pending action.
    pub(super) fn complete(
        &mut self,
        job: &JobInfo,
        done: ActionResult,
        now: Instant,
        out: &mut VecDeque<Action>,
    ) -> Result<IntakeState, End> {
        let pending = self.pending.take();
        match (pending, done) {
            (
                Some(Pending::Write {
                    offset,
                    len_bytes,
                    is_payload,
                }),
                ActionResult::Written { buf, result },
            ) => {
                if is_payload {
                    out.push_back(Action::Recycle(buf));
                } else {
                    self.unpacker.give_back(buf);
                }
                self.on_written(job, (offset, len_bytes, len_bytes), result, now, out)
            }
            (Some(Pending::Zero(r)), ActionResult::Zeroed(result)) => {
                self.on_written(job, (r.offset, r.len_bytes, 0), result, now, out)
            }
            (Some(Pending::Flush(then)), ActionResult::Flushed(result)) => {
                self.on_flushed(job, then, result, out)
            }
            (Some(Pending::Durable(then)), ActionResult::MadeDurable(result)) => {
                self.on_durable(then, result, out)
            }
            (Some(Pending::Ack), ActionResult::Sent(result)) => result
                .map(|()| IntakeState::Ready)
                .map_err(|e| End::Lost(format!("write failed: {e}"))),
            (pending, done) => Err(refuse(
                ErrorCode::Internal,
                format!("{done:?} does not answer {pending:?}"),
            )),
        }
    }

    /// A write or zero `(offset, len_bytes, data_bytes)` finished with
    /// `result`: the flush number covering it.
    fn on_written(
        &mut self,
        job: &JobInfo,
        (offset, len_bytes, data_bytes): (u64, u64, u64),
        result: io::Result<u64>,
        now: Instant,
        out: &mut VecDeque<Action>,
    ) -> Result<IntakeState, End> {
        let sync_point = match result {
            Ok(sync_point) => sync_point,
            Err(e) => {
                let target = &job.target_name;
                let verb = if data_bytes > 0 { "writing" } else { "zeroing" };
                let message = format!(
                    "{verb} {len_bytes} bytes at offset {offset} of target {target:?} failed: {e}"
                );
                return Err(fail_job(out, ErrorCode::TargetIo, message));
            }
        };
        if let Err(e) = self.written.note(offset, len_bytes, data_bytes, sync_point) {
            return Err(fail_job(out, ErrorCode::Protocol, e.to_string()));
        }
        // The journal must not lag the data by more than a checkpoint
        // interval, or this stream's share of the checkpoint bytes.
        let share_bytes = job.checkpoint_bytes / u64::from(job.stream_count.max(1));
        let interval = job.checkpoint_interval;
        if self.written.has_unsynced() && self.written.settle_due(now, interval, share_bytes) {
            return Ok(self.settle(AfterSettle::Continue, now, out));
        }
        Ok(IntakeState::Ready)
    }

    fn on_flushed(
        &mut self,
        job: &JobInfo,
        then: AfterSettle,
        result: io::Result<()>,
        out: &mut VecDeque<Action>,
    ) -> Result<IntakeState, End> {
        match result {
            Ok(()) => {
                let count = self.written.make_durable();
                Ok(self.wait(out, count, Pending::Durable(then)))
            }
            Err(e) if then == AfterSettle::Done => {
                not_counted(&e.to_string());
                Ok(IntakeState::Settled)
            }
            Err(e) => {
                let message = format!("flushing target {:?} failed: {e}", job.target_name);
                Err(fail_job(out, ErrorCode::TargetIo, message))
            }
        }
    }

    fn on_durable(
        &mut self,
        then: AfterSettle,
        result: Result<u64, RangeCapError>,
        out: &mut VecDeque<Action>,
    ) -> Result<IntakeState, End> {
        let bytes_durable_total = match result {
            Ok(total) => {
                self.written.settled();
                total
            }
            Err(e) if then == AfterSettle::Done => {
                not_counted(&e.to_string());
                return Ok(IntakeState::Settled);
            }
            Err(e) => return Err(fail_job(out, ErrorCode::Protocol, e.to_string())),
        };
        Ok(match then {
            AfterSettle::Continue => IntakeState::Ready,
            AfterSettle::Ack(seq) => {
                let ack = Ack {
                    seq,
                    bytes_durable_total,
                    durable_added: self.written.take_acked(),
                };
                self.wait(out, Action::Send(Frame::Ack(ack)), Pending::Ack)
            }
            AfterSettle::Done => IntakeState::Settled,
        })
    }
}

/// Whether a raw DATA payload's bytes are hashed as they arrive: only a
/// raw payload, only with XXH3 digests (BLAKE3 chunks are hashed whole).
pub(super) fn hashes_arriving(
    progress: Option<(Codec, usize)>,
    features: Features,
) -> Option<usize> {
    match progress {
        Some((Codec::None, got_before)) if features.contains(Features::XXH3) => Some(got_before),
        _ => None,
    }
}
