//! A pinned worker: owns an engine, a share of the buffer pool, and its
//! connections; takes work items from the shared bounded queue and drives
//! each through read → zero detection → write as a small state machine.
//! The stages of the pipeline are states of a slot, so a chunk never
//! changes thread and its buffer is never copied.
//!
//! This file holds the slots and the event loop; `read.rs` is the source
//! side, `write.rs` the target side, `nbd.rs` the replies on the worker's
//! NBD connections and `lend.rs` the windows lent to network senders;
//! `ends.rs` defines the source and target ends, `user_data.rs` how an
//! op's `user_data` and an NBD cookie name a slot.

#![forbid(unsafe_code)]
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Completion, IoEngine, Op};
use crate::nbd::NbdError;
use crate::nbd::conn::{Cmd, ReplyEvent};

use super::depth::DepthCtl;
use super::nbd_io::NbdIo;
use super::pool::PoolShare;
use super::retry::{self, Due, RetryQueue};
use super::sink::{SinkChunk, SinkRun};
use super::stats::Stats;
use super::zero::{self, Run};
use super::{CopyError, Shared};
use crate::plan::windows::Work;
use step::Stage;
pub use step::Step;

mod ends;
mod lend;
mod nbd;
mod read;
mod step;
mod user_data;
mod write;

pub use ends::{DIRECT_ALIGN_BYTES, DstIo, SinkIo, SrcIo};
use user_data::{
    TAG_DOORBELL, TAG_DST_RECV, TAG_DST_SEND, TAG_FILE_READ, TAG_FILE_WRITE, TAG_FILE_WRITE_BUF,
    TAG_FILE_ZERO, TAG_SRC_RECV, TAG_SRC_SEND, TAG_WB_START, TAG_WB_WAIT, cookie, cookie_parts, ud,
    ud_slot, ud_subop, ud_tag,
};

/// Settings of one worker.
pub struct WorkerConfig {
    /// Slots busy at the start; [`DepthCtl`] may grow this to every slot.
    pub depth_start: usize,
    pub index: usize,
    pub granule_bytes: usize,
    /// Largest single write-zeroes / punch request.
    pub zero_max_bytes: u64,
    /// Times a source read that failed with an error that may pass is
    /// issued again before the job fails (see [`retry`]); 0 turns retries off.
    pub read_retries: u32,
}

/// Ranges whose writeback runs ahead before the oldest is waited for.
const WRITEBACK_WINDOW: usize = 8;
/// Longest a worker thread sleeps, while a read waits for its retry, before
/// it looks at its engine and the work queues again.
pub const RETRY_POLL_MAX: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Reading,
    Writing,
}

/// One piece of I/O of a slot: a byte range of its buffer and of the disk.
#[derive(Debug, Clone, Copy)]
struct SubOp {
    buf_off: u32,
    disk_off: u64,
    len: u32,
    /// Bytes already transferred (files: short reads/writes continue).
    done: u32,
    /// Failed attempts of this read so far (see [`retry`]).
    read_failures: u32,
}

struct Slot {
    phase: Phase,
    offset: u64,
    len: u32,
    planned_bytes: u64,
    pending: u32,
    subops: Vec<SubOp>,
    runs: Vec<Run>,
    /// When the slot's reads went out (a latency sample for [`DepthCtl`]).
    issued: Option<std::time::Instant>,
}

/// Everything one worker owns.
pub struct Worker {
    cfg: WorkerConfig,
    shared: Arc<Shared>,
    engine: Box<dyn IoEngine>,
    pool: PoolShare,
    src: SrcIo,
    dst: DstIo,
    slots: Vec<Slot>,
    rr_src: usize,
    rr_dst: usize,
    events: Vec<ReplyEvent>,
    buffered_in_flight: bool,
    buffered_queue: std::collections::VecDeque<(usize, usize)>,
    /// Buffered ranges whose writeback was started, oldest first.
    writeback: std::collections::VecDeque<(u64, u32)>,
    /// Ranges being waited for, by id (the id travels in user_data).
    writeback_waits: Vec<Option<(u64, u32)>>,
    /// Reads that failed and wait to be issued again. Their slots stay in
    /// [`Phase::Reading`] with the sub-op still counted in `pending`.
    retries: RetryQueue,
    /// Scratch for the retries due now.
    retries_due: Vec<Due>,
    /// How many slots may be busy.
    depth: DepthCtl,
    /// The largest window used, with the control thread's scale.
    window_peak: usize,
    /// A work item taken from the queue that waits for the rate budget.
    held: Option<Work>,
    /// When the rate budget allows the held item.
    rate_wait: Option<Instant>,
    stage: Stage,
    /// The drain failed and the sockets were shut down: only wait for
    /// what is in flight.
    drain_broken: bool,
}

