//! Unit tests: every frame's round trip, the decoder's driving modes, and
//! the image digest (the malformed-input tables: `malformed_tests.rs`).

use super::header::{FrameType, HEADER_LEN, MAGIC};
use super::*;

pub(super) fn hello() -> Hello {
    Hello {
        job_id: [7; 16],
        size_bytes: 10 << 30,
        chunk_size_bytes: 2 << 20,
        features: Features::LZ4
            .union(Features::BLAKE3)
            .union(Features::RESUME),
        stream_index: 1,
        stream_count: 4,
        flags: HelloFlags::RESTART,
        target: "vm-42/disk0".into(),
        source_identity: "size=10737418240 gen=17".into(),
        mode: PassMode::Full,
        sync_id: [0x11; 16],
        base_sync_id: [0; 16],
        plan_digest: [0; 32],
        change_id: "CHG-1".into(),
    }
}

pub(super) fn data(payload: Vec<u8>, codec: Codec, raw_len_bytes: u32) -> Frame {
    Frame::Data(Data {
        head: DataHead {
            offset: 4 << 20,
            raw_len_bytes,
            codec,
            raw_digest: [0xab; 32],
        },
        payload,
    })
}

pub(super) fn ranges(n: u64) -> Vec<ByteRange> {
    (0..n)
        .map(|i| ByteRange {
            offset: (i * 3) << 20,
            len_bytes: 1 << 20,
        })
        .collect()
}

/// One frame of every type (two of some).
pub(super) fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::Hello(hello()),
        Frame::Welcome(Welcome {
            features: Features::BLAKE3,
            instance: 7,
            sync_id: [1; 16],
            durable: vec![],
            replan: vec![],
        }),
        Frame::Welcome(Welcome {
            features: Features::KNOWN,
            instance: u64::MAX,
            sync_id: [0xfe; 16],
            durable: ranges(5),
            replan: ranges(2),
        }),
        data(vec![1, 2, 3, 4, 5], Codec::None, 5),
        data(vec![9; 10], Codec::Zstd, 4096),
        Frame::Zero(ByteRange {
            offset: 1 << 40,
            len_bytes: 1 << 33,
        }),
        Frame::Barrier { seq: 3 },
        Frame::Ack(Ack {
            seq: 3,
            bytes_durable_total: 99 << 20,
            durable_added: ranges(3),
        }),
        Frame::Done {
            total_bytes_sent: 12345,
            frames: 6,
        },
        Frame::VerifyRequest {
            window_bytes: 2 << 20,
        },
        Frame::VerifyResult {
            digest: [0x5a; 32],
            bytes_read: 10 << 30,
        },
        Frame::Error(ErrorFrame {
            code: ErrorCode::SourceMismatch,
            message: "journal is for another source".into(),
        }),
        Frame::Error(ErrorFrame {
            code: ErrorCode::Other(999),
            message: String::new(),
        }),
        Frame::Ping { nonce: u64::MAX },
        Frame::Pong { nonce: 0 },
        Frame::Plan(vec![]),
        Frame::Plan(ranges(4)),
        Frame::DigestRequest {
            offset: 1 << 30,
            len_bytes: 32 << 20,
            block_bytes: 4096,
        },
        Frame::Digests {
            offset: 1 << 30,
            block_bytes: 64 << 10,
            digests: vec![[3; 16], [4; 16]],
        },
        Frame::Error(ErrorFrame {
            code: ErrorCode::BaseMismatch,
            message: "the target's last sync is 0011…".into(),
        }),
    ]
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    frame.encode(&mut out).expect("valid frame encodes");
    out
}

#[test]
fn every_frame_round_trips() {
    for frame in sample_frames() {
        let bytes = encoded(&frame);
        let (back, used) = decode_frame(&bytes).unwrap();
        assert_eq!(back, frame);
        assert_eq!(used, bytes.len(), "{frame:?}");
        assert_eq!(encoded(&back), bytes);
        assert_eq!(bytes[..4], MAGIC);
        assert_eq!(bytes[5], frame.frame_type() as u8);
    }
}

#[test]
fn fixed_layouts_are_as_documented() {
    let ping = encoded(&Frame::Ping { nonce: 0x0102 });
    assert_eq!(
        ping,
        [
            b'D', b'F', b'R', b'Y', 2, 11, 0, 0, 8, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0
        ]
    );
    let hello = encoded(&Frame::Hello(hello()));
    let strings = "vm-42/disk0".len() + "size=10737418240 gen=17".len() + "CHG-1".len();
    assert_eq!(hello.len(), HEADER_LEN + 111 + strings);
}

