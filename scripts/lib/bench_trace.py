"""One traced run, for the rate-over-time plots of scripts/bench-report:
while a command runs, /proc/diskstats (the scratch disk's bytes read and
written) and /proc/net/dev (bytes sent on an interface, loopback by
default) are sampled every `interval_s`; diskferry's `progress` events
(`--json --progress-interval 100ms`) are read back from its log.

    trace = traced(cmd, log_path, disk, interval_s=0.1)

The samples are cumulative from the start of the run, so any tool —
diskferry or a peer — is traced the same way from outside; the progress
events are diskferry's own view of the same run."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from bench_measure import diskstats

from bench_measure import TIME_BIN, _time_maxrss_kib

SECTOR = 512


def disk_bytes(disk: tuple[int, int] | None) -> tuple[int, int] | None:
    """(bytes read, bytes written) of the disk since boot."""
    f = diskstats(disk)
    return None if f is None or len(f) < 7 else (f[2] * SECTOR, f[6] * SECTOR)


def net_tx_bytes(iface: str) -> int | None:
    """Bytes sent on `iface` since it came up (this network namespace's view)."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == iface:
                return int(rest.split()[8])
    except (OSError, ValueError, IndexError):
        pass
    return None


class Sampler(threading.Thread):
    """Samples [t_s, read_bytes, written_bytes, tx_bytes] (cumulative from
    the first sample; None where a counter is unavailable) until stopped."""

    def __init__(self, disk, iface: str, interval_s: float):
        super().__init__(daemon=True)
        self.disk, self.iface, self.interval_s = disk, iface, interval_s
        self.samples: list[list] = []
        self._halt = threading.Event()

    def _read(self):
        return disk_bytes(self.disk), net_tx_bytes(self.iface)

    def run(self) -> None:
        t0 = time.perf_counter()
        d0, n0 = self._read()
        while True:
            d, n = self._read()
            t = time.perf_counter() - t0
            self.samples.append([
                round(t, 4),
                None if d is None or d0 is None else d[0] - d0[0],
                None if d is None or d0 is None else d[1] - d0[1],
                None if n is None or n0 is None else n - n0,
            ])
            if self._halt.wait(self.interval_s):
                # one last sample after the command ended
                d, n = self._read()
                self.samples.append([
                    round(time.perf_counter() - t0, 4),
                    None if d is None or d0 is None else d[0] - d0[0],
                    None if d is None or d0 is None else d[1] - d0[1],
                    None if n is None or n0 is None else n - n0,
                ])
                return

    def stop(self) -> list[list]:
        self._halt.set()
        self.join()
        return self.samples


def progress_events(log_path: Path) -> list[list[float]]:
    """[[elapsed_s, bytes_done], ...] of the `progress` events in a log."""
    out = []
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if ev.get("event") == "progress" and "elapsed_s" in ev and "bytes_done" in ev:
            out.append([round(float(ev["elapsed_s"]), 4), int(ev["bytes_done"])])
    return out


def traced(cmd: list[str], log_path: Path, disk, interval_s: float = 0.1, iface: str = "lo") -> dict:
    """Run `cmd` (stdout and stderr to `log_path`) while sampling; the
    trace as the results JSON stores it. The peak RSS comes from GNU time,
    as bench_measure.timed's does (wait4 would count this script's pages)."""
    if not TIME_BIN.exists():
        raise RuntimeError(f"{TIME_BIN} is missing (Debian package `time`): it measures each tool's peak RSS")
    rss_path = log_path.with_name(log_path.name + ".maxrss")
    sampler = Sampler(disk, iface, interval_s)
    with open(log_path, "wb") as logf:
        sampler.start()
        start = time.perf_counter()
        proc = subprocess.Popen([str(TIME_BIN), "-f", "%M", "-o", str(rss_path), *cmd],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall_s = time.perf_counter() - start
        samples = sampler.stop()
    maxrss_kib = _time_maxrss_kib(rss_path)
    return {
        "interval_s": interval_s,
        "disk": None if disk is None else f"{disk[0]}:{disk[1]}",
        "iface": iface,
        "wall_s": wall_s,
        "exit_code": os.waitstatus_to_exitcode(status),
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "maxrss_kib": usage.ru_maxrss if maxrss_kib is None else maxrss_kib,
        "columns": ["t_s", "read_bytes", "written_bytes", "tx_bytes"],
        "samples": samples,
        "progress": progress_events(log_path),
    }
