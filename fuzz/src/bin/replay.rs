//! Stable-toolchain fuzz runner (no libFuzzer, no coverage feedback).
//!
//! `replay TARGET [SECONDS]` runs TARGET over every file of
//! `fuzz/corpus/TARGET/`, then over random mutations of those files (bit
//! flips, interesting bytes, truncation, insertion, splicing) until SECONDS
//! (default 10) have passed. `replay TARGET --runs N` stops after N
//! executions instead (corpus included), so a seeded run is the same run on
//! any machine (scripts/test uses it). `replay TARGET FILE...` runs only the given
//! files (to reproduce a crash). A panicking input is written to
//! `fuzz/artifacts/TARGET/crash-<hash>` and the exit code is 1.
//! `FUZZ_SEED` fixes the random seed (printed on every run).
#![forbid(unsafe_code)]

use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use std::{env, fs};

use diskferry_fuzz::{TARGETS, Target, target};

/// Largest mutated input (bytes); libFuzzer's default is 4096.
const MAX_INPUT_BYTES: usize = 64 * 1024;
/// Most mutations stacked on one input.
const MAX_STACKED_MUTATIONS: u64 = 8;
/// Longest run accepted on the command line.
const MAX_RUN_SECONDS: u64 = 24 * 3600;

/// When a fuzzing run stops.
#[derive(Clone, Copy)]
enum Budget {
    /// After this much time.
    Time(Duration),
    /// After this many executions (corpus replay included).
    Runs(u64),
}

impl Budget {
    fn spent(self, start: Instant, executions: u64) -> bool {
        match self {
            Budget::Time(d) => start.elapsed() >= d,
            Budget::Runs(n) => executions >= n,
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(name) = args.first() else {
        return usage();
    };
    let Some(run) = target(name) else {
        eprintln!("unknown target {name:?}");
        return usage();
    };
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rest = &args[1..];
    if !rest.is_empty() && rest.iter().all(|a| Path::new(a).is_file()) {
        let files: Vec<PathBuf> = rest.iter().map(PathBuf::from).collect();
        return replay_files(name, run, &files, fuzz_dir);
    }
    let budget = match rest {
        [] => Budget::Time(Duration::from_secs(10)),
        [flag, n] if flag == "--runs" => match n.parse::<u64>() {
            Ok(n) if n > 0 => Budget::Runs(n),
            _ => return usage(),
        },
        [s] => match s.parse::<u64>() {
            Ok(s) if s <= MAX_RUN_SECONDS => Budget::Time(Duration::from_secs(s)),
            _ => return usage(),
        },
        _ => return usage(),
    };
    fuzz(name, run, fuzz_dir, budget)
}

fn usage() -> ExitCode {
    let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
    eprintln!(
        "usage: replay TARGET [SECONDS] | replay TARGET --runs N | replay TARGET FILE...\ntargets: {}",
        names.join(", ")
    );
    ExitCode::from(2)
}

fn replay_files(name: &str, run: Target, files: &[PathBuf], fuzz_dir: &Path) -> ExitCode {
    for file in files {
        let input = match fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                return ExitCode::from(2);
            }
        };
        if !survives(run, &input) {
            save_crash(name, &input, fuzz_dir);
            return ExitCode::FAILURE;
        }
    }
    println!("{name}: {} files ran without a crash", files.len());
    ExitCode::SUCCESS
}

fn fuzz(name: &str, run: Target, fuzz_dir: &Path, budget: Budget) -> ExitCode {
    let corpus = load_corpus(&fuzz_dir.join("corpus").join(name));
    let seed = env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(time_seed);
    let limit = match budget {
        Budget::Time(d) => format!("{} s", d.as_secs()),
        Budget::Runs(n) => format!("{n} runs"),
    };
    println!(
        "{name}: {} corpus files, seed {seed}, {limit}",
        corpus.len()
    );
    let mut rng = Rng(seed | 1);
    let start = Instant::now();
    let mut executions = 0u64;
    for input in &corpus {
        executions += 1;
        if !survives(run, input) {
            save_crash(name, input, fuzz_dir);
            return ExitCode::FAILURE;
        }
    }
    while !budget.spent(start, executions) {
        let input = mutate(&corpus, &mut rng);
        executions += 1;
        if !survives(run, &input) {
            save_crash(name, &input, fuzz_dir);
            println!("{name}: crashed after {executions} executions (seed {seed})");
            return ExitCode::FAILURE;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name}: {executions} executions in {secs:.1} s ({:.0}/s), no crash",
        executions as f64 / secs.max(1e-9)
    );
    ExitCode::SUCCESS
}

fn survives(run: Target, input: &[u8]) -> bool {
    panic::catch_unwind(AssertUnwindSafe(|| run(input))).is_ok()
}

fn save_crash(name: &str, input: &[u8], fuzz_dir: &Path) {
    let dir = fuzz_dir.join("artifacts").join(name);
    let mut h = DefaultHasher::new();
    input.hash(&mut h);
    let path = dir.join(format!("crash-{:016x}", h.finish()));
    match fs::create_dir_all(&dir).and_then(|()| fs::write(&path, input)) {
        Ok(()) => println!("{name}: crash input saved to {}", path.display()),
        Err(e) => eprintln!("{name}: cannot save crash input to {}: {e}", path.display()),
    }
}

fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let mut corpus: Vec<Vec<u8>> = files
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| fs::read(p).ok())
        .collect();
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    corpus
}

fn time_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// xorshift64*: small, deterministic from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, 0x10, 0x20, 0x40];

fn mutate(corpus: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut v = corpus[rng.below(corpus.len())].clone();
    let rounds = 1 + rng.next() % MAX_STACKED_MUTATIONS;
    for _ in 0..rounds {
        match rng.below(7) {
            0 | 1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            3 if !v.is_empty() => {
                let keep = rng.below(v.len());
                v.truncate(keep);
            }
            4 => {
                let at = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if v.len() >= 2 => {
                // Overwrite a 4-byte field with a boundary value (lengths,
                // counts, cookies are big-endian u32/u64 on both protocols).
                let i = rng.below(v.len() - 1);
                let vals = [0u32, 1, 0x7fff_ffff, 0xffff_ffff, 0x0200_0000, 0x0200_0008];
                let b = vals[rng.below(vals.len())].to_be_bytes();
                let end = (i + 4).min(v.len());
                v[i..end].copy_from_slice(&b[..end - i]);
            }
            _ => {}
        }
    }
    v.truncate(MAX_INPUT_BYTES);
    v
}
