//! Random frame sequences with random I/O results.

use proptest::prelude::*;

use super::*;

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
                    Action::Flush { .. } if is_failing => ActionResult::Flushed(Err(eio())),
                    Action::Flush { .. } => {
                        flushed = true;
                        ActionResult::Flushed(Ok(()))
                    }
                    Action::MakeDurable { .. } => {
                        assert!(flushed, "counted durable without a flush");
                        flushed = false;
                        healthy(a)
                    }
                    Action::Write { buf, .. } if is_failing => ActionResult::Written {
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
