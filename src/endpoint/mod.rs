//! What a SRC or DST argument means, and opening it ([`open`]: sources
//! with their NBD connections, targets sized and ready).
//!
//! * an NBD URI (`nbd://`, `nbd+unix://`) — used directly;
//! * a raw regular file or a block device — opened directly (io_uring /
//!   pread on the fd);
//! * an image in another format (qcow2, vmdk, vhdx, vdi, vpc, …) — served by
//!   a qemu-nbd child process ([`qemu::QemuNbdChild`]) on a private Unix
//!   socket, then used as an NBD URI.
//!
//! Content never chooses how a file is opened. A file's format is what the
//! user names ([`ImageFormat`]) or what its extension says
//! ([`format_from_extension`]); anything else is raw. Its bytes are never
//! probed: a guest can write any header into its disk, and a raw disk read
//! as the qcow2 image its guest wrote would make qemu open a backing file
//! of the guest's choosing on this host (the image-format probing hole).
#![forbid(unsafe_code)]
#![warn(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]
#![warn(missing_docs)]

use std::path::{Path, PathBuf};

pub mod file;
pub mod open;
pub mod qemu;

use crate::nbd::uri::{self, NbdUri};

/// Errors opening or preparing an endpoint. Each message names the path or
/// URI and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A system call on the path failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// An NBD URI that does not parse.
    #[error("bad NBD URI {uri:?}: {why}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        why: String,
    },
    /// Talking to the NBD server failed.
    #[error("{0}")]
    Nbd(#[from] crate::nbd::NbdError),
    /// qemu-nbd failed or could not be run.
    #[error("qemu-nbd for {path}: {why}")]
    QemuNbd {
        /// The image.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The target is smaller than the source.
    #[error(
        "target {target} is {target_bytes} bytes, smaller than the source ({source_bytes} bytes); refusing to write anything"
    )]
    TargetTooSmall {
        /// The target as given.
        target: String,
        /// The target's size.
        target_bytes: u64,
        /// The source's size.
        source_bytes: u64,
    },
    /// qemu-img failed or could not be run.
    #[error("qemu-img for {path}: {why}")]
    QemuImg {
        /// The image.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The path exists but is neither a regular file nor a block device.
    #[error("{path} is {what}; give a regular file, a block device or an NBD URI")]
    NotAFileOrDevice {
        /// The path.
        path: String,
        /// What it is instead ("a directory", …).
        what: &'static str,
    },
    /// A format was named for an NBD URI, which has none.
    #[error("{uri}: an NBD export has no image format; name a format for files only")]
    FormatForUri {
        /// The URI.
        uri: String,
    },
    /// Anything else, said in full.
    #[error("{0}")]
    Other(String),
}

/// The image formats a user may name for a file. qemu-nbd and qemu-img are
/// always told this format (`-f`), so they never guess it from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageFormat {
    /// Raw bytes.
    Raw,
    /// QEMU copy-on-write v2.
    Qcow2,
    /// VMware.
    Vmdk,
    /// Hyper-V.
    Vhdx,
    /// VirtualBox.
    Vdi,
    /// VHD (Virtual PC).
    Vpc,
    /// QEMU enhanced disk.
    Qed,
}

impl ImageFormat {
    /// qemu's name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vpc => "vpc",
            ImageFormat::Qed => "qed",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of thing a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A block device.
    BlockDevice,
}

/// A parsed SRC/DST argument, before anything is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// An NBD URI.
    Nbd(NbdUri),
    /// A raw file or block device (a path that does not exist yet, as a
    /// target, is a raw file unless its extension names a format).
    Raw(PathBuf),
    /// An image in a non-raw format, to be served by qemu-nbd.
    Image {
        /// The image file.
        path: PathBuf,
        /// Its format, as qemu names it.
        format: String,
    },
}

/// Which side of a copy an argument is for: a source must exist, a target may
/// be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read from; must exist.
    Source,
    /// Written to; may be created.
    Target,
}

/// The image format an extension names (`.qcow2` → qcow2, `.vhd`/`.vpc` →
/// vpc, …); `None` means raw.
pub fn format_from_extension(path: &Path) -> Option<ImageFormat> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match extension.as_str() {
        "qcow2" => ImageFormat::Qcow2,
        "vmdk" => ImageFormat::Vmdk,
        "vhdx" => ImageFormat::Vhdx,
        "vdi" => ImageFormat::Vdi,
        "vhd" | "vpc" => ImageFormat::Vpc,
        "qed" => ImageFormat::Qed,
        _ => return None,
    })
}

/// A file's format: the one named, else the one its extension names, else
/// raw. Never read from the file.
fn file_spec(path: PathBuf, named: Option<ImageFormat>) -> Spec {
    match named.or_else(|| format_from_extension(&path)) {
        None | Some(ImageFormat::Raw) => Spec::Raw(path),
        Some(format) => Spec::Image {
            path,
            format: format.as_str().into(),
        },
    }
}

/// What a SRC / DST argument means, without opening anything for I/O.
///
/// * NBD URIs ([`uri::is_nbd_uri`]) → [`Spec::Nbd`] (bad URIs → `BadUri`);
/// * other `SCHEME://` strings → `BadUri` (unsupported scheme);
/// * a block device → [`Spec::Raw`], or [`Spec::Image`] when `format`
///   names another format;
/// * a regular file, existing or (as a target) not: `format` if given,
///   else the format its extension names ([`format_from_extension`]), else
///   raw. The file's contents are never looked at;
/// * a missing source: an `Io` error naming it.
///
/// `format` with an NBD URI is refused ([`EndpointError::FormatForUri`]).
pub fn parse_spec(
    arg: &str,
    role: Role,
    format: Option<ImageFormat>,
) -> Result<Spec, EndpointError> {
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
        if format.is_some() {
            return Err(EndpointError::FormatForUri { uri: arg.into() });
        }
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
            return Ok(file_spec(path, format));
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
        // A device has no extension to go by: raw unless named.
        return Ok(match format {
            None | Some(ImageFormat::Raw) => Spec::Raw(path),
            Some(f) => Spec::Image {
                path,
                format: f.as_str().into(),
            },
        });
    }
    if !file_type.is_file() {
        return Err(EndpointError::NotAFileOrDevice {
            path: arg.into(),
            what: file::describe_file_type(file_type),
        });
    }
    Ok(file_spec(path, format))
}

/// A short human description of a spec for logs and progress lines.
pub fn display(spec: &Spec) -> String {
    match spec {
        Spec::Nbd(uri) => uri.to_string(),
        Spec::Raw(path) => path.display().to_string(),
        Spec::Image { path, format } => format!("{} ({format})", path.display()),
    }
}
