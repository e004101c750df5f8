"""Measuring, shared by scripts/bench-local, scripts/bench-net and their
modules (through `bench_local`, which re-exports these): the alternating
schedule, a timed run (wall time, the child's CPU and peak RSS, the disk's
busy share), and the per-tool summary and paired per-round ratios."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# GNU time (Debian package `time`): it reports the timed tool's own peak RSS.
TIME_BIN = Path("/usr/bin/time")


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    maxrss_kib: int
    exit_code: int
    warmup: bool
    verified: bool | None = None
    round: int = 0
    # Share of the run's wall time the scratch file system's disk had I/O in
    # flight (/proc/diskstats io_ticks); near 1.0 means the disk, not the
    # tool, set the pace. None when the disk could not be found.
    disk_busy: float | None = None
    # utime+stime of the source qemu-nbd over the run (set by the harness
    # that serves the source); None where not measured.
    source_cpu_s: float | None = None


@dataclass
class ToolResult:
    tool: str
    command: list[str]
    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def counted(self) -> list[Run]:
        return [r for r in self.runs if not r.warmup and r.exit_code == 0]



def schedule(tools: list[str], runs: int) -> list[tuple[int, str, bool]]:
    """(round, tool, warm-up) in the order to run them: one warm-up each,
    then `runs` rounds that alternate between rotations of the tool list
    and of its reverse. Rotations alone keep the cyclic order, so one tool
    would always follow the same other tool; here each tool follows each
    other one about equally often."""
    out = [(0, t, True) for t in tools]  # warm-up, not counted
    n = len(tools)
    for i in range(runs):
        k = (i // 2) % n
        order = tools[k:] + tools[:k]
        if i % 2:
            order = order[::-1]
        out += [(i + 1, t, False) for t in order]
    return out


def settle(seconds: float) -> None:
    """Between runs: flush the file system (the deleted target's blocks,
    discarded on a `discard` mount) and give the disk the same idle time
    after every tool, so no run pays for the one before."""
    os.sync()
    if seconds > 0:
        time.sleep(seconds)


def disk_of(path: Path) -> tuple[int, int] | None:
    """(major, minor) of the whole disk under `path`'s file system, as
    /proc/diskstats names it (a partition's parent disk where there is one)."""
    dev = path.stat().st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        if (sysdir / "partition").exists():
            sysdir = sysdir.resolve().parent
        major, minor = (sysdir / "dev").read_text().split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def diskstats(disk: tuple[int, int] | None) -> list[int] | None:
    """The disk's /proc/diskstats counters (the fields after its name:
    [0] reads, [2] sectors read, [6] sectors written, [9] ms with I/O in
    flight, ...), or None."""
    if disk is None:
        return None
    try:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if (int(f[0]), int(f[1])) == disk:
                return [int(x) for x in f[3:]]
    except (OSError, ValueError, IndexError):
        pass
    return None


def io_ticks_ms(disk: tuple[int, int] | None) -> int | None:
    """Milliseconds the disk has had I/O in flight since boot."""
    f = diskstats(disk)
    return None if f is None or len(f) < 10 else f[9]


def _time_maxrss_kib(path: Path) -> int | None:
    """The peak RSS GNU time wrote (`-f %M`): the last line of its file,
    after a "Command exited with non-zero status" line if there is one."""
    try:
        lines = path.read_text(errors="replace").split()
        return int(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
    finally:
        path.unlink(missing_ok=True)


def timed(cmd: list[str], log_path: Path, disk: tuple[int, int] | None) -> Run:
    """Run `cmd` to its end: wall time, user+sys CPU (os.wait4, which counts
    the processes it waited for), peak RSS, the disk's busy share.

    The peak RSS is not wait4's ru_maxrss: a child of this script starts as
    a copy of it (fork or vfork), and at exec the kernel keeps that copy's
    high-water mark as the process's maxrss, so wait4 reports at least this
    script's own RSS (18-27 MiB) whatever the tool uses. GNU time forks the
    tool from its own small process and reports the tool's peak alone."""
    if not TIME_BIN.exists():
        raise RuntimeError(f"{TIME_BIN} is missing (Debian package `time`): it measures each tool's peak RSS")
    rss_path = log_path.with_name(log_path.name + ".maxrss")
    with open(log_path, "wb") as logf:
        ticks0 = io_ticks_ms(disk)
        start = time.perf_counter()
        proc = subprocess.Popen([str(TIME_BIN), "-f", "%M", "-o", str(rss_path), *cmd],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - start
        ticks1 = io_ticks_ms(disk)
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped (time exits as the tool did)
    maxrss_kib = _time_maxrss_kib(rss_path)
    busy = None
    if ticks0 is not None and ticks1 is not None and wall_s > 0:
        busy = min(1.0, (ticks1 - ticks0) / 1000 / wall_s)
    return Run(
        wall_s=wall_s,
        cpu_s=usage.ru_utime + usage.ru_stime,
        # an upper bound (see above) if time could not say, e.g. when killed
        maxrss_kib=usage.ru_maxrss if maxrss_kib is None else maxrss_kib,
        exit_code=proc.returncode,
        warmup=False,
        disk_busy=busy,
    )


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""



def paired(df: ToolResult, peer: ToolResult) -> dict:
    """diskferry against `peer` round by round. The two ran within seconds
    of each other in each round, so the disk's slow and fast spells (it is
    shared) weigh on both; the median of the per-round time ratios drifts
    less between runs of the benchmark than the ratio of the medians."""
    if df.error or peer.error:
        return {}
    mine = {r.round: r.wall_s for r in df.counted()}
    ratios = [mine[r.round] / r.wall_s for r in peer.counted() if r.round in mine]
    if not ratios:
        return {}
    return {
        "paired_ratio_median": statistics.median(ratios),
        "paired_rounds": len(ratios),
        "rounds_diskferry_faster": sum(x < 1.0 for x in ratios),
    }


def summarise(res: ToolResult, size_bytes: int, alloc_bytes: int) -> dict:
    counted = res.counted()
    out = {"command": res.command, "error": res.error, "runs": [asdict(r) for r in res.runs]}
    if counted and not res.error:
        times = [r.wall_s for r in counted]
        med = statistics.median(times)
        out |= {
            "n": len(times),
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "gb_per_s_allocated": alloc_bytes / med / 1e9,
            "gb_per_s_size": size_bytes / med / 1e9,
            "peak_rss_mib": max(r.maxrss_kib for r in counted) / 1024,
            "cpu_s_median": statistics.median(r.cpu_s for r in counted),
        }
        source_cpu = [r.source_cpu_s for r in counted if r.source_cpu_s is not None]
        if source_cpu:
            out["source_cpu_s_median"] = statistics.median(source_cpu)
        busy = [r.disk_busy for r in counted if r.disk_busy is not None]
        if busy:
            out["disk_busy_median"] = statistics.median(busy)
    return out

