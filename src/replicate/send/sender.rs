//! What a sender thread (`sender_loop.rs`) does on its stream: frame and
//! compress windows, ask for barriers, read the receiver's replies.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use super::delta_sender::{DELTA_BARRIER_COMPARED_BYTES, DigestsReply};
use super::link::classify;
use super::*;

impl StreamSender {
    /// A connection broke: log, count, and leave it for reconnection (or
    /// fail the job).
    pub(super) fn broken(
        &mut self,
        ctx: &SenderCtx,
        conn: &mut Option<Conn>,
        failed: &mut bool,
        b: Broken,
    ) {
        if let Some(mut c) = conn.take() {
            c.stream.close();
        }
        match b {
            Broken::Transient(why) => {
                ctx.job.reconnects.fetch_add(1, Ordering::Relaxed);
                warn!(
                    stream = ctx.index,
                    "stream lost: {why}; reconnecting (unacknowledged data will be sent again)"
                );
            }
            Broken::Fatal(e) => {
                *failed = true;
                ctx.shared.fail(match e {
                    CopyError::TargetWrite(m) => {
                        CopyError::TargetWrite(format!("(stream {}) {m}", ctx.index))
                    }
                    other => other,
                });
            }
        }
    }

    /// Reads what the receiver sent (ACKs, PONGs, an ERROR) without
    /// blocking, sends a barrier when one is due, keeps an `idle` stream
    /// alive, and notices a receiver that stopped answering.
    pub(super) fn service(
        &mut self,
        ctx: &SenderCtx,
        c: &mut Conn,
        idle: bool,
    ) -> Result<(), Broken> {
        self.poll(ctx, c, false)?;
        // No barrier while a digest request's corrections are unsent (see
        // `delta_sender.rs`).
        if self.barrier_due(c) && c.digests_open == 0 {
            self.barrier(c).map_err(classify)?;
        }
        while c.outstanding.len() > MAX_OUTSTANDING_BARRIERS {
            self.poll(ctx, c, true)?;
        }
        if let Some(&(seq, t)) = c.outstanding.front()
            && t.elapsed() > ctx.connector.stall_timeout
        {
            return Err(Broken::Transient(format!(
                "no acknowledgement of barrier {seq} for {:.1} s (--stall-timeout)",
                t.elapsed().as_secs_f64()
            )));
        }
        if idle && c.outstanding.is_empty() && c.last_write.elapsed() >= KEEPALIVE {
            write_frame(&mut c.stream, &Frame::Ping { nonce: 1 }, &mut self.scratch)
                .map_err(classify)?;
            c.stream.flush().map_err(|e| classify(e.into()))?;
            c.last_write = Instant::now();
        }
        Ok(())
    }

    /// Whether the stream should ask for a barrier now: enough bytes sent
    /// (or, in a delta pass, compared) or the first of them long enough ago.
    pub(super) fn barrier_due(&self, c: &Conn) -> bool {
        let unbarriered = c.unbarriered_bytes > 0 || c.unbarriered_compared_bytes > 0;
        c.unbarriered_bytes >= BARRIER_BYTES
            || c.unbarriered_compared_bytes >= DELTA_BARRIER_COMPARED_BYTES
            || (unbarriered
                && c.unbarriered_since
                    .is_some_and(|t| t.elapsed() >= BARRIER_INTERVAL))
    }

    pub(super) fn barrier(&mut self, c: &mut Conn) -> Result<(), StreamError> {
        let seq = c.next_seq;
        c.next_seq += 1;
        let (stream, scratch) = (&mut c.stream, &mut self.scratch);
        c.watch.busy(|| -> Result<(), StreamError> {
            write_frame(stream, &Frame::Barrier { seq }, scratch)?;
            stream.flush()?;
            Ok(())
        })?;
        c.outstanding.push_back((seq, Instant::now()));
        c.unbarriered_bytes = 0;
        c.unbarriered_compared_bytes = 0;
        c.unbarriered_since = None;
        c.last_write = Instant::now();
        Ok(())
    }

