//! Reading a source outside the pipeline, one request at a time: its
//! identity (what a resume is checked against) and the digests of windows
//! a resumed job did not send (for `--verify`).

use std::os::unix::fs::{FileExt, MetadataExt};

use crate::endpoint::open::{Access, Source};
use crate::nbd::blocking::Client;
use crate::nbd::uri::NbdStream;
use crate::pipeline::CopyError;
use crate::wire::ImageDigest;

/// What the identity reads: the first [`HEAD_BYTES`] (partition table,
/// boot sector, the first file system's superblock and its UUID) and
/// [`SAMPLES`] blocks of [`SAMPLE_BYTES`] spread over the data, read in
/// parallel over the source's connections (a cold O_DIRECT read costs
/// milliseconds: these are the job's only reads before it starts).
const HEAD_BYTES: u64 = 1 << 20;
const SAMPLES: u64 = 15;
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
/// size, a digest of the allocation map, a digest of the first MiB and 15
/// blocks spread over the data and, for a regular file, its inode and
/// modification time. Another
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
    let data = source.extents.extents().to_vec();
    let sample = read_samples(source, &sample_ranges(&data, size))?;
    Ok(format!(
        "v1;size={size};map={};sample={}{file_part}",
        &map.finalize().to_hex()[..16],
        &sample.to_hex()[..16]
    ))
}

/// The ranges the identity reads: the head of the disk, then blocks at
/// evenly spread positions of the data (holes read as zero: skipped).
fn sample_ranges(data: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let head_end = HEAD_BYTES.min(size);
    for &(o, l) in data {
        if o >= head_end {
            break;
        }
        out.push((o, (o + l).min(head_end) - o));
    }
    let total: u64 = data.iter().map(|&(_, l)| l).sum();
    for i in 1..=SAMPLES {
        // The i-th position in the data, counted in data bytes.
        let mut at = total / (SAMPLES + 1) * i;
        for &(o, l) in data {
            if at < l {
                let start = (o + at) / SAMPLE_BYTES * SAMPLE_BYTES;
                let start = start.max(o);
                if start >= head_end {
                    out.push((start, SAMPLE_BYTES.min(o + l - start)));
                }
                break;
            }
            at -= l;
        }
    }
    out
}

/// Reads `ranges` (over up to 4 of the source's connections at once) and
/// hashes them in order.
fn read_samples(source: &mut Source, ranges: &[(u64, u64)]) -> Result<blake3::Hash, CopyError> {
    let mut bufs = ranges
        .iter()
        .map(|&(_, l)| {
            let len = usize::try_from(l)
                .map_err(|_| CopyError::Internal(format!("a sample of {l} bytes")))?;
            Ok(vec![0u8; len])
        })
        .collect::<Result<Vec<Vec<u8>>, CopyError>>()?;
    match &mut source.access {
        Access::File { file, .. } => {
            for (&(o, _), b) in ranges.iter().zip(&mut bufs) {
                file.read_exact_at(b, o)
                    .map_err(|e| CopyError::SourceRead(format!("at offset {o}: {e}")))?;
            }
        }
        Access::Nbd { conns } => {
            let lanes = conns.len().clamp(1, 4);
            let mut clients: Vec<Client<NbdStream>> = conns
                .drain(..lanes)
                .map(|(stream, info)| Client::from_negotiated(stream, info))
                .collect();
            let mut jobs: Vec<Vec<(u64, &mut Vec<u8>)>> = (0..lanes).map(|_| Vec::new()).collect();
            for (i, (&(o, _), b)) in ranges.iter().zip(&mut bufs).enumerate() {
                jobs[i % lanes].push((o, b));
            }
            let results: Vec<Result<(), CopyError>> = std::thread::scope(|scope| {
                let handles: Vec<_> = clients
                    .iter_mut()
                    .zip(jobs)
                    .map(|(client, job)| {
                        scope.spawn(move || {
                            for (o, b) in job {
                                client.read(o, b).map_err(|e| CopyError::source(o, e))?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(CopyError::Internal("a sampling thread panicked".into()))
                        })
                    })
                    .collect()
            });
            for (i, client) in clients.into_iter().enumerate() {
                let (stream, _, info) = client.into_parts();
                conns.insert(i, (stream, info));
            }
            for r in results {
                r?;
            }
        }
    }
    let mut h = blake3::Hasher::new();
    for (&(o, l), b) in ranges.iter().zip(&bufs) {
        h.update(&o.to_le_bytes());
        h.update(&l.to_le_bytes());
        h.update(b);
    }
    Ok(h.finalize())
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
            // Runs lie inside the window, whose length is a u32.
            let at = |x: u64| {
                usize::try_from(x - start)
                    .map_err(|_| CopyError::Internal(format!("offset {x} in window {index}")))
            };
            for (s, e) in runs {
                read(s, &mut buf[at(s)?..at(e)?])?;
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
