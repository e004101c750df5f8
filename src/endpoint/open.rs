//! Opening SRC and DST: files directly, NBD URIs with several connections,
//! other image formats through a qemu-nbd child.

#![forbid(unsafe_code)]
use std::fs::File;
use std::time::Duration;

use super::file::RawFile;
use super::qemu::{self, QemuNbdChild};
use super::{EndpointError, FileKind, ImageFormat, Role, Spec, parse_spec};
use crate::nbd::blocking::Client;
use crate::nbd::handshake::{ExportInfo, negotiate};
use crate::nbd::uri::{NbdStream, NbdUri};
use crate::pipeline::CopyError;
use crate::plan::PassPlan;
use crate::plan::dirty::{self, DirtyMapError};
use crate::plan::maps::{self, BASE_ALLOCATION, ExtentList};
use crate::plan::windows::{AllData, ExtentMap};

/// One negotiated NBD connection.
pub type NbdConnection = (NbdStream, ExportInfo);

/// How the data of an endpoint is reached.
pub enum Access {
    /// `direct`: the same file opened with O_DIRECT, when the file system
    /// allows it (targets only): aligned writes go there, skipping the page
    /// cache and its writeback stalls.
    File {
        /// The file or block device.
        file: File,
        /// Which of the two.
        kind: FileKind,
        /// The same file opened with O_DIRECT, where used.
        direct: Option<File>,
    },
    /// An NBD export.
    Nbd {
        /// Its negotiated connections (one unless it allows multi-conn).
        conns: Vec<NbdConnection>,
    },
}

impl Access {
    /// How many NBD connections it has (None for a file).
    pub fn nbd_connections(&self) -> Option<usize> {
        match self {
            Access::File { .. } => None,
            Access::Nbd { conns } => Some(conns.len()),
        }
    }
}

/// An opened source, its allocation already mapped.
pub struct Source {
    /// The source as the user named it, for messages.
    pub display: String,
    /// Its size.
    pub size_bytes: u64,
    /// How its data is reached.
    pub access: Access,
    /// Its data extents ([`crate::plan::maps`]).
    pub extents: ExtentList,
    /// Keeps the qemu-nbd child (if any) alive for the job.
    pub child: Option<QemuNbdChild>,
}

/// An opened target, sized and ready.
pub struct Target {
    /// The target as the user named it, for messages.
    pub display: String,
    /// Its size (at least the source's).
    pub size_bytes: u64,
    /// How its data is reached.
    pub access: Access,
    /// The target reads as zeros everywhere already (fresh file).
    pub fresh_zero: bool,
    /// Keeps the qemu-nbd child (if any) alive for the job.
    pub child: Option<QemuNbdChild>,
}

fn nbd_err(uri: &NbdUri, e: crate::nbd::NbdError) -> CopyError {
    CopyError::Endpoint(EndpointError::Other(format!("{}: {e}", uri_display(uri))))
}

fn uri_display(uri: &NbdUri) -> String {
    match &uri.transport {
        crate::nbd::uri::Transport::Tcp { host, port } => {
            format!("nbd://{host}:{port}/{}", uri.export)
        }
        crate::nbd::uri::Transport::Unix { path } => {
            format!("nbd+unix:///{}?socket={}", uri.export, path.display())
        }
    }
}

fn check_plain(uri: &NbdUri) -> Result<(), CopyError> {
    if uri.tls {
        return Err(CopyError::Usage(format!(
            "{}: TLS NBD URIs (nbds://) are not supported by copy yet; use nbd:// or nbd+unix://",
            uri_display(uri)
        )));
    }
    Ok(())
}

fn connect_err(uri: &NbdUri, e: std::io::Error) -> CopyError {
    CopyError::Endpoint(EndpointError::Other(format!(
        "connecting to {}: {e}",
        uri_display(uri)
    )))
}

/// Connect and negotiate; the stream keeps `io_timeout` as its blocking
/// read and write timeout (see [`NbdUri::connect_timeout`]).
fn connect(uri: &NbdUri, meta: &[&str], io_timeout: Duration) -> Result<NbdConnection, CopyError> {
    check_plain(uri)?;
    let mut stream = uri
        .connect_timeout(io_timeout)
        .map_err(|e| connect_err(uri, e))?;
    let info = negotiate(&mut stream, &uri.export, meta).map_err(|e| nbd_err(uri, e))?;
    Ok((stream, info))
}

