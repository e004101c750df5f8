//! Reply decoding for [`super::ClientConn`]: the state transitions driven
//! by [`super::ClientConn::advance`]. Every length is checked against the
//! request it answers before the driver is told where bytes go.

use super::{ClientConn, Extent, MAX_ERROR_CHUNK_BYTES, Pending, ReplyEvent, State};
use crate::nbd::proto::{self, ChunkHeader};
use crate::nbd::{MAX_PAYLOAD_BYTES, MAX_STRING_BYTES, NbdError};

impl ClientConn {
    pub(super) fn step(&mut self, n: usize, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let (cookie, buf_offset, end, done) = match self.state {
            State::SimplePayload {
                cookie,
                buf_offset,
                end,
            } => (cookie, buf_offset, end, true),
            State::DataPayload {
                hdr,
                buf_offset,
                end,
            } => (
                hdr.cookie,
                buf_offset,
                end,
                hdr.flags & proto::REPLY_FLAG_DONE != 0,
            ),
            _ => return self.step_scratch(n, events),
        };
        let left = end - buf_offset;
        let Some(n) = u32::try_from(n).ok().filter(|&n| n <= left) else {
            return Err(format!(
                "driver delivered {n} payload bytes where {left} were expected"
            ));
        };
        let now = buf_offset + n;
        match &mut self.state {
            State::SimplePayload { buf_offset, .. } | State::DataPayload { buf_offset, .. } => {
                *buf_offset = now
            }
            _ => unreachable!("payload state matched above"),
        }
        if now < end {
            return Ok(());
        }
        self.expect_header();
        if done {
            self.finish(cookie, events)
        } else {
            Ok(())
        }
    }

    fn step_scratch(&mut self, n: usize, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let left = self.scratch.len() - self.scratch_filled;
        if n > left {
            return Err(format!(
                "driver delivered {n} bytes where {left} were expected"
            ));
        }
        self.scratch_filled += n;
        if n == 0 || self.scratch_filled < self.scratch.len() {
            return Ok(());
        }
        self.scratch_complete(events)
    }

    pub(super) fn expect_header(&mut self) {
        self.state = State::Header;
        self.expect_scratch(proto::SIMPLE_REPLY_BYTES);
    }

    fn pending(&mut self, cookie: u64) -> Result<&mut Pending, String> {
        self.in_flight
            .get_mut(&cookie)
            .ok_or_else(|| format!("reply for unknown cookie {cookie} (no such request in flight)"))
    }

    fn scratch_complete(&mut self, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        match self.state {
            State::Header => self.on_header(events),
            State::ChunkHeaderRest => self.on_chunk_header(events),
            State::DataOffset { hdr } => self.on_data_offset(hdr),
            State::ChunkBody { hdr } => {
                self.on_chunk_body(hdr, events)?;
                self.expect_header();
                if hdr.flags & proto::REPLY_FLAG_DONE != 0 {
                    self.finish(hdr.cookie, events)?;
                }
                Ok(())
            }
            State::SimplePayload { .. } | State::DataPayload { .. } => {
                unreachable!("payload states do not use scratch")
            }
        }
    }

