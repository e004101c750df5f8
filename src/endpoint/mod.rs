//! What a SRC or DST argument means, and opening it.
//!
//! * an NBD URI (`nbd://`, `nbd+unix://`) — used directly;
//! * a raw regular file or a block device — opened directly (io_uring /
//!   pread on the fd);
//! * an image in another format (qcow2, vmdk, vhdx, vdi, vpc, …) — served by
//!   a qemu-nbd child process ([`qemu::QemuNbdChild`]) on a private Unix
//!   socket, then used as an NBD URI.

use std::path::{Path, PathBuf};

pub mod file;
pub mod qemu;

use crate::nbd::uri::{self, NbdUri};

/// Errors opening or preparing an endpoint. Each message names the path or
/// URI and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad NBD URI {uri:?}: {why}")]
    BadUri { uri: String, why: String },
    #[error("{0}")]
    Nbd(#[from] crate::nbd::NbdError),
    #[error("qemu-nbd for {path}: {why}")]
    QemuNbd { path: String, why: String },
    #[error(
        "target {target} is {target_bytes} bytes, smaller than the source ({source_bytes} bytes); refusing to write anything"
    )]
    TargetTooSmall {
        target: String,
        target_bytes: u64,
        source_bytes: u64,
    },
    /// qemu-img failed or could not be run.
    #[error("qemu-img for {path}: {why}")]
    QemuImg { path: String, why: String },
    /// The path exists but is neither a regular file nor a block device.
    #[error("{path} is {what}; give a regular file, a block device or an NBD URI")]
    NotAFileOrDevice { path: String, what: &'static str },
    #[error("{0}")]
    Other(String),
}

/// What kind of thing a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Regular,
    BlockDevice,
}

/// A parsed SRC/DST argument, before anything is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Nbd(NbdUri),
    /// A raw file or block device (a path that does not exist yet, as a
    /// target, is a raw file unless its extension names a format).
    Raw(PathBuf),
    /// An image in a non-raw format, to be served by qemu-nbd.
    Image {
        path: PathBuf,
        format: String,
    },
}

/// Which side of a copy an argument is for: a source must exist, a target may
/// be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

/// The image format an extension names, for targets that do not exist yet
/// (`.qcow2` → `qcow2`, `.vhd`/`.vpc` → `vpc`, …); `None` means raw.
pub fn format_from_extension(path: &Path) -> Option<&'static str> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match extension.as_str() {
        "qcow2" => "qcow2",
        "vmdk" => "vmdk",
        "vhdx" => "vhdx",
        "vdi" => "vdi",
        "vhd" | "vpc" => "vpc",
        "qed" => "qed",
        _ => return None,
    })
}

/// What a SRC / DST argument means, without opening anything for I/O.
///
/// * NBD URIs ([`uri::is_nbd_uri`]) → [`Spec::Nbd`] (bad URIs → `BadUri`);
/// * other `SCHEME://` strings → `BadUri` (unsupported scheme);
/// * an existing block device → [`Spec::Raw`];
/// * an existing regular file → its format as probed by
///   `qemu-img info -U`: `raw` → [`Spec::Raw`], anything else →
///   [`Spec::Image`];
/// * a missing path: as a source, an `Io` error naming it; as a target,
///   [`Spec::Image`] when the extension names a format
///   ([`format_from_extension`]), else [`Spec::Raw`].
pub fn parse_spec(arg: &str, role: Role) -> Result<Spec, EndpointError> {
    if arg.is_empty() {
        return Err(EndpointError::Other(
            "empty path; give a file, a block device or an NBD URI".into(),
        ));
    }
    if uri::is_nbd_uri(arg) {
        let parsed = uri::parse(arg).map_err(|why| EndpointError::BadUri {
            uri: arg.into(),
            why,
        })?;
        return Ok(Spec::Nbd(parsed));
    }
    if let Some((scheme, _)) = arg.split_once("://")
        && !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Err(EndpointError::BadUri {
            uri: arg.into(),
            why: format!(
                "scheme {scheme:?} is not supported; use nbd://, nbd+unix:// or a path (write ./{arg} for a file)"
            ),
        });
    }
    let path = PathBuf::from(arg);
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && role == Role::Target => {
            return Ok(match format_from_extension(&path) {
                Some(format) => Spec::Image {
                    path,
                    format: format.into(),
                },
                None => Spec::Raw(path),
            });
        }
        Err(source) => {
            let what = if role == Role::Source {
                "source"
            } else {
                "target"
            };
            return Err(EndpointError::Io {
                path: format!("{arg} ({what})"),
                source,
            });
        }
    };
    let file_type = meta.file_type();
    if std::os::unix::fs::FileTypeExt::is_block_device(&file_type) {
        return Ok(Spec::Raw(path));
    }
    if !file_type.is_file() {
        return Err(EndpointError::NotAFileOrDevice {
            path: arg.into(),
            what: file::describe_file_type(file_type),
        });
    }
    let format = qemu::probe_format(&path)?;
    Ok(if format == "raw" {
        Spec::Raw(path)
    } else {
        Spec::Image { path, format }
    })
}

/// A short human description of a spec for logs and progress lines.
pub fn display(spec: &Spec) -> String {
    match spec {
        Spec::Nbd(uri) => uri.to_string(),
        Spec::Raw(path) => path.display().to_string(),
        Spec::Image { path, format } => format!("{} ({format})", path.display()),
    }
}
