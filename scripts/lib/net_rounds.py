"""The alternating rounds every bench-net scenario runs (an image's tools,
a sweep's values, a shaped link's tools): one warm-up per tool, then
`runs` rounds in bench_measure.schedule's order, each run timed with the
receiver's and the source qemu-nbd's CPU, the first counted copy of each
tool compared with the source; and the one extra traced run per tool that
the rate-over-time plots are drawn from (not counted).

The scenario supplies `prepare(tool, res, label)`, which sets up one run
and returns (target path, receiver pid or None, command) or None after
recording in `res.error` why the tool cannot run, and `after(tool)`, which
stops a per-run receiver once its CPU was read."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bench_common import bl
from bench_trace import traced
from net_procs import peak_rss_kib, proc_cpu_s, reset_peak_rss

log, tail = bl.log, bl.tail


@dataclass
class NetRun(bl.Run):
    receiver_cpu_s: float | None = None
    receiver_peak_rss_kib: int | None = None
    target_allocated_bytes: int | None = None
    done_event: dict | None = None
    # tx bytes of the sender's interface over the run (--link only).
    wire_bytes: int | None = None


@dataclass
class NetToolResult:
    tool: str
    command: list[str]
    receiver: str = ""
    runs: list[NetRun] = field(default_factory=list)
    error: str | None = None
    target_info: dict | None = None
    display: str = ""  # the commands with placeholders for temporary paths and ports
    display_receiver: str = ""

    def counted(self) -> list[NetRun]:
        return [r for r in self.runs if not r.warmup and r.exit_code == 0]


Prepared = tuple[Path, "int | None", list[str]]
Prepare = Callable[[str, NetToolResult, str], "Prepared | None"]


def last_json_event(path: Path) -> dict | None:
    """The done event when --json was passed in --diskferry-args (else None)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def timed_net(cmd: list[str], log_path: Path, disk, receivers: list[int], *,
              source_pid: int | None = None, wire_bytes: Callable[[], int | None] | None = None) -> NetRun:
    """bl.timed, plus the receivers' CPU over the run (the sum of every
    receiver's utime+stime before and after) and their largest peak RSS
    (VmHWM, reset before the run); the source qemu-nbd's CPU over the run
    (it serves every tool, so its cost is part of each tool's); and the
    bytes `wire_bytes()` counts over the run (a veth's tx bytes)."""
    for pid in receivers:
        reset_peak_rss(pid)
    cpu0 = [proc_cpu_s(pid) for pid in receivers]
    src0 = proc_cpu_s(source_pid) if source_pid else None
    wire0 = wire_bytes() if wire_bytes else None
    run = NetRun(**asdict(bl.timed(cmd, log_path, disk)))
    wire1 = wire_bytes() if wire_bytes else None
    src1 = proc_cpu_s(source_pid) if source_pid else None
    cpu1 = [proc_cpu_s(pid) for pid in receivers]
    if receivers and None not in cpu0 and None not in cpu1:
        run.receiver_cpu_s = sum(cpu1) - sum(cpu0)
    rss = [peak_rss_kib(pid) for pid in receivers]
    run.receiver_peak_rss_kib = max(rss) if receivers and None not in rss else None
    if src0 is not None and src1 is not None:
        run.source_cpu_s = round(src1 - src0, 3)  # whole clock ticks
    if wire0 is not None and wire1 is not None:
        run.wire_bytes = wire1 - wire0
    return run


