//! What one receiver stream wrote and how far it is durable: the ranges not
//! yet reported in an ACK, the ranges not yet flushed, and the flush that
//! covers them. Both sets are capped, and so is the job's durable set when
//! a flush adds to it: a sender that scatters tiny frames is refused
//! instead of being stored without bound.

use std::time::Instant;

use super::job::Job;
use super::limits::RANGES_PER_STREAM_MAX;
use crate::journal::RangeSet;
use crate::wire::{ByteRange, MAX_ACK_RANGES};

/// A cap on ranges that a write or a flush would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum RangeCapError {
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

/// Why a [`Written::settle`] did not count anything durable.
#[derive(Debug, thiserror::Error)]
pub(super) enum SettleError {
    #[error("{0}")]
    Flush(#[source] std::io::Error),
    #[error("{0}")]
    Cap(RangeCapError),
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
    /// The flush that covers this stream's writes so far
    /// ([`crate::replicate::target::Target::sync_point`]).
    sync_need: u64,
    /// Cap on each set here, and on the job's durable set.
    max_ranges_per_job: usize,
}

impl Written {
    pub(super) fn new(max_ranges_per_job: usize) -> Self {
        Written {
            pending: RangeSet::new(),
            unsynced: RangeSet::new(),
            unsynced_data_bytes: 0,
            last_settle: Instant::now(),
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
        self.sync_need = sync_point;
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

    /// True when this stream should flush on its own: the journal must not
    /// lag the data by more than a checkpoint interval (or a share of the
    /// checkpoint bytes), whatever the sender's barriers.
    pub(super) fn settle_due(&self, job: &Job) -> bool {
        let (interval, bytes) = job.checkpoint_policy();
        let share = bytes / u64::from(job.stream_count.max(1));
        self.last_settle.elapsed() >= interval || self.unsynced_data_bytes >= share
    }

    /// Flushes what this stream wrote and counts it durable for the job
    /// (checked against the job's cap first: the ranges are counted before
    /// they merge, so the check errs on the safe side). Returns the job's
    /// durable byte total. On an error nothing is counted.
    pub(super) fn settle(&mut self, job: &Job) -> Result<u64, SettleError> {
        self.last_settle = Instant::now();
        job.target
            .sync_covering(self.sync_need)
            .map_err(SettleError::Flush)?;
        let ranges = job.durable_range_count() + self.unsynced.len();
        if ranges > self.max_ranges_per_job {
            return Err(SettleError::Cap(RangeCapError::Job {
                ranges,
                max_ranges: self.max_ranges_per_job,
            }));
        }
        let total = job.add_durable(self.unsynced.iter(), self.unsynced_data_bytes);
        self.unsynced = RangeSet::new();
        self.unsynced_data_bytes = 0;
        Ok(total)
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
