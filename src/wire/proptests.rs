//! Property tests: arbitrary frames round trip byte-exactly, any split of a
//! valid stream decodes the same, arbitrary bytes never panic, never buffer
//! more than one frame's bound, and whatever is accepted is canonical.

use super::header::{FrameType, HEADER_LEN, MAGIC, PROTOCOL_VERSION};
use super::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![8 => ".{0,40}", 1 => Just("é".repeat(MAX_STRING_BYTES / 2))]
}

fn arb_ranges(max_count: usize) -> impl Strategy<Value = Vec<ByteRange>> {
    vec((0u64..1 << 30, 1u64..1 << 30), 0..max_count).prop_map(|gaps| {
        let mut end = 0u64;
        gaps.into_iter()
            .map(|(gap, len_bytes)| {
                let offset = end + gap;
                end = offset + len_bytes;
                ByteRange { offset, len_bytes }
            })
            .collect()
    })
}

fn arb_codec() -> impl Strategy<Value = Codec> {
    prop_oneof![Just(Codec::Lz4), Just(Codec::Zstd)]
}

fn arb_data() -> impl Strategy<Value = Frame> {
    let payload = vec(any::<u8>(), 1..600);
    let head = (0u64..u64::MAX >> 1, any::<[u8; 32]>());
    prop_oneof![
        (head.clone(), payload.clone()).prop_map(|((offset, raw_digest), payload)| {
            let raw_len_bytes = u32::try_from(payload.len()).unwrap();
            (offset, raw_digest, Codec::None, raw_len_bytes, payload)
        }),
        (head, payload, arb_codec(), 0u32..100_000).prop_map(
            |((offset, raw_digest), payload, codec, extra)| {
                let raw_len_bytes = u32::try_from(payload.len()).unwrap() + extra;
                (offset, raw_digest, codec, raw_len_bytes, payload)
            }
        ),
    ]
    .prop_map(|(offset, raw_digest, codec, raw_len_bytes, payload)| {
        Frame::Data(Data {
            head: DataHead {
                offset,
                raw_len_bytes,
                codec,
                raw_digest,
            },
            payload,
        })
    })
}

fn arb_sync_id() -> impl Strategy<Value = SyncId> {
    any::<[u8; 16]>().prop_filter("a sync id is never all zero", |id| *id != [0; 16])
}

/// The v2 pass fields, consistent with each other: base and plan digest
/// only for an incremental pass.
fn arb_pass() -> impl Strategy<Value = (PassMode, SyncId, SyncId, [u8; 32])> {
    prop_oneof![
        (arb_sync_id(), Just(PassMode::Full)),
        (arb_sync_id(), Just(PassMode::Delta)),
    ]
    .prop_map(|(sync_id, mode)| (mode, sync_id, [0; 16], [0; 32]))
    .boxed()
    .prop_union(
        (arb_sync_id(), arb_sync_id(), arb_ranges(20))
            .prop_map(|(sync_id, base, plan)| {
                (PassMode::Incremental, sync_id, base, plan_digest(&plan))
            })
            .boxed(),
    )
}

fn arb_hello() -> impl Strategy<Value = Frame> {
    let streams = (1u16..=MAX_STREAMS).prop_flat_map(|count| (0..count, Just(count)));
    (
        (any::<[u8; 16]>(), any::<u64>(), 1u32..=MAX_CHUNK_BYTES),
        any::<u32>(),
        streams,
        0u32..=HelloFlags::KNOWN.0,
        (arb_string(), arb_string(), arb_string()),
        arb_pass(),
    )
        .prop_map(
            |(
                (job_id, size_bytes, chunk),
                features,
                (index, count),
                flags,
                (target, ident, change_id),
                (mode, sync_id, base_sync_id, plan_digest),
            )| {
                Frame::Hello(Hello {
                    job_id,
                    size_bytes,
                    chunk_size_bytes: chunk,
                    features: Features(features),
                    stream_index: index,
                    stream_count: count,
                    flags: HelloFlags(flags),
                    target,
                    source_identity: ident,
                    mode,
                    sync_id,
                    base_sync_id,
                    plan_digest,
                    change_id,
                })
            },
        )
}

fn arb_block_bytes() -> impl Strategy<Value = u32> {
    (12u32..=20).prop_map(|shift| 1u32 << shift)
}

