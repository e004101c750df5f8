"""`scripts/bench-local --job`: several disks at once.

Three contenders copy the same N source disks (default 4, each a
sparse-random image with its own seed, served read-only by its own qemu-nbd
on a Unix socket) to N fresh raw files:

* `diskferry`: one `diskferry copy --job` with every disk (one engine, one
  set of pinned workers, one memory budget);
* `diskferry-seq`: the same disks one after another, one `diskferry copy`
  each (what a script looping over a VM's disks does);
* `nbdcopy-par`: one `nbdcopy --flush` per disk, all started together.

Rounds alternate as in the single-disk benchmark (bench-local's schedule);
a run's time is the wall time of the whole set, its CPU the sum over every
process and its RSS the largest single process's peak. The first counted
`diskferry` run is checked disk by disk with `cmp`.

The bench-local module is passed in (`bl`) so the measuring and reporting
code is shared, not copied.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

TOOLS = ("diskferry", "diskferry-seq", "nbdcopy-par")


def make_images(bl, count: int, size_bytes: int, size_text: str, scratch: Path) -> list[Path]:
    """Create (or reuse) `count` sparse-random images, seeds 1..count."""
    out = []
    for seed in range(1, count + 1):
        path = scratch / f"job-{size_text}-seed{seed}-50pct.img"
        if not path.exists():
            tmp = scratch / f".{path.name}.tmp"
            tmp.unlink(missing_ok=True)
            bl.log(f"creating {path} (cached for later runs)")
            subprocess.run(
                ["nbdkit", "-U", "-", "sparse-random", f"size={size_bytes}",
                 f"seed={seed}", "percent=50", "random-content=true",
                 "--run", f'nbdcopy "$uri" {shlex.quote(str(tmp))}'],
                check=True,
            )
            tmp.rename(path)
        out.append(path)
    return out


def job_file(path: Path, uris: list[str], outs: list[Path]) -> None:
    lines = ['name = "bench"']
    for uri, out in zip(uris, outs):
        lines += ["", "[[disk]]", f'source = "{uri}"', f'target = "{out}"']
    path.write_text("\n".join(lines) + "\n")


def commands(diskferry: Path, extra: list[str], job: Path, uris: list[str], outs: list[Path]) -> dict:
    """Each contender as one command whose exit code is the set's."""
    df = [str(diskferry), "copy", "--no-progress", *extra]
    seq = " && ".join(shlex.join([*df[:2], u, str(o), *df[2:]]) for u, o in zip(uris, outs))
    par = "; ".join(
        f"nbdcopy --flush {shlex.quote(u)} {shlex.quote(str(o))} & p{i}=$!"
        for i, (u, o) in enumerate(zip(uris, outs))
    )
    waits = " && ".join(f"wait $p{i}" for i in range(len(uris)))
    return {
        "diskferry": [*df, "--job", str(job)],
        "diskferry-seq": ["bash", "-c", f"set -e; {seq}"],
        "nbdcopy-par": ["bash", "-c", f"{par}; {waits}"],
    }


def prepare(tool: str, outs: list[Path], size_bytes: int) -> None:
    for out in outs:
        out.unlink(missing_ok=True)
        if tool == "nbdcopy-par":  # nbdcopy writes into an existing file
            with open(out, "wb") as f:
                f.truncate(size_bytes)


def bench(bl, args, diskferry: Path, workdir: Path, scratch: Path, out_dir: Path) -> dict:
    size_text = args.job_size
    size_bytes = bl.parse_size(size_text)
    images = make_images(bl, args.job_disks, size_bytes, size_text, scratch)
    alloc_bytes = sum(i.stat().st_blocks * 512 for i in images)
    total_bytes = sum(i.stat().st_size for i in images)
    bl.log(f"job: {len(images)} disks of {size_text}, {alloc_bytes / 2**30:.2f} GiB allocated in all")
    servers = []
    try:
        for image in images:
            servers.append(bl.QemuNbd(image, workdir))
        uris = [s.uri for s in servers]
        outs = [out_dir / f"job-out-{i}.img" for i in range(len(images))]
        job = workdir / "bench-job.toml"
        job_file(job, uris, outs)
        cmds = commands(diskferry, args.diskferry_args, job, uris, outs)
        results = {t: bl.ToolResult(t, cmds[t]) for t in TOOLS}
        logs = scratch / "logs"
        logs.mkdir(exist_ok=True)
        disk = bl.disk_of(scratch)
        for rnd, tool, warmup in bl.schedule(list(TOOLS), args.runs):
            res = results[tool]
            if res.error:
                continue
            prepare(tool, outs, images[0].stat().st_size)
            log_path = logs / f"job-{tool}-{rnd}.log"
            run = bl.timed(res.command, log_path, disk)
            run.warmup, run.round = warmup, rnd
            label = "warm-up" if warmup else f"run {rnd}"
            if run.exit_code != 0:
                res.error = f"exit code {run.exit_code} on {label}: {bl.tail(log_path, 5)}"
                bl.log(f"job {tool} {label}: FAILED (exit {run.exit_code}); log {log_path}")
            else:
                first = not warmup and not any(not r.warmup for r in res.runs)
                if tool == "diskferry" and first and args.verify:
                    run.verified = all(
                        subprocess.run(["cmp", "-s", str(i), str(o)]).returncode == 0
                        for i, o in zip(images, outs)
                    )
                    if not run.verified:
                        res.error = f"a copy differs from its source on {label} (cmp)"
                bl.log(f"job {tool} {label}: {run.wall_s:.2f} s, cpu {run.cpu_s:.2f} s, "
                       f"rss {run.maxrss_kib / 1024:.0f} MiB" + (", cmp ok" if run.verified else ""))
            res.runs.append(run)
            for out in outs:
                out.unlink(missing_ok=True)
            bl.settle(args.settle)
    finally:
        for s in servers:
            s.stop()
    summaries = {t: bl.summarise(r, total_bytes, alloc_bytes) for t, r in results.items()}
    for tool, res in results.items():
        if tool != "diskferry":
            summaries[tool] |= bl.paired(results["diskferry"], res)
    return {
        "image": f"job {len(images)}x{size_text}",
        "path": ", ".join(str(i) for i in images),
        "size_bytes": total_bytes,
        "allocated_bytes": alloc_bytes,
        "server_command": servers[0].cmd if servers else [],
        "tools": summaries,
    }
