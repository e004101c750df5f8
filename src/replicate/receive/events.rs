//! What goes into a stream's state machine (`session.rs`) and what comes
//! out of it: [`Input`] from the connection, [`Action`]s for the driver to
//! carry out, and the [`ActionResult`] of each action that has a result.

#![forbid(unsafe_code)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::digests::DigestReadError;
use super::job::Refusal;
use super::verify::VerifyError;
use super::written::RangeCapError;
use crate::journal::RangeSet;
use crate::wire::{ByteRange, Frame, Hello, PassMode, SyncId};

/// How the stream's job stands, as the driver sees it when a frame or a
/// quiet interval comes (other streams may have failed the job, or a
/// newer connection taken this stream over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// The job failed: every stream of it ends with this error.
    Failed(Refusal),
    /// A newer connection of this stream attached to the job.
    TakenOver,
}

impl Health {
    /// Ends the stream unless the job is healthy and the stream current.
    pub(super) fn check(self) -> Result<(), End> {
        match self {
            Health::Ok => Ok(()),
            Health::Failed(refusal) => Err(End::Refuse(refusal)),
            Health::TakenOver => Err(End::Lost(
                "the sender reconnected this stream; this older connection ends".into(),
            )),
        }
    }
}

/// Something that happened on the connection.
#[derive(Debug)]
pub enum Input {
    /// A whole frame was decoded.
    Frame(Frame, Health),
    /// The bytes received are not a frame (the decoder's refusal).
    Malformed(Refusal),
    /// Bytes arrived, not yet a whole frame.
    Received,
    /// A poll interval passed with nothing to read.
    Idle(Health),
    /// The receiver is shutting down.
    Stop,
    /// The peer closed the connection.
    Closed { is_mid_frame: bool },
    /// The connection broke (reset, read error).
    Lost(String),
}

/// What the stream's job is, told to the machine when it attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The target as the sender named it (for messages).
    pub target_name: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u32,
    pub stream_count: u16,
    /// The job's journal checkpoints: a stream flushes on its own at least
    /// this often, or after its share of `checkpoint_bytes`.
    pub checkpoint_interval: Duration,
    pub checkpoint_bytes: u64,
    /// The job instance told in WELCOME.
    pub instance: u64,
    /// What is durable now, for WELCOME.
    pub durable: Vec<ByteRange>,
    /// What the job's pass does.
    pub mode: PassMode,
    /// The id the target records when the job completes, for WELCOME.
    pub sync_id: SyncId,
    /// Incremental: planned ranges the sender's plan does not list, for
    /// WELCOME.
    pub replan: Vec<ByteRange>,
    /// Incremental: the only ranges the pass may write (everything else of
    /// the target stays as the base left it).
    pub planned: Option<Arc<RangeSet>>,
}

/// A stream's HELLO and, for an incremental pass, the PLAN that came
/// right after it (its digest checked against the HELLO's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachRequest {
    pub hello: Hello,
    /// Incremental: the pass's changed set; empty otherwise.
    pub plan: Vec<ByteRange>,
}

/// What the machine asks the driver to do. Those that have a result
/// ([`Action::needs_completion`]) are answered with a [`ActionResult`].
#[derive(Debug)]
pub enum Action {
    /// Attach the stream to the HELLO's job (starting the job on its first
    /// HELLO) → [`ActionResult::Attached`] or [`ActionResult::AttachRefused`].
    Attach(Box<AttachRequest>),
    /// Write all of `buf` at `offset` of the target → [`ActionResult::Written`]
    /// (which gives `buf` back).
    Write { offset: u64, buf: Vec<u8> },
    /// Make the range read as zeros → [`ActionResult::Zeroed`].
    Zero { offset: u64, len_bytes: u64 },
    /// Flush the target at least up to flush number `sync_need` →
    /// [`ActionResult::Flushed`].
    Flush { sync_need: u64 },
    /// Count `ranges` durable for the job (`data_bytes` of them DATA),
    /// unless its durable set could pass `max_ranges` →
    /// [`ActionResult::MadeDurable`]. Only ever after a [`Action::Flush`]
    /// that completed.
    MakeDurable {
        ranges: Vec<(u64, u64)>,
        data_bytes: u64,
        max_ranges: usize,
    },
    /// The stream sent DONE: mark it done, and when it is the job's last,
    /// finish the job (final flush, journal) → [`ActionResult::StreamFinished`].
    FinishStream,
    /// Read the target back in `window_bytes` windows →
    /// [`ActionResult::ReadBack`].
    ReadBack { window_bytes: u32 },
    /// A delta pass: digest the target's `block_bytes` blocks of
    /// `[offset, offset + len_bytes)` → [`ActionResult::Digests`].
    ReadDigests {
        offset: u64,
        len_bytes: u32,
        block_bytes: u32,
    },
    /// Flush the target before telling the sender the receiver stops →
    /// [`ActionResult::Synced`].
    SyncForStop,
    /// Send this frame → [`ActionResult::Sent`].
    Send(Frame),
    /// Mark the job failed (the first failure wins); no result.
    FailJob(Refusal),
    /// A DATA payload buffer the driver may reuse for the next frame; no
    /// result.
    Recycle(Vec<u8>),
    /// Close the connection; the last action. Says why, for the log.
    Close(End),
}

impl Action {
    /// True if the machine waits for this action's [`ActionResult`].
    pub fn needs_completion(&self) -> bool {
        !matches!(
            self,
            Action::FailJob(_) | Action::Recycle(_) | Action::Close(_)
        )
    }
}

/// The result of an action.
#[derive(Debug)]
pub enum ActionResult {
    Attached(Box<JobInfo>),
    AttachRefused(Refusal),
    /// The buffer back, and the target's flush number that covers the
    /// write (or why it failed).
    Written {
        buf: Vec<u8>,
        result: io::Result<u64>,
    },
    /// The flush number that covers the zeroing (or why it failed).
    Zeroed(io::Result<u64>),
    Flushed(io::Result<()>),
    /// The job's durable byte total.
    MadeDurable(Result<u64, RangeCapError>),
    StreamFinished(Result<(), Refusal>),
    /// The image digest and the bytes read.
    ReadBack(Result<([u8; 32], u64), VerifyError>),
    /// The block digests, and the target's flush number that covers the
    /// bytes they were taken of.
    Digests(Result<(Vec<[u8; 16]>, u64), DigestReadError>),
    Synced(io::Result<()>),
    /// Whether the frame was written out (the error, for the log).
    Sent(io::Result<()>),
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer closed at a frame boundary.
    PeerClosed,
    /// The connection broke (cut mid-frame, reset, write failure), or was
    /// taken over: nothing more is sent.
    Lost(String),
    /// An ERROR with this refusal was sent (or tried), then the close.
    Refuse(Refusal),
    /// The receiver is shutting down (the sender was told).
    Stopped,
}
