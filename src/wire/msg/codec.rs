//! Encoding and parsing of the frames (their checks are in `msg.rs`).

use super::reader::Reader;
use super::{
    Ack, ByteRange, Codec, DATA_HEAD_BYTES, DATA_HEAD_LEN, DATA_HEADER_LEN, DataHead, ErrorCode,
    ErrorFrame, Features, Frame, Hello, HelloFlags, PassMode, Welcome, bad,
};
use crate::wire::header::{FrameType, HEADER_LEN, Header, RANGE_LEN};
use crate::wire::pass::{MAX_DIGESTS, MAX_PLAN_RANGES, MAX_REPLAN_RANGES};
use crate::wire::{MAX_ACK_RANGES, MAX_RESUME_RANGES, WireError};

/// The header and fixed part of a DATA frame, so a sender can write them
/// and then the payload slice without copying the payload.
pub fn encode_data_header(
    head: &DataHead,
    payload_len_bytes: u32,
) -> Result<[u8; DATA_HEADER_LEN], WireError> {
    head.validate(payload_len_bytes)?;
    let header = Header::new(FrameType::Data, DATA_HEAD_BYTES + payload_len_bytes)?;
    let mut out = [0u8; DATA_HEADER_LEN];
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    out[HEADER_LEN..].copy_from_slice(&head.encode());
    Ok(out)
}

impl DataHead {
    /// The fixed part alone, as it follows the header.
    pub fn encode(&self) -> [u8; DATA_HEAD_LEN] {
        let mut out = [0u8; DATA_HEAD_LEN];
        out[0..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.raw_len_bytes.to_le_bytes());
        out[12] = self.codec as u8;
        // out[13..16] reserved, zero.
        out[16..48].copy_from_slice(&self.raw_digest);
        out
    }

    /// Parses the fixed part of a DATA payload; checks it against the
    /// payload length that follows it (before the payload is allocated).
    pub fn decode(bytes: &[u8; DATA_HEAD_LEN], payload_len_bytes: u32) -> Result<Self, WireError> {
        let mut r = Reader::new("DATA", bytes);
        let offset = r.u64("offset")?;
        let raw_len_bytes = r.u32("raw_len")?;
        let codec = Codec::from_u8(r.u8("codec")?)?;
        if r.array::<3>("reserved")? != [0; 3] {
            return Err(bad("DATA", "reserved bytes", "must be zero"));
        }
        let raw_digest = r.array::<32>("digest")?;
        r.finish()?;
        let head = DataHead {
            offset,
            raw_len_bytes,
            codec,
            raw_digest,
        };
        head.validate(payload_len_bytes)?;
        Ok(head)
    }
}

