//! Command line: argument parsing, logging set-up, exit codes.
//!
//! Exit codes: 0 success; 2 bad usage or arguments; 3 the source failed
//! (unreadable, bad URI, server error); 4 the target failed (unwritable,
//! too small, flush failed); 5 internal or engine error; 6 a `send` that
//! stopped (receiver unreachable for `--retry-for`) but can be resumed by
//! running it again, or a job cancelled through its handle.

#![forbid(unsafe_code)]
use clap::{Parser, Subcommand};

use crate::engine::EngineKind;
use crate::pipeline::CopyError;
use crate::progress::Progress;

mod copy;
mod copy_job;
mod io_engine;
mod passes;
mod send_job;
mod send_pass;
mod test_hooks;
pub use copy::CopyArgs;
use copy::run_copy;
pub use io_engine::{DISABLE_URING_ENV, io_engine_choice};

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
    /// Copy a disk, or with --job every disk of a VM at once: SRC and DST are
    /// NBD URIs, raw files, block devices, or images in another format
    /// (qcow2, vmdk, vhdx, …) opened through qemu-nbd.
    Copy(CopyArgs),
    /// Replicate SRC to a `diskferry serve` receiver over several TLS 1.3 streams.
    Send(Box<SendArgs>),
    /// Receive replication jobs from `diskferry send` (runs until SIGTERM/SIGINT).
    Serve(ServeArgs),
    /// Certificates for mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Write a private CA and server and client certificates into DIR
    /// (ca.pem, ca.key, server.pem, server.key, client.pem, client.key).
    Init {
        dir: std::path::PathBuf,
        /// Extra names (DNS or IP) for the server certificate; repeatable.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:10900 or [::]:10900 (port 0: any free port).
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// Directory the target names resolve under; names cannot escape it.
    #[arg(long)]
    pub target_root: std::path::PathBuf,
    /// Directory with ca.pem, server.pem and server.key (see `diskferry certs init`).
    #[arg(long, required_unless_present = "insecure_plaintext")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Where job state (resume journals) is kept [default: TARGET_ROOT/.diskferry-state].
    #[arg(long)]
    pub state_dir: Option<std::path::PathBuf>,
    /// Journal checkpoint at least this often while data arrives (e.g. 5s, 500ms, 1m).
    #[arg(long, default_value = "5s", value_parser = crate::size::parse_duration)]
    pub checkpoint_interval: std::time::Duration,
    /// … or after this much new durable data, whichever comes first.
    #[arg(long, default_value = "256Mi", value_parser = crate::size::parse_size)]
    pub checkpoint_bytes: u64,
    /// Accept plaintext TCP instead of mutual TLS (senders must say so too):
    /// no encryption, no authentication. Trusted networks only; not with --tls-dir.
    #[arg(long, conflicts_with = "tls_dir")]
    pub insecure_plaintext: bool,
    /// Allow target NAME to be PATH (a block device or a file outside the root); repeatable.
    #[arg(long = "allow", value_parser = parse_allow)]
    pub allow: Vec<(String, std::path::PathBuf)>,
    /// Connections one address (IPv6: one /64) may have open before they authenticate; more are closed at once.
    #[arg(long, default_value_t = crate::replicate::receive::limits::HANDSHAKES_PER_ADDRESS_DEFAULT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes_per_address: u32,
    /// Separate byte ranges one job may hold in memory; a sender that scatters more is refused.
    #[arg(long, default_value_t = crate::replicate::receive::limits::RANGES_PER_JOB_DEFAULT as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_ranges_per_job: u32,
    /// Permission bits (octal, e.g. 0640) of the target files the receiver creates.
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    pub target_mode: u32,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "{s}: expected octal permission bits from 0 to 0777, e.g. 0640"
        )),
    }
}