/// PLAN, DIGEST_REQUEST and DIGESTS (v2).
fn arb_pass_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        arb_ranges(60).prop_map(Frame::Plan),
        (
            0u64..u64::MAX >> 1,
            1u32..=MAX_CHUNK_BYTES,
            arb_block_bytes()
        )
            .prop_map(|(offset, len_bytes, block_bytes)| Frame::DigestRequest {
                offset,
                len_bytes,
                block_bytes,
            }),
        // At most 32 digests: the span of 32 MiB holds that many of the
        // largest blocks.
        (
            0u64..u64::MAX >> 1,
            arb_block_bytes(),
            vec(any::<[u8; 16]>(), 1..=32)
        )
            .prop_map(|(offset, block_bytes, digests)| Frame::Digests {
                offset,
                block_bytes,
                digests,
            }),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        arb_hello(),
        (
            any::<u32>(),
            any::<u64>(),
            arb_sync_id(),
            arb_ranges(40),
            arb_ranges(10)
        )
            .prop_map(|(f, instance, sync_id, durable, replan)| {
                Frame::Welcome(Welcome {
                    features: Features(f),
                    instance,
                    sync_id,
                    durable,
                    replan,
                })
            }),
        arb_data(),
        (0u64..u64::MAX >> 1, 1u64..u64::MAX >> 1)
            .prop_map(|(offset, len_bytes)| Frame::Zero(ByteRange { offset, len_bytes })),
        any::<u64>().prop_map(|seq| Frame::Barrier { seq }),
        (any::<u64>(), any::<u64>(), arb_ranges(40)).prop_map(|(seq, total, added)| {
            Frame::Ack(Ack {
                seq,
                bytes_durable_total: total,
                durable_added: added,
            })
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(total_bytes_sent, frames)| Frame::Done {
            total_bytes_sent,
            frames
        }),
        (1u32..=MAX_CHUNK_BYTES).prop_map(|window_bytes| Frame::VerifyRequest { window_bytes }),
        (any::<[u8; 32]>(), any::<u64>())
            .prop_map(|(digest, bytes_read)| Frame::VerifyResult { digest, bytes_read }),
        (any::<u16>(), arb_string()).prop_map(|(code, message)| Frame::Error(ErrorFrame {
            code: ErrorCode::from_u16(code),
            message
        })),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        arb_pass_frame(),
    ]
}

/// `fraction` (0..=1) of `len`, rounded down.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a fraction in 0..=1 of a length is a length"
)]
fn fraction_of(fraction: f64, len: usize) -> usize {
    (fraction * len as f64) as usize
}

/// Decodes `bytes` fed in pieces cut at `cuts` (fractions of the length),
/// checking the buffered-capacity bound after every step.
fn decode_split(bytes: &[u8], cuts: &[f64]) -> Result<Vec<Frame>, WireError> {
    let mut points: Vec<usize> = cuts.iter().map(|c| fraction_of(*c, bytes.len())).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut d = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut start = 0;
    for end in points {
        let mut piece = &bytes[start..end];
        start = end;
        loop {
            let got = d.decode_from(&mut piece)?;
            let bound = max_payload_bound();
            assert!(
                d.buffered_capacity_bytes() <= bound,
                "decoder buffers beyond a frame bound"
            );
            match got {
                Some(f) => frames.push(f),
                None => break,
            }
        }
    }
    Ok(frames)
}

fn max_payload_bound() -> usize {
    (1..=15u8)
        .map(|c| FrameType::from_u8(c).unwrap().payload_bounds().1 as usize)
        .max()
        .unwrap_or(0)
}

/// A header with a valid magic and version but arbitrary type and length,
/// followed by arbitrary bytes: reaches the payload parsers.
fn arb_header_then_noise() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..17,
        prop_oneof![3 => 0u32..200, 1 => any::<u32>()],
        vec(any::<u8>(), 0..300),
    )
        .prop_map(|(ty, len, noise)| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&[PROTOCOL_VERSION, ty, 0, 0]);
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&noise);
            b
        })
}

