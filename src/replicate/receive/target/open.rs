//! Mapping a HELLO's target name to an open file, without truncating
//! anything: [`Targets::open`].
//!
//! A name is a relative path below `--target-root` (no `.` / `..` / empty
//! components, no NUL, components ≤ 255 bytes). Its directories are opened
//! from the root's descriptor (taken at start-up) without following any
//! symbolic link ([`super::beneath`]), and the file in the last one with
//! `O_NOFOLLOW`, so nothing swapped in after a check can lead out of the
//! root. Names listed with `--allow NAME=PATH` map to that path instead
//! (block devices, files elsewhere; the operator chose the path, so its
//! symbolic links are followed).
//!
//! A regular file with more than one link is refused (another name could
//! reach it), as is anything in the state directory. A file that does not
//! exist is created with the configured mode (default 0600). What is opened
//! is identified by [`TargetKey`] (device and inode), so two names of one
//! file are one target.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::TargetError;
use super::beneath::{open_dir_beneath, openat};
use crate::endpoint::FileKind;
use crate::endpoint::file::describe_file_type;

/// Longest component of a target name (NAME_MAX).
pub const MAX_NAME_COMPONENT_BYTES: usize = 255;
/// Mode of target files the receiver creates, unless told otherwise.
pub const TARGET_MODE_DEFAULT: u32 = 0o600;
/// Lookups of a file that keeps appearing and disappearing before giving up.
const OPEN_TRIES: usize = 3;

/// What a target is, whatever name reached it: one job at a time per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKey {
    /// A regular file: its device and inode.
    File { dev: u64, ino: u64 },
    /// A block device: the device number it stands for.
    Device { rdev: u64 },
}

/// A target opened for a job, not yet truncated or sized.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub kind: FileKind,
    pub key: TargetKey,
    /// The receiver created the file just now (it was not there).
    pub created: bool,
    /// Size of the file, or of the block device.
    pub len_bytes: u64,
    /// The name the sender gave.
    pub name: String,
    /// Where it is on the receiver: for the receiver's log only, never
    /// for a peer.
    pub path: PathBuf,
}

/// The receiver's target root (open), allow list and creation mode.
#[derive(Debug)]
pub struct Targets {
    root: PathBuf,
    root_dir: File,
    allow: Vec<(String, PathBuf)>,
    mode: u32,
    state_dir: PathBuf,
}

impl Targets {
    /// `root` and `state_dir` must be canonical; `mode` is the permission
    /// bits of created files (≤ 0o777). Opens the root now: later renames
    /// of its path do not move the targets.
    pub fn new(
        root: PathBuf,
        allow: Vec<(String, PathBuf)>,
        mode: u32,
        state_dir: PathBuf,
    ) -> io::Result<Targets> {
        let root_dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&root)?;
        Ok(Targets {
            root,
            root_dir,
            allow,
            mode: mode & 0o777,
            state_dir,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `name` would be on the receiver (for its log).
    pub fn local_path(&self, name: &str) -> PathBuf {
        match self.allow.iter().find(|(allowed, _)| allowed == name) {
            Some((_, path)) => path.clone(),
            None => self.root.join(name),
        }
    }

    /// Opens (creating if missing) the target `name` for reading and
    /// writing. Truncates nothing.
    pub fn open(&self, name: &str) -> Result<Opened, TargetError> {
        if let Some((_, path)) = self.allow.iter().find(|(allowed, _)| allowed == name) {
            return self.open_allowed(name, path);
        }
        let (dirs, file_name) = split_name(name)?;
        let path = self.root.join(name);
        if path.starts_with(&self.state_dir) {
            return Err(TargetError::InStateDir { name: name.into() });
        }
        let dir = open_dir_beneath(&self.root_dir, &dirs).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => TargetError::NoDirectory {
                name: name.into(),
                dir: dirs.join("/"),
            },
            Some(libc::ELOOP | libc::EXDEV) => TargetError::OutsideRoot {
                name: name.into(),
                why: "a directory in it is a symbolic link".into(),
            },
            _ => open_error(name, &path, e),
        })?;
        if same_inode(&dir, &self.state_dir) {
            return Err(TargetError::InStateDir { name: name.into() });
        }
        let opened = self.open_in(name, &dir, file_name, &path)?;
        if opened.kind != FileKind::Regular {
            // Swapped in between the look and the open: below the root
            // the receiver writes regular files only.
            return Err(TargetError::WrongKind {
                name: name.into(),
                what: "a block device below the target root",
            });
        }
        Ok(opened)
    }

