//! [`JournalStore`]: one journal file per target in the state directory,
//! replaced atomically; [`Checkpointer`]: when to take the next checkpoint.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::JournalError;
use super::codec::{Journal, MAX_JOURNAL_BYTES, MAX_RANGES_DEFAULT};

/// Checkpoint at least this often while new data arrives.
pub const CHECKPOINT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// ... or after this much new data, whichever comes first.
pub const CHECKPOINT_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;

const SUFFIX: &str = ".journal";
/// Temporary files are `<journal>.<pid>-<n>.tmp`.
const TMP_SUFFIX: &str = ".tmp";
/// Mode bits that let someone other than the owner change the directory.
const GROUP_OTHER_WRITE: u32 = 0o022;
/// Numbers the temporary files of this process (with the pid: unique).
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
/// Readable part of a file name; the hash makes it unique.
const PREFIX_MAX_CHARS: usize = 40;

/// The journals of one `--state-dir`.
#[derive(Debug, Clone)]
pub struct JournalStore {
    dir: PathBuf,
    max_ranges: usize,
}

impl JournalStore {
    /// Opens (creating with mode 0700 if needed) the state directory and
    /// removes temporary files a crash left behind: they were never renamed
    /// into place, so they hold nothing that was promised durable.
    ///
    /// Does not check who owns the directory: the receiver opens its state
    /// with [`JournalStore::open_checked`].
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        create_private_dir(dir)?;
        Self::open_created(dir)
    }

    /// A store over `dir` for reading journals while a receiver may be
    /// writing them (tools, tests): no directory is created and no leftover
    /// is removed, since a temporary file may be a save in progress.
    pub fn reader(dir: &Path) -> Self {
        JournalStore {
            dir: dir.to_path_buf(),
            max_ranges: MAX_RANGES_DEFAULT,
        }
    }

    /// As [`JournalStore::open`], but refuses a directory that someone
    /// else could tamper with: a symbolic link, a directory not owned by
    /// `owner_uid` (the receiver's effective uid), or one writable by group
    /// or others. Each refusal says what to fix.
    pub fn open_checked(dir: &Path, owner_uid: u32) -> Result<Self, JournalError> {
        create_private_dir(dir)?;
        let meta = fs::symlink_metadata(dir).map_err(io_err("inspect the state directory", dir))?;
        let path = dir.to_path_buf();
        if meta.file_type().is_symlink() {
            return Err(JournalError::StateDirSymlink { path });
        }
        if !meta.is_dir() {
            return Err(JournalError::StateDirNotDir { path });
        }
        if meta.uid() != owner_uid {
            return Err(JournalError::StateDirOwner {
                path,
                owner_uid: meta.uid(),
                uid: owner_uid,
            });
        }
        if meta.mode() & GROUP_OTHER_WRITE != 0 {
            return Err(JournalError::StateDirWritable {
                path,
                mode: meta.mode() & 0o7777,
            });
        }
        Self::open_created(dir)
    }

    fn open_created(dir: &Path) -> Result<Self, JournalError> {
        let entries = fs::read_dir(dir).map_err(io_err("list the state directory", dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list the state directory", dir))?;
            let is_tmp = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(TMP_SUFFIX) && n.contains(SUFFIX));
            if is_tmp {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove the leftover", &path)(e)),
                }
            }
        }
        Ok(JournalStore {
            dir: dir.to_path_buf(),
            max_ranges: MAX_RANGES_DEFAULT,
        })
    }

    /// Caps the durable ranges written per journal (the smallest beyond it
    /// are dropped and re-sent on resume). Clamped to 1 ..= 2²⁰.
    pub fn with_max_ranges(mut self, max_ranges: usize) -> Self {
        self.max_ranges = max_ranges.clamp(1, super::MAX_RANGES_HARD);
        self
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The journal file of `target_name`: a sanitized readable prefix plus
    /// the hex BLAKE3 of the whole name, so every name maps to one file
    /// directly inside the directory and distinct names to distinct files.
    pub fn path_for(&self, target_name: &str) -> PathBuf {
        self.dir.join(file_name_for(target_name))
    }

    /// The journal of `target_name`, or `None` if there is none. A file
    /// that cannot be trusted is an error ([`JournalError::is_damaged`]).
    ///
    /// The file is opened without following a symbolic link and must be a
    /// regular file of at most [`MAX_JOURNAL_BYTES`]; nothing larger is
    /// read.
    pub fn load(&self, target_name: &str) -> Result<Option<Journal>, JournalError> {
        let path = self.path_for(target_name);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                let what = "a symbolic link";
                return Err(JournalError::NotAFile { what }.at(path));
            }
            Err(e) => return Err(io_err("read the journal", &path)(e)),
        };
        let meta = file.metadata().map_err(io_err("read the journal", &path))?;
        if meta.is_dir() {
            // Not damage: a save could not replace it either.
            let e = io::Error::from_raw_os_error(libc::EISDIR);
            return Err(io_err("read the journal", &path)(e));
        }
        if !meta.is_file() {
            let what = "a special file";
            return Err(JournalError::NotAFile { what }.at(path));
        }
        if meta.len() > MAX_JOURNAL_BYTES as u64 {
            return Err(JournalError::TooLarge {
                len_bytes: meta.len(),
            }
            .at(path));
        }
        let mut bytes =
            Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(MAX_JOURNAL_BYTES));
        // One byte past the bound: a file that grew since fstat is caught.
        file.take(MAX_JOURNAL_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err("read the journal", &path))?;
        if bytes.len() > MAX_JOURNAL_BYTES {
            return Err(JournalError::TooLarge {
                len_bytes: bytes.len() as u64,
            }
            .at(path));
        }
        Journal::decode(&bytes).map(Some).map_err(|e| e.at(path))
    }

    /// Replaces the journal of `journal.target_name`: write a temporary file
    /// in the same directory, fsync it, rename it over the old one, fsync
    /// the directory. A crash at any point leaves the old or the new
    /// journal, never a mix. The encoding is decoded back before anything
    /// is written (a paired check). The temporary file has a name no other
    /// save uses and is created with `O_EXCL`, mode 0600.
    pub fn save(&self, journal: &Journal) -> Result<(), JournalError> {
        let bytes = journal.encode_capped(self.max_ranges);
        if let Err(e) = Journal::decode(&bytes) {
            return Err(JournalError::Unencodable {
                source: Box::new(e),
            });
        }
        let path = self.path_for(&journal.target_name);
        let tmp = tmp_path(&path);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        let written = file
            .write_all(&bytes)
            .map_err(io_err("write", &tmp))
            .and_then(|()| file.sync_all().map_err(io_err("fsync", &tmp)));
        drop(file);
        if let Err(e) = written.and_then(|()| {
            fs::rename(&tmp, &path).map_err(io_err("rename the journal into", &path))
        }) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.sync_dir()
    }

    /// Deletes the journal of `target_name` (nothing if there is none).
    pub fn remove(&self, target_name: &str) -> Result<(), JournalError> {
        let path = self.path_for(target_name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    fn sync_dir(&self) -> Result<(), JournalError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync the state directory", &self.dir))
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io {
        action,
        path,
        source,
    }
}

/// `<path>.<pid>-<n>.tmp`: unique within the directory while this process
/// lives (a crashed process's leftovers are removed by the next open).
pub(super) fn tmp_path(path: &Path) -> PathBuf {
    let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}-{n}{TMP_SUFFIX}", std::process::id()));
    PathBuf::from(name)
}

