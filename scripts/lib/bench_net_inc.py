"""`scripts/bench-net --incremental` (issue 16): moving only what changed.

Per round, on the real ext4 image (8 GiB, inc_change.py) with a fresh
change of 1 % of it (a new seed each round), against one `diskferry serve`
on 127.0.0.1 (mutual TLS) and an rsync daemon on 127.0.0.1:

1. `full`: `diskferry send SRC --restart` of the base onto a fresh target.
2. the change is applied to the source (raw copy and qcow2 with bitmap b0);
3. `delta`: `send SRC --delta` onto that target, which holds the base;
4. `incremental-bitmap`: `send SRC --changed dirty-bitmap:b0 --base ID`
   (ID: the delta's sync id; the target now holds the change already, so
   this rewrites the same bytes: the same work as onto the base);
5. `incremental-areas`: `send SRC --changed-areas FILE --base ID` (ID: the
   bitmap pass's sync id), FILE listing the writes in VMware's shape; then
   `incremental-empty`, the same with an empty list: what any send costs
   when nothing moves (process, TLS, the source's connections); and
   `delta-same`, `--delta` again onto the now identical target: the
   reading and digests of a delta with nothing to send;
6. `rsync`: `rsync --inplace --no-whole-file --block-size=65536` of the
   changed raw file onto a copy of the base in the daemon's module (before
   the diskferry passes in odd rounds, after them in even ones);
7. `read-source` / `read-target`: `nbdcopy SRC null:` and `nbdcopy TARGET
   null:`, reading the changed source and the target in full (holes
   skipped, as every reader here does); the target's pages are dropped
   from the page cache first, since the delta reads it cold too (the
   receiver drops what it writes; the source is served with --cache=none).

diskferry's source is the qcow2 served by qemu-nbd -r -B b0 on a Unix
socket; rsync's the raw copy with the same bytes. The first round checks
the target with `cmp` after the delta and after the incrementals, and the
rsync target after rsync. A pass whose flags the binary does not have yet
(`--delta`, `--changed`, `--changed-areas`, `--base`) is reported as
unavailable, not timed.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import inc_change
from bench_common import bl
from bench_net_image import last_json_event
from net_procs import free_port, stop_pid, wait_listening

log, fmt, tail = bl.log, bl.fmt, bl.tail
PASSES = ("full", "delta", "incremental-bitmap", "incremental-areas", "incremental-empty", "delta-same",
          "rsync", "read-source", "read-target")
NEEDS = {"delta": ["--delta"], "delta-same": ["--delta"], "incremental-bitmap": ["--changed", "--base"],
         "incremental-areas": ["--changed-areas", "--base"], "incremental-empty": ["--changed-areas", "--base"]}
RSYNC = ["rsync", "--inplace", "--no-whole-file", "--block-size=65536"]


@dataclass
class IncRun(bl.Run):
    wire_bytes: int | None = None
    done_event: dict | None = None


def ensure_rsync() -> None:
    if subprocess.run(["bash", "-c", "command -v rsync"], capture_output=True).returncode != 0:
        subprocess.run(["bash", "-c", "set -euo pipefail; source scripts/lib/deps.sh; ensure_rsync"],
                       cwd=bl.REPO, check=True, stdin=subprocess.DEVNULL)


class RsyncDaemon:
    """`rsync --daemon` on 127.0.0.1, one writable module `bench` (as us)."""

    def __init__(self, workdir: Path, module_dir: Path, logs: Path):
        self.dir = module_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = workdir / "rsyncd.conf"
        self.pidfile = workdir / "rsyncd.pid"
        conf.write_text(f"pid file = {self.pidfile}\nuse chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
                        f"[bench]\npath = {self.dir}\nread only = false\n")
        self.cmd = ["rsync", "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1",
                    f"--port={self.port}", f"--log-file={logs / 'rsyncd.log'}"]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_listening(self.port)

    def url(self, name: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/bench/{name}"

    def stop(self) -> None:
        stop_pid(self.proc.pid)
        self.proc.wait()


class Source:
    """The changed qcow2 served read-only with its bitmap."""

    def __init__(self, qcow2: Path, workdir: Path):
        self.sock = workdir / "inc-src.sock"
        pidfile = workdir / "inc-src.pid"
        pidfile.unlink(missing_ok=True)
        subprocess.run(["qemu-nbd", "-r", "-t", "-e", "8", "-f", "qcow2", "-B", inc_change.BITMAP,
                        *bl.QEMU_NBD_FAST, "-k", str(self.sock), "--pid-file", str(pidfile), "--fork",
                        str(qcow2)], check=True)
        self.pid = int(pidfile.read_text().strip())
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        stop_pid(self.pid)


def send_flags(diskferry: Path) -> set[str]:
    help_text = subprocess.run([str(diskferry), "send", "--help"], capture_output=True, text=True).stdout
    return set(re.findall(r"--[a-z][a-z-]+", help_text))


def rsync_bytes(log_path: Path) -> int | None:
    """Bytes on the wire both ways, from rsync --stats."""
    text = log_path.read_text(errors="replace")
    sent = re.search(r"Total bytes sent: ([\d,.]+)", text)
    recv = re.search(r"Total bytes received: ([\d,.]+)", text)
    if not sent or not recv:
        return None
    return sum(int(re.sub(r"[,.]", "", m.group(1))) for m in (sent, recv))


class Round:
    """One round's passes; results[pass] gets one Run each."""

    def __init__(self, ctx, rnd: int):
        self.ctx, self.rnd = ctx, rnd
        self.sync_id: str | None = None

    def timed(self, name: str, cmd: list[str]) -> IncRun | None:
        ctx = self.ctx
        log_path = ctx.logs / f"inc-{name}-{self.rnd}.log"
        run = IncRun(**asdict(bl.timed(cmd, log_path, ctx.disk)))
        run.round, run.warmup = self.rnd, False
        res = ctx.results[name]
        if run.exit_code != 0:
            res.error = f"exit code {run.exit_code} in round {self.rnd}: {tail(log_path, 5)}"
            log(f"inc {name} round {self.rnd}: FAILED (exit {run.exit_code}); log {log_path}\n{tail(log_path)}")
            res.runs.append(run)
            return None
        done = last_json_event(log_path) if cmd[0] == str(ctx.diskferry) else None
        run.done_event = done
        run.wire_bytes = done.get("bytes_on_wire") if done else rsync_bytes(log_path) if name == "rsync" else None
        if done and done.get("sync_id"):
            self.sync_id = done["sync_id"]
        log(f"inc {name} round {self.rnd}: {run.wall_s:.2f} s, cpu {run.cpu_s:.2f} s"
            + (f", wire {run.wire_bytes / 2**20:.1f} MiB" if run.wire_bytes is not None else ""))
        res.runs.append(run)
        return run

    def send(self, name: str, extra: list[str]) -> IncRun | None:
        ctx = self.ctx
        if not ctx.available(name):
            return None
        cmd = [str(ctx.diskferry), "send", ctx.source.uri, "--to", f"127.0.0.1:{ctx.serve.port}",
               "--target", ctx.target_name, "--tls-dir", str(ctx.serve.tls), "--no-progress", "--json",
               *ctx.args.diskferry_args, *extra]
        ctx.display.setdefault(name, cmd)
        return self.timed(name, cmd)

    def verify(self, what: str, a: Path, b: Path) -> None:
        if self.rnd != 1 or not self.ctx.args.verify:
            return
        same = subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0
        log(f"inc round 1: {what} {'cmp ok' if same else 'DIFFERS FROM THE SOURCE'}")
        self.ctx.checks[what] = same


