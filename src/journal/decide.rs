//! What a job's first HELLO gets, given the journal found for its target.
//! Sans-IO: the caller loads the journal (and turns a damaged one,
//! [`super::JournalError::is_damaged`], into a refusal unless the sender
//! asked to restart), reads the target's stamp, and carries the decision
//! out: it journals the pass before it writes anything.
//!
//! | pass | journal | outcome |
//! |---|---|---|
//! | full | none, or RESTART | [`Decision::Fresh`] |
//! | full | same target, size and identity, in progress | [`Decision::Resume`] its durable ranges |
//! | full | same, complete | [`Decision::AlreadyComplete`] with the recorded sync id |
//! | any | complete, and its last sync is this HELLO's sync id | [`Decision::AlreadyComplete`] (a reconnect after completion) |
//! | full | another size or identity | refused (`SOURCE_MISMATCH`) |
//! | incremental | complete, last sync = base, target unchanged | [`Decision::Incremental`]: planned = plan, nothing durable |
//! | incremental | in progress on the same base, same plan and source | resume: its durable ranges |
//! | incremental | in progress on the same base, another plan | planned := old ∪ new, nothing durable, replan = old ∖ new |
//! | incremental | none, no last sync, another base, another size, target changed | refused (`BASE_MISMATCH`) |
//! | delta | in progress delta of the same source | [`Decision::Delta`] with its durable ranges |
//! | delta | anything else (none, RESTART, complete, another pass) | [`Decision::Delta`], nothing durable |
//!
//! A journal naming another target is refused in every mode (unless a full
//! or delta pass asks to RESTART, which discards it).

use super::codec::{Journal, MAX_RANGES_HARD, TargetStamp};
use super::ranges::RangeSet;
use crate::wire::{PassMode, SyncId, sync_id_hex};

/// The job as the sender describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    /// The target name from HELLO.
    pub target_name: String,
    /// The sender's identity of the source.
    pub source_identity: String,
    /// The source's size.
    pub size_bytes: u64,
    /// Not compared: ranges are in bytes, so a resume may change it.
    pub chunk_size_bytes: u32,
    /// The sender asked to discard any journal (wire flag `RESTART`).
    pub restart: bool,
    /// What the pass does.
    pub mode: PassMode,
    /// The send run's sync id: a target that completed this very sync is
    /// already complete, whatever the pass.
    pub sync_id: SyncId,
    /// Incremental: the sync the changes are relative to.
    pub base_sync_id: Option<SyncId>,
    /// Incremental: the digest of `plan` (checked against the PLAN frame).
    pub plan_digest: [u8; 32],
    /// Incremental: the pass's changed set.
    pub plan: RangeSet,
    /// The target's stamp now if it is a regular file, else `None`.
    pub target_stamp: Option<TargetStamp>,
}

/// Why a job was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The journal at this target's path names another target (a foreign or
    /// forged file): never let it steer writes into this target.
    TargetMismatch,
    /// The source has another size than the one the journal was built from.
    SizeMismatch,
    /// Same size, but another source identity (generation or digest).
    SourceIdentityMismatch,
    /// An incremental pass whose base is not the target's last complete
    /// sync, or whose target changed since (wire `BASE_MISMATCH`).
    BaseMismatch,
    /// An interrupted incremental's plan and this one together have more
    /// ranges than a journal holds.
    PlanTooLarge,
}