/// Creates `dir` (and missing parents) with mode 0700.
fn create_private_dir(dir: &Path) -> Result<(), JournalError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create the state directory", dir))
}

/// `<prefix>-<64 hex digits><SUFFIX>`; the prefix keeps ASCII letters,
/// digits, `-` and `_` (others become `_`), at most 40 of them, so it can
/// hold neither `/`, `.` nor NUL.
fn file_name_for(target_name: &str) -> String {
    let prefix: String = target_name
        .chars()
        .take(PREFIX_MAX_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = blake3::hash(target_name.as_bytes());
    format!("{prefix}-{}{SUFFIX}", hash.to_hex())
}

/// When to take the next checkpoint: after `interval` with new data, or
/// once `bytes` of new data arrived, whichever comes first.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    interval: Duration,
    threshold_bytes: u64,
    since_bytes: u64,
    last: Instant,
}

impl Default for Checkpointer {
    fn default() -> Self {
        Checkpointer::new(CHECKPOINT_INTERVAL_DEFAULT, CHECKPOINT_BYTES_DEFAULT)
    }
}

impl Checkpointer {
    /// Starts the interval now.
    pub fn new(interval: Duration, bytes: u64) -> Self {
        Checkpointer::starting_at(interval, bytes, Instant::now())
    }

    /// Starts the interval at `now` (for deterministic tests and drivers
    /// with their own clock).
    pub fn starting_at(interval: Duration, bytes: u64, now: Instant) -> Self {
        Checkpointer {
            interval,
            threshold_bytes: bytes.max(1),
            since_bytes: 0,
            last: now,
        }
    }

    /// Counts bytes that will be durable at the next flush.
    pub fn note_written(&mut self, n_bytes: u64) {
        self.since_bytes = self.since_bytes.saturating_add(n_bytes);
    }

    /// Bytes noted since the last checkpoint.
    pub fn pending_bytes(&self) -> u64 {
        self.since_bytes
    }

    /// True if a checkpoint is due: there is new data, and the interval
    /// passed or the byte threshold was reached.
    pub fn due(&self, now: Instant) -> bool {
        self.since_bytes >= self.threshold_bytes
            || (self.since_bytes > 0 && now.saturating_duration_since(self.last) >= self.interval)
    }

    /// How long until the interval alone makes a checkpoint due (zero if
    /// it already passed): a driver's wait timeout.
    pub fn time_left(&self, now: Instant) -> Duration {
        self.interval
            .saturating_sub(now.saturating_duration_since(self.last))
    }

    /// Records a checkpoint taken at `now`.
    pub fn taken(&mut self, now: Instant) {
        self.since_bytes = 0;
        self.last = now;
    }
}
