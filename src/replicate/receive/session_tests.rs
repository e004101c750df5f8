//! The stream's state machine frame by frame, without sockets or files:
//! each test feeds frames and completions and checks the actions.

use std::io;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::wire::{ChunkDigest, DataHead, ErrorFrame, HelloFlags};

const SIZE: u64 = 1 << 20;
const CHUNK: u32 = 64 * 1024;

fn hello() -> Hello {
    Hello {
        job_id: [7; 16],
        size_bytes: SIZE,
        chunk_size_bytes: CHUNK,
        features: Features(Features::BLAKE3.0 | Features::LZ4.0),
        stream_index: 0,
        stream_count: 1,
        flags: HelloFlags::default(),
        target: "vm1/disk0.img".into(),
        source_identity: "test".into(),
    }
}

fn job_info() -> JobInfo {
    JobInfo {
        target_name: "vm1/disk0.img".into(),
        size_bytes: SIZE,
        chunk_size_bytes: CHUNK,
        stream_count: 1,
        checkpoint_interval: Duration::from_secs(3600),
        checkpoint_bytes: 1 << 40,
        instance: 42,
        durable: vec![ByteRange {
            offset: 0,
            len_bytes: 4096,
        }],
    }
}

/// A raw DATA frame of `raw` at `offset`, its BLAKE3 digest right or not.
fn data(offset: u64, raw: &[u8], is_digest_right: bool) -> Frame {
    let mut raw_digest = ChunkDigest::Blake3.digest(raw);
    if !is_digest_right {
        raw_digest[0] ^= 1;
    }
    Frame::Data(Data {
        head: DataHead {
            offset,
            raw_len_bytes: raw.len() as u32,
            codec: Codec::None,
            raw_digest,
        },
        payload: raw.to_vec(),
    })
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// A session with a clock of its own.
struct Rig {
    s: Session,
    t0: Instant,
    now: Instant,
}

impl Rig {
    fn new(max_ranges_per_job: usize) -> Self {
        let t0 = Instant::now();
        Rig {
            s: Session::new(max_ranges_per_job, t0),
            t0,
            now: t0,
        }
    }

    /// Attached, WELCOME sent.
    fn attached() -> Self {
        let mut rig = Rig::new(1 << 20);
        rig.frame(Frame::Hello(hello()));
        assert!(matches!(rig.next(), Some(Action::Attach(_))));
        rig.done(Completion::Attached(Box::new(job_info())));
        assert!(matches!(rig.next(), Some(Action::Send(Frame::Welcome(_)))));
        rig.done(Completion::Sent(Ok(())));
        assert!(!rig.s.is_busy());
        rig
    }

    fn frame(&mut self, frame: Frame) {
        self.s.input(Input::Frame(frame, Health::Ok), self.now);
    }

    fn next(&mut self) -> Option<Action> {
        self.s.poll_action()
    }

    fn done(&mut self, completion: Completion) {
        self.s.complete(completion, self.now);
    }

    /// Every action left, answering each that needs it with `answer`.
    fn run(&mut self, mut answer: impl FnMut(&Action) -> Completion) -> Vec<Action> {
        let mut seen = Vec::new();
        while let Some(action) = self.next() {
            let completion = action.needs_completion().then(|| answer(&action));
            seen.push(action);
            if let Some(c) = completion {
                self.done(c);
            }
        }
        seen
    }

    /// Writes `len` bytes at `offset` with flush number 1.
    fn write(&mut self, offset: u64, len: usize) {
        self.frame(data(offset, &vec![0xab; len], true));
        let Some(Action::Write { buf, .. }) = self.next() else {
            panic!("no write");
        };
        self.done(Completion::Written { buf, result: Ok(1) });
        assert!(matches!(self.next(), Some(Action::Recycle(_))));
        assert!(self.next().is_none());
    }
}

/// Answers every action as a healthy target would.
fn healthy(action: &Action) -> Completion {
    match action {
        Action::Write { buf, .. } => Completion::Written {
            buf: buf.clone(),
            result: Ok(1),
        },
        Action::Zero { .. } => Completion::Zeroed(Ok(1)),
        Action::Flush { .. } => Completion::Flushed(Ok(())),
        Action::MakeDurable { ranges, .. } => {
            Completion::MadeDurable(Ok(ranges.iter().map(|r| r.1).sum()))
        }
        Action::FinishStream => Completion::StreamFinished(Ok(())),
        Action::ReadBack { .. } => Completion::ReadBack(Ok(([3; 32], SIZE))),
        Action::SyncForStop => Completion::Synced(Ok(())),
        Action::Attach(_) => Completion::Attached(Box::new(job_info())),
        _ => Completion::Sent(Ok(())),
    }
}

/// The ERROR frames sent among `actions`.
fn errors(actions: &[Action]) -> Vec<ErrorFrame> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(Frame::Error(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn closed_with(actions: &[Action]) -> Option<&End> {
    match actions.last() {
        Some(Action::Close(end)) => Some(end),
        _ => None,
    }
}

#[test]
fn hello_is_answered_by_welcome_after_the_attach() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(hello()));
    let Some(Action::Attach(h)) = rig.next() else {
        panic!("HELLO must attach first");
    };
    assert_eq!(*h, hello());
    assert!(rig.next().is_none(), "nothing before the attach completed");
    rig.done(Completion::Attached(Box::new(job_info())));
    let Some(Action::Send(Frame::Welcome(w))) = rig.next() else {
        panic!("no WELCOME");
    };
    assert_eq!(w.features, Features(Features::BLAKE3.0 | Features::LZ4.0));
    assert_eq!((w.instance, w.durable), (42, job_info().durable));
}

#[test]
fn a_refused_attach_is_sent_as_error_and_closes() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(hello()));
    rig.next();
    let refusal = Refusal::new(ErrorCode::Busy, "target busy");
    rig.done(Completion::AttachRefused(refusal.clone()));
    let actions = rig.run(healthy);
    assert_eq!(errors(&actions)[0].code, ErrorCode::Busy);
    assert_eq!(closed_with(&actions), Some(&End::Refuse(refusal)));
}

