"""CPU seconds per GiB per side, the projection to bigger appliances, and
the memory table, from net.json's dense image (incompressible, so no tool
saves work by compressing), local.json and sparse.json.

The projection is arithmetic on measured figures, labelled as such: if a
side spends C CPU seconds per GiB, N cores carry N / C GiB/s on that side,
assuming linear scaling per core (no lock, memory-bandwidth or NIC-queue
limit) — which a 2-core machine cannot check."""

from __future__ import annotations

import math

from report_data import GIB, f2, gib, ran

# The tools of the CPU table, in order, with what they are.
CPU_TOOLS = {
    "diskferry": "diskferry TLS",
    "diskferry-plain": "diskferry plaintext",
    "nbdcopy-tcp": "nbdcopy + qemu-nbd TCP",
    "nbdcopy-tls": "nbdcopy + qemu-nbd TLS",
}
CORES = (4, 8, 16)
# Link payload rates: 10 and 25 Gbit/s in GiB/s (10e9 / 8 / 2^30 = 1.164).
LINKS_GIB_S = {"10 Gbit/s": 10e9 / 8 / GIB, "25 Gbit/s": 25e9 / 8 / GIB}
ADVERTISED_GIB_S = 3.2


def dense_group(net: dict) -> dict | None:
    for g in net.get("images", []):
        if g.get("image") == "dense":
            return g
    return None


def per_gib(net: dict) -> dict[str, dict[str, float | None]]:
    """{tool: {sender, receiver, source}} CPU seconds per GiB of data moved."""
    g = dense_group(net)
    if g is None:
        return {}
    data_gib = (g.get("allocated_bytes") or g["size_bytes"]) / GIB
    out = {}
    for tool in CPU_TOOLS:
        s = g.get("tools", {}).get(tool, {})
        if not ran(s):
            continue
        out[tool] = {side: (None if s.get(key) is None else s[key] / data_gib)
                     for side, key in (("sender", "cpu_s_median"), ("receiver", "receiver_cpu_s_median"),
                                       ("source", "source_cpu_s_median"))}
    return out


def cores_for(rate_gib_s: float, cpu_s_per_gib: float | None) -> int | None:
    return None if not cpu_s_per_gib else math.ceil(rate_gib_s * cpu_s_per_gib)


def projection_section(net: dict | None) -> list[str]:
    """The CPU table, the per-core projection and the NIC/3.2 GiB/s lines."""
    if not net:
        return ["Not measured: docs/bench/results/net.json is missing."]
    table = per_gib(net)
    if not table:
        return ["Not measured: net.json has no dense image with the CPU tools."]
    g = dense_group(net)
    out = [f"Measured: CPU seconds (user + sys) per GiB on the dense {gib(g['size_bytes'])} image "
           f"(incompressible), median of {net.get('config', {}).get('runs', '?')} round(s). The source qemu-nbd "
           f"serves every tool the same way and is shown apart.", "",
           "| tool | sender s/GiB | receiver s/GiB | source qemu-nbd s/GiB | "
           + " | ".join(f"{n} cores, projected GiB/s (sender / receiver)" for n in CORES) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(CORES)]
    for tool, c in table.items():
        cells = [CPU_TOOLS[tool], f2(c["sender"], 3), f2(c["receiver"], 3), f2(c["source"], 3)]
        for n in CORES:
            cells.append(" / ".join(f2(n / c[side]) if c[side] else "—" for side in ("sender", "receiver")))
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "**Projection, not a measurement** (linear scaling per core assumed; per side, the source "
            "qemu-nbd not counted): cores at which the NIC, not the CPU, becomes the limit:", "",
            "| tool | " + " | ".join(f"{k} ({v:.3f} GiB/s): sender / receiver cores" for k, v in LINKS_GIB_S.items())
            + " |", "|---|" + "---:|" * len(LINKS_GIB_S)]
    for tool, c in table.items():
        cells = [CPU_TOOLS[tool]]
        for rate in LINKS_GIB_S.values():
            cells.append(" / ".join(str(cores_for(rate, c[side]) or "—") for side in ("sender", "receiver")))
        out.append("| " + " | ".join(cells) + " |")
    df = table.get("diskferry")
    if df:
        with_source = (df["sender"] + df["source"]) if df["sender"] and df["source"] else None
        out += ["", f"{ADVERTISED_GIB_S} GiB/s with TLS (what products of this kind advertise) would take diskferry "
                f"**{cores_for(ADVERTISED_GIB_S, df['sender']) or '?'} sender cores and "
                f"{cores_for(ADVERTISED_GIB_S, df['receiver']) or '?'} receiver cores** by this projection "
                f"({cores_for(ADVERTISED_GIB_S, with_source) or '?'} on the sender with the source NBD server's "
                "share counted)."]
    return out


def memory_rows(docs: dict[str, dict]) -> list[tuple[str, str, float | None, float | None]]:
    """(what, tool, MiB on the small disk, MiB on the large sparse disk):
    copy and both ends of send, diskferry and nbdcopy."""
    def pick(doc: str, group: str, tool: str, key: str) -> float | None:
        for g in docs.get(doc, {}).get("images", []):
            if g.get("image") == group:
                s = g.get("tools", {}).get(tool, {})
                return s.get(key) if ran(s) else None
        return None

    return [
        ("copy", "diskferry", pick("local", "dense", "diskferry", "peak_rss_mib"),
         pick("sparse", "sparse", "diskferry-copy", "peak_rss_mib")),
        ("send: sender", "diskferry", pick("net", "dense", "diskferry", "peak_rss_mib"),
         pick("sparse", "sparse", "diskferry-send", "peak_rss_mib")),
        ("send: receiver (serve)", "diskferry", pick("net", "dense", "diskferry", "receiver_peak_rss_mib"),
         pick("sparse", "sparse", "diskferry-send", "receiver_peak_rss_mib")),
        ("copy", "nbdcopy", pick("local", "dense", "nbdcopy", "peak_rss_mib"),
         pick("sparse", "sparse", "nbdcopy-copy", "peak_rss_mib")),
        ("send: sender", "nbdcopy-tcp", pick("net", "dense", "nbdcopy-tcp", "peak_rss_mib"),
         pick("sparse", "sparse", "nbdcopy-tcp", "peak_rss_mib")),
        ("send: receiver (qemu-nbd)", "nbdcopy-tcp", pick("net", "dense", "nbdcopy-tcp", "receiver_peak_rss_mib"),
         pick("sparse", "sparse", "nbdcopy-tcp", "receiver_peak_rss_mib")),
    ]


def sizes(docs: dict[str, dict]) -> tuple[str, str]:
    """Column heads: the small dense disk's and the large sparse disk's size."""
    def size_of(doc: str, group: str) -> str:
        for g in docs.get(doc, {}).get("images", []):
            if g.get("image") == group:
                return gib(g["size_bytes"])
        return "?"
    dense = size_of("net", "dense")
    return f"dense {dense if dense != '?' else size_of('local', 'dense')}", f"sparse {size_of('sparse', 'sparse')}"


def memory_section(docs: dict[str, dict]) -> list[str]:
    small, large = sizes(docs)
    out = [f"| peak RSS, MiB | tool | {small} | {large} | growth |", "|---|---|---:|---:|---:|"]
    for what, tool, a, b in memory_rows(docs):
        growth = f2(b - a, 0) if a is not None and b is not None else "—"
        out.append(f"| {what} | {tool} | {f2(a, 0)} | {f2(b, 0)} | {growth} |")
    return out
