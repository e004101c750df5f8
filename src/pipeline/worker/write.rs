//! The target side of a worker: zero detection on a window just read,
//! writes and zero ranges to a file or an NBD connection, and the streamed
//! writeback of page-cache writes.

use super::*;

impl Worker {
    /// Reads done: find zero runs and write the rest.
    pub(super) fn start_write(&mut self, slot: usize) -> Result<(), CopyError> {
        if let Some(t) = self.slots[slot].issued.take() {
            self.depth.sample(t.elapsed());
        }
        let len = self.slots[slot].len as usize;
        let mut runs = std::mem::take(&mut self.slots[slot].runs);
        zero::runs(
            self.pool.region(slot, 0, len),
            self.cfg.granule_bytes,
            &mut runs,
        );
        let offset = self.slots[slot].offset;
        if matches!(self.dst, DstIo::Sink(_)) {
            self.slots[slot].runs = runs;
            return self.lend(slot);
        }
        let fresh = matches!(
            self.dst,
            DstIo::File {
                fresh_zero: true,
                ..
            }
        );
        let max_req = match &self.dst {
            DstIo::File { .. } => u32::MAX,
            DstIo::Nbd(c) => c[0].info.block_max.max(4096),
            DstIo::Sink(_) => u32::MAX,
        };
        let s = &mut self.slots[slot];
        s.phase = Phase::Writing;
        s.subops.clear();
        let mut zero_ops = Vec::new();
        for r in &runs {
            let (r_off, r_len) = (r.offset as u32, r.len as u32);
            if r.zero {
                Stats::add(&self.shared.stats.bytes_zeroed, r.len as u64);
                if !fresh {
                    zero_ops.push((offset + u64::from(r_off), u64::from(r_len)));
                }
                continue;
            }
            push_split(&mut s.subops, offset, r_off, r_len, max_req);
        }
        self.slots[slot].runs = runs;
        let n_writes = self.slots[slot].subops.len();
        self.slots[slot].pending = n_writes as u32;
        for i in 0..n_writes {
            self.issue_write(slot, i)?;
        }
        for (off, l) in zero_ops {
            self.issue_zero(slot, off, l)?;
        }
        if self.slots[slot].pending == 0 {
            self.finish(slot);
        }
        Ok(())
    }

    pub(super) fn start_zero(
        &mut self,
        slot: usize,
        offset: u64,
        len: u64,
    ) -> Result<(), CopyError> {
        let s = &mut self.slots[slot];
        s.phase = Phase::Writing;
        s.offset = offset;
        s.len = 0;
        s.planned_bytes = 0;
        s.subops.clear();
        s.pending = 0;
        Stats::add(&self.shared.stats.bytes_zeroed, len);
        if matches!(
            self.dst,
            DstIo::File {
                fresh_zero: true,
                ..
            }
        ) {
            self.finish(slot);
            return Ok(());
        }
        if let DstIo::Sink(io) = &mut self.dst {
            let chunk = SinkChunk::Zero {
                worker: self.cfg.index,
                slot,
                offset,
                len,
            };
            if io.sink.push(chunk).is_err() {
                return Err(CopyError::Internal("sink queue overflow".into()));
            }
            io.lent += 1;
            self.slots[slot].pending = 1;
            return self.arm_doorbell();
        }
        self.issue_zero(slot, offset, len)?;
        if self.slots[slot].pending == 0 {
            self.finish(slot);
        }
        Ok(())
    }