/// One-shot and split decoding agree, and whatever is accepted re-encodes
/// to exactly the input (there is one encoding of every frame).
fn check_whole_and_split_agree(bytes: &[u8], cuts: &[f64]) -> Result<(), TestCaseError> {
    let split = decode_split(bytes, cuts);
    match decode_any(bytes) {
        Ok(frames) => {
            let mut again = Vec::new();
            for f in &frames {
                f.encode(&mut again).unwrap();
            }
            prop_assert_eq!(&again[..], bytes, "accepted bytes re-encode identically");
            prop_assert_eq!(split.unwrap(), frames);
        }
        // The split decoder just waits for the rest of the frame.
        Err(WireError::Truncated { .. }) => prop_assert!(split.is_ok()),
        Err(e) => prop_assert_eq!(split.unwrap_err(), e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_round_trip_byte_exactly(frame in arb_frame()) {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes).unwrap();
        let (back, used) = decode_frame(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        let mut again = Vec::new();
        back.encode(&mut again).unwrap();
        prop_assert_eq!(&back, &frame);
        prop_assert_eq!(again, bytes);
    }

    #[test]
    fn any_split_of_a_stream_gives_the_same_frames(
        frames in vec(arb_frame(), 1..8),
        cuts in vec(0.0f64..1.0, 0..20),
    ) {
        let mut bytes = Vec::new();
        for f in &frames {
            f.encode(&mut bytes).unwrap();
        }
        prop_assert_eq!(decode_split(&bytes, &cuts).unwrap(), frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..400), cuts in vec(0.0f64..1.0, 0..8)) {
        check_whole_and_split_agree(&bytes, &cuts)?;
    }

    #[test]
    fn accepted_noise_is_canonical(bytes in arb_header_then_noise(), cuts in vec(0.0f64..1.0, 0..8)) {
        check_whole_and_split_agree(&bytes, &cuts)?;
    }

    #[test]
    fn corrupting_one_byte_is_refused_or_canonical(frame in arb_frame(), at: prop::sample::Index, xor in 1u8..) {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes).unwrap();
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        if let Ok(frames) = decode_any(&bytes) {
            let mut again = Vec::new();
            for f in &frames {
                f.encode(&mut again).unwrap();
            }
            prop_assert_eq!(again, bytes);
        }
    }

    #[test]
    fn header_length_above_bound_is_refused(ty in 1u8..=15, extra in 1u32..1 << 20) {
        let frame_type = FrameType::from_u8(ty).unwrap();
        let (_, max) = frame_type.payload_bounds();
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[PROTOCOL_VERSION, ty, 0, 0]);
        b.extend_from_slice(&max.saturating_add(extra).to_le_bytes());
        let mut d = FrameDecoder::new();
        prop_assert_eq!(d.feed(&b), HEADER_LEN);
        let refused = matches!(d.next_frame(), Err(WireError::FrameTooLarge { .. }));
        prop_assert!(refused);
        prop_assert_eq!(d.buffered_capacity_bytes(), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The receiver hashes raw DATA payloads read by read: any cut of the
    /// bytes gives the one-shot digest, and a reset forgets the last chunk.
    #[test]
    fn streaming_xxh3_matches_one_shot_for_any_cut(
        bytes in vec(any::<u8>(), 0..20_000),
        cuts in vec(0usize..20_000, 0..12),
        stale in vec(any::<u8>(), 0..300),
    ) {
        let mut s = StreamingChunkDigest::new();
        s.update(&stale);
        s.reset();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut at = 0;
        for c in cuts.into_iter().chain(std::iter::once(bytes.len())) {
            s.update(&bytes[at..c]);
            at = c;
        }
        prop_assert_eq!(s.len_bytes(), bytes.len());
        prop_assert_eq!(s.finish(), ChunkDigest::Xxh3.digest(&bytes));
    }

    /// While a DATA payload arrives, the decoder says which codec it has and
    /// how much of it came, and the bytes go where it says.
    #[test]
    fn data_payload_progress_tracks_the_payload(
        payload in vec(any::<u8>(), 1..5000),
        step in 1usize..700,
    ) {
        let data = Data {
            head: DataHead {
                offset: 4096,
                raw_len_bytes: u32::try_from(payload.len()).unwrap(),
                codec: Codec::None,
                raw_digest: ChunkDigest::Xxh3.digest(&payload),
            },
            payload: payload.clone(),
        };
        let mut bytes = Vec::new();
        Frame::Data(data.clone()).encode(&mut bytes).unwrap();
        let mut dec = FrameDecoder::new();
        let mut seen = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let progress = dec.data_payload_progress();
            let buf = dec.buf_mut();
            let n = buf.len().min(step).min(bytes.len() - at);
            buf[..n].copy_from_slice(&bytes[at..at + n]);
            if let Some((codec, got)) = progress {
                prop_assert_eq!(codec, Codec::None);
                prop_assert_eq!(got, seen.len());
                seen.extend_from_slice(&bytes[at..at + n]);
            }
            dec.advance(n);
            at += n;
        }
        prop_assert_eq!(&seen, &payload);
        prop_assert_eq!(dec.data_payload_progress(), None);
        prop_assert_eq!(dec.next_frame().unwrap(), Some(Frame::Data(data)));
    }
}
