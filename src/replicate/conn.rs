//! One receiver stream: HELLO → WELCOME, then DATA / ZERO / BARRIER → ACK,
//! DONE, VERIFY_REQUEST → VERIFY_RESULT, PING → PONG, on one connection.
//!
//! Memory per connection is bounded by the protocol: the decoder holds at
//! most one frame (plus one recycled DATA buffer), the decompression buffer
//! grows to at most the job's chunk size, and a verify pass holds one
//! window (≤ 32 MiB) while it runs.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::job::{Attachment, Refusal, Registry};
use super::ranges::RangeSet;
use super::transport::{Transport, is_timeout};
use crate::compress::{self, Compressors};
use crate::wire::{
    Ack, ByteRange, ChunkDigest, Codec, Data, ErrorCode, ErrorFrame, Features, Frame, FrameDecoder,
    Hello, ImageDigest, MAX_ACK_RANGES, MAX_RESUME_RANGES, StreamingChunkDigest, Welcome,
};

/// A stream that receives nothing (not even a PING) for this long is
/// ended with ERROR(TIMEOUT).
pub const IDLE_TIMEOUT_MS: u64 = 300_000;

/// Features this receiver supports.
pub const SUPPORTED_FEATURES: Features = Features(
    Features::BLAKE3.0 | Features::LZ4.0 | Features::ZSTD.0 | Features::RESUME.0 | Features::XXH3.0,
);

/// What every connection thread shares.
#[derive(Debug)]
pub struct ConnContext {
    pub registry: Arc<Registry>,
    pub stop: Arc<AtomicBool>,
}

/// How a stream ended.
enum End {
    /// The peer closed at a frame boundary.
    PeerClosed,
    /// The connection broke (cut mid-frame, reset, write failure):
    /// nothing more can be sent.
    Lost(String),
    /// Send this ERROR, then close.
    Refuse(Refusal),
    /// The receiver is shutting down.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Streaming,
    /// DONE received: only VERIFY_REQUEST and PING may follow.
    Finished,
}

struct Session<'a> {
    ctx: &'a ConnContext,
    peer: SocketAddr,
    io: Transport,
    decoder: FrameDecoder,
    /// XXH3 of the raw DATA payload being received, taken read by read while
    /// the bytes are still in cache; used instead of a second pass over the
    /// chunk when it covers the whole payload.
    hot_digest: StreamingChunkDigest,
    compressors: Compressors,
    /// Decompressed chunk (at most the job's chunk size).
    raw: Vec<u8>,
    out: Vec<u8>,
    phase: Phase,
    attachment: Option<Attachment>,
    features: Features,
    /// Ranges written on this stream and not reported in an ACK yet.
    pending: RangeSet,
    /// Ranges written on this stream and not flushed by it yet, and the
    /// DATA bytes among them.
    unsynced: RangeSet,
    unsynced_data_bytes: u64,
    /// When this stream last flushed on its own (see [`Session::maybe_settle`]).
    last_settle: Instant,
    /// The flush that covers this stream's writes so far
    /// ([`super::target::Target::sync_point`]).
    sync_need: u64,
    last_seq: Option<u64>,
    /// DATA payload bytes (as sent) received on this stream.
    payload_bytes: u64,
    /// Frames received after HELLO.
    frames: u64,
    last_input: Instant,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> End {
    End::Refuse(Refusal::new(code, message))
}

/// Runs the protocol on an accepted, authenticated connection until it
/// ends; never panics on peer input.
pub fn serve_connection(io: Transport, peer: SocketAddr, ctx: &ConnContext) {
    if let Err(e) = io.set_timeouts() {
        warn!(%peer, "cannot set socket timeouts: {e}; closing the connection");
        return;
    }
    let mut s = Session {
        ctx,
        peer,
        io,
        decoder: FrameDecoder::new(),
        hot_digest: StreamingChunkDigest::new(),
        compressors: Compressors::new(),
        raw: Vec::new(),
        out: Vec::new(),
        phase: Phase::AwaitHello,
        attachment: None,
        features: Features::default(),
        pending: RangeSet::new(),
        unsynced: RangeSet::new(),
        unsynced_data_bytes: 0,
        last_settle: Instant::now(),
        sync_need: 0,
        last_seq: None,
        payload_bytes: 0,
        frames: 0,
        last_input: Instant::now(),
    };
    let end = loop {
        if let Err(end) = s.step() {
            break end;
        }
    };
    s.finish(end);
}

