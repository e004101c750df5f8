"""The source and its change for `scripts/bench-net --incremental`.

* The base: the real ext4 image (`truncate -s 8G fs.img && mkfs.ext4 -q -d
  /usr/share -F fs.img`, bench-local's cached `ext4` image), and the same
  content as a qcow2 with an (empty, enabled) dirty bitmap `b0`, cached.
* A change: random, non-overlapping, 4 KiB-aligned writes of 4–256 KiB of
  random bytes (each write its own bytes) until a fraction of the image
  (default 1 %) is rewritten, from a seed. It is applied to a raw copy of
  the base with pwrite and to a qcow2 copy through `qemu-io` (so the qcow2's
  bitmap records exactly those writes), and written out as a changed-areas
  file in the JSON shape of VMware's QueryChangedDiskAreas.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

from bench_common import bl

BITMAP = "b0"
KIB = 1024


def base_images(scratch: Path, size_text: str) -> tuple[Path, Path]:
    """(raw ext4 image, qcow2 of the same bytes with bitmap b0), cached."""
    raw = bl.make_image("ext4", bl.parse_size(size_text), size_text, scratch)
    qcow2 = scratch / f"{raw.stem}-{BITMAP}.qcow2"
    if not qcow2.exists():
        tmp = scratch / f".{qcow2.name}.tmp"
        tmp.unlink(missing_ok=True)
        bl.log(f"creating {qcow2} (cached for later runs)")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", "-f", "qcow2", str(tmp), BITMAP], check=True)
        tmp.rename(qcow2)
    return raw, qcow2


def fresh_copy(src: Path, dst: Path) -> None:
    """A sparse copy (holes stay holes)."""
    dst.unlink(missing_ok=True)
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def plan_writes(size_bytes: int, fraction: float, seed: int) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (offset, length) writes covering `fraction`
    of the image."""
    rng = random.Random(seed)
    want = int(size_bytes * fraction)
    taken: list[tuple[int, int]] = []
    total = 0
    blocks = size_bytes // (4 * KIB)
    while total < want:
        left_blocks = -(-(want - total) // (4 * KIB))
        length = min(rng.randint(1, 64), left_blocks) * 4 * KIB
        offset = rng.randrange(blocks) * 4 * KIB
        if offset + length > size_bytes:
            continue
        if any(offset < o + n and o < offset + length for o, n in taken):
            continue
        taken.append((offset, length))
        total += length
    return sorted(taken)


def merged(writes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(writes):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def write_changed_areas(path: Path, size_bytes: int, writes: list[tuple[int, int]]) -> None:
    """VMware's QueryChangedDiskAreas shape, one object for the whole disk."""
    areas = [{"start": o, "length": n} for o, n in merged(writes)]
    path.write_text(json.dumps({"startOffset": 0, "length": size_bytes, "changedArea": areas}) + "\n")


def apply(writes: list[tuple[int, int]], seed: int, raw: Path, qcow2: Path, workdir: Path) -> int:
    """The same random bytes written at the same places into the raw file
    (pwrite) and into the qcow2 (qemu-io, one pattern file per write);
    returns the bytes written."""
    pool = workdir / "change"
    shutil.rmtree(pool, ignore_errors=True)
    pool.mkdir()
    rng = random.Random(seed ^ 0x5EED)
    cmds = []
    fd = os.open(raw, os.O_WRONLY)
    try:
        for i, (off, n) in enumerate(writes):
            data = rng.randbytes(n)
            os.pwrite(fd, data, off)
            pattern = pool / f"{i}.bin"
            pattern.write_bytes(data)
            cmds.append(f"write -q -s {pattern} {off} {n}")
        os.fsync(fd)
    finally:
        os.close(fd)
    cmds.append("flush")
    res = subprocess.run(["qemu-io", "-f", "qcow2", str(qcow2)], input="\n".join(cmds) + "\nquit\n",
                         capture_output=True, text=True)
    if res.returncode != 0 or "error" in res.stdout.lower() or res.stderr.strip():
        raise RuntimeError(f"qemu-io failed ({res.returncode}): {res.stderr.strip() or res.stdout[-500:]}")
    shutil.rmtree(pool, ignore_errors=True)
    return sum(n for _, n in writes)


def dirty_bytes(uri: str) -> int | None:
    """What the source's bitmap marks dirty, by `nbdinfo --map`."""
    res = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{BITMAP}", uri],
                         capture_output=True, text=True)
    try:
        return sum(e["length"] for e in json.loads(res.stdout) if e.get("type", 0) & 1)
    except (ValueError, KeyError, TypeError):
        return None
