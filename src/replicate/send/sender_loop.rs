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

/// One stream's sender for one round: takes lent windows from the sink
/// until the workers are done, then a final barrier. A broken connection
/// is reconnected (what it had not had acknowledged is left for the next
/// round); on a fatal error the job fails and the thread keeps handing
/// slots back so the workers can finish. Returns the connection, all of
/// its data acknowledged.
pub(super) fn sender_thread(ctx: SenderCtx, conn: Conn) -> Option<(Conn, compress::CompressStats)> {
    let mut s = StreamSender {
        policy: Policy::new(ctx.mode),
        comps: Compressors::new(),
        out: Vec::with_capacity(ctx.chunk_bytes as usize + 4096),
        scratch: Vec::with_capacity(64),
        link_bytes_per_s: None,
        last_sample: None,
        written_bytes: 0,
    };
    // A delta pass holds its windows until the receiver's digests came.
    let mut delta = ctx.delta.map(DeltaQueue::new);
    let mut conn = Some(conn);
    let mut broken_since: Option<Instant> = None;
    let mut failed = false;
    let mut last_service = Instant::now();
    let abort = || ctx.shared.aborted();
    loop {
        if failed || ctx.shared.aborted() {
            // Windows waiting for digests go back at once.
            release_delta(&mut delta, &ctx);
        }
        if !failed && conn.is_none() {
            let since = *broken_since.get_or_insert_with(Instant::now);
            match ctx.connector.reconnect(ctx.index, since, &abort) {
                Ok(c) => {
                    conn = Some(c);
                    broken_since = None;
                    s.last_sample = None;
                }
                Err(e) => {
                    failed = true;
                    if !ctx.shared.aborted() {
                        ctx.shared.fail(e);
                    }
                }
            }
        }
        if let Some(c) = conn.as_mut()
            && !failed
            && let Err(b) = service_stream(&mut s, &mut delta, &ctx, c, false)
        {
            s.broken(&ctx, &mut conn, &mut failed, b);
            release_delta(&mut delta, &ctx);
        }
        let Some(chunk) = ctx.sink.pop() else {
            let is_end = ctx.sink.producers_done() && ctx.sink.is_empty();
            if let (Some(d), Some(c)) = (delta.as_mut(), conn.as_mut())
                && !d.is_empty()
                && !failed
            {
                // Nothing new to ask for: handle the oldest reply (all of
                // them at the end) instead of parking.
                let handled = if is_end {
                    d.drain(&mut s, &ctx, c)
                } else {
                    d.handle_front(&mut s, &ctx, c)
                };
                if let Err(b) = handled {
                    s.broken(&ctx, &mut conn, &mut failed, b);
                    release_delta(&mut delta, &ctx);
                }
                continue;
            }
            if is_end {
                break;
            }
            // Nothing to send: now and then read ACKs, send a barrier
            // that came due, keep an idle stream alive; otherwise park
            // until a worker hands over a chunk.
            if last_service.elapsed() >= IDLE_SERVICE {
                last_service = Instant::now();
                if let Some(c) = conn.as_mut()
                    && !failed
                    && let Err(b) = service_stream(&mut s, &mut delta, &ctx, c, true)
                {
                    s.broken(&ctx, &mut conn, &mut failed, b);
                    release_delta(&mut delta, &ctx);
                }
            }
            ctx.sink.wait(PARK_MAX);
            continue;
        };
        let (worker, slot) = chunk.owner();
        if !failed && !ctx.shared.aborted() {
            match (conn.as_mut(), delta.as_mut()) {
                (Some(c), Some(d)) => {
                    // The queue gives the slot back once the window is done.
                    if let Err(b) = d.ask(&mut s, &ctx, c, chunk) {
                        s.broken(&ctx, &mut conn, &mut failed, b);
                        release_delta(&mut delta, &ctx);
                    }
                    continue;
                }
                (Some(c), None) => {
                    if let Err(e) = s.send_chunk(&ctx, c, &chunk) {
                        let b = explain(e, c);
                        s.broken(&ctx, &mut conn, &mut failed, b);
                    }
                }
                (None, _) => {
                    // Reconnecting failed fatally; the job is failing.
                }
            }
        }
        drop(chunk);
        ctx.sink.release(worker, slot);
    }
    release_delta(&mut delta, &ctx);
    if failed || ctx.shared.aborted() {
        if let Some(mut c) = conn {
            c.stream.close();
        }
        return None;
    }
    // The round's end: everything this stream sent must be acknowledged.
    loop {
        let mut c = match conn.take() {
            Some(c) => c,
            None => {
                let since = *broken_since.get_or_insert_with(Instant::now);
                match ctx.connector.reconnect(ctx.index, since, &abort) {
                    Ok(c) => {
                        broken_since = None;
                        c
                    }
                    Err(e) => {
                        if !ctx.shared.aborted() {
                            ctx.shared.fail(e);
                        }
                        return None;
                    }
                }
            }
        };
        match s.final_barrier(&ctx, &mut c) {
            Ok(()) => return Some((c, *s.policy.stats())),
            Err(b) => {
                conn = Some(c);
                s.broken(&ctx, &mut conn, &mut failed, b);
                if failed {
                    return None;
                }
            }
        }
    }
}

/// The stream's periodic duties; a delta stream first handles the digest
/// replies that came (all outstanding ones when a barrier is due).
fn service_stream(
    s: &mut StreamSender,
    delta: &mut Option<DeltaQueue>,
    ctx: &SenderCtx,
    c: &mut Conn,
    idle: bool,
) -> Result<(), Broken> {
    if let Some(d) = delta.as_mut() {
        d.service(s, ctx, c)?;
    }
    s.service(ctx, c, idle)
}

/// Gives back the windows a delta stream still holds (after a broken
/// connection, a failure, or at the end where it holds none).
fn release_delta(delta: &mut Option<DeltaQueue>, ctx: &SenderCtx) {
    if let Some(d) = delta.as_mut() {
        d.release_all(ctx);
    }
}