impl Worker {
    pub fn new(
        cfg: WorkerConfig,
        shared: Arc<Shared>,
        engine: Box<dyn IoEngine>,
        pool: PoolShare,
        src: SrcIo,
        dst: DstIo,
    ) -> Self {
        let slots = (0..pool.slots())
            .map(|_| Slot {
                phase: Phase::Idle,
                offset: 0,
                len: 0,
                planned_bytes: 0,
                pending: 0,
                subops: Vec::new(),
                runs: Vec::new(),
                issued: None,
            })
            .collect();
        let depth = DepthCtl::new(cfg.depth_start, pool.slots());
        Self {
            cfg,
            shared,
            engine,
            pool,
            src,
            dst,
            slots,
            rr_src: 0,
            rr_dst: 0,
            events: Vec::new(),
            buffered_in_flight: false,
            buffered_queue: std::collections::VecDeque::new(),
            writeback: std::collections::VecDeque::new(),
            writeback_waits: Vec::new(),
            retries: RetryQueue::default(),
            retries_due: Vec::new(),
            depth,
            window_peak: 0,
            held: None,
            rate_wait: None,
            stage: Stage::Running,
            drain_broken: false,
        }
    }

    fn fill_slots(&mut self) -> Result<(), CopyError> {
        if self.shared.control.is_paused() {
            // A held item waits for the resume, not for the rate budget.
            self.rate_wait = None;
            return Ok(());
        }
        let mut busy = self.slots.iter().filter(|s| s.phase != Phase::Idle).count();
        let scale = self
            .shared
            .depth_scale
            .load(std::sync::atomic::Ordering::Relaxed);
        let window = (self.depth.window() * scale.max(1)).min(self.slots.len());
        self.window_peak = self.window_peak.max(window);
        self.rate_wait = None;
        // Lowest slots first: a shallow window keeps reusing the same,
        // cache-warm buffers.
        for slot in 0..self.slots.len() {
            if busy >= window {
                break;
            }
            if self.slots[slot].phase != Phase::Idle {
                continue;
            }
            busy += 1;
            let Some(work) = self.held.take().or_else(|| self.shared.queue.pop()) else {
                break;
            };
            if let Err(wait) = self.charge_rate(&work) {
                self.held = Some(work);
                self.rate_wait = Some(Instant::now() + wait);
                break;
            }
            self.start(slot, work)?;
        }
        Ok(())
    }

    /// Take the bytes a window will read from the job's rate budget. A
    /// sink's bytes are charged on the wire, by its senders.
    fn charge_rate(&self, work: &Work) -> Result<(), Duration> {
        let control = &self.shared.control;
        if !control.is_rate_capped() || matches!(self.dst, DstIo::Sink(_)) {
            return Ok(());
        }
        match work {
            Work::Copy { data, .. } => {
                let bytes = data.iter().map(|&(_, l)| u64::from(l)).sum();
                control.rate().try_acquire(bytes)
            }
            Work::Zero { .. } => Ok(()),
        }
    }

    fn start(&mut self, slot: usize, work: Work) -> Result<(), CopyError> {
        match work {
            Work::Copy { offset, len, data } => self.start_copy(slot, offset, len, &data),
            Work::Zero { offset, len } => self.start_zero(slot, offset, len),
        }
    }

    fn finish(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        Stats::add(&self.shared.stats.bytes_done, s.planned_bytes);
        s.phase = Phase::Idle;
        s.pending = 0;
    }

    /// One sub-op of `slot` finished successfully.
    fn subop_done(&mut self, slot: usize) -> Result<(), CopyError> {
        let s = &mut self.slots[slot];
        s.pending -= 1;
        if s.pending > 0 {
            return Ok(());
        }
        if self.shared.aborted() {
            // Never start the write of a chunk once the job failed.
            s.phase = Phase::Idle;
            return Ok(());
        }
        match s.phase {
            Phase::Reading => self.start_write(slot),
            Phase::Writing => {
                self.finish(slot);
                Ok(())
            }
            Phase::Idle => Err(CopyError::Internal(format!(
                "completion for idle slot {slot}"
            ))),
        }
    }

