"""scripts/bench-net --sparse: issue 17's "large sparse disk" figure.

Two source images hold the same data:

  sparse  nbdkit sparse-random (size=--sparse-size, percent=--sparse-percent,
          seed=1, random-content=true) written by nbdcopy to a file, which
          keeps the holes as holes;
  packed  a dense file holding exactly the sparse file's data extents
          (SEEK_DATA/SEEK_HOLE), one after another.

Both are cached in the scratch folder and served read-only by qemu-nbd as
scripts/bench-local serves every source. Four tools copy each of them:
`diskferry copy` and `nbdcopy --flush` to a local file, `diskferry send` to
one `diskferry serve` (mutual TLS) and nbdcopy to a qemu-nbd on 127.0.0.1
TCP (bench-net's nbdcopy-tcp peer). The eight (tool, image) pairs run in ONE
alternating schedule, so that the time of a tool on `sparse` over its time
on `packed` — what the holes cost — compares runs taken seconds apart.
The report and the JSON are made by bench_sparse_report.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import bl
from bench_net_image import NET_PEERS, NetRun, NetToolResult, summarise, timed_net
from net_procs import proc_cpu_s
from net_receivers import DiskferryServe, QemuNbdTarget

log, tail = bl.log, bl.tail
TOOLS = ("diskferry-copy", "nbdcopy-copy", "diskferry-send", "nbdcopy-tcp")
GROUPS = ("sparse", "packed")
DEFAULT_RUNS = 3
SEED = 1
# The qemu-nbd target of nbdcopy-tcp is bench-net's, plus --discard=unmap.
# Without it qemu-nbd turns nbdcopy's zero requests for the holes into
# fallocate(ZERO_RANGE), which allocates the whole target (tried: a 2 GiB
# target of a 5 MiB-allocated source took all 2 GiB): a 64 GiB target would
# not fit the scratch disk, and a sparse source must give a sparse target.
# With it the zero requests punch holes, as diskferry's and nbdcopy's local
# targets keep them.
TARGET_EXTRA = ["--discard=unmap"]
COPY_BUF_BYTES = 8 << 20


def add_args(ap: argparse.ArgumentParser) -> None:
    """bench-net's --sparse flags (checked by check_args)."""
    ap.add_argument("--sparse", action="store_true",
                    help="issue 17's large sparse disk: copy and send of an nbdkit sparse-random disk against "
                         "the same data packed densely, all tools in one schedule (scripts/lib/bench_sparse.py); "
                         f"--runs defaults to {DEFAULT_RUNS} here")
    ap.add_argument("--sparse-size", default="64G", help="virtual size of the --sparse disk (default 64G)")
    ap.add_argument("--sparse-percent", type=float, default=1.0,
                    help="nbdkit sparse-random percent= of the --sparse disk (default 1)")


def _runs_given(argv: list[str]) -> bool:
    """Whether --runs (or an abbreviation argparse accepts) is on the
    command line: --sparse has its own default number of rounds."""
    return any(len(a.split("=")[0]) >= 4 and "--runs".startswith(a.split("=")[0]) for a in argv)


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the --sparse flags and make the images and tools the
    scenario's own (the config and the table print them)."""
    if not args.sparse:
        return
    if args.job or args.incremental:
        ap.error("--sparse, --job and --incremental are separate runs")
    try:
        args.sparse_size_bytes = bl.parse_size(args.sparse_size)
    except ValueError:
        ap.error(f"--sparse-size: not a size: {args.sparse_size!r}")
    if args.sparse_size_bytes < 1 << 20:
        ap.error("--sparse-size must be at least 1M")
    if not 0 < args.sparse_percent <= 100:
        ap.error("--sparse-percent must be in (0, 100]")
    if not _runs_given(sys.argv[1:]):
        args.runs = DEFAULT_RUNS
    args.image_list, args.tool_list = list(GROUPS), list(TOOLS)


