//! Lending windows to the network senders through the [`Sink`], and the
//! doorbell that brings them back.

use super::*;

impl Worker {
    /// Lend a read window to the sink: digests of its data runs (taken right
    /// after the read) travel with it.
    pub(super) fn lend(&mut self, slot: usize) -> Result<(), CopyError> {
        let (offset, len) = (self.slots[slot].offset, self.slots[slot].len as usize);
        let DstIo::Sink(io) = &mut self.dst else {
            unreachable!()
        };
        let window = self.pool.region(slot, 0, len);
        let mut runs = Vec::with_capacity(self.slots[slot].runs.len());
        for r in &self.slots[slot].runs {
            let digest = match io.run_digest {
                Some(d) if !r.zero => d.digest(&window[r.offset..r.offset + r.len]),
                _ => [0; 32],
            };
            runs.push(SinkRun {
                rel: r.offset as u32,
                len: r.len as u32,
                zero: r.zero,
                digest,
            });
        }
        // The image digest is BLAKE3 of each window: a whole-window run's
        // digest serves when runs are BLAKE3 too.
        let blake3_runs = io.run_digest == Some(crate::wire::ChunkDigest::Blake3);
        let window_digest = io.window_digests.then(|| match runs.as_slice() {
            [only] if blake3_runs && !only.zero && only.len as usize == len => only.digest,
            _ => *blake3::hash(window).as_bytes(),
        });
        let lease = self.pool.lease(slot, 0, len);
        let chunk = SinkChunk::Data {
            worker: self.cfg.index,
            slot,
            offset,
            lease,
            runs,
            window_digest,
        };
        if io.sink.push(chunk).is_err() {
            return Err(CopyError::Internal("sink queue overflow".into()));
        }
        io.lent += 1;
        let s = &mut self.slots[slot];
        s.phase = Phase::Writing;
        s.pending = 1;
        self.arm_doorbell()
    }

    /// Wait (through the engine) for lent slots to come back.
    pub(super) fn arm_doorbell(&mut self) -> Result<(), CopyError> {
        let DstIo::Sink(io) = &mut self.dst else {
            return Ok(());
        };
        if io.armed || io.lent == 0 {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let op = Op::Recv {
            fd: io.doorbell.as_raw_fd(),
            buf: io.bell_buf.as_mut_ptr(),
            len: 64,
            waitall: false,
        };
        self.engine
            .push(ud(TAG_DOORBELL, 0, 0), op)
            .map_err(engine_err)?;
        io.armed = true;
        Ok(())
    }

    pub(super) fn on_doorbell(&mut self, result: i32) -> Result<(), CopyError> {
        let DstIo::Sink(io) = &mut self.dst else {
            unreachable!()
        };
        io.armed = false;
        if result <= 0 {
            return Err(CopyError::Internal(format!(
                "worker doorbell failed ({result})"
            )));
        }
        let mut back = Vec::new();
        while let Some(slot) = io.sink.take_returned(self.cfg.index) {
            back.push(slot);
        }
        io.lent -= back.len();
        for slot in back {
            self.subop_done(slot)?;
        }
        self.arm_doorbell()
    }
}
