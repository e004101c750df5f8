"""The machine and tool versions printed with every benchmark table
(scripts/bench-local, scripts/bench-net), and number formatting."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def first_line(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (res.stdout or res.stderr).strip()
        return text.splitlines()[0] if text else f"(exit {res.returncode})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def machine_info(scratch: Path) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(scratch)], capture_output=True, text=True).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 2**20, 1),
        "scratch_fs": fs,
        "hostname": platform.node(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": first_line(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "commit_dirty": subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                       capture_output=True, text=True).stdout.strip() != "",
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages: how busy the machine was."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def tool_versions(diskferry: Path, tools: list[str]) -> dict:
    v = {
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "qemu-img": first_line(["qemu-img", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "rustc": first_line(["rustc", "--version"]),
    }
    if "diskferry" in tools:
        git = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
        built_here = diskferry.resolve() == (REPO / "target" / "release" / "diskferry").resolve()
        origin = f"git {git}" if built_here else f"{diskferry}, not this checkout's build (git {git} here)"
        v["diskferry"] = f"{first_line([str(diskferry), '--version'])} ({origin})"
    return v


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"

