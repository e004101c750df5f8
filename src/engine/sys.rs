//! Safe wrappers for the system calls the rest of the tree makes outside the
//! engines' data path: file ranges (`sync_file_range`, `posix_fadvise`,
//! `fallocate`, `lseek`), opening below a directory (`openat`, `openat2`),
//! the process (`geteuid`, `mallopt`) and child processes (`PR_SET_PDEATHSIG`,
//! `kill`). Each takes borrowed files and plain integers and returns an
//! `io::Result`, so the modules that call them compile under
//! `#![forbid(unsafe_code)]`; the unsafe blocks live here, each with the
//! invariant it relies on.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// `EFBIG` for an offset or length that does not fit the kernel's `off_t`.
fn too_big() -> io::Error {
    io::Error::from_raw_os_error(libc::EFBIG)
}

/// `Ok(())` for a syscall that returned 0, else the thread's `errno`.
fn zero_or_errno(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `sync_file_range(2)` over `[offset, offset + len_bytes)` with `flags`
/// (`SYNC_FILE_RANGE_*`). `EFBIG` when the range does not fit an `off64_t`.
pub fn sync_file_range(file: &File, offset: u64, len_bytes: u64, flags: u32) -> io::Result<()> {
    let offset = libc::off64_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off64_t::try_from(len_bytes).map_err(|_| too_big())?;
    // SAFETY: sync_file_range(2) passes no memory: a descriptor borrowed from
    // a live `File` (open for the whole call) and three integers.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    zero_or_errno(rc)
}

/// `posix_fadvise(2)` over `[offset, offset + len_bytes)` with `advice`
/// (`POSIX_FADV_*`). `EFBIG` when the range does not fit an `off_t`.
pub fn fadvise(file: &File, offset: u64, len_bytes: u64, advice: libc::c_int) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len_bytes).map_err(|_| too_big())?;
    // SAFETY: posix_fadvise(2) passes no memory: a descriptor borrowed from a
    // live `File` and three integers.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, advice) };
    // posix_fadvise returns the error number instead of setting errno.
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// `fallocate(2)` over `[offset, offset + len_bytes)` with `mode`
/// (`FALLOC_FL_*`). `EFBIG` when the range does not fit an `off_t`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len_bytes: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len_bytes).map_err(|_| too_big())?;
    // SAFETY: fallocate(2) passes no memory: a descriptor borrowed from a
    // live `File` and three integers.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    zero_or_errno(rc)
}

/// `lseek(2)`: moves the file position of `file` and returns the new one.
/// `InvalidInput` when `offset` does not fit an `off_t`. Used with
/// `SEEK_DATA` / `SEEK_HOLE`, which std's `Seek` does not offer.
pub fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek(2) passes no memory: a descriptor borrowed from a live
    // `File` and two integers. Moving the file position is harmless: every
    // data-path access uses positioned I/O (pread / io_uring).
    let result = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    // A negative result is -1 with errno set; anything else is a position.
    u64::try_from(result).map_err(|_| io::Error::last_os_error())
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`: opens `name` relative to
/// the directory `dir`. `EINVAL` when `name` holds a NUL byte.
pub fn openat(dir: &File, name: &str, flags: libc::c_int, mode: u32) -> io::Result<File> {
    let name = c_path(name)?;
    // SAFETY: openat(2) reads the NUL-terminated `name`, alive for the
    // call; the descriptor is borrowed from a live `File`.
    let rc = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            libc::c_uint::from(mode),
        )
    };
    owned(libc::c_long::from(rc))
}

/// `openat2(dir, path, {flags, mode, resolve})`: opens `path` relative to
/// the directory `dir` under the `RESOLVE_*` rules in `resolve`. `EINVAL`
/// when `path` holds a NUL byte or `flags` is negative; `ENOSYS` before
/// Linux 5.6.
pub fn openat2(
    dir: &File,
    path: &str,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> io::Result<File> {
    let path = c_path(path)?;
    // SAFETY: `open_how` is three integers; all-zero is a valid value (and
    // what the kernel expects of fields not set).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::try_from(flags).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    how.mode = u64::from(mode);
    how.resolve = resolve;
    // SAFETY: openat2(2) reads the NUL-terminated `path` and `how` (whose
    // size is passed with it), both alive for the call; the descriptor is
    // borrowed from a live `File`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    owned(rc)
}

/// The `File` owning the descriptor an open call returned, or its error.
fn owned(rc: libc::c_long) -> io::Result<File> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned `fd`, a new descriptor nothing else
    // owns; the `File` closes it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn c_path(path: &str) -> io::Result<CString> {
    CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The process's effective user id.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot
    // fail.
    unsafe { libc::geteuid() }
}

/// Keep freed heap memory instead of handing it back to the kernel: sets
/// glibc's trim threshold to `trim_threshold_bytes` and its mmap threshold
/// to `mmap_threshold_bytes` (`mallopt(3)`). Does nothing on other C
/// libraries. Call it at start-up, before other threads allocate.
pub fn keep_heap(trim_threshold_bytes: libc::c_int, mmap_threshold_bytes: libc::c_int) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (under glibc's arena
    // lock); it passes no memory.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold_bytes);
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold_bytes);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (trim_threshold_bytes, mmap_threshold_bytes);
}

/// Makes the kernel send `SIGTERM` to the child `command` spawns when the
/// spawning thread dies (`prctl(PR_SET_PDEATHSIG)`). The spawn fails with
/// `ESRCH` when this process died before the child could ask.
pub fn terminate_with_parent(command: &mut Command) {
    let parent_pid = std::process::id();
    let hook = move || -> io::Result<()> {
        // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on the calling
        // (child) process; it is async-signal-safe and touches no memory.
        let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
        zero_or_errno(rc)?;
        // SAFETY: getppid has no preconditions and is async-signal-safe.
        let ppid = unsafe { libc::getppid() };
        // The parent may have died before prctl ran: then nobody would
        // signal us, so refuse to start.
        if u32::try_from(ppid).ok() != Some(parent_pid) {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec; it calls only
    // async-signal-safe functions (prctl, getppid), allocates nothing and
    // takes no locks.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Sends `SIGTERM` to `child` (std's `Child::kill` only sends `SIGKILL`).
/// Call it only on a child not yet reaped (`try_wait` returned `None`, and
/// only the caller waits on it): a reaped child's pid may name another
/// process. `InvalidInput` when the pid does not fit a `pid_t`.
pub fn terminate(child: &Child) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) passes no memory, only two integers.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    zero_or_errno(rc)
}
