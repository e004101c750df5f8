//! decide(): the table, case by case, for each pass mode.

use super::*;

pub(super) const BASE: SyncId = [0xba; 16];
const OTHER: SyncId = [0x0e; 16];
const STAMP: TargetStamp = TargetStamp {
    inode: 12,
    mtime_ns: 1_700_000_000_000_000_001,
    size_bytes: 1000,
};

fn ranges(list: &[(u64, u64)]) -> RangeSet {
    list.iter().copied().collect()
}

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

/// Sync `BASE` completed on a regular file stamped `STAMP`.
fn synced() -> Journal {
    let mut j = journal(true);
    j.last_sync_id = Some(BASE);
    j.change_id = "CHG-1".into();
    j.target_stamp = Some(STAMP);
    j
}

/// An incremental on `BASE` with `plan`, interrupted with `durable`.
pub(super) fn interrupted(plan: &[(u64, u64)], durable: &[(u64, u64)]) -> Journal {
    let mut j = synced();
    j.complete = false;
    j.pass_mode = PassMode::Incremental;
    j.base_sync_id = Some(BASE);
    j.planned = ranges(plan);
    j.plan_digest = plan_digest_of(plan);
    j.durable = ranges(durable);
    j.source_identity = "size=1000;gen=8".into();
    j
}

fn plan_digest_of(plan: &[(u64, u64)]) -> [u8; 32] {
    let wire: Vec<_> = plan
        .iter()
        .map(|&(offset, len_bytes)| crate::wire::ByteRange { offset, len_bytes })
        .collect();
    crate::wire::plan_digest(&wire)
}

fn request() -> ResumeRequest {
    ResumeRequest {
        target_name: "vm1".into(),
        source_identity: "size=1000;gen=7".into(),
        size_bytes: 1000,
        chunk_size_bytes: 64,
        restart: false,
        mode: PassMode::Full,
        sync_id: [0x51; 16],
        base_sync_id: None,
        plan_digest: [0; 32],
        plan: RangeSet::new(),
        target_stamp: Some(STAMP),
    }
}

pub(super) fn incremental(base: SyncId, plan: &[(u64, u64)]) -> ResumeRequest {
    ResumeRequest {
        mode: PassMode::Incremental,
        base_sync_id: Some(base),
        plan_digest: plan_digest_of(plan),
        plan: ranges(plan),
        source_identity: "size=1000;gen=8".into(),
        ..request()
    }
}

fn delta() -> ResumeRequest {
    ResumeRequest {
        mode: PassMode::Delta,
        ..request()
    }
}

fn reason(d: &Decision) -> Option<RefuseReason> {
    match d {
        Decision::Refuse { reason, .. } => Some(*reason),
        _ => None,
    }
}