impl Session<'_> {
    fn job_label(&self) -> String {
        self.attachment
            .as_ref()
            .map(|a| format!("{}#{}", a.job.id_hex(), a.stream_index))
            .unwrap_or_default()
    }

    fn finish(mut self, end: End) {
        let peer = self.peer;
        let stream = self.job_label();
        self.settle_pending();
        match end {
            End::PeerClosed => debug!(%peer, stream, "connection closed by the sender"),
            End::Lost(why) => warn!(%peer, stream, "connection lost: {why}"),
            End::Refuse(refusal) => {
                warn!(%peer, stream, code = ?refusal.code, "ending the stream: {}", refusal.message);
                let _ = self.send(&Frame::Error(ErrorFrame {
                    code: refusal.code,
                    message: truncate(refusal.message),
                }));
            }
            End::Stopped => {
                let synced = match &self.attachment {
                    Some(a) => a.job.target.sync().map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let message = match synced {
                    Ok(()) => "the receiver is shutting down; what was acknowledged is durable: \
                               send the job again when it is back"
                        .to_string(),
                    Err(e) => {
                        format!("the receiver is shutting down and its last flush failed: {e}")
                    }
                };
                debug!(%peer, stream, "stopping: {message}");
                let _ = self.send(&Frame::Error(ErrorFrame {
                    code: ErrorCode::Cancelled,
                    message,
                }));
            }
        }
        self.io.close();
        // Dropping the attachment detaches the stream from its job.
    }

    /// What this stream wrote and was not acknowledged yet is flushed and
    /// counted durable (it reaches the journal at the job's next
    /// checkpoint, at the latest when its last stream leaves): a sender
    /// that reconnects or resumes re-sends only what never arrived.
    fn settle_pending(&mut self) {
        let Some(a) = &self.attachment else {
            return;
        };
        self.last_settle = Instant::now();
        if self.unsynced.len() == 0 {
            return;
        }
        match a.job.target.sync_covering(self.sync_need) {
            Ok(()) => {
                a.job.add_durable(
                    self.unsynced.ranges().map(|r| (r.offset, r.len_bytes)),
                    self.unsynced_data_bytes,
                );
                self.unsynced = RangeSet::new();
                self.unsynced_data_bytes = 0;
            }
            Err(e) => warn!(peer = %self.peer, "flush at the end of a stream failed: {e}; \
                            its unacknowledged data will be sent again"),
        }
    }

    /// Receives and handles one frame.
    fn step(&mut self) -> Result<(), End> {
        let frame = self.next_frame()?;
        self.handle(frame)
    }

    fn next_frame(&mut self) -> Result<Frame, End> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => return Err(refuse(e.code(), e.to_string())),
            }
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Err(End::Stopped);
            }
            // Hash raw DATA payloads as they arrive (XXH3 streams; BLAKE3
            // chunks are hashed whole in on_data).
            let hot = match self.decoder.data_payload_progress() {
                Some((Codec::None, got)) if self.features.contains(Features::XXH3) => {
                    if got == 0 {
                        self.hot_digest.reset();
                    }
                    true
                }
                _ => false,
            };
            let buf = self.decoder.buf_mut();
            match self.io.read(buf) {
                Ok(0) => return Err(self.eof()),
                Ok(n) => {
                    if hot && let Some(read) = buf.get(..n) {
                        self.hot_digest.update(read);
                    }
                    self.decoder.advance(n);
                    self.last_input = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => self.on_idle()?,
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Err(self.eof()),
                Err(e) => return Err(End::Lost(format!("read failed: {e}"))),
            }
        }
    }

    fn eof(&self) -> End {
        if self.decoder.is_mid_frame() {
            End::Lost("the sender hung up in the middle of a frame (connection cut)".into())
        } else {
            End::PeerClosed
        }
    }

    fn on_idle(&mut self) -> Result<(), End> {
        if let Some(failure) = self.job_failure() {
            return Err(End::Refuse(failure));
        }
        self.check_current()?;
        if self.last_input.elapsed() > Duration::from_millis(IDLE_TIMEOUT_MS) {
            return Err(refuse(
                ErrorCode::Timeout,
                format!(
                    "nothing received for {} s; the sender must PING on idle streams",
                    IDLE_TIMEOUT_MS / 1000
                ),
            ));
        }
        Ok(())
    }

    /// Ends a connection whose stream was taken over by a newer one.
    fn check_current(&self) -> Result<(), End> {
        match &self.attachment {
            Some(a) if !a.is_current() => Err(End::Lost(
                "the sender reconnected this stream; this older connection ends".into(),
            )),
            _ => Ok(()),
        }
    }

    fn job_failure(&self) -> Option<Refusal> {
        self.attachment.as_ref().and_then(|a| a.job.failure())
    }

    fn send(&mut self, frame: &Frame) -> Result<(), End> {
        self.out.clear();
        frame
            .encode(&mut self.out)
            .map_err(|e| refuse(ErrorCode::Internal, format!("cannot encode a reply: {e}")))?;
        self.io
            .write_all(&self.out)
            .and_then(|()| self.io.flush())
            .map_err(|e| End::Lost(format!("write failed: {e}")))
    }

    fn handle(&mut self, frame: Frame) -> Result<(), End> {
        if self.phase == Phase::AwaitHello {
            return match frame {
                Frame::Hello(hello) => self.on_hello(hello),
                other => Err(refuse(
                    ErrorCode::BadRequest,
                    format!(
                        "the first frame of a stream must be HELLO, got {}",
                        other.frame_type().name()
                    ),
                )),
            };
        }
        self.frames += 1;
        if let Some(failure) = self.job_failure() {
            return Err(End::Refuse(failure));
        }
        self.check_current()?;
        match (self.phase, frame) {
            (Phase::Streaming, Frame::Data(data)) => self.on_data(data),
            (Phase::Streaming, Frame::Zero(range)) => self.on_zero(range),
            (Phase::Streaming, Frame::Barrier { seq }) => self.on_barrier(seq),
            (
                Phase::Streaming,
                Frame::Done {
                    total_bytes_sent,
                    frames,
                },
            ) => self.on_done(total_bytes_sent, frames),
            (_, Frame::VerifyRequest { window_bytes }) => self.on_verify(window_bytes),
            (_, Frame::Ping { nonce }) => self.send(&Frame::Pong { nonce }),
            (_, Frame::Pong { .. }) => Ok(()),
            (_, Frame::Error(e)) => Err(End::Lost(format!(
                "the sender reported an error ({:?}): {}",
                e.code, e.message
            ))),
            (phase, other) => Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "unexpected {} frame {}",
                    other.frame_type().name(),
                    match phase {
                        Phase::Finished => "after DONE",
                        _ => "from a sender",
                    }
                ),
            )),
        }
    }

    fn on_hello(&mut self, hello: Hello) -> Result<(), End> {
        if !hello.features.contains(Features::BLAKE3) {
            return Err(refuse(
                ErrorCode::BadRequest,
                "the sender does not offer BLAKE3 digests, which protocol v1 requires",
            ));
        }
        // A refusal is logged (with the peer) when the stream ends.
        let attachment = self.ctx.registry.attach(&hello).map_err(End::Refuse)?;
        self.features = hello.features.intersect(SUPPORTED_FEATURES);
        debug!(peer = %self.peer, job = %attachment.job.id_hex(),
               stream = hello.stream_index, "stream attached");
        // Every WELCOME lists what is durable now: a sender that believed
        // more (acknowledged before this receiver restarted from an older
        // checkpoint) sends the difference again.
        let instance = attachment.job.instance;
        let durable = attachment
            .job
            .durable_ranges(MAX_RESUME_RANGES as usize)
            .into_iter()
            .map(|(offset, len_bytes)| ByteRange { offset, len_bytes })
            .collect();
        self.attachment = Some(attachment);
        self.phase = Phase::Streaming;
        self.send(&Frame::Welcome(Welcome {
            features: self.features,
            instance,
            durable,
        }))
    }

    fn attachment(&self) -> Result<&Attachment, End> {
        self.attachment
            .as_ref()
            .ok_or_else(|| refuse(ErrorCode::Internal, "stream has no job after HELLO"))
    }

    /// Checks that `[offset, offset + len)` lies within the image.
    fn check_range(&self, offset: u64, len_bytes: u64, what: &str) -> Result<(), End> {
        let size_bytes = self.attachment()?.job.size_bytes;
        match offset.checked_add(len_bytes) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "{what} past the end of the target: offset {offset} + {len_bytes} bytes \
                     is beyond the image size {size_bytes}"
                ),
            )),
        }
    }

    /// Marks the job failed and ends this stream with that failure.
    fn fail_job(&self, code: ErrorCode, message: String) -> End {
        let refusal = Refusal::new(code, message);
        if let Some(a) = &self.attachment {
            a.job.fail(refusal.clone());
        }
        End::Refuse(refusal)
    }

    fn on_data(&mut self, data: Data) -> Result<(), End> {
        let head = data.head;
        let raw_len = head.raw_len_bytes as usize;
        self.check_range(head.offset, u64::from(head.raw_len_bytes), "data")?;
        let chunk_size_bytes = self.attachment()?.job.chunk_size_bytes;
        if head.raw_len_bytes > chunk_size_bytes {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "DATA chunk of {} bytes is larger than the job's chunk size {chunk_size_bytes}",
                    head.raw_len_bytes
                ),
            ));
        }
        let negotiated = match head.codec {
            Codec::None => true,
            Codec::Lz4 => self.features.contains(Features::LZ4),
            Codec::Zstd => self.features.contains(Features::ZSTD),
        };
        if !negotiated {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "DATA uses codec {:?}, which was not negotiated in WELCOME",
                    head.codec
                ),
            ));
        }
        if head.codec != Codec::None {
            let codec = compress::Codec::from_u8(head.codec as u8)
                .map_err(|e| refuse(ErrorCode::Protocol, e.to_string()))?;
            self.raw.resize(raw_len, 0);
            if let Err(e) =
                self.compressors
                    .decompress(codec, &data.payload, raw_len, &mut self.raw[..raw_len])
            {
                return Err(self.fail_job(
                    ErrorCode::DigestMismatch,
                    format!(
                        "chunk at offset {}: {e}; nothing was written for it",
                        head.offset
                    ),
                ));
            }
        }
        let raw: &[u8] = match head.codec {
            Codec::None => &data.payload,
            _ => &self.raw[..raw_len],
        };
        let kind = ChunkDigest::for_features(self.features);
        // The streamed digest counts only if it saw exactly this payload:
        // it restarts at the first payload byte of every raw DATA frame.
        let hot = head.codec == Codec::None
            && kind == ChunkDigest::Xxh3
            && self.hot_digest.len_bytes() == raw.len();
        let digest = if hot {
            self.hot_digest.finish()
        } else {
            kind.digest(raw)
        };
        self.hot_digest.reset();
        if digest != head.raw_digest {
            return Err(self.fail_job(
                ErrorCode::DigestMismatch,
                format!(
                    "chunk at offset {} ({raw_len} bytes) does not match its {} digest: it was \
                     corrupted in flight or in the sender's memory; nothing was written for it",
                    head.offset,
                    kind.name()
                ),
            ));
        }
        let job = &self.attachment()?.job;
        if let Err(e) = job.target.write_at(raw, head.offset) {
            let message = format!(
                "writing {raw_len} bytes at offset {} of {} failed: {e}",
                head.offset,
                job.target.describe()
            );
            return Err(self.fail_job(ErrorCode::TargetIo, message));
        }
        job.bytes_written
            .fetch_add(u64::from(head.raw_len_bytes), Ordering::Relaxed);
        self.sync_need = job.target.sync_point();
        self.pending
            .insert(head.offset, u64::from(head.raw_len_bytes));
        self.unsynced
            .insert(head.offset, u64::from(head.raw_len_bytes));
        self.unsynced_data_bytes += u64::from(head.raw_len_bytes);
        self.payload_bytes += data.payload.len() as u64;
        self.decoder.recycle(data.payload);
        self.maybe_settle();
        Ok(())
    }

    /// The journal must not lag the data by more than a checkpoint
    /// interval (or a share of the checkpoint bytes), whatever the
    /// sender's barriers: flush and count durable what this stream wrote
    /// when that much time or data has passed. ACKs still report it (from
    /// `pending`).
    fn maybe_settle(&mut self) {
        let Some(a) = &self.attachment else {
            return;
        };
        let (interval, bytes) = a.job.checkpoint_policy();
        let share = bytes / u64::from(a.job.stream_count.max(1));
        if self.last_settle.elapsed() >= interval || self.unsynced_data_bytes >= share {
            self.settle_pending();
        }
    }

    fn on_zero(&mut self, range: ByteRange) -> Result<(), End> {
        self.check_range(range.offset, range.len_bytes, "zero range")?;
        let job = &self.attachment()?.job;
        if let Err(e) = job.target.zero_range(range.offset, range.len_bytes) {
            let message = format!(
                "zeroing {} bytes at offset {} of {} failed: {e}",
                range.len_bytes,
                range.offset,
                job.target.describe()
            );
            return Err(self.fail_job(ErrorCode::TargetIo, message));
        }
        self.sync_need = job.target.sync_point();
        self.pending.insert(range.offset, range.len_bytes);
        self.unsynced.insert(range.offset, range.len_bytes);
        self.maybe_settle();
        Ok(())
    }

    fn on_barrier(&mut self, seq: u64) -> Result<(), End> {
        if self.last_seq.is_some_and(|last| seq <= last) {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "BARRIER {seq} does not follow BARRIER {:?}: sequence numbers must increase",
                    self.last_seq
                ),
            ));
        }
        self.last_seq = Some(seq);
        let job = &self.attachment()?.job;
        if let Err(e) = job.target.sync_covering(self.sync_need) {
            let message = format!("flushing {} failed: {e}", job.target.describe());
            return Err(self.fail_job(ErrorCode::TargetIo, message));
        }
        let bytes_durable_total = job.add_durable(
            self.unsynced.ranges().map(|r| (r.offset, r.len_bytes)),
            self.unsynced_data_bytes,
        );
        self.unsynced = RangeSet::new();
        self.unsynced_data_bytes = 0;
        self.last_settle = Instant::now();
        // Ranges past the ACK bound stay pending and are reported by the
        // next ACK (they are durable already and counted in the total).
        let durable_added = self.pending.take_first(MAX_ACK_RANGES as usize);
        self.send(&Frame::Ack(Ack {
            seq,
            bytes_durable_total,
            durable_added,
        }))
    }

    fn on_done(&mut self, total_bytes_sent: u64, frames: u64) -> Result<(), End> {
        if total_bytes_sent != self.payload_bytes {
            return Err(refuse(
                ErrorCode::Protocol,
                format!(
                    "DONE says {total_bytes_sent} DATA payload bytes were sent on this stream, \
                     but {} arrived: a sender bug",
                    self.payload_bytes
                ),
            ));
        }
        // The frame count is informational: senders may or may not count
        // HELLO and DONE themselves, so only the byte count is enforced.
        debug!(peer = %self.peer, frames_said = frames, frames_after_hello = self.frames,
               "stream sent DONE");
        self.settle_pending();
        self.phase = Phase::Finished;
        let attachment = self.attachment()?;
        if attachment.job.stream_done(attachment.stream_index) {
            self.ctx
                .registry
                .complete(&attachment.job)
                .map_err(End::Refuse)?;
        }
        Ok(())
    }

    fn on_verify(&mut self, window_bytes: u32) -> Result<(), End> {
        let started = Instant::now();
        let job = Arc::clone(&self.attachment()?.job);
        let mut digest = ImageDigest::new(job.size_bytes, window_bytes).map_err(|e| {
            refuse(
                ErrorCode::BadRequest,
                format!("VERIFY_REQUEST refused: {e}"),
            )
        })?;
        let mut window = Vec::new();
        let mut extents = Vec::new();
        let mut bytes_read = 0u64;
        let target_io = |what: &str, e: std::io::Error| {
            refuse(
                ErrorCode::TargetIo,
                format!("verify: {what} {} failed: {e}", job.target.describe()),
            )
        };
        for index in 0..digest.windows() {
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Err(End::Stopped);
            }
            let offset = index * u64::from(window_bytes);
            let len = digest.window_len_bytes(index).map_err(internal)?;
            job.target
                .data_extents(offset, u64::from(len), &mut extents)
                .map_err(|e| target_io("mapping", e))?;
            if extents.is_empty() {
                digest.zero_window(index).map_err(internal)?;
            } else {
                window.resize(len as usize, 0);
                job.target
                    .read_at(&mut window[..len as usize], offset)
                    .map_err(|e| target_io("reading", e))?;
                digest
                    .hash_window(index, &window[..len as usize])
                    .map_err(internal)?;
            }
            bytes_read += u64::from(len);
        }
        let digest = digest.finish().map_err(internal)?;
        info!(
            job = %job.id_hex(),
            target = %job.target_name,
            bytes_read,
            duration_s = format!("{:.3}", started.elapsed().as_secs_f64()),
            "verify pass done"
        );
        self.send(&Frame::VerifyResult { digest, bytes_read })
    }
}

fn internal(e: crate::wire::WireError) -> End {
    refuse(ErrorCode::Internal, format!("verify: {e}"))
}

/// Error messages are bounded by the wire's string limit.
fn truncate(mut message: String) -> String {
    let max = crate::wire::MAX_STRING_BYTES;
    if message.len() > max {
        let mut cut = max;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}
