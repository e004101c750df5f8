//! Handing chunks from the workers to other threads (the network senders
//! of `diskferry send`) without copying: a worker lends the slot, the sender
//! gives it back through a per-worker return queue and rings the worker's
//! doorbell (a socket pair the worker waits on through its engine).

#![forbid(unsafe_code)]
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use super::pool::SlotLease;

use crate::sync::lock;

/// One run of a chunk as seen by the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkRun {
    /// Offset from the chunk start.
    pub rel: u32,
    pub len: u32,
    pub zero: bool,
    /// The chunk digest of the run's raw bytes, taken right after the read
    /// (data runs; zeros when the sink takes none, see
    /// [`super::run::DstPlan::Sink`]).
    pub digest: [u8; 32],
}

/// What a worker hands over.
pub enum SinkChunk {
    /// A window that was read: its runs, the lent bytes of the whole
    /// window and, when a verify was asked for, the window's digest.
    Data {
        worker: usize,
        slot: usize,
        offset: u64,
        lease: SlotLease,
        runs: Vec<SinkRun>,
        window_digest: Option<[u8; 32]>,
    },
    /// A range that must read as zeros.
    Zero {
        worker: usize,
        slot: usize,
        offset: u64,
        len: u64,
    },
}

impl SinkChunk {
    pub fn owner(&self) -> (usize, usize) {
        match self {
            SinkChunk::Data { worker, slot, .. } | SinkChunk::Zero { worker, slot, .. } => {
                (*worker, *slot)
            }
        }
    }
}

/// Shared between workers (producers) and senders (consumers).
///
/// A sender with nothing to send parks on a condition variable
/// ([`Sink::wait`]) instead of spinning: on a machine with as many busy
/// threads as cores, a spinning sender takes CPU from the source server and
/// the workers that feed it. A worker rings only when a sender is parked.
pub struct Sink {
    queue: ArrayQueue<SinkChunk>,
    park: Mutex<()>,
    wake: Condvar,
    parked: AtomicUsize,
    returns: Vec<ArrayQueue<usize>>,
    doorbells: Vec<UnixStream>,
    /// Set when every worker has finished: senders stop once the queue is empty.
    producers_done: AtomicBool,
}

impl Sink {
    /// A sink for `workers` workers holding `slots_per_worker[i]` slots:
    /// the queue can hold every slot at once, so a push never fails.
    /// Returns the sink and each worker's doorbell receiving end.
    pub fn new(slots_per_worker: &[usize]) -> std::io::Result<(Sink, Vec<UnixStream>)> {
        let total: usize = slots_per_worker.iter().sum();
        let mut doorbells = Vec::new();
        let mut rx = Vec::new();
        for _ in slots_per_worker {
            let (a, b) = UnixStream::pair()?;
            a.set_nonblocking(true)?;
            doorbells.push(a);
            rx.push(b);
        }
        let returns = slots_per_worker
            .iter()
            .map(|&n| ArrayQueue::new(n.max(1)))
            .collect();
        Ok((
            Sink {
                queue: ArrayQueue::new(total.max(1)),
                park: Mutex::new(()),
                wake: Condvar::new(),
                parked: AtomicUsize::new(0),
                returns,
                doorbells,
                producers_done: AtomicBool::new(false),
            },
            rx,
        ))
    }

    /// Hand a chunk to the senders; wakes one if any is parked. Fails
    /// (giving the chunk back) only if the queue is full, which the sizing
    /// in [`Sink::new`] rules out.
    pub fn push(&self, chunk: SinkChunk) -> Result<(), SinkChunk> {
        self.queue.push(chunk)?;
        // Pairs with the fence in `wait`: either this load sees the parked
        // sender, or that sender's emptiness check sees this chunk.
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) > 0 {
            let _g = lock(&self.park);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The next chunk to send, if any.
    pub fn pop(&self) -> Option<SinkChunk> {
        self.queue.pop()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Park until a chunk may be there, the producers are done, or
    /// `timeout` passes (the caller's own duties: ACKs, barriers, aborts).
    pub fn wait(&self, timeout: Duration) {
        let g = lock(&self.park);
        self.parked.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.queue.is_empty() && !self.producers_done() {
            // Spurious wake-ups and timeouts are both fine: the caller looks again.
            let _ = self.wake.wait_timeout(g, timeout);
        }
        self.parked.fetch_sub(1, Ordering::Relaxed);
    }

    /// Give a slot back to its worker and wake it.
    pub fn release(&self, worker: usize, slot: usize) {
        if self.returns[worker].push(slot).is_err() {
            // Cannot happen: a worker lends each slot at most once.
            tracing::error!("return queue of worker {worker} overflowed");
        }
        // A full doorbell means a wake-up is already pending: ignore EAGAIN.
        let _ = (&self.doorbells[worker]).write(&[1]);
    }

    /// Slots given back to `worker`.
    pub fn take_returned(&self, worker: usize) -> Option<usize> {
        self.returns[worker].pop()
    }

    pub fn set_producers_done(&self) {
        self.producers_done.store(true, Ordering::Release);
        let _g = lock(&self.park);
        self.wake.notify_all();
    }

    pub fn producers_done(&self) -> bool {
        self.producers_done.load(Ordering::Acquire)
    }
}
