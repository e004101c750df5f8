//! CPU pinning for the thread-per-core workers.

/// Pin the calling thread to one CPU (sched_setaffinity on the thread).
/// Fails with `InvalidInput` when `cpu` cannot be represented in a
/// `cpu_set_t`, or with the kernel's error (e.g. `EINVAL` when the CPU is
/// offline or outside the cgroup's cpuset).
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    let set_size_cpus = 8 * std::mem::size_of::<libc::cpu_set_t>();
    if cpu >= set_size_cpus {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("cpu {cpu} is beyond the {set_size_cpus} CPUs a cpu_set_t can name"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` was checked above to be below the set's capacity, so
    // CPU_SET writes inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 means the calling thread; the pointer and size describe
    // the live `set` on this stack frame.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Number of CPUs currently online (at least 1).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_to_cpu_zero_then_affinity_is_that_cpu() {
        let cpus = online_cpus();
        assert!(cpus >= 1);
        std::thread::spawn(|| {
            pin_current_thread(0).expect("pin to cpu 0");
            // SAFETY: all-zero cpu_set_t is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: pid 0 = this thread; pointer/size describe `set`.
            let rc = unsafe {
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set)
            };
            assert_eq!(rc, 0);
            // SAFETY: both indices are below CPU_SETSIZE.
            let (on0, on1) = unsafe { (libc::CPU_ISSET(0, &set), libc::CPU_ISSET(1, &set)) };
            assert!(on0 && !on1);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn pin_out_of_range_is_invalid_input() {
        let err = pin_current_thread(1 << 20).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
