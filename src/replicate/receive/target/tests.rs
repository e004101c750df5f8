//! Opening targets (naming rules, confinement, modes, links, keys) and
//! zeroing ranges.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::*;

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    targets: Targets,
}

fn setup(allow: Vec<(String, PathBuf)>, mode: u32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let root = base.join("root");
    let outside = base.join("outside");
    let state = root.join(".state");
    for d in [&root, &outside, &state] {
        std::fs::create_dir(d).unwrap();
    }
    let allow = allow
        .into_iter()
        .map(|(n, p)| (n, outside.join(p)))
        .collect();
    let targets = Targets::new(root.clone(), allow, mode, state).unwrap();
    Setup {
        _dir: dir,
        root,
        outside,
        targets,
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn zero_range_on_a_used_target_reads_back_zeros() {
    let s = setup(Vec::new(), TARGET_MODE_DEFAULT);
    let opened = s.targets.open("t.img").unwrap();
    let mut target = TargetFile::fresh(opened, 4 << 20).unwrap();
    target.fresh_zero = false; // as a block device or a resumed file
    target.write_at(&[0xAB; 3 << 20], 0).unwrap();
    target.zero_range(4096, (2 << 20) + 4096).unwrap();
    target.write_zeros((3 << 20) - 10, 10).unwrap();
    let path = s.root.join("t.img");
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0xAB));
    assert!(bytes[4096..(2 << 20) + 8192].iter().all(|&b| b == 0));
    assert!(
        bytes[(2 << 20) + 8192..(3 << 20) - 10]
            .iter()
            .all(|&b| b == 0xAB)
    );
    assert!(bytes[(3 << 20) - 10..].iter().all(|&b| b == 0));
    let allocated = crate::endpoint::file::allocated_bytes(&path);
    assert!(
        allocated < 2 << 20,
        "no hole was punched: {allocated} bytes allocated"
    );
}

#[test]
fn names_stay_inside_the_root_and_errors_name_no_path() {
    let s = setup(vec![("dev".into(), "dev.img".into())], TARGET_MODE_DEFAULT);
    std::fs::create_dir(s.root.join("vm")).unwrap();
    std::os::unix::fs::symlink(&s.outside, s.root.join("link")).unwrap();
    std::os::unix::fs::symlink(s.outside.join("f"), s.root.join("vm/flink")).unwrap();
    let ok = s.targets.open("vm/disk.img").unwrap();
    assert!(ok.created && ok.kind == FileKind::Regular);
    assert_eq!(ok.path, s.root.join("vm/disk.img"));
    for bad in [
        "",
        "/abs",
        "../x",
        "vm/../x",
        "vm/./x",
        "vm//x",
        "x\0y",
        "nodir/x",
        "link/x",
        "vm/flink",
        "vm",
        ".state/x.journal",
    ] {
        let e = s.targets.open(bad).unwrap_err();
        let msg = e.to_string();
        let root = s.root.display().to_string();
        assert!(!msg.contains(&root), "{bad:?}: {msg}");
    }
    assert_eq!(std::fs::read_dir(&s.outside).unwrap().count(), 0);
    let listed = s.targets.open("dev").unwrap();
    assert!(listed.created && listed.path == s.outside.join("dev.img"));
}

#[test]
fn new_files_get_the_mode_and_existing_ones_are_not_truncated() {
    let s = setup(vec![("a".into(), "a.img".into())], 0o640);
    let root_file = s.targets.open("r.img").unwrap();
    assert!(root_file.created);
    assert_eq!(mode_of(&s.root.join("r.img")), 0o640);
    let allowed = s.targets.open("a").unwrap();
    assert!(allowed.created);
    assert_eq!(mode_of(&s.outside.join("a.img")), 0o640);
    drop((root_file, allowed));

    std::fs::write(s.root.join("r.img"), b"keep").unwrap();
    std::fs::write(s.outside.join("a.img"), b"keep").unwrap();
    for (name, path) in [
        ("r.img", s.root.join("r.img")),
        ("a", s.outside.join("a.img")),
    ] {
        let opened = s.targets.open(name).unwrap();
        assert!(!opened.created && opened.len_bytes == 4, "{name}");
        let target = TargetFile::existing(opened, 4).unwrap();
        assert_eq!(target.kind(), FileKind::Regular);
        assert_eq!(std::fs::read(&path).unwrap(), b"keep", "{name}");
        let opened = s.targets.open(name).unwrap();
        assert!(matches!(
            TargetFile::existing(opened, 8),
            Err(TargetError::WrongSize { len_bytes: 4, .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep", "{name}");
    }
}

#[test]
fn hard_links_are_refused_and_two_names_of_one_file_share_a_key() {
    let s = setup(
        vec![("alias".into(), "real.img".into())],
        TARGET_MODE_DEFAULT,
    );
    std::fs::write(s.root.join("one.img"), b"x").unwrap();
    std::fs::hard_link(s.root.join("one.img"), s.root.join("two.img")).unwrap();
    for name in ["one.img", "two.img"] {
        let e = s.targets.open(name).unwrap_err();
        assert!(matches!(e, TargetError::HardLinked { links: 2, .. }), "{e}");
    }
    // A symlink in the root to the allow-listed file: refused (last
    // component a symlink); the allow-list name and a bind of the same
    // inode give one key.
    let a = s.targets.open("alias").unwrap();
    let again = s.targets.open("alias").unwrap();
    assert_eq!(a.key, again.key);
    let other = s.targets.open("other.img").unwrap();
    assert_ne!(a.key, other.key);
}