    fn open_in(
        &self,
        name: &str,
        dir: &File,
        file_name: &str,
        path: &Path,
    ) -> Result<Opened, TargetError> {
        let rw = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        for _ in 0..OPEN_TRIES {
            // Looked at first without opening it for I/O (O_PATH): opening
            // a device or FIFO can have effects of its own.
            match openat(dir, file_name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
                Ok(probe) => {
                    let file_type = probe
                        .metadata()
                        .map_err(|e| open_error(name, path, e))?
                        .file_type();
                    if file_type.is_symlink() {
                        return Err(symlink_error(name));
                    }
                    if !file_type.is_file() {
                        return Err(TargetError::WrongKind {
                            name: name.into(),
                            what: describe_file_type(file_type),
                        });
                    }
                    match openat(dir, file_name, rw, 0) {
                        Ok(file) => return self.opened(name, path, file, false),
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                            return Err(symlink_error(name));
                        }
                        Err(e) => return Err(open_error(name, path, e)),
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    match openat(dir, file_name, rw | libc::O_CREAT | libc::O_EXCL, self.mode) {
                        Ok(file) => return self.opened(name, path, file, true),
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                        Err(e) => return Err(open_error(name, path, e)),
                    }
                }
                Err(e) => return Err(open_error(name, path, e)),
            }
        }
        Err(open_error(name, path, vanishing()))
    }

    fn open_allowed(&self, name: &str, path: &Path) -> Result<Opened, TargetError> {
        if let (Some(parent), Some(file_name)) = (path.parent(), path.file_name())
            && let Ok(parent) = parent.canonicalize()
            && parent.join(file_name).starts_with(&self.state_dir)
        {
            return Err(TargetError::InStateDir { name: name.into() });
        }
        for _ in 0..OPEN_TRIES {
            match std::fs::metadata(path) {
                Ok(meta) => {
                    let file_type = meta.file_type();
                    if !file_type.is_file() && !file_type.is_block_device() {
                        return Err(TargetError::WrongKind {
                            name: name.into(),
                            what: describe_file_type(file_type),
                        });
                    }
                    let open = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(path);
                    match open {
                        Ok(file) => return self.opened(name, path, file, false),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(open_error(name, path, e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let open = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(self.mode)
                        .open(path);
                    match open {
                        Ok(file) => return self.opened(name, path, file, true),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(open_error(name, path, e)),
                    }
                }
                Err(e) => return Err(open_error(name, path, e)),
            }
        }
        Err(open_error(name, path, vanishing()))
    }

    /// What was opened, looked at through its descriptor. A created file
    /// gets exactly the configured mode (the umask may have taken bits).
    fn opened(
        &self,
        name: &str,
        path: &Path,
        file: File,
        created: bool,
    ) -> Result<Opened, TargetError> {
        let err = |e| open_error(name, path, e);
        if created {
            file.set_permissions(Permissions::from_mode(self.mode))
                .map_err(err)?;
        }
        let meta = file.metadata().map_err(err)?;
        let file_type = meta.file_type();
        let (kind, key, len_bytes) = if file_type.is_file() {
            let key = TargetKey::File {
                dev: meta.dev(),
                ino: meta.ino(),
            };
            (FileKind::Regular, key, meta.len())
        } else if file_type.is_block_device() {
            let len_bytes = (&file).seek(SeekFrom::End(0)).map_err(err)?;
            let key = TargetKey::Device { rdev: meta.rdev() };
            (FileKind::BlockDevice, key, len_bytes)
        } else {
            return Err(TargetError::WrongKind {
                name: name.into(),
                what: describe_file_type(file_type),
            });
        };
        if kind == FileKind::Regular && meta.nlink() > 1 {
            return Err(TargetError::HardLinked {
                name: name.into(),
                links: meta.nlink(),
            });
        }
        Ok(Opened {
            file,
            kind,
            key,
            created,
            len_bytes,
            name: name.into(),
            path: path.to_path_buf(),
        })
    }
}

/// Checks the naming rules; returns the directories and the file name.
pub fn split_name(name: &str) -> Result<(Vec<&str>, &str), TargetError> {
    let bad = |why| TargetError::BadName {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    if name.starts_with('/') {
        return Err(bad("is absolute"));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    for part in &parts {
        match *part {
            "" => return Err(bad("has an empty component (\"//\" or a trailing \"/\")")),
            "." | ".." => return Err(bad("has a \".\" or \"..\" component")),
            p if p.len() > MAX_NAME_COMPONENT_BYTES => {
                return Err(bad("has a component longer than 255 bytes"));
            }
            _ => {}
        }
    }
    let file_name = parts.pop().ok_or_else(|| bad("is empty"))?;
    Ok((parts, file_name))
}

fn same_inode(dir: &File, path: &Path) -> bool {
    match (dir.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn symlink_error(name: &str) -> TargetError {
    TargetError::OutsideRoot {
        name: name.into(),
        why: "its last component is a symbolic link".into(),
    }
}

fn open_error(name: &str, path: &Path, source: io::Error) -> TargetError {
    TargetError::Open {
        name: name.into(),
        path: path.to_path_buf(),
        source,
    }
}

fn vanishing() -> io::Error {
    io::Error::other("it kept appearing and disappearing while being opened; try again")
}
