//! The fault-injection hooks the tests arm through the environment. Only
//! the command line reads them, and only in builds with the `test-hooks`
//! cargo feature: a default or release build ignores the variables.

#![forbid(unsafe_code)]

use crate::replicate::send::TestHooks;

/// `DISKFERRY_TEST_CORRUPT_CHUNK=N`: flip a bit in the N-th DATA payload a
/// `send` puts on the wire (see [`TestHooks::corrupt_chunk_at`]).
pub const CORRUPT_CHUNK_ENV: &str = "DISKFERRY_TEST_CORRUPT_CHUNK";

/// The hooks the environment arms (none without the `test-hooks` feature).
pub fn from_env() -> TestHooks {
    if !cfg!(feature = "test-hooks") {
        return TestHooks::default();
    }
    TestHooks {
        corrupt_chunk_at: std::env::var(CORRUPT_CHUNK_ENV)
            .ok()
            .and_then(|v| v.parse().ok()),
    }
}