#[test]
fn data_header_matches_frame_encoding() {
    let frame = data(vec![42; 100], Codec::Lz4, 1000);
    let Frame::Data(d) = &frame else {
        unreachable!()
    };
    let head = encode_data_header(&d.head, 100).unwrap();
    let mut split = head.to_vec();
    split.extend_from_slice(&d.payload);
    assert_eq!(split, encoded(&frame));
    assert_eq!(head.len(), DATA_HEADER_LEN);
}

#[test]
fn encoder_refuses_what_the_decoder_would_refuse() {
    let long = "x".repeat(MAX_STRING_BYTES + 1);
    let mut h = hello();
    h.target = long.clone();
    let mut out = vec![1, 2, 3];
    let err = Frame::Hello(h).encode(&mut out).unwrap_err();
    assert!(
        matches!(
            err,
            WireError::StringTooLong {
                len_bytes: 4097,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(out, [1, 2, 3], "out is left as it was");
    let mut h = hello();
    h.target = "x".repeat(MAX_STRING_BYTES);
    assert!(
        Frame::Hello(h).encode(&mut out).is_ok(),
        "4096 bytes is allowed"
    );
    let head = DataHead {
        offset: 0,
        raw_len_bytes: MAX_CHUNK_BYTES + 1,
        codec: Codec::None,
        raw_digest: [0; 32],
    };
    assert!(matches!(
        encode_data_header(&head, MAX_CHUNK_BYTES + 1),
        Err(WireError::ChunkTooLarge { .. })
    ));
    let bad = Frame::Welcome(Welcome {
        features: Features::default(),
        instance: 0,
        sync_id: [1; 16],
        replan: vec![],
        durable: vec![
            ByteRange {
                offset: 10,
                len_bytes: 5,
            },
            ByteRange {
                offset: 12,
                len_bytes: 5,
            },
        ],
    });
    assert!(matches!(
        bad.encode(&mut out),
        Err(WireError::BadRange { offset: 12, .. })
    ));
}

/// Encodes `frame`, then lets `edit` corrupt the bytes.
pub(super) fn corrupt(frame: &Frame, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = encoded(frame);
    edit(&mut bytes);
    bytes
}

pub(super) fn set_len(bytes: &mut [u8], len: u32) {
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
}

#[test]
fn header_claiming_4_gib_is_refused_before_allocating() {
    let mut header = Header::new(FrameType::Data, 100).unwrap().encode();
    set_len(&mut header, u32::MAX);
    let mut d = FrameDecoder::new();
    assert_eq!(d.feed(&header), HEADER_LEN);
    assert!(matches!(
        d.next_frame(),
        Err(WireError::FrameTooLarge { .. })
    ));
    assert_eq!(d.buffered_capacity_bytes(), 0);
    assert_eq!(d.need(), 0);
    assert_eq!(d.feed(&[0; 10]), 0, "a failed decoder takes nothing");
    assert!(d.next_frame().is_err(), "errors are sticky");
}

#[test]
fn feed_stops_at_frame_end_and_tracks_need() {
    let a = encoded(&Frame::Barrier { seq: 1 });
    let b = encoded(&Frame::Ping { nonce: 2 });
    let both = [a.clone(), b].concat();
    let mut d = FrameDecoder::new();
    assert_eq!(d.need(), HEADER_LEN);
    assert_eq!(d.feed(&both[..5]), 5);
    assert_eq!(d.need(), HEADER_LEN - 5);
    assert!(d.is_mid_frame());
    assert_eq!(
        d.feed(&both[5..]),
        a.len() - 5,
        "stops at the end of frame 1"
    );
    assert_eq!(d.next_frame().unwrap(), Some(Frame::Barrier { seq: 1 }));
    assert!(!d.is_mid_frame());
    assert_eq!(d.feed(&both[a.len()..]), 20);
    assert_eq!(d.next_frame().unwrap(), Some(Frame::Ping { nonce: 2 }));
    assert_eq!(d.next_frame().unwrap(), None);
}

#[test]
fn read_in_place_and_recycle_reuse_the_payload_buffer() {
    let frame = data(vec![3; 5000], Codec::None, 5000);
    let bytes = encoded(&frame);
    let mut d = FrameDecoder::new();
    let mut input = &bytes[..];
    let mut sizes = Vec::new();
    while d.need() > 0 {
        let n = d.need().min(input.len()).min(1500);
        sizes.push(d.buf_mut().len());
        d.buf_mut()[..n].copy_from_slice(&input[..n]);
        d.advance(n);
        input = &input[n..];
    }
    assert_eq!(sizes[..3], [HEADER_LEN, DATA_HEAD_LEN, 5000]);
    let Some(Frame::Data(got)) = d.next_frame().unwrap() else {
        panic!("no data")
    };
    assert_eq!(Frame::Data(got.clone()), frame);
    let ptr = got.payload.as_ptr();
    d.recycle(got.payload);
    let mut input = &bytes[..];
    let Some(Frame::Data(again)) = d.decode_from(&mut input).unwrap() else {
        panic!("no data")
    };
    assert_eq!(again.payload.as_ptr(), ptr, "recycled buffer reused");
    assert!(input.is_empty());
}

#[test]
fn clean_end_versus_cut_connection() {
    let one = encoded(&Frame::Done {
        total_bytes_sent: 1,
        frames: 1,
    });
    assert_eq!(decode_any(&one).unwrap().len(), 1);
    assert_eq!(decode_any(&[]).unwrap(), vec![]);
    assert!(matches!(
        decode_any(&one[..one.len() - 1]),
        Err(WireError::Truncated { needed_bytes: 1 })
    ));
}

#[test]
fn error_codes_round_trip_and_unknown_are_kept() {
    for v in 0..=20u16 {
        assert_eq!(ErrorCode::from_u16(v).to_u16(), v);
    }
    assert_eq!(ErrorCode::from_u16(4), ErrorCode::SourceMismatch);
    assert_eq!(ErrorCode::from_u16(77), ErrorCode::Other(77));
    assert!(Features(0xffff_0000).intersect(Features::KNOWN) == Features::default());
}

#[test]
fn image_digest_is_order_independent_and_covers_zero_windows() {
    let window = 4096u32;
    let size = 3 * 4096 + 100;
    let mut image = vec![0u8; usize::try_from(size).unwrap()];
    image[..4096].fill(0x11);
    image[2 * 4096 + 5] = 1;
    let chunks: Vec<&[u8]> = image.chunks(window as usize).collect();
    assert_eq!(chunks.len(), 4);

    let mut forward = ImageDigest::new(size, window).unwrap();
    for (i, c) in chunks.iter().enumerate() {
        forward.hash_window(i as u64, c).unwrap();
    }
    let mut backward = ImageDigest::new(size, window).unwrap();
    for i in [3u64, 1, 2, 0] {
        if i == 1 || i == 3 {
            backward.zero_window(i).unwrap();
        } else {
            backward
                .set_window(i, chunk_digest(chunks[usize::try_from(i).unwrap()]))
                .unwrap();
        }
    }
    assert_eq!(forward.finish().unwrap(), backward.finish().unwrap());

    let mut changed = image.clone();
    *changed.last_mut().unwrap() = 9;
    let mut other = ImageDigest::new(size, window).unwrap();
    for (i, c) in changed.chunks(window as usize).enumerate() {
        other.hash_window(i as u64, c).unwrap();
    }
    assert_ne!(other.finish().unwrap(), forward.finish().unwrap());
}

#[test]
fn image_digest_refuses_missing_and_bad_windows() {
    let mut d = ImageDigest::new(10_000, 4096).unwrap();
    assert_eq!(d.windows(), 3);
    assert_eq!(d.window_len_bytes(2).unwrap(), 10_000 - 8192);
    d.zero_window(0).unwrap();
    d.zero_window(2).unwrap();
    assert_eq!(d.missing_windows(), 1);
    assert_eq!(d.finish(), Err(WireError::WindowMissing { index: 1 }));
    assert!(matches!(
        d.set_window(3, [0; 32]),
        Err(WireError::WindowOutOfRange {
            index: 3,
            windows: 3
        })
    ));
    assert!(matches!(
        d.hash_window(1, &[0; 10]),
        Err(WireError::WindowLength {
            want_bytes: 4096,
            ..
        })
    ));
    assert!(
        ImageDigest::new(1 << 40, 100).is_err(),
        "window below 4 KiB"
    );
    assert!(
        ImageDigest::new(u64::MAX, 4096).is_err(),
        "too many windows"
    );
    let empty = ImageDigest::new(0, 4096).unwrap();
    assert_ne!(
        empty.finish().unwrap(),
        ImageDigest::new(0, 8192).unwrap().finish().unwrap()
    );
}

#[test]
fn full_size_zero_window_matches_hashing_zeros() {
    let window = 1 << 20; // several 64 KiB pieces of the zero hasher
    let mut a = ImageDigest::new(u64::from(window) * 2, window).unwrap();
    let mut b = a.clone();
    a.zero_window(0).unwrap();
    a.zero_window(1).unwrap();
    let zeros = vec![0u8; window as usize];
    b.hash_window(1, &zeros).unwrap();
    b.set_window(0, chunk_digest(&zeros)).unwrap();
    assert_eq!(a.finish().unwrap(), b.finish().unwrap());
}

#[test]
fn hello_flags_know_restart_and_overwrite_only() {
    assert!(HelloFlags(HelloFlags::RESTART.0 | HelloFlags::OVERWRITE.0).restart());
    assert!(HelloFlags::OVERWRITE.overwrite() && !HelloFlags::OVERWRITE.restart());
    assert!(HelloFlags::check(HelloFlags::KNOWN.0).is_ok());
    assert!(HelloFlags::check(1 << 2).is_err());
}