/// What to do with a job, given its journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Full pass, no journal or a restart: copy everything; start a new
    /// journal.
    Fresh,
    /// Full pass: send only what is not in `durable`.
    Resume {
        /// What the target already holds.
        durable: RangeSet,
    },
    /// Full pass, every byte is durable and the job finished: nothing to
    /// do.
    AlreadyComplete {
        /// The sync id recorded when it completed (none in v1 journals).
        last_sync_id: Option<SyncId>,
    },
    /// Incremental pass on the target's last sync: journal `planned`
    /// before any write; the pass completes when `planned` is durable.
    Incremental {
        /// What the pass (with any interrupted pass before it) changes.
        planned: RangeSet,
        /// What is durable of it already.
        durable: RangeSet,
        /// Planned ranges the sender's plan does not list (WELCOME
        /// `replan`).
        replan: RangeSet,
    },
    /// Delta pass: the target is opened as it is; `durable` is what an
    /// interrupted delta of the same source made durable (empty for a new
    /// pass).
    Delta {
        /// What the target already holds.
        durable: RangeSet,
    },
    /// Do not write; `message` tells the operator what to do.
    Refuse {
        /// Why.
        reason: RefuseReason,
        /// What to tell the operator.
        message: String,
    },
}

/// Decides what a job's first HELLO gets (the table in the module doc).
pub fn decide(existing: Option<&Journal>, request: &ResumeRequest) -> Decision {
    // RESTART discards the journal of a full or delta pass, whatever it
    // says; an incremental cannot do without it.
    let is_discarded = request.restart && request.mode != PassMode::Incremental;
    if let Some(journal) = existing
        && journal.target_name != request.target_name
        && !is_discarded
    {
        return Decision::Refuse {
            reason: RefuseReason::TargetMismatch,
            message: format!(
                "refusing to resume target {:?}: its journal belongs to target {:?} (a foreign or \
                 damaged journal file); rerun with --restart to start a clean full copy",
                request.target_name, journal.target_name
            ),
        };
    }
    if let Some(journal) = existing
        && journal.complete
        && journal.last_sync_id == Some(request.sync_id)
        && journal.size_bytes == request.size_bytes
        && !request.restart
    {
        // A sender reconnecting after its job completed (its DONE was
        // taken, the answer lost): nothing to do, the same id to report.
        return Decision::AlreadyComplete {
            last_sync_id: journal.last_sync_id,
        };
    }
    match request.mode {
        PassMode::Full => decide_full(existing, request),
        PassMode::Incremental => decide_incremental(existing, request),
        PassMode::Delta => decide_delta(existing, request),
    }
}

fn decide_full(existing: Option<&Journal>, request: &ResumeRequest) -> Decision {
    let Some(journal) = existing.filter(|_| !request.restart) else {
        return Decision::Fresh;
    };
    let refuse = |reason, what: String| Decision::Refuse {
        reason,
        message: format!(
            "refusing to resume target {:?}: {what}; rerun with --restart to start a clean full \
             copy",
            request.target_name
        ),
    };
    if journal.size_bytes != request.size_bytes {
        return refuse(
            RefuseReason::SizeMismatch,
            format!(
                "the source is {} bytes but the journal was built from a source of {} bytes",
                request.size_bytes, journal.size_bytes
            ),
        );
    }
    if journal.source_identity != request.source_identity {
        return refuse(
            RefuseReason::SourceIdentityMismatch,
            format!(
                "the source identity is {:?} but the journal was built from {:?} \
                 (the source changed or another source is sent to this target)",
                request.source_identity, journal.source_identity
            ),
        );
    }
    if journal.complete {
        return Decision::AlreadyComplete {
            last_sync_id: journal.last_sync_id,
        };
    }
    Decision::Resume {
        durable: journal.durable.clone(),
    }
}

