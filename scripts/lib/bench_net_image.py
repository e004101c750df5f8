"""scripts/bench-net on one image: diskferry send/serve against the
nbdcopy peers (and the local reference), alternating rounds; the summary
and the markdown table."""

from __future__ import annotations

import json
import statistics
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_common import bl
from net_procs import peak_rss_kib, proc_cpu_s, reset_peak_rss

log, fmt, tail = bl.log, bl.fmt, bl.tail
ALL_TOOLS = ("diskferry", "nbdcopy-tcp", "nbdcopy-tls", "nbdcopy-tls-tuned", "nbdcopy-local")
# Peers that copy to a qemu-nbd target over the network (the others are
# diskferry itself and the local reference): whether they use TLS, and whether
# they take --nbdcopy-args / --qemu-nbd-target-args ("tuned") or run the
# design's command verbatim.
NET_PEERS = {
    "nbdcopy-tcp": {"tls": False, "tuned": True},
    "nbdcopy-tls": {"tls": True, "tuned": False},
    "nbdcopy-tls-tuned": {"tls": True, "tuned": True},
}


@dataclass
class NetRun(bl.Run):
    receiver_cpu_s: float | None = None
    receiver_peak_rss_kib: int | None = None
    target_allocated_bytes: int | None = None
    done_event: dict | None = None


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


def _placeholders(text: str, subst: dict[str, str]) -> str:
    for k, v in subst.items():
        text = text.replace(k, v)
    return text


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


