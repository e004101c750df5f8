//! qemu-nbd children and qemu-img helpers against the real tools, plus
//! parse_spec on real files.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use diskferry::endpoint::qemu::{QemuNbdChild, create_image, image_virtual_size};
use diskferry::endpoint::{EndpointError, ImageFormat, Role, Spec, display, parse_spec};
use diskferry::nbd::uri::Transport;

const MIB: u64 = 1 << 20;

fn qemu_io(path: &Path, format: &str, command: &str) {
    let status = Command::new("qemu-io")
        .args(["-f", format, "-c", command])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "qemu-io {command} failed");
}

/// The format qemu-img detects in `path` (the test checks what was
/// created; diskferry itself never asks).
fn detected_format(path: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img info {}", path.display());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["format"].as_str().unwrap().to_string()
}

fn process_exists(pid: u32) -> bool {
    // A reaped child has no /proc entry (a zombie would still have one).
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A 64 MiB qcow2 with 64 KiB of 0xab at 1 MiB.
fn pattern_qcow2(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.qcow2");
    create_image(&path, "qcow2", 64 * MIB).unwrap();
    qemu_io(&path, "qcow2", "write -P 0xab 1M 64k");
    path
}

/// Connect, read the 8-byte greeting the server sends first.
fn greeting(child: &QemuNbdChild) -> [u8; 8] {
    let mut stream = child.uri().connect().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).unwrap();
    magic
}

#[test]
fn qemu_nbd_serves_qcow2_and_is_gone_after_drop() {
    let dir = tempfile::tempdir().unwrap();
    let image = pattern_qcow2(dir.path());
    assert_eq!(image_virtual_size(&image, "qcow2").unwrap(), 64 * MIB);
    assert_eq!(detected_format(&image), "qcow2");

    let child = QemuNbdChild::start(&image, "qcow2", true, 4).unwrap();
    let pid = child.pid();
    let private_dir = child.dir().to_path_buf();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&private_dir).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700, "socket dir must be private");
    let uri = child.uri();
    assert_eq!(
        uri.transport,
        Transport::Unix {
            path: child.socket_path().to_path_buf()
        }
    );
    assert!(uri.to_string().starts_with("nbd+unix:///?socket="), "{uri}");

    // Several connections can come and go (-t).
    assert_eq!(&greeting(&child), b"NBDMAGIC");
    assert_eq!(&greeting(&child), b"NBDMAGIC");
    assert!(process_exists(pid));

    drop(child);
    assert!(
        !process_exists(pid),
        "qemu-nbd {pid} must be gone after drop"
    );
    assert!(
        !private_dir.exists(),
        "temp dir {} must be removed",
        private_dir.display()
    );
}

#[test]
fn writable_target_child_starts() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("target.vmdk");
    create_image(&image, "vmdk", 8 * MIB).unwrap();
    assert_eq!(detected_format(&image), "vmdk");
    let child = QemuNbdChild::start(&image, "vmdk", false, 1).unwrap();
    assert_eq!(&greeting(&child), b"NBDMAGIC");
    // Refuses to overwrite an existing image.
    let err = create_image(&image, "vmdk", MIB).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn start_failure_reports_qemu_nbd_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let not_qcow2 = dir.path().join("plain.img");
    std::fs::write(&not_qcow2, vec![0u8; 4096]).unwrap();
    let started = Instant::now();
    let err = QemuNbdChild::start(&not_qcow2, "qcow2", true, 1).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, EndpointError::QemuNbd { .. }), "{err:?}");
    assert!(
        message.contains("plain.img") && message.contains("exited"),
        "{message}"
    );
    assert!(
        message.to_lowercase().contains("qcow"),
        "stderr of qemu-nbd should be quoted: {message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "must fail fast, not wait for the timeout"
    );

    let err = QemuNbdChild::start(&not_qcow2, "raw", true, 0).unwrap_err();
    assert!(err.to_string().contains("connections"), "{err}");
    let err = QemuNbdChild::start(&not_qcow2, "raw; rm", true, 1).unwrap_err();
    assert!(err.to_string().contains("format"), "{err}");
}

#[test]
fn qemu_nbd_dies_with_its_parent() {
    // A killed diskferry is stood in for by a thread that starts the child,
    // hands the handle out (so no Drop runs in it) and exits:
    // PR_SET_PDEATHSIG fires when the spawning thread dies, so the kernel
    // must SIGTERM qemu-nbd even though nobody stopped it.
    let dir = tempfile::tempdir().unwrap();
    let image = pattern_qcow2(dir.path());
    let child = std::thread::spawn(move || QemuNbdChild::start(&image, "qcow2", true, 1).unwrap())
        .join()
        .unwrap();
    let pid = child.pid();
    // The child is not reaped until `child` drops, so wait for the zombie
    // state in /proc/PID/stat.
    let gone = exits_within(pid, Duration::from_secs(5));
    drop(child); // reaps (or stops) it and removes the temp dir
    assert!(
        gone,
        "qemu-nbd {pid} must die when the thread that started it exits"
    );
    assert!(!process_exists(pid));
}

