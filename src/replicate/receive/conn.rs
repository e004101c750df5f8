//! One receiver stream: HELLO → WELCOME, then DATA / ZERO / BARRIER → ACK,
//! DONE, VERIFY_REQUEST → VERIFY_RESULT, PING → PONG, on one connection.
//!
//! Memory per connection is bounded by the protocol: the decoder holds at
//! most one frame (plus one recycled DATA buffer), the decompression buffer
//! grows to at most the job's chunk size, the written ranges are capped
//! (`written`), and a verify pass (only after DONE, once per stream) holds
//! one 1 MiB read buffer (`verify`).

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::job::{Attachment, Refusal, Registry};
use super::limits::{HELLO_TIMEOUT_MS, HandshakeSlot};
use super::transport::{Transport, is_timeout};
use super::unpack::{UnpackError, Unpacker};
use super::verify::{self, VerifyError, VerifyingTargets};
use super::written::{SettleError, Written};
use crate::wire::{
    Ack, ByteRange, Codec, Data, ErrorCode, ErrorFrame, Features, Frame, FrameDecoder, Hello,
    MAX_RESUME_RANGES, Welcome,
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
    /// [`super::limits::PeerLimits::max_ranges_per_job`].
    pub max_ranges_per_job: usize,
    /// Targets a verify pass is reading (one pass per target at a time).
    pub verifying: VerifyingTargets,
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
    /// DONE received: only VERIFY_REQUEST (once) and PING may follow.
    Finished,
}

struct Session<'a> {
    ctx: &'a ConnContext,
    peer: SocketAddr,
    io: Transport,
    decoder: FrameDecoder,
    unpacker: Unpacker,
    out: Vec<u8>,
    phase: Phase,
    attachment: Option<Attachment>,
    features: Features,
    /// What this stream wrote, not yet acknowledged or not yet flushed.
    written: Written,
    /// A verify pass was asked for on this stream (one is allowed).
    verify_asked: bool,
    last_seq: Option<u64>,
    /// DATA payload bytes (as sent) received on this stream.
    payload_bytes: u64,
    /// Frames received after HELLO.
    frames: u64,
    last_input: Instant,
    /// When the stream started, for [`HELLO_TIMEOUT_MS`].
    started: Instant,
    /// A plaintext stream's place among its address's unauthenticated
    /// connections, given back at HELLO.
    unauthenticated: Option<HandshakeSlot>,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> End {
    End::Refuse(Refusal::new(code, message))
}

