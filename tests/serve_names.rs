//! Target names that would lead outside the target root are refused with
//! TARGET_NOT_ALLOWED and create nothing; `--allow NAME=PATH` maps a name to
//! a path outside the root.

mod serve_support;

use diskferry::wire::{ByteRange, Codec, ErrorCode, Frame};
use serve_support::*;

const MIB: u64 = 1 << 20;

fn list(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn names_leading_outside_the_root_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim"), b"keep me").unwrap();
    let h = Harness::start(true);
    std::fs::create_dir(h.root.join("a")).unwrap();
    std::os::unix::fs::symlink(outside.path(), h.root.join("dirlink")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("victim"), h.root.join("filelink")).unwrap();
    let root_before = list(&h.root);

    let long = "x".repeat(256);
    let names = [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "a/./x",
        "dirlink/x",
        "dirlink/victim",
        "filelink",
        "",
        "a//x",
        "a/",
        "nul\0x",
        "missing/x",
        "a",
        long.as_str(),
    ];
    for (i, name) in names.iter().enumerate() {
        let mut c = h.connect();
        match c.hello(&hello(i as u8 + 1, name, MIB, 0, 1)) {
            Frame::Error(e) => {
                assert_eq!(
                    e.code,
                    ErrorCode::TargetNotAllowed,
                    "{name:?}: {}",
                    e.message
                );
                assert!(!e.message.is_empty());
            }
            other => panic!("{name:?} was accepted: {other:?}"),
        }
        assert!(c.recv().is_none(), "{name:?}: the receiver must close");
    }
    assert_eq!(list(outside.path()), vec!["victim".to_string()]);
    assert_eq!(
        std::fs::read(outside.path().join("victim")).unwrap(),
        b"keep me"
    );
    assert_eq!(
        list(&h.root),
        root_before,
        "something was created in the root"
    );
    assert!(list(&h.root.join("a")).is_empty());
}

#[test]
fn allow_list_maps_a_name_outside_the_root() {
    let elsewhere = tempfile::tempdir().unwrap();
    let path = elsewhere.path().join("disk.raw");
    let path_for_opts = path.clone();
    let h = Harness::start_with(true, move |o| {
        o.allow.push(("disk0".into(), path_for_opts));
    });
    let mut c = h.connect();
    c.welcome(&hello(1, "disk0", MIB, 0, 1));
    let raw = random_bytes(64 * 1024, 1);
    c.data(4096, &raw, Codec::None);
    // Every byte must be covered before DONE completes the job.
    c.send(&Frame::Zero(ByteRange {
        offset: 0,
        len_bytes: 4096,
    }));
    let end = 4096 + raw.len() as u64;
    c.send(&Frame::Zero(ByteRange {
        offset: end,
        len_bytes: MIB - end,
    }));
    c.barrier(1);
    c.done();
    let written = std::fs::read(&path).unwrap();
    assert_eq!(written.len() as u64, MIB);
    assert_eq!(&written[4096..4096 + raw.len()], &raw[..]);
    assert!(written[..4096].iter().all(|&b| b == 0));
    assert!(!h.root.join("disk0").exists());
}
