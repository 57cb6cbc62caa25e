"""The platform's consumer of the fill stream (`service.platform`) against a real Redis:
trades written by a Journal reach the handler once each, in order, across a consumer that
dies mid-way (unacknowledged entries come back, acknowledged ones do not), across a
take-over by another consumer, and when the group re-delivers what was handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from matcher import protocol as wire
from service.journal import trade_fields
from service.localredis import LocalRedis, free_port
from service.platform import FillConsumer, describe
from tests.conftest import ROOT, run
from tests.test_journal import KEYS, Driver, connect, write_trades

GROUP = "platform"


class Crash(Exception):
    """The consumer process dying in the middle of handling a trade."""


async def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def pending_ids(client: aioredis.Redis, consumer: str | None = None) -> list[str]:
    rows = await client.xpending_range(KEYS.fills, GROUP, min="-", max="+", count=10_000,
                                       consumername=consumer)
    return [row["message_id"].decode() for row in rows]


def test_consumed_exactly_once_across_a_consumer_restart(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        driver = Driver(seed=21)
        await write_trades(redis_server, driver, 1500)
        assert len(driver.trades) > 150
        reader = connect(redis_server)
        store: dict[str, wire.Trade] = {}          # the platform's store: keyed by trade_id
        delivered_a: list[str] = []

        def handler_a(trade: wire.Trade) -> None:
            if len(delivered_a) == 60:
                raise Crash                        # dies while handling the 61st trade
            delivered_a.append(trade.trade_id)
            store[trade.trade_id] = trade

        a = FillConsumer(reader, handler_a, KEYS, group=GROUP, consumer="c1", count=25,
                         block_ms=100)
        with pytest.raises(Crash):
            await asyncio.wait_for(a.run(), 10)
        ids = [t.trade_id for t in driver.trades]
        assert delivered_a == ids[:60]
        # read 25 at a time: the 61st..75th were delivered to c1 and not acknowledged
        assert await pending_ids(reader) == ids[60:75]

        # the consumer restarts (same name) while the engine keeps trading
        delivered_b: list[str] = []

        async def handler_b(trade: wire.Trade) -> None:
            delivered_b.append(trade.trade_id)
            assert trade.trade_id not in store, f"{trade.trade_id} handled twice"
            store[trade.trade_id] = trade

        b = FillConsumer(reader, handler_b, KEYS, group=GROUP, consumer="c1", count=25,
                         block_ms=100)
        stop = asyncio.Event()
        task = asyncio.create_task(b.run(stop))
        await write_trades(redis_server, driver, 1500)
        assert len(driver.trades) > len(ids) + 150
        await wait_until(lambda: len(store) >= len(driver.trades) or task.done())
        stop.set()
        await asyncio.wait_for(task, 5)
        all_ids = [t.trade_id for t in driver.trades]
        assert delivered_b == all_ids[60:]        # the unacked first, in order; no acked one
        assert delivered_a + delivered_b == all_ids
        assert list(store.values()) == driver.trades
        assert (b.handled, b.duplicates) == (len(all_ids) - 60, 0)
        assert await pending_ids(reader) == []
        await reader.aclose()
    run(scenario())


def test_a_handler_that_fails_with_an_os_error_stops_the_consumer(
        redis_server: LocalRedis) -> None:
    """The handler's `OSError` (the platform's database down) is the handler's: the
    consumer stops with it and leaves the trade pending, as for any other error. It was
    taken for Redis gone and retried for ever, blaming the fill stream (found in an
    audit)."""
    async def scenario() -> None:
        driver = Driver(seed=22)
        await write_trades(redis_server, driver, 500)
        assert driver.trades
        reader = connect(redis_server)
        calls: list[str] = []

        def database_down(trade: wire.Trade) -> None:
            calls.append(trade.trade_id)
            try:
                raise TimeoutError("no answer on 5432")
            except TimeoutError as cause:
                raise ConnectionRefusedError("the platform's database is down") from cause

        consumer = FillConsumer(reader, database_down, KEYS, group=GROUP, consumer="c1",
                                count=10, block_ms=100)
        with pytest.raises(ConnectionRefusedError, match="database is down") as stopped:
            await asyncio.wait_for(consumer.run(), 10)
        assert isinstance(stopped.value.__cause__, TimeoutError)      # its own, kept
        assert calls == [driver.trades[0].trade_id] and consumer.handled == 0
        assert (await pending_ids(reader))[0] == driver.trades[0].trade_id
        await reader.aclose()
    run(scenario())


def test_the_consumer_waits_out_a_failover_and_a_redis_that_refuses_for_a_while(
        redis_server: LocalRedis) -> None:
    """Waiting in its blocking read when its Redis becomes a replica, the consumer is
    answered UNBLOCKED, then READONLY; over `maxmemory`, OOM. It stopped on each (found
    in review); it now waits them out as the journal does, and takes the fills written
    once Redis is a master again."""
    async def scenario() -> None:
        driver = Driver(seed=25)
        await write_trades(redis_server, driver, 400)
        reader = connect(redis_server)
        admin = connect(redis_server)
        got: list[str] = []
        consumer = FillConsumer(reader, lambda t: got.append(t.trade_id), KEYS,
                                group=GROUP, consumer="c1", count=50, block_ms=2000,
                                max_retry_delay=0.2)
        task = asyncio.create_task(consumer.run())
        try:
            await wait_until(lambda: len(got) == len(driver.trades))
            await asyncio.sleep(0.3)                      # in its blocking read
            nowhere = str(free_port())
            await admin.execute_command("REPLICAOF", "127.0.0.1", nowhere)
            await asyncio.sleep(1.0)
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await admin.config_set("maxmemory", "1")
            await asyncio.sleep(1.0)
            await admin.config_set("maxmemory", "0")
            assert not task.done(), task
            before = len(driver.trades)
            await write_trades(redis_server, driver, 400)
            assert len(driver.trades) > before
            await wait_until(lambda: len(got) == len(driver.trades) or task.done())
            assert got == [t.trade_id for t in driver.trades] and not task.done()
            # A consumer started while Redis is over `maxmemory` still drains the stream:
            # creating the group is a write Redis refuses, reading and acknowledging are
            # not (found in review).
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            before = len(driver.trades)
            await write_trades(redis_server, driver, 400)
            await admin.config_set("maxmemory", "1")
            late = FillConsumer(reader, lambda t: got.append(t.trade_id), KEYS,
                                group=GROUP, consumer="c2", count=50, block_ms=200,
                                max_retry_delay=0.2)
            task = asyncio.create_task(late.run())
            await wait_until(lambda: len(got) == len(driver.trades) or task.done())
            assert got == [t.trade_id for t in driver.trades] and len(got) > before
            assert not task.done(), task
        finally:
            await admin.config_set("maxmemory", "0")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await reader.aclose()
            await admin.aclose()
    run(scenario())


async def crash_after(reader: aioredis.Redis, got: list[str], handled: int, *,
                      count: int) -> None:
    """Consumer c1 handles `handled` trades into `got`, then dies on the next, holding
    the rest of what it read (`count` at a time) unacknowledged."""
    def dies(trade: wire.Trade) -> None:
        if len(got) == handled:
            raise Crash
        got.append(trade.trade_id)

    c1 = FillConsumer(reader, dies, KEYS, group=GROUP, consumer="c1", count=count,
                      block_ms=100)
    with pytest.raises(Crash):
        await asyncio.wait_for(c1.run(), 10)


def test_another_consumer_takes_over_a_dead_ones_entries(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        driver = Driver(seed=22)
        await write_trades(redis_server, driver, 1000)
        ids = [t.trade_id for t in driver.trades]
        reader = connect(redis_server)
        got: list[str] = []
        await crash_after(reader, got, 40, count=30)
        assert await pending_ids(reader, "c1") == ids[40:60]
        await asyncio.sleep(0.3)                       # c1 has been silent for 300 ms

        c2 = FillConsumer(reader, lambda t: got.append(t.trade_id), KEYS, group=GROUP,
                          consumer="c2", count=30, block_ms=100, claim_idle_ms=200)
        stop = asyncio.Event()
        task = asyncio.create_task(c2.run(stop))
        await wait_until(lambda: len(got) >= len(ids) or task.done())
        stop.set()
        await asyncio.wait_for(task, 5)
        assert got == ids                              # c1's leftovers first, then the rest
        assert await pending_ids(reader) == []
        await reader.aclose()
    run(scenario())


def test_a_dead_consumers_entries_are_taken_over_while_fills_keep_coming(
        redis_server: LocalRedis) -> None:
    """Under steady traffic a poll is never empty: the take-over must not wait for a
    quiet moment, or a dead consumer's fills stay pending (and held back from
    retention) for as long as the market is busy."""
    async def scenario() -> None:
        driver = Driver(seed=23)
        await write_trades(redis_server, driver, 300)
        reader = connect(redis_server)
        got: list[str] = []
        await crash_after(reader, got, 10, count=20)
        left = await pending_ids(reader, "c1")
        assert left
        stop = asyncio.Event()

        async def market() -> None:                     # trades every few milliseconds
            while not stop.is_set():
                await write_trades(redis_server, driver, 40)

        c2 = FillConsumer(reader, lambda t: got.append(t.trade_id), KEYS, group=GROUP,
                          consumer="c2", count=20, block_ms=100, claim_idle_ms=200)
        tasks = [asyncio.create_task(market()), asyncio.create_task(c2.run(stop))]
        try:
            await wait_until(lambda: set(left) <= set(got), timeout=3)
            assert not any(t.done() for t in tasks)     # while the market still trades
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert await pending_ids(reader, "c1") == []
        await reader.aclose()
    run(scenario())


def test_redelivered_trades_are_dropped_by_trade_id(redis_server: LocalRedis) -> None:
    """The group is rewound (XGROUP SETID 0, as after restoring an older Redis): every
    entry comes again, and none reaches the handler a second time."""
    async def scenario() -> None:
        driver = Driver(seed=23)
        await write_trades(redis_server, driver, 800)
        reader = connect(redis_server)
        got: list[str] = []
        consumer = FillConsumer(reader, lambda t: got.append(t.trade_id), KEYS, group=GROUP,
                                block_ms=100)
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop))
        n = len(driver.trades)
        await wait_until(lambda: len(got) >= n or task.done())
        await reader.xgroup_setid(KEYS.fills, GROUP, id="0")
        await wait_until(lambda: consumer.duplicates >= n or task.done())
        stop.set()
        await asyncio.wait_for(task, 5)
        assert got == [t.trade_id for t in driver.trades]
        assert (consumer.handled, consumer.duplicates) == (n, n)
        assert await pending_ids(reader) == []
        await reader.aclose()
    run(scenario())


# --- the console: `python -m service.platform`, killed with SIGKILL -------------------


def start_console(redis_server: LocalRedis, log: Path) -> subprocess.Popen[str]:
    with open(log, "a") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "service.platform", "--redis-url", redis_server.url,
             "--group", GROUP, "--consumer", "c1", "--block-ms", "100"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_lines(proc: subprocess.Popen[str], enough: Callable[[list[str]], bool],
               timeout: float) -> list[str]:
    """Read stdout lines until `enough(lines)`, and not one line more (the rest stays in
    the pipe: once the pipe is full, the console blocks on its next print)."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str] = queue.Queue()
    asked = threading.Semaphore(0)           # one release: read one line
    quit_reader = threading.Event()

    def reader() -> None:
        while not quit_reader.is_set():
            if not asked.acquire(timeout=0.1):
                continue
            line = stdout.readline()
            lines.put(line)
            if not line:
                return

    threading.Thread(target=reader, daemon=True).start()
    got: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while not enough(got):
            asked.release()
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if not line:
                break
            got.append(line)
    finally:
        quit_reader.set()
    return got