    fn on_header(&mut self, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let magic = proto::be_u32(&self.scratch, 0);
        match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let errno = proto::be_u32(&self.scratch, 4);
                let cookie = proto::be_u64(&self.scratch, 8);
                let p = self.pending(cookie)?;
                if errno != 0 {
                    p.error = Some((errno, String::new()));
                    self.expect_header();
                    return self.finish(cookie, events);
                }
                match p.cmd_type {
                    proto::CMD_READ => {
                        let end = p.len;
                        p.covered = vec![(0, end)];
                        p.covered_bytes = u64::from(end);
                        self.state = State::SimplePayload {
                            cookie,
                            buf_offset: 0,
                            end,
                        };
                        Ok(())
                    }
                    proto::CMD_BLOCK_STATUS => {
                        Err(format!("simple reply without extents to {}", p.describe()))
                    }
                    _ => {
                        self.expect_header();
                        self.finish(cookie, events)
                    }
                }
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                if !self.info.structured_replies {
                    return Err(
                        "structured reply although structured replies were not negotiated".into(),
                    );
                }
                self.state = State::ChunkHeaderRest;
                self.scratch.resize(proto::STRUCTURED_REPLY_BYTES, 0);
                Ok(())
            }
            other => Err(format!(
                "reply magic {other:#010x} is neither simple ({:#010x}) nor structured ({:#010x})",
                proto::SIMPLE_REPLY_MAGIC,
                proto::STRUCTURED_REPLY_MAGIC
            )),
        }
    }

    fn on_chunk_header(&mut self, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let mut b = [0u8; proto::STRUCTURED_REPLY_BYTES];
        b.copy_from_slice(&self.scratch[..proto::STRUCTURED_REPLY_BYTES]);
        let hdr = proto::decode_chunk_header(&b).map_err(|e| match e {
            NbdError::Protocol(m) => m,
            other => other.to_string(),
        })?;
        let p = self.pending(hdr.cookie)?;
        let cmd_type = p.cmd_type;
        let ty = hdr.reply_type;
        let len = hdr.len_bytes;
        let bad_len = |p: &Pending, what: &str| {
            format!(
                "{} chunk of {len} bytes for {}: {what}",
                type_name(ty),
                p.describe()
            )
        };
        let body_len = match ty {
            proto::REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err(bad_len(p, "must be empty"));
                }
                if hdr.flags & proto::REPLY_FLAG_DONE == 0 {
                    return Err(format!(
                        "NONE chunk without the DONE flag for {}",
                        p.describe()
                    ));
                }
                self.expect_header();
                return self.finish(hdr.cookie, events);
            }
            proto::REPLY_TYPE_OFFSET_DATA | proto::REPLY_TYPE_OFFSET_HOLE
                if cmd_type != proto::CMD_READ =>
            {
                return Err(format!(
                    "{} chunk in the reply to {}",
                    type_name(ty),
                    p.describe()
                ));
            }
            proto::REPLY_TYPE_OFFSET_DATA => {
                if len < 9 {
                    return Err(bad_len(p, "must be at least 9"));
                }
                self.state = State::DataOffset { hdr };
                self.expect_scratch(8);
                return Ok(());
            }
            proto::REPLY_TYPE_OFFSET_HOLE if len != 12 => return Err(bad_len(p, "must be 12")),
            proto::REPLY_TYPE_OFFSET_HOLE => len,
            proto::REPLY_TYPE_BLOCK_STATUS if cmd_type != proto::CMD_BLOCK_STATUS => {
                return Err(format!(
                    "BLOCK_STATUS chunk in the reply to {}",
                    p.describe()
                ));
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                if len < 12 || (len - 4) % 8 != 0 || len > MAX_PAYLOAD_BYTES {
                    return Err(bad_len(
                        p,
                        "must be 4 + a positive multiple of 8, within the payload limit",
                    ));
                }
                len
            }
            t if t & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                if !(6..=MAX_ERROR_CHUNK_BYTES).contains(&len) {
                    return Err(bad_len(p, "an error chunk must be 6 to 65549 bytes"));
                }
                len
            }
            _ => {
                return Err(format!(
                    "unknown reply chunk type {ty} for {}",
                    p.describe()
                ));
            }
        };
        self.state = State::ChunkBody { hdr };
        self.expect_scratch(body_len as usize);
        Ok(())
    }

    fn on_data_offset(&mut self, hdr: ChunkHeader) -> Result<(), String> {
        let offset = proto::be_u64(&self.scratch, 0);
        let data_len = hdr.len_bytes - 8;
        let p = self.pending(hdr.cookie)?;
        let (start, end) = range_in_request(p, offset, u64::from(data_len), "OFFSET_DATA")?;
        p.cover(start, end)?;
        self.state = State::DataPayload {
            hdr,
            buf_offset: start,
            end,
        };
        Ok(())
    }

    fn on_chunk_body(
        &mut self,
        hdr: ChunkHeader,
        events: &mut Vec<ReplyEvent>,
    ) -> Result<(), String> {
        let b = &self.scratch;
        let cookie = hdr.cookie;
        let p = self.in_flight.get_mut(&cookie).ok_or("request vanished")?;
        match hdr.reply_type {
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let offset = proto::be_u64(b, 0);
                let hole_len = proto::be_u32(b, 8);
                if hole_len == 0 {
                    return Err(format!(
                        "empty OFFSET_HOLE in the reply to {}",
                        p.describe()
                    ));
                }
                let (start, end) = range_in_request(p, offset, u64::from(hole_len), "OFFSET_HOLE")?;
                p.cover(start, end)?;
                events.push(ReplyEvent::Hole {
                    cookie,
                    buf_offset: start,
                    len: end - start,
                });
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                let context_id = proto::be_u32(b, 0);
                if self.info.context_name(context_id).is_none() {
                    return Err(format!(
                        "BLOCK_STATUS for meta context id {context_id}, which was not negotiated"
                    ));
                }
                if p.contexts_seen.contains(&context_id) {
                    return Err(format!(
                        "two BLOCK_STATUS chunks for context id {context_id} in one reply"
                    ));
                }
                p.contexts_seen.push(context_id);
                let extents = parse_extents(&b[4..], p)?;
                events.push(ReplyEvent::BlockStatus {
                    cookie,
                    context_id,
                    extents,
                });
            }
            ty => {
                let errno = proto::be_u32(b, 0);
                let msg_len = usize::from(proto::be_u16(b, 4));
                let fixed_tail = if ty == proto::REPLY_TYPE_ERROR_OFFSET {
                    8
                } else {
                    0
                };
                if 6 + msg_len + fixed_tail > b.len() {
                    return Err(format!(
                        "error chunk message of {msg_len} bytes does not fit its {}-byte chunk",
                        b.len()
                    ));
                }
                if errno == 0 {
                    return Err(format!(
                        "error chunk with error value 0 for {}",
                        p.describe()
                    ));
                }
                if ty == proto::REPLY_TYPE_ERROR_OFFSET {
                    let offset = proto::be_u64(b, 6 + msg_len);
                    range_in_request(p, offset, 1, "ERROR_OFFSET")?;
                }
                let msg = &b[6..6 + msg_len.min(MAX_STRING_BYTES as usize)];
                if p.error.is_none() {
                    p.error = Some((errno, String::from_utf8_lossy(msg).into_owned()));
                }
            }
        }
        Ok(())
    }

    /// The final chunk of `cookie` arrived (scratch already reset).
    fn finish(&mut self, cookie: u64, events: &mut Vec<ReplyEvent>) -> Result<(), String> {
        let p = self.in_flight.remove(&cookie).ok_or("request vanished")?;
        if let Some((errno, message)) = p.error {
            events.push(ReplyEvent::Failed {
                cookie,
                errno,
                message,
            });
            return Ok(());
        }
        if p.cmd_type == proto::CMD_READ && p.covered_bytes != u64::from(p.len) {
            return Err(format!(
                "{} finished successfully with only {} of its bytes sent",
                p.describe(),
                p.covered_bytes
            ));
        }
        if p.cmd_type == proto::CMD_BLOCK_STATUS {
            for (name, id) in &self.info.meta_contexts {
                if !p.contexts_seen.contains(id) {
                    return Err(format!(
                        "{} finished without extents for context {name:?}",
                        p.describe()
                    ));
                }
            }
        }
        events.push(ReplyEvent::Done { cookie });
        Ok(())
    }
}