fn parse_allow(s: &str) -> Result<(String, std::path::PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s}: expected NAME=PATH"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("{s}: expected NAME=PATH"));
    }
    Ok((name.to_string(), path.into()))
}

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// Source: as for `copy`.
    #[arg(required_unless_present = "job")]
    pub src: Option<String>,
    /// Send every disk of a job file (TOML: `name`, then `[[disk]]` tables
    /// with `source` and `target`, the name on the receiver), all at once.
    #[arg(long, conflicts_with_all = ["src", "target", "src_format", "source_id"])]
    pub job: Option<std::path::PathBuf>,
    /// The source file's image format (default: the one its extension
    /// names, else raw; a file's contents never choose it).
    #[arg(long, value_enum)]
    pub src_format: Option<crate::endpoint::ImageFormat>,
    /// The receiver, HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Target name on the receiver (a file under its --target-root, or a name it allows).
    #[arg(long, required_unless_present = "job")]
    pub target: Option<String>,
    /// Directory with ca.pem, client.pem and client.key (see `diskferry certs init`).
    #[arg(long, required_unless_present = "insecure_plaintext")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// TCP streams, each its own TLS session.
    #[arg(long, default_value_t = 4)]
    pub streams: u32,
    /// Compression: auto, none, lz4, zstd or zstd:LEVEL.
    #[arg(long, default_value = "auto")]
    pub compress: crate::compress::Mode,
    /// Cap on the total rate: 100M or 1G bytes/s (SI), 64Mi (binary), 250Mbit (bits/s);
    /// with --job, one budget shared by every disk.
    #[arg(long, value_parser = crate::net::rate::parse_rate)]
    pub rate: Option<u64>,
    /// After the copy, compare a digest of the whole target (read back by the receiver) with the source's.
    #[arg(long)]
    pub verify: bool,
    /// Send without TLS (the receiver must also run with --insecure-plaintext):
    /// no encryption, no authentication. Trusted networks only; not with --tls-dir.
    #[arg(long, conflicts_with = "tls_dir")]
    pub insecure_plaintext: bool,
    /// NBD connections to the source.
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    /// Requests in flight per source connection (default: 2 when the source
    /// is on this host — a file, a Unix socket, a loopback address —
    /// deepening up to 16 if it proves slow; 16 across a network). Sets a fixed depth.
    #[arg(long)]
    pub requests: Option<u32>,
    /// Bytes per chunk (power of two, 4KiB..32MiB).
    #[arg(long, default_value = "512k", value_parser = parse_chunk)]
    pub chunk_size: u32,
    /// Worker threads (default: one per online CPU; half of them when the
    /// source is an NBD server on this machine, which needs cores too, as
    /// the TLS senders do).
    #[arg(long)]
    pub threads: Option<u32>,
    /// I/O engine for the source side.
    #[arg(long, value_enum)]
    pub io_engine: Option<EngineKind>,
    /// Discard what the receiver holds for this target (its journal) and copy everything again.
    #[arg(long)]
    pub restart: bool,
    /// Let a fresh copy replace an existing, non-empty target file the receiver has no journal for.
    #[arg(long)]
    pub overwrite: bool,
    /// Reconnect a stream that makes no progress for this long (e.g. 30s, 500ms).
    #[arg(long, default_value = "30s", value_parser = crate::size::parse_duration)]
    pub stall_timeout: std::time::Duration,
    /// Keep reconnecting for this long before stopping (exit 6, resumable by running again).
    #[arg(long, default_value = "10m", value_parser = crate::size::parse_duration)]
    pub retry_for: std::time::Duration,
    /// Regions of the disk read side by side, one request from each in
    /// turn, so the requests in flight spread over the disk (1: in
    /// ascending order).
    #[arg(long, default_value_t = crate::plan::lanes::LANES_DEFAULT)]
    pub lanes: u32,
    /// Fail when an NBD source leaves a connection attempt, the handshake or
    /// a request unanswered this long (e.g. 60s, 500ms), instead of waiting forever.
    #[arg(long, default_value = "60s", value_parser = crate::size::parse_duration)]
    pub io_timeout: std::time::Duration,
    /// Identity of the source the receiver checks a resume against (default:
    /// size, allocation map, sampled blocks, and inode+mtime for files).
    #[arg(long)]
    pub source_id: Option<String>,
    /// Send only what changed since --base: dirty-bitmap:NAME (the NBD
    /// source's qemu:dirty-bitmap:NAME; a qcow2 source is exported with
    /// that bitmap) or changed-areas:FILE (as --changed-areas).
    #[arg(long, value_parser = send_pass::parse_changed, conflicts_with_all = ["job", "delta"])]
    pub changed: Option<crate::replicate::send::ChangedSource>,
    /// Send only the areas a changed-areas list names (JSON in the shape
    /// of VMware's QueryChangedDiskAreas), since --base.
    #[arg(long, conflicts_with_all = ["job", "delta"])]
    pub changed_areas: Option<std::path::PathBuf>,
    /// The sync id (32 hex characters, from the `done` event of the sync
    /// the target is at) an incremental starts from; the receiver refuses any other.
    #[arg(long, value_parser = send_pass::parse_base, conflicts_with = "job")]
    pub base: Option<crate::replicate::send::SyncId>,
    /// An external change id (e.g. VMware's changeId) recorded with the
    /// sync and echoed in the `done` event.
    #[arg(long, conflicts_with = "job")]
    pub change_id: Option<String>,
    /// Send only the blocks that differ from what the target holds (the
    /// receiver digests its target; no base or change tracking needed).
    #[arg(long)]
    pub delta: bool,
    /// Bytes per block compared by --delta (power of two, 4k..1M; default 64k).
    #[arg(long, value_parser = send_pass::parse_delta_block)]
    pub delta_block: Option<u32>,
    /// Converging passes: `auto` runs passes of what changed (from
    /// --changed-cmd, or --delta) until the next one fits --max-downtime,
    /// then stops ready for cut-over, or runs --final-cmd and the final pass.
    #[arg(long, value_parser = ["auto"], conflicts_with = "job")]
    pub passes: Option<String>,
    /// The downtime budget of the final pass (with --passes auto).
    #[arg(long, default_value = "30s", value_parser = crate::size::parse_duration, requires = "passes")]
    pub max_downtime: std::time::Duration,
    /// Give up (exit 7, not converging) after this many passes.
    #[arg(long, default_value_t = crate::replicate::passes::model::MAX_PASSES_DEFAULT, requires = "passes")]
    pub max_passes: u32,
    /// Run before each pass (sh -c; DISKFERRY_PASS, DISKFERRY_BASE_SYNC_ID and
    /// DISKFERRY_FINAL in its environment); prints what the pass sends:
    /// `full`, `dirty-bitmap:NAME` or `changed-areas:FILE`.
    #[arg(long, requires = "passes")]
    pub changed_cmd: Option<String>,
    /// Stops or quiesces the source once a pass fits --max-downtime (sh -c);
    /// then the final pass runs and `cutover` reports the downtime.
    #[arg(long, requires = "passes")]
    pub final_cmd: Option<String>,
    /// Newline-delimited JSON events on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// How often progress is reported (the bar, or a `progress` event with
    /// --json), e.g. 100ms; 10ms at least.
    #[arg(long, default_value = "1s", value_parser = copy::parse_progress_interval)]
    pub progress_interval: std::time::Duration,
}

