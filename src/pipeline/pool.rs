//! The buffer pool: one page-aligned allocation made at start-up, cut into
//! fixed-size slots. Each worker receives a disjoint [`PoolShare`]; memory is
//! freed only when the [`BufferPool`] is dropped, after every worker has been
//! joined, so no buffer can be freed while the kernel still owns it.
// One of the two places unsafe code may live (see lib.rs): the pool hands out raw slots the kernel reads and writes;
// every block carries a `// SAFETY:` note.
#![allow(unsafe_code)]

use std::ptr::NonNull;

/// Alignment of every slot (enough for O_DIRECT on any common device).
pub const SLOT_ALIGN_BYTES: usize = 4096;

/// Owner of all data buffers of one job: one anonymous mapping. Its pages
/// are zero by definition and appear on first touch, in the worker that
/// uses them; an allocator's `alloc_zeroed` with page alignment would
/// instead memset the whole pool up front (64 MiB by default: 0.1–0.2 s
/// of page faults on the main thread before the first read).
pub struct BufferPool {
    base: NonNull<u8>,
    total_bytes: usize,
    slot_bytes: usize,
    slots: usize,
    /// Who gives the memory back when the pool is dropped.
    owner: Owner,
}

/// Where a pool's memory comes from.
enum Owner {
    /// Its own mapping, unmapped on drop.
    Mapping,
    /// A part of an [`Arena`]; the value's drop gives the part back.
    Lent(#[allow(dead_code)] Box<dyn Send + Sync>),
}

/// One anonymous mapping made once (the engine's memory budget), from which
/// jobs take [`BufferPool`]s. The mapping lives until the arena and every
/// pool taken from it are dropped; what a pool gives back is reused by
/// later pools (its pages stay resident, so the process never holds more
/// than the arena's size in buffers).
pub struct Arena {
    base: NonNull<u8>,
    total_bytes: usize,
}

// SAFETY: the arena is a plain mapping; its bytes are reached only through
// pools made from disjoint ranges of it (see `Arena::pool`).
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

impl Arena {
    /// Map `total_bytes` (rounded up to whole slots of 4 KiB).
    pub fn new(total_bytes: usize) -> std::io::Result<Self> {
        let total = total_bytes.div_ceil(SLOT_ALIGN_BYTES).max(1) * SLOT_ALIGN_BYTES;
        let base = map_anonymous(total)?;
        Ok(Self {
            base,
            total_bytes: total,
        })
    }

    /// Size of the arena.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// A pool of `slots × slot_bytes` over bytes `offset..` of the arena.
    /// `release` is dropped with the pool: it must keep the arena alive and
    /// give the range back. The caller hands out each range to one pool
    /// at a time.
    pub fn pool(
        &self,
        offset: usize,
        slots: usize,
        slot_bytes: usize,
        release: Box<dyn Send + Sync>,
    ) -> std::io::Result<BufferPool> {
        let end = slots
            .checked_mul(slot_bytes)
            .and_then(|n| n.checked_add(offset))
            .filter(|&e| e <= self.total_bytes && slots > 0);
        if end.is_none()
            || !offset.is_multiple_of(SLOT_ALIGN_BYTES)
            || !slot_bytes.is_multiple_of(SLOT_ALIGN_BYTES)
        {
            return Err(std::io::Error::other("pool range outside the arena"));
        }
        // SAFETY: offset + slots × slot_bytes <= total_bytes (checked above),
        // so the pointer stays inside the mapping.
        let base = unsafe { self.base.as_ptr().add(offset) };
        Ok(BufferPool {
            base: NonNull::new(base).ok_or_else(|| std::io::Error::other("null arena"))?,
            total_bytes: slots * slot_bytes,
            slot_bytes,
            slots,
            owner: Owner::Lent(release),
        })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: mapped in new() with this address and length; every pool
        // taken from the arena holds (through its release value) an owner
        // of the arena, so none outlives it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.total_bytes) };
    }
}

/// A fresh private anonymous mapping of `total` (> 0) bytes.
fn map_anonymous(total: usize) -> std::io::Result<NonNull<u8>> {
    // SAFETY: a fresh private anonymous mapping (no address hint, no
    // fd); `total` is non-zero (callers check). The result is checked
    // against MAP_FAILED before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!("cannot allocate a {total}-byte buffer pool: {e}"),
        ));
    }
    NonNull::new(ptr.cast::<u8>())
        .ok_or_else(|| std::io::Error::other("mmap returned a null buffer pool"))
}

// SAFETY: the pool is a plain heap allocation; access to its bytes goes
// through PoolShares, which are disjoint.
unsafe impl Send for BufferPool {}
// SAFETY: as above; &BufferPool only hands out disjoint shares.
unsafe impl Sync for BufferPool {}