# --------------------------------------------------------------------------
# the two images


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of every data extent of a file, as the file system
    reports them (SEEK_DATA / SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            off = end
    finally:
        os.close(fd)
    return out


def sparse_command(size_bytes: int, percent: float, dst: Path) -> list[str]:
    return ["nbdkit", "-U", "-", "sparse-random", f"size={size_bytes}", f"seed={SEED}",
            f"percent={percent:g}", "random-content=true",
            "--run", f'nbdcopy "$uri" {shlex.quote(str(dst))}']


def make_sparse(size_bytes: int, size_text: str, percent: float, scratch: Path) -> Path:
    """Create (or reuse) the cached sparse image; fail if it came out dense."""
    path = scratch / f"sparse-random-{size_text}-seed{SEED}-{percent:g}pct.img"
    if path.exists():
        log(f"reusing cached {path}")
        return path
    tmp = scratch / f".{path.name}.tmp"
    tmp.unlink(missing_ok=True)
    log(f"creating {path} (cached for later runs)")
    subprocess.run(sparse_command(size_bytes, percent, tmp), check=True, stdin=subprocess.DEVNULL)
    alloc = tmp.stat().st_blocks * 512
    if alloc > size_bytes * min(1.0, 2 * percent / 100 + 0.01):
        tmp.unlink()
        raise RuntimeError(f"nbdcopy wrote {alloc} bytes of a {size_bytes}-byte disk with {percent:g} % data: "
                           "the holes were not kept (does the file system support them?)")
    tmp.rename(path)
    return path


def make_packed(sparse: Path, scratch: Path) -> Path:
    """Create (or reuse) the dense file of the sparse image's data extents,
    concatenated in order: the same bytes to move, without the holes."""
    path = scratch / f"packed-of-{sparse.stem}.img"
    if path.exists():
        log(f"reusing cached {path}")
        return path
    tmp = scratch / f".{path.name}.tmp"
    extents = data_extents(sparse)
    total = sum(n for _, n in extents)
    log(f"creating {path} ({len(extents)} data extents, {total / 2**20:.1f} MiB; cached for later runs)")
    with open(sparse, "rb") as src, open(tmp, "wb") as dst:
        for off, length in extents:
            done = 0
            while done < length:
                buf = os.pread(src.fileno(), min(COPY_BUF_BYTES, length - done), off + done)
                if not buf:
                    raise RuntimeError(f"{sparse}: short read at {off + done}")
                dst.write(buf)
                done += len(buf)
        dst.flush()
        os.fsync(dst.fileno())
    if tmp.stat().st_size != total or tmp.stat().st_blocks * 512 < total:
        raise RuntimeError(f"{tmp}: expected {total} dense bytes, got size {tmp.stat().st_size}, "
                           f"allocated {tmp.stat().st_blocks * 512}")
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------
# the runs


def pair(tool: str, group: str) -> str:
    """The pseudo-tool the schedule alternates: one (tool, image) pair."""
    return f"{tool}@{group}"


class Rig:
    """Everything the runs share: the two sources, the diskferry serve and
    the qemu-nbd TCP target; built once, stopped by close()."""

    def __init__(self, args, diskferry: Path, images: dict[str, Path], workdir: Path, scratch: Path):
        self.args, self.diskferry, self.scratch = args, diskferry, scratch
        self.images = images
        self.sizes = {g: p.stat().st_size for g, p in images.items()}
        self.sources: dict[str, bl.QemuNbd] = {}
        self.serve: DiskferryServe | None = None
        self.peer: QemuNbdTarget | None = None
        for g, p in images.items():
            self.sources[g] = bl.QemuNbd(p, workdir)
        self.serve = DiskferryServe(diskferry, workdir, scratch, scratch / "logs")
        target_args = args.qemu_target_args if NET_PEERS["nbdcopy-tcp"]["tuned"] else []
        self.peer = QemuNbdTarget("nbdcopy-tcp", False, workdir, scratch, [*target_args, *TARGET_EXTRA])

    def close(self) -> None:
        if self.peer is not None:
            self.peer.stop()
            self.peer.dst.unlink(missing_ok=True)
        if self.serve is not None:
            self.serve.stop()
            shutil.rmtree(self.serve.root, ignore_errors=True)
        for s in self.sources.values():
            s.stop()
        for g in GROUPS:
            for t in ("copy", "nbdcopy"):
                self.local_out(g, t).unlink(missing_ok=True)

    def local_out(self, group: str, tag: str) -> Path:
        return self.scratch / f"sparse-out-{group}-{tag}.img"

    def display(self, tool: str) -> tuple[str, str]:
        """The command and its receiver with placeholders for paths and ports."""
        nbd = " ".join(self.args.nbdcopy_args)
        return {
            "diskferry-copy": ("diskferry copy SRC_URI FILE --no-progress", "none (a local file)"),
            "nbdcopy-copy": ("nbdcopy --flush SRC_URI FILE", "none (a local file, truncated to the source's size)"),
            "diskferry-send": (" ".join(["diskferry send SRC_URI --to 127.0.0.1:PORT --target NAME --tls-dir TLS "
                                         "--no-progress --restart", *self.args.diskferry_args]),
                               "diskferry serve --listen 127.0.0.1:0 --target-root ROOT --tls-dir TLS"),
            "nbdcopy-tcp": (f"nbdcopy --flush {nbd} SRC_URI nbd://127.0.0.1:PORT", self.peer.describe()),
        }[tool]

    def prepare(self, tool: str, group: str) -> tuple[Path, list[int], list[str]]:
        """Set one run up (not timed): (target, receiver pids, command)."""
        uri, size = self.sources[group].uri, self.sizes[group]
        if tool == "diskferry-copy":
            out = self.local_out(group, "copy")
            out.unlink(missing_ok=True)
            return out, [], [str(self.diskferry), "copy", uri, str(out), "--no-progress"]
        if tool == "nbdcopy-copy":
            out = self.local_out(group, "nbdcopy")
            out.unlink(missing_ok=True)
            with open(out, "wb") as f:
                f.truncate(size)
            return out, [], ["nbdcopy", "--flush", uri, str(out)]
        if tool == "diskferry-send":
            if not self.serve.alive():
                raise RuntimeError(f"diskferry serve exited; log {self.serve.log_path}")
            name = f"bench-{group}.img"
            out = self.serve.root / name
            out.unlink(missing_ok=True)
            return out, [self.serve.pid], [
                str(self.diskferry), "send", uri, "--to", f"127.0.0.1:{self.serve.port}", "--target", name,
                "--tls-dir", str(self.serve.tls), "--no-progress", "--restart", *self.args.diskferry_args]
        self.peer.start(size)
        return self.peer.dst, [self.peer.pid], ["nbdcopy", "--flush", *self.args.nbdcopy_args, uri, self.peer.uri()]

    def run_one(self, tool: str, group: str, log_path: Path, disk) -> tuple[NetRun, Path]:
        """One timed run: the tool's wall/CPU/RSS, its receiver's CPU and
        peak RSS, the source qemu-nbd's CPU (what serving the holes, as
        block status, and the data costs the source side), the target's
        allocation."""
        out, receivers, cmd = self.prepare(tool, group)
        src_pid = self.sources[group].pid
        cpu0 = proc_cpu_s(src_pid)
        run = timed_net(cmd, log_path, disk, receivers)
        cpu1 = proc_cpu_s(src_pid)
        run.source_cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        if tool == "nbdcopy-tcp":
            self.peer.stop()  # after its CPU was read; nbdcopy --flush flushed it
        run.target_allocated_bytes = out.stat().st_blocks * 512 if out.exists() else None
        return run, out


def bench(args, diskferry: Path, scratch: Path) -> list[dict]:
    """Make (or reuse) the two images, run the eight pairs in one schedule,
    and return the two groups of the results contract."""
    if not args.no_build and not args.diskferry_bin:
        diskferry = bl.build_release()
    if not diskferry.exists():
        sys.exit(f"{diskferry} is missing: build it (drop --no-build)")
    args.sparse_diskferry_version = bl.tool_versions(diskferry, ["diskferry"])["diskferry"]
    sparse = make_sparse(args.sparse_size_bytes, args.sparse_size, args.sparse_percent, scratch)
    images = {"sparse": sparse, "packed": make_packed(sparse, scratch)}
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    disk = bl.disk_of(scratch)
    pairs = [pair(t, g) for g in GROUPS for t in TOOLS]
    results = {pair(t, g): NetToolResult(pair(t, g), []) for g in GROUPS for t in TOOLS}
    with tempfile.TemporaryDirectory(prefix="df-bsparse-") as work:
        rig = Rig(args, diskferry, images, Path(work), scratch)
        try:
            for t in TOOLS:
                for g in GROUPS:
                    res = results[pair(t, g)]
                    # With placeholders: ports and temporary paths change from run to run.
                    res.display, res.display_receiver = rig.display(t)
                    res.command, res.receiver = res.display.split(), res.display_receiver
            for rnd, name, warmup in bl.schedule(pairs, args.runs):
                _one_round(rig, results[name], rnd, warmup, logs, disk, args.verify)
        finally:
            rig.close()
        return [_group(g, images[g], rig, results) for g in GROUPS]


def _one_round(rig: Rig, res: NetToolResult, rnd: int, warmup: bool, logs: Path, disk, verify: bool) -> None:
    """One run of one pair: time it, check the first counted run with cmp,
    delete the target (a 64 GiB disk leaves no room for eight targets)."""
    if res.error:
        return
    tool, group = res.tool.split("@")
    label = "warm-up" if warmup else f"run {rnd}"
    log_path = logs / f"sparse-{tool}-{group}-{rnd}.log"
    try:
        run, out = rig.run_one(tool, group, log_path, disk)
    except (RuntimeError, OSError, ValueError) as e:
        res.error = f"{label}: {e}"
        log(f"{res.tool} {label}: FAILED to start: {e}")
        return
    run.warmup, run.round = warmup, rnd
    if run.exit_code != 0:
        res.error = f"exit code {run.exit_code} on {label}: {tail(log_path, 5)}"
        log(f"{res.tool} {label}: FAILED (exit {run.exit_code}); log {log_path}\n{tail(log_path)}")
    else:
        first_counted = not warmup and not any(not r.warmup for r in res.runs)
        if first_counted and verify:
            run.verified = subprocess.run(["cmp", "-s", str(rig.images[group]), str(out)]).returncode == 0
            if not run.verified:
                res.error = f"copy differs from the source on {label} (cmp)"
                log(f"{res.tool} {label}: COPY DIFFERS FROM SOURCE")
        rcpu = "" if run.receiver_cpu_s is None else f", receiver cpu {run.receiver_cpu_s:.2f} s"
        scpu = "" if run.source_cpu_s is None else f", source cpu {run.source_cpu_s:.2f} s"
        talloc = "" if run.target_allocated_bytes is None else \
            f", target {run.target_allocated_bytes / 2**20:.1f} MiB allocated"
        log(f"{res.tool} {label}: {run.wall_s:.2f} s, cpu {run.cpu_s:.2f} s{rcpu}{scpu}, "
            f"rss {run.maxrss_kib / 1024:.0f} MiB{talloc}" + (", cmp ok" if run.verified else ""))
    res.runs.append(run)
    out.unlink(missing_ok=True)
    bl.settle(rig.args.settle)


def _group(group: str, image: Path, rig: Rig, results: dict[str, NetToolResult]) -> dict:
    """One group of the results contract: the image and its four tools."""
    size, alloc = rig.sizes[group], image.stat().st_blocks * 512
    tools = {}
    for t in TOOLS:
        res = results[pair(t, group)]
        s = summarise(res, size, alloc)
        counted = res.counted()
        scpu = [r.source_cpu_s for r in counted if r.source_cpu_s is not None]
        if "median_s" in s:
            s.setdefault("source_cpu_s_median", _median(scpu))
            talloc = [r.target_allocated_bytes for r in counted if r.target_allocated_bytes is not None]
            s["target_allocated_bytes_max"] = max(talloc) if talloc else None
        tools[t] = s
    extents = data_extents(image)
    out = {
        "image": group,
        "path": str(image),
        "size_bytes": size,
        "allocated_bytes": alloc,
        "data_bytes": sum(n for _, n in extents),
        "data_extents": len(extents),
        "server_command": rig.sources[group].cmd,
        "tools": tools,
    }
    if group == "sparse":
        out["made_by"] = " ".join(sparse_command(rig.args.sparse_size_bytes, rig.args.sparse_percent,
                                                 Path("FILE")))
    else:
        out["made_by"] = "the sparse image's data extents (SEEK_DATA/SEEK_HOLE), concatenated"
    return out


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
