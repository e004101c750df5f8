//! DONE, VERIFY_REQUEST, timeouts and how a stream ends.

use super::*;
use crate::replicate::receive::job::Refusal;
use crate::replicate::receive::limits::HELLO_TIMEOUT_MS;
use crate::replicate::receive::timers::IDLE_TIMEOUT_MS;
use crate::wire::ErrorCode;
use std::time::Duration;

#[test]
fn verify_before_done_is_refused() {
    let mut rig = Rig::attached();
    rig.frame(Frame::VerifyRequest {
        window_bytes: 1 << 20,
    });
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::ReadBack { .. })));
    assert_eq!(errors(&actions)[0].code, ErrorCode::Protocol);
}

#[test]
fn done_then_one_verify_pass_per_stream() {
    let mut rig = Rig::attached();
    rig.write(0, 4096);
    rig.frame(Frame::Done {
        total_bytes_sent: 4096,
        frames: 2,
    });
    let actions = rig.run(healthy);
    // What the stream wrote is flushed and counted before it finishes.
    assert!(matches!(actions[0], Action::Flush { .. }));
    assert!(matches!(actions[1], Action::MakeDurable { .. }));
    assert!(matches!(actions[2], Action::FinishStream));
    assert_eq!(actions.len(), 3);
    rig.frame(Frame::VerifyRequest { window_bytes: 4096 });
    let actions = rig.run(healthy);
    assert!(matches!(
        actions[0],
        Action::ReadBack { window_bytes: 4096 }
    ));
    assert!(matches!(
        actions[1],
        Action::Send(Frame::VerifyResult {
            bytes_read: SIZE,
            ..
        })
    ));
    rig.frame(Frame::VerifyRequest { window_bytes: 4096 });
    assert_eq!(errors(&rig.run(healthy))[0].code, ErrorCode::Protocol);
}

#[test]
fn done_with_the_wrong_byte_count_is_refused() {
    let mut rig = Rig::attached();
    rig.write(0, 4096);
    rig.frame(Frame::Done {
        total_bytes_sent: 4095,
        frames: 2,
    });
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::FinishStream)));
    let sent = errors(&actions);
    assert_eq!(sent[0].code, ErrorCode::Protocol);
    assert!(sent[0].message.contains("4095"), "{}", sent[0].message);
}

#[test]
fn a_stop_flushes_counts_and_tells_the_sender() {
    let mut rig = Rig::attached();
    rig.write(0, 4096);
    rig.s.input(Input::Stop, rig.now);
    let actions = rig.run(healthy);
    assert!(matches!(actions[0], Action::Flush { .. }));
    assert!(matches!(actions[1], Action::MakeDurable { .. }));
    assert!(matches!(actions[2], Action::SyncForStop));
    let sent = errors(&actions);
    assert_eq!(sent[0].code, ErrorCode::Cancelled);
    assert!(sent[0].message.contains("durable"), "{}", sent[0].message);
    assert_eq!(closed_with(&actions), Some(&End::Stopped));
}

#[test]
fn timeouts_come_from_the_time_passed_in() {
    let mut rig = Rig::new(1 << 20);
    rig.now = rig.t0 + Duration::from_millis(HELLO_TIMEOUT_MS - 1);
    rig.s.input(Input::Received, rig.now);
    assert!(rig.next().is_none());
    rig.now = rig.t0 + Duration::from_millis(HELLO_TIMEOUT_MS + 1);
    rig.s.input(Input::Idle(Health::Ok), rig.now);
    assert_eq!(errors(&rig.run(healthy))[0].code, ErrorCode::Timeout);

    let mut rig = Rig::attached();
    rig.now = rig.t0 + Duration::from_millis(IDLE_TIMEOUT_MS - 1);
    rig.s.input(Input::Idle(Health::Ok), rig.now);
    assert!(rig.next().is_none());
    rig.now = rig.t0 + Duration::from_millis(IDLE_TIMEOUT_MS + 1);
    rig.s.input(Input::Idle(Health::Ok), rig.now);
    let sent = errors(&rig.run(healthy));
    assert!(sent[0].message.contains("PING"), "{}", sent[0].message);
}

#[test]
fn a_failed_job_or_a_newer_connection_ends_the_stream() {
    let mut rig = Rig::attached();
    let failure = Refusal::new(ErrorCode::TargetIo, "another stream failed");
    rig.s.input(
        Input::Frame(Frame::Ping { nonce: 1 }, Health::Failed(failure.clone())),
        rig.now,
    );
    let actions = rig.run(healthy);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Send(Frame::Pong { .. })))
    );
    assert_eq!(closed_with(&actions), Some(&End::Refuse(failure)));

    let mut rig = Rig::attached();
    rig.s.input(Input::Idle(Health::TakenOver), rig.now);
    let actions = rig.run(healthy);
    assert!(
        errors(&actions).is_empty(),
        "nothing is sent on a connection taken over"
    );
    assert!(matches!(closed_with(&actions), Some(End::Lost(_))));
}

#[test]
fn ping_is_answered_and_a_cut_mid_frame_is_a_lost_connection() {
    let mut rig = Rig::attached();
    rig.frame(Frame::Ping { nonce: 77 });
    assert!(matches!(
        rig.run(healthy)[..],
        [Action::Send(Frame::Pong { nonce: 77 })]
    ));
    rig.s.input(Input::Closed { is_mid_frame: true }, rig.now);
    assert!(matches!(closed_with(&rig.run(healthy)), Some(End::Lost(_))));
}
