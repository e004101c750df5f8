"""Process helpers of scripts/bench-net: a receiver's (or the source's) CPU
and peak RSS read from /proc, stopping servers that are not our children,
ports and network namespaces, and passing a SIGTERM on to the processes
being timed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a whole process (all its threads), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def reset_peak_rss(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def stop_pid(pid: int | None, timeout_s: float = 5.0) -> None:
    """SIGTERM a process that may not be our child; SIGKILL after timeout_s."""
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # reaps it if it is our child
        except ChildProcessError:
            pass
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z"
    except (OSError, IndexError):
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def netns_prefix(netns: str | None) -> list[str]:
    """The command prefix that runs a program inside network namespace
    `netns` (nothing for this script's own namespace). `ip netns exec`
    execs the program, so its pid and rusage are the program's."""
    return ["ip", "netns", "exec", netns] if netns else []


def wait_listening(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1",
                   netns: str | None = None) -> None:
    """Wait until something accepts on host:port. In another network
    namespace this script cannot connect itself, so `ss` run inside it is
    asked whether the port is listening."""
    deadline = time.monotonic() + timeout_s
    while True:
        if netns:
            res = subprocess.run([*netns_prefix(netns), "ss", "-Hltn", f"sport = :{port}"],
                                 capture_output=True, text=True)
            if res.returncode == 0 and res.stdout.strip():
                return
        else:
            try:
                with socket.create_connection((host, port), timeout=1):
                    return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {host}:{port}" + (f" in netns {netns}" if netns else ""))
        time.sleep(0.05)


def loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages at the end of a run (the
    machine info has them at its start): how busy the shared machine was."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None



def children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def raise_exit(signum, _frame):
    # Pass the signal on to our own children (the tool being timed, the
    # receiver), then unwind through the finally blocks that stop the servers.
    for pid in children():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)
