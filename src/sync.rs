//! Small synchronisation helpers shared by the whole crate.

#![forbid(unsafe_code)]

/// Locks `m`, ignoring poison: a panic on another thread must not take
/// this one down with it. Callers keep the protected values consistent
/// under the lock (plain counters, maps and sets changed one step at a
/// time), so the value a panicking thread left behind is still usable.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
