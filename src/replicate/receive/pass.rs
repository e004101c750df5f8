//! The pass a job runs (protocol v2): what its journal says before the
//! first write, what its WELCOME tells, which ranges it may write, when it
//! is complete and what its completion records.
//!
//! * full: a fresh job starts a new journal (no sync on record while it
//!   runs); a resumed one keeps its durable ranges and forgets any older
//!   sync; an already complete one keeps what it recorded.
//! * incremental: the journal names the base (the last sync, which stays
//!   on record), the plan digest and the planned ranges before any write;
//!   only planned ranges may be written, and the pass is complete when
//!   they are all durable.
//! * delta: a new journal of a delta pass (no sync on record) before the
//!   target is extended or written; complete like a full pass.
//!
//! On completion the journal records the job's sync id, its change id,
//! and a regular file's stamp (inode, mtime, size) after the final flush.

use std::sync::Arc;

use super::job::Refusal;
use crate::journal::{Decision, Journal, RangeSet, RefuseReason, ResumeRequest, TargetStamp};
use crate::wire::{ByteRange, ErrorCode, Hello, PassMode, SyncId};

/// What a job's completion writes into the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRecord {
    pub sync_id: SyncId,
    pub change_id: String,
}

/// How a job's pass runs, kept by the job.
#[derive(Debug, Clone)]
pub struct PassState {
    pub mode: PassMode,
    /// WELCOME `sync_id`: what the target records (or recorded) for this job.
    pub welcome_sync_id: SyncId,
    /// WELCOME `replan`.
    pub replan: Vec<ByteRange>,
    /// Incremental: the only ranges the pass may write, and those that
    /// must be durable for it to complete.
    pub planned: Option<Arc<RangeSet>>,
    /// What completion records; `None` keeps the sync already on record
    /// (an already complete target).
    pub record: Option<SyncRecord>,
}

impl PassState {
    /// The pass of a job whose first HELLO is `hello`, decided `decision`
    /// (not a refusal) on the journal `existing`.
    pub fn new(hello: &Hello, decision: &Decision) -> PassState {
        let record = Some(SyncRecord {
            sync_id: hello.sync_id,
            change_id: hello.change_id.clone(),
        });
        let mut pass = PassState {
            mode: hello.mode,
            welcome_sync_id: hello.sync_id,
            replan: Vec::new(),
            planned: None,
            record,
        };
        match decision {
            Decision::AlreadyComplete {
                last_sync_id: Some(id),
            } => {
                pass.welcome_sync_id = *id;
                pass.record = None;
            }
            Decision::Incremental {
                planned, replan, ..
            } => {
                pass.replan = wire_ranges(replan);
                pass.planned = Some(Arc::new(planned.clone()));
            }
            _ => {}
        }
        pass
    }

    /// Whether `durable` completes the pass of a `size_bytes` image: the
    /// planned ranges for an incremental, every byte otherwise. `Err`
    /// says what is missing.
    pub fn check_complete(&self, durable: &RangeSet, size_bytes: u64) -> Result<(), String> {
        match &self.planned {
            Some(planned) => {
                let missing = crate::journal::decide::subtract(planned, durable);
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "{} of the {} planned bytes of the incremental pass are not durable",
                        missing.covered_bytes(),
                        planned.covered_bytes()
                    ))
                }
            }
            None if durable.covered_bytes() == size_bytes => Ok(()),
            None => Err(format!(
                "only {} of {size_bytes} bytes are durable",
                durable.covered_bytes()
            )),
        }
    }
}

/// The decision's input for `hello` with its PLAN, the target's stamp now.
pub fn request(hello: &Hello, plan: &[ByteRange], stamp: Option<TargetStamp>) -> ResumeRequest {
    ResumeRequest {
        target_name: hello.target.clone(),
        source_identity: hello.source_identity.clone(),
        size_bytes: hello.size_bytes,
        chunk_size_bytes: hello.chunk_size_bytes,
        restart: hello.flags.restart(),
        mode: hello.mode,
        sync_id: hello.sync_id,
        base_sync_id: (hello.mode == PassMode::Incremental).then_some(hello.base_sync_id),
        plan_digest: hello.plan_digest,
        plan: plan.iter().map(|r| (r.offset, r.len_bytes)).collect(),
        target_stamp: stamp,
    }
}

