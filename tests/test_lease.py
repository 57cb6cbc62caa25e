"""One gateway writes a shard's journal (ADR 31): the writer lease and the write script's
fencing, against a real Redis and real `matcher serve` processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from matcher import protocol as wire
from service.journal import Journal, Keys, WriterReplaced
from service.lease import Lease, ShardTaken, holder_gone
from service.localredis import LocalRedis, free_port
from tests.conftest import ROOT, ServerProcess, run, write_config
from tests.test_service import F11, bid, bid_answer, line, session

KEYS = Keys("main")
OTHER_HOST = "another-host.example:4242:0badcafe"     # a live gateway elsewhere


def journal_state(url: str) -> tuple[int, Any, Any]:
    """What a start that writes nothing leaves as it was: the journal and the snapshot."""
    client = redis.Redis.from_url(url)
    try:
        return (client.xlen(KEYS.journal), client.xrevrange(KEYS.journal, count=1),
                client.get(KEYS.snapshot_seq))
    finally:
        client.close()


def serve(config: Path, env: dict[str, str],
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--config",
                           str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


async def bid_accepted(server: ServerProcess, client_id: str) -> dict[str, Any]:
    async with session(server, F11) as funder:
        await funder.ok(line("DFM"))
        return await funder.command(bid(client_id, "DFM-30D", 250, 1_000))


def test_a_second_gateway_on_the_shard_writes_nothing_and_the_first_goes_on(
        server: ServerProcess, redis_server: LocalRedis, tmp_path: Path) -> None:
    """A second `matcher serve` on the same shard journaled its `resume` and a snapshot,
    then failed to bind the first's port, and the first stopped for good on its next
    write (found in an audit); on another port both served."""
    assert run(bid_accepted(server, "b1"))["type"] == "accepted"
    before = journal_state(redis_server.url)
    # Another port: it waits a lease (1 s here) plus a renewal for the first's to lapse.
    other = write_config(tmp_path / "second.toml", redis_server.url, free_port())
    started = time.monotonic()
    done = serve(other, {"MATCHER_REDIS_WRITER_LEASE_S": "1"})
    assert done.returncode == 1, done.stderr
    assert "another gateway writes this shard's journal" in done.stderr
    assert f"{socket.gethostname()}:{server.process.pid}:" in done.stderr    # who holds it
    assert "waiting up to" in done.stderr and time.monotonic() - started >= 1.2
    # The first's port: refused at once, in one line, before anything is read.
    done = serve(server.config, {})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"matcher serve: {server.config}: server.port: cannot "
                                  f"listen on 127.0.0.1 port {server.port}")
    assert "Traceback" not in done.stderr
    assert journal_state(redis_server.url) == before
    assert run(bid_accepted(server, "b2"))["type"] == "accepted"
    assert server.get("/health")[0] == 200


def test_a_gateway_whose_lease_another_took_stops_at_once(
        server: ServerProcess, redis_server: LocalRedis) -> None:
    """In a quiet market too: its renewal finds the other holder, and its journal stops
    before it could write after the other (the write script would refuse it anyway)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set(KEYS.writer, OTHER_HOST, px=60_000)
    finally:
        client.close()
    before = journal_state(redis_server.url)
    deadline = time.monotonic() + 10            # renewed every 2 s
    while server.get("/health")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.get("/health")[0] == 503
    answer = run(bid_answer(server, "b1"))
    assert (answer["type"], answer["code"]) == ("rejected", "unavailable")
    assert journal_state(redis_server.url) == before
    log = server.log.read_text()
    assert f"another gateway ({OTHER_HOST}) holds this shard's writer lease" in log
    assert server.terminate() == 1              # its last writes could not be finished
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get(KEYS.writer) == OTHER_HOST.encode()     # not its own to free
    finally:
        client.close()


