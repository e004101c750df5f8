//! A delta pass's DIGEST_REQUEST at the stream level: read, answered, and
//! the compared range counted written only at the next BARRIER or DONE.

use super::*;
use crate::wire::{ErrorCode, PassMode};

/// Attached to a delta pass, WELCOME sent.
fn delta_rig() -> Rig {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(Hello {
        mode: PassMode::Delta,
        ..hello()
    }));
    assert!(matches!(rig.next(), Some(Action::Attach(_))));
    rig.done(ActionResult::Attached(Box::new(JobInfo {
        mode: PassMode::Delta,
        ..job_info()
    })));
    assert!(matches!(rig.next(), Some(Action::Send(Frame::Welcome(_)))));
    rig.done(ActionResult::Sent(Ok(())));
    assert!(!rig.s.is_busy());
    rig
}

fn digest_request(offset: u64, len_bytes: u32) -> Frame {
    Frame::DigestRequest {
        offset,
        len_bytes,
        block_bytes: 4096,
    }
}

/// Asks for `[offset, offset + len)` and answers the read with flush
/// number `sync_point`; the DIGESTS frame sent.
fn ask(rig: &mut Rig, offset: u64, len: u32, sync_point: u64) -> Frame {
    rig.frame(digest_request(offset, len));
    let Some(Action::ReadDigests {
        offset: o,
        len_bytes,
        block_bytes,
    }) = rig.next()
    else {
        panic!("no read");
    };
    assert_eq!((o, len_bytes, block_bytes), (offset, len, 4096));
    let blocks = len.div_ceil(4096) as usize;
    rig.done(ActionResult::Digests(Ok((
        vec![[5; 16]; blocks],
        sync_point,
    ))));
    let Some(Action::Send(frame)) = rig.next() else {
        panic!("no reply");
    };
    rig.done(ActionResult::Sent(Ok(())));
    assert!(!rig.s.is_busy());
    frame
}

fn durable_ranges(actions: &[Action]) -> Vec<(u64, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::MakeDurable { ranges, .. } => Some(ranges.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn a_digest_request_is_answered_and_its_range_counted_only_at_the_next_barrier() {
    let mut rig = delta_rig();
    let reply = ask(&mut rig, 8192, 10_000, 7);
    assert_eq!(
        reply,
        Frame::Digests {
            offset: 8192,
            block_bytes: 4096,
            digests: vec![[5; 16]; 3],
        }
    );
    rig.write(65536, 4096);
    rig.frame(Frame::Barrier { seq: 1 });
    let actions = rig.run(healthy);
    let flush = actions.iter().find_map(|a| match a {
        Action::Flush { sync_need } => Some(*sync_need),
        _ => None,
    });
    assert_eq!(flush, Some(7), "the flush covers what the digests read");
    assert_eq!(
        durable_ranges(&actions),
        vec![(8192, 10_000), (65536, 4096)]
    );
    let acked = actions.iter().find_map(|a| match a {
        Action::Send(Frame::Ack(ack)) => Some(ack.durable_added.clone()),
        _ => None,
    });
    assert_eq!(acked.map(|r| r.len()), Some(2));
}

#[test]
fn a_stream_that_ends_after_digests_counts_none_of_their_ranges() {
    let mut rig = delta_rig();
    ask(&mut rig, 0, 65536, 3);
    rig.s.input(
        Input::Closed {
            is_mid_frame: false,
        },
        rig.now,
    );
    let actions = rig.run(healthy);
    assert!(durable_ranges(&actions).is_empty(), "{actions:?}");
    assert!(matches!(closed_with(&actions), Some(End::PeerClosed)));
}

#[test]
fn done_counts_the_ranges_compared_before_it() {
    let mut rig = delta_rig();
    ask(&mut rig, 0, 4096, 2);
    rig.frame(Frame::Done {
        total_bytes_sent: 0,
        frames: 2,
    });
    let actions = rig.run(healthy);
    assert_eq!(durable_ranges(&actions), vec![(0, 4096)]);
    assert!(actions.iter().any(|a| matches!(a, Action::FinishStream)));
}

#[test]
fn digest_requests_past_the_image_or_after_done_or_failing_to_read_are_refused() {
    let mut rig = delta_rig();
    rig.frame(digest_request(SIZE - 4096, 8192));
    let sent = errors(&rig.run(healthy));
    assert_eq!(sent[0].code, ErrorCode::BadRequest, "{:?}", sent[0]);
    assert!(
        sent[0].message.contains("past the end"),
        "{}",
        sent[0].message
    );

    let mut rig = delta_rig();
    rig.frame(Frame::Done {
        total_bytes_sent: 0,
        frames: 1,
    });
    rig.run(healthy);
    rig.frame(digest_request(0, 4096));
    let sent = errors(&rig.run(healthy));
    assert_eq!(sent[0].code, ErrorCode::Protocol, "{:?}", sent[0]);

    let mut rig = delta_rig();
    rig.frame(digest_request(0, 4096));
    assert!(matches!(rig.next(), Some(Action::ReadDigests { .. })));
    rig.done(ActionResult::Digests(Err(
        super::super::super::digests::DigestReadError::Io(eio()),
    )));
    let actions = rig.run(healthy);
    let sent = errors(&actions);
    assert_eq!(sent[0].code, ErrorCode::TargetIo, "{:?}", sent[0]);
    assert!(durable_ranges(&actions).is_empty());
}
