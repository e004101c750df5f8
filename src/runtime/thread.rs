//! One pinned worker thread of the [`super::Engine`]: it owns an I/O engine
//! (created on the thread, for the engine's whole life) and multiplexes the
//! work contexts attached to it. A job context ([`Worker`]) is one kind of
//! work: a disk's share of slots, its connections and its work queue. The
//! loop is written so other kinds (receiver connections) can join it.
//!
//! Every op a context pushes carries the context's number in bits
//! [`CTX_SHIFT`]..60 of its `user_data` (added by the context's [`Port`]),
//! so a completion finds its context; number 0 is the thread's own
//! doorbell, a socket pair that wakes the thread out of its engine when a
//! context arrives, a job is resumed or cancelled, or the engine stops.

use crate::sync::lock;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::engine::{self, Completion, EngineError, EngineKind, IoEngine, Op};
use crate::pipeline::Shared;
use crate::pipeline::exits::ExitGuard;
use crate::pipeline::pool::PoolShare;
use crate::pipeline::worker::{DstIo, RETRY_POLL_MAX, SrcIo, Step, Worker, WorkerConfig};

/// First bit of a context's number in `user_data` (the worker's own tags
/// use bits 60..64, slots 24..44, sub-ops 0..24).
pub const CTX_SHIFT: u32 = 44;
const CTX_MASK: u64 = ((1 << 16) - 1) << CTX_SHIFT;
/// Contexts one thread can hold at once (number 0 is the doorbell).
const CTX_MAX: usize = (1 << 16) - 1;
/// The doorbell's `user_data`.
const BELL_USER_DATA: u64 = 0;

/// A job context on its way to a worker thread.
pub struct Seed {
    pub cfg: WorkerConfig,
    pub shared: Arc<Shared>,
    pub share: PoolShare,
    pub src: SrcIo,
    pub dst: DstIo,
    /// Ops this context may have in flight at once.
    pub ops_max: usize,
    /// Where its connections go back when it is finished.
    pub back: mpsc::Sender<(SrcIo, DstIo)>,
    /// Counts the context out when it is finished (or lost to a panic).
    pub exit: ExitGuard,
}

/// The control side of a worker thread: where contexts are posted.
pub struct Mailbox {
    /// `None` once the thread is gone (it panicked): contexts posted then
    /// are dropped at once, which fails their job instead of hanging it.
    seeds: Mutex<Option<VecDeque<Seed>>>,
    stop: AtomicBool,
    bell: UnixStream,
}

impl Mailbox {
    /// Hand a context to the thread.
    pub fn post(&self, seed: Seed) {
        let mut seeds = lock(&self.seeds);
        match seeds.as_mut() {
            Some(queue) => queue.push_back(seed),
            None => {
                drop(seeds);
                seed.shared.fail(crate::pipeline::CopyError::Internal(
                    "a worker thread is gone (it panicked)".into(),
                ));
                // Dropping the seed counts its context out.
                return;
            }
        }
        drop(seeds);
        self.ring();
    }

    /// Wake the thread out of its engine (it steps every context again).
    pub fn ring(&self) {
        // Non-blocking: a full socket means the thread has been rung already.
        let _ = (&self.bell).write(&[1]);
    }

