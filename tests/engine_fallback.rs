//! Engine choice and the forced fallback. The library never reads the
//! environment: the CLI reads `DISKFERRY_DISABLE_URING` and passes the
//! threaded engine down. Environment variables are process-global, so this
//! binary holds a single test that sets the variable only after the checks
//! that need it unset.

use diskferry::cli::{DISABLE_URING_ENV as DISABLE_ENV, io_engine_choice};
use diskferry::engine::{self, EngineKind, Op};

#[test]
fn choose_picks_uring_here_and_falls_back_when_disabled_by_env() {
    assert!(
        std::env::var_os(DISABLE_ENV).is_none(),
        "run without {DISABLE_ENV} set"
    );
    assert_eq!(io_engine_choice(None), Ok((None, None)));
    assert_eq!(engine::choose(None), Ok((EngineKind::Uring, None)));
    assert_eq!(
        engine::choose(Some(EngineKind::Uring)),
        Ok((EngineKind::Uring, None))
    );

    // SAFETY: this binary has one test and it spawns no threads, so nothing
    // reads the environment concurrently.
    unsafe { std::env::set_var(DISABLE_ENV, "1") };

    let (asked, reason) = io_engine_choice(None).unwrap();
    assert_eq!(asked, Some(EngineKind::Threads));
    let reason = reason.expect("a fallback names its reason");
    assert!(reason.contains("DISKFERRY_DISABLE_URING=1"), "{reason}");
    assert!(reason.contains("running the threaded engine"), "{reason}");

    let err = io_engine_choice(Some(EngineKind::Uring)).unwrap_err();
    assert!(err.contains(DISABLE_ENV), "{err}");
    assert_eq!(
        io_engine_choice(Some(EngineKind::Threads)),
        Ok((Some(EngineKind::Threads), None))
    );
    // The library itself does not look at the variable.
    assert_eq!(engine::choose(None), Ok((EngineKind::Uring, None)));
    let (kind, none) = engine::choose(asked).unwrap();
    assert_eq!((kind, none), (EngineKind::Threads, None));

    // The engine chosen by the fallback works.
    let mut engine = engine::build(kind, 1).unwrap();
    assert_eq!(engine.kind(), EngineKind::Threads);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = std::fs::File::create(dir.path().join("f")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    engine.push(3, Op::Fsync { fd, datasync: true }).unwrap();
    let mut done = Vec::new();
    engine.wait(1, &mut done).unwrap();
    assert_eq!(
        done,
        vec![engine::Completion {
            user_data: 3,
            result: 0
        }]
    );
}