    /// Handles frames from the receiver: those already buffered, and more
    /// if the socket has some; with `block`, waits (at most the stall
    /// timeout) until at least one frame was handled.
    pub(super) fn poll(
        &mut self,
        ctx: &SenderCtx,
        c: &mut Conn,
        block: bool,
    ) -> Result<(), Broken> {
        let mut handled = false;
        loop {
            match c.dec.next_frame() {
                Ok(Some(frame)) => {
                    handle_reply(ctx, c, frame)?;
                    handled = true;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(classify(StreamError::Wire(e))),
            }
            let ready = (block && !handled)
                || plaintext_ready(&mut c.stream)
                || crate::engine::tcpinfo::bytes_readable(c.stream.tcp()).is_ok_and(|n| n > 0);
            if !ready {
                return Ok(());
            }
            let (stream, dec) = (&mut c.stream, &mut c.dec);
            let read = c.watch.busy(|| std::io::Read::read(stream, dec.buf_mut()));
            match read {
                Ok(0) => {
                    return Err(Broken::Transient(
                        "the receiver closed the connection".into(),
                    ));
                }
                Ok(n) => c.dec.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(classify(StreamError::Io(e))),
            }
        }
    }

    /// Barrier for everything sent, then wait until it is acknowledged.
    pub(super) fn final_barrier(&mut self, ctx: &SenderCtx, c: &mut Conn) -> Result<(), Broken> {
        if c.digests_open > 0 {
            return Err(Broken::Fatal(CopyError::Internal(format!(
                "stream {}: a final barrier with {} digest requests not answered (a bug)",
                ctx.index, c.digests_open
            ))));
        }
        self.barrier(c).map_err(classify)?;
        while !c.outstanding.is_empty() {
            self.poll(ctx, c, true)?;
        }
        Ok(())
    }

    pub(super) fn send_chunk(
        &mut self,
        ctx: &SenderCtx,
        c: &mut Conn,
        chunk: &SinkChunk,
    ) -> Result<(), StreamError> {
        match chunk {
            SinkChunk::Zero { offset, len, .. } => {
                self.zero(ctx, c, *offset, *len)?;
            }
            SinkChunk::Data {
                offset,
                lease,
                runs,
                ..
            } => {
                let bytes = lease.bytes();
                for r in runs {
                    let at = offset + u64::from(r.rel);
                    if r.zero {
                        self.zero(ctx, c, at, u64::from(r.len))?;
                        continue;
                    }
                    let raw = &bytes[r.rel as usize..(r.rel + r.len) as usize];
                    self.data(ctx, c, at, raw, r.digest)?;
                }
            }
        }
        note_image(ctx, chunk)
    }

    pub(super) fn zero(
        &mut self,
        ctx: &SenderCtx,
        c: &mut Conn,
        offset: u64,
        len: u64,
    ) -> Result<(), StreamError> {
        let (stream, scratch) = (&mut c.stream, &mut self.scratch);
        let frame = Frame::Zero(ByteRange {
            offset,
            len_bytes: len,
        });
        let n = c.watch.busy(|| write_frame(stream, &frame, scratch))?;
        self.account(ctx, c, n as u64);
        Ok(())
    }

    pub(super) fn data(
        &mut self,
        ctx: &SenderCtx,
        c: &mut Conn,
        offset: u64,
        raw: &[u8],
        digest: [u8; 32],
    ) -> Result<(), StreamError> {
        // Until a backlog shows the link's rate, the link counts as fast
        // (raw); a slow link shows itself after the first frame or two.
        let link = LinkState {
            link_bytes_per_s: ctx
                .rate_per_stream
                .or(self.link_bytes_per_s.filter(|_| !ctx.loopback)),
            cores_for_compression: ctx.cores_per_stream,
        };
        let choice = self.policy.choose(raw, &link);
        let mut codec = wire::Codec::None;
        let mut payload: &[u8] = raw;
        let frame_no = ctx.job.data_frames.fetch_add(1, Ordering::Relaxed) + 1;
        let corrupted;
        if ctx.test_hooks.corrupts(frame_no) {
            warn!(
                offset,
                "test hook: corrupting this chunk after its digest was taken"
            );
            let mut bad = raw.to_vec();
            bad[0] ^= 0x01;
            corrupted = bad;
            payload = &corrupted;
        } else if choice.codec != compress::Codec::None {
            let t = Instant::now();
            let ok = self
                .comps
                .compress(choice.codec, choice.level, raw, &mut self.out)
                .is_ok();
            let used = ok && !self.out.is_empty() && self.out.len() < raw.len();
            self.policy.record(
                if used {
                    choice.codec
                } else {
                    compress::Codec::None
                },
                choice.level,
                raw.len(),
                if used { self.out.len() } else { raw.len() },
                t.elapsed(),
            );
            if used {
                codec = choice.codec;
                payload = &self.out;
            }
        }
        let head = DataHead {
            offset,
            raw_len_bytes: frame_len(raw.len())?,
            codec,
            raw_digest: digest,
        };
        let header = wire::encode_data_header(&head, frame_len(payload.len())?)?;
        let frame_bytes = (header.len() + payload.len()) as u64;
        ctx.control.rate().acquire(frame_bytes);
        let stream = &mut c.stream;
        c.watch.busy(|| stream.write_parts(&[&header, payload]))?;
        // How fast this stream drains: bytes the receiver acknowledged per
        // second, sampled only over intervals that began with a backlog in
        // flight (so an idle stream, waiting for the source, does not look
        // like a slow link; and a large socket buffer swallowing a write does
        // not look like a fast one).
        self.written_bytes += frame_bytes;
        let now = Instant::now();
        if let Ok(acked) = crate::engine::tcpinfo::bytes_acked(c.stream.tcp()) {
            if let Some((t0, acked0, written0)) = self.last_sample {
                let dt = now.duration_since(t0).as_secs_f64();
                if written0.saturating_sub(acked0) >= BACKLOG_MIN_BYTES && dt >= 0.005 {
                    let rate = acked.saturating_sub(acked0) as f64 / dt;
                    self.link_bytes_per_s = Some(match self.link_bytes_per_s {
                        Some(old) => old * 0.7 + rate * 0.3,
                        None => rate,
                    });
                }
            }
            self.last_sample = Some((now, acked, self.written_bytes));
        }
        c.payload_bytes += payload.len() as u64;
        self.account(ctx, c, frame_bytes);
        let len = raw.len() as u64;
        let new = lock(&ctx.job.sent).insert(offset, len);
        if new < len {
            ctx.job.bytes_resent.fetch_add(len - new, Ordering::Relaxed);
        }
        Stats::add(&ctx.shared.stats.bytes_written, len);
        Ok(())
    }

    pub(super) fn account(&mut self, ctx: &SenderCtx, c: &mut Conn, n: u64) {
        c.frames += 1;
        c.unbarriered_bytes += n;
        c.unbarriered_since.get_or_insert_with(Instant::now);
        c.last_write = Instant::now();
        ctx.job.bytes_on_wire.fetch_add(n, Ordering::Relaxed);
    }
}

/// A chunk was sent: with a verify asked for, its windows' digests go
/// into the source's image digest.
pub(super) fn note_image(ctx: &SenderCtx, chunk: &SinkChunk) -> Result<(), StreamError> {
    match chunk {
        SinkChunk::Zero { offset, len, .. } if ctx.verify => {
            let mut img = lock(&ctx.image);
            let w = u64::from(ctx.chunk_bytes);
            for i in offset / w..(offset + len).div_ceil(w) {
                img.zero_window(i)?;
            }
        }
        SinkChunk::Data {
            offset,
            window_digest: Some(d),
            ..
        } => {
            let i = offset / u64::from(ctx.chunk_bytes);
            lock(&ctx.image).set_window(i, *d)?;
        }
        _ => {}
    }
    Ok(())
}

/// One frame from the receiver while sending.
pub(super) fn handle_reply(ctx: &SenderCtx, c: &mut Conn, frame: Frame) -> Result<(), Broken> {
    match frame {
        Frame::Ack(a) => {
            while c.outstanding.front().is_some_and(|&(s, _)| s <= a.seq) {
                c.outstanding.pop_front();
            }
            if !ctx.job.apply_ack(c.instance, &a.durable_added) {
                return Err(Broken::Transient(
                    "acknowledgement from a receiver instance that has restarted since".into(),
                ));
            }
            Ok(())
        }
        Frame::Pong { .. } => Ok(()),
        Frame::Digests {
            offset,
            block_bytes,
            digests,
        } if ctx.delta.is_some() && c.digests.len() < c.digests_open => {
            c.digests.push_back(DigestsReply {
                offset,
                block_bytes,
                digests,
            });
            Ok(())
        }
        Frame::Error(e) => Err(classify(refused(e))),
        other => Err(classify(unexpected(other))),
    }
}

/// Plaintext rustls has decrypted but we have not read yet.
pub(super) fn plaintext_ready(s: &mut Stream) -> bool {
    match s {
        Stream::Tls(t) => t
            .conn
            .process_new_packets()
            .is_ok_and(|st| st.plaintext_bytes_to_read() > 0),
        Stream::Plain(_) => false,
    }
}

/// A chunk's or payload's length as the `u32` of a DATA frame. Chunks are
/// at most `wire::MAX_CHUNK_BYTES`, so the error is a bug upstream.
fn frame_len(len_bytes: usize) -> Result<u32, StreamError> {
    u32::try_from(len_bytes).map_err(|_| {
        let what = format!("a chunk of {len_bytes} bytes does not fit a DATA frame");
        StreamError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, what))
    })
}