    /// Ask the thread to end once its contexts have finished.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.ring();
    }

    fn take(&self) -> Vec<Seed> {
        lock(&self.seeds)
            .as_mut()
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

/// Marks the mailbox dead when its thread ends, by panic too, and drops
/// what was posted and not taken.
struct Closer(Arc<Mailbox>);

impl Drop for Closer {
    fn drop(&mut self) {
        let left = lock(&self.0.seeds).take();
        drop(left);
    }
}

/// Start worker thread `index`, pinned to `cpu`, with an engine of `kind`
/// for `ops_max` ops in flight. Returns once its engine is built.
pub fn spawn(
    index: usize,
    cpu: usize,
    kind: EngineKind,
    ops_max: u32,
) -> std::io::Result<(Arc<Mailbox>, std::thread::JoinHandle<()>)> {
    let (bell_tx, bell_rx) = UnixStream::pair()?;
    bell_tx.set_nonblocking(true)?;
    let mailbox = Arc::new(Mailbox {
        seeds: Mutex::new(Some(VecDeque::new())),
        stop: AtomicBool::new(false),
        bell: bell_tx,
    });
    let (ready_tx, ready_rx) = mpsc::channel();
    let mb = Arc::clone(&mailbox);
    let handle = std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || {
            let _closer = Closer(Arc::clone(&mb));
            if let Err(e) = engine::pin::pin_current_thread(cpu) {
                tracing::debug!("could not pin worker {index}: {e}");
            }
            // The ring is created on the thread that uses it.
            match engine::build(kind, ops_max.saturating_add(1)) {
                Ok(engine) => {
                    let _ = ready_tx.send(Ok(()));
                    Thread::new(engine, mb, bell_rx).run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((mailbox, handle)),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(std::io::Error::other(format!(
                "worker {index} ended while starting"
            )))
        }
    }
}

/// A context's view of the thread's engine: tags its ops with the
/// context's number and counts its own ops in flight.
struct Port {
    engine: Rc<RefCell<Box<dyn IoEngine>>>,
    ctx_bits: u64,
    in_flight: Rc<Cell<usize>>,
    ops_max: usize,
    kind: EngineKind,
}

impl IoEngine for Port {
    fn push(&mut self, user_data: u64, op: Op) -> std::io::Result<()> {
        if user_data & CTX_MASK != 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "user_data uses the context bits",
            ));
        }
        if self.in_flight.get() >= self.ops_max {
            return Err(EngineError::Full {
                max_in_flight: u32::try_from(self.ops_max).unwrap_or(u32::MAX),
            }
            .into());
        }
        self.engine
            .borrow_mut()
            .push(user_data | self.ctx_bits, op)?;
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(())
    }

    fn wait(&mut self, _: usize, _: &mut Vec<Completion>) -> std::io::Result<()> {
        Err(std::io::Error::other(
            "a worker context never waits on the engine: its thread does",
        ))
    }

    fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    fn kind(&self) -> EngineKind {
        self.kind
    }
}

/// A context attached to the thread.
struct Live {
    worker: Worker,
    in_flight: Rc<Cell<usize>>,
    back: mpsc::Sender<(SrcIo, DstIo)>,
    _exit: ExitGuard,
}

struct Thread {
    engine: Rc<RefCell<Box<dyn IoEngine>>>,
    mailbox: Arc<Mailbox>,
    bell: UnixStream,
    bell_buf: Box<[u8; 64]>,
    bell_armed: bool,
    /// Contexts by number − 1.
    contexts: Vec<Option<Live>>,
    completions: Vec<Completion>,
    idle_spins: u32,
}

impl Thread {
    fn new(engine: Box<dyn IoEngine>, mailbox: Arc<Mailbox>, bell: UnixStream) -> Self {
        Self {
            engine: Rc::new(RefCell::new(engine)),
            mailbox,
            bell,
            bell_buf: Box::new([0; 64]),
            bell_armed: false,
            contexts: Vec::new(),
            completions: Vec::with_capacity(256),
            idle_spins: 0,
        }
    }

    fn run(mut self) {
        loop {
            for seed in self.mailbox.take() {
                self.attach(seed);
            }
            let stopping = self.mailbox.stop.load(Ordering::Acquire);
            if stopping && self.contexts.iter().all(Option::is_none) {
                self.close();
                return;
            }
            if !self.bell_armed && !stopping {
                self.arm_bell();
            }
            let (poll, wake_at) = self.step_all();
            let mut min_complete = usize::from(!poll && wake_at.is_none());
            if min_complete == 1 && self.engine.borrow().in_flight() == 0 {
                // Nothing could wake a blocking wait (no doorbell): poll.
                min_complete = 0;
            }
            self.completions.clear();
            let waited = self
                .engine
                .borrow_mut()
                .wait(min_complete, &mut self.completions);
            if let Err(e) = waited {
                tracing::error!("worker engine failed: {e}");
                self.engine_failed(&e);
                continue;
            }
            if self.completions.is_empty() {
                self.back_off(wake_at);
                continue;
            }
            self.idle_spins = 0;
            let done = std::mem::take(&mut self.completions);
            for c in &done {
                self.route(*c);
            }
            self.completions = done;
        }
    }