#[test]
fn data_before_hello_is_refused_and_nothing_is_written() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(data(0, &[1; 4096], true));
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Write { .. })));
    let sent = errors(&actions);
    assert_eq!(sent[0].code, ErrorCode::BadRequest);
    assert!(
        sent[0].message.contains("must be HELLO"),
        "{}",
        sent[0].message
    );
    assert!(matches!(closed_with(&actions), Some(End::Refuse(_))));
}

#[test]
fn hello_without_blake3_is_refused_before_any_attach() {
    let mut rig = Rig::new(1 << 20);
    let mut h = hello();
    h.features = Features::LZ4;
    rig.frame(Frame::Hello(h));
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Attach(_))));
    assert_eq!(errors(&actions)[0].code, ErrorCode::BadRequest);
}

#[test]
fn a_matching_chunk_is_written_as_sent_and_its_buffer_recycled() {
    let mut rig = Rig::attached();
    let raw = vec![0x5a; 8192];
    rig.frame(data(4096, &raw, true));
    let Some(Action::Write { offset, buf }) = rig.next() else {
        panic!("no write");
    };
    assert_eq!((offset, &buf), (4096, &raw));
    rig.done(Completion::Written { buf, result: Ok(1) });
    assert!(matches!(rig.next(), Some(Action::Recycle(b)) if b == raw));
    assert!(
        rig.next().is_none(),
        "no flush before a barrier or a due settle"
    );
}

#[test]
fn a_digest_mismatch_fails_the_job_before_any_write() {
    let mut rig = Rig::attached();
    rig.frame(data(0, &[9; 4096], false));
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Write { .. })));
    let Some(Action::FailJob(failure)) = actions.first() else {
        panic!("the job must fail first: {actions:?}");
    };
    assert_eq!(failure.code, ErrorCode::DigestMismatch);
    assert_eq!(errors(&actions)[0].code, ErrorCode::DigestMismatch);
}

#[test]
fn a_compressed_chunk_is_checked_and_written_decompressed() {
    let mut rig = Rig::attached();
    let raw: Vec<u8> = (0..16384u32).map(|i| (i / 64) as u8).collect();
    let mut payload = Vec::new();
    crate::compress::compress(crate::compress::Codec::Lz4, 1, &raw, &mut payload).unwrap();
    let head = DataHead {
        offset: 0,
        raw_len_bytes: raw.len() as u32,
        codec: Codec::Lz4,
        raw_digest: ChunkDigest::Blake3.digest(&raw),
    };
    rig.frame(Frame::Data(Data { head, payload }));
    let Some(Action::Write { buf, .. }) = rig.next() else {
        panic!("no write");
    };
    assert_eq!(buf, raw);
    rig.done(Completion::Written { buf, result: Ok(1) });
    assert!(
        rig.next().is_none(),
        "the decompression buffer is kept, not recycled"
    );
}

