//! Store tests: atomic replace, crash leftovers, damaged files, hostile
//! target names, the checkpoint policy.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use super::*;

fn journal(name: &str) -> Journal {
    let mut j = Journal::new(name, "/dev/null", "size=4096;gen=1", 4096, 512, [3; 16], 10);
    j.durable.insert(0, 1024);
    j
}

#[test]
fn open_creates_a_private_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/state");
    let store = JournalStore::open(&dir).unwrap();
    assert_eq!(store.dir(), dir);
    let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[test]
fn save_load_replace_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    assert!(store.load("vm1").unwrap().is_none());

    let mut j = journal("vm1");
    store.save(&j).unwrap();
    assert_eq!(store.load("vm1").unwrap(), Some(j.clone()));
    let mode = fs::metadata(store.path_for("vm1"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    j.durable.insert(1024, 3072);
    j.complete = true;
    store.save(&j).unwrap();
    assert_eq!(store.load("vm1").unwrap(), Some(j));
    assert!(store.load("vm2").unwrap().is_none());

    store.remove("vm1").unwrap();
    assert!(store.load("vm1").unwrap().is_none());
    store.remove("vm1").unwrap(); // nothing there: fine
    // Nothing but journals left in the directory.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn crash_leftovers_are_ignored_and_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    let j = journal("vm1");
    store.save(&j).unwrap();
    // A crash between write and rename of the next save: a half-written
    // temporary file next to the journal.
    let path = store.path_for("vm1");
    let leftover = format!("{}.tmp", path.display());
    fs::write(&leftover, b"DFJOURNL half").unwrap();
    assert_eq!(store.load("vm1").unwrap(), Some(j.clone()));

    let reopened = JournalStore::open(tmp.path()).unwrap();
    assert!(!fs::exists(&leftover).unwrap());
    assert_eq!(reopened.load("vm1").unwrap(), Some(j.clone()));

    // A leftover never stops the next save (which uses a name of its own)
    // and is left for the next open to remove.
    fs::write(&leftover, vec![0xAA; 100_000]).unwrap();
    store.save(&j).unwrap();
    assert_eq!(fs::read(&leftover).unwrap(), vec![0xAA; 100_000]);
    assert_eq!(fs::read(&path).unwrap(), j.encode());
}

#[test]
fn damaged_files_are_refused_with_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    let j = journal("vm1");
    store.save(&j).unwrap();
    let path = store.path_for("vm1");
    let good = fs::read(&path).unwrap();

    let mut flipped = good.clone();
    flipped[70] ^= 0x10;
    for bad in [flipped, good[..good.len() - 1].to_vec(), Vec::new()] {
        fs::write(&path, &bad).unwrap();
        let err = store.load("vm1").unwrap_err();
        assert!(err.is_damaged(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("--restart"), "{msg}");
    }
    // --restart: the caller removes or overwrites it; both work.
    store.save(&j).unwrap();
    assert_eq!(store.load("vm1").unwrap(), Some(j));
}

#[test]
fn io_errors_are_not_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    fs::create_dir(store.path_for("vm1")).unwrap(); // a directory where the file should be
    let err = store.load("vm1").unwrap_err();
    assert!(!err.is_damaged(), "{err}");
    assert!(err.to_string().contains("--state-dir"), "{err}");
}

#[test]
fn unencodable_journals_are_not_written() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    let mut j = journal("vm1");
    j.durable.insert(4000, 200); // beyond size_bytes
    assert!(matches!(
        store.save(&j),
        Err(JournalError::Unencodable { .. })
    ));
    let long = "x".repeat(MAX_STRING_BYTES + 1);
    assert!(store.save(&journal(&long)).is_err());
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn save_applies_the_range_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap().with_max_ranges(4);
    let mut j = journal("vm1");
    j.durable = (0..10u64).map(|i| (i * 400, i + 1)).collect();
    store.save(&j).unwrap();
    let loaded = store.load("vm1").unwrap().unwrap();
    let kept: Vec<_> = loaded.durable.iter().collect();
    assert_eq!(kept, vec![(2400, 7), (2800, 8), (3200, 9), (3600, 10)]);
}

#[test]
fn hostile_names_stay_inside_and_are_distinct() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    let very_long = "a".repeat(100_000);
    let longest = "b".repeat(MAX_STRING_BYTES);
    let names = [
        "../x",
        "..",
        ".",
        "",
        "/etc/passwd",
        "a/../../b",
        "nul\0byte",
        "nul\0bytf",
        "vm1",
        "vm1 ",
        "VM1",
        "ünïcødé/☃",
        "a\nb",
        very_long.as_str(),
        &very_long[1..],
        longest.as_str(),
    ];
    let mut files = HashSet::new();
    for name in names {
        let path = store.path_for(name);
        assert_eq!(
            path.parent(),
            Some(tmp.path()),
            "{name:?} → {}",
            path.display()
        );
        let file = path.file_name().unwrap().to_str().unwrap();
        assert!(file.len() < 200, "{file}");
        assert!(
            !file.starts_with('.') && !file.contains(['/', '\0']),
            "{file}"
        );
        assert!(files.insert(file.to_owned()), "{name:?} collides");
        // And it really works as a file name (names the wire accepts).
        if name.len() <= MAX_STRING_BYTES {
            store.save(&journal(name)).unwrap();
            assert_eq!(store.load(name).unwrap().unwrap().target_name, name);
        } else {
            assert!(store.save(&journal(name)).is_err());
        }
    }
    let saved = names.iter().filter(|n| n.len() <= MAX_STRING_BYTES).count();
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), saved);
    assert!(store.path_for("vm1").to_str().unwrap().contains("/vm1-"));
}

