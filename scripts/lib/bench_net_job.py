"""`scripts/bench-net --job`: several disks at once over the network.

Three contenders send the same N source disks (default 4: bench-local
--job's sparse-random images, seeds 1..N, each served read-only by its own
qemu-nbd on a Unix socket) over 127.0.0.1:

* `diskferry`: one `diskferry send --job` with every disk, to the one
  `diskferry serve` of the run (mutual TLS 1.3): one engine, one set of
  workers, one memory budget, a stream set per disk;
* `diskferry-seq`: the same disks one after another, one `diskferry send`
  each, to the same receiver;
* `nbdcopy-par`: one `nbdcopy --flush [--nbdcopy-args]` per disk, all
  started together, each into its own writable qemu-nbd on 127.0.0.1 TCP
  (the plaintext network peer of ../shared/design.md, as the nbdcopy-tcp
  row), each target restarted on a fresh sparse file per run.

Every diskferry run passes --restart and its targets are deleted first, so
each is a full copy. Rounds alternate as in bench-local; a run's time is
the wall time of the whole set, its sender CPU the sum over the sending
processes, its receiver CPU the sum over the receivers (the serve, or the N
qemu-nbd) and RSS the largest single process's peak. The first counted run
of each contender is checked disk by disk with `cmp`.
"""

from __future__ import annotations

import shlex
import statistics
import subprocess
from pathlib import Path

import bench_job
from bench_common import bl
from bench_net_image import last_json_event, timed_net
from net_receivers import QemuNbdTarget

TOOLS = ("diskferry", "diskferry-seq", "nbdcopy-par")
log, fmt, tail = bl.log, bl.fmt, bl.tail


def job_file(path: Path, uris: list[str], names: list[str]) -> None:
    lines = ['name = "bench-net"']
    for uri, name in zip(uris, names):
        lines += ["", "[[disk]]", f'source = "{uri}"', f'target = "{name}"']
    path.write_text("\n".join(lines) + "\n")


def diskferry_commands(diskferry: Path, serve, extra: list[str], job: Path,
                       uris: list[str], names: list[str]) -> dict[str, list[str]]:
    common = ["--to", f"127.0.0.1:{serve.port}", "--tls-dir", str(serve.tls), "--no-progress", "--restart",
              *extra]
    seq = " && ".join(shlex.join([str(diskferry), "send", u, "--target", n, *common])
                      for u, n in zip(uris, names))
    return {
        "diskferry": [str(diskferry), "send", "--job", str(job), *common],
        "diskferry-seq": ["bash", "-c", f"set -e; {seq}"],
    }


def nbdcopy_par_command(nbdcopy_args: list[str], uris: list[str], targets: list[str]) -> list[str]:
    """One nbdcopy per disk in the background, then wait for each: the
    command fails if any copy fails."""
    starts = "; ".join(
        f"{shlex.join(['nbdcopy', '--flush', *nbdcopy_args, u, t])} & p{i}=$!"
        for i, (u, t) in enumerate(zip(uris, targets))
    )
    waits = " && ".join(f"wait $p{i}" for i in range(len(uris)))
    return ["bash", "-c", f"{starts}; {waits}"]


def _prepare(tool, res, serve, peers, size_bytes) -> tuple[list[Path], list[int], list[str]] | None:
    """Targets, receiver pids and the command of one run (not timed)."""
    if tool == "nbdcopy-par":
        try:
            for p in peers:
                p.start(size_bytes)
        except (RuntimeError, OSError, ValueError) as e:
            res.error = f"target qemu-nbd: {e}"
            return None
        return [p.dst for p in peers], [p.pid for p in peers], []
    if not serve.alive():
        res.error = f"diskferry serve exited; log {serve.log_path}"
        return None
    return [], [serve.pid], res.command


def _verify(images: list[Path], outs: list[Path]) -> bool:
    return all(subprocess.run(["cmp", "-s", str(i), str(o)]).returncode == 0 for i, o in zip(images, outs))


