//! io_uring engine: one ring per worker thread.
//!
//! * Ring size: the SQ has `max_in_flight` entries rounded up to a power of
//!   two, the CQ twice that, so completions of every op in flight (plus the
//!   cancels issued on drop) fit without overflow.
//! * Each op in flight owns a slot. The slot index, not the caller's
//!   `user_data`, travels through the kernel, so callers may reuse
//!   `user_data` values freely; the slot also holds per-op kernel-visible
//!   state (the `msghdr` of a [`Op::Writev`]) at an address that never moves.
//! * [`Op::Writev`] is submitted as `IORING_OP_SENDMSG` with
//!   `MSG_WAITALL | MSG_NOSIGNAL`: on stream sockets the kernel then retries
//!   short sends itself, so the op completes only when every byte is queued
//!   (or with an error), exactly like the threaded engine's blocking loop. A
//!   plain `IORING_OP_WRITEV` may complete short on a socket, and without
//!   `MSG_NOSIGNAL` a closed peer would kill the process with SIGPIPE
//!   instead of returning `-EPIPE`. The fd must therefore be a socket.
//! * [`Op::Recv`] with `waitall` sets `MSG_WAITALL`, which io_uring also
//!   honours by retrying short receives (Linux 5.19+).

use super::{Completion, EngineError, EngineKind, IoEngine, Op};
use io_uring::{IoUring, Probe, opcode, squeue, types};

/// `user_data` of the cancel requests issued on drop; their CQEs are ignored.
const CANCEL_USER_DATA: u64 = u64::MAX;

/// Largest SQ the kernel accepts (`IORING_MAX_ENTRIES`).
const SQ_ENTRIES_MAX: u32 = 32768;

/// Every opcode diskferry submits, with a name for error messages.
const OPCODES_USED: [(u8, &str); 9] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::SendMsg::CODE, "SENDMSG"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::SyncFileRange::CODE, "SYNC_FILE_RANGE"),
    (opcode::Fadvise::CODE, "FADVISE"),
];

/// The io_uring engine.
pub struct UringEngine {
    ring: IoUring,
    /// Caller `user_data` per slot; `None` when the slot is free.
    slot_user_data: Vec<Option<u64>>,
    /// One `msghdr` per slot, allocated once; the kernel reads the entry of
    /// a SENDMSG op while it is in flight, so this never reallocates.
    slot_msghdr: Box<[libc::msghdr]>,
    free_slots: Vec<u32>,
    max_in_flight: u32,
    /// Ops pushed whose completion has not been handed to the caller.
    in_flight: usize,
    /// Completions reaped while `push` had to make room in a full SQ; handed
    /// out by the next `wait`.
    reaped: Vec<Completion>,
}

