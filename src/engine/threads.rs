//! Threaded engine: the fallback where io_uring is unavailable.
//!
//! A pool of blocking worker threads executes each op with the matching
//! syscall (pread, pwrite, sendmsg, recv, fdatasync/fsync, fallocate) and
//! sends its completion back over a channel. Ops start as soon as they are
//! pushed.
//!
//! A socket receive can block until the peer sends, so one blocked op must
//! never keep another from starting: the pool keeps at least as many
//! threads as ops in flight. Threads are spawned lazily when the in-flight
//! count grows past the pool size (so an idle engine stays small), up to
//! `min(max_in_flight, THREADS_MAX)`, and live until the engine is dropped.
//!
//! Semantics match the io_uring engine: [`Op::Writev`] is a socket send with
//! `MSG_NOSIGNAL` that loops until every byte is sent (returning the bytes
//! sent before an error, if any), [`Op::Recv`] with `waitall` loops until
//! the buffer is full or the peer closes, and EINTR is retried.

use super::{Completion, EngineError, EngineKind, IoEngine, Op};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use crate::sync::lock;

/// Upper bound on the pool size, whatever `max_in_flight` is.
pub const THREADS_MAX: usize = 256;

/// Stack size of a pool thread: it only issues syscalls.
const THREAD_STACK_BYTES: usize = 128 * 1024;

struct Job {
    user_data: u64,
    op: Op,
}

/// The threaded engine.
pub struct ThreadsEngine {
    /// `None` only while dropping, to let the workers see the channel close.
    jobs_tx: Option<mpsc::Sender<Job>>,
    jobs_rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    done_tx: mpsc::Sender<Completion>,
    done_rx: mpsc::Receiver<Completion>,
    workers: Vec<JoinHandle<()>>,
    threads_max: usize,
    max_in_flight: u32,
    /// Ops pushed whose completion has not been handed to the caller.
    in_flight: usize,
}

impl ThreadsEngine {
    /// Build an engine for a worker keeping at most `max_in_flight` ops in
    /// flight. No thread is started until the first push.
    pub fn new(max_in_flight: u32) -> std::io::Result<Self> {
        if max_in_flight == 0 {
            return Err(EngineError::ZeroDepth.into());
        }
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let threads_max = usize::try_from(max_in_flight)
            .unwrap_or(usize::MAX)
            .min(THREADS_MAX);
        Ok(Self {
            jobs_tx: Some(jobs_tx),
            jobs_rx: Arc::new(Mutex::new(jobs_rx)),
            done_tx,
            done_rx,
            workers: Vec::new(),
            threads_max,
            max_in_flight,
            in_flight: 0,
        })
    }

    /// Threads started so far.
    pub fn threads_spawned(&self) -> usize {
        self.workers.len()
    }

    /// The most threads this engine will start.
    pub fn threads_max(&self) -> usize {
        self.threads_max
    }

    fn spawn_worker(&mut self) -> std::io::Result<()> {
        let jobs_rx = Arc::clone(&self.jobs_rx);
        let done_tx = self.done_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("diskferry-io-{}", self.workers.len()))
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || worker_loop(&jobs_rx, &done_tx))?;
        self.workers.push(handle);
        Ok(())
    }
}

fn worker_loop(jobs_rx: &Mutex<mpsc::Receiver<Job>>, done_tx: &mpsc::Sender<Completion>) {
    loop {
        // The guard is a temporary of this statement: the lock is released
        // before the op runs, so other workers can pick up jobs meanwhile.
        let next = lock(jobs_rx).recv();
        let Ok(Job { user_data, op }) = next else {
            return; // engine dropped
        };
        let result = execute(op);
        if done_tx.send(Completion { user_data, result }).is_err() {
            return;
        }
    }
}

