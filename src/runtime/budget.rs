//! The engine's memory budget and its workers' op capacity, shared by every
//! job. A job reserves one contiguous range of the arena (its buffer pool)
//! and room for its contexts' ops on the workers it runs on; both come back
//! when the job's pool is dropped, after its contexts have finished.
//!
//! A job takes what it asks for but at most half of what is free (and at
//! least one slot per context), so jobs submitted together start at once:
//! the first few get their deep queues, the later ones shallower ones. Only
//! when less than one slot per context is free does a job wait for memory
//! to come back.

use crate::sync::lock;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::pipeline::pool::{Arena, BufferPool, SLOT_ALIGN_BYTES};

/// Ops a context may keep in flight per slot of its share, and beyond.
pub const OPS_PER_SLOT: usize = 8;
pub const OPS_PER_CONTEXT_BASE: usize = 64;

/// Why a job got no memory.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// Even one slot per worker does not fit in the whole budget.
    #[error(
        "the memory budget ({budget_bytes} bytes) cannot hold one {slot_bytes}-byte chunk for each of {contexts} workers"
    )]
    TooSmall {
        budget_bytes: usize,
        slot_bytes: usize,
        contexts: usize,
    },
    /// The caller gave up waiting (the job was cancelled).
    #[error("gave up waiting for memory")]
    GaveUp,
    #[error("carving a buffer pool: {0}")]
    Pool(#[from] std::io::Error),
}

/// What a job got.
pub struct Grant {
    /// Its buffers; dropping the pool gives back memory and ops.
    pub pool: BufferPool,
    /// The workers it runs on, one context each.
    pub workers: Vec<usize>,
    /// Ops each context may keep in flight.
    pub ops_per_context: usize,
}

pub struct Budget {
    arena: Arena,
    state: Mutex<State>,
    returned: Condvar,
}

struct State {
    /// Free ranges of the arena (offset, length), sorted and merged.
    free: Vec<(usize, usize)>,
    /// Ops each worker can still take.
    ops_free: Vec<usize>,
    /// Contexts on each worker.
    contexts: Vec<usize>,
}

impl Budget {
    pub fn new(
        memory_bytes: usize,
        workers: usize,
        ops_per_worker: usize,
    ) -> std::io::Result<Self> {
        let arena = Arena::new(memory_bytes)?;
        let total = arena.total_bytes();
        Ok(Self {
            arena,
            state: Mutex::new(State {
                free: vec![(0, total)],
                ops_free: vec![ops_per_worker; workers],
                contexts: vec![0; workers],
            }),
            returned: Condvar::new(),
        })
    }

    pub fn total_bytes(&self) -> usize {
        self.arena.total_bytes()
    }

