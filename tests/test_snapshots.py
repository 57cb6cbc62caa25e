"""Background snapshots: a forked child writes the state as of the fork, and only once
the journal holds it."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from matcher import protocol as wire
from matcher import snapshot
from matcher.engine import Engine
from service.journal import Journal, Keys
from service.localredis import LocalRedis
from service.snapshots import BackgroundSnapshots
from tests.conftest import run

KEYS = Keys("snap")


def submit(engine: Engine, journal: Journal, n: int) -> None:
    for i in range(n):
        out = engine.submit(1, "admin", wire.AddSegment(segment=f"S{engine.seq}-{i}",
                                                       core="C", tenor_days=30), i)
        assert out.entry is not None
        journal.append(out.entry, out.trades)


def test_the_child_writes_the_state_of_the_fork_once_the_journal_holds_it(
        redis_server: LocalRedis) -> None:
    async def scenario() -> tuple[int, str, bytes | None, bytes | None, int]:
        client = aioredis.Redis.from_url(redis_server.url)
        engine = Engine()
        journal = Journal(client, KEYS)          # not started: nothing is written yet
        submit(engine, journal, 50)
        forked_at, forked_hash = engine.seq, snapshot.state_hash(engine)
        background = BackgroundSnapshots(redis_server.url, KEYS)
        assert background.start(engine)
        assert not background.start(engine)      # one child at a time
        submit(engine, journal, 10)              # the parent moves on after the fork
        await asyncio.sleep(0.3)
        before_journal = await client.get(KEYS.snapshot)   # the child is still waiting
        journal.start()
        await journal.flush()
        await asyncio.to_thread(background.wait)
        after = await client.get(KEYS.snapshot)
        await journal.close()
        await client.aclose()
        assert background.newest_seq == forked_at and background.failed == 0
        return forked_at, forked_hash, before_journal, after, background.written

    forked_at, forked_hash, before_journal, after, written = run(scenario())
    assert before_journal is None, "a snapshot ahead of the journal was written"
    assert after is not None and written == 1
    restored = snapshot.restore(snapshot.load(after))
    assert restored.seq == forked_at == 50
    assert snapshot.state_hash(restored) == forked_hash


def test_reap_collects_a_finished_child_without_waiting(redis_server: LocalRedis) -> None:
    async def scenario() -> int | None:
        client = aioredis.Redis.from_url(redis_server.url)
        engine = Engine()
        journal = Journal(client, KEYS)
        journal.start()
        submit(engine, journal, 5)
        await journal.flush()
        background = BackgroundSnapshots(redis_server.url, KEYS)
        background.start(engine)
        deadline = time.monotonic() + 30
        while background.child is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            background.reap()
        await journal.close()
        await client.aclose()
        return background.child

    assert run(scenario()) is None


def test_a_waiting_child_does_not_hold_the_gateways_listening_port(
        redis_server: LocalRedis) -> None:
    import os
    import signal
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    engine = Engine()
    engine.submit(1, "admin", wire.AddSegment(segment="S", core="C", tenor_days=30), 0)
    background = BackgroundSnapshots(redis_server.url, KEYS, timeout=30)
    assert background.start(engine)            # waits: the journal will never hold seq 1
    try:
        listener.close()
        deadline = time.monotonic() + 5         # the child lets go as soon as it runs
        while True:
            again = socket.socket()
            try:
                again.bind(("127.0.0.1", port))  # EADDRINUSE while the child holds it
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                again.close()
    finally:
        assert background.child is not None
        os.kill(background.child, signal.SIGKILL)
        background.wait()
    assert background.failed == 1 and background.written == 0   # counted for /metrics
    assert background.newest_seq == 0


def test_a_snapshot_due_while_the_last_child_is_busy_is_skipped(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Not captured in the process (a stall), and never stored after an older child's:
    the next interval tries again."""
    import os
    import signal

    from matcher.participants import Directory
    from service.config import LimitsConfig
    from service.gateway import Gateway, system
    from service.metrics import Metrics

    async def scenario() -> tuple[bool, int, int]:
        client = aioredis.Redis.from_url(redis_server.url)
        journal = Journal(client, KEYS)           # not started: the child keeps waiting
        background = BackgroundSnapshots(redis_server.url, KEYS, timeout=30)
        gw = Gateway(Engine(), journal, Directory([]), LimitsConfig(), Metrics(),
                     snapshot_every=1, background=background)
        try:
            for n in range(3):
                gw.submit(system(), wire.AddSegment(segment=f"S{n}", core="C",
                                                    tenor_days=30), time.perf_counter())
            child_seq = background._child_seq
            return journal._snapshot is None, child_seq, gw.newest_snapshot()
        finally:
            assert background.child is not None
            os.kill(background.child, signal.SIGKILL)
            background.wait()
            await client.aclose()

    with caplog.at_level("WARNING", logger="matcher.gateway"):
        nothing_in_process, child_seq, newest = run(scenario())
    assert nothing_in_process                     # no capture rode the journal
    assert child_seq == 1 and newest == 0         # the first child's, not yet written
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped == ["snapshot at seq 2 skipped: the previous one is still being written",
                       "snapshot at seq 3 skipped: the previous one is still being written"]