class Context:
    """What every round shares."""

    def __init__(self, args, diskferry: Path, serve, workdir: Path, scratch: Path):
        self.args, self.diskferry, self.serve = args, diskferry, serve
        self.workdir, self.scratch = workdir, scratch
        self.logs = scratch / "logs"
        self.logs.mkdir(exist_ok=True)
        self.disk = bl.disk_of(scratch)
        self.flags = send_flags(diskferry)
        self.results = {p: bl.ToolResult(p, []) for p in PASSES}
        self.display: dict[str, list[str]] = {}
        self.checks: dict[str, bool] = {}
        self.changed_bytes: list[int] = []
        self.dirty_bytes: list[int | None] = []
        self.target_name = "inc.img"
        self.source: Source | None = None
        for name, need in NEEDS.items():
            missing = [f for f in need if f not in self.flags]
            if missing:
                self.results[name].error = f"unavailable: this diskferry has no {' '.join(missing)}"
                log(f"inc {name}: {self.results[name].error}")

    def available(self, name: str) -> bool:
        return self.results[name].error is None


def drop_cached(path: Path) -> None:
    """Evict a file's clean pages from the page cache (after an fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def one_round(ctx: Context, rnd: int, base_raw: Path, base_qcow2: Path, rsyncd: RsyncDaemon) -> None:
    args, r = ctx.args, Round(ctx, rnd)
    work_raw, work_qcow2 = ctx.scratch / "inc-work.img", ctx.scratch / "inc-work.qcow2"
    target = ctx.serve.root / ctx.target_name
    rsync_dst = rsyncd.dir / "dst.img"
    inc_change.fresh_copy(base_raw, work_raw)
    inc_change.fresh_copy(base_qcow2, work_qcow2)
    inc_change.fresh_copy(base_raw, rsync_dst)
    size = work_raw.stat().st_size
    try:
        # 1. full, from the base
        target.unlink(missing_ok=True)
        ctx.source = Source(work_qcow2, ctx.workdir)
        full = r.send("full", ["--restart"])
        ctx.source.stop()
        if full is None:
            return
        # 2. the change
        writes = inc_change.plan_writes(size, args.change, seed=rnd)
        ctx.changed_bytes.append(inc_change.apply(writes, rnd, work_raw, work_qcow2, ctx.workdir))
        areas = ctx.workdir / "changed-areas.json"
        inc_change.write_changed_areas(areas, size, writes)
        ctx.source = Source(work_qcow2, ctx.workdir)
        ctx.dirty_bytes.append(inc_change.dirty_bytes(ctx.source.uri))
        rsync_cmd = [*RSYNC, "--ignore-times", "--stats", str(work_raw), rsyncd.url("dst.img")]
        ctx.display.setdefault("rsync", rsync_cmd)
        if rnd % 2:
            r.timed("rsync", rsync_cmd)
        # 3. delta onto the base
        if r.send("delta", ["--delta", "--delta-block", args.delta_block]) is not None:
            r.verify("target after --delta", work_raw, target)
        # 4., 5. incrementals, each based on the pass before
        empty = ctx.workdir / "changed-areas-empty.json"
        inc_change.write_changed_areas(empty, size, [])
        for name, changed in (("incremental-bitmap", ["--changed", f"dirty-bitmap:{inc_change.BITMAP}"]),
                              ("incremental-areas", ["--changed-areas", str(areas)]),
                              ("incremental-empty", ["--changed-areas", str(empty)])):
            if ctx.available(name) and not r.sync_id:
                ctx.results[name].error = "no sync_id in the done event of the pass before"
            if ctx.available(name) and r.send(name, [*changed, "--base", r.sync_id]) is not None:
                r.verify(f"target after {name}", work_raw, target)
        # a delta with nothing to send: reading and digests alone
        r.send("delta-same", ["--delta", "--delta-block", args.delta_block])
        if not rnd % 2:
            r.timed("rsync", rsync_cmd)
        r.verify("rsync's target", work_raw, rsync_dst)
        # 7. reading both in full
        read_src = ["nbdcopy", ctx.source.uri, "null:"]
        read_tgt = ["nbdcopy", str(target), "null:"]
        ctx.display.setdefault("read-source", read_src)
        ctx.display.setdefault("read-target", read_tgt)
        r.timed("read-source", read_src)
        # The delta read its target cold (the receiver drops what it wrote
        # from the page cache, and the source is served with --cache=none):
        # read the target cold too, so the delta bar compares like with like.
        drop_cached(target)
        r.timed("read-target", read_tgt)
    finally:
        if ctx.source is not None:
            ctx.source.stop()
        bl.settle(args.settle)


def bench(args, diskferry: Path, serve, workdir: Path, scratch: Path) -> dict:
    ensure_rsync()
    base_raw, base_qcow2 = inc_change.base_images(scratch, args.inc_size)
    ctx = Context(args, diskferry, serve, workdir, scratch)
    rsyncd = RsyncDaemon(workdir, scratch / "inc-rsync", ctx.logs)
    try:
        for rnd in range(1, args.runs + 1):
            one_round(ctx, rnd, base_raw, base_qcow2, rsyncd)
    finally:
        rsyncd.stop()
        for p in (scratch / "inc-work.img", scratch / "inc-work.qcow2", rsyncd.dir / "dst.img",
                  serve.root / ctx.target_name):
            p.unlink(missing_ok=True)
    return summary(ctx, base_raw, rsyncd)


def summary(ctx: Context, base_raw: Path, rsyncd: RsyncDaemon) -> dict:
    size, alloc = base_raw.stat().st_size, base_raw.stat().st_blocks * 512
    changed = statistics.median(ctx.changed_bytes) if ctx.changed_bytes else None
    tools = {}
    for name, res in ctx.results.items():
        s = bl.summarise(res, size, alloc)
        counted = res.counted()
        wire = [r.wire_bytes for r in counted if r.wire_bytes is not None]
        # What the pass itself counts as changed (the done event's
        # bytes_changed: an incremental's planned extents, a delta's
        # differing blocks), else the bytes the change wrote.
        own = [r.done_event["bytes_changed"] for r in counted
               if r.done_event and r.done_event.get("bytes_changed") is not None]
        if counted and not res.error and name not in ("full", "read-source", "read-target"):
            s["changed_bytes_median"] = statistics.median(own) if own else changed
        if wire and not res.error:
            s["wire_bytes_median"] = statistics.median(wire)
            if s.get("changed_bytes_median"):
                s["wire_per_changed"] = s["wire_bytes_median"] / s["changed_bytes_median"]
        tools[name] = s
    subst = {str(ctx.serve.tls): "TLS", f"127.0.0.1:{ctx.serve.port}": "127.0.0.1:PORT",
             f"127.0.0.1:{rsyncd.port}": "127.0.0.1:PORT", str(ctx.diskferry): "diskferry",
             f"--port={rsyncd.port}": "--port=PORT", str(ctx.workdir): "WORK", str(ctx.serve.root): "ROOT",
             str(ctx.scratch): "SCRATCH"}
    def placeholders(text: str) -> str:
        for k, v in subst.items():
            text = text.replace(k, v)
        return text

    display = {name: placeholders(" ".join(cmd)) for name, cmd in ctx.display.items()}
    return {
        "image": f"ext4 {ctx.args.inc_size}",
        "path": str(base_raw),
        "size_bytes": size,
        "allocated_bytes": alloc,
        "server_command": [],
        "changed_bytes": ctx.changed_bytes,
        "dirty_bitmap_bytes": ctx.dirty_bytes,
        "checks": ctx.checks,
        "display_commands": display,
        "rsync_daemon": placeholders(" ".join(rsyncd.cmd)),
        "tools": tools,
    }


def markdown_table(inc: dict, runs: int) -> str:
    t = inc["tools"]
    med = {name: s.get("median_s") for name, s in t.items()}
    full, rsync = med.get("full"), med.get("rsync")
    reads = [x for x in (med.get("read-source"), med.get("read-target")) if x is not None]
    rows = ["| pass | rounds | median s | min s | max s | wire MiB | changed MiB | wire / changed "
            "| pass / full | pass / rsync | CPU s (sender) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in t.items():
        m = s.get("median_s")
        err = s.get("error") or ""
        status = "unavailable" if err.startswith("unavailable") else "FAILED" if err else f"{s.get('n', 0)}/{runs}"
        cells = [name, status,
                 fmt(m), fmt(s.get("min_s")), fmt(s.get("max_s")),
                 fmt(s["wire_bytes_median"] / 2**20, 1) if "wire_bytes_median" in s else "—",
                 fmt(s["changed_bytes_median"] / 2**20, 1) if s.get("changed_bytes_median") else "—",
                 fmt(s.get("wire_per_changed"), 3),
                 fmt(m / full) if m and full and name not in ("full", "read-source", "read-target") else "—",
                 fmt(m / rsync) if m and rsync and name != "rsync" and not name.startswith("read") else "—",
                 fmt(s.get("cpu_s_median"))]
        rows.append("| " + " | ".join(cells) + " |")
    if med.get("delta") and reads:
        rows.append(f"\n--delta / the slower full read: {fmt(med['delta'] / max(reads))}")
    return "\n".join(rows)