impl IoEngine for ThreadsEngine {
    fn push(&mut self, user_data: u64, op: Op) -> std::io::Result<()> {
        if self.in_flight >= usize::try_from(self.max_in_flight).unwrap_or(usize::MAX) {
            return Err(EngineError::Full {
                max_in_flight: self.max_in_flight,
            }
            .into());
        }
        if self.workers.len() <= self.in_flight && self.workers.len() < self.threads_max {
            self.spawn_worker()?;
        }
        let jobs_tx = self.jobs_tx.as_ref().expect("jobs channel open until drop");
        jobs_tx
            .send(Job { user_data, op })
            .map_err(|_| std::io::Error::other("threaded engine: all workers exited"))?;
        self.in_flight += 1;
        Ok(())
    }

    fn wait(&mut self, min_complete: usize, out: &mut Vec<Completion>) -> std::io::Result<()> {
        if min_complete > self.in_flight {
            return Err(EngineError::WaitTooMany {
                min_complete,
                in_flight: self.in_flight,
            }
            .into());
        }
        let mut got = 0;
        while got < min_complete {
            // The engine holds a sender itself, so recv cannot see a closed
            // channel; a worker always sends exactly one completion per job.
            let completion = self
                .done_rx
                .recv()
                .expect("engine holds a completion sender");
            out.push(completion);
            got += 1;
        }
        while let Ok(completion) = self.done_rx.try_recv() {
            out.push(completion);
            got += 1;
        }
        self.in_flight -= got;
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Threads
    }
}

impl Drop for ThreadsEngine {
    /// Ops in flight still use their buffers: wait for every completion
    /// (this blocks while a socket receive waits for its peer), then stop
    /// and join the workers.
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if self.done_rx.recv().is_err() {
                break;
            }
            self.in_flight -= 1;
        }
        self.jobs_tx = None;
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("threaded engine: an I/O worker panicked");
            }
        }
    }
}

/// Run one op to completion on this thread; `-errno` on failure.
fn execute(op: Op) -> i32 {
    match op {
        Op::Read {
            fd,
            buf,
            len,
            offset,
        } => {
            let Ok(offset) = libc::off_t::try_from(offset) else {
                return -libc::EINVAL;
            };
            retry_eintr(|| {
                // SAFETY: the submitter keeps `buf` valid for `len` bytes and
                // untouched until this op's completion (engine contract).
                unsafe { libc::pread(fd, buf.cast(), len as usize, offset) }
            })
        }
        Op::Write {
            fd,
            buf,
            len,
            offset,
        } => {
            let Ok(offset) = libc::off_t::try_from(offset) else {
                return -libc::EINVAL;
            };
            retry_eintr(|| {
                // SAFETY: the submitter keeps `buf` valid for `len` bytes
                // until this op's completion (engine contract).
                unsafe { libc::pwrite(fd, buf.cast(), len as usize, offset) }
            })
        }
        Op::Writev { fd, iov, iovcnt } => send_all(fd, iov, iovcnt),
        Op::Recv {
            fd,
            buf,
            len,
            waitall,
        } => recv(fd, buf, len, waitall),
        Op::Fsync { fd, datasync } => retry_eintr(|| {
            // SAFETY: fdatasync/fsync take no pointers.
            let rc = unsafe {
                if datasync {
                    libc::fdatasync(fd)
                } else {
                    libc::fsync(fd)
                }
            };
            rc as isize
        }),
        Op::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => {
            let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
            else {
                return -libc::EINVAL;
            };
            retry_eintr(|| {
                // SAFETY: fallocate takes no pointers.
                unsafe { libc::fallocate(fd, mode, offset, len) as isize }
            })
        }
        Op::SyncFileRange {
            fd,
            offset,
            len,
            flags,
        } => {
            let Ok(offset) = libc::off64_t::try_from(offset) else {
                return -libc::EINVAL;
            };
            retry_eintr(|| {
                // SAFETY: sync_file_range takes no pointers.
                unsafe {
                    libc::sync_file_range(fd, offset, libc::off64_t::from(len), flags) as isize
                }
            })
        }
        Op::Fadvise {
            fd,
            offset,
            len,
            advice,
        } => {
            let Ok(offset) = libc::off_t::try_from(offset) else {
                return -libc::EINVAL;
            };
            // SAFETY: posix_fadvise takes no pointers; it returns the error
            // number instead of setting errno.
            let rc = unsafe { libc::posix_fadvise(fd, offset, libc::off_t::from(len), advice) };
            -rc
        }
    }
}

