//! Raw files: opening sources and targets, SEEK_DATA extents on real sparse
//! files in a temp dir.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;

use diskferry::endpoint::file::{RawFile, allocated_bytes, data_extents};
use diskferry::endpoint::{EndpointError, FileKind};

const MIB: u64 = 1 << 20;

/// Write `len` bytes of `byte` at `offset`.
fn write_at(file: &File, offset: u64, len: u64, byte: u8) {
    file.write_all_at(&vec![byte; usize::try_from(len).unwrap()], offset)
        .unwrap();
}

#[test]
fn extents_of_sparse_file_match_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(8 * MIB).unwrap();
    // data: [1, 2) MiB and [4, 6) MiB; everything else holes.
    write_at(&file, MIB, MIB, 0xab);
    write_at(&file, 4 * MIB, 2 * MIB, 0xcd);
    file.sync_all().unwrap();

    let mut extents = vec![(99, 99)];
    data_extents(&file, 0, 8 * MIB, &mut extents).unwrap();
    assert_eq!(extents, vec![(MIB, MIB), (4 * MIB, 2 * MIB)]);

    // A window cutting through both data ranges is clipped to the window.
    data_extents(&file, MIB + 4096, 4 * MIB, &mut extents).unwrap();
    assert_eq!(
        extents,
        vec![(MIB + 4096, MIB - 4096), (4 * MIB, MIB + 4096)]
    );

    // A window entirely inside a hole, and one past the end of the file.
    data_extents(&file, 2 * MIB, 2 * MIB, &mut extents).unwrap();
    assert!(extents.is_empty(), "{extents:?}");
    data_extents(&file, 8 * MIB, 4 * MIB, &mut extents).unwrap();
    assert!(extents.is_empty(), "{extents:?}");

    // Overflowing ranges are refused, not wrapped.
    assert!(data_extents(&file, u64::MAX, 2, &mut extents).is_err());
    assert!(allocated_bytes(&path) >= 3 * MIB);
    assert!(allocated_bytes(&path) < 8 * MIB, "file should be sparse");
}

#[test]
fn size_not_multiple_of_4096() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    let size_bytes = 3 * MIB + 1234;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.set_len(size_bytes).unwrap();
    write_at(&file, 3 * MIB, 1234, 0x5a); // data in the short last block
    drop(file);

    let source = RawFile::open_source(&path).unwrap();
    assert_eq!(source.size_bytes, size_bytes);
    assert_eq!(source.kind, FileKind::Regular);
    let mut extents = Vec::new();
    data_extents(&source.file, 0, size_bytes, &mut extents).unwrap();
    assert_eq!(extents.len(), 1, "{extents:?}");
    let (offset, length) = extents[0];
    assert!(
        offset <= 3 * MIB && offset + length == size_bytes,
        "{extents:?}"
    );
    assert!(length <= MIB, "only the tail is data: {extents:?}");
}

#[test]
fn source_is_read_only_and_missing_source_names_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.img");
    std::fs::write(&path, b"hello").unwrap();
    let source = RawFile::open_source(&path).unwrap();
    assert_eq!(source.size_bytes, 5);
    assert!(
        source.file.write_all_at(b"x", 0).is_err(),
        "source must be opened read-only"
    );

    let missing = dir.path().join("nope.img");
    let err = RawFile::open_source(&missing).unwrap_err();
    assert!(matches!(err, EndpointError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.img"), "{err}");

    let err = RawFile::open_source(dir.path()).unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");
}

#[test]
fn target_open_truncates_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dst.img");
    std::fs::write(&path, vec![0xffu8; 2 * MIB as usize]).unwrap();
    assert!(allocated_bytes(&path) >= 2 * MIB);

    let size_bytes = 16 * MIB + 512;
    let (target, fresh_zero) = RawFile::open_target(&path, size_bytes).unwrap();
    assert!(fresh_zero);
    assert_eq!(target.kind, FileKind::Regular);
    assert_eq!(target.size_bytes, size_bytes);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size_bytes);
    assert_eq!(
        allocated_bytes(&path),
        0,
        "old content must be gone, file fully sparse"
    );
    let mut head = vec![0u8; 4096];
    File::open(&path).unwrap().read_exact(&mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0), "target must read as zeros");
    let mut extents = Vec::new();
    data_extents(&target.file, 0, size_bytes, &mut extents).unwrap();
    assert!(extents.is_empty(), "{extents:?}");
    // Writable.
    target.file.write_all_at(b"ok", 0).unwrap();

    // A missing target is created.
    let fresh = dir.path().join("new.img");
    let (created, fresh_zero) = RawFile::open_target(&fresh, MIB).unwrap();
    assert!(fresh_zero);
    assert_eq!(created.file.metadata().unwrap().len(), MIB);

    // A directory is refused with a message naming it.
    let err = RawFile::open_target(dir.path(), MIB).unwrap_err();
    assert!(
        matches!(err, EndpointError::NotAFileOrDevice { .. }),
        "{err:?}"
    );
}

/// A loop device backed by a temp file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    /// `losetup -f --show FILE`; `None` where loop devices cannot be attached.
    fn attach(backing: &std::path::Path) -> Option<LoopDevice> {
        let output = std::process::Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(backing)
            .output()
            .ok()?;
        let device = String::from_utf8(output.stdout).ok()?.trim().to_string();
        (output.status.success() && device.starts_with("/dev/")).then_some(LoopDevice(device))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn block_device_source_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("loop.img");
    let device_bytes = 4 * MIB;
    let file = File::create(&backing).unwrap();
    file.set_len(device_bytes).unwrap();
    write_at(&file, 0, 4096, 0x11);
    drop(file);
    // Needs root and /dev/loop-control: a missing privilege fails the test.
    let device = LoopDevice::attach(&backing)
        .expect("cannot attach a loop device (the tests need root and /dev/loop-control)");
    let path = std::path::Path::new(&device.0);

    let source = RawFile::open_source(path).unwrap();
    assert_eq!(source.kind, FileKind::BlockDevice);
    assert_eq!(source.size_bytes, device_bytes);
    let mut extents = Vec::new();
    data_extents(&source.file, MIB, 2 * MIB, &mut extents).unwrap();
    assert_eq!(
        extents,
        vec![(MIB, 2 * MIB)],
        "block devices report the whole range as data"
    );

    let err = RawFile::open_target(path, device_bytes + 512).unwrap_err();
    assert!(
        matches!(err, EndpointError::TargetTooSmall { target_bytes, .. } if target_bytes == device_bytes),
        "{err:?}"
    );
    let (target, fresh_zero) = RawFile::open_target(path, MIB).unwrap();
    assert!(!fresh_zero, "a block device keeps its old content");
    assert_eq!(target.size_bytes, device_bytes);
    let mut head = [0u8; 4];
    target.file.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, [0x11; 4], "opening a device target must not clear it");
}