// SAFETY: the only non-Send fields are the raw pointers inside the
// `msghdr`s, which point at caller iovecs whose validity the submitter
// guarantees until completion (see `engine` module docs); the ring itself is
// Send. Moving the engine to another thread changes none of that.
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// Build a ring for a worker keeping at most `max_in_flight` ops in flight.
    pub fn new(max_in_flight: u32) -> std::io::Result<Self> {
        if max_in_flight == 0 {
            return Err(EngineError::ZeroDepth.into());
        }
        let sq_entries = max_in_flight.next_power_of_two().min(SQ_ENTRIES_MAX);
        let cq_entries = sq_entries.max(max_in_flight.next_power_of_two()) * 2;
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_clamp()
            .build(sq_entries)?;
        let slots = usize::try_from(max_in_flight).expect("u32 fits usize");
        // SAFETY: msghdr is a plain C struct; all-zero is a valid empty header.
        let empty_msghdr: libc::msghdr = unsafe { std::mem::zeroed() };
        Ok(Self {
            ring,
            slot_user_data: vec![None; slots],
            slot_msghdr: vec![empty_msghdr; slots].into_boxed_slice(),
            free_slots: (0..max_in_flight).rev().collect(),
            max_in_flight,
            in_flight: 0,
            reaped: Vec::new(),
        })
    }

    /// Submission queue size of the ring.
    pub fn sq_entries(&self) -> u32 {
        self.ring.params().sq_entries()
    }

    /// Completion queue size of the ring.
    pub fn cq_entries(&self) -> u32 {
        self.ring.params().cq_entries()
    }

    /// The limit given to [`UringEngine::new`].
    pub fn max_in_flight(&self) -> u32 {
        self.max_in_flight
    }

    fn sqe_for(&mut self, slot: usize, op: Op) -> squeue::Entry {
        match op {
            Op::Read {
                fd,
                buf,
                len,
                offset,
            } => opcode::Read::new(types::Fd(fd), buf, len)
                .offset(offset)
                .build(),
            Op::Write {
                fd,
                buf,
                len,
                offset,
            } => opcode::Write::new(types::Fd(fd), buf, len)
                .offset(offset)
                .build(),
            Op::Writev { fd, iov, iovcnt } => {
                let msg = &mut self.slot_msghdr[slot];
                msg.msg_iov = iov.cast_mut();
                msg.msg_iovlen = iovcnt as _;
                opcode::SendMsg::new(types::Fd(fd), msg)
                    .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
                    .build()
            }
            Op::Recv {
                fd,
                buf,
                len,
                waitall,
            } => {
                let flags = if waitall { libc::MSG_WAITALL } else { 0 };
                opcode::Recv::new(types::Fd(fd), buf, len)
                    .flags(flags)
                    .build()
            }
            Op::Fsync { fd, datasync } => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(fd)).flags(flags).build()
            }
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build(),
            Op::SyncFileRange {
                fd,
                offset,
                len,
                flags,
            } => opcode::SyncFileRange::new(types::Fd(fd), len)
                .offset(offset)
                .flags(flags)
                .build(),
            Op::Fadvise {
                fd,
                offset,
                len,
                advice,
            } => opcode::Fadvise::new(types::Fd(fd), len as libc::off_t, advice)
                .offset(offset)
                .build(),
        }
    }

    /// Push one SQE, submitting first when the SQ is full.
    fn push_sqe(&mut self, sqe: &squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: every pointer inside `sqe` is either caller memory the
            // submitter keeps valid until completion (module contract) or a
            // `slot_msghdr` entry, which lives as long as the engine and is
            // not reused before its op's CQE is reaped.
            let pushed = unsafe { self.ring.submission().push(sqe) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.submit_and_wait_retrying(0)?;
            let mut reaped = std::mem::take(&mut self.reaped);
            self.reap_into(&mut reaped);
            self.reaped = reaped;
        }
    }

    /// `submit_and_wait`, retrying on EINTR and reaping on EBUSY/EAGAIN.
    /// Reaped completions go to `self.reaped`.
    fn submit_and_wait_retrying(&mut self, want: usize) -> std::io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                        // The CQ is backed up or the kernel is short of
                        // request memory: reaping makes room.
                        let mut reaped = std::mem::take(&mut self.reaped);
                        let n = self.reap_into(&mut reaped);
                        self.reaped = reaped;
                        if n > 0 {
                            return Ok(());
                        }
                        std::thread::yield_now();
                    }
                    _ => return Err(e),
                },
            }
        }
    }

    /// Move every available CQE into `out`, freeing their slots. Returns
    /// how many caller completions were added. Does not touch `in_flight`.
    fn reap_into(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut added = 0;
        for cqe in self.ring.completion() {
            if cqe.user_data() == CANCEL_USER_DATA {
                continue;
            }
            let slot = usize::try_from(cqe.user_data()).expect("slot index fits usize");
            let user_data = self.slot_user_data[slot]
                .take()
                .expect("CQE for a slot that is in flight");
            self.free_slots
                .push(u32::try_from(slot).expect("slot < max_in_flight"));
            out.push(Completion {
                user_data,
                result: cqe.result(),
            });
            added += 1;
        }
        added
    }

    /// Slots whose CQE has not arrived yet.
    fn slots_busy(&self) -> usize {
        self.slot_user_data.len() - self.free_slots.len()
    }
}

impl IoEngine for UringEngine {
    fn push(&mut self, user_data: u64, op: Op) -> std::io::Result<()> {
        if self.in_flight >= self.slot_user_data.len() {
            return Err(EngineError::Full {
                max_in_flight: self.max_in_flight,
            }
            .into());
        }
        // in_flight >= busy slots, so a slot is free.
        let slot = self
            .free_slots
            .pop()
            .expect("a free slot when below max_in_flight");
        let slot_index = usize::try_from(slot).expect("u32 fits usize");
        let sqe = self.sqe_for(slot_index, op).user_data(u64::from(slot));
        self.slot_user_data[slot_index] = Some(user_data);
        if let Err(e) = self.push_sqe(&sqe) {
            self.slot_user_data[slot_index] = None;
            self.free_slots.push(slot);
            return Err(e);
        }
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
        let mut got = self.reaped.len();
        out.append(&mut self.reaped);
        loop {
            got += self.reap_into(out);
            let sq_pending = !self.ring.submission().is_empty();
            if got >= min_complete && !sq_pending {
                break;
            }
            let result = self.submit_and_wait_retrying(min_complete.saturating_sub(got));
            got += self.reaped.len();
            out.append(&mut self.reaped);
            if let Err(e) = result {
                self.in_flight -= got;
                return Err(e);
            }
        }
        self.in_flight -= got;
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }
}

