"""scripts/bench-net --link 1gbit,200mbit: the issue's slow link. A veth
pair between two network namespaces this script creates (and deletes at
the end, also on an error or Ctrl-C), the sender's end shaped by

    tc qdisc replace dev VETH root tbf rate RATE burst B latency 50ms

(B = max(256 KiB, a 250th of a second at the rate), so the bucket holds a
few GSO packets even at 1 Gbit/s; offloads stay as the kernel sets them
up) and BBR as the congestion control of both namespaces (the setting is
per namespace; what was set is recorded).

The source qemu-nbd stays on its Unix socket in this namespace (a path
socket works across network namespaces); the senders run in the sender
namespace (`ip netns exec`), the receivers in the receiver's:

  diskferry       diskferry send --compress auto (mutual TLS) to a
                  `diskferry serve` listening on the receiver's address;
  diskferry-none  the same with --compress none;
  nbdcopy-tcp     nbdcopy --flush -C 4 -T 4 to a writable qemu-nbd on TCP.

Per run also `wire_bytes`: what the sender's veth sent over the run, read
from /proc/net/dev inside the sender namespace. Before the tools, a plain
TCP stream (python sockets, no tool of ours) checks the shaped rate is
what arrives; it is logged and stored as the group's `link_check`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench_common import bl
from bench_net_image import NetToolResult, group, run_rounds, send_command, serve_target, summarise
from net_procs import netns_prefix
from net_receivers import DiskferryServe, QemuNbdTarget

log, fmt, tail = bl.log, bl.fmt, bl.tail
TOOLS = ("diskferry", "diskferry-none", "nbdcopy-tcp")
COMPRESS = {"diskferry": "auto", "diskferry-none": "none"}
RATE_UNITS = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}  # tc's bit rates are SI
CHECK_S = 2.0  # seconds of the plain-TCP rate check
CHECK_PORT = 5201


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--link", default="",
                    help="tbf-shaped veth between two network namespaces at these rates, e.g. 1gbit,200mbit: "
                         "diskferry (--compress auto), diskferry-none and nbdcopy-tcp over it "
                         "(scripts/lib/bench_link.py; needs root)")
    ap.add_argument("--link-image", default="ext4", help="the image sent over --link (default ext4)")


def configure(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Check --link's arguments; the image and the tools."""
    args.link_list = [x.strip().lower() for x in args.link.split(",") if x.strip()]
    try:
        args.link_bits = {x: rate_bits_per_s(x) for x in args.link_list}
    except ValueError as e:
        ap.error(f"--link: {e}")
    if args.link_image not in bl.ALL_IMAGES:
        ap.error(f"--link-image: one of {', '.join(bl.ALL_IMAGES)}")
    if os.geteuid() != 0:
        ap.error("--link creates network namespaces: run as root")
    missing = [prog for prog in ("ip", "tc", "ss") if shutil.which(prog) is None]
    if missing:
        ap.error(f"--link needs {', '.join(missing)}: apt-get install iproute2")
    args.image_list, args.tool_list = [args.link_image], list(TOOLS)


def rate_bits_per_s(text: str) -> int:
    """tc's rate spelling (1gbit, 200mbit) in bits per second."""
    for unit, mult in RATE_UNITS.items():
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * mult)
    raise ValueError(f"{text!r} is not a rate like 1gbit or 200mbit")


