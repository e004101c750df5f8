//! The source side of a worker: starting a window's reads, issuing them
//! to a file or an NBD connection, and reads that fail and wait to be
//! issued again.

use super::*;

impl Worker {
    /// Issue again every read whose retry is due.
    pub(super) fn issue_due_retries(&mut self) -> Result<(), CopyError> {
        if self.retries.is_empty() {
            return Ok(());
        }
        let mut due = std::mem::take(&mut self.retries_due);
        due.clear();
        self.retries.take_due(Instant::now(), &mut due);
        let mut out = Ok(());
        for d in &due {
            Stats::add(&self.shared.stats.read_retries, 1);
            out = self.issue_read(d.slot, d.sub);
            if out.is_err() {
                break;
            }
        }
        self.retries_due = due;
        out
    }

    /// A read of sub-op `sub` of `slot` failed with `cause` (worded for a
    /// message: "the NBD server answered EIO (…)"). If the error may pass
    /// (`transient`) and retries are left, schedule the read again after
    /// [`retry::backoff`]; the sub-op stays pending, so nothing of the window
    /// is written meanwhile. Otherwise fail the job, naming the offset and
    /// the attempts made.
    pub(super) fn read_failed(
        &mut self,
        slot: usize,
        sub: usize,
        cause: &str,
        transient: bool,
    ) -> Result<(), CopyError> {
        let so = &mut self.slots[slot].subops[sub];
        let (at, left) = (so.disk_off + u64::from(so.done), so.len - so.done);
        let attempts = so.read_failures + 1;
        if !transient {
            let earlier = match so.read_failures {
                0 => String::new(),
                n => format!(" after {n} retries"),
            };
            return Err(CopyError::SourceRead(format!(
                "at offset {at} ({left} bytes){earlier}: {cause} (an error that is not retried)"
            )));
        }
        if attempts > self.cfg.read_retries {
            let tries = match attempts {
                1 => "on its only attempt (retries are off)".to_string(),
                n => format!("on all {n} attempts (1 + {} retries)", n - 1),
            };
            return Err(CopyError::SourceRead(format!(
                "at offset {at} ({left} bytes) {tries}; the last error: {cause}"
            )));
        }
        so.read_failures = attempts;
        let delay = retry::backoff(attempts);
        tracing::warn!(
            offset = at,
            bytes = left,
            error = cause,
            "reading the source failed; retry {attempts} of {} in {} ms",
            self.cfg.read_retries,
            delay.as_millis()
        );
        self.retries.push(Due {
            at: Instant::now() + delay,
            slot,
            sub,
        });
        Ok(())
    }

    pub(super) fn start_copy(
        &mut self,
        slot: usize,
        offset: u64,
        len: u32,
        data: &[(u32, u32)],
    ) -> Result<(), CopyError> {
        // Zero the parts of the buffer the source said are holes.
        let mut pos = 0u32;
        for &(r, l) in data.iter().chain(std::iter::once(&(len, 0))) {
            if r > pos {
                self.pool
                    .region(slot, pos as usize, (r - pos) as usize)
                    .fill(0);
            }
            pos = r + l;
        }
        let max_req = match &self.src {
            SrcIo::File { .. } => u32::MAX,
            SrcIo::Nbd(c) => c[0].info.block_max.max(4096),
        };
        let s = &mut self.slots[slot];
        s.phase = Phase::Reading;
        s.offset = offset;
        s.len = len;
        s.planned_bytes = data.iter().map(|&(_, l)| u64::from(l)).sum();
        s.subops.clear();
        for &(r, l) in data {
            push_split(&mut s.subops, offset, r, l, max_req);
        }
        s.pending = s.subops.len() as u32;
        if s.pending == 0 {
            return self.start_write(slot);
        }
        s.issued = Some(std::time::Instant::now());
        for i in 0..self.slots[slot].subops.len() {
            self.issue_read(slot, i)?;
        }
        Ok(())
    }

    pub(super) fn issue_read(&mut self, slot: usize, i: usize) -> Result<(), CopyError> {
        let so = self.slots[slot].subops[i];
        match &mut self.src {
            SrcIo::File { fd } => {
                let op = Op::Read {
                    fd: *fd,
                    buf: self.pool.ptr(slot, (so.buf_off + so.done) as usize),
                    len: so.len - so.done,
                    offset: so.disk_off + u64::from(so.done),
                };
                self.engine
                    .push(ud(TAG_FILE_READ, slot, i), op)
                    .map_err(engine_err)?;
            }
            SrcIo::Nbd(conns) => {
                let c = self.rr_src % conns.len();
                self.rr_src = self.rr_src.wrapping_add(1);
                conns[c]
                    .request(
                        cookie(slot, i),
                        Cmd::Read {
                            offset: so.disk_off,
                            len: so.len,
                        },
                        std::ptr::null(),
                        0,
                    )
                    .map_err(|e| CopyError::source(so.disk_off, e))?;
            }
        }
        Ok(())
    }
}
