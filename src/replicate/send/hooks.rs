//! Fault-injection hooks the tests arm. The library never reads them from
//! the environment: the command line does, and only in builds with the
//! `test-hooks` cargo feature (which `scripts/test` turns on); in other
//! builds it never sets them and the injecting code is compiled out.

/// Faults a test asks the sender to inject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestHooks {
    /// Flip a bit in the N-th DATA payload (counted from 1) after its
    /// digest was taken and before it is sealed, as memory corruption
    /// would. The receiver's digest check must catch it.
    pub corrupt_chunk_at: Option<u64>,
}

impl TestHooks {
    /// The N-th DATA payload is to be corrupted (never, without the
    /// `test-hooks` feature).
    pub(super) fn corrupts(&self, frame_no: u64) -> bool {
        cfg!(feature = "test-hooks") && self.corrupt_chunk_at == Some(frame_no)
    }

    /// Logs a hook that is armed. Tests look for this line, so a build
    /// without the feature fails them instead of passing for the wrong
    /// reason.
    pub(super) fn announce(&self) {
        if let Some(n) = self
            .corrupt_chunk_at
            .filter(|_| cfg!(feature = "test-hooks"))
        {
            tracing::warn!("test hook armed: corrupt-chunk corrupts DATA payload {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TestHooks;

    #[test]
    fn the_corrupt_chunk_hook_is_armed_only_in_test_hook_builds() {
        let hooks = TestHooks {
            corrupt_chunk_at: Some(3),
        };
        assert_eq!(hooks.corrupts(3), cfg!(feature = "test-hooks"));
        assert!(!hooks.corrupts(2));
        assert!(!TestHooks::default().corrupts(1));
    }
}
