//! `send --delta` on one stream: for each window it takes from the sink, the
//! sender asks the receiver for its target's block digests (DIGEST_REQUEST)
//! and keeps up to [`DELTA_ASKED_MAX`] requests outstanding, so the
//! receiver reads its target while the workers read the source. When a
//! reply (DIGESTS) comes, the window's blocks are compared (`delta.rs`)
//! and only the differing ones are sent; then the slot goes back.
//!
//! Durability: the receiver counts a requested range as written (its
//! target bytes, as they are) only at the stream's next BARRIER or DONE,
//! so the sender sends every correction of a range before either:
//! [`Conn::digests_open`] is zero whenever a barrier goes out.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::delta::{
    DIGEST_REQUEST_MAX_BYTES, Piece, SourceBytes, check_reply, clip_runs, plan_delta,
};
use super::link::explain;
use super::sender::note_image;
use super::{Broken, Conn, SenderCtx, StreamSender, fail_msg, write_frame};
use crate::pipeline::sink::{SinkChunk, SinkRun};
use crate::wire::{self, ChunkDigest, Frame};

/// Digest requests a stream keeps outstanding.
pub(super) const DELTA_ASKED_MAX: usize = 4;
/// Digests one reply holds at most: the replies outstanding on a stream
/// (at most 64 KiB of them) fit the sender's socket buffer, so a receiver
/// blocked writing one never waits for a sender blocked writing DATA.
const DIGESTS_PER_REQUEST_MAX: u64 = 1024;
/// A delta stream asks for a barrier after comparing this many bytes (the
/// equal blocks become durable with it).
pub(super) const DELTA_BARRIER_COMPARED_BYTES: u64 = 256 << 20;

/// What a delta stream needs to know.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeltaCtx {
    pub block_bytes: u32,
    /// The digest DATA frames carry (a piece of a run needs its own).
    pub run_digest: ChunkDigest,
}

/// A reply the receiver sent, not handled yet.
#[derive(Debug)]
pub(super) struct DigestsReply {
    pub offset: u64,
    pub block_bytes: u32,
    pub digests: Vec<[u8; 16]>,
}

/// One request sent and not answered yet.
#[derive(Debug)]
struct Asked {
    /// Bytes from the start of its chunk.
    rel: u64,
    len_bytes: u32,
    /// The chunk's last request: its slot goes back once this is handled.
    is_last: bool,
}

/// One stream's outstanding digest requests and the chunks they are for.
pub(super) struct DeltaQueue {
    cfg: DeltaCtx,
    asked: VecDeque<Asked>,
    /// The chunks of `asked`, oldest first.
    chunks: VecDeque<SinkChunk>,
}

fn chunk_span(chunk: &SinkChunk) -> (u64, u64) {
    match chunk {
        SinkChunk::Data { offset, lease, .. } => (*offset, lease.bytes().len() as u64),
        SinkChunk::Zero { offset, len, .. } => (*offset, *len),
    }
}