def sh(cmd: list[str]) -> str:
    """Run a set-up command; its failure (no privilege, no module) is the
    benchmark's failure, with the command's own message."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise RuntimeError(f"{' '.join(cmd)}: {e}") from e
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()}")
    return res.stdout


class LinkNet:
    """Two namespaces joined by a veth pair; deleted by close()."""

    def __init__(self) -> None:
        tag = f"dfb{os.getpid()}"
        self.ns_send, self.ns_recv = f"{tag}-send", f"{tag}-recv"
        self.veth_send, self.veth_recv = f"{tag}s", f"{tag}r"  # at most 15 characters
        net = f"10.213.{os.getpid() % 250}"
        self.addr_send, self.addr_recv = f"{net}.1", f"{net}.2"
        self.created: list[str] = []
        self.qdisc = ""

    def setup(self) -> dict:
        """Create the namespaces, the veth, the addresses; BBR in both."""
        for ns in (self.ns_send, self.ns_recv):
            sh(["ip", "netns", "add", ns])
            self.created.append(ns)
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "link", "add", self.veth_send, "netns", self.ns_send,
            "type", "veth", "peer", "name", self.veth_recv, "netns", self.ns_recv])
        for ns, dev, addr in ((self.ns_send, self.veth_send, self.addr_send),
                              (self.ns_recv, self.veth_recv, self.addr_recv)):
            sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
        if "bbr" not in Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split():
            subprocess.run(["modprobe", "tcp_bbr"], capture_output=True)
        cc = {}
        for ns in (self.ns_send, self.ns_recv):
            sh([*netns_prefix(ns), "sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr"])
            cc[ns] = sh([*netns_prefix(ns), "sysctl", "-n", "net.ipv4.tcp_congestion_control"]).strip()
            if cc[ns] != "bbr":
                raise RuntimeError(f"netns {ns} uses {cc[ns]}, not bbr")
        log(f"--link: netns {self.ns_send} ({self.veth_send} {self.addr_send}) <-> netns {self.ns_recv} "
            f"({self.veth_recv} {self.addr_recv}), congestion control {cc}")
        return {"netns": [self.ns_send, self.ns_recv], "veth": [self.veth_send, self.veth_recv],
                "addresses": [self.addr_send, self.addr_recv], "tcp_congestion_control": cc,
                "offloads": self.offloads()}

    def offloads(self) -> dict:
        """The sender veth's segmentation offloads (left as the kernel set
        them; only recorded, so a missing ethtool is noted, not fatal)."""
        if shutil.which("ethtool") is None:
            return {"note": "ethtool not installed: offloads not read (left as the kernel set them)"}
        try:
            out = sh([*netns_prefix(self.ns_send), "ethtool", "-k", self.veth_send])
        except (RuntimeError, OSError) as e:
            return {"error": str(e)}
        keep = ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload")
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())
                if k.strip() in keep}

    def shape(self, rate: str, rate_bits: int) -> dict:
        """tbf on the sender's veth at `rate`; the qdisc as tc shows it."""
        burst_bytes = max(256 * 1024, rate_bits // 8 // 250)
        cmd = ["tc", "-n", self.ns_send, "qdisc", "replace", "dev", self.veth_send, "root",
               "tbf", "rate", rate, "burst", str(burst_bytes), "latency", "50ms"]
        sh(cmd)
        self.qdisc = sh(["tc", "-n", self.ns_send, "qdisc", "show", "dev", self.veth_send]).strip()
        log(f"--link {rate}: {self.qdisc}")
        return {"tc_command": " ".join(cmd), "burst_bytes": burst_bytes, "qdisc": self.qdisc}

    def tx_bytes(self) -> int | None:
        """tx bytes of the sender's veth, from /proc/net/dev as the sender
        namespace sees it (this script's own /proc/net/dev is another
        namespace's)."""
        res = subprocess.run([*netns_prefix(self.ns_send), "cat", "/proc/net/dev"], capture_output=True, text=True)
        for line in res.stdout.splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == self.veth_send:
                return int(rest.split()[8])
        return None

    def check_rate(self, rate_bits: int) -> dict:
        """A plain TCP stream for CHECK_S seconds' worth of bytes at the
        shaped rate; the rate the receiver saw, from first byte to EOF."""
        total = int(rate_bits / 8 * CHECK_S)
        sink = ("import json,socket,time\n"
                f"s=socket.create_server(('{self.addr_recv}',{CHECK_PORT}))\n"
                "c,_=s.accept();n=0;t0=None\n"
                "while True:\n"
                " b=c.recv(1<<20)\n"
                " if t0 is None: t0=time.perf_counter()\n"
                " if not b: break\n"
                " n+=len(b)\n"
                "print(json.dumps({'bytes':n,'seconds':time.perf_counter()-t0}))\n")
        src = ("import socket\n"
               f"c=socket.create_connection(('{self.addr_recv}',{CHECK_PORT}))\n"
               f"buf=bytes(1<<20);left={total}\n"
               "while left>0:\n"
               " left-=c.send(buf[:min(left,len(buf))])\n"
               "c.close()\n")
        recv = subprocess.Popen([*netns_prefix(self.ns_recv), "python3", "-c", sink],
                                stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                res = subprocess.run([*netns_prefix(self.ns_recv), "ss", "-Hltn", f"sport = :{CHECK_PORT}"],
                                     capture_output=True, text=True)
                if res.stdout.strip():
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the rate check's receiver did not listen")
                time.sleep(0.05)
            sh([*netns_prefix(self.ns_send), "python3", "-c", src])
            out, _ = recv.communicate(timeout=CHECK_S * 20)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        got = json.loads(out)
        achieved = got["bytes"] * 8 / got["seconds"]
        check = {"tool": "python3 socket stream (plain TCP, BBR)", "bytes": got["bytes"],
                 "seconds": got["seconds"], "bits_per_s": achieved, "of_shaped": achieved / rate_bits}
        log(f"--link rate check: {achieved / 1e6:.0f} Mbit/s arrived over a link shaped to {rate_bits / 1e6:.0f} "
            f"Mbit/s ({check['of_shaped']:.0%})")
        if not 0.8 <= check["of_shaped"] <= 1.05:
            log(f"WARNING: the link does not carry its shaped rate (a busy machine, or the shaping failed); "
                f"the --link figures of {rate_bits / 1e6:.0f} Mbit/s are not the link's")
        return check

    def close(self) -> None:
        """Delete the namespaces (the veth pair goes with them)."""
        for ns in reversed(self.created):
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if res.returncode != 0:
                log(f"could not delete netns {ns}: {res.stderr.strip()} (delete it with `ip netns del {ns}`)")
        self.created.clear()


def _results(link: LinkNet, args, diskferry: Path, serve: DiskferryServe, peer: QemuNbdTarget,
             source_uri: str, name: str) -> dict[str, NetToolResult]:
    sender = netns_prefix(link.ns_send)
    results: dict[str, NetToolResult] = {}
    subst = {source_uri: "SRC_URI", f"{serve.host}:{serve.port}": f"{serve.host}:PORT",
             str(serve.tls): "TLS", str(serve.root): "ROOT", str(diskferry): "diskferry",
             link.ns_send: "NS_SEND", link.ns_recv: "NS_RECV"}
    for tool, compress in COMPRESS.items():
        cmd = send_command(diskferry, source_uri, name, serve, [*args.diskferry_args, "--compress", compress],
                           prefix=sender)
        res = NetToolResult(tool, cmd, receiver=" ".join(serve.cmd))
        res.display, res.display_receiver = " ".join(cmd), res.receiver
        for k, v in subst.items():
            res.display, res.display_receiver = res.display.replace(k, v), res.display_receiver.replace(k, v)
        results[tool] = res
    res = NetToolResult("nbdcopy-tcp", [*sender, "nbdcopy", "--flush", *args.nbdcopy_args, "SRC_URI",
                                        peer.uri_template()], receiver=peer.describe())
    res.display, res.display_receiver = " ".join(res.command), res.receiver
    for k, v in subst.items():
        res.display, res.display_receiver = res.display.replace(k, v), res.display_receiver.replace(k, v)
    results["nbdcopy-tcp"] = res
    return results


def bench(args, diskferry: Path, workdir: Path, scratch: Path) -> list[dict]:
    """One group per link rate, each its own alternating schedule."""
    kind = args.link_image
    image = bl.make_image(kind, bl.parse_size(args.size_map[kind]), args.size_map[kind], scratch)
    size_bytes, alloc_bytes = image.stat().st_size, image.stat().st_blocks * 512
    logs = scratch / "logs"
    logs.mkdir(exist_ok=True)
    link = LinkNet()
    groups: list[dict] = []
    serve: DiskferryServe | None = None
    peer: QemuNbdTarget | None = None
    try:
        setup = link.setup()
        serve = DiskferryServe(diskferry, workdir, scratch, logs, netns=link.ns_recv, host=link.addr_recv)
        peer = QemuNbdTarget("link-tcp", False, workdir, scratch, args.qemu_target_args,
                             host=link.addr_recv, netns=link.ns_recv)
        name = f"link-{kind}.img"
        for rate in args.link_list:
            shaping = link.shape(rate, args.link_bits[rate])
            check = link.check_rate(args.link_bits[rate])
            groups.append(_bench_link(rate, kind, image, size_bytes, alloc_bytes, args, diskferry, serve, peer,
                                      link, workdir, scratch, name)
                          | {"link_setup": setup | shaping, "link_check": check})
    finally:
        if peer is not None:
            peer.stop()
            peer.dst.unlink(missing_ok=True)
        if serve is not None:
            serve.stop()
            shutil.rmtree(serve.root, ignore_errors=True)
        link.close()
    return groups


def _bench_link(rate, kind, image, size_bytes, alloc_bytes, args, diskferry, serve, peer, link, workdir,
                scratch, name) -> dict:
    log(f"--link {rate}: {image.name}, size {size_bytes / 2**30:.2f} GiB, allocated {alloc_bytes / 2**30:.2f} GiB")
    source = bl.QemuNbd(image, workdir)
    results = _results(link, args, diskferry, serve, peer, source.uri, name)
    sender = netns_prefix(link.ns_send)

    def prepare(tool: str, res: NetToolResult, label: str):
        if tool in COMPRESS:
            return serve_target(serve, name, res, f"link {rate} {tool} {label}")
        try:
            peer.start(size_bytes)
        except (RuntimeError, OSError, ValueError) as e:
            res.error = f"target qemu-nbd: {e}"
            log(f"link {rate} {tool} {label}: {res.error}")
            return None
        return peer.dst, peer.pid, [*sender, "nbdcopy", "--flush", *args.nbdcopy_args, source.uri, peer.uri()]

    def after(tool: str) -> None:
        if tool not in COMPRESS:
            peer.stop()

    try:
        run_rounds(f"link-{rate}", image, results, args, bl.disk_of(scratch), scratch / "logs", prepare, after,
                   source.pid, wire_bytes=link.tx_bytes)
    finally:
        source.stop()
        (serve.root / name).unlink(missing_ok=True)
    return group(kind, image, size_bytes, alloc_bytes, source,
                 {t: summarise(r, size_bytes, alloc_bytes) for t, r in results.items()},
                 link=rate, link_bits_per_s=args.link_bits[rate])


def markdown_table(groups: list[dict], runs: int) -> str:
    """One row per link and tool; wire / alloc below 1 means compression
    saved bytes on the wire."""
    rows = [
        "| link | image | tool | runs | median s | min s | max s | GB/s (alloc) | wire MiB | wire / alloc "
        "| CPU s (sender) | CPU s (receiver) | CPU s (source qemu-nbd) | diskferry / tool |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in groups:
        df = g["tools"].get("diskferry", {})
        for tool, s in g["tools"].items():
            wire = s.get("wire_bytes_median")
            ratio = df["median_s"] / s["median_s"] if tool != "diskferry" and "median_s" in s and "median_s" in df \
                else None
            cells = [
                g["link"], g["image"], tool, "FAILED" if s.get("error") else f"{s.get('n', 0)}/{runs}",
                fmt(s.get("median_s")), fmt(s.get("min_s")), fmt(s.get("max_s")), fmt(s.get("gb_per_s_allocated")),
                fmt(None if wire is None else wire / 2**20, 1),
                fmt(None if wire is None else wire / g["allocated_bytes"]),
                fmt(s.get("cpu_s_median")), fmt(s.get("receiver_cpu_s_median")), fmt(s.get("source_cpu_s_median")),
                "—" if tool == "diskferry" else fmt(ratio),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