impl BufferPool {
    /// Allocate `slots × slot_bytes` (slot_bytes rounded up to 4 KiB).
    pub fn new(slots: usize, slot_bytes: usize) -> std::io::Result<Self> {
        let slot_bytes = slot_bytes.div_ceil(SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES;
        let total = slots
            .checked_mul(slot_bytes)
            .filter(|&t| t > 0)
            .ok_or_else(|| std::io::Error::other("buffer pool size is zero or overflows"))?;
        let base = map_anonymous(total)?;
        Ok(Self {
            base,
            total_bytes: total,
            slot_bytes,
            slots,
            owner: Owner::Mapping,
        })
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Split the pool into `parts` disjoint shares of whole slots, as even
    /// as possible. Each share may be used by one thread.
    pub fn shares(&mut self, parts: usize) -> Vec<PoolShare> {
        assert!(parts > 0 && parts <= self.slots, "need 1..=slots shares");
        let mut out = Vec::with_capacity(parts);
        let mut first = 0;
        for i in 0..parts {
            let n = self.slots / parts + usize::from(i < self.slots % parts);
            // SAFETY: first + n <= slots, so the offset stays inside the allocation.
            let base = unsafe { self.base.as_ptr().add(first * self.slot_bytes) };
            out.push(PoolShare {
                base,
                slot_bytes: self.slot_bytes,
                slots: n,
            });
            first += n;
        }
        out
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        if matches!(self.owner, Owner::Lent(_)) {
            // The arena's range: given back when `owner` drops.
            return;
        }
        // SAFETY: mapped in new() with exactly this address and length;
        // shares borrow `&mut self` only to be created and the job joins
        // every worker before dropping the pool, so no share (and no
        // in-flight op) outlives it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.total_bytes) };
    }
}

/// A worker's disjoint part of the pool.
pub struct PoolShare {
    base: *mut u8,
    slot_bytes: usize,
    slots: usize,
}

// SAFETY: shares are disjoint and each is used by the one thread it is moved to.
unsafe impl Send for PoolShare {}

impl PoolShare {
    /// Number of slots in this share.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Raw pointer to byte `offset` of `slot`, for an I/O op.
    pub fn ptr(&self, slot: usize, offset: usize) -> *mut u8 {
        assert!(
            slot < self.slots && offset <= self.slot_bytes,
            "slot {slot} offset {offset} out of range"
        );
        // SAFETY: bounds checked just above.
        unsafe { self.base.add(slot * self.slot_bytes + offset) }
    }

    /// `len` bytes of `slot` from `offset`, to read or modify in place.
    /// The caller must have no I/O op in flight on these bytes.
    pub fn region(&mut self, slot: usize, offset: usize, len: usize) -> &mut [u8] {
        assert!(
            slot < self.slots
                && offset
                    .checked_add(len)
                    .is_some_and(|e| e <= self.slot_bytes),
            "region out of range"
        );
        // SAFETY: bounds checked; the region lies in this share, which only
        // this thread uses; `&mut self` prevents overlapping Rust borrows and
        // the worker's state machine guarantees no kernel op targets it now.
        unsafe {
            std::slice::from_raw_parts_mut(self.base.add(slot * self.slot_bytes + offset), len)
        }
    }
}

/// Read-only view of part of a slot, lent by its worker to another thread
/// (a network sender) until that thread hands the slot back.
pub struct SlotLease {
    addr: usize,
    len: usize,
}

impl PoolShare {
    /// Lend `len` bytes of `slot` from `offset`. The worker must not touch
    /// the slot until the borrower gives it back.
    pub fn lease(&self, slot: usize, offset: usize, len: usize) -> SlotLease {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|e| e <= self.slot_bytes),
            "lease out of range"
        );
        SlotLease {
            addr: self.ptr(slot, offset) as usize,
            len,
        }
    }
}

impl SlotLease {
    /// The lent bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the lease was created in bounds of a live slot; the pool
        // outlives every borrower (the coordinator joins senders before
        // dropping it) and the owning worker does not write the slot while
        // it is lent (its state machine waits for the slot's return).
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_disjoint_and_aligned() {
        let mut pool = BufferPool::new(5, 1000).unwrap();
        assert_eq!(pool.slot_bytes(), 4096);
        let mut shares = pool.shares(2);
        assert_eq!(shares[0].slots() + shares[1].slots(), 5);
        assert_eq!(shares[0].ptr(0, 0) as usize % SLOT_ALIGN_BYTES, 0);
        let last0 = shares[0].ptr(shares[0].slots() - 1, 4096) as usize;
        assert_eq!(last0, shares[1].ptr(0, 0) as usize);
        shares[1].region(0, 0, 4096).fill(7);
        assert!(shares[0].region(0, 0, 4096).iter().all(|&b| b == 0));
    }
}