#[test]
fn a_barrier_is_acked_only_after_the_flush_and_the_durable_count() {
    let mut rig = Rig::attached();
    rig.write(0, 4096);
    rig.frame(Frame::Barrier { seq: 1 });
    assert!(matches!(rig.next(), Some(Action::Flush { sync_need: 1 })));
    assert!(rig.next().is_none(), "no ACK while the flush runs");
    rig.done(Completion::Flushed(Ok(())));
    let Some(Action::MakeDurable {
        ranges, data_bytes, ..
    }) = rig.next()
    else {
        panic!("the flushed ranges must be counted durable");
    };
    assert_eq!((ranges, data_bytes), (vec![(0, 4096)], 4096));
    assert!(rig.next().is_none(), "no ACK before the job counted them");
    rig.done(Completion::MadeDurable(Ok(8192)));
    let Some(Action::Send(Frame::Ack(ack))) = rig.next() else {
        panic!("no ACK");
    };
    assert_eq!((ack.seq, ack.bytes_durable_total), (1, 8192));
    let added = ByteRange {
        offset: 0,
        len_bytes: 4096,
    };
    assert_eq!(ack.durable_added, vec![added]);
}

#[test]
fn a_failed_flush_fails_the_job_and_nothing_is_counted_durable_or_acked() {
    let mut rig = Rig::attached();
    rig.write(0, 4096);
    rig.frame(Frame::Barrier { seq: 1 });
    assert!(matches!(rig.next(), Some(Action::Flush { .. })));
    rig.done(Completion::Flushed(Err(eio())));
    // The ending flushes again (the target says no again).
    let actions = rig.run(|a| match a {
        Action::Flush { .. } => Completion::Flushed(Err(eio())),
        other => healthy(other),
    });
    let bad = |a: &Action| matches!(a, Action::MakeDurable { .. } | Action::Send(Frame::Ack(_)));
    assert!(!actions.iter().any(bad), "{actions:?}");
    assert!(
        matches!(&actions[0], Action::FailJob(r) if r.code == ErrorCode::TargetIo),
        "{actions:?}"
    );
    assert_eq!(errors(&actions)[0].code, ErrorCode::TargetIo);
}

#[test]
fn a_failed_write_fails_the_job() {
    let mut rig = Rig::attached();
    rig.frame(data(0, &[1; 4096], true));
    let Some(Action::Write { buf, .. }) = rig.next() else {
        panic!("no write");
    };
    rig.done(Completion::Written {
        buf,
        result: Err(eio()),
    });
    let actions = rig.run(healthy);
    let failed = actions.iter().find_map(|a| match a {
        Action::FailJob(r) => Some(r.clone()),
        _ => None,
    });
    let failed = failed.expect("the job fails");
    assert_eq!(failed.code, ErrorCode::TargetIo);
    assert!(
        failed.message.contains("vm1/disk0.img"),
        "{}",
        failed.message
    );
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::MakeDurable { .. }))
    );
}

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
fn ranges_past_the_image_end_are_refused_unwritten() {
    let mut rig = Rig::attached();
    rig.frame(Frame::Zero(ByteRange {
        offset: SIZE - 10,
        len_bytes: 11,
    }));
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Zero { .. })));
    assert_eq!(errors(&actions)[0].code, ErrorCode::BadRequest);
}

#[test]
fn a_stream_scattering_more_ranges_than_its_cap_fails_the_job() {
    let mut rig = Rig::new(2);
    rig.frame(Frame::Hello(hello()));
    rig.run(healthy);
    for i in 0..3u64 {
        rig.frame(Frame::Zero(ByteRange {
            offset: i * 8192,
            len_bytes: 4096,
        }));
        let actions = rig.run(healthy);
        if i < 2 {
            assert!(matches!(actions[..], [Action::Zero { .. }]), "{actions:?}");
            continue;
        }
        assert!(
            matches!(&actions[1], Action::FailJob(r) if r.code == ErrorCode::Protocol),
            "{actions:?}"
        );
        assert!(errors(&actions)[0].message.contains("separate ranges"));
    }
}

