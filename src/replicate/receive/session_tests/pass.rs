//! Protocol v2 at the stream level: PLAN after an incremental HELLO, the
//! WELCOME's sync id and replan, writes confined to the planned ranges,
//! and DIGEST_REQUEST on delta passes only.

use std::sync::Arc;

use super::*;
use crate::journal::RangeSet;
use crate::wire::{ErrorCode, PassMode, plan_digest};

fn plan() -> Vec<ByteRange> {
    vec![
        ByteRange {
            offset: 0,
            len_bytes: 8192,
        },
        ByteRange {
            offset: 65536,
            len_bytes: 4096,
        },
    ]
}

fn incremental_hello(plan: &[ByteRange]) -> Hello {
    Hello {
        mode: PassMode::Incremental,
        base_sync_id: [9; 16],
        plan_digest: plan_digest(plan),
        ..hello()
    }
}

fn incremental_job() -> JobInfo {
    let planned: RangeSet = plan().iter().map(|r| (r.offset, r.len_bytes)).collect();
    JobInfo {
        mode: PassMode::Incremental,
        durable: vec![],
        replan: vec![ByteRange {
            offset: 1 << 19,
            len_bytes: 4096,
        }],
        planned: Some(Arc::new(planned)),
        ..job_info()
    }
}

/// An incremental stream attached with `incremental_job`, WELCOME sent.
fn attached_incremental() -> Rig {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(incremental_hello(&plan())));
    rig.frame(Frame::Plan(plan()));
    assert!(matches!(rig.next(), Some(Action::Attach(_))));
    rig.done(ActionResult::Attached(Box::new(incremental_job())));
    assert!(matches!(rig.next(), Some(Action::Send(Frame::Welcome(_)))));
    rig.done(ActionResult::Sent(Ok(())));
    rig
}

#[test]
fn welcome_carries_the_jobs_sync_id_and_replan() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(incremental_hello(&plan())));
    assert!(rig.next().is_none(), "no attach before the PLAN");
    rig.frame(Frame::Plan(plan()));
    let Some(Action::Attach(request)) = rig.next() else {
        panic!("the PLAN attaches");
    };
    assert_eq!(request.plan, plan());
    let job = JobInfo {
        sync_id: [0x77; 16],
        ..incremental_job()
    };
    rig.done(ActionResult::Attached(Box::new(job.clone())));
    let Some(Action::Send(Frame::Welcome(w))) = rig.next() else {
        panic!("no WELCOME");
    };
    assert_eq!(w.sync_id, [0x77; 16]);
    assert_eq!(w.replan, job.replan);
}

#[test]
fn a_plan_that_does_not_match_the_hellos_digest_is_refused_before_any_attach() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(incremental_hello(&plan())));
    let mut other = plan();
    other[1].len_bytes += 4096;
    rig.frame(Frame::Plan(other));
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Attach(_))));
    let sent = errors(&actions);
    assert_eq!(sent[0].code, ErrorCode::Protocol);
    assert!(
        sent[0].message.contains("plan digest"),
        "{}",
        sent[0].message
    );
}

#[test]
fn an_incremental_hello_needs_its_plan_next() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(incremental_hello(&plan())));
    rig.frame(data(0, &[1; 4096], true));
    let actions = rig.run(healthy);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Attach(_) | Action::Write { .. }))
    );
    assert_eq!(errors(&actions)[0].code, ErrorCode::Protocol);
}

#[test]
fn an_incremental_writes_only_planned_ranges() {
    let mut rig = attached_incremental();
    rig.frame(data(65536, &[3; 4096], true));
    assert!(matches!(
        rig.next(),
        Some(Action::Write { offset: 65536, .. })
    ));

    let mut rig = attached_incremental();
    rig.frame(data(4096, &[3; 8192], true));
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Write { .. })));
    let sent = errors(&actions);
    assert_eq!(sent[0].code, ErrorCode::BadRequest);
    assert!(sent[0].message.contains("planned"), "{}", sent[0].message);

    let mut rig = attached_incremental();
    rig.frame(Frame::Zero(ByteRange {
        offset: 32768,
        len_bytes: 4096,
    }));
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Zero { .. })));
}

#[test]
fn plan_outside_an_incremental_opening_is_a_protocol_error() {
    let mut rig = Rig::attached();
    rig.frame(Frame::Plan(vec![]));
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Write { .. })));
    assert_eq!(errors(&actions)[0].code, ErrorCode::Protocol);
    assert!(errors(&actions)[0].message.contains("PLAN"));
}

#[test]
fn digest_request_on_a_full_pass_is_a_protocol_error() {
    let mut rig = Rig::attached();
    rig.frame(Frame::DigestRequest {
        offset: 0,
        len_bytes: 4096,
        block_bytes: 4096,
    });
    let actions = rig.run(healthy);
    let sent = errors(&actions);
    assert_eq!(sent[0].code, ErrorCode::Protocol);
    assert!(sent[0].message.contains("delta"), "{}", sent[0].message);
}

#[test]
fn a_delta_hello_attaches_at_once_without_a_plan() {
    let mut rig = Rig::new(1 << 20);
    let h = Hello {
        mode: PassMode::Delta,
        ..hello()
    };
    rig.frame(Frame::Hello(h.clone()));
    let Some(Action::Attach(request)) = rig.next() else {
        panic!("a delta HELLO attaches");
    };
    assert_eq!(request.hello, h);
    assert!(request.plan.is_empty());
}
