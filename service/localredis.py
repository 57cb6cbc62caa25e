"""A redis-server child process on 127.0.0.1, for `./dev serve` and for the tests.

One way to start Redis for both, so the tests run against the settings people run.
Persistence follows the durability level: `always` and `everysec` turn the append-only
file on with that fsync policy; `no` turns it off and keeps only what Redis writes when
it is stopped (a crash of Redis, or a power cut, loses everything since it started).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

log = logging.getLogger("matcher.localredis")


def free_port(preferred: int = 0) -> int:
    """`preferred` if it is free on 127.0.0.1, else any free port. With SO_REUSEADDR, as
    Redis binds: a port whose last connections wait in TIME_WAIT (a Redis stopped a
    moment ago) is free to it, and must not send the next start to another port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _running(pid: int) -> bool:
    """Not ended: a process that ended but that its parent has not yet waited for (a
    zombie, state Z) holds no port and no file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a Redis that speaks only TLS: its certificate and key, and the
    authority clients verify it with."""

    cert: Path
    key: Path
    ca: Path


class LocalRedis:
    def __init__(self, data_dir: str | Path, *, port: int = 0, durability: str = "always",
                 tls: TlsFiles | None = None, prefer_port: int | None = None) -> None:
        """`prefer_port`: that port if it is free at `start`, else any; chosen once a
        redis-server left running on the data directory is stopped (chosen before, a
        restart after a crash found the port still the orphan's, and moved to another:
        the operator's tools then pointed at nothing; found in an audit)."""
        self.data_dir = Path(data_dir)
        self.prefer_port = prefer_port
        self.port = port or free_port()
        self.durability = durability
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            ca = quote(str(self.tls.ca.resolve()))
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `./dev setup`, which "
                               "installs it with apt-get")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_orphan()
        if self.prefer_port is not None:
            self.port = free_port(self.prefer_port)
        # The gateway rewrites the append-only file after the end of day; Redis's own
        # rewrite (at 64 MB by default) would fork in the middle of trading.
        # `no`: no append-only file, but a save point that never falls due in a day, so
        # that Redis writes its data set when it is stopped (SIGTERM, by us or, for one
        # a killed gateway left, by the next start) and loads it again: a planned
        # restart keeps the market, as with the other levels.
        aof = ["--appendonly", "yes", "--appendfsync", self.durability,
               "--auto-aof-rewrite-min-size", "1gb", "--save", ""] \
            if self.durability != "no" else ["--appendonly", "no",
                                             "--save", "86400 2000000000"]
        listen = ["--port", str(self.port)]
        if self.tls is not None:        # the TLS port only: a plain client gets nowhere
            listen = ["--port", "0", "--tls-port", str(self.port),
                      "--tls-cert-file", str(self.tls.cert.resolve()),
                      "--tls-key-file", str(self.tls.key.resolve()),
                      "--tls-ca-cert-file", str(self.tls.ca.resolve()),
                      "--tls-auth-clients", "no"]
        # Its own process group: a Ctrl-C at the terminal is the gateway's to handle,
        # which then finishes its journal writes and snapshot before it stops Redis.
        self.process = subprocess.Popen(
            [binary, *listen, "--bind", "127.0.0.1", "--dir",
             str(self.data_dir.resolve()), "--logfile", "redis.log",
             "--pidfile", str(self._pidfile.resolve()), *aof],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                try:
                    if client.ping():
                        return self.url
                except redis.exceptions.BusyLoadingError:
                    # Loading its append-only file (a large one takes a while): not
                    # stuck, so the wait goes on as long as it is alive.
                    deadline = time.monotonic() + timeout
                    if self.process.poll() is not None:
                        self._failed_to_start(None)
                except redis.exceptions.ConnectionError as exc:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        self._failed_to_start(exc)
                time.sleep(0.02)
        finally:
            client.close()

    @property
    def _pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def _failed_to_start(self, exc: Exception | None) -> None:
        self.stop()                       # not left running on the data directory
        log_file = self.data_dir / "redis.log"
        tail = log_file.read_text()[-2000:] if log_file.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}") from exc

    def _stop_orphan(self) -> None:
        """Stop a redis-server still running on this data directory: one a gateway that
        was killed left behind (it had no chance to stop it). Two on one append-only
        file would both write it. SIGTERM makes Redis write and sync it, then exit."""
        try:
            pid = int(self._pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" not in cmdline:
            return                        # the pid is someone else's now
        log.warning("a redis-server (pid %d) was still running on %s, left by a gateway "
                    "that did not stop it: stopping it first", pid, self.data_dir)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None
