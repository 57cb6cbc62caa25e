"""A redis-server child process on 127.0.0.1, for `./dev serve` and for the tests.

One way to start Redis for both, so the tests run against the settings people run.
Persistence follows the durability level: `always` and `everysec` turn the append-only
file on with that fsync policy; `no` turns it off (a restart loses everything).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis


def free_port(preferred: int = 0) -> int:
    """`preferred` if it is free on 127.0.0.1, else any free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a Redis that speaks only TLS: its certificate and key, and the
    authority clients verify it with."""

    cert: Path
    key: Path
    ca: Path


class LocalRedis:
    def __init__(self, data_dir: str | Path, *, port: int = 0, durability: str = "always",
                 tls: TlsFiles | None = None) -> None:
        self.data_dir = Path(data_dir)
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
        # The gateway rewrites the append-only file after the end of day; Redis's own
        # rewrite (at 64 MB by default) would fork in the middle of trading.
        aof = ["--appendonly", "yes", "--appendfsync", self.durability,
               "--auto-aof-rewrite-min-size", "1gb"] \
            if self.durability != "no" else ["--appendonly", "no"]
        listen = ["--port", str(self.port)]
        if self.tls is not None:        # the TLS port only: a plain client gets nowhere
            listen = ["--port", "0", "--tls-port", str(self.port),
                      "--tls-cert-file", str(self.tls.cert.resolve()),
                      "--tls-key-file", str(self.tls.key.resolve()),
                      "--tls-ca-cert-file", str(self.tls.ca.resolve()),
                      "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(
            [binary, *listen, "--bind", "127.0.0.1", "--dir",
             str(self.data_dir.resolve()), "--save", "", "--logfile", "redis.log", *aof],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                try:
                    if client.ping():
                        return self.url
                except redis.exceptions.ConnectionError as exc:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = self.data_dir / "redis.log"
                        raise RuntimeError(f"redis-server did not start on port {self.port}: "
                                           f"{log.read_text()[-2000:] if log.exists() else ''}"
                                           ) from exc
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None