/// Runs the protocol on an accepted, authenticated connection until it
/// ends; never panics on peer input.
/// `unauthenticated`: the slot of a plaintext connection, kept until its
/// HELLO.
pub fn serve_connection(
    io: Transport,
    peer: SocketAddr,
    unauthenticated: Option<HandshakeSlot>,
    ctx: &ConnContext,
) {
    if let Err(e) = io.set_timeouts() {
        warn!(%peer, "cannot set socket timeouts: {e}; closing the connection");
        return;
    }
    let mut s = Session {
        ctx,
        peer,
        io,
        decoder: FrameDecoder::new(),
        unpacker: Unpacker::new(),
        out: Vec::new(),
        phase: Phase::AwaitHello,
        attachment: None,
        features: Features::default(),
        written: Written::new(ctx.max_ranges_per_job),
        verify_asked: false,
        last_seq: None,
        payload_bytes: 0,
        frames: 0,
        last_input: Instant::now(),
        started: Instant::now(),
        unauthenticated,
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
                // Before HELLO on plaintext, anyone can repeat this at will.
                match &self.unauthenticated {
                    Some(slot) => {
                        slot.refused(|| format!("ending a stream from {peer}: {}", refusal.message))
                    }
                    None => warn!(%peer, stream, code = ?refusal.code,
                                  "ending the stream: {}", refusal.message),
                }
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
        if !self.written.has_unsynced() {
            return;
        }
        if let Err(e) = self.written.settle(&a.job) {
            warn!(peer = %self.peer, "what this stream wrote last is not counted durable: {e}; \
                  it will be sent again");
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
            if self.phase == Phase::AwaitHello
                && self.started.elapsed() > Duration::from_millis(HELLO_TIMEOUT_MS)
            {
                return Err(refuse(
                    ErrorCode::Timeout,
                    format!("no HELLO within {HELLO_TIMEOUT_MS} ms of connecting"),
                ));
            }
            // Hash raw DATA payloads as they arrive (XXH3 streams; BLAKE3
            // chunks are hashed whole in on_data).
            let hot = match self.decoder.data_payload_progress() {
                Some((Codec::None, got)) if self.features.contains(Features::XXH3) => Some(got),
                _ => None,
            };
            let buf = self.decoder.buf_mut();
            match self.io.read(buf) {
                Ok(0) => return Err(self.eof()),
                Ok(n) => {
                    if let Some(got) = hot
                        && let Some(read) = buf.get(..n)
                    {
                        self.unpacker.hash_arriving(got, read);
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
            (Phase::Finished, Frame::VerifyRequest { window_bytes }) => {
                self.on_verify(window_bytes)
            }
            (Phase::Streaming, Frame::VerifyRequest { .. }) => Err(refuse(
                ErrorCode::Protocol,
                "VERIFY_REQUEST before DONE: a stream asks for a verify pass only after its DONE",
            )),
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
        self.unauthenticated = None;
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
        self.check_range(head.offset, u64::from(head.raw_len_bytes), "data")?;
        let job = Arc::clone(&self.attachment()?.job);
        let raw = match self
            .unpacker
            .unpack(&data, self.features, job.chunk_size_bytes)
        {
            Ok(raw) => raw,
            Err(UnpackError::Refuse(refusal)) => return Err(End::Refuse(refusal)),
            Err(UnpackError::Damaged(refusal)) => {
                return Err(self.fail_job(refusal.code, refusal.message));
            }
        };
        if let Err(e) = job.target.write_at(raw, head.offset) {
            let message = format!(
                "writing {} bytes at offset {} of target {:?} failed: {e}",
                head.raw_len_bytes, head.offset, job.target_name
            );
            return Err(self.fail_job(ErrorCode::TargetIo, message));
        }
        let raw_len_bytes = u64::from(head.raw_len_bytes);
        job.bytes_written
            .fetch_add(raw_len_bytes, Ordering::Relaxed);
        let noted = self.written.note(
            head.offset,
            raw_len_bytes,
            raw_len_bytes,
            job.target.sync_point(),
        );
        self.payload_bytes += data.payload.len() as u64;
        self.decoder.recycle(data.payload);
        if let Err(e) = noted {
            return Err(self.fail_job(ErrorCode::Protocol, e.to_string()));
        }
        self.maybe_settle()
    }

    /// Flushes and counts durable what this stream wrote when a settle is
    /// due ([`Written::settle_due`]). ACKs still report it.
    fn maybe_settle(&mut self) -> Result<(), End> {
        let Some(a) = &self.attachment else {
            return Ok(());
        };
        if !self.written.settle_due(&a.job) || !self.written.has_unsynced() {
            return Ok(());
        }
        match self.written.settle(&a.job) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.settle_failed(e)),
        }
    }

    /// A failed settle fails the job: a flush error is the target's, a
    /// cap passed is the sender's.
    fn settle_failed(&self, e: SettleError) -> End {
        let Some(a) = &self.attachment else {
            return refuse(ErrorCode::Internal, "stream has no job after HELLO");
        };
        match e {
            SettleError::Flush(e) => {
                let message = format!("flushing target {:?} failed: {e}", a.job.target_name);
                self.fail_job(ErrorCode::TargetIo, message)
            }
            SettleError::Cap(e) => self.fail_job(ErrorCode::Protocol, e.to_string()),
        }
    }

    fn on_zero(&mut self, range: ByteRange) -> Result<(), End> {
        self.check_range(range.offset, range.len_bytes, "zero range")?;
        let job = &self.attachment()?.job;
        if let Err(e) = job.target.zero_range(range.offset, range.len_bytes) {
            let message = format!(
                "zeroing {} bytes at offset {} of target {:?} failed: {e}",
                range.len_bytes, range.offset, job.target_name
            );
            return Err(self.fail_job(ErrorCode::TargetIo, message));
        }
        let noted = self
            .written
            .note(range.offset, range.len_bytes, 0, job.target.sync_point());
        if let Err(e) = noted {
            return Err(self.fail_job(ErrorCode::Protocol, e.to_string()));
        }
        self.maybe_settle()
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
        let job = Arc::clone(&self.attachment()?.job);
        let bytes_durable_total = self
            .written
            .settle(&job)
            .map_err(|e| self.settle_failed(e))?;
        let durable_added = self.written.take_acked();
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
        if self.verify_asked {
            return Err(refuse(
                ErrorCode::Protocol,
                "a second VERIFY_REQUEST on this stream: one verify pass per stream",
            ));
        }
        self.verify_asked = true;
        let job = Arc::clone(&self.attachment()?.job);
        let (digest, bytes_read) =
            verify::read_back(&job, window_bytes, &self.ctx.verifying, &self.ctx.stop).map_err(
                |e| match e {
                    VerifyError::Stopped => End::Stopped,
                    VerifyError::Refused(refusal) => End::Refuse(refusal),
                },
            )?;
        self.send(&Frame::VerifyResult { digest, bytes_read })
    }
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