/// Whether `pid` exits (becomes a zombie: it is not reaped until its
/// handle drops) within `limit`.
fn exits_within(pid: u32, limit: Duration) -> bool {
    let exited = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    };
    let deadline = Instant::now() + limit;
    while !exited() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    exited()
}

/// qemu-nbd listens before it enters its main loop, and a SIGTERM that
/// comes in between is lost. `start` returns only after the server has
/// greeted a client, so the SIGTERM that the parent-death signal sends when
/// diskferry dies right after starting it still stops it. (The window is a
/// few milliseconds, so a readiness check that only connected, polling every
/// 20 ms, fell into it only now and then: `qemu_nbd_dies_with_its_parent`
/// failed once in a CI run under load. A script polling every 0.5 ms and
/// sending SIGTERM at once left 60 of 60 qemu-nbd processes running.)
#[test]
fn a_sigterm_right_after_start_stops_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let image = pattern_qcow2(dir.path());
    for _ in 0..5 {
        let child = QemuNbdChild::start(&image, "qcow2", true, 1).unwrap();
        let pid = child.pid();
        // SAFETY: kill(2) on the pid of a child we have not reaped.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
        let gone = exits_within(pid, Duration::from_secs(5));
        drop(child);
        assert!(
            gone,
            "qemu-nbd {pid} outlived a SIGTERM sent right after start"
        );
    }
}

#[test]
fn parse_spec_on_real_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let qcow2 = pattern_qcow2(dir.path());
    let raw = dir.path().join("disk.img");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    // A qcow2 image whose name says nothing: raw unless the format is named.
    let hidden = dir.path().join("hidden.img");
    std::fs::copy(&qcow2, &hidden).unwrap();
    let hidden_arg = hidden.to_str().unwrap();

    let spec = parse_spec(qcow2.to_str().unwrap(), Role::Source, None).unwrap();
    assert_eq!(
        spec,
        Spec::Image {
            path: qcow2.clone(),
            format: "qcow2".into()
        }
    );
    assert!(
        display(&spec).ends_with("disk.qcow2 (qcow2)"),
        "{}",
        display(&spec)
    );
    // An existing target goes by its extension too.
    assert!(matches!(
        parse_spec(qcow2.to_str().unwrap(), Role::Target, None).unwrap(),
        Spec::Image { .. }
    ));
    assert_eq!(
        parse_spec(raw.to_str().unwrap(), Role::Source, None).unwrap(),
        Spec::Raw(raw.clone())
    );
    for role in [Role::Source, Role::Target] {
        assert_eq!(
            parse_spec(hidden_arg, role, None).unwrap(),
            Spec::Raw(hidden.clone()),
            "the file's qcow2 header must not choose its format"
        );
        assert_eq!(
            parse_spec(hidden_arg, role, Some(ImageFormat::Qcow2)).unwrap(),
            Spec::Image {
                path: hidden.clone(),
                format: "qcow2".into()
            }
        );
    }
    // A named format wins over the extension.
    assert_eq!(
        parse_spec(
            qcow2.to_str().unwrap(),
            Role::Source,
            Some(ImageFormat::Raw)
        )
        .unwrap(),
        Spec::Raw(qcow2.clone())
    );
    let err = parse_spec(
        "nbd+unix:///exp?socket=/tmp/x.sock",
        Role::Source,
        Some(ImageFormat::Qcow2),
    )
    .unwrap_err();
    assert!(matches!(err, EndpointError::FormatForUri { .. }), "{err:?}");

    let missing = dir.path().join("missing.img");
    let err = parse_spec(missing.to_str().unwrap(), Role::Source, None).unwrap_err();
    assert!(matches!(err, EndpointError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.img"), "{err}");
    assert_eq!(
        parse_spec(missing.to_str().unwrap(), Role::Target, None).unwrap(),
        Spec::Raw(missing)
    );
    for (name, format) in [
        ("new.qcow2", "qcow2"),
        ("new.VHD", "vpc"),
        ("new.vhdx", "vhdx"),
        ("x.qed", "qed"),
    ] {
        let path = dir.path().join(name);
        let spec = parse_spec(path.to_str().unwrap(), Role::Target, None).unwrap();
        assert_eq!(
            spec,
            Spec::Image {
                path,
                format: format.into()
            }
        );
    }

    let spec = parse_spec("nbd+unix:///exp?socket=/tmp/x.sock", Role::Source, None).unwrap();
    assert!(
        matches!(&spec, Spec::Nbd(uri) if uri.export == "exp"),
        "{spec:?}"
    );
    assert_eq!(display(&spec), "nbd+unix:///exp?socket=/tmp/x.sock");
    let err = parse_spec("nbd+unix:///exp", Role::Source, None).unwrap_err();
    assert!(err.to_string().contains("socket"), "{err}");
    let err = parse_spec("http://host/disk", Role::Source, None).unwrap_err();
    assert!(matches!(err, EndpointError::BadUri { .. }), "{err:?}");
    let err = parse_spec(dir.path().to_str().unwrap(), Role::Source, None).unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");
}
