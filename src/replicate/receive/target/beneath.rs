//! Opening below a directory descriptor without following any symbolic
//! link: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or, where
//! openat2 is missing (ENOSYS, before Linux 5.6; EPERM under some seccomp
//! filters), a walk that opens one component at a time with `O_NOFOLLOW |
//! O_DIRECTORY`. Either way every component is looked up in the directory
//! opened before it, so a directory swapped for a symbolic link after a
//! check cannot lead out.

use std::fs::File;
use std::io;

use crate::engine::sys;
pub use crate::engine::sys::openat;

/// Flags of every directory opened on the way.
const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// Opens the directory `dirs[0]/dirs[1]/…` below `root` (a duplicate of
/// `root` when `dirs` is empty). A symbolic link anywhere fails with
/// `ELOOP`, an escape with `EXDEV`, a missing component with `ENOENT` and a
/// component that is not a directory with `ENOTDIR`. Each component must be
/// a plain name (no `/`, not `.` or `..`): the caller checked the name.
pub fn open_dir_beneath(root: &File, dirs: &[&str]) -> io::Result<File> {
    if dirs.is_empty() {
        return root.try_clone();
    }
    check_components(dirs)?;
    // RESOLVE_NO_SYMLINKS covers the last component too (ELOOP), which
    // O_NOFOLLOW | O_DIRECTORY would report as ENOTDIR.
    let flags = DIR_FLAGS & !libc::O_NOFOLLOW;
    match openat2_beneath(root, &dirs.join("/"), flags, 0) {
        // ENOSYS: a kernel before 5.6. EPERM: some container seccomp
        // profiles refuse syscalls they do not know that way; the walk is as
        // confining, and reports a real permission error itself.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            walk_beneath(root, dirs)
        }
        other => other,
    }
}

/// The fallback: one `openat(O_NOFOLLOW | O_DIRECTORY)` per component, each
/// relative to the directory opened before it.
pub fn walk_beneath(root: &File, dirs: &[&str]) -> io::Result<File> {
    check_components(dirs)?;
    let mut current = root.try_clone()?;
    for dir in dirs {
        current = match openat(&current, dir, DIR_FLAGS, 0) {
            Ok(next) => next,
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) && is_symlink(&current, dir) => {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            Err(e) => return Err(e),
        };
    }
    Ok(current)
}

/// Whether `name` in `dir` is a symbolic link (looked at with `O_PATH`,
/// which opens nothing for I/O).
fn is_symlink(dir: &File, name: &str) -> bool {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.file_type().is_symlink())
}

/// `openat2(dir, path, flags, mode)` resolving beneath `dir` and refusing
/// every symbolic link (and magic link) on the way.
pub fn openat2_beneath(dir: &File, path: &str, flags: libc::c_int, mode: u32) -> io::Result<File> {
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    sys::openat2(dir, path, flags, mode, resolve)
}

fn check_components(dirs: &[&str]) -> io::Result<()> {
    if dirs
        .iter()
        .any(|d| d.is_empty() || *d == "." || *d == ".." || d.contains('/'))
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn same(a: &File, b: &std::path::Path) -> bool {
        let (a, b) = (a.metadata().unwrap(), std::fs::metadata(b).unwrap());
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }

    /// Both ways (openat2 and the walk the ENOSYS fallback takes) open
    /// directories below the root and refuse a symbolic link anywhere.
    #[test]
    fn both_ways_stay_beneath_and_refuse_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root_path.join("a/b")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root_path.join("a/link")).unwrap();
        std::os::unix::fs::symlink("b", root_path.join("a/rel")).unwrap();
        std::fs::write(root_path.join("a/file"), b"x").unwrap();
        let root = File::open(&root_path).unwrap();
        // openat2 itself is there (Linux ≥ 5.6): else open_dir_beneath
        // would test the walk twice.
        let direct = openat2_beneath(&root, "a/b", libc::O_RDONLY | libc::O_DIRECTORY, 0);
        assert!(direct.is_ok(), "openat2: {direct:?}");
        type Open = fn(&File, &[&str]) -> io::Result<File>;
        let ways: [(&str, Open); 2] = [("openat2", open_dir_beneath), ("walk", walk_beneath)];
        for (way, open) in ways {
            let b = open(&root, &["a", "b"]).unwrap();
            assert!(same(&b, &root_path.join("a/b")), "{way}");
            let errno = |dirs: &[&str]| open(&root, dirs).unwrap_err().raw_os_error();
            assert_eq!(errno(&["a", "link"]), Some(libc::ELOOP), "{way}");
            assert_eq!(errno(&["a", "rel"]), Some(libc::ELOOP), "{way}");
            assert_eq!(errno(&["a", "missing"]), Some(libc::ENOENT), "{way}");
            assert_eq!(errno(&["a", "file"]), Some(libc::ENOTDIR), "{way}");
            assert_eq!(errno(&["a", ".."]), Some(libc::EINVAL), "{way}");
            assert_eq!(errno(&["a/b"]), Some(libc::EINVAL), "{way}");
        }
        // A file opened relative to the directory really lands there.
        let b = walk_beneath(&root, &["a", "b"]).unwrap();
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        openat(&b, "new", flags, 0o600).unwrap();
        assert!(root_path.join("a/b/new").exists());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    /// A directory swapped for a symbolic link after it was opened: what is
    /// opened relative to the descriptor stays in the directory opened.
    #[test]
    fn a_directory_swapped_after_opening_cannot_lead_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root_path.join("vm")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let root = File::open(&root_path).unwrap();
        let vm = open_dir_beneath(&root, &["vm"]).unwrap();
        std::fs::rename(root_path.join("vm"), root_path.join("vm.old")).unwrap();
        std::os::unix::fs::symlink(&outside, root_path.join("vm")).unwrap();
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        openat(&vm, "disk.img", flags, 0o600).unwrap();
        assert!(root_path.join("vm.old/disk.img").exists());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        for open in [open_dir_beneath, walk_beneath] {
            let e = open(&root, &["vm"]).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        }
    }
}