#[test]
fn the_job_durable_cap_refused_fails_the_job_without_an_ack() {
    let mut rig = Rig::attached();
    rig.write(0, 4096);
    rig.frame(Frame::Barrier { seq: 5 });
    let actions = rig.run(|a| match a {
        Action::MakeDurable { max_ranges, .. } => {
            Completion::MadeDurable(Err(super::super::written::RangeCapError::Job {
                ranges: max_ranges + 1,
                max_ranges: *max_ranges,
            }))
        }
        other => healthy(other),
    });
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Send(Frame::Ack(_))))
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::FailJob(r) if r.code == ErrorCode::Protocol))
    );
}

#[test]
fn barrier_sequence_numbers_must_increase() {
    let mut rig = Rig::attached();
    rig.frame(Frame::Barrier { seq: 2 });
    assert!(matches!(
        rig.run(healthy).last(),
        Some(Action::Send(Frame::Ack(_)))
    ));
    rig.frame(Frame::Barrier { seq: 2 });
    assert_eq!(errors(&rig.run(healthy))[0].code, ErrorCode::Protocol);
}

#[test]
fn a_stream_settles_on_its_own_once_its_share_of_checkpoint_bytes_is_written() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(hello()));
    rig.next();
    let mut info = job_info();
    info.checkpoint_bytes = 8192;
    rig.done(Completion::Attached(Box::new(info)));
    rig.run(healthy);
    rig.write(0, 4096);
    rig.frame(data(4096, &[1; 4096], true));
    let actions = rig.run(healthy);
    assert!(matches!(actions[1], Action::Recycle(_)));
    assert!(matches!(actions[2], Action::Flush { .. }));
    assert!(matches!(&actions[3], Action::MakeDurable { ranges, .. } if ranges == &[(0, 8192)]));
    assert_eq!(actions.len(), 4, "no ACK without a barrier: {actions:?}");
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

/// A frame a hostile or broken sender might send.
fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        Just(Frame::Hello(hello())),
        (0u64..SIZE + 8192, 1usize..9000, any::<bool>()).prop_map(|(offset, len, right)| data(
            offset,
            &vec![(offset % 251) as u8; len],
            right
        )),
        (0u64..SIZE + 8192, 0u64..9000)
            .prop_map(|(offset, len_bytes)| { Frame::Zero(ByteRange { offset, len_bytes }) }),
        (0u64..4).prop_map(|seq| Frame::Barrier { seq }),
        (0u64..20000, 0u64..9).prop_map(|(total_bytes_sent, frames)| Frame::Done {
            total_bytes_sent,
            frames
        }),
        Just(Frame::VerifyRequest { window_bytes: 4096 }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
    ]
}

proptest! {
    /// Random frames with random I/O results: the machine never panics,
    /// never writes a chunk whose digest does not match (and writes a
    /// matching one exactly as it came), never counts anything durable
    /// that was not flushed first, and always ends with a close.
    #[test]
    fn random_frames_never_write_a_bad_chunk(
        is_hello_first in proptest::bool::weighted(0.9),
        mut frames in proptest::collection::vec(any_frame(), 1..40),
        failures in proptest::collection::vec(any::<u8>(), 64),
    ) {
        if is_hello_first {
            frames.insert(0, Frame::Hello(hello()));
        }
        let mut rig = Rig::new(4);
        let mut fail = failures.into_iter().cycle();
        for frame in frames {
            let expected = match &frame {
                Frame::Data(d) if d.head.raw_digest == ChunkDigest::Blake3.digest(&d.payload) => {
                    Some(d.payload.clone())
                }
                _ => None,
            };
            rig.frame(frame);
            let mut flushed = false;
            let actions = rig.run(|a| {
                let is_failing = fail.next().unwrap_or(0) < 32;
                match a {
                    Action::Flush { .. } if is_failing => Completion::Flushed(Err(eio())),
                    Action::Flush { .. } => {
                        flushed = true;
                        Completion::Flushed(Ok(()))
                    }
                    Action::MakeDurable { .. } => {
                        assert!(flushed, "counted durable without a flush");
                        flushed = false;
                        healthy(a)
                    }
                    Action::Write { buf, .. } if is_failing => Completion::Written {
                        buf: buf.clone(),
                        result: Err(eio()),
                    },
                    other => healthy(other),
                }
            });
            for action in &actions {
                if let Action::Write { buf, .. } = action {
                    prop_assert_eq!(Some(buf), expected.as_ref());
                }
            }
            if matches!(actions.last(), Some(Action::Close(_))) {
                return Ok(());
            }
        }
        rig.s.input(Input::Closed { is_mid_frame: false }, rig.now);
        let actions = rig.run(healthy);
        prop_assert!(matches!(actions.last(), Some(Action::Close(_))));
    }
}
