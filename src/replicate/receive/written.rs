//! What one receiver stream wrote and how far it is durable: the ranges not
//! yet reported in an ACK, the ranges not yet flushed, and the flush that
//! covers them. Both sets are capped, and so is the job's durable set when
//! a flush adds to it ([`super::job::Job::add_durable_capped`]): a sender
//! that scatters tiny frames is refused instead of being stored without
//! bound. Sans-IO: the stream's state machine flushes and counts.

use std::time::{Duration, Instant};

use super::events::Action;
use super::limits::RANGES_PER_STREAM_MAX;
use crate::journal::RangeSet;
use crate::wire::{ByteRange, MAX_ACK_RANGES};

/// A cap on ranges that a write or a flush would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeCapError {
    #[error(
        "this stream wrote {ranges} separate ranges since its last BARRIER, more than the \
         receiver allows ({max_ranges}); a sender writes whole chunk windows and barriers \
         every 64 MiB or second, so this one is broken or hostile"
    )]
    Stream { ranges: usize, max_ranges: usize },
    #[error(
        "the job would hold {ranges} separate durable ranges, more than the receiver allows \
         ({max_ranges} per job); a sender writes whole chunk windows, so this one is broken \
         or hostile"
    )]
    Job { ranges: usize, max_ranges: usize },
}

#[derive(Debug)]
pub(super) struct Written {
    /// Ranges written on this stream and not reported in an ACK yet.
    pending: RangeSet,
    /// Ranges written on this stream and not flushed by it yet, and the
    /// DATA bytes among them.
    unsynced: RangeSet,
    unsynced_data_bytes: u64,
    /// When this stream last flushed (at a BARRIER or on its own).
    last_settle: Instant,
    /// The flush that covers this stream's writes so far (a number from
    /// [`super::target::Target::sync_point`]).
    sync_need: u64,
    /// Cap on each set here, and on the job's durable set.
    max_ranges_per_job: usize,
}

impl Written {
    pub(super) fn new(max_ranges_per_job: usize, now: Instant) -> Self {
        Written {
            pending: RangeSet::new(),
            unsynced: RangeSet::new(),
            unsynced_data_bytes: 0,
            last_settle: now,
            sync_need: 0,
            max_ranges_per_job: max_ranges_per_job.max(1),
        }
    }

    /// Records a write of `len_bytes` at `offset` (`data_bytes` of them
    /// DATA) that the target's flush number `sync_point` will cover.
    /// Refused once this stream holds more ranges than one ACK carries (or
    /// than the job may hold); the caller ends the stream.
    pub(super) fn note(
        &mut self,
        offset: u64,
        len_bytes: u64,
        data_bytes: u64,
        sync_point: u64,
    ) -> Result<(), RangeCapError> {
        // Flush numbers only grow, but a compared range (`digests.rs`)
        // may be noted after a later write: keep the latest.
        self.sync_need = self.sync_need.max(sync_point);
        self.pending.insert(offset, len_bytes);
        self.unsynced.insert(offset, len_bytes);
        self.unsynced_data_bytes += data_bytes;
        let max_ranges = RANGES_PER_STREAM_MAX.min(self.max_ranges_per_job);
        let ranges = self.pending.len().max(self.unsynced.len());
        if ranges > max_ranges {
            return Err(RangeCapError::Stream { ranges, max_ranges });
        }
        Ok(())
    }

    pub(super) fn has_unsynced(&self) -> bool {
        !self.unsynced.is_empty()
    }

    /// True when this stream should flush on its own at `now`: the journal
    /// must not lag the data by more than a checkpoint `interval` (or this
    /// stream's `share_bytes` of the checkpoint bytes), whatever the
    /// sender's barriers.
    pub(super) fn settle_due(&self, now: Instant, interval: Duration, share_bytes: u64) -> bool {
        now.saturating_duration_since(self.last_settle) >= interval
            || self.unsynced_data_bytes >= share_bytes
    }

    /// A settle starts at `now`: the flush that covers every write noted
    /// so far.
    pub(super) fn flush(&mut self, now: Instant) -> Action {
        self.last_settle = now;
        Action::Flush {
            sync_need: self.sync_need,
        }
    }

    /// The flush completed: the unsynced ranges are to be counted durable
    /// (they stay here until [`Written::settled`]).
    pub(super) fn make_durable(&self) -> Action {
        Action::MakeDurable {
            ranges: self.unsynced.iter().collect(),
            data_bytes: self.unsynced_data_bytes,
            max_ranges: self.max_ranges_per_job,
        }
    }

    /// The job counted the unsynced ranges durable.
    pub(super) fn settled(&mut self) {
        self.unsynced = RangeSet::new();
        self.unsynced_data_bytes = 0;
    }

    /// The ranges an ACK reports (all of them: [`Written::note`] keeps
    /// fewer than one ACK carries).
    pub(super) fn take_acked(&mut self) -> Vec<ByteRange> {
        self.pending
            .take_first(MAX_ACK_RANGES as usize)
            .into_iter()
            .map(|(offset, len_bytes)| ByteRange { offset, len_bytes })
            .collect()
    }
}
