//! Reading a source outside the pipeline, one request at a time: its
//! identity (what a resume is checked against) and the digests of windows
//! a resumed job did not send (for `--verify`).

use std::os::unix::fs::{FileExt, MetadataExt};

use crate::nbd::blocking::Client;
use crate::nbd::uri::NbdStream;
use crate::pipeline::CopyError;
use crate::pipeline::open::{Access, Source};
use crate::wire::ImageDigest;

/// Blocks sampled for the identity (4 KiB each, spread over the disk).
const SAMPLES: u64 = 32;
const SAMPLE_BYTES: u64 = 4096;

/// Runs `f` with a reader over the source's first connection (or file),
/// then gives the connection back to the source.
fn with_reader<T>(
    source: &mut Source,
    f: impl FnOnce(&mut dyn FnMut(u64, &mut [u8]) -> Result<(), CopyError>) -> Result<T, CopyError>,
) -> Result<T, CopyError> {
    match &mut source.access {
        Access::File { file, .. } => {
            let file = &*file;
            f(&mut |offset, buf| {
                file.read_exact_at(buf, offset)
                    .map_err(|e| CopyError::SourceRead(format!("at offset {offset}: {e}")))
            })
        }
        Access::Nbd { conns } => {
            let (stream, info) = conns.remove(0);
            let mut client: Client<NbdStream> = Client::from_negotiated(stream, info);
            let out = f(&mut |offset, buf| {
                client
                    .read(offset, buf)
                    .map_err(|e| CopyError::source(offset, e))
            });
            let (stream, _, info) = client.into_parts();
            conns.insert(0, (stream, info));
            out
        }
    }
}

/// The identity a receiver's journal is checked against on resume: the
/// size, a digest of the allocation map, a digest of 32 sampled blocks
/// and, for a regular file, its inode and modification time. Another
/// source, or this one changed, gives another identity (a change inside
/// an unsampled data block of an NBD source is not seen: pass
/// `--source-id` with a snapshot id when the source can change).
pub fn identity(source: &mut Source) -> Result<String, CopyError> {
    let size = source.size_bytes;
    let mut map = blake3::Hasher::new();
    for &(o, l) in source.extents.extents() {
        map.update(&o.to_le_bytes());
        map.update(&l.to_le_bytes());
    }
    let file_part = match &source.access {
        Access::File { file, kind, .. } if *kind == crate::endpoint::FileKind::Regular => {
            let m = file
                .metadata()
                .map_err(|e| CopyError::SourceRead(format!("stat: {e}")))?;
            format!(
                ";file={}:{}:{}.{}",
                m.dev(),
                m.ino(),
                m.mtime(),
                m.mtime_nsec()
            )
        }
        _ => String::new(),
    };
    let extents = source.extents.extents().to_vec();
    let sample = with_reader(source, |read| {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; SAMPLE_BYTES as usize];
        for i in 0..SAMPLES {
            let at = (size / SAMPLES * i) / SAMPLE_BYTES * SAMPLE_BYTES;
            let len = (size.saturating_sub(at)).min(SAMPLE_BYTES) as usize;
            if len == 0 {
                continue;
            }
            // Only data is read: holes are known zero and cost nothing.
            let data = extents
                .iter()
                .any(|&(o, l)| o < at + len as u64 && at < o + l);
            let b = &mut buf[..len];
            b.fill(0);
            if data {
                read(at, b)?;
            }
            h.update(b);
        }
        Ok(h.finalize())
    })?;
    Ok(format!(
        "v1;size={size};map={};sample={}{file_part}",
        &map.finalize().to_hex()[..16],
        &sample.to_hex()[..16]
    ))
}

/// Fills the windows of `image` that no round supplied (they were durable
/// on the receiver already) by reading them from the source.
pub fn digest_missing_windows(
    source: &mut Source,
    image: &mut ImageDigest,
) -> Result<u64, CopyError> {
    let extents = source.extents.extents().to_vec();
    let window = u64::from(image.window_bytes());
    with_reader(source, |read| {
        let mut buf = Vec::new();
        let mut read_bytes = 0;
        for index in 0..image.windows() {
            if image.has_window(index) {
                continue;
            }
            let start = index * window;
            let len = image.window_len_bytes(index).map_err(internal)?;
            let end = start + u64::from(len);
            let first = extents.partition_point(|&(o, l)| o + l <= start);
            let runs: Vec<(u64, u64)> = extents[first..]
                .iter()
                .take_while(|&&(o, _)| o < end)
                .map(|&(o, l)| (o.max(start), (o + l).min(end)))
                .collect();
            if runs.is_empty() {
                image.zero_window(index).map_err(internal)?;
                continue;
            }
            buf.clear();
            buf.resize(len as usize, 0);
            for (s, e) in runs {
                read(s, &mut buf[(s - start) as usize..(e - start) as usize])?;
                read_bytes += e - s;
            }
            image.hash_window(index, &buf).map_err(internal)?;
        }
        Ok(read_bytes)
    })
}

fn internal(e: crate::wire::WireError) -> CopyError {
    CopyError::Internal(format!("image digest: {e}"))
}
