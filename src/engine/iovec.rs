//! An owned, growable array of `iovec`s that may move between threads.
//!
//! The pointers inside are addresses handed to the kernel, never
//! dereferenced by Rust code; the owner keeps the memory they name valid
//! while an op using them is in flight.

/// See module docs.
#[derive(Default)]
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: an iovec is a pair of plain values (address, length). The
// addresses are only used by the kernel during an op, and the owner of an
// IoVecs moves it between threads only when no op using it is in flight.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Empty, with room for `n` entries.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    /// Removes every entry.
    pub fn clear(&mut self) {
        self.0.clear();
    }
    /// Appends the entry `len` bytes at address `addr`.
    pub fn push(&mut self, addr: usize, len: usize) {
        self.0.push(libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        });
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Length of entry `i`.
    pub fn entry_len(&self, i: usize) -> usize {
        self.0[i].iov_len
    }
    /// Drop the first `n` bytes of entry `i` (after a partial send).
    pub fn advance_entry(&mut self, i: usize, n: usize) {
        let v = &mut self.0[i];
        assert!(n <= v.iov_len);
        v.iov_base = (v.iov_base as usize + n) as *mut libc::c_void;
        v.iov_len -= n;
    }
    /// Pointer to entry `from` and the count of entries after it.
    pub fn tail(&self, from: usize) -> (*const libc::iovec, usize) {
        let rest = &self.0[from..];
        (rest.as_ptr(), rest.len())
    }
}
