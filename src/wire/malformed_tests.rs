//! The malformed-input tables: each corruption of a valid frame gives the
//! specific error that names what is wrong.

use super::tests::{corrupt, data, hello, ranges, set_len};
use super::*;

type Check = fn(&WireError) -> bool;

/// The frames the malformed-input tables corrupt.
struct Samples {
    ping: Frame,
    hello: Frame,
    welcome: Frame,
    raw: Frame,
    err: Frame,
}

fn samples() -> Samples {
    Samples {
        ping: Frame::Ping { nonce: 1 },
        hello: Frame::Hello(hello()),
        welcome: Frame::Welcome(Welcome {
            features: Features::KNOWN,
            instance: 1,
            sync_id: [9; 16],
            durable: ranges(2),
            replan: vec![],
        }),
        raw: data(vec![0; 16], Codec::None, 16),
        err: Frame::Error(ErrorFrame {
            code: ErrorCode::Busy,
            message: "busy".into(),
        }),
    }
}

/// Each input fails to decode with the error its check expects.
fn check_malformed(table: Vec<(&str, Vec<u8>, Check)>) {
    for (name, bytes, check) in table {
        let err = decode_any(&bytes).expect_err(name);
        assert!(check(&err), "{name}: got {err:?}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn malformed_headers_and_lengths_give_the_specific_error() {
    let Samples {
        ping,
        hello: hello_f,
        raw,
        err,
        ..
    } = samples();
    check_malformed(vec![
        (
            "bad magic",
            corrupt(&ping, |b| b[0] = b'X'),
            |e| matches!(e, WireError::BadMagic { got } if got == b"XFRY"),
        ),
        ("version 1 (a v1 peer)", corrupt(&ping, |b| b[4] = 1), |e| {
            matches!(e, WireError::UnsupportedVersion { got: 1 }) && e.code() == ErrorCode::Version
        }),
        ("version 3", corrupt(&ping, |b| b[4] = 3), |e| {
            matches!(e, WireError::UnsupportedVersion { got: 3 }) && e.code() == ErrorCode::Version
        }),
        ("unknown type", corrupt(&ping, |b| b[5] = 200), |e| {
            matches!(e, WireError::UnknownFrameType { code: 200 })
        }),
        ("reserved flags", corrupt(&ping, |b| b[7] = 0x80), |e| {
            matches!(e, WireError::ReservedFlags { flags: 0x8000 })
        }),
        (
            "4 GiB claim",
            corrupt(&raw, |b| set_len(b, u32::MAX)),
            |e| {
                matches!(
                    e,
                    WireError::FrameTooLarge {
                        frame: "DATA",
                        len_bytes: u32::MAX,
                        ..
                    }
                )
            },
        ),
        (
            "control frame too large",
            corrupt(&err, |b| set_len(b, 1 << 20)),
            |e| {
                matches!(
                    e,
                    WireError::FrameTooLarge {
                        frame: "ERROR",
                        max_bytes: 4100,
                        ..
                    }
                )
            },
        ),
        (
            "fixed frame too small",
            corrupt(&ping, |b| set_len(b, 7)),
            |e| {
                matches!(
                    e,
                    WireError::FrameTooSmall {
                        frame: "PING",
                        min_bytes: 8,
                        ..
                    }
                )
            },
        ),
        (
            "truncated frame",
            corrupt(&hello_f, |b| b.truncate(b.len() - 3)),
            |e| matches!(e, WireError::Truncated { needed_bytes: 3 }),
        ),
        ("truncated header", corrupt(&ping, |b| b.truncate(5)), |e| {
            matches!(e, WireError::Truncated { needed_bytes: 7 })
        }),
    ]);
}

#[test]
fn malformed_strings_and_lists_give_the_specific_error() {
    let Samples { welcome, err, .. } = samples();
    check_malformed(vec![
        (
            "string too long",
            corrupt(&err, |b| b[14..16].copy_from_slice(&4097u16.to_le_bytes())),
            |e| {
                matches!(
                    e,
                    WireError::StringTooLong {
                        field: "ERROR message",
                        len_bytes: 4097,
                        ..
                    }
                )
            },
        ),
        ("string past end", corrupt(&err, |b| b[14] = 200), |e| {
            matches!(e, WireError::FieldTruncated { frame: "ERROR", .. })
        }),
        ("string not utf-8", corrupt(&err, |b| b[16] = 0xff), |e| {
            matches!(e, WireError::StringNotUtf8 { .. })
        }),
        (
            "list count too big",
            corrupt(&welcome, |b| {
                b[40..44].copy_from_slice(&(MAX_RESUME_RANGES + 1).to_le_bytes())
            }),
            |e| matches!(e, WireError::ListTooLong { count, .. } if *count == u64::from(MAX_RESUME_RANGES) + 1),
        ),
        (
            "list count past end",
            corrupt(&welcome, |b| b[40] = 3),
            |e| {
                matches!(
                    e,
                    WireError::FieldTruncated {
                        frame: "WELCOME",
                        ..
                    }
                )
            },
        ),
        (
            "trailing bytes",
            corrupt(&welcome, |b| {
                b.push(0);
                let n = b.len() - HEADER_LEN;
                set_len(b, u32::try_from(n).unwrap())
            }),
            |e| matches!(e, WireError::TrailingBytes { extra_bytes: 1, .. }),
        ),
        (
            "empty range",
            corrupt(&welcome, |b| b[52..60].fill(0)),
            |e| {
                matches!(
                    e,
                    WireError::BadRange {
                        why: "is empty",
                        ..
                    }
                )
            },
        ),
    ]);
}

#[test]
fn malformed_data_and_hello_fields_give_the_specific_error() {
    let Samples {
        hello: hello_f,
        raw,
        ..
    } = samples();
    check_malformed(vec![
        (
            "data raw_len > max",
            corrupt(&raw, |b| {
                b[20..24].copy_from_slice(&(MAX_CHUNK_BYTES + 1).to_le_bytes())
            }),
            |e| matches!(e, WireError::ChunkTooLarge { raw_len_bytes, .. } if *raw_len_bytes == MAX_CHUNK_BYTES + 1),
        ),
        (
            "data raw_len != payload",
            corrupt(&raw, |b| b[20] = 17),
            |e| {
                matches!(
                    e,
                    WireError::BadField {
                        field: "payload length",
                        ..
                    }
                )
            },
        ),
        ("unknown codec", corrupt(&raw, |b| b[24] = 9), |e| {
            matches!(e, WireError::UnknownCodec { code: 9 })
        }),
        ("data reserved", corrupt(&raw, |b| b[25] = 1), |e| {
            matches!(
                e,
                WireError::BadField {
                    field: "reserved bytes",
                    ..
                }
            )
        }),
        (
            "hello index >= count",
            corrupt(&hello_f, |b| b[44..46].copy_from_slice(&4u16.to_le_bytes())),
            |e| {
                matches!(
                    e,
                    WireError::BadField {
                        field: "stream_index",
                        ..
                    }
                )
            },
        ),
        (
            "hello unknown flag",
            corrupt(&hello_f, |b| b[48] = 0x81),
            |e| matches!(e, WireError::BadField { field: "flags", .. }),
        ),
    ]);
}