fn message(d: &Decision) -> &str {
    match d {
        Decision::Refuse { message, .. } => message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn full_table() {
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
    assert_eq!(
        decide(Some(&done), &request()),
        Decision::AlreadyComplete { last_sync_id: None }
    );
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
fn full_on_a_completed_sync_reports_its_id() {
    assert_eq!(
        decide(Some(&synced()), &request()),
        Decision::AlreadyComplete {
            last_sync_id: Some(BASE)
        }
    );
}

#[test]
fn full_resumes_an_interrupted_incremental_of_the_same_source_only() {
    let j = interrupted(&[(0, 100)], &[(0, 50)]);
    let same_source = ResumeRequest {
        source_identity: j.source_identity.clone(),
        ..request()
    };
    assert_eq!(
        decide(Some(&j), &same_source),
        Decision::Resume {
            durable: ranges(&[(0, 50)])
        }
    );
    let other = decide(Some(&j), &request());
    assert_eq!(reason(&other), Some(RefuseReason::SourceIdentityMismatch));
}

#[test]
fn full_refusals_say_what_to_do() {
    let other_size = ResumeRequest {
        size_bytes: 2000,
        ..request()
    };
    let d = decide(Some(&journal(false)), &other_size);
    let m = message(&d);
    assert!(m.contains("2000") && m.contains("1000"), "{m}");
    assert!(m.contains("--restart") && m.contains("\"vm1\""), "{m}");
}

#[test]
fn incremental_on_the_last_complete_sync_plans_exactly_its_plan() {
    let plan = [(0, 10), (300, 40)];
    assert_eq!(
        decide(Some(&synced()), &incremental(BASE, &plan)),
        Decision::Incremental {
            planned: ranges(&plan),
            durable: RangeSet::new(),
            replan: RangeSet::new(),
        }
    );
    // A device target has no stamp: nothing to compare.
    let mut device = synced();
    device.target_stamp = None;
    let no_stamp = ResumeRequest {
        target_stamp: None,
        ..incremental(BASE, &plan)
    };
    assert!(matches!(
        decide(Some(&device), &no_stamp),
        Decision::Incremental { .. }
    ));
}

#[test]
fn incremental_without_a_recorded_sync_is_a_base_mismatch() {
    let plan = [(0, 10)];
    let cases = [
        ("no journal", None),
        ("a v1 complete journal", Some(journal(true))),
        ("a full pass in progress", Some(journal(false))),
    ];
    for (name, j) in cases {
        let d = decide(j.as_ref(), &incremental(BASE, &plan));
        assert_eq!(reason(&d), Some(RefuseReason::BaseMismatch), "{name}");
        assert!(message(&d).contains("--delta"), "{name}: {}", message(&d));
    }
    // A full pass that started after the sync and did not complete.
    let mut overwritten = synced();
    overwritten.complete = false;
    let d = decide(Some(&overwritten), &incremental(BASE, &plan));
    assert_eq!(reason(&d), Some(RefuseReason::BaseMismatch));
}

#[test]
fn incremental_on_another_base_names_the_targets_last_sync() {
    let d = decide(Some(&synced()), &incremental(OTHER, &[(0, 10)]));
    assert_eq!(reason(&d), Some(RefuseReason::BaseMismatch));
    let m = message(&d);
    assert!(m.contains(&sync_id_hex(&BASE)), "{m}");
    assert!(m.contains("--delta") && m.contains("\"vm1\""), "{m}");
    assert!(!m.contains("/dev/vg"), "names no receiver path: {m}");
}

#[test]
fn incremental_on_a_changed_target_is_a_base_mismatch() {
    let plan = [(0, 10)];
    let touched = TargetStamp {
        mtime_ns: STAMP.mtime_ns + 1,
        ..STAMP
    };
    let replaced = TargetStamp { inode: 13, ..STAMP };
    let grown = TargetStamp {
        size_bytes: 2000,
        ..STAMP
    };
    for now in [Some(touched), Some(replaced), Some(grown), None] {
        let r = ResumeRequest {
            target_stamp: now,
            ..incremental(BASE, &plan)
        };
        let d = decide(Some(&synced()), &r);
        assert_eq!(reason(&d), Some(RefuseReason::BaseMismatch), "{now:?}");
        assert!(message(&d).contains(&sync_id_hex(&BASE)));
    }
    let other_size = ResumeRequest {
        size_bytes: 2000,
        ..incremental(BASE, &plan)
    };
    let d = decide(Some(&synced()), &other_size);
    assert_eq!(reason(&d), Some(RefuseReason::BaseMismatch));
}

#[test]
fn an_interrupted_incremental_resumes_with_the_same_plan_and_source() {
    let plan = [(0, 100), (400, 100)];
    let j = interrupted(&plan, &[(0, 100)]);
    // Its own writes moved the mtime: only inode and size must match.
    let moved = ResumeRequest {
        target_stamp: Some(TargetStamp {
            mtime_ns: STAMP.mtime_ns + 99,
            ..STAMP
        }),
        ..incremental(BASE, &plan)
    };
    assert_eq!(
        decide(Some(&j), &moved),
        Decision::Incremental {
            planned: ranges(&plan),
            durable: ranges(&[(0, 100)]),
            replan: RangeSet::new(),
        }
    );
    // The same plan from another source state resends everything.
    let other_source = ResumeRequest {
        source_identity: "size=1000;gen=9".into(),
        ..incremental(BASE, &plan)
    };
    let Decision::Incremental { durable, .. } = decide(Some(&j), &other_source) else {
        panic!("same base: an incremental");
    };
    assert!(durable.is_empty());
}

#[test]
fn another_plan_on_the_same_base_widens_to_the_union_and_replans_the_rest() {
    let old = [(0, 100), (400, 100)];
    let new = [(50, 100), (700, 10)];
    let j = interrupted(&old, &[(0, 100)]);
    assert_eq!(
        decide(Some(&j), &incremental(BASE, &new)),
        Decision::Incremental {
            planned: ranges(&[(0, 150), (400, 100), (700, 10)]),
            durable: RangeSet::new(),
            replan: ranges(&[(0, 50), (400, 100)]),
        }
    );
    // Resuming the widened pass with its own plan keeps the replan.
    let mut widened = j.clone();
    widened.planned = ranges(&[(0, 150), (400, 100), (700, 10)]);
    widened.plan_digest = plan_digest_of(&new);
    widened.durable = ranges(&[(700, 10)]);
    assert_eq!(
        decide(Some(&widened), &incremental(BASE, &new)),
        Decision::Incremental {
            planned: widened.planned.clone(),
            durable: ranges(&[(700, 10)]),
            replan: ranges(&[(0, 50), (400, 100)]),
        }
    );
    // On another base it is refused whatever was planned.
    let d = decide(Some(&j), &incremental(OTHER, &new));
    assert_eq!(reason(&d), Some(RefuseReason::BaseMismatch));
}

#[test]
fn a_union_beyond_the_journal_bound_is_refused() {
    let mut j = interrupted(&[], &[]);
    j.size_bytes = 1 << 40;
    j.planned = (0..MAX_RANGES_HARD as u64).map(|i| (i * 4, 2)).collect();
    let r = ResumeRequest {
        size_bytes: 1 << 40,
        ..incremental(BASE, &[(1 << 39, 2)])
    };
    assert_eq!(
        reason(&decide(Some(&j), &r)),
        Some(RefuseReason::PlanTooLarge)
    );
}

#[test]
fn delta_resumes_only_its_own_interrupted_pass_and_never_refuses_a_mismatch() {
    let mut running = journal(false);
    running.pass_mode = PassMode::Delta;
    assert_eq!(
        decide(Some(&running), &delta()),
        Decision::Delta {
            durable: running.durable.clone()
        }
    );
    let fresh = Decision::Delta {
        durable: RangeSet::new(),
    };
    let other_source = ResumeRequest {
        source_identity: "size=1000;gen=8".into(),
        ..delta()
    };
    let other_size = ResumeRequest {
        size_bytes: 4000,
        ..delta()
    };
    let restart = ResumeRequest {
        restart: true,
        ..delta()
    };
    assert_eq!(decide(None, &delta()), fresh);
    assert_eq!(decide(Some(&running), &other_source), fresh);
    assert_eq!(decide(Some(&running), &other_size), fresh);
    assert_eq!(decide(Some(&running), &restart), fresh);
    assert_eq!(
        decide(Some(&journal(false)), &delta()),
        fresh,
        "a full in progress"
    );
    assert_eq!(decide(Some(&synced()), &delta()), fresh, "complete");
    let j = interrupted(&[(0, 100)], &[(0, 100)]);
    assert_eq!(
        decide(Some(&j), &delta()),
        fresh,
        "an incremental in progress"
    );
    let other_target = ResumeRequest {
        target_name: "vm2".into(),
        ..delta()
    };
    assert_eq!(
        reason(&decide(Some(&running), &other_target)),
        Some(RefuseReason::TargetMismatch)
    );
    let restart_other_target = ResumeRequest {
        restart: true,
        ..other_target
    };
    assert_eq!(decide(Some(&running), &restart_other_target), fresh);
    let foreign = ResumeRequest {
        target_name: "vm2".into(),
        restart: true,
        ..incremental(BASE, &[(0, 10)])
    };
    assert_eq!(
        reason(&decide(Some(&synced()), &foreign)),
        Some(RefuseReason::TargetMismatch),
        "an incremental never trusts a foreign journal"
    );
}

#[test]
fn a_reconnect_after_its_own_sync_completed_is_already_complete_in_every_mode() {
    let plan = [(0, 10)];
    let done = synced();
    for mode_request in [
        ResumeRequest {
            sync_id: BASE,
            ..incremental(OTHER, &plan)
        },
        ResumeRequest {
            sync_id: BASE,
            ..delta()
        },
        ResumeRequest {
            sync_id: BASE,
            source_identity: "another".into(),
            ..request()
        },
    ] {
        assert_eq!(
            decide(Some(&done), &mode_request),
            Decision::AlreadyComplete {
                last_sync_id: Some(BASE)
            },
            "{:?}",
            mode_request.mode
        );
    }
}

#[test]
fn subtract_cuts_every_way() {
    let a = ranges(&[(0, 100), (200, 100), (400, 10)]);
    let b = ranges(&[(50, 10), (90, 150), (405, 100)]);
    assert_eq!(
        subtract(&a, &b),
        ranges(&[(0, 50), (60, 30), (240, 60), (400, 5)])
    );
    assert_eq!(subtract(&a, &RangeSet::new()), a);
    assert!(subtract(&a, &a).is_empty());
    assert!(subtract(&RangeSet::new(), &a).is_empty());
}