def trade_ids(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in lines if line.endswith("\n")]


def test_console_killed_mid_way_resumes_with_what_it_had_not_acknowledged(
        redis_server: LocalRedis, tmp_path: Path) -> None:
    driver = Driver(seed=24)
    run(write_trades(redis_server, driver, 4000))
    first = [t.trade_id for t in driver.trades]
    assert len(first) > 800                # more than a pipe holds: the console blocks

    console = start_console(redis_server, tmp_path / "platform.log")
    try:
        lines = read_lines(console, lambda got: len(got) >= 150, timeout=20)
        # unread, the pipe fills and the console blocks in a print: inside the handler,
        # its entry and the rest of its read unacknowledged
        time.sleep(1.0)
        console.send_signal(signal.SIGKILL)
        console.wait(10)
        assert console.stdout is not None
        lines += console.stdout.read().splitlines(keepends=True)   # printed before the kill
    finally:
        if console.poll() is None:
            console.kill()
    run1 = trade_ids(lines)
    assert run1 == first[:len(run1)]
    assert 150 <= len(run1) < len(first), "not killed mid-way"
    assert lines[0].rstrip("\n") == describe(driver.trades[0])

    async def pending() -> list[str]:
        client = connect(redis_server)
        try:
            return await pending_ids(client, "c1")
        finally:
            await client.aclose()

    unacked = run(pending())
    assert unacked                                      # it died holding entries
    acked = [i for i in run1 if i not in unacked]
    assert acked == first[:len(acked)]
    assert unacked == first[len(acked):len(acked) + len(unacked)]

    run(write_trades(redis_server, driver, 1000))       # trading goes on meanwhile
    everything = [t.trade_id for t in driver.trades]
    expected = everything[len(acked):]

    console = start_console(redis_server, tmp_path / "platform.log")
    try:
        lines = read_lines(console, lambda got: len(got) >= len(expected), timeout=30)
        console.send_signal(signal.SIGTERM)
        assert console.wait(10) == 0
    finally:
        if console.poll() is None:
            console.kill()
    run2 = trade_ids(lines)
    assert run2 == expected                # unacked ones again, acked ones never, in order
    assert run(pending()) == []


def test_a_fill_gone_while_pending_is_counted_and_a_foreign_entry_stops_the_consumer(
        redis_server: LocalRedis) -> None:
    async def scenario() -> tuple[int, list[str]]:
        driver = Driver(seed=24)
        await write_trades(redis_server, driver, 200)
        reader = connect(redis_server)
        got: list[str] = []
        await crash_after(reader, got, 3, count=10)
        gone = (await pending_ids(reader, "c1"))[0]
        await reader.xdel(KEYS.fills, gone)                    # trimmed while pending
        again = FillConsumer(reader, lambda t: got.append(t.trade_id), KEYS, group=GROUP,
                             consumer="c1", count=10, block_ms=100)
        await again.recover()
        vanished = again.vanished
        # An entry whose trade names another id: something else wrote to the stream.
        row = {k.encode(): str(v).encode() for k, v in
               trade_fields(driver.trades[0]).items()}
        await reader.xadd(KEYS.fills, row, id="999999-0")
        with pytest.raises(ValueError, match="999999-0 holds trade"):
            await asyncio.wait_for(again.run(), 10)
        await reader.aclose()
        return vanished, got

    vanished, got = run(scenario())
    assert vanished == 1 and "999999-0" not in got