def run_rounds(group: str, image: Path, results: dict[str, NetToolResult], args, disk, logs: Path,
               prepare: Prepare, after: Callable[[str], None], source_pid: int | None,
               wire_bytes: Callable[[], int | None] | None = None) -> None:
    """Every tool of `results` in one alternating schedule; the runs are
    appended to each tool's result. A failed run stops that tool."""
    tools = list(results)
    for rnd, tool, warmup in bl.schedule(tools, args.runs):
        res = results[tool]
        if res.error:
            continue
        label = "warm-up" if warmup else f"run {rnd}"
        log_path = logs / f"net-{group}-{tool}-{rnd}.log"
        prepared = prepare(tool, res, label)
        if prepared is None:
            continue
        out, rpid, cmd = prepared
        run = timed_net(cmd, log_path, disk, [] if rpid is None else [rpid],
                        source_pid=source_pid, wire_bytes=wire_bytes)
        run.warmup, run.round = warmup, rnd
        after(tool)
        run.done_event = last_json_event(log_path)
        if run.exit_code != 0:
            res.error = f"exit code {run.exit_code} on {label}: {tail(log_path, 5)}"
            log(f"{group} {tool} {label}: FAILED (exit {run.exit_code}); log {log_path}\n{tail(log_path)}")
        else:
            first_counted = not warmup and not any(not r.warmup for r in res.runs)
            if first_counted and args.verify:
                run.verified = subprocess.run(["cmp", "-s", str(image), str(out)]).returncode == 0
                run.target_allocated_bytes = out.stat().st_blocks * 512 if out.exists() else None
                if not run.verified:
                    res.error = f"copy differs from the source on {label} (cmp)"
                    log(f"{group} {tool} {label}: COPY DIFFERS FROM SOURCE")
            log(f"{group} {tool} {label}: {describe_run(run)}" + (", cmp ok" if run.verified else ""))
        res.runs.append(run)
        out.unlink(missing_ok=True)
        bl.settle(args.settle)


def describe_run(run: NetRun) -> str:
    """One log line's figures."""
    text = f"{run.wall_s:.2f} s, cpu {run.cpu_s:.2f} s"
    if run.receiver_cpu_s is not None:
        text += f", receiver cpu {run.receiver_cpu_s:.2f} s"
    if run.source_cpu_s is not None:
        text += f", source cpu {run.source_cpu_s:.2f} s"
    if run.wire_bytes is not None:
        text += f", wire {run.wire_bytes / 2**20:.1f} MiB"
    return text + f", rss {run.maxrss_kib / 1024:.0f} MiB"


def trace_runs(group: str, results: dict[str, NetToolResult], args, disk, logs: Path, prepare: Prepare,
               after: Callable[[str], None], diskferry_tools: set[str], iface: str = "lo") -> dict[str, dict]:
    """One extra run per tool that did not fail, under bench_trace.traced
    (not counted): the samples of the rate-over-time plots. diskferry's
    commands add `--json --progress-interval 100ms`, so its own progress
    events come with the samples. {tool: trace}."""
    traces: dict[str, dict] = {}
    for tool, res in results.items():
        if res.error:
            continue
        prepared = prepare(tool, res, "traced run")
        if prepared is None:
            continue
        out, _rpid, cmd = prepared
        if tool in diskferry_tools:
            cmd = [*cmd, "--json", "--progress-interval", "100ms"]
        log_path = logs / f"net-{group}-{tool}-trace.log"
        trace = traced(cmd, log_path, disk, interval_s=0.1, iface=iface)
        after(tool)
        trace["command"] = cmd
        if trace["exit_code"] != 0:
            log(f"{group} {tool} traced run: FAILED (exit {trace['exit_code']}); log {log_path}\n{tail(log_path)}")
        else:
            log(f"{group} {tool} traced run: {trace['wall_s']:.2f} s, {len(trace['samples'])} samples, "
                f"{len(trace['progress'])} progress events")
        traces[tool] = trace
        out.unlink(missing_ok=True)
        bl.settle(args.settle)
    return traces


def serve_target(srv, name: str, res: "NetToolResult", what: str):
    """A diskferry serve's run set up: (target path, receiver pid, command)
    with the old target deleted, or None (recorded in `res.error`) when
    the receiver has exited."""
    if not srv.alive():
        res.error = f"diskferry serve exited; log {srv.log_path}"
        log(f"{what}: {res.error}\n{tail(srv.log_path)}")
        return None
    out = srv.root / name
    out.unlink(missing_ok=True)
    return out, srv.pid, res.command


def group(kind: str, image: Path, size_bytes: int, alloc_bytes: int, source, tools: dict, **extra) -> dict:
    """One group of a results file (the contract of scripts/bench-report)."""
    return {"image": kind, **extra, "path": str(image), "size_bytes": size_bytes, "allocated_bytes": alloc_bytes,
            "server_command": source.cmd, "tools": tools}