impl Drop for UringEngine {
    /// The kernel owns the buffers of ops in flight: cancel what can be
    /// cancelled (socket receives waiting for data) and wait until every op
    /// has completed before the ring (and the slots' `msghdr`s) go away.
    fn drop(&mut self) {
        if self.slots_busy() == 0 {
            return;
        }
        let busy: Vec<u64> = (0u64..)
            .zip(&self.slot_user_data)
            .filter(|(_, ud)| ud.is_some())
            .map(|(slot, _)| slot)
            .collect();
        for slot in busy {
            let cancel = opcode::AsyncCancel::new(slot)
                .build()
                .user_data(CANCEL_USER_DATA);
            if let Err(e) = self.push_sqe(&cancel) {
                tracing::error!(error = %e, "io_uring: could not queue a cancel on drop");
                break;
            }
        }
        let mut sink = Vec::new();
        while self.slots_busy() > 0 {
            if let Err(e) = self.submit_and_wait_retrying(1) {
                tracing::error!(error = %e, in_flight = self.slots_busy(),
                    "io_uring: waiting for ops in flight on drop failed");
                return;
            }
            self.reap_into(&mut sink);
        }
    }
}

/// Check that io_uring works here and supports every opcode diskferry
/// uses. The error is a message an operator can act on.
pub fn probe() -> Result<(), String> {
    let mut ring = IoUring::new(4).map_err(|e| {
        let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
        explain_setup_error(e.raw_os_error(), sysctl.as_deref().map(str::trim), &e)
    })?;
    let mut supported = Probe::new();
    ring.submitter()
        .register_probe(&mut supported)
        .map_err(|e| {
            format!("io_uring opcode probe failed ({e}); the kernel predates Linux 5.6")
        })?;
    let missing: Vec<&str> = OPCODES_USED
        .iter()
        .filter(|(code, _)| !supported.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "io_uring lacks opcode(s) {}; diskferry needs Linux 5.19 or newer for its io_uring engine",
            missing.join(", ")
        ));
    }
    // Setup can be allowed while io_uring_enter is filtered: run one NOP.
    // SAFETY: a NOP carries no pointers.
    let nop_pushed = unsafe {
        ring.submission()
            .push(&opcode::Nop::new().build().user_data(7))
    };
    nop_pushed.map_err(|_| "io_uring probe: empty ring reported full".to_string())?;
    ring.submit_and_wait(1).map_err(|e| {
        format!(
            "io_uring_enter failed ({e}); a seccomp filter may block it (container runtime profile)"
        )
    })?;
    match ring.completion().next() {
        Some(cqe) if cqe.user_data() == 7 && cqe.result() == 0 => Ok(()),
        other => Err(format!(
            "io_uring probe: unexpected NOP completion {other:?}"
        )),
    }
}

/// Turn an `io_uring_setup` failure into an actionable message. `sysctl`
/// is the trimmed content of `/proc/sys/kernel/io_uring_disabled`, if any.
pub fn explain_setup_error(
    errno: Option<i32>,
    sysctl: Option<&str>,
    e: &dyn std::fmt::Display,
) -> String {
    match (errno, sysctl) {
        (Some(libc::EPERM), Some("2")) => {
            "io_uring is disabled by kernel.io_uring_disabled=2".into()
        }
        (Some(libc::EPERM), Some("1")) => {
            "io_uring is restricted by kernel.io_uring_disabled=1 to \
             root and the group in kernel.io_uring_group; add this user to that group or set the \
             sysctl to 0"
                .into()
        }
        (Some(libc::EPERM), _) => "io_uring_setup was refused with EPERM although \
             kernel.io_uring_disabled allows it: a seccomp filter (container runtime default \
             profile) blocks io_uring; allow io_uring_setup/io_uring_enter/io_uring_register"
            .into(),
        (Some(libc::ENOSYS), _) => "kernel has no io_uring (ENOSYS): it predates Linux 5.1, is \
             built without CONFIG_IO_URING, or a seccomp filter hides the syscall"
            .into(),
        (Some(libc::ENOMEM), _) => "io_uring_setup failed with ENOMEM: the locked-memory limit \
             is too low; raise RLIMIT_MEMLOCK (LimitMEMLOCK= under systemd)"
            .into(),
        _ => format!("io_uring_setup failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_errors_name_their_cause() {
        let e = "x";
        let msg = explain_setup_error(Some(libc::EPERM), Some("2"), &e);
        assert!(msg.contains("kernel.io_uring_disabled=2"), "{msg}");
        let msg = explain_setup_error(Some(libc::EPERM), Some("1"), &e);
        assert!(msg.contains("io_uring_group"), "{msg}");
        let msg = explain_setup_error(Some(libc::EPERM), Some("0"), &e);
        assert!(msg.contains("seccomp"), "{msg}");
        let msg = explain_setup_error(Some(libc::ENOSYS), None, &e);
        assert!(msg.contains("kernel has no io_uring"), "{msg}");
        let msg = explain_setup_error(Some(libc::ENOMEM), None, &e);
        assert!(msg.contains("LimitMEMLOCK"), "{msg}");
    }

    #[test]
    fn ring_is_sized_from_max_in_flight() {
        let engine = UringEngine::new(48).unwrap();
        assert_eq!(engine.sq_entries(), 64);
        assert!(engine.cq_entries() >= 128);
        assert_eq!(
            UringEngine::new(0).err().unwrap().kind(),
            std::io::ErrorKind::InvalidInput
        );
    }
}