    fn attach(&mut self, seed: Seed) {
        let free = self.contexts.iter().position(Option::is_none);
        let index = free.unwrap_or(self.contexts.len());
        if index >= CTX_MAX {
            seed.shared.fail(crate::pipeline::CopyError::Internal(
                "too many job contexts on one worker".into(),
            ));
            let _ = seed.back.send((seed.src, seed.dst));
            return;
        }
        let in_flight = Rc::new(Cell::new(0));
        let kind = self.engine.borrow().kind();
        let port = Port {
            engine: Rc::clone(&self.engine),
            ctx_bits: ((index as u64) + 1) << CTX_SHIFT,
            in_flight: Rc::clone(&in_flight),
            ops_max: seed.ops_max,
            kind,
        };
        let worker = Worker::new(
            seed.cfg,
            seed.shared,
            Box::new(port),
            seed.share,
            seed.src,
            seed.dst,
        );
        let live = Live {
            worker,
            in_flight,
            back: seed.back,
            _exit: seed.exit,
        };
        if index == self.contexts.len() {
            self.contexts.push(Some(live));
        } else {
            self.contexts[index] = Some(live);
        }
    }

    /// Step every context; hand finished ones back. Returns whether some
    /// context must be polled for (it waits for its planner) and the
    /// earliest instant one asked to be stepped again.
    fn step_all(&mut self) -> (bool, Option<Instant>) {
        let mut poll = false;
        let mut wake_at: Option<Instant> = None;
        for entry in &mut self.contexts {
            let Some(live) = entry else { continue };
            match live.worker.step() {
                Step::Waiting | Step::Parked => {}
                Step::Hungry => poll = true,
                Step::Until(at) => wake_at = Some(wake_at.map_or(at, |w| w.min(at))),
                Step::Finished => {
                    if let Some(live) = entry.take() {
                        let _ = live.back.send(live.worker.into_ends());
                        // `_exit` drops here: the context is counted out
                        // after its connections went back.
                    }
                }
            }
        }
        (poll, wake_at)
    }

    fn route(&mut self, c: Completion) {
        let number = ((c.user_data & CTX_MASK) >> CTX_SHIFT) as usize;
        if c.user_data == BELL_USER_DATA {
            self.bell_armed = false;
            if c.result <= 0 && !self.mailbox.stop.load(Ordering::Acquire) {
                tracing::error!("worker doorbell closed ({})", c.result);
            }
            return;
        }
        let Some(Some(live)) = number.checked_sub(1).and_then(|i| self.contexts.get_mut(i)) else {
            tracing::error!("completion for no context ({:#x})", c.user_data);
            return;
        };
        live.in_flight.set(live.in_flight.get().saturating_sub(1));
        live.worker.complete(Completion {
            user_data: c.user_data & !CTX_MASK,
            result: c.result,
        });
    }

    fn arm_bell(&mut self) {
        let op = Op::Recv {
            fd: self.bell.as_raw_fd(),
            buf: self.bell_buf.as_mut_ptr(),
            len: self.bell_buf.len() as u32,
            waitall: false,
        };
        match self.engine.borrow_mut().push(BELL_USER_DATA, op) {
            Ok(()) => self.bell_armed = true,
            Err(e) => tracing::error!("arming the worker doorbell: {e}"),
        }
    }

    /// Nothing completed in a poll: sleep a little before the next.
    fn back_off(&mut self, wake_at: Option<Instant>) {
        if let Some(at) = wake_at {
            let left = at.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(RETRY_POLL_MAX));
            return;
        }
        // Waiting for a planner: back off gently.
        self.idle_spins = self.idle_spins.saturating_add(1);
        if self.idle_spins > 64 {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::yield_now();
        }
    }

    /// The engine cannot wait any more: fail every context and hand its
    /// connections back. Its buffers stay allocated (the pool is freed only
    /// after the coordinator got the connections back, and this thread
    /// never pushes to the broken engine again for that context).
    fn engine_failed(&mut self, e: &std::io::Error) {
        for entry in &mut self.contexts {
            if let Some(mut live) = entry.take() {
                live.worker.engine_failed(e);
                let _ = live.back.send(live.worker.into_ends());
            }
        }
        std::thread::sleep(RETRY_POLL_MAX);
    }

    /// The engine stops: let the doorbell's receive come back before the
    /// buffer it names is dropped.
    fn close(&mut self) {
        let _ = self.bell.shutdown(std::net::Shutdown::Both);
        let mut engine = self.engine.borrow_mut();
        while engine.in_flight() > 0 {
            self.completions.clear();
            if engine.wait(1, &mut self.completions).is_err() {
                break;
            }
        }
    }
}
