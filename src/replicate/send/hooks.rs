//! Fault-injection hooks the tests arm through environment variables.
//! They exist only in builds with the `test-hooks` cargo feature (which
//! `scripts/test` turns on); a default or release build ignores the
//! variables.

use std::sync::OnceLock;

/// Environment variable of the corrupt-chunk test hook.
pub const CORRUPT_CHUNK_ENV: &str = "DISKFERRY_TEST_CORRUPT_CHUNK";

/// Test hook: `DISKFERRY_TEST_CORRUPT_CHUNK=N` flips a bit in the N-th
/// DATA payload (counted from 1) after its digest was taken and before it
/// is sealed, as memory corruption would. The receiver's digest check
/// must catch it. Only in builds with the `test-hooks` feature: release
/// builds ignore the variable.
pub(super) fn corrupt_chunk_at() -> Option<u64> {
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    *AT.get_or_init(|| corrupt_chunk_hook(std::env::var(CORRUPT_CHUNK_ENV).ok().as_deref()))
}

/// What the hook's variable arms: nothing unless built with `test-hooks`.
fn corrupt_chunk_hook(value: Option<&str>) -> Option<u64> {
    if cfg!(feature = "test-hooks") {
        value.and_then(|v| v.parse().ok())
    } else {
        None
    }
}

/// Log a hook that is armed. Tests look for this line, so a build without
/// the feature fails them instead of passing for the wrong reason.
pub(super) fn announce() {
    if let Some(n) = corrupt_chunk_at() {
        tracing::warn!("test hook armed: {CORRUPT_CHUNK_ENV}={n} corrupts DATA payload {n}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_corrupt_chunk_hook_is_armed_only_in_test_hook_builds() {
        let armed = super::corrupt_chunk_hook(Some("3"));
        if cfg!(feature = "test-hooks") {
            assert_eq!(armed, Some(3));
        } else {
            assert_eq!(
                armed, None,
                "a build without test-hooks must ignore the variable"
            );
        }
        assert_eq!(super::corrupt_chunk_hook(None), None);
        assert_eq!(super::corrupt_chunk_hook(Some("x")), None);
    }
}
