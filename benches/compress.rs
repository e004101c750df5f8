//! Compression throughput and the cost of the `auto` probe
//! (`cargo bench --bench compress`).
//!
//! Real data is the files under /usr/share/doc concatenated in path order, as
//! a tar of them would hold them (up to 64 MiB; `DISKFERRY_BENCH_CORPUS=FILE`
//! picks another file). Each codec compresses it in 2 MiB chunks with one
//! reused context, as a sender thread does; the printed ratio is over the
//! whole corpus. Random data shows what incompressible chunks cost, and the
//! probe group what `auto` spends to decide that a chunk goes raw.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diskferry::compress::{Codec, Compressors, LinkState, Mode, Policy, Reason};

const CHUNK_BYTES: usize = 2 * 1024 * 1024;
const CORPUS_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn collect_files(dir: &Path, out: &mut Vec<u8>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if out.len() >= CORPUS_MAX_BYTES {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            collect_files(&path, out);
        } else if meta.is_file()
            && let Ok(bytes) = std::fs::read(&path)
        {
            out.extend_from_slice(&bytes);
        }
    }
    out.truncate(CORPUS_MAX_BYTES);
}

fn corpus() -> Vec<u8> {
    if let Ok(path) = std::env::var("DISKFERRY_BENCH_CORPUS") {
        let mut bytes = std::fs::read(&path).expect("DISKFERRY_BENCH_CORPUS is readable");
        bytes.truncate(CORPUS_MAX_BYTES);
        return bytes;
    }
    let mut bytes = Vec::new();
    collect_files(Path::new("/usr/share/doc"), &mut bytes);
    assert!(
        bytes.len() >= CHUNK_BYTES,
        "need /usr/share/doc or DISKFERRY_BENCH_CORPUS"
    );
    bytes
}

const CODECS: [(&str, Codec, i32); 5] = [
    ("lz4", Codec::Lz4, 0),
    ("zstd1", Codec::Zstd, 1),
    ("zstd3", Codec::Zstd, 3),
    ("zstd9", Codec::Zstd, 9),
    ("raw-copy", Codec::None, 0),
];

fn compress_all(
    ctx: &mut Compressors,
    codec: Codec,
    level: i32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> usize {
    let mut payload_bytes = 0;
    for chunk in data.chunks(CHUNK_BYTES) {
        ctx.compress(codec, level, chunk, out).expect("compress");
        payload_bytes += out.len();
    }
    payload_bytes
}

fn bench_codecs(c: &mut Criterion, name: &str, data: &[u8]) {
    let mut ctx = Compressors::new();
    let mut out = Vec::new();
    let mut group = c.benchmark_group(format!("compress/{name}"));
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for (label, codec, level) in CODECS {
        let payload_bytes = compress_all(&mut ctx, codec, level, data, &mut out);
        println!(
            "{name} {label}: ratio {:.2} ({} -> {} bytes)",
            data.len() as f64 / payload_bytes as f64,
            data.len(),
            payload_bytes
        );
        group.bench_function(label, |b| {
            b.iter(|| compress_all(&mut ctx, codec, level, black_box(data), &mut out))
        });
    }
    group.finish();

    let mut group = c.benchmark_group(format!("decompress/{name}"));
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for (label, codec, level) in CODECS.into_iter().filter(|(_, c, _)| *c != Codec::None) {
        let chunk = &data[..CHUNK_BYTES];
        ctx.compress(codec, level, chunk, &mut out)
            .expect("compress");
        let mut raw = vec![0u8; CHUNK_BYTES];
        group.throughput(Throughput::Bytes(CHUNK_BYTES as u64));
        group.bench_function(label, |b| {
            b.iter(|| {
                ctx.decompress(codec, black_box(&out), CHUNK_BYTES, &mut raw)
                    .expect("decompress")
            })
        });
    }
    group.finish();
}

fn bench_probe(c: &mut Criterion) {
    let random = random_bytes(CHUNK_BYTES, 3);
    // A link slow enough that every chunk is probed.
    let link = LinkState {
        link_bytes_per_s: Some(25e6),
        cores_for_compression: 1.0,
    };
    let mut policy = Policy::new(Mode::Auto).with_explore_every(0);
    assert_eq!(policy.choose(&random, &link).reason, Reason::Incompressible);
    let mut group = c.benchmark_group("probe");
    group.throughput(Throughput::Bytes(CHUNK_BYTES as u64));
    group.bench_function("auto-choose-random-2MiB", |b| {
        b.iter(|| policy.choose(black_box(&random), &link))
    });
    let fast = LinkState {
        link_bytes_per_s: None,
        cores_for_compression: 1.0,
    };
    group.bench_function("auto-choose-link-faster-2MiB", |b| {
        b.iter(|| policy.choose(black_box(&random), &fast))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let corpus = corpus();
    bench_codecs(c, "doc", &corpus);
    bench_codecs(c, "random", &random_bytes(16 * CHUNK_BYTES, 1));
    bench_probe(c);
}

criterion_group!(compress_benches, benches);
criterion_main!(compress_benches);
