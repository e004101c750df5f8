//! One receiver stream's I/O loop: a thread per connection reads the
//! transport, decodes frames (`wire::FrameDecoder`), feeds them to the
//! stream's protocol state machine ([`Session`]), carries out the actions
//! it returns on the job and its target, and gives their results back. All
//! protocol decisions are the machine's; this file only does the I/O.
//!
//! Memory per connection is bounded by the protocol: the decoder holds at
//! most one frame (plus one recycled DATA buffer), the machine one
//! decompression buffer of at most the job's chunk size and capped written
//! ranges, and a verify pass (only after DONE, once per stream) or a delta
//! pass's digests one 1 MiB read buffer (`verify`, `digests`).

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tracing::{debug, warn};

use super::digests;
use super::events::{Action, ActionResult, AttachRequest, End, Health, Input, JobInfo};
use super::job::{Attachment, Refusal, Registry};
use super::limits::HandshakeSlot;
use super::session::Session;
use super::transport::{PeerStream, is_timeout};
use super::verify::{self, VerifyingTargets};
use crate::wire::{ByteRange, Frame, FrameDecoder, MAX_RESUME_RANGES};

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

/// The I/O side of one stream.
struct Conn<'a> {
    ctx: &'a ConnContext,
    peer: SocketAddr,
    io: PeerStream,
    decoder: FrameDecoder,
    out: Vec<u8>,
    /// The stream's membership of its job; detaches it when dropped.
    attachment: Option<Attachment>,
    /// A plaintext stream's place among its address's unauthenticated
    /// connections, given back at HELLO.
    unauthenticated: Option<HandshakeSlot>,
    /// A delta pass's read buffer for digests (at most 1 MiB).
    digest_buf: Vec<u8>,
}

/// Runs the protocol on an accepted, authenticated connection until it
/// ends; never panics on peer input.
/// `unauthenticated`: the slot of a plaintext connection, kept until its
/// HELLO.
pub fn serve_connection(
    io: PeerStream,
    peer: SocketAddr,
    unauthenticated: Option<HandshakeSlot>,
    ctx: &ConnContext,
) {
    if let Err(e) = io.set_timeouts() {
        warn!(%peer, "cannot set socket timeouts: {e}; closing the connection");
        return;
    }
    let mut conn = Conn {
        ctx,
        peer,
        io,
        decoder: FrameDecoder::new(),
        out: Vec::new(),
        attachment: None,
        unauthenticated,
        digest_buf: Vec::new(),
    };
    let mut session = Session::new(ctx.max_ranges_per_job, Instant::now());
    loop {
        while let Some(action) = session.poll_action() {
            if let Action::Close(end) = action {
                conn.close(end);
                return;
            }
            if let Some(done) = conn.execute(action) {
                session.complete(done, Instant::now());
            }
        }
        let input = conn.next_input(&mut session);
        session.input(input, Instant::now());
    }
}

