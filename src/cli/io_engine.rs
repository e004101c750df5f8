//! The operator's switch that turns io_uring off: `DISKFERRY_DISABLE_URING`.
//!
//! The library never reads the environment; the command line reads this
//! variable once and passes the choice down as an [`EngineKind`], with the
//! line to log when it forces the threaded engine.

#![forbid(unsafe_code)]
use std::ffi::OsStr;

use crate::engine::EngineKind;

/// Set to anything but empty or `0` to force the threaded engine (tests,
/// or hosts where io_uring misbehaves).
pub const DISABLE_URING_ENV: &str = "DISKFERRY_DISABLE_URING";

/// The engine to ask the library for, given `--io-engine` (`requested`)
/// and the environment: `(kind, line to log)`. With io_uring disabled, no
/// choice becomes the threaded engine (and a log line saying why) and an
/// explicit io_uring is refused with the reason.
pub fn io_engine_choice(
    requested: Option<EngineKind>,
) -> Result<(Option<EngineKind>, Option<String>), String> {
    choice_given(requested, std::env::var_os(DISABLE_URING_ENV).as_deref())
}

/// [`io_engine_choice`] for a given value of the variable.
fn choice_given(
    requested: Option<EngineKind>,
    value: Option<&OsStr>,
) -> Result<(Option<EngineKind>, Option<String>), String> {
    let Some(value) = value.filter(|v| !v.is_empty() && *v != "0") else {
        return Ok((requested, None));
    };
    let why = format!(
        "io_uring is disabled by {DISABLE_URING_ENV}={}",
        value.to_string_lossy()
    );
    match requested {
        None => Ok((
            Some(EngineKind::Threads),
            Some(format!("{why}; running the threaded engine")),
        )),
        Some(EngineKind::Uring) => Err(why),
        Some(EngineKind::Threads) => Ok((Some(EngineKind::Threads), None)),
    }
}

/// [`io_engine_choice`], logging the fallback.
pub(super) fn resolve(requested: Option<EngineKind>) -> Result<Option<EngineKind>, String> {
    let (kind, why) = io_engine_choice(requested)?;
    if let Some(why) = why {
        tracing::warn!("{why}");
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_empty_or_zero_leaves_the_choice_alone() {
        for value in [None, Some(OsStr::new("")), Some(OsStr::new("0"))] {
            for requested in [None, Some(EngineKind::Uring), Some(EngineKind::Threads)] {
                assert_eq!(choice_given(requested, value), Ok((requested, None)));
            }
        }
    }

    #[test]
    fn set_forces_threads_with_a_reason_and_refuses_an_explicit_uring() {
        let one = Some(OsStr::new("1"));
        let (kind, why) = choice_given(None, one).unwrap();
        assert_eq!(kind, Some(EngineKind::Threads));
        let why = why.expect("the fallback is logged");
        assert!(why.contains("DISKFERRY_DISABLE_URING=1"), "{why}");
        assert!(why.contains("running the threaded engine"), "{why}");
        let err = choice_given(Some(EngineKind::Uring), one).unwrap_err();
        assert!(err.contains(DISABLE_URING_ENV), "{err}");
        assert_eq!(
            choice_given(Some(EngineKind::Threads), one),
            Ok((Some(EngineKind::Threads), None))
        );
    }
}