pub(crate) fn parse_chunk(s: &str) -> Result<u32, String> {
    let v = crate::size::parse_size(s)?;
    u32::try_from(v).map_err(|_| format!("{s} is too large"))
}

/// Exit code for a failed copy.
pub fn exit_code(e: &CopyError) -> i32 {
    match e {
        CopyError::Usage(_) => 2,
        CopyError::SourceRead(_) | CopyError::Map(_) => 3,
        CopyError::TargetWrite(_) | CopyError::Flush(_) => 4,
        CopyError::Endpoint(ep) | CopyError::TargetEndpoint(ep)
            if matches!(
                ep,
                crate::endpoint::EndpointError::BadUri { .. }
                    | crate::endpoint::EndpointError::FormatForUri { .. }
            ) =>
        {
            2
        }
        CopyError::Endpoint(crate::endpoint::EndpointError::TargetTooSmall { .. })
        | CopyError::TargetEndpoint(_) => 4,
        CopyError::Endpoint(_) => 3,
        CopyError::Engine(_) | CopyError::Internal(_) => 5,
        CopyError::Interrupted(_) | CopyError::Cancelled => 6,
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
        Command::Send(args) => run_send(*args),
        Command::Serve(args) => run_serve(args),
        Command::Certs(CertsCommand::Init { dir, sans, force }) => {
            match crate::net::certs::init(&dir, &sans, force) {
                Ok(p) => {
                    println!(
                        "wrote {}, {}, {} and their keys in {} (server names: {})",
                        p.ca_cert.display(),
                        p.server_cert.display(),
                        p.client_cert.display(),
                        dir.display(),
                        p.server_sans.join(", ")
                    );
                    0
                }
                Err(e) => {
                    eprintln!("diskferry: {e}");
                    2
                }
            }
        }
    }
}

/// The `done` event: every field of a job's report, plus `"event": "done"`.
pub(crate) fn done_event(report: &impl serde::Serialize) -> serde_json::Value {
    let mut v = serde_json::to_value(report).unwrap_or_else(|_| serde_json::json!({}));
    if let Some(map) = v.as_object_mut() {
        map.insert("event".into(), "done".into());
    }
    v
}