def target_info(uri: str) -> dict | None:
    """What the qemu-nbd target advertises (multi-conn decides nbdcopy's -C)."""
    try:
        res = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=20)
        exp = json.loads(res.stdout)["exports"][0]
        return {k: exp.get(k) for k in ("export-size", "can_multi_conn", "can_flush", "can_fua",
                                        "can_zero", "can_trim", "is_read_only")}
    except (OSError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
        return None


def timed_net(cmd: list[str], log_path: Path, disk, receivers: list[int]) -> NetRun:
    """bl.timed, plus the receivers' CPU over the run (the sum of every
    receiver's utime+stime before and after) and their largest peak RSS
    (VmHWM, reset before the run)."""
    for pid in receivers:
        reset_peak_rss(pid)
    cpu0 = [proc_cpu_s(pid) for pid in receivers]
    run = NetRun(**asdict(bl.timed(cmd, log_path, disk)))
    cpu1 = [proc_cpu_s(pid) for pid in receivers]
    if receivers and None not in cpu0 and None not in cpu1:
        run.receiver_cpu_s = sum(cpu1) - sum(cpu0)
    rss = [peak_rss_kib(pid) for pid in receivers]
    run.receiver_peak_rss_kib = max(rss) if receivers and None not in rss else None
    return run


def _results(kind, name, tools, args, diskferry, serve, source) -> dict[str, NetToolResult]:
    results: dict[str, NetToolResult] = {}
    for t in tools:
        if t == "diskferry":
            cmd = [str(diskferry), "send", source.uri, "--to", f"127.0.0.1:{serve.port}",
                   "--target", name, "--tls-dir", str(serve.tls), "--no-progress", "--restart",
                   *args.diskferry_args]
            results[t] = NetToolResult(t, cmd, receiver=" ".join(serve.cmd))
            subst = {source.uri: "SRC_URI", f"127.0.0.1:{serve.port}": "127.0.0.1:PORT",
                     str(serve.tls): "TLS", str(serve.root): "ROOT", str(diskferry): "diskferry"}
            results[t].display = _placeholders(" ".join(cmd), subst)
            results[t].display_receiver = _placeholders(results[t].receiver, subst)
        else:
            results[t] = NetToolResult(t, [])  # the port changes per run
    return results


def _prepare(kind, name, tool, res, label, args, size_bytes, serve, peers, source, scratch):
    """Set up one run (not timed): (target path, receiver pid or None,
    command), or None after recording why the tool cannot run."""
    if tool == "diskferry":
        if not serve.alive():
            res.error = f"diskferry serve exited; log {serve.log_path}"
            log(f"{kind} {tool} {label}: {res.error}\n{tail(serve.log_path)}")
            return None
        out = serve.root / name
        out.unlink(missing_ok=True)
        return out, serve.pid, res.command
    if tool == "nbdcopy-local":
        out = scratch / f"local-{kind}.img"
        out.unlink(missing_ok=True)
        if not res.command:
            res.command = ["nbdcopy", "--flush", "SRC_URI", "LOCAL_FILE"]
            res.receiver = "none (a local file on the same disk)"
            res.display, res.display_receiver = " ".join(res.command), res.receiver
        return out, None, ["nbdcopy", "--flush", source.uri, str(out)]
    peer = peers[tool]
    try:
        peer.start(size_bytes)
    except (RuntimeError, OSError, ValueError) as e:
        res.error = f"target qemu-nbd: {e}"
        log(f"{kind} {tool} {label}: {res.error}")
        return None
    nbdcopy_args = args.nbdcopy_args if NET_PEERS[tool]["tuned"] else []
    if not res.command:
        res.command = ["nbdcopy", "--flush", *nbdcopy_args, "SRC_URI", peer.uri_template()]
        res.receiver = peer.describe()
        res.display, res.display_receiver = " ".join(res.command), res.receiver
        res.target_info = target_info(peer.uri())
    return peer.dst, peer.pid, ["nbdcopy", "--flush", *nbdcopy_args, source.uri, peer.uri()]


def bench_image(kind, image, size_bytes, tools, args, diskferry, serve, peers, workdir, scratch) -> dict:
    alloc_bytes = image.stat().st_blocks * 512
    log(f"{kind}: {image.name}, size {size_bytes / 2**30:.2f} GiB, allocated {alloc_bytes / 2**30:.2f} GiB")
    source = bl.QemuNbd(image, workdir)
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    disk = bl.disk_of(scratch)
    name = f"bench-{kind}.img"
    results = _results(kind, name, tools, args, diskferry, serve, source)
    try:
        for rnd, tool, warmup in bl.schedule(tools, args.runs):
            res = results[tool]
            if res.error:
                continue
            label = "warm-up" if warmup else f"run {rnd}"
            log_path = logs / f"net-{kind}-{tool}-{rnd}.log"
            prepared = _prepare(kind, name, tool, res, label, args, size_bytes, serve, peers, source, scratch)
            if prepared is None:
                continue
            out, rpid, cmd = prepared
            run = timed_net(cmd, log_path, disk, [] if rpid is None else [rpid])
            run.warmup, run.round = warmup, rnd
            if tool in NET_PEERS:
                peers[tool].stop()  # after its CPU was read; the copy is flushed already
            else:
                run.done_event = last_json_event(log_path)
            if run.exit_code != 0:
                res.error = f"exit code {run.exit_code} on {label}: {tail(log_path, 5)}"
                log(f"{kind} {tool} {label}: FAILED (exit {run.exit_code}); log {log_path}\n{tail(log_path)}")
            else:
                first_counted = not warmup and not any(not r.warmup for r in res.runs)
                if first_counted and args.verify:
                    run.verified = subprocess.run(["cmp", "-s", str(image), str(out)]).returncode == 0
                    run.target_allocated_bytes = out.stat().st_blocks * 512 if out.exists() else None
                    if not run.verified:
                        res.error = f"copy differs from the source on {label} (cmp)"
                        log(f"{kind} {tool} {label}: COPY DIFFERS FROM SOURCE")
                rcpu = f", receiver cpu {run.receiver_cpu_s:.2f} s" if run.receiver_cpu_s is not None else ""
                log(f"{kind} {tool} {label}: {run.wall_s:.2f} s, cpu {run.cpu_s:.2f} s{rcpu}, "
                    f"rss {run.maxrss_kib / 1024:.0f} MiB" + (", cmp ok" if run.verified else ""))
            res.runs.append(run)
            out.unlink(missing_ok=True)
            bl.settle(args.settle)
    finally:
        source.stop()
        for p in peers.values():
            p.stop()
            p.dst.unlink(missing_ok=True)
        if serve is not None:
            (serve.root / name).unlink(missing_ok=True)
    return {
        "image": kind,
        "path": str(image),
        "size_bytes": size_bytes,
        "allocated_bytes": alloc_bytes,
        "server_command": source.cmd,
        "tools": {t: summarise(r, size_bytes, alloc_bytes) for t, r in results.items()},
    }


def summarise(res: NetToolResult, size_bytes: int, alloc_bytes: int) -> dict:
    counted = res.counted()
    out = {"command": res.command, "receiver_command": res.receiver,
           "display_command": res.display, "display_receiver": res.display_receiver,
           "target_info": res.target_info, "error": res.error, "runs": [asdict(r) for r in res.runs]}
    if counted and not res.error:
        times = [r.wall_s for r in counted]
        med = statistics.median(times)
        rcpu = [r.receiver_cpu_s for r in counted if r.receiver_cpu_s is not None]
        rrss = [r.receiver_peak_rss_kib for r in counted if r.receiver_peak_rss_kib is not None]
        out |= {
            "n": len(times),
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "gb_per_s_allocated": alloc_bytes / med / 1e9,
            "gb_per_s_size": size_bytes / med / 1e9,
            "peak_rss_mib": max(r.maxrss_kib for r in counted) / 1024,
            "cpu_s_median": statistics.median(r.cpu_s for r in counted),
            "receiver_cpu_s_median": statistics.median(rcpu) if rcpu else None,
            "receiver_peak_rss_mib": max(rrss) / 1024 if rrss else None,
        }
    return out


def markdown_table(images: list[dict], runs: int) -> str:
    rows = [
        "| image | size GiB | alloc GiB | tool | runs | median s | min s | max s | GB/s (alloc) "
        "| GB/s (size) | peak RSS MiB (sender) | peak RSS MiB (receiver) | CPU s (sender) "
        "| CPU s (receiver) | diskferry / tool |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for img in images:
        df = img["tools"].get("diskferry", {})
        for tool, s in img["tools"].items():
            ratio = None
            if tool != "diskferry" and "median_s" in s and "median_s" in df:
                ratio = df["median_s"] / s["median_s"]
            cells = [
                img["image"], fmt(img["size_bytes"] / 2**30), fmt(img["allocated_bytes"] / 2**30), tool,
                "FAILED" if s.get("error") else f"{s.get('n', 0)}/{runs}",
                fmt(s.get("median_s")), fmt(s.get("min_s")), fmt(s.get("max_s")),
                fmt(s.get("gb_per_s_allocated")), fmt(s.get("gb_per_s_size")),
                fmt(s.get("peak_rss_mib"), 0), fmt(s.get("receiver_peak_rss_mib"), 0),
                fmt(s.get("cpu_s_median")), fmt(s.get("receiver_cpu_s_median")),
                "—" if tool == "diskferry" else fmt(ratio),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)

