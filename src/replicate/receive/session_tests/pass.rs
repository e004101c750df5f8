//! Protocol v2 at the stream level: the WELCOME's sync id and replan, and
//! the frames of pass modes this receiver does not run yet.

use super::*;
use crate::wire::{ErrorCode, PassMode};

#[test]
fn welcome_carries_the_hellos_sync_id_and_no_replan_for_a_full_pass() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(hello()));
    assert!(matches!(rig.next(), Some(Action::Attach(_))));
    rig.done(ActionResult::Attached(Box::new(job_info())));
    let Some(Action::Send(Frame::Welcome(w))) = rig.next() else {
        panic!("no WELCOME");
    };
    assert_eq!(w.sync_id, hello().sync_id);
    assert!(w.replan.is_empty());
}

#[test]
fn incremental_and_delta_hellos_are_refused_before_any_attach() {
    for mode in [PassMode::Incremental, PassMode::Delta] {
        let mut rig = Rig::new(1 << 20);
        let mut h = hello();
        h.mode = mode;
        if mode == PassMode::Incremental {
            h.base_sync_id = [9; 16];
            h.plan_digest = crate::wire::plan_digest(&[]);
        }
        rig.frame(Frame::Hello(h));
        let actions = rig.run(healthy);
        assert!(!actions.iter().any(|a| matches!(a, Action::Attach(_))));
        let sent = errors(&actions);
        assert_eq!(sent[0].code, ErrorCode::BadRequest, "{mode}");
        assert!(
            sent[0].message.contains(&mode.to_string()),
            "{}",
            sent[0].message
        );
    }
}

#[test]
fn plan_and_digest_request_are_protocol_errors_and_write_nothing() {
    let frames = [
        Frame::Plan(vec![]),
        Frame::DigestRequest {
            offset: 0,
            len_bytes: 4096,
            block_bytes: 4096,
        },
    ];
    for frame in frames {
        let name = frame.frame_type().name();
        let mut rig = Rig::attached();
        rig.frame(frame);
        let actions = rig.run(healthy);
        assert!(!actions.iter().any(|a| matches!(a, Action::Write { .. })));
        assert_eq!(errors(&actions)[0].code, ErrorCode::Protocol, "{name}");
        assert!(errors(&actions)[0].message.contains(name));
    }
}