/// End a job: the `done` event (JSON) or summary line (terminal), or the
/// error as one line (and an `error` event); returns the exit code.
pub(crate) fn finish(
    progress: &mut Progress,
    json: bool,
    no_progress: bool,
    result: Result<(serde_json::Value, String), CopyError>,
) -> i32 {
    match result {
        Ok((done, line)) => {
            progress.finish(Some(&done));
            if !json && !no_progress {
                eprintln!("{line}");
            }
            0
        }
        Err(e) => {
            progress.finish(None);
            if json {
                crate::progress::emit_json(
                    &serde_json::json!({"event": "error", "message": e.to_string()}),
                );
            }
            eprintln!("diskferry: {e}");
            exit_code(&e)
        }
    }
}

fn run_send(a: SendArgs) -> i32 {
    use crate::replicate::send::pass::sync_id_hex;
    if a.job.is_some() {
        return send_job::run_send_job(&a);
    }
    let engine = match io_engine::resolve(a.io_engine) {
        Ok(kind) => kind,
        Err(why) => {
            let mut progress = Progress::new(a.json, a.no_progress);
            return finish(
                &mut progress,
                a.json,
                a.no_progress,
                Err(CopyError::Engine(why)),
            );
        }
    };
    let (Some(src), Some(target)) = (a.src.clone(), a.target.clone()) else {
        unreachable!("clap requires SRC and --target without --job")
    };
    // A series chooses each pass's kind itself (--passes, cli/passes.rs).
    let pass = match a.passes {
        Some(_) => Ok(crate::replicate::send::PassRequest::Full),
        None => a.pass(),
    };
    let pass = match pass {
        Ok(pass) => pass,
        Err(msg) => return copy_job::refuse(a.json, &msg),
    };
    let mut opts = a.disk(src, target);
    opts.engine = engine;
    opts.source_format = a.src_format;
    opts.source_id = a.source_id.clone();
    opts.pass = pass;
    opts.change_id = a.change_id.clone();
    if a.passes.is_some() {
        return match passes::passes_options(&a) {
            Ok(series) => passes::run(&a, &opts, &series),
            Err(msg) => copy_job::refuse(a.json, &msg),
        };
    }
    let mut progress = Progress::new(a.json, a.no_progress);
    let result = crate::replicate::send::run(&opts, &mut |s, el| progress.update(s, el));
    let result = result.map_err(send_job::cli_error).map(|r| {
        let rate = r.bytes_planned as f64 / r.elapsed_s.max(1e-9) / 1e6;
        let base = match &r.base_sync_id {
            Some(b) => format!(" (incremental from {})", sync_id_hex(b)),
            None => String::new(),
        };
        let line = format!(
            "sent {} data bytes of {} as {} bytes on the wire (ratio {:.2}) in {:.2}s, {:.0} MB/s{}; \
             {} bytes changed; sync id {}{base}",
            r.bytes_written,
            r.size_bytes,
            r.bytes_on_wire,
            r.compression_ratio,
            r.elapsed_s,
            rate,
            if r.verified { ", verified" } else { "" },
            r.bytes_changed,
            sync_id_hex(&r.sync_id),
        );
        (done_event(&r), line)
    });
    finish(&mut progress, a.json, a.no_progress, result)
}

fn run_serve(a: ServeArgs) -> i32 {
    use crate::replicate::receive::serve::{ServeOptions, Server, install_stop_signals};
    let opts = ServeOptions {
        listen: a.listen,
        target_root: a.target_root,
        tls_dir: a.tls_dir,
        state_dir: a.state_dir,
        checkpoint_interval: a.checkpoint_interval,
        checkpoint_bytes: a.checkpoint_bytes,
        insecure_plaintext: a.insecure_plaintext,
        allow: a.allow,
        limits: crate::replicate::receive::limits::PeerLimits {
            max_handshakes_per_address: a.max_handshakes_per_address as usize,
            max_ranges_per_job: a.max_ranges_per_job as usize,
        },
        target_mode: a.target_mode,
    };
    if opts.insecure_plaintext {
        tracing::warn!(
            "--insecure-plaintext: receiving without TLS; anyone on the network can read, alter \
             or send disks here. Use --tls-dir unless the network is trusted"
        );
    }
    let stop = install_stop_signals();
    let server = match Server::bind(opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("diskferry: {e}");
            return 2;
        }
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", server.local_addr());
        let _ = out.flush();
    }
    match server.run(stop) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("diskferry: {e}");
            1
        }
    }
}
