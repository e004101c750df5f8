//! What a job's first HELLO gets, given the journal found for its target.
//! Sans-IO: the caller loads the journal and turns a damaged one
//! ([`super::JournalError::is_damaged`]) into a refusal unless the sender
//! asked to restart.

use super::codec::Journal;
use super::ranges::RangeSet;

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
}

/// Why a resume was refused. All map to the wire's `SOURCE_MISMATCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The journal at this target's path names another target (a foreign or
    /// forged file): never let it steer writes into this target.
    TargetMismatch,
    /// The source has another size than the one the journal was built from.
    SizeMismatch,
    /// Same size, but another source identity (generation or digest).
    SourceIdentityMismatch,
}

/// What to do with a job, given its journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No journal, or a restart: copy everything; start a new journal.
    Fresh,
    /// Send only what is not in `durable`.
    Resume {
        /// What the target already holds.
        durable: RangeSet,
    },
    /// Every byte is durable and the job finished: nothing to do.
    AlreadyComplete,
    /// Do not write; `message` tells the operator what to do.
    Refuse {
        /// Why.
        reason: RefuseReason,
        /// What to tell the operator.
        message: String,
    },
}

/// Decides between a fresh copy, a resume, nothing to do, and a refusal.
pub fn decide(existing: Option<&Journal>, request: &ResumeRequest) -> Decision {
    if request.restart {
        return Decision::Fresh;
    }
    let Some(journal) = existing else {
        return Decision::Fresh;
    };
    let target = &request.target_name;
    let refuse = |reason, what: String| Decision::Refuse {
        reason,
        message: format!(
            "refusing to resume target {target:?}: {what}; rerun with --restart to start a \
             clean full copy"
        ),
    };
    if journal.target_name != *target {
        return refuse(
            RefuseReason::TargetMismatch,
            format!(
                "its journal belongs to target {:?} (a foreign or damaged journal file)",
                journal.target_name
            ),
        );
    }
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
        return Decision::AlreadyComplete;
    }
    Decision::Resume {
        durable: journal.durable.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(complete: bool) -> Journal {
        let mut j = Journal::new(
            "vm1",
            "/dev/vg/vm1",
            "size=1000;gen=7",
            1000,
            64,
            [1; 16],
            5,
        );
        if complete {
            j.durable.insert(0, 1000);
            j.complete = true;
        } else {
            j.durable.insert(0, 100);
            j.durable.insert(500, 50);
        }
        j
    }

    fn request() -> ResumeRequest {
        ResumeRequest {
            target_name: "vm1".into(),
            source_identity: "size=1000;gen=7".into(),
            size_bytes: 1000,
            chunk_size_bytes: 64,
            restart: false,
        }
    }

    fn reason(d: &Decision) -> Option<RefuseReason> {
        match d {
            Decision::Refuse { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    #[test]
    fn table() {
        let partial = journal(false);
        let done = journal(true);
        let other_size = ResumeRequest {
            size_bytes: 2000,
            ..request()
        };
        let other_source = ResumeRequest {
            source_identity: "size=1000;gen=8".into(),
            ..request()
        };
        let other_target = ResumeRequest {
            target_name: "vm2".into(),
            ..request()
        };
        let other_chunk = ResumeRequest {
            chunk_size_bytes: 4096,
            ..request()
        };
        let restart = |r: ResumeRequest| ResumeRequest { restart: true, ..r };
        let resume = Decision::Resume {
            durable: partial.durable.clone(),
        };

        assert_eq!(decide(None, &request()), Decision::Fresh);
        assert_eq!(decide(None, &restart(request())), Decision::Fresh);
        assert_eq!(decide(Some(&partial), &request()), resume);
        assert_eq!(decide(Some(&partial), &other_chunk), resume);
        assert_eq!(decide(Some(&done), &request()), Decision::AlreadyComplete);
        assert_eq!(decide(Some(&done), &restart(request())), Decision::Fresh);
        for j in [&partial, &done] {
            let size = decide(Some(j), &other_size);
            assert_eq!(reason(&size), Some(RefuseReason::SizeMismatch));
            let source = decide(Some(j), &other_source);
            assert_eq!(reason(&source), Some(RefuseReason::SourceIdentityMismatch));
            let target = decide(Some(j), &other_target);
            assert_eq!(reason(&target), Some(RefuseReason::TargetMismatch));
            for r in [
                other_size.clone(),
                other_source.clone(),
                other_target.clone(),
            ] {
                assert_eq!(decide(Some(j), &restart(r)), Decision::Fresh);
            }
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let other_size = ResumeRequest {
            size_bytes: 2000,
            ..request()
        };
        let Decision::Refuse { message, .. } = decide(Some(&journal(false)), &other_size) else {
            panic!("a source of another size must be refused");
        };
        assert!(
            message.contains("2000") && message.contains("1000"),
            "{message}"
        );
        assert!(
            message.contains("--restart") && message.contains("\"vm1\""),
            "{message}"
        );
    }
}
