//! SIGTERM sets the receiver's stop flag instead of killing the process.

use std::sync::atomic::Ordering;

#[test]
fn sigterm_sets_the_stop_flag() {
    let stop = diskferry::replicate::receive::serve::install_stop_signals();
    assert!(!stop.load(Ordering::SeqCst));
    signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
    // The handler runs synchronously in raise() for this thread.
    assert!(stop.load(Ordering::SeqCst));
}
