//! NBD replies on a worker's connections, and the sockets under them.

use super::*;

impl Worker {
    pub(super) fn on_event(&mut self, is_src: bool, ev: ReplyEvent) -> Result<(), CopyError> {
        match ev {
            ReplyEvent::Hole {
                cookie: ck,
                buf_offset,
                len,
            } => {
                let (slot, sub) = self.lookup(ck)?;
                let so = self.slots[slot].subops[sub];
                if u64::from(buf_offset) + u64::from(len) > u64::from(so.len) {
                    return Err(CopyError::source(
                        so.disk_off,
                        NbdError::Protocol("hole outside the read".into()),
                    ));
                }
                self.pool
                    .region(slot, (so.buf_off + buf_offset) as usize, len as usize)
                    .fill(0);
                Ok(())
            }
            ReplyEvent::Done { cookie: ck } => {
                let (slot, sub) = self.lookup(ck)?;
                let so = self.slots[slot].subops[sub];
                let stat = if is_src {
                    &self.shared.stats.bytes_read
                } else {
                    &self.shared.stats.bytes_written
                };
                Stats::add(stat, u64::from(so.len));
                self.subop_done(slot)
            }
            ReplyEvent::Failed {
                cookie: ck,
                errno,
                message,
            } => {
                let (slot, sub) = self.lookup(ck)?;
                if self.shared.aborted() {
                    // Draining after the first error: just account for it.
                    return self.subop_done(slot);
                }
                let detail = if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                };
                if is_src {
                    let cause = format!(
                        "the NBD server answered {}{detail}",
                        crate::nbd::proto::errno_name(errno)
                    );
                    let transient = retry::nbd_error_is_transient(errno);
                    return self.read_failed(slot, sub, &cause, transient);
                }
                let so = self.slots[slot].subops[sub];
                Err(CopyError::TargetWrite(format!(
                    "writing the target at offset {} ({} bytes) failed on the NBD server: error {errno}{detail}",
                    so.disk_off, so.len,
                )))
            }
            ReplyEvent::BlockStatus { .. } => Err(side_err(
                is_src,
                NbdError::Protocol("block status reply to a data request".into()),
            )),
        }
    }

    pub(super) fn lookup(&self, ck: u64) -> Result<(usize, usize), CopyError> {
        cookie_parts(ck)
            .filter(|&(s, i)| s < self.slots.len() && i < self.slots[s].subops.len())
            .ok_or_else(|| CopyError::Internal(format!("reply for unknown cookie {ck:#x}")))
    }

    pub(super) fn kick_sockets(&mut self) -> Result<(), CopyError> {
        let Self {
            src,
            dst,
            engine,
            pool,
            slots,
            ..
        } = self;
        let mut dest = |ck: u64, buf_offset: u32, len: u32| -> Option<*mut u8> {
            let (slot, sub) = cookie_parts(ck)?;
            let so = slots.get(slot)?.subops.get(sub)?;
            if u64::from(buf_offset) + u64::from(len) > u64::from(so.len) {
                return None;
            }
            Some(pool.ptr(slot, (so.buf_off + buf_offset) as usize))
        };
        if let SrcIo::Nbd(conns) = src {
            for (i, c) in conns.iter_mut().enumerate() {
                c.kick_send(&mut **engine, ud(TAG_SRC_SEND, 0, i))
                    .map_err(|e| side_err(true, e.into()))?;
                c.kick_recv(&mut **engine, ud(TAG_SRC_RECV, 0, i), &mut dest)
                    .map_err(|e| side_err(true, e))?;
            }
        }
        if let DstIo::Nbd(conns) = dst {
            for (i, c) in conns.iter_mut().enumerate() {
                c.kick_send(&mut **engine, ud(TAG_DST_SEND, 0, i))
                    .map_err(|e| side_err(false, e.into()))?;
                c.kick_recv(&mut **engine, ud(TAG_DST_RECV, 0, i), &mut dest)
                    .map_err(|e| side_err(false, e))?;
            }
        }
        Ok(())
    }

    pub(super) fn shutdown_sockets(&self) {
        if let DstIo::Sink(io) = &self.dst {
            let _ = io.doorbell.shutdown(std::net::Shutdown::Both);
        }
        if let SrcIo::Nbd(c) = &self.src {
            c.iter().for_each(|c| c.shutdown());
        }
        if let DstIo::Nbd(c) = &self.dst {
            c.iter().for_each(|c| c.shutdown());
        }
    }
}