#[test]
fn a_journal_copied_to_another_target_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    store.save(&journal("vm1")).unwrap();
    fs::copy(store.path_for("vm1"), store.path_for("vm2")).unwrap();
    let foreign = store.load("vm2").unwrap();
    let request = ResumeRequest {
        target_name: "vm2".into(),
        source_identity: "size=4096;gen=1".into(),
        size_bytes: 4096,
        chunk_size_bytes: 512,
        restart: false,
        mode: crate::wire::PassMode::Full,
        sync_id: [1; 16],
        base_sync_id: None,
        plan_digest: [0; 32],
        plan: RangeSet::new(),
        target_stamp: None,
    };
    let decision = decide(foreign.as_ref(), &request);
    assert!(
        matches!(
            decision,
            Decision::Refuse {
                reason: RefuseReason::TargetMismatch,
                ..
            }
        ),
        "{decision:?}"
    );
}

#[test]
fn checkpointer_time_or_bytes() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let mut c = Checkpointer::starting_at(5 * s, 1000, t0);
    assert!(!c.due(t0 + 60 * s), "nothing new: nothing due");
    c.note_written(10);
    assert!(!c.due(t0 + 4 * s));
    assert_eq!(c.time_left(t0 + 4 * s), s);
    assert!(c.due(t0 + 5 * s));
    c.taken(t0 + 5 * s);
    assert_eq!(c.pending_bytes(), 0);
    assert!(!c.due(t0 + 11 * s));
    c.note_written(999);
    assert!(!c.due(t0 + 6 * s));
    c.note_written(1);
    assert!(
        c.due(t0 + 6 * s),
        "byte threshold reached before the interval"
    );
    c.taken(t0 + 6 * s);
    c.note_written(u64::MAX);
    c.note_written(u64::MAX);
    assert!(c.due(t0 + 6 * s));

    let d = Checkpointer::default();
    assert!(!d.due(Instant::now()));
    let mut d = d;
    d.note_written(CHECKPOINT_BYTES_DEFAULT);
    assert!(d.due(Instant::now()));
    assert_eq!(CHECKPOINT_INTERVAL_DEFAULT, 5 * s);
}

fn uid_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().uid()
}

#[test]
fn open_checked_refuses_a_state_directory_others_could_tamper_with() {
    let tmp = tempfile::tempdir().unwrap();
    let uid = uid_of(tmp.path());
    let ok = tmp.path().join("ok");
    JournalStore::open_checked(&ok, uid).unwrap();
    let mode = fs::metadata(&ok).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "a new state directory is private");

    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&ok, &link).unwrap();
    let e = JournalStore::open_checked(&link, uid).unwrap_err();
    assert!(matches!(e, JournalError::StateDirSymlink { .. }), "{e}");
    assert!(e.to_string().contains("symbolic link"), "{e}");

    let open = tmp.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let e = JournalStore::open_checked(&open, uid).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("chmod 0700 {}", open.display())),
        "{e}"
    );
    fs::set_permissions(&open, fs::Permissions::from_mode(0o770)).unwrap();
    assert!(matches!(
        JournalStore::open_checked(&open, uid),
        Err(JournalError::StateDirWritable { mode: 0o770, .. })
    ));

    let other_uid = uid.wrapping_add(4242);
    let e = JournalStore::open_checked(&ok, other_uid).unwrap_err();
    assert!(matches!(e, JournalError::StateDirOwner { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("chown {other_uid} {}", ok.display())),
        "{e}"
    );
}

#[test]
fn load_refuses_symlinks_and_oversized_files_without_reading_them() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let real = JournalStore::open(&elsewhere).unwrap();
    real.save(&journal("vm1")).unwrap();
    std::os::unix::fs::symlink(real.path_for("vm1"), store.path_for("vm1")).unwrap();
    let e = store.load("vm1").unwrap_err();
    assert!(
        e.is_damaged() && e.to_string().contains("symbolic link"),
        "{e}"
    );

    let big = fs::File::create(store.path_for("vm2")).unwrap();
    big.set_len(MAX_JOURNAL_BYTES as u64 + 1).unwrap();
    let e = store.load("vm2").unwrap_err();
    assert!(
        e.is_damaged() && e.to_string().contains("more than any journal"),
        "{e}"
    );
}

#[test]
fn saves_use_fresh_temporary_names_and_leave_none_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let store = JournalStore::open(tmp.path()).unwrap();
    let path = store.path_for("vm1");
    let a = store::tmp_path(&path);
    let b = store::tmp_path(&path);
    assert_ne!(a, b);
    // A leftover of a crashed save is never opened by a later save.
    fs::write(&a, b"left over").unwrap();
    for _ in 0..3 {
        store.save(&journal("vm1")).unwrap();
    }
    assert_eq!(fs::read(&a).unwrap(), b"left over");
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // The next open removes the leftover.
    JournalStore::open(tmp.path()).unwrap();
    assert!(!a.exists());
}