    /// Make `[offset, offset+len)` of the target read as zeros.
    pub(super) fn issue_zero(
        &mut self,
        slot: usize,
        offset: u64,
        len: u64,
    ) -> Result<(), CopyError> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.cfg.zero_max_bytes);
            let off = offset + done;
            match &mut self.dst {
                DstIo::File { fd, .. } => {
                    let op = Op::Fallocate {
                        fd: *fd,
                        mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset: off,
                        len: n,
                    };
                    self.engine
                        .push(ud(TAG_FILE_ZERO, slot, 0), op)
                        .map_err(engine_err)?;
                    self.slots[slot].pending += 1;
                }
                DstIo::Nbd(conns) => {
                    let c = self.rr_dst % conns.len();
                    self.rr_dst = self.rr_dst.wrapping_add(1);
                    let conn = &mut conns[c];
                    if !conn.info.can_write_zeroes() {
                        return Err(CopyError::target(
                            off,
                            NbdError::Unsupported(
                                "WRITE_ZEROES (needed to zero a non-fresh target)",
                            ),
                        ));
                    }
                    let sub = self.slots[slot].subops.len();
                    self.slots[slot].subops.push(SubOp {
                        buf_off: 0,
                        disk_off: off,
                        len: 0,
                        done: 0,
                        read_failures: 0,
                    });
                    let len32 = u32::try_from(n).expect("zero_max fits u32");
                    conn.request(
                        cookie(slot, sub),
                        Cmd::WriteZeroes {
                            offset: off,
                            len: len32,
                            no_hole: false,
                            fast: false,
                        },
                        std::ptr::null(),
                        0,
                    )
                    .map_err(|e| CopyError::target(off, e))?;
                    self.slots[slot].pending += 1;
                }
                DstIo::Sink(_) => unreachable!("zeros go to the sink with their chunk"),
            }
            done += n;
        }
        Ok(())
    }

    pub(super) fn issue_write(&mut self, slot: usize, i: usize) -> Result<(), CopyError> {
        let so = self.slots[slot].subops[i];
        let ptr = self.pool.ptr(slot, (so.buf_off + so.done) as usize);
        match &mut self.dst {
            DstIo::File { fd, direct_fd, .. } => {
                let (offset, len) = (so.disk_off + u64::from(so.done), so.len - so.done);
                let aligned = (offset | u64::from(len)) % DIRECT_ALIGN_BYTES == 0;
                let (fd, tag) = match direct_fd {
                    Some(d) if aligned => (*d, TAG_FILE_WRITE),
                    _ => (*fd, TAG_FILE_WRITE_BUF),
                };
                if tag == TAG_FILE_WRITE_BUF {
                    // Concurrent buffered writes to one inode spin on its
                    // lock (and io_uring punts them to io-wq workers that
                    // fight over it): keep one in flight per worker.
                    if self.buffered_in_flight {
                        self.buffered_queue.push_back((slot, i));
                        return Ok(());
                    }
                    self.buffered_in_flight = true;
                }
                let op = Op::Write {
                    fd,
                    buf: ptr,
                    len,
                    offset,
                };
                self.engine.push(ud(tag, slot, i), op).map_err(engine_err)?;
            }
            DstIo::Nbd(conns) => {
                let c = self.rr_dst % conns.len();
                self.rr_dst = self.rr_dst.wrapping_add(1);
                conns[c]
                    .request(
                        cookie(slot, i),
                        Cmd::Write {
                            offset: so.disk_off,
                            len: so.len,
                            fua: false,
                        },
                        ptr,
                        so.len,
                    )
                    .map_err(|e| CopyError::target(so.disk_off, e))?;
            }
            DstIo::Sink(_) => unreachable!("sink chunks are lent, not written"),
        }
        Ok(())
    }

    /// Page-cache writes stream to disk the way a careful `dd` would: kick
    /// writeback of each range as soon as it is written, and once more than
    /// [`WRITEBACK_WINDOW`] ranges are in writeback, wait for the oldest
    /// and drop it from the cache. Dirty data never piles up, so there are
    /// no writeback stalls, and the copy does not evict everything else.
    pub(super) fn stream_writeback(&mut self, (offset, len): (u64, u32)) -> Result<(), CopyError> {
        let DstIo::File { fd, .. } = &self.dst else {
            return Ok(());
        };
        let fd = *fd;
        let start = Op::SyncFileRange {
            fd,
            offset,
            len,
            flags: libc::SYNC_FILE_RANGE_WRITE,
        };
        self.engine
            .push(ud(TAG_WB_START, 0, 0), start)
            .map_err(engine_err)?;
        self.writeback.push_back((offset, len));
        if self.writeback.len() > WRITEBACK_WINDOW
            && let Some((o, l)) = self.writeback.pop_front()
        {
            let id = match self.writeback_waits.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.writeback_waits.push(None);
                    self.writeback_waits.len() - 1
                }
            };
            self.writeback_waits[id] = Some((o, l));
            let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            let wait = Op::SyncFileRange {
                fd,
                offset: o,
                len: l,
                flags,
            };
            self.engine
                .push(ud(TAG_WB_WAIT, 0, id), wait)
                .map_err(engine_err)?;
        }
        Ok(())
    }

    pub(super) fn on_writeback_wait(&mut self, c: Completion, id: usize) -> Result<(), CopyError> {
        let Some((offset, len)) = self.writeback_waits.get_mut(id).and_then(Option::take) else {
            return Err(CopyError::Internal(format!("unknown writeback wait {id}")));
        };
        if c.result < 0 {
            let err = std::io::Error::from_raw_os_error(-c.result);
            return Err(CopyError::TargetWrite(format!(
                "writing back offset {offset}: {err}"
            )));
        }
        Stats::add(&self.shared.stats.bytes_landed, u64::from(len));
        if let DstIo::File { fd, .. } = &self.dst {
            let op = Op::Fadvise {
                fd: *fd,
                offset,
                len,
                advice: libc::POSIX_FADV_DONTNEED,
            };
            self.engine
                .push(ud(TAG_WB_START, 0, 0), op)
                .map_err(engine_err)?;
        }
        Ok(())
    }
}