    /// Reserve up to `want_slots` slots of `slot_bytes` for a job running
    /// one context on each of `contexts` workers (at least one slot per
    /// context). Waits while not even that is free, asking `give_up` every
    /// 100 ms.
    pub fn reserve(
        self: &Arc<Self>,
        want_slots: usize,
        slot_bytes: usize,
        contexts: usize,
        give_up: &dyn Fn() -> bool,
    ) -> Result<Grant, BudgetError> {
        let slot_bytes = slot_bytes.div_ceil(SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES;
        let mut state = lock(&self.state);
        let contexts = contexts.clamp(1, state.contexts.len());
        let min_slots = contexts;
        let too_small = BudgetError::TooSmall {
            budget_bytes: self.arena.total_bytes(),
            slot_bytes,
            contexts,
        };
        if min_slots.saturating_mul(slot_bytes) > self.arena.total_bytes() {
            return Err(too_small);
        }
        loop {
            if let Some(grant) = state.carve(want_slots, slot_bytes, contexts) {
                let (offset, slots, workers, ops) = grant;
                let release = Release {
                    budget: Arc::clone(self),
                    offset,
                    len: slots * slot_bytes,
                    workers: workers.clone(),
                    ops,
                };
                let pool = self
                    .arena
                    .pool(offset, slots, slot_bytes, Box::new(release))?;
                return Ok(Grant {
                    pool,
                    workers,
                    ops_per_context: ops,
                });
            }
            if give_up() {
                return Err(BudgetError::GaveUp);
            }
            state = self
                .returned
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl State {
    /// Choose workers and a range, or `None` if not even one slot per
    /// context fits now. Returns (offset, slots, workers, ops per context).
    fn carve(
        &mut self,
        want_slots: usize,
        slot_bytes: usize,
        contexts: usize,
    ) -> Option<(usize, usize, Vec<usize>, usize)> {
        // The least crowded workers, with the most room for ops.
        let mut order: Vec<usize> = (0..self.contexts.len()).collect();
        order.sort_by_key(|&w| (self.contexts[w], usize::MAX - self.ops_free[w]));
        let workers: Vec<usize> = order.into_iter().take(contexts).collect();
        let ops_room = workers.iter().map(|&w| self.ops_free[w]).min()?;
        let per_context_max = ops_room.checked_sub(OPS_PER_CONTEXT_BASE)? / OPS_PER_SLOT;
        let (index, &(offset, len)) = self.free.iter().enumerate().max_by_key(|(_, r)| r.1)?;
        let free_slots = len / slot_bytes;
        let fair = (free_slots / 2).max(contexts);
        let slots = want_slots
            .max(contexts)
            .min(fair)
            .min(free_slots)
            .min(per_context_max * contexts);
        if slots < contexts {
            return None;
        }
        let ops = slots.div_ceil(contexts) * OPS_PER_SLOT + OPS_PER_CONTEXT_BASE;
        let bytes = slots * slot_bytes;
        if bytes == len {
            self.free.remove(index);
        } else {
            self.free[index] = (offset + bytes, len - bytes);
        }
        for &w in &workers {
            self.ops_free[w] -= ops;
            self.contexts[w] += 1;
        }
        Some((offset, slots, workers, ops))
    }

    fn give_back(&mut self, offset: usize, len: usize, workers: &[usize], ops: usize) {
        for &w in workers {
            self.ops_free[w] += ops;
            self.contexts[w] -= 1;
        }
        let at = self.free.partition_point(|r| r.0 < offset);
        self.free.insert(at, (offset, len));
        // Merge with the neighbours.
        if at + 1 < self.free.len() && self.free[at].0 + self.free[at].1 == self.free[at + 1].0 {
            self.free[at].1 += self.free[at + 1].1;
            self.free.remove(at + 1);
        }
        if at > 0 && self.free[at - 1].0 + self.free[at - 1].1 == self.free[at].0 {
            self.free[at - 1].1 += self.free[at].1;
            self.free.remove(at);
        }
    }
}

/// Gives a job's range and ops back when its pool drops.
struct Release {
    budget: Arc<Budget>,
    offset: usize,
    len: usize,
    workers: Vec<usize>,
    ops: usize,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut state = lock(&self.budget.state);
        state.give_back(self.offset, self.len, &self.workers, self.ops);
        self.budget.returned.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn jobs_together_all_start_and_memory_comes_back() {
        let budget = Arc::new(Budget::new(16 * MIB, 2, 8192).unwrap());
        let never = || false;
        let a = budget.reserve(64, 256 * 1024, 2, &never).unwrap();
        assert_eq!(a.pool.slots(), 32, "half of what is free");
        let b = budget.reserve(64, 256 * 1024, 2, &never).unwrap();
        assert_eq!(b.pool.slots(), 16);
        let c = budget.reserve(4, 256 * 1024, 2, &never).unwrap();
        assert_eq!(c.pool.slots(), 4, "what it asked for");
        assert_eq!(c.ops_per_context, 2 * OPS_PER_SLOT + OPS_PER_CONTEXT_BASE);
        drop((a, b, c));
        // Half of the whole budget: every range merged back into one.
        let half = budget.reserve(64, MIB, 2, &never).unwrap();
        assert_eq!(half.pool.slots(), 8);
    }

    #[test]
    fn a_budget_below_one_chunk_per_worker_is_refused_and_a_full_one_waits() {
        let budget = Arc::new(Budget::new(MIB, 2, 8192).unwrap());
        let err = budget.reserve(8, MIB, 2, &|| false).err().unwrap();
        assert!(matches!(err, BudgetError::TooSmall { .. }), "{err}");
        // 4 slots: half to the first, the rest (one per context) to the second.
        let first = budget.reserve(4, 256 * 1024, 2, &|| false).unwrap();
        let second = budget.reserve(4, 256 * 1024, 2, &|| false).unwrap();
        assert_eq!((first.pool.slots(), second.pool.slots()), (2, 2));
        let err = budget.reserve(4, 256 * 1024, 2, &|| true).err().unwrap();
        assert!(matches!(err, BudgetError::GaveUp));
    }
}