fn type_name(ty: u16) -> &'static str {
    match ty {
        proto::REPLY_TYPE_NONE => "NONE",
        proto::REPLY_TYPE_OFFSET_DATA => "OFFSET_DATA",
        proto::REPLY_TYPE_OFFSET_HOLE => "OFFSET_HOLE",
        proto::REPLY_TYPE_BLOCK_STATUS => "BLOCK_STATUS",
        proto::REPLY_TYPE_ERROR => "ERROR",
        proto::REPLY_TYPE_ERROR_OFFSET => "ERROR_OFFSET",
        _ => "unknown",
    }
}

/// Check [offset, offset+len) lies inside the request; returns it relative
/// to the request start.
fn range_in_request(p: &Pending, offset: u64, len: u64, what: &str) -> Result<(u32, u32), String> {
    let req_end = p.offset + u64::from(p.len);
    let end = offset
        .checked_add(len)
        .filter(|&end| offset >= p.offset && end <= req_end);
    // Inside the request, both fit its u32 length.
    let relative = end.and_then(|end| {
        let start = u32::try_from(offset - p.offset).ok()?;
        Some((start, u32::try_from(end - p.offset).ok()?))
    });
    relative.ok_or_else(|| {
        format!(
            "{what} at offset {offset} length {len} lies outside the request ({})",
            p.describe()
        )
    })
}

/// Parse BLOCK_STATUS descriptors (length already checked: n * 8 bytes,
/// n >= 1, within MAX_PAYLOAD_BYTES). The last extent may be truncated to
/// the request end; any other extent past it is refused.
fn parse_extents(b: &[u8], p: &Pending) -> Result<Vec<Extent>, String> {
    let count = b.len() / 8;
    let mut extents = Vec::with_capacity(count);
    let req_len = u64::from(p.len);
    let mut pos = 0u64;
    for i in 0..count {
        let len = proto::be_u32(b, i * 8);
        let flags = proto::be_u32(b, i * 8 + 4);
        if len == 0 {
            return Err(format!(
                "zero-length extent #{i} in the reply to {}",
                p.describe()
            ));
        }
        if pos >= req_len {
            return Err(format!(
                "extent #{i} starts at offset {} past the end of the request ({})",
                p.offset + pos,
                p.describe()
            ));
        }
        let mut len = len;
        if pos + u64::from(len) > req_len {
            if i + 1 != count {
                return Err(format!(
                    "extent #{i} reaches past the end of the request ({})",
                    p.describe()
                ));
            }
            // What is left of the request is below `len`, so it fits.
            len = u32::try_from(req_len - pos).unwrap_or(len);
        }
        pos += u64::from(len);
        extents.push(Extent { len, flags });
    }
    Ok(extents)
}