impl Frame {
    /// Appends the encoded frame to `out`. Refuses (leaving `out` as it
    /// was) a frame the peer would refuse.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.validate()?;
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        self.encode_payload(out);
        let payload_len = out.len() - start - HEADER_LEN;
        let header = u32::try_from(payload_len)
            .map_err(|_| bad(self.frame_type().name(), "payload", "exceeds 4 GiB"))
            .and_then(|len| Header::new(self.frame_type(), len));
        match header {
            Ok(h) => {
                out[start..start + HEADER_LEN].copy_from_slice(&h.encode());
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello(h) => h.encode_payload(out),
            Frame::Welcome(w) => {
                out.extend_from_slice(&w.features.0.to_le_bytes());
                out.extend_from_slice(&w.instance.to_le_bytes());
                out.extend_from_slice(&w.sync_id);
                put_ranges(out, &w.durable);
                put_ranges(out, &w.replan);
            }
            Frame::Data(d) => {
                out.extend_from_slice(&d.head.encode());
                out.extend_from_slice(&d.payload);
            }
            Frame::Zero(r) => put_ranges_body(out, std::slice::from_ref(r)),
            Frame::Barrier { seq } => out.extend_from_slice(&seq.to_le_bytes()),
            Frame::Ack(a) => {
                out.extend_from_slice(&a.seq.to_le_bytes());
                out.extend_from_slice(&a.bytes_durable_total.to_le_bytes());
                put_ranges(out, &a.durable_added);
            }
            Frame::Done {
                total_bytes_sent,
                frames,
            } => {
                out.extend_from_slice(&total_bytes_sent.to_le_bytes());
                out.extend_from_slice(&frames.to_le_bytes());
            }
            Frame::VerifyRequest { window_bytes } => {
                out.extend_from_slice(&window_bytes.to_le_bytes())
            }
            Frame::VerifyResult { digest, bytes_read } => {
                out.extend_from_slice(digest);
                out.extend_from_slice(&bytes_read.to_le_bytes());
            }
            Frame::Error(e) => {
                out.extend_from_slice(&e.code.to_u16().to_le_bytes());
                put_string(out, &e.message);
            }
            Frame::Ping { nonce } | Frame::Pong { nonce } => {
                out.extend_from_slice(&nonce.to_le_bytes())
            }
            Frame::Plan(ranges) => put_ranges(out, ranges),
            Frame::DigestRequest {
                offset,
                len_bytes,
                block_bytes,
            } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len_bytes.to_le_bytes());
                out.extend_from_slice(&block_bytes.to_le_bytes());
            }
            Frame::Digests {
                offset,
                block_bytes,
                digests,
            } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&block_bytes.to_le_bytes());
                // validate() bounded the count to MAX_DIGESTS.
                let count = u32::try_from(digests.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&count.to_le_bytes());
                out.reserve(digests.len() * 16);
                for d in digests {
                    out.extend_from_slice(d);
                }
            }
        }
    }

    /// Parses the payload of a non-DATA frame whose header was already
    /// validated (so `payload` is within the type's bounds).
    pub fn parse(frame_type: FrameType, payload: &[u8]) -> Result<Frame, WireError> {
        let mut r = Reader::new(frame_type.name(), payload);
        let frame = match frame_type {
            FrameType::Hello => Frame::Hello(Hello::parse(&mut r)?),
            FrameType::Welcome => Frame::Welcome(Welcome {
                features: Features(r.u32("features")?),
                instance: r.u64("instance")?,
                sync_id: r.array::<16>("sync_id")?,
                durable: r.ranges("WELCOME durable", MAX_RESUME_RANGES)?,
                replan: r.ranges("WELCOME replan", MAX_REPLAN_RANGES)?,
            }),
            FrameType::Data => {
                return Err(bad("DATA", "payload", "is decoded by FrameDecoder"));
            }
            FrameType::Zero => Frame::Zero(ByteRange {
                offset: r.u64("offset")?,
                len_bytes: r.u64("len")?,
            }),
            FrameType::Barrier => Frame::Barrier { seq: r.u64("seq")? },
            FrameType::Ack => Frame::Ack(Ack {
                seq: r.u64("seq")?,
                bytes_durable_total: r.u64("bytes_durable_total")?,
                durable_added: r.ranges("ACK durable_added", MAX_ACK_RANGES)?,
            }),
            FrameType::Done => Frame::Done {
                total_bytes_sent: r.u64("total_bytes_sent")?,
                frames: r.u64("frames")?,
            },
            FrameType::VerifyRequest => Frame::VerifyRequest {
                window_bytes: r.u32("window")?,
            },
            FrameType::VerifyResult => Frame::VerifyResult {
                digest: r.array::<32>("digest")?,
                bytes_read: r.u64("bytes_read")?,
            },
            FrameType::Error => Frame::Error(ErrorFrame {
                code: ErrorCode::from_u16(r.u16("code")?),
                message: r.string("ERROR message")?,
            }),
            FrameType::Ping => Frame::Ping {
                nonce: r.u64("nonce")?,
            },
            FrameType::Pong => Frame::Pong {
                nonce: r.u64("nonce")?,
            },
            FrameType::Plan => Frame::Plan(r.ranges("PLAN", MAX_PLAN_RANGES)?),
            FrameType::DigestRequest => Frame::DigestRequest {
                offset: r.u64("offset")?,
                len_bytes: r.u32("len")?,
                block_bytes: r.u32("block")?,
            },
            FrameType::Digests => Frame::Digests {
                offset: r.u64("offset")?,
                block_bytes: r.u32("block")?,
                digests: r.digests("DIGESTS digests", MAX_DIGESTS)?,
            },
        };
        r.finish()?;
        frame.validate()?;
        Ok(frame)
    }
}

impl Hello {
    /// The v1 fields, then the v2 pass fields, then the three strings.
    fn encode_payload(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.job_id);
        out.extend_from_slice(&self.size_bytes.to_le_bytes());
        out.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        out.extend_from_slice(&self.features.0.to_le_bytes());
        out.extend_from_slice(&self.stream_index.to_le_bytes());
        out.extend_from_slice(&self.stream_count.to_le_bytes());
        out.extend_from_slice(&self.flags.0.to_le_bytes());
        out.push(self.mode.as_u8());
        out.extend_from_slice(&self.sync_id);
        out.extend_from_slice(&self.base_sync_id);
        out.extend_from_slice(&self.plan_digest);
        put_string(out, &self.target);
        put_string(out, &self.source_identity);
        put_string(out, &self.change_id);
    }

    fn parse(r: &mut Reader<'_>) -> Result<Hello, WireError> {
        Ok(Hello {
            job_id: r.array::<16>("job_id")?,
            size_bytes: r.u64("size")?,
            chunk_size_bytes: r.u32("chunk_size")?,
            features: Features(r.u32("features")?),
            stream_index: r.u16("stream_index")?,
            stream_count: r.u16("stream_count")?,
            flags: HelloFlags(r.u32("flags")?),
            mode: PassMode::from_u8(r.u8("mode")?)?,
            sync_id: r.array::<16>("sync_id")?,
            base_sync_id: r.array::<16>("base_sync_id")?,
            plan_digest: r.array::<32>("plan_digest")?,
            target: r.string("HELLO target")?,
            source_identity: r.string("HELLO source_identity")?,
            change_id: r.string("HELLO change_id")?,
        })
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    // validate() bounded the length to MAX_STRING_BYTES, so it fits a u16.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_ranges(out: &mut Vec<u8>, ranges: &[ByteRange]) {
    // validate() bounded the count to at most 1 << 20.
    let count = u32::try_from(ranges.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    put_ranges_body(out, ranges);
}

fn put_ranges_body(out: &mut Vec<u8>, ranges: &[ByteRange]) {
    out.reserve(ranges.len() * RANGE_LEN as usize);
    for r in ranges {
        out.extend_from_slice(&r.offset.to_le_bytes());
        out.extend_from_slice(&r.len_bytes.to_le_bytes());
    }
}