def bench(args, diskferry: Path, serve, workdir: Path, scratch: Path, qemu_target_args: list[str]) -> dict:
    size_text = args.job_size
    size_bytes = bl.parse_size(size_text)
    images = bench_job.make_images(bl, args.job_disks, size_bytes, size_text, scratch)
    size_bytes = images[0].stat().st_size
    alloc_bytes = sum(i.stat().st_blocks * 512 for i in images)
    total_bytes = sum(i.stat().st_size for i in images)
    log(f"job: {len(images)} disks of {size_text}, {alloc_bytes / 2**30:.2f} GiB allocated in all")
    names = [f"bench-job-{i}.img" for i in range(len(images))]
    df_outs = [serve.root / n for n in names]
    peers = [QemuNbdTarget(f"job{i}", False, workdir, scratch, qemu_target_args) for i in range(len(images))]
    sources = []
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    disk = bl.disk_of(scratch)
    try:
        for image in images:
            sources.append(bl.QemuNbd(image, workdir))
        uris = [s.uri for s in sources]
        job = workdir / "bench-net-job.toml"
        job_file(job, uris, names)
        cmds = diskferry_commands(diskferry, serve, args.diskferry_args, job, uris, names)
        results = {t: bl.ToolResult(t, cmds.get(t, [])) for t in TOOLS}
        for rnd, tool, warmup in bl.schedule(list(TOOLS), args.runs):
            res = results[tool]
            if res.error:
                continue
            label = "warm-up" if warmup else f"run {rnd}"
            for out in df_outs:
                out.unlink(missing_ok=True)
            prepared = _prepare(tool, res, serve, peers, size_bytes)
            if prepared is None:
                log(f"job {tool} {label}: {res.error}")
                continue
            outs, receivers, cmd = prepared
            if tool == "nbdcopy-par":
                cmd = nbdcopy_par_command(args.nbdcopy_args, uris, [p.uri() for p in peers])
                res.command = nbdcopy_par_command(args.nbdcopy_args, uris,
                                                  [f"nbd://127.0.0.1:PORT_{i}" for i in range(len(peers))])
            else:
                outs = df_outs
            log_path = logs / f"net-job-{tool}-{rnd}.log"
            run = timed_net(cmd, log_path, disk, receivers)
            run.warmup, run.round = warmup, rnd
            if tool == "nbdcopy-par":
                for p in peers:
                    p.stop()  # after their CPU was read; every copy is flushed already
            else:
                run.done_event = last_json_event(log_path)
            if run.exit_code != 0:
                res.error = f"exit code {run.exit_code} on {label}: {tail(log_path, 5)}"
                log(f"job {tool} {label}: FAILED (exit {run.exit_code}); log {log_path}\n{tail(log_path)}")
            else:
                first = not warmup and not any(not r.warmup for r in res.runs)
                if first and args.verify:
                    run.verified = _verify(images, outs)
                    if not run.verified:
                        res.error = f"a copy differs from its source on {label} (cmp)"
                        log(f"job {tool} {label}: A COPY DIFFERS FROM ITS SOURCE")
                rcpu = "" if run.receiver_cpu_s is None else f", receiver cpu {run.receiver_cpu_s:.2f} s"
                log(f"job {tool} {label}: {run.wall_s:.2f} s, cpu {run.cpu_s:.2f} s{rcpu}, "
                    f"rss {run.maxrss_kib / 1024:.0f} MiB" + (", cmp ok" if run.verified else ""))
            res.runs.append(run)
            for out in outs:
                out.unlink(missing_ok=True)
            bl.settle(args.settle)
    finally:
        for s in sources:
            s.stop()
        for p in peers:
            p.stop()
            p.dst.unlink(missing_ok=True)
        for out in df_outs:
            out.unlink(missing_ok=True)
    placeholders = {str(job): "JOB.toml", f"127.0.0.1:{serve.port}": "127.0.0.1:PORT", str(serve.tls): "TLS",
                    str(serve.root): "ROOT", str(diskferry): "diskferry"}
    placeholders |= {s.uri: f"SRC_URI_{i}" for i, s in enumerate(sources)}
    return _summary(results, images, total_bytes, alloc_bytes, sources, peers, serve, placeholders)


def _summary(results, images, total_bytes, alloc_bytes, sources, peers, serve, placeholders) -> dict:
    summaries = {}
    for tool, res in results.items():
        s = bl.summarise(res, total_bytes, alloc_bytes)
        counted = res.counted()
        rcpu = [r.receiver_cpu_s for r in counted if r.receiver_cpu_s is not None]
        rrss = [r.receiver_peak_rss_kib for r in counted if r.receiver_peak_rss_kib is not None]
        if counted and not res.error:
            s["receiver_cpu_s_median"] = statistics.median(rcpu) if rcpu else None
            s["receiver_peak_rss_mib"] = max(rrss) / 1024 if rrss else None
        if tool != "diskferry":
            s |= bl.paired(results["diskferry"], res)
        summaries[tool] = s
    display = {}
    for tool, res in results.items():
        # A set of commands as the script bash runs, not re-quoted.
        text = res.command[2] if res.command[:2] == ["bash", "-c"] else shlex.join(res.command)
        for k, v in placeholders.items():
            text = text.replace(k, v)
        display[tool] = text
    receiver = " ".join(serve.cmd)
    for k, v in placeholders.items():
        receiver = receiver.replace(k, v)
    return {
        "image": f"job {len(images)}x{images[0].stat().st_size / 2**30:.0f}G",
        "path": ", ".join(str(i) for i in images),
        "size_bytes": total_bytes,
        "allocated_bytes": alloc_bytes,
        "server_command": sources[0].cmd if sources else [],
        "receivers": {"diskferry": receiver, "nbdcopy-par": peers[0].describe() if peers else ""},
        "display_commands": display,
        "tools": summaries,
    }


def markdown_table(job: dict, runs: int) -> str:
    rows = [
        "| contender | runs | median s | min s | max s | GB/s (alloc) | peak RSS MiB (sender) "
        "| peak RSS MiB (receiver) | CPU s (sender) | CPU s (receiver) | disk busy "
        "| diskferry / contender | paired ratio | rounds won |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    df = job["tools"].get("diskferry", {})
    for tool, s in job["tools"].items():
        ratio = None
        if tool != "diskferry" and "median_s" in s and "median_s" in df:
            ratio = df["median_s"] / s["median_s"]
        cells = [
            tool, "FAILED" if s.get("error") else f"{s.get('n', 0)}/{runs}",
            fmt(s.get("median_s")), fmt(s.get("min_s")), fmt(s.get("max_s")),
            fmt(s.get("gb_per_s_allocated")), fmt(s.get("peak_rss_mib"), 0),
            fmt(s.get("receiver_peak_rss_mib"), 0), fmt(s.get("cpu_s_median")),
            fmt(s.get("receiver_cpu_s_median")),
            "—" if s.get("disk_busy_median") is None else f"{s['disk_busy_median']:.0%}",
            "—" if tool == "diskferry" else fmt(ratio), fmt(s.get("paired_ratio_median")),
            f"{s['rounds_diskferry_faster']}/{s['paired_rounds']}" if "paired_rounds" in s else "—",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