/// A new journal for `hello`'s job: nothing durable, no sync on record.
pub fn new_journal(hello: &Hello, path_hint: &str, now_unix_s: u64) -> Journal {
    let mut j = Journal::new(
        &hello.target,
        path_hint,
        &hello.source_identity,
        hello.size_bytes,
        hello.chunk_size_bytes,
        hello.job_id,
        now_unix_s,
    );
    j.pass_mode = hello.mode;
    j
}

/// The journal of a full pass resuming `existing`: its durable ranges,
/// and no older sync on record any more (the pass rewrites the target).
pub fn resumed_full_journal(existing: &Journal, hello: &Hello) -> Journal {
    let mut j = existing.clone();
    j.job_id = hello.job_id;
    j.chunk_size_bytes = hello.chunk_size_bytes;
    j.pass_mode = PassMode::Full;
    j.last_sync_id = None;
    j.change_id.clear();
    j.target_stamp = None;
    j.base_sync_id = None;
    j.plan_digest = [0; 32];
    j.planned = RangeSet::new();
    j
}

/// The journal of an incremental pass on `existing`'s last sync: the base,
/// the plan digest, the planned and durable ranges. Written before the
/// pass writes anything.
pub fn incremental_journal(
    existing: &Journal,
    hello: &Hello,
    planned: &RangeSet,
    durable: &RangeSet,
) -> Journal {
    let mut j = existing.clone();
    j.job_id = hello.job_id;
    j.chunk_size_bytes = hello.chunk_size_bytes;
    j.source_identity = hello.source_identity.clone();
    j.pass_mode = PassMode::Incremental;
    j.complete = false;
    j.base_sync_id = j.last_sync_id;
    j.plan_digest = hello.plan_digest;
    j.planned = planned.clone();
    j.durable = durable.clone();
    j
}

/// Marks `journal` complete for a `size_bytes` image: every byte durable,
/// no plan left, and `record` (if any) with the target's `stamp` on record.
pub fn record_completion(
    journal: &mut Journal,
    record: Option<&SyncRecord>,
    stamp: Option<TargetStamp>,
) {
    journal.complete = true;
    journal.durable = RangeSet::new();
    journal.durable.insert(0, journal.size_bytes);
    journal.base_sync_id = None;
    journal.plan_digest = [0; 32];
    journal.planned = RangeSet::new();
    if let Some(record) = record {
        journal.last_sync_id = Some(record.sync_id);
        journal.change_id = record.change_id.clone();
        journal.target_stamp = stamp;
    }
}

/// The ERROR a refused decision gets.
pub fn refusal_for(reason: RefuseReason, message: String) -> Refusal {
    let code = match reason {
        RefuseReason::TargetMismatch => ErrorCode::JournalDamaged,
        RefuseReason::SizeMismatch | RefuseReason::SourceIdentityMismatch => {
            ErrorCode::SourceMismatch
        }
        RefuseReason::BaseMismatch => ErrorCode::BaseMismatch,
        RefuseReason::PlanTooLarge => ErrorCode::BadRequest,
    };
    Refusal::new(code, message)
}

/// Checks an incremental's PLAN against its HELLO's plan digest.
pub fn check_plan(hello: &Hello, plan: &[ByteRange]) -> Result<(), Refusal> {
    if crate::wire::plan_digest(plan) == hello.plan_digest {
        return Ok(());
    }
    Err(Refusal::new(
        ErrorCode::Protocol,
        "the PLAN does not match the plan digest of its HELLO: refusing the pass, nothing was \
         written",
    ))
}

pub fn wire_ranges(set: &RangeSet) -> Vec<ByteRange> {
    set.iter()
        .map(|(offset, len_bytes)| ByteRange { offset, len_bytes })
        .collect()
}