/// Open `n` connections (the first given); fewer when the server does not
/// allow several (no multi-conn).
fn more_connections(
    uri: &NbdUri,
    first: NbdConnection,
    n: u32,
    meta: &[&str],
    io_timeout: Duration,
) -> Result<Vec<NbdConnection>, CopyError> {
    let multi = first.1.can_multi_conn();
    let mut conns = vec![first];
    if !multi && n > 1 {
        tracing::info!(
            "{} does not advertise multi-conn; using one connection",
            uri_display(uri)
        );
    }
    while multi && conns.len() < n as usize {
        conns.push(connect(uri, meta, io_timeout)?);
    }
    Ok(conns)
}

/// Open the source `arg` (a file in `format`, if named: see
/// [`parse_spec`]) with `connections` NBD connections where it is an NBD
/// export, and map its allocation. A server silent for `io_timeout`
/// (connecting, negotiating, mapping) fails the open.
pub fn open_source(
    arg: &str,
    format: Option<ImageFormat>,
    connections: u32,
    io_timeout: Duration,
) -> Result<Source, CopyError> {
    Ok(open(arg, format, connections, io_timeout, None)?.0)
}

/// [`open_source`], and the plan of a pass from the source's dirty bitmap
/// `bitmap` ([`crate::plan::dirty`]): an NBD export must offer
/// `qemu:dirty-bitmap:NAME`; an image file is served by a qemu-nbd child
/// exporting that bitmap (`-B NAME`); a raw file has no bitmap.
pub fn open_source_with_bitmap(
    arg: &str,
    format: Option<ImageFormat>,
    connections: u32,
    io_timeout: Duration,
    bitmap: &str,
) -> Result<(Source, PassPlan), CopyError> {
    let (source, plan) = open(arg, format, connections, io_timeout, Some(bitmap))?;
    Ok((source, plan.expect("a bitmap was asked for")))
}

fn open(
    arg: &str,
    format: Option<ImageFormat>,
    connections: u32,
    io_timeout: Duration,
    bitmap: Option<&str>,
) -> Result<(Source, Option<PassPlan>), CopyError> {
    let spec = parse_spec(arg, Role::Source, format)?;
    let (uri, child) = match spec {
        Spec::Raw(path) if bitmap.is_some() => {
            return Err(CopyError::Usage(format!(
                "{}: a raw file has no dirty bitmap; it takes a qcow2 image with a persistent \
                 bitmap or an NBD export of qemu:dirty-bitmap:NAME",
                path.display()
            )));
        }
        Spec::Raw(path) => {
            let raw = RawFile::open_source(&path)?;
            let extents = maps::map_file(&raw.file, raw.size_bytes)?;
            let source = Source {
                display: path.display().to_string(),
                size_bytes: raw.size_bytes,
                access: Access::File {
                    file: raw.file,
                    kind: raw.kind,
                    direct: None,
                },
                extents,
                child: None,
            };
            return Ok((source, None));
        }
        Spec::Nbd(uri) => (uri, None),
        Spec::Image { path, format } => {
            let n = connections.max(1);
            let child = QemuNbdChild::start_with_bitmap(&path, &format, true, n, bitmap)?;
            (child.uri(), Some(child))
        }
    };
    let context = bitmap
        .map(dirty::bitmap_context)
        .transpose()
        .map_err(bitmap_err(&uri))?;
    let mut meta = vec![BASE_ALLOCATION];
    meta.extend(context.as_deref());
    let (stream, info) = connect(&uri, &meta, io_timeout)?;
    let size_bytes = info.size_bytes;
    // Map on the first connection, then hand it to the workers.
    let mut client = Client::from_negotiated(stream, info);
    let extents = map_nbd_source(&uri, &mut client, size_bytes)?;
    let plan = match bitmap {
        Some(name) => Some(dirty::map_pass(&mut client, name).map_err(bitmap_err(&uri))?),
        None => None,
    };
    let (stream, _, info) = client.into_parts();
    let first = (stream, info);
    let conns = more_connections(&uri, first, connections, &[BASE_ALLOCATION], io_timeout)?;
    let source = Source {
        display: arg.to_string(),
        size_bytes,
        access: Access::Nbd { conns },
        extents,
        child,
    };
    Ok((source, plan))
}