def test_a_killed_gateway_of_this_host_is_taken_over_at_once(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash and restart on one machine waits for no lease to lapse (60 s here); a
    shutdown lets it go."""
    monkeypatch.setenv("MATCHER_REDIS_WRITER_LEASE_S", "60")
    port = free_port()
    config = write_config(tmp_path / "m.toml", redis_server.url, port)
    first = ServerProcess(config, port, tmp_path / "first.log").start()
    assert run(bid_accepted(first, "b1"))["type"] == "accepted"
    first.kill()
    started = time.monotonic()
    second = ServerProcess(config, port, tmp_path / "second.log").start(timeout=30)
    try:
        assert time.monotonic() - started < 30
        assert (f"took over the journal's writer lease from {socket.gethostname()}:"
                f"{first.process.pid}:") in second.log.read_text()
        assert run(bid_accepted(second, "b2"))["type"] == "accepted"
        assert second.terminate() == 0
    finally:
        if second.process.poll() is None:
            second.kill()
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get(KEYS.writer) is None                   # released at shutdown
    finally:
        client.close()


def test_the_write_script_refuses_a_writer_another_holds_the_lease_for(
        redis_server: LocalRedis) -> None:
    """Fencing: the check is in the script, so a gateway that stalled past its lease
    cannot write after the one that took it. A lapsed lease (no key) does not refuse."""
    async def scenario() -> tuple[int, BaseException | None, int]:
        client = aioredis.Redis.from_url(redis_server.url)
        journal = Journal(client, KEYS, writer="me:1:aa")
        journal.start()
        entry = wire.JournalEntry(seq=1, ts=1, participant=0, command=wire.Resume())
        await journal.append(entry, [])                          # no lease: written
        written = await client.xlen(KEYS.journal)
        await client.set(KEYS.writer, OTHER_HOST)
        refused: BaseException | None = None
        try:
            await journal.append(wire.JournalEntry(seq=2, ts=2, participant=0,
                                                   command=wire.Resume()), [])
        except WriterReplaced as exc:
            refused = exc
        after = await client.xlen(KEYS.journal)
        await journal.close()
        await client.aclose()
        return written, refused, after

    written, refused, after = run(scenario())
    assert written == 1 and after == 1
    assert refused is not None and OTHER_HOST in str(refused)


def test_the_lease_is_taken_renewed_and_released_only_by_its_holder(
        redis_server: LocalRedis) -> None:
    async def scenario() -> list[Any]:
        client = aioredis.Redis.from_url(redis_server.url)
        # Another live process of this host (this one's own pid would count as gone).
        mine = Lease(client, KEYS.writer, f"{socket.gethostname()}:{os.getppid()}:aa",
                     ttl_s=5)
        theirs = Lease(client, KEYS.writer, OTHER_HOST, ttl_s=5)
        await mine.acquire(wait_s=0)
        seen: list[Any] = [await theirs.renew(), await mine.renew()]
        try:
            await theirs.acquire(wait_s=0.3)
        except ShardTaken as exc:
            seen.append(str(exc))
        await theirs.release()                      # not its own: nothing happens
        seen.append(await client.get(KEYS.writer) == mine.token.encode())
        await mine.release()
        seen.append(await client.get(KEYS.writer))
        await client.aclose()
        return seen

    taken_by_mine, renewed, refused, still_mine, released = run(scenario())
    assert taken_by_mine is not None and renewed is None
    assert f"held by {socket.gethostname()}:{os.getppid()}:aa" in refused
    assert still_mine and released is None


def test_a_holder_is_gone_only_if_it_was_a_process_of_this_host_that_ended() -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname()
    assert holder_gone(f"{host}:{done.stdout.strip()}:00")        # ended
    assert holder_gone(f"{host}:{os.getpid()}:00")               # this pid, an earlier life
    assert not holder_gone(f"{host}:{os.getppid()}:00")          # running
    assert not holder_gone(f"another-{host}:{done.stdout.strip()}:00")
    assert not holder_gone("garbage")
