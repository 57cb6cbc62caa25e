"""Shared fixtures: a real redis-server per test, and the real service as a process.

Redis is started by the tests themselves on a free port with a throwaway data directory;
if redis-server is missing the fixture fails (never skips): `./dev test` installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from service.localredis import LocalRedis, free_port

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent

#: The test marketplace: two core enterprises, two tenors each.
SEGMENTS = [("DFM-30D", "DFM", 30), ("DFM-90D", "DFM", 90),
            ("SGCC-30D", "SGCC", 30), ("SGCC-90D", "SGCC", 90)]
#: participant id -> (name, role, key)
PARTICIPANTS = {
    1: ("Admin", "admin", "key-admin"),
    2: ("Platform", "platform", "key-platform"),
    11: ("Bank A", "funder", "key-f11"),
    12: ("Bank B", "funder", "key-f12"),
    13: ("Factor C", "funder", "key-f13"),
    21: ("SME X", "sme", "key-s21"),
    22: ("SME Y", "sme", "key-s22"),
}


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run one async scenario to completion from a plain test, with a deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    server = LocalRedis(tmp_path / "redis", durability="always")
    server.start()
    yield server
    server.stop()


def write_config(path: Path, redis_url: str, port: int, extra: str = "", *,
                 shard: str = "main",
                 segments: list[tuple[str, str, int]] = SEGMENTS) -> Path:
    lines = [
        "[server]", 'host = "127.0.0.1"', f"port = {port}",
        "metrics_cache_ms = 0",         # tests read a counter, act, and read it again
        "[redis]", f'url = "{redis_url}"', "max_retry_delay = 0.2", f'shard = "{shard}"',
        "[engine]", "snapshot_every = 1000",
        "[limits]", "book_interval_ms = 50",
    ]
    for seg_id, core, tenor in segments:
        lines += ["[[segments]]", f'id = "{seg_id}"', f'core = "{core}"', f"tenor_days = {tenor}"]
    for pid, (name, role, key) in PARTICIPANTS.items():
        lines += ["[[participants]]", f"id = {pid}", f'name = "{name}"', f'role = "{role}"',
                  f'key = "{key}"']
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class ServerProcess:
    """`matcher serve` in a child process, as an operator would run it."""

    def __init__(self, config: Path, port: int, log: Path, args: Sequence[str] = ()) -> None:
        self.config, self.port, self.log = config, port, log
        self.args = list(args)          # more of `matcher serve`'s options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> ServerProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--config", str(self.config),
                 *self.args],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.http}/health", timeout=1) as r:
                    if json.loads(r.read())["status"] == "ready":
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready: {self.log.read_text()[-3000:]}")

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{self.http}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture
def server(tmp_path: Path, redis_server: LocalRedis) -> Iterator[ServerProcess]:
    port = free_port()
    config = write_config(tmp_path / "matcher.toml", redis_server.url, port)
    proc = ServerProcess(config, port, tmp_path / "server.log").start()
    yield proc
    if proc.process is not None and proc.process.poll() is None:
        proc.kill()


@pytest.fixture
def start_server(tmp_path: Path, redis_server: LocalRedis,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ServerProcess]]:
    """A server with other [limits]: start_server(rate=2) sets MATCHER_LIMITS_RATE=2."""
    procs: list[ServerProcess] = []

    def start(**limits: object) -> ServerProcess:
        for name, value in limits.items():
            monkeypatch.setenv(f"MATCHER_LIMITS_{name.upper()}", str(value))
        port = free_port()
        config = write_config(tmp_path / "matcher.toml", redis_server.url, port)
        proc = ServerProcess(config, port, tmp_path / "server.log").start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.process is not None and proc.process.poll() is None:
            proc.kill()