    fn on_completion(&mut self, c: Completion) -> Result<(), CopyError> {
        let (slot, sub) = (ud_slot(c.user_data), ud_subop(c.user_data));
        match ud_tag(c.user_data) {
            TAG_FILE_READ | TAG_FILE_WRITE => self.on_file_rw(c, slot, sub),
            TAG_WB_START => Ok(()),
            TAG_WB_WAIT => self.on_writeback_wait(c, sub),
            TAG_FILE_WRITE_BUF => {
                self.buffered_in_flight = false;
                let so = self.slots[slot].subops[sub];
                let range = (so.disk_off + u64::from(so.done), c.result.max(0) as u32);
                let out = self.on_file_rw(c, slot, sub);
                if out.is_ok() && range.1 > 0 {
                    self.stream_writeback(range)?;
                }
                if out.is_ok()
                    && !self.shared.aborted()
                    && !self.buffered_in_flight
                    && let Some((s2, i2)) = self.buffered_queue.pop_front()
                {
                    self.issue_write(s2, i2)?;
                }
                out
            }
            TAG_DOORBELL => self.on_doorbell(c.result),
            TAG_FILE_ZERO => {
                if c.result < 0 {
                    let err = std::io::Error::from_raw_os_error(-c.result);
                    return Err(CopyError::TargetWrite(format!(
                        "zeroing a range of the target: {err}"
                    )));
                }
                self.subop_done(slot)
            }
            TAG_SRC_SEND | TAG_DST_SEND => {
                let is_src = ud_tag(c.user_data) == TAG_SRC_SEND;
                let Self {
                    src, dst, engine, ..
                } = self;
                let conn = pick_conn(is_src, src, dst, sub);
                conn.on_send(c.result, &mut **engine, c.user_data)
                    .map_err(|e| side_err(is_src, e))
            }
            TAG_SRC_RECV | TAG_DST_RECV => {
                let is_src = ud_tag(c.user_data) == TAG_SRC_RECV;
                let mut events = std::mem::take(&mut self.events);
                events.clear();
                let res = pick_conn(is_src, &mut self.src, &mut self.dst, sub)
                    .on_recv(c.result, &mut events);
                let out = res.map_err(|e| side_err(is_src, e)).and_then(|()| {
                    events
                        .drain(..)
                        .try_for_each(|ev| self.on_event(is_src, ev))
                });
                self.events = events;
                out
            }
            t => Err(CopyError::Internal(format!(
                "completion with unknown tag {t}"
            ))),
        }
    }

    fn on_file_rw(&mut self, c: Completion, slot: usize, sub: usize) -> Result<(), CopyError> {
        let is_read = ud_tag(c.user_data) == TAG_FILE_READ;
        let so = self.slots[slot].subops[sub];
        let at = so.disk_off + u64::from(so.done);
        if c.result < 0 {
            let err = std::io::Error::from_raw_os_error(-c.result);
            if is_read && !self.shared.aborted() {
                let transient = retry::os_error_is_transient(-c.result);
                return self.read_failed(slot, sub, &err.to_string(), transient);
            }
            return Err(if is_read {
                CopyError::SourceRead(format!("at offset {at}: {err}"))
            } else {
                CopyError::TargetWrite(format!("at offset {at}: {err}"))
            });
        }
        if c.result == 0 {
            return Err(if is_read {
                CopyError::SourceRead(format!(
                    "unexpected end of file at offset {at} (did the source shrink?)"
                ))
            } else {
                CopyError::TargetWrite(format!("wrote nothing at offset {at}"))
            });
        }
        let n = c.result as u32;
        let stat = if is_read {
            &self.shared.stats.bytes_read
        } else {
            &self.shared.stats.bytes_written
        };
        Stats::add(stat, u64::from(n));
        if ud_tag(c.user_data) == TAG_FILE_WRITE {
            // O_DIRECT: on the device already.
            Stats::add(&self.shared.stats.bytes_landed, u64::from(n));
        }
        let so = &mut self.slots[slot].subops[sub];
        so.done += n;
        if so.done < so.len {
            return if is_read {
                self.issue_read(slot, sub)
            } else {
                self.issue_write(slot, sub)
            };
        }
        self.subop_done(slot)
    }
}

/// Append sub-ops covering `len` bytes at `rel` of the window at `offset`,
/// none longer than `max_req`.
fn push_split(subops: &mut Vec<SubOp>, offset: u64, rel: u32, len: u32, max_req: u32) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(max_req);
        subops.push(SubOp {
            buf_off: rel + done,
            disk_off: offset + u64::from(rel + done),
            len: n,
            done: 0,
            read_failures: 0,
        });
        done += n;
    }
}

fn pick_conn<'a>(is_src: bool, src: &'a mut SrcIo, dst: &'a mut DstIo, i: usize) -> &'a mut NbdIo {
    match (is_src, src, dst) {
        (true, SrcIo::Nbd(c), _) => &mut c[i],
        (false, _, DstIo::Nbd(c)) => &mut c[i],
        _ => unreachable!("socket completion without an NBD side"),
    }
}

fn engine_err(e: std::io::Error) -> CopyError {
    engine_err_ref(&e)
}

pub(super) fn engine_err_ref(e: &std::io::Error) -> CopyError {
    CopyError::Engine(e.to_string())
}

fn side_err(is_src: bool, e: NbdError) -> CopyError {
    if is_src {
        CopyError::SourceRead(e.to_string())
    } else {
        CopyError::TargetWrite(e.to_string())
    }
}