/// A dirty bitmap that cannot be read: the source's fault (or its
/// server's), named.
fn bitmap_err(uri: &NbdUri) -> impl Fn(DirtyMapError) -> CopyError + '_ {
    move |e| match e {
        DirtyMapError::BadName { .. } => CopyError::Usage(e.to_string()),
        e => CopyError::Endpoint(EndpointError::Other(format!("{}: {e}", uri_display(uri)))),
    }
}

/// The data extents of an NBD source over its first connection; all data
/// when the server has no `base:allocation`.
fn map_nbd_source(
    uri: &NbdUri,
    client: &mut Client<NbdStream>,
    size_bytes: u64,
) -> Result<ExtentList, CopyError> {
    if client.info().context_id(BASE_ALLOCATION).is_some() {
        return Ok(maps::map_nbd(client, size_bytes)?);
    }
    tracing::info!(
        "{} has no base:allocation; reading everything",
        uri_display(uri)
    );
    Ok(ExtentList::collect(
        &mut AllData as &mut dyn ExtentMap,
        size_bytes,
    )?)
}

/// Open (creating or sizing where that is what a user means) the target
/// `arg` (a file in `format`, if named) for a source of `source_bytes`.
pub fn open_target(
    arg: &str,
    format: Option<ImageFormat>,
    source_bytes: u64,
    connections: u32,
    write_mode: WriteMode,
    io_timeout: Duration,
) -> Result<Target, CopyError> {
    let spec = parse_spec(arg, Role::Target, format)?;
    let (uri, child) = match spec {
        Spec::Raw(path) => {
            let (raw, fresh_zero) = RawFile::open_target(&path, source_bytes)?;
            // Block devices: O_DIRECT. Regular files: the page cache with
            // streamed writeback (measured faster here than O_DIRECT into a
            // sparse file, see docs/bench/history.md#writing-file-targets),
            // unless asked otherwise.
            let want_direct = match write_mode {
                WriteMode::Direct => true,
                WriteMode::Cached => false,
                WriteMode::Auto => raw.kind == FileKind::BlockDevice,
            };
            let direct = if want_direct {
                open_direct(&path)
            } else {
                None
            };
            return Ok(Target {
                display: path.display().to_string(),
                size_bytes: raw.size_bytes,
                access: Access::File {
                    file: raw.file,
                    kind: raw.kind,
                    direct,
                },
                fresh_zero,
                child: None,
            });
        }
        Spec::Nbd(uri) => (uri, None),
        Spec::Image { path, format } => {
            if !path.exists() {
                qemu::create_image(&path, &format, source_bytes)?;
            }
            let child = QemuNbdChild::start(&path, &format, false, connections.max(1))?;
            (child.uri(), Some(child))
        }
    };
    let first = connect(&uri, &[], io_timeout)?;
    let info = &first.1;
    if info.read_only() {
        return Err(CopyError::Usage(format!(
            "target {arg} is a read-only NBD export"
        )));
    }
    if info.size_bytes < source_bytes {
        return Err(EndpointError::TargetTooSmall {
            target: arg.to_string(),
            target_bytes: info.size_bytes,
            source_bytes,
        }
        .into());
    }
    let size_bytes = info.size_bytes;
    let conns = more_connections(&uri, first, connections, &[], io_timeout)?;
    Ok(Target {
        display: arg.to_string(),
        size_bytes,
        access: Access::Nbd { conns },
        fresh_zero: false,
        child,
    })
}

/// How file and block-device targets are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum WriteMode {
    /// O_DIRECT for block devices, page cache with streamed writeback for files.
    #[default]
    Auto,
    /// O_DIRECT for every aligned write.
    Direct,
    /// Page cache with streamed writeback.
    Cached,
}

/// Open `path` again for writing with O_DIRECT; None where that is refused
/// (tmpfs, some network file systems).
pub fn open_direct(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::info!(
                "{}: no O_DIRECT ({e}); writing through the page cache",
                path.display()
            );
            None
        }
    }
}