impl Conn<'_> {
    fn job_label(&self) -> String {
        self.attachment
            .as_ref()
            .map(|a| format!("{}#{}", a.job.id_hex(), a.stream_index))
            .unwrap_or_default()
    }

    /// Reads until something happens: a frame, bytes, a quiet poll
    /// interval, a stop, the end of the connection.
    fn next_input(&mut self, session: &mut Session) -> Input {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Input::Frame(frame, self.health()),
                Ok(None) => {}
                Err(e) => return Input::Malformed(Refusal::new(e.code(), e.to_string())),
            }
            if self.ctx.stop.load(Ordering::Relaxed) {
                return Input::Stop;
            }
            let progress = self.decoder.data_payload_progress();
            let buf = self.decoder.buf_mut();
            match self.io.read(buf) {
                Ok(0) => return self.closed(),
                Ok(n) => {
                    if let Some(read) = buf.get(..n) {
                        session.payload_arrived(progress, read);
                    }
                    self.decoder.advance(n);
                    return Input::Received;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Input::Idle(self.health()),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return self.closed(),
                Err(e) => return Input::Lost(format!("read failed: {e}")),
            }
        }
    }

    fn closed(&self) -> Input {
        Input::Closed {
            is_mid_frame: self.decoder.is_mid_frame(),
        }
    }

    fn health(&self) -> Health {
        let Some(a) = &self.attachment else {
            return Health::Ok;
        };
        match a.job.failure() {
            Some(refusal) => Health::Failed(refusal),
            None if !a.is_current() => Health::TakenOver,
            None => Health::Ok,
        }
    }

    /// Carries out `action`; its result, if the machine waits for one.
    fn execute(&mut self, action: Action) -> Option<ActionResult> {
        if let Action::Attach(request) = &action {
            return Some(self.attach(request));
        }
        if let Action::Send(frame) = &action {
            return Some(ActionResult::Sent(self.send(frame)));
        }
        if let Action::Recycle(buf) = action {
            self.decoder.recycle(buf);
            return None;
        }
        let Some(a) = &self.attachment else {
            warn!(peer = %self.peer, "{action:?} before the stream attached (a bug); dropped");
            return no_job(&action);
        };
        let job = &a.job;
        let done = match action {
            Action::Write { offset, buf } => {
                let len_bytes = buf.len() as u64;
                let result = job.target.write_at(&buf, offset).map(|()| {
                    job.bytes_written.fetch_add(len_bytes, Ordering::Relaxed);
                    job.target.sync_point()
                });
                ActionResult::Written { buf, result }
            }
            Action::Zero { offset, len_bytes } => ActionResult::Zeroed(
                job.target
                    .zero_range(offset, len_bytes)
                    .map(|()| job.target.sync_point()),
            ),
            Action::Flush { sync_need } => {
                ActionResult::Flushed(job.target.sync_covering(sync_need))
            }
            Action::MakeDurable {
                ranges,
                data_bytes,
                max_ranges,
            } => ActionResult::MadeDurable(job.add_durable_capped(&ranges, data_bytes, max_ranges)),
            Action::FinishStream => {
                let last = job.stream_done(a.stream_index);
                let finished = if last {
                    self.ctx.registry.complete(job)
                } else {
                    Ok(())
                };
                ActionResult::StreamFinished(finished)
            }
            Action::ReadBack { window_bytes } => ActionResult::ReadBack(verify::read_back(
                job,
                window_bytes,
                &self.ctx.verifying,
                &self.ctx.stop,
            )),
            Action::ReadDigests {
                offset,
                len_bytes,
                block_bytes,
            } => ActionResult::Digests(
                digests::digest_blocks(
                    &job.target,
                    (offset, len_bytes, block_bytes),
                    &self.ctx.stop,
                    &mut self.digest_buf,
                    crate::wire::block_digest,
                )
                // A flush that starts after the read covers what it read.
                .map(|d| (d, job.target.sync_point())),
            ),
            Action::SyncForStop => ActionResult::Synced(job.target.sync()),
            Action::FailJob(refusal) => {
                job.fail(refusal);
                return None;
            }
            Action::Attach(_) | Action::Send(_) | Action::Recycle(_) | Action::Close(_) => {
                return None;
            }
        };
        Some(done)
    }

    fn attach(&mut self, request: &AttachRequest) -> ActionResult {
        let hello = &request.hello;
        // A refusal is logged (with the peer) when the stream ends.
        let attachment = match self.ctx.registry.attach(request) {
            Ok(a) => a,
            Err(refusal) => return ActionResult::AttachRefused(refusal),
        };
        let job = &attachment.job;
        debug!(peer = %self.peer, job = %job.id_hex(), stream = hello.stream_index,
               "stream attached");
        let (checkpoint_interval, checkpoint_bytes) = job.checkpoint_policy();
        let info = JobInfo {
            target_name: job.target_name.clone(),
            size_bytes: job.size_bytes,
            chunk_size_bytes: job.chunk_size_bytes,
            stream_count: job.stream_count,
            checkpoint_interval,
            checkpoint_bytes,
            instance: job.instance,
            durable: job
                .durable_ranges(MAX_RESUME_RANGES as usize)
                .into_iter()
                .map(|(offset, len_bytes)| ByteRange { offset, len_bytes })
                .collect(),
            mode: job.pass.mode,
            sync_id: job.pass.welcome_sync_id,
            replan: job.pass.replan.clone(),
            planned: job.pass.planned.clone(),
        };
        self.attachment = Some(attachment);
        self.unauthenticated = None;
        ActionResult::Attached(Box::new(info))
    }

    fn send(&mut self, frame: &Frame) -> std::io::Result<()> {
        self.out.clear();
        frame
            .encode(&mut self.out)
            .map_err(|e| std::io::Error::other(format!("cannot encode a reply: {e}")))?;
        self.io.write_all(&self.out).and_then(|()| self.io.flush())
    }

    /// Logs how the stream ended and closes the connection; dropping the
    /// attachment then detaches the stream from its job.
    fn close(self, end: End) {
        let peer = self.peer;
        let stream = self.job_label();
        match end {
            End::PeerClosed => debug!(%peer, stream, "connection closed by the sender"),
            End::Lost(why) => warn!(%peer, stream, "connection lost: {why}"),
            // Before HELLO on plaintext, anyone can repeat this at will.
            End::Refuse(refusal) => match &self.unauthenticated {
                Some(slot) => {
                    slot.refused(|| format!("ending a stream from {peer}: {}", refusal.message))
                }
                None => warn!(%peer, stream, code = ?refusal.code,
                              "ending the stream: {}", refusal.message),
            },
            End::Stopped => debug!(%peer, stream, "stream stopped: the receiver is shutting down"),
        }
        self.io.close();
    }
}

/// The failure an action gets when the stream has no job (a bug).
fn no_job(action: &Action) -> Option<ActionResult> {
    let e = || std::io::Error::other("the stream has no job");
    Some(match action {
        Action::Write { .. } => ActionResult::Written {
            buf: Vec::new(),
            result: Err(e()),
        },
        Action::Zero { .. } => ActionResult::Zeroed(Err(e())),
        Action::Flush { .. } => ActionResult::Flushed(Err(e())),
        Action::SyncForStop => ActionResult::Synced(Err(e())),
        Action::FailJob(_) => return None,
        _ => ActionResult::StreamFinished(Err(Refusal::new(
            crate::wire::ErrorCode::Internal,
            "the stream has no job",
        ))),
    })
}
