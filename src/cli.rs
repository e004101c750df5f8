//! Command line: argument parsing, logging set-up, exit codes.
//!
//! Exit codes: 0 success; 2 bad usage or arguments; 3 the source failed
//! (unreadable, bad URI, server error); 4 the target failed (unwritable,
//! too small, flush failed); 5 internal or engine error.

use clap::{Parser, Subcommand};

use crate::engine::EngineKind;
use crate::pipeline::CopyError;
use crate::pipeline::copy::{self, CopyOptions};
use crate::progress::Progress;

#[derive(Parser, Debug)]
#[command(
    name = "diskferry",
    version,
    about = "Fast, safe replication of virtual-machine disks"
)]
pub struct Cli {
    /// More log output (-v info, -vv debug); logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Copy a disk: SRC and DST are NBD URIs, raw files, block devices, or
    /// images in another format (qcow2, vmdk, vhdx, …) opened through qemu-nbd.
    Copy(CopyArgs),
}

#[derive(clap::Args, Debug)]
pub struct CopyArgs {
    /// Source: nbd://host[:port]/export, nbd+unix:///export?socket=PATH, a file, a block device or an image.
    pub src: String,
    /// Target: as SRC; a missing file is created (its extension picks the format, raw otherwise).
    pub dst: String,
    /// NBD connections per side, when the server allows several (multi-conn).
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 4)]
    pub requests: u32,
    /// Bytes per request (power of two, 4KiB..32MiB; k/M suffixes are binary).
    #[arg(long, default_value = "2M", value_parser = parse_chunk)]
    pub chunk_size: u32,
    /// Worker threads (default: one per online CPU).
    #[arg(long)]
    pub threads: Option<u32>,
    /// I/O engine (default: io_uring when the kernel allows it, else threads).
    #[arg(long, value_enum)]
    pub io_engine: Option<EngineKind>,
    /// Print newline-delimited JSON events on stdout instead of a progress bar.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

fn parse_chunk(s: &str) -> Result<u32, String> {
    let v = crate::size::parse_size(s)?;
    u32::try_from(v).map_err(|_| format!("{s} is too large"))
}

/// Exit code for a failed copy.
pub fn exit_code(e: &CopyError) -> i32 {
    match e {
        CopyError::Usage(_) => 2,
        CopyError::SourceRead(_) | CopyError::Plan(_) => 3,
        CopyError::TargetWrite(_) | CopyError::Flush(_) => 4,
        CopyError::Endpoint(ep) => match ep {
            crate::endpoint::EndpointError::TargetTooSmall { .. } => 4,
            crate::endpoint::EndpointError::BadUri { .. } => 2,
            _ => 3,
        },
        CopyError::Engine(_) | CopyError::Internal(_) => 5,
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        2 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Entry point; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Copy(args) => run_copy(args),
    }
}

fn run_copy(a: CopyArgs) -> i32 {
    let opts = CopyOptions {
        source: a.src,
        target: a.dst,
        connections: a.connections,
        requests: a.requests,
        chunk_bytes: a.chunk_size,
        threads: a.threads,
        engine: a.io_engine,
    };
    let mut progress = Progress::new(a.json, a.no_progress);
    let result = copy::run(&opts, &mut |s, el| progress.update(s, el));
    match result {
        Ok(r) => {
            let done = serde_json::json!({
                "event": "done",
                "source": r.source,
                "target": r.target,
                "size_bytes": r.size_bytes,
                "bytes_planned": r.bytes_planned,
                "bytes_read": r.bytes_read,
                "bytes_written": r.bytes_written,
                "bytes_zeroed": r.bytes_zeroed,
                "elapsed_s": r.elapsed_s,
                "engine": r.engine,
                "workers": r.workers,
                "source_connections": r.source_connections,
                "target_connections": r.target_connections,
            });
            progress.finish(Some(&done));
            if !a.json && !a.no_progress {
                let rate = r.bytes_planned as f64 / r.elapsed_s.max(1e-9) / 1e6;
                eprintln!(
                    "copied {} data bytes of {} ({} zero/hole bytes skipped) in {:.2}s, {:.0} MB/s, engine {}",
                    r.bytes_written, r.size_bytes, r.bytes_zeroed, r.elapsed_s, rate, r.engine
                );
            }
            0
        }
        Err(e) => {
            progress.finish(None);
            if a.json {
                crate::progress::emit_json(
                    &serde_json::json!({"event": "error", "message": e.to_string()}),
                );
            }
            eprintln!("diskferry: {e}");
            exit_code(&e)
        }
    }
}