impl DeltaQueue {
    pub(super) fn new(cfg: DeltaCtx) -> Self {
        DeltaQueue {
            cfg,
            asked: VecDeque::new(),
            chunks: VecDeque::new(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Asks for the digests of `chunk`'s range (in requests of at most
    /// [`DIGEST_REQUEST_MAX_BYTES`]), handling replies whenever
    /// [`DELTA_ASKED_MAX`] requests are outstanding. The queue owns the
    /// chunk from now on (see [`DeltaQueue::release_all`]).
    pub(super) fn ask(
        &mut self,
        s: &mut StreamSender,
        ctx: &SenderCtx,
        c: &mut Conn,
        chunk: SinkChunk,
    ) -> Result<(), Broken> {
        let (offset, len) = chunk_span(&chunk);
        if len == 0 {
            // Nothing to compare (no planner makes one): straight back.
            let (worker, slot) = chunk.owner();
            drop(chunk);
            ctx.sink.release(worker, slot);
            return Ok(());
        }
        self.chunks.push_back(chunk);
        let mut rel = 0u64;
        while rel < len {
            while self.asked.len() >= DELTA_ASKED_MAX {
                self.handle_front(s, ctx, c)?;
            }
            let n = (len - rel).min(self.request_max_bytes());
            let len_bytes = u32::try_from(n).expect("at most 32 MiB");
            let frame = Frame::DigestRequest {
                offset: offset + rel,
                len_bytes,
                block_bytes: self.cfg.block_bytes,
            };
            let sent = {
                let (stream, scratch) = (&mut c.stream, &mut s.scratch);
                c.watch.busy(|| {
                    let n = write_frame(stream, &frame, scratch)?;
                    std::io::Write::flush(stream)?;
                    Ok::<_, super::StreamError>(n)
                })
            };
            let frame_bytes = sent.map_err(|e| explain(e, c))?;
            s.account(ctx, c, frame_bytes as u64);
            c.digests_open += 1;
            c.unbarriered_compared_bytes += n;
            rel += n;
            self.asked.push_back(Asked {
                rel: rel - n,
                len_bytes,
                is_last: rel >= len,
            });
        }
        Ok(())
    }

    /// Handles the replies already received (none is waited for), and
    /// every outstanding one when a barrier is due (none may go out while
    /// a range's corrections are not sent).
    pub(super) fn service(
        &mut self,
        s: &mut StreamSender,
        ctx: &SenderCtx,
        c: &mut Conn,
    ) -> Result<(), Broken> {
        s.poll(ctx, c, false)?;
        while !c.digests.is_empty() && !self.asked.is_empty() {
            self.handle_front(s, ctx, c)?;
        }
        if s.barrier_due(c) {
            self.drain(s, ctx, c)?;
        }
        Ok(())
    }

    /// The longest request for this block size: its reply holds at most
    /// [`DIGESTS_PER_REQUEST_MAX`] digests.
    fn request_max_bytes(&self) -> u64 {
        (u64::from(self.cfg.block_bytes) * DIGESTS_PER_REQUEST_MAX)
            .min(u64::from(DIGEST_REQUEST_MAX_BYTES))
    }

    /// Waits for and handles every outstanding reply.
    pub(super) fn drain(
        &mut self,
        s: &mut StreamSender,
        ctx: &SenderCtx,
        c: &mut Conn,
    ) -> Result<(), Broken> {
        while !self.asked.is_empty() {
            self.handle_front(s, ctx, c)?;
        }
        Ok(())
    }

    /// Waits for the oldest request's reply, sends what differs, and gives
    /// the chunk back when it was its last request.
    pub(super) fn handle_front(
        &mut self,
        s: &mut StreamSender,
        ctx: &SenderCtx,
        c: &mut Conn,
    ) -> Result<(), Broken> {
        while c.digests.is_empty() {
            s.poll(ctx, c, true)?;
        }
        let (Some(reply), Some(asked), Some(chunk)) = (
            c.digests.pop_front(),
            self.asked.pop_front(),
            self.chunks.front(),
        ) else {
            return Err(Broken::Fatal(fail_msg(
                "the receiver sent DIGESTS that were not asked for",
            )));
        };
        let (chunk_offset, _) = chunk_span(chunk);
        let offset = chunk_offset + asked.rel;
        let block_bytes = self.cfg.block_bytes;
        check_reply(
            (offset, asked.len_bytes, block_bytes),
            (reply.offset, reply.block_bytes),
            reply.digests.len(),
        )
        .map_err(|e| Broken::Fatal(fail_msg(e)))?;
        let rel0 = usize::try_from(asked.rel).expect("a window is at most 32 MiB");
        let len = asked.len_bytes as usize;
        let (bytes, runs): (&[u8], Cow<'_, [SinkRun]>) = match chunk {
            SinkChunk::Data { lease, runs, .. } if rel0 == 0 && len == lease.bytes().len() => {
                (lease.bytes(), Cow::Borrowed(runs.as_slice()))
            }
            SinkChunk::Data { lease, runs, .. } => (
                &lease.bytes()[rel0..rel0 + len],
                Cow::Owned(clip_runs(runs, asked.rel, asked.len_bytes)),
            ),
            SinkChunk::Zero { .. } => (&[], Cow::Borrowed(&[][..])),
        };
        let source = match chunk {
            SinkChunk::Data { .. } => SourceBytes::Read { bytes, runs: &runs },
            SinkChunk::Zero { .. } => SourceBytes::Zeros {
                len_bytes: asked.len_bytes,
            },
        };
        let plan = plan_delta(source, block_bytes, &reply.digests, wire::block_digest)
            .map_err(|e| Broken::Fatal(fail_msg(e)))?;
        for piece in &plan.pieces {
            let sent = match *piece {
                Piece::Zero { rel, len } => {
                    ctx.job
                        .delta_zeroed_bytes
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    s.zero(ctx, c, offset + u64::from(rel), u64::from(len))
                }
                Piece::Data { rel, len } => {
                    let raw = &bytes[rel as usize..(rel + len) as usize];
                    // The workers took no run digests for a delta pass:
                    // only what differs is digested, from the lent bytes.
                    let digest = self.cfg.run_digest.digest(raw);
                    s.data(ctx, c, offset + u64::from(rel), raw, digest)
                }
            };
            sent.map_err(|e| explain(e, c))?;
        }
        ctx.job
            .bytes_changed
            .fetch_add(plan.bytes_changed, Ordering::Relaxed);
        c.digests_open -= 1;
        if asked.is_last {
            let chunk = self.chunks.pop_front().expect("the front chunk");
            let noted = note_image(ctx, &chunk);
            let (worker, slot) = chunk.owner();
            drop(chunk);
            ctx.sink.release(worker, slot);
            noted.map_err(|e| explain(e, c))?;
        }
        Ok(())
    }

    /// The connection broke or the job failed: every chunk goes back
    /// unsent (its windows are not acknowledged, so a later round sends
    /// them again).
    pub(super) fn release_all(&mut self, ctx: &SenderCtx) {
        self.asked.clear();
        for chunk in self.chunks.drain(..) {
            let (worker, slot) = chunk.owner();
            drop(chunk);
            ctx.sink.release(worker, slot);
        }
    }
}
