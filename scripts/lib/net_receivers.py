"""The receivers of scripts/bench-net: one `diskferry serve` for the whole
run (mutual TLS, or a second one in --insecure-plaintext), and writable
qemu-nbd targets on TCP (plain or TLS-PSK) for the nbdcopy peers,
restarted on a fresh file per run. Both listen on 127.0.0.1, or on an
address inside a network namespace of --link (bench_link.py)."""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from bench_common import bl
from net_procs import free_port, netns_prefix, stop_pid, wait_listening

log, tail = bl.log, bl.tail


class DiskferryServe:
    """One `diskferry serve` for the whole benchmark; targets under its root.

    `plaintext` runs it with --insecure-plaintext (no certificates; the
    senders say --insecure-plaintext too). `netns` and `host` put it in a
    network namespace on that address; its certificate then names `host`."""

    def __init__(self, diskferry: Path, workdir: Path, scratch: Path, logs: Path, *,
                 plaintext: bool = False, netns: str | None = None, host: str = "127.0.0.1"):
        self.diskferry = diskferry
        self.plaintext, self.netns, self.host = plaintext, netns, host
        tag = ("-plain" if plaintext else "") + (f"-{netns}" if netns else "")
        self.tls: Path | None = None
        if not plaintext:
            self.tls = workdir / f"df-tls{tag}"
            subprocess.run([str(diskferry), "certs", "init", str(self.tls), "--san", host], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.root = scratch / f"net-df-root{tag}"
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.cmd = [*netns_prefix(netns), str(diskferry), "serve", "--listen", f"{host}:0",
                    "--target-root", str(self.root),
                    *(["--insecure-plaintext"] if plaintext else ["--tls-dir", str(self.tls)])]
        self.log_path = logs / f"diskferry-serve{tag}.log"
        self._log = open(self.log_path, "wb")
        # Own session: a Ctrl-C reaches only this script, which then stops it.
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, start_new_session=True)
        self.pid = self.proc.pid
        line = self._first_line(timeout_s=15)
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"diskferry serve said {line!r}; log {self.log_path}:\n{tail(self.log_path)}")
        self.addr = line.removeprefix("listening on ").strip()
        self.port = int(self.addr.rsplit(":", 1)[1])
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        log(f"diskferry serve (pid {self.pid}) listening on {self.addr}, root {self.root}")

    def _first_line(self, timeout_s: float) -> str:
        buf = b""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return buf.decode(errors="replace") or "(nothing before the timeout)"
            chunk = os.read(fd, 4096)
            if not chunk:
                return buf.decode(errors="replace") or f"(exit {self.proc.wait()})"
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        self._log.write(rest)
        return line.decode(errors="replace")

    def _drain(self) -> None:
        try:
            for chunk in iter(lambda: os.read(self.proc.stdout.fileno(), 65536), b""):
                self._log.write(chunk)
        except (OSError, ValueError):
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class QemuNbdTarget:
    """A writable qemu-nbd on 127.0.0.1 TCP, optionally TLS-PSK, restarted per run."""

    def __init__(self, tag: str, tls: bool, workdir: Path, scratch: Path, extra: list[str], *,
                 host: str = "127.0.0.1", netns: str | None = None):
        self.tls = tls
        self.host, self.netns = host, netns
        self.dst = scratch / f"net-dst-{tag}.img"
        self.pidfile = workdir / f"dst-{tag}.pid"
        self.extra = list(extra)
        self.pid: int | None = None
        self.port = 0
        self.cmd: list[str] = []
        if tls:
            self.pskdir = workdir / "psk"  # one key for every TLS peer
            self.pskdir.mkdir(exist_ok=True)
            self.pskfile = self.pskdir / "keys.psk"
            if not self.pskfile.exists():
                # same as: printf 'alice:%s\n' "$(openssl rand -hex 32)" > psk/keys.psk
                fd = os.open(self.pskfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"alice:{secrets.token_hex(32)}\n")

    def uri(self) -> str:
        if self.tls:
            return f"nbds://alice@{self.host}:{self.port}/?tls-psk-file={self.pskfile}"
        return f"nbd://{self.host}:{self.port}"

    def uri_template(self) -> str:
        return (f"nbds://alice@{self.host}:PORT/?tls-psk-file=PSK" if self.tls
                else f"nbd://{self.host}:PORT")

    def _command(self, extra: list[str]) -> list[str]:
        cmd = [*netns_prefix(self.netns), "qemu-nbd", "-t", "-e", "4", "-f", "raw", *extra,
               "-b", self.host, "-p", str(self.port)]
        if self.tls:
            cmd += ["--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={self.pskdir}",
                    "--tls-creds", "tls0"]
        return cmd + ["--fork", "--pid-file", str(self.pidfile), str(self.dst)]

    def start(self, size_bytes: int) -> None:
        """Fresh, empty, sparse dst.img of the source's size, and a new server on it."""
        self.stop()
        self.dst.unlink(missing_ok=True)
        with open(self.dst, "wb") as f:
            f.truncate(size_bytes)
        self.pidfile.unlink(missing_ok=True)
        for attempt in range(5):
            self.port = free_port()
            self.cmd = self._command(self.extra)
            res = subprocess.run(self.cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if res.returncode != 0 and self.extra and ("cache" in res.stderr or "aio" in res.stderr):
                log(f"qemu-nbd refused {' '.join(self.extra)} ({res.stderr.strip()}); retrying without")
                self.extra = []
                continue
            if res.returncode == 0:
                break
            log(f"qemu-nbd failed to start (attempt {attempt + 1}): {res.stderr.strip()}")
        else:
            raise RuntimeError(f"qemu-nbd did not start: {' '.join(self.cmd)}")
        self.pid = int(self.pidfile.read_text().strip())
        wait_listening(self.port, host=self.host, netns=self.netns)

    def stop(self) -> None:
        stop_pid(self.pid)
        self.pid = None

    def describe(self) -> str:
        c = self._command(self.extra)
        c[c.index("-p") + 1] = "PORT"
        c[-3:] = ["--pid-file", "PID", "dst.img"]
        return " ".join(x.replace(str(self.pskdir), "PSKDIR") if self.tls else x for x in c)

