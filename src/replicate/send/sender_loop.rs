//! The sender threads: one per stream, taking windows from the sink until
//! the workers are done (a delta pass through its digest requests,
//! `delta_sender.rs`), reconnecting a broken connection, then the round's
//! final barrier.
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::time::Instant;

use super::delta_sender::DeltaQueue;
use super::link::explain;
use super::{Broken, Conn, IDLE_SERVICE, PARK_MAX, SenderCtx, StreamSender};
use crate::compress::{self, Compressors, Policy};
use crate::pipeline::sink::SinkChunk;

/// One stream's sender for one round: takes lent windows from the sink
/// until the workers are done, then a final barrier. A broken connection
/// is reconnected (what it had not had acknowledged is left for the next
/// round); on a fatal error the job fails and the thread keeps handing
/// slots back so the workers can finish. Returns the connection, all of
/// its data acknowledged.
pub(super) fn sender_thread(ctx: SenderCtx, conn: Conn) -> Option<(Conn, compress::CompressStats)> {
    let mut l = StreamLoop {
        s: StreamSender {
            policy: Policy::new(ctx.mode),
            comps: Compressors::new(),
            out: Vec::with_capacity(ctx.chunk_bytes as usize + 4096),
            scratch: Vec::with_capacity(64),
            link_bytes_per_s: None,
            last_sample: None,
            written_bytes: 0,
        },
        // A delta pass holds its windows until the receiver's digests came.
        delta: ctx.delta.map(DeltaQueue::new),
        ctx,
        conn: Some(conn),
        broken_since: None,
        failed: false,
        last_service: Instant::now(),
    };
    while l.step() {}
    l.release_delta();
    if l.failed || l.ctx.shared.aborted() {
        if let Some(mut c) = l.conn.take() {
            c.stream.close();
        }
        return None;
    }
    l.final_barrier()
}

/// A sender thread's state for one round.
struct StreamLoop {
    ctx: SenderCtx,
    s: StreamSender,
    delta: Option<DeltaQueue>,
    /// `None` while broken (until reconnected) or after a fatal error.
    conn: Option<Conn>,
    broken_since: Option<Instant>,
    /// The job is failing: no more sending, only slots handed back.
    failed: bool,
    last_service: Instant,
}

impl StreamLoop {
    /// One turn: reconnect if needed, service the stream, then send (or
    /// ask digests for) the next window, or wait for one. False once the
    /// workers are done and every window was handled.
    fn step(&mut self) -> bool {
        if self.failed || self.ctx.shared.aborted() {
            // Windows waiting for digests go back at once.
            self.release_delta();
        }
        self.reconnect_if_broken();
        self.service(false);
        match self.ctx.sink.pop() {
            Some(chunk) => {
                self.take(chunk);
                true
            }
            None => self.idle(),
        }
    }

    fn reconnect_if_broken(&mut self) {
        if self.failed || self.conn.is_some() {
            return;
        }
        let since = *self.broken_since.get_or_insert_with(Instant::now);
        let abort = || self.ctx.shared.aborted();
        match self.ctx.connector.reconnect(self.ctx.index, since, &abort) {
            Ok(c) => {
                self.conn = Some(c);
                self.broken_since = None;
                self.s.last_sample = None;
            }
            Err(e) => {
                self.failed = true;
                if !self.ctx.shared.aborted() {
                    self.ctx.shared.fail(e);
                }
            }
        }
    }

    /// The stream's periodic duties; a delta stream first handles the
    /// digest replies that came (all outstanding ones when a barrier is
    /// due).
    fn service(&mut self, idle: bool) {
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if self.failed {
            return;
        }
        let served = match self.delta.as_mut() {
            Some(d) => d.service(&mut self.s, &self.ctx, c),
            None => Ok(()),
        }
        .and_then(|()| self.s.service(&self.ctx, c, idle));
        if let Err(b) = served {
            self.broken(b);
        }
    }

    /// Nothing in the sink: handle a digest reply, or now and then service
    /// the stream and park until a worker hands over a window. False at
    /// the round's end.
    fn idle(&mut self) -> bool {
        let is_end = self.ctx.sink.producers_done() && self.ctx.sink.is_empty();
        if let (Some(d), Some(c)) = (self.delta.as_mut(), self.conn.as_mut())
            && !d.is_empty()
            && !self.failed
        {
            // Nothing new to ask for: handle the oldest reply (all of them
            // at the end) instead of parking.
            let handled = if is_end {
                d.drain(&mut self.s, &self.ctx, c)
            } else {
                d.handle_front(&mut self.s, &self.ctx, c)
            };
            if let Err(b) = handled {
                self.broken(b);
            }
            return true;
        }
        if is_end {
            return false;
        }
        // Now and then read ACKs, send a barrier that came due, keep an
        // idle stream alive; otherwise park until a worker hands over a
        // chunk.
        if self.last_service.elapsed() >= IDLE_SERVICE {
            self.last_service = Instant::now();
            self.service(true);
        }
        self.ctx.sink.wait(PARK_MAX);
        true
    }

    /// A window from the sink: sent, or (delta) its digests asked for;
    /// its slot goes back once it is done with.
    fn take(&mut self, chunk: SinkChunk) {
        let (worker, slot) = chunk.owner();
        if !self.failed && !self.ctx.shared.aborted() {
            match (self.conn.as_mut(), self.delta.as_mut()) {
                (Some(c), Some(d)) => {
                    // The queue gives the slot back once the window is done.
                    if let Err(b) = d.ask(&mut self.s, &self.ctx, c, chunk) {
                        self.broken(b);
                    }
                    return;
                }
                (Some(c), None) => {
                    if let Err(e) = self.s.send_chunk(&self.ctx, c, &chunk) {
                        let b = explain(e, c);
                        self.broken(b);
                    }
                }
                (None, _) => {
                    // Reconnecting failed fatally; the job is failing.
                }
            }
        }
        drop(chunk);
        self.ctx.sink.release(worker, slot);
    }

    /// The connection broke (or the job cannot go on): see
    /// [`StreamSender::broken`]; a delta stream's windows go back.
    fn broken(&mut self, b: Broken) {
        self.s
            .broken(&self.ctx, &mut self.conn, &mut self.failed, b);
        self.release_delta();
    }

    /// Gives back the windows a delta stream still holds.
    fn release_delta(&mut self) {
        if let Some(d) = self.delta.as_mut() {
            d.release_all(&self.ctx);
        }
    }

    /// The round's end: everything this stream sent must be acknowledged.
    fn final_barrier(mut self) -> Option<(Conn, compress::CompressStats)> {
        loop {
            let mut c = match self.conn.take() {
                Some(c) => c,
                None => {
                    let since = *self.broken_since.get_or_insert_with(Instant::now);
                    let abort = || self.ctx.shared.aborted();
                    match self.ctx.connector.reconnect(self.ctx.index, since, &abort) {
                        Ok(c) => {
                            self.broken_since = None;
                            c
                        }
                        Err(e) => {
                            if !self.ctx.shared.aborted() {
                                self.ctx.shared.fail(e);
                            }
                            return None;
                        }
                    }
                }
            };
            match self.s.final_barrier(&self.ctx, &mut c) {
                Ok(()) => return Some((c, *self.s.policy.stats())),
                Err(b) => {
                    self.conn = Some(c);
                    self.s
                        .broken(&self.ctx, &mut self.conn, &mut self.failed, b);
                    if self.failed {
                        return None;
                    }
                }
            }
        }
    }
}