/// Call `f` until it does not fail with EINTR; map the result to the
/// completion convention (value, or `-errno`).
fn retry_eintr(mut f: impl FnMut() -> isize) -> i32 {
    loop {
        let rc = f();
        if rc >= 0 {
            return i32::try_from(rc).unwrap_or(i32::MAX);
        }
        let errno = last_errno();
        if errno != libc::EINTR {
            return -errno;
        }
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// recv(2), looping while `waitall` and the buffer is not full (MSG_WAITALL
/// alone returns short when a signal arrives).
fn recv(fd: i32, buf: *mut u8, len: u32, waitall: bool) -> i32 {
    let flags = if waitall { libc::MSG_WAITALL } else { 0 };
    let len_bytes = len as usize;
    let mut done_bytes = 0usize;
    loop {
        let rc = retry_eintr(|| {
            // SAFETY: the submitter keeps `buf` valid for `len` bytes until
            // completion; `done_bytes < len_bytes`, so the range written is
            // inside it.
            unsafe {
                libc::recv(
                    fd,
                    buf.add(done_bytes).cast(),
                    len_bytes - done_bytes,
                    flags,
                )
            }
        });
        if rc < 0 {
            return if done_bytes > 0 {
                bytes_to_result(done_bytes)
            } else {
                rc
            };
        }
        done_bytes += rc.unsigned_abs() as usize; // rc >= 0 here
        if !waitall || rc == 0 || done_bytes >= len_bytes {
            return bytes_to_result(done_bytes);
        }
    }
}

/// sendmsg(2) with MSG_NOSIGNAL until every byte of the iovecs is sent.
fn send_all(fd: i32, iov: *const libc::iovec, iovcnt: u32) -> i32 {
    // A private copy that can be advanced past what was already sent.
    let mut iovs: Vec<libc::iovec> = if iovcnt == 0 {
        Vec::new()
    } else {
        // SAFETY: the submitter keeps `iov` pointing at `iovcnt` valid
        // iovecs until completion (engine contract).
        unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) }.to_vec()
    };
    let mut first = 0usize;
    let mut sent_bytes = 0usize;
    loop {
        while first < iovs.len() && iovs[first].iov_len == 0 {
            first += 1;
        }
        if first == iovs.len() {
            return bytes_to_result(sent_bytes);
        }
        // SAFETY: all-zero is a valid empty msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs[first..].as_mut_ptr();
        msg.msg_iovlen = (iovs.len() - first) as _;
        // SAFETY: `msg` points at our iovec copy, whose bases point into
        // caller buffers kept valid until completion.
        let rc = retry_eintr(|| unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) });
        if rc < 0 {
            return if sent_bytes > 0 {
                bytes_to_result(sent_bytes)
            } else {
                rc
            };
        }
        let mut advance_bytes = rc.unsigned_abs() as usize; // rc >= 0 here
        sent_bytes += advance_bytes;
        while advance_bytes > 0 {
            let head = &mut iovs[first];
            let step = advance_bytes.min(head.iov_len);
            // SAFETY: `step <= iov_len`, so the new base stays inside (or one
            // past the end of) the same caller buffer.
            head.iov_base = unsafe { head.iov_base.cast::<u8>().add(step) }.cast();
            head.iov_len -= step;
            advance_bytes -= step;
            if head.iov_len == 0 {
                first += 1;
            }
        }
    }
}

fn bytes_to_result(bytes: usize) -> i32 {
    i32::try_from(bytes).unwrap_or(i32::MAX)
}
