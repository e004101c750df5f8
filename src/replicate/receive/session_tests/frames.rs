//! DATA, ZERO and BARRIER: what is written, flushed, counted and acknowledged.

use super::*;
use crate::replicate::receive::job::Refusal;
use crate::wire::ErrorCode;

#[test]
fn hello_is_answered_by_welcome_after_the_attach() {
    let mut rig = Rig::new(1 << 20);
    rig.frame(Frame::Hello(hello()));
    let Some(Action::Attach(h)) = rig.next() else {
        panic!("HELLO must attach first");
    };
    assert_eq!(h.hello, hello());
    assert!(h.plan.is_empty(), "a full pass has no plan");
    assert!(rig.next().is_none(), "nothing before the attach completed");
    rig.done(ActionResult::Attached(Box::new(job_info())));
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
    rig.done(ActionResult::AttachRefused(refusal.clone()));
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
    rig.done(ActionResult::Written { buf, result: Ok(1) });
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
    rig.done(ActionResult::Written { buf, result: Ok(1) });
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
    rig.done(ActionResult::Flushed(Ok(())));
    let Some(Action::MakeDurable {
        ranges, data_bytes, ..
    }) = rig.next()
    else {
        panic!("the flushed ranges must be counted durable");
    };
    assert_eq!((ranges, data_bytes), (vec![(0, 4096)], 4096));
    assert!(rig.next().is_none(), "no ACK before the job counted them");
    rig.done(ActionResult::MadeDurable(Ok(8192)));
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
    rig.done(ActionResult::Flushed(Err(eio())));
    // The ending flushes again (the target says no again).
    let actions = rig.run(|a| match a {
        Action::Flush { .. } => ActionResult::Flushed(Err(eio())),
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
    rig.done(ActionResult::Written {
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
        Action::MakeDurable { max_ranges, .. } => ActionResult::MadeDurable(Err(
            crate::replicate::receive::written::RangeCapError::Job {
                ranges: max_ranges + 1,
                max_ranges: *max_ranges,
            },
        )),
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
    rig.done(ActionResult::Attached(Box::new(info)));
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
fn an_xxh3_chunk_is_checked_with_the_digest_taken_as_it_arrived() {
    let attach = |rig: &mut Rig| {
        let mut h = hello();
        h.features = Features(Features::BLAKE3.0 | Features::XXH3.0);
        rig.frame(Frame::Hello(h));
        rig.run(healthy);
    };
    let raw = vec![0x33; 8192];
    let head = DataHead {
        offset: 0,
        raw_len_bytes: raw.len() as u32,
        codec: Codec::None,
        raw_digest: ChunkDigest::Xxh3.digest(&raw),
    };
    let frame = || {
        Frame::Data(Data {
            head,
            payload: raw.clone(),
        })
    };
    // Read in two pieces, hashed piece by piece: written.
    let mut rig = Rig::new(1 << 20);
    attach(&mut rig);
    rig.s.payload_arrived(Some((Codec::None, 0)), &raw[..5000]);
    rig.s
        .payload_arrived(Some((Codec::None, 5000)), &raw[5000..]);
    rig.frame(frame());
    assert!(matches!(rig.next(), Some(Action::Write { offset: 0, .. })));
    // Bytes that arrived damaged do not match, whatever the payload says.
    let mut rig = Rig::new(1 << 20);
    attach(&mut rig);
    let mut damaged = raw.clone();
    damaged[100] ^= 0x40;
    rig.s.payload_arrived(Some((Codec::None, 0)), &damaged);
    rig.frame(frame());
    let actions = rig.run(healthy);
    assert!(!actions.iter().any(|a| matches!(a, Action::Write { .. })));
    assert_eq!(errors(&actions)[0].code, ErrorCode::DigestMismatch);
}