fn decide_incremental(existing: Option<&Journal>, request: &ResumeRequest) -> Decision {
    let base = request.base_sync_id.unwrap_or_default();
    let refuse = |what: String| Decision::Refuse {
        reason: RefuseReason::BaseMismatch,
        message: format!(
            "refusing the incremental pass on base {} to target {:?}: {what}; nothing was \
             written. Send a --delta pass instead (it compares the target block by block)",
            sync_id_hex(&base),
            request.target_name
        ),
    };
    let Some(journal) = existing else {
        return refuse("the target has no record of a complete sync".into());
    };
    let Some(last) = journal.last_sync_id else {
        return refuse(
            "the target has no complete sync on record (its last pass did not complete, or an \
             older diskferry wrote it)"
                .into(),
        );
    };
    if last != base {
        return refuse(format!(
            "the target's last complete sync is {}, not this base",
            sync_id_hex(&last)
        ));
    }
    if !journal.complete && journal.pass_mode != PassMode::Incremental {
        return refuse(format!(
            "a {} pass to the target after its sync {} did not complete",
            journal.pass_mode,
            sync_id_hex(&last)
        ));
    }
    if journal.size_bytes != request.size_bytes {
        return refuse(format!(
            "the source is {} bytes but the target's last sync {} was of {} bytes",
            request.size_bytes,
            sync_id_hex(&last),
            journal.size_bytes
        ));
    }
    let is_unchanged = match (journal.target_stamp, request.target_stamp) {
        (None, _) => true,
        (Some(_), None) => false,
        // An incremental in progress wrote to the target itself: only the
        // file (inode) and its size must be the same.
        (Some(then), Some(now)) if !journal.complete => {
            then.inode == now.inode && then.size_bytes == now.size_bytes
        }
        (Some(then), Some(now)) => then == now,
    };
    if !is_unchanged {
        return refuse(format!(
            "the target's last complete sync is {}, but the target file changed since (another \
             file, size or modification time)",
            sync_id_hex(&last)
        ));
    }
    if journal.complete {
        return Decision::Incremental {
            planned: request.plan.clone(),
            durable: RangeSet::new(),
            replan: RangeSet::new(),
        };
    }
    widen(journal, request)
}

/// An incremental on the base of an interrupted one: everything either
/// plan names must be sent; what the interrupted pass made durable counts
/// only if it was this very plan of this very source.
fn widen(journal: &Journal, request: &ResumeRequest) -> Decision {
    let mut planned = journal.planned.clone();
    planned.extend(request.plan.iter());
    if planned.len() > MAX_RANGES_HARD {
        return Decision::Refuse {
            reason: RefuseReason::PlanTooLarge,
            message: format!(
                "refusing the incremental pass to target {:?}: with the interrupted pass on the \
                 same base it changes {} separate ranges, more than the {MAX_RANGES_HARD} a \
                 journal holds; send a --delta pass instead",
                request.target_name,
                planned.len()
            ),
        };
    }
    let is_same_pass = !request.restart
        && journal.plan_digest == request.plan_digest
        && journal.source_identity == request.source_identity;
    let durable = if is_same_pass {
        journal.durable.clone()
    } else {
        RangeSet::new()
    };
    let replan = subtract(&planned, &request.plan);
    Decision::Incremental {
        planned,
        durable,
        replan,
    }
}

fn decide_delta(existing: Option<&Journal>, request: &ResumeRequest) -> Decision {
    let resumes = existing.is_some_and(|j| {
        !request.restart
            && !j.complete
            && j.pass_mode == PassMode::Delta
            && j.size_bytes == request.size_bytes
            && j.source_identity == request.source_identity
    });
    let durable = match existing {
        Some(j) if resumes => j.durable.clone(),
        _ => RangeSet::new(),
    };
    Decision::Delta { durable }
}

/// `a ∖ b`: the bytes of `a` not in `b`.
pub fn subtract(a: &RangeSet, b: &RangeSet) -> RangeSet {
    let mut out = RangeSet::new();
    let mut cuts = b.iter().peekable();
    for (offset, len_bytes) in a.iter() {
        let end = offset + len_bytes;
        let mut at = offset;
        while let Some(&(cut_at, cut_len)) = cuts.peek() {
            let cut_end = cut_at + cut_len;
            if cut_end <= at {
                cuts.next();
                continue;
            }
            if cut_at >= end {
                break;
            }
            if cut_at > at {
                out.insert(at, cut_at - at);
            }
            at = cut_end.min(end);
            if cut_end > end {
                break;
            }
            cuts.next();
        }
        if at < end {
            out.insert(at, end - at);
        }
    }
    out
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "decide_props.rs"]
mod props;
