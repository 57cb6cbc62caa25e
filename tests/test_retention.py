"""Fill retention: fills older than the window leave the fill stream and the
participants' streams, except fills a consumer group of the fill stream still needs;
nothing recent goes, and other shards' streams are never touched."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from service import resp
from service.config import load
from service.history import FillHistory
from service.journal import Journal, Keys
from service.localredis import LocalRedis
from service.retention import first_seq_since, group_floor, trim_fills
from service.snapshots import Snapshotter, SnapshotterProcess
from tests.conftest import run
from tests.test_journal import FUNDERS, KEYS, SMES, Driver, opened, play

OTHER = Keys("other")


async def ids(client: aioredis.Redis, key: str) -> list[bytes]:
    rows: Any = await client.xrange(key)
    return [entry_id for entry_id, _ in rows]


def trade_ids(driver: Driver, *, of: int | None = None, from_seq: int = 0) -> list[bytes]:
    return [t.trade_id.encode() for t in driver.trades
            if t.seq >= from_seq and (of is None or of in (t.funder, t.sme))]


async def market(redis_server: LocalRedis, seed: int, commands: int, *,
                 node_entries: int = 1) -> tuple[aioredis.Redis, Driver]:
    """Trades on every stream. One entry per stream node by default, so that Redis's
    approximate trims are exact and the tests can say exactly what stays."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.config_set("stream-node-max-entries", node_entries)
    writer, journal, driver = await opened(redis_server, seed)
    await play(driver, journal, commands)
    await journal.close()
    await writer.aclose()
    assert len(driver.trades) > 200, "the market made too few trades to test with"
    return client, driver


def test_fills_older_than_the_window_leave_every_stream_of_the_shard(
        redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, driver = await market(redis_server, 51, 3000)
        # Another shard's streams, all old: never this shard's to trim.
        await client.xadd(OTHER.fills, {"ts": 1}, id="1-0")
        await client.xadd(OTHER.fills_of(FUNDERS[0]), {"t1": b"x"}, id="1-0")
        middle = driver.trades[len(driver.trades) // 2]
        cut = min(t.seq for t in driver.trades if t.ts >= middle.ts)
        assert cut > driver.trades[0].seq

        done = await trim_fills(client, KEYS, since_ts=middle.ts)
        assert (done.cut, done.held_by) == (cut, None)
        assert await ids(client, KEYS.fills) == trade_ids(driver, from_seq=cut)
        assert done.fills == len(driver.trades) - len(trade_ids(driver, from_seq=cut))
        for p in FUNDERS + SMES:
            assert await ids(client, KEYS.fills_of(p)) == trade_ids(driver, of=p, from_seq=cut)
        assert done.streams == len(FUNDERS + SMES)
        assert done.entries == 2 * done.fills
        assert await client.xlen(OTHER.fills) == 1
        assert await client.xlen(OTHER.fills_of(FUNDERS[0])) == 1

        again = await trim_fills(client, KEYS, since_ts=middle.ts)    # nothing more
        assert (again.cut, again.fills, again.entries) == (cut, 0, 0)
        await client.aclose()

    run(scenario())


def test_the_cut_is_found_at_either_end_and_an_empty_stream_has_none(
        redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, driver = await market(redis_server, 52, 1500)
        first, last = driver.trades[0], driver.trades[-1]
        assert await first_seq_since(client, KEYS.fills, first.ts) == first.seq
        assert await first_seq_since(client, KEYS.fills, last.ts) == \
            min(t.seq for t in driver.trades if t.ts >= last.ts)
        assert await first_seq_since(client, KEYS.fills, last.ts + 1) == last.seq + 1
        assert await first_seq_since(client, OTHER.fills, 0) is None
        everything = await trim_fills(client, KEYS, since_ts=last.ts + 1)
        assert await client.xlen(KEYS.fills) == 0 and everything.fills == len(driver.trades)
        assert (await trim_fills(client, OTHER, since_ts=1)).cut is None
        await client.aclose()

    run(scenario())


def test_a_consumer_group_keeps_what_it_has_not_acknowledged(
        redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, driver = await market(redis_server, 53, 3000)
        late = driver.trades[-1].ts + 1                   # every fill is out of the window
        await client.xgroup_create(KEYS.fills, "platform", id="0")
        await client.xgroup_create(KEYS.fills, "audit", id="$")    # up to date, nothing due
        read: Any = await client.xreadgroup("platform", "c1", {KEYS.fills: ">"}, count=30)
        delivered = [entry_id for entry_id, _ in read[0][1]]
        await client.xack(KEYS.fills, "platform", *delivered[:10])

        assert await group_floor(client, KEYS.fills) == (
            tuple(int(x) for x in delivered[10].split(b"-")), "platform")
        done = await trim_fills(client, KEYS, since_ts=late)
        assert done.held_by == "platform"
        assert await ids(client, KEYS.fills) == trade_ids(driver)[10:]   # first pending on
        # Participants' streams are history, not delivery: the window alone decides.
        assert all([await client.xlen(KEYS.fills_of(p)) == 0 for p in FUNDERS + SMES])

        # All acknowledged: the floor is the entry after the last one delivered.
        await client.xack(KEYS.fills, "platform", *delivered[10:])
        done = await trim_fills(client, KEYS, since_ts=late)
        assert await ids(client, KEYS.fills) == trade_ids(driver)[30:]
        assert done.held_by == "platform"
        read = await client.xreadgroup("platform", "c1", {KEYS.fills: ">"})
        await client.xack(KEYS.fills, "platform", *[i for i, _ in read[0][1]])
        done = await trim_fills(client, KEYS, since_ts=late)
        assert (await client.xlen(KEYS.fills), done.held_by) == (0, None)
        await client.aclose()

    run(scenario())


def test_a_group_that_has_read_nothing_holds_every_fill(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, driver = await market(redis_server, 58, 1500)
        await client.xgroup_create(KEYS.fills, "platform", id="0")      # last delivered 0-0
        assert await group_floor(client, KEYS.fills) == ((0, 1), "platform")
        done = await trim_fills(client, KEYS, since_ts=driver.trades[-1].ts + 1)
        assert (done.held_by, done.fills) == ("platform", 0)
        assert await ids(client, KEYS.fills) == trade_ids(driver)
        await client.aclose()

    run(scenario())


def test_a_group_that_acknowledged_its_last_pending_fill_meanwhile_is_read_again(
        redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """XINFO said entries were pending; by XPENDING they were acknowledged (an empty
    summary): the floor is then the entry after the last delivered, not a crash."""
    async def scenario() -> None:
        client, _driver = await market(redis_server, 59, 1500)
        await client.xgroup_create(KEYS.fills, "platform", id="0")
        read: Any = await client.xreadgroup("platform", "c1", {KEYS.fills: ">"}, count=12)
        delivered = [entry_id for entry_id, _ in read[0][1]]
        real_xpending = client.xpending

        async def acknowledged_meanwhile(name: str, group: str) -> Any:
            await client.xack(name, group, *delivered)
            return await real_xpending(name, group)

        monkeypatch.setattr(client, "xpending", acknowledged_meanwhile)
        ms, n = (int(x) for x in delivered[-1].split(b"-"))
        assert await group_floor(client, KEYS.fills) == ((ms, n + 1), "platform")
        await client.aclose()

    run(scenario())


@pytest.mark.parametrize("node_entries", [100, 100_000])
def test_with_large_stream_nodes_the_trim_is_still_exact(
        redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch, node_entries: int) -> None:
    """Approximate trims remove only whole nodes (Redis's default: up to 100 entries or
    4 KB each), so a quiet stream whose one node spans days would keep its old fills:
    the exact trim after them takes the rest. With steps of 7 entries, nodes larger
    than a step (as with `stream-node-max-entries` 100,000) are left to it whole."""
    from service import retention
    monkeypatch.setattr(retention, "TRIM_LIMIT", 7)

    async def scenario() -> None:
        client, driver = await market(redis_server, 54, 4000, node_entries=node_entries)
        middle = driver.trades[len(driver.trades) // 2]
        done = await trim_fills(client, KEYS, since_ts=middle.ts)
        assert done.cut is not None and done.fills > 0
        assert await ids(client, KEYS.fills) == trade_ids(driver, from_seq=done.cut)
        for p in FUNDERS + SMES:
            assert await ids(client, KEYS.fills_of(p)) == \
                trade_ids(driver, of=p, from_seq=done.cut)
        await client.aclose()

    run(scenario())


def test_the_snapshotter_trims_after_each_snapshot_and_pages_go_on_from_what_stays(
        redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, driver = await market(redis_server, 55, 3000)
        span = driver.trades[-1].ts - driver.trades[0].ts
        keep_s = span / 3 / 1e9
        off = Snapshotter(client, KEYS, every=1000)
        await off.start()
        assert await off.step()
        assert await client.xlen(KEYS.fills) == len(driver.trades)      # 0: keep all

        follower = Snapshotter(client, KEYS, every=1, fill_retention_s=keep_s)
        await follower.start()
        journal = Journal(client, KEYS, written_seq=driver.engine.seq)
        journal.start()
        await play(driver, journal, 10)
        await journal.close()
        assert await follower.step()
        since = follower.engine.ts - int(keep_s * 1e9)
        cut = min(t.seq for t in driver.trades if t.ts >= since)
        assert await ids(client, KEYS.fills) == trade_ids(driver, from_seq=cut)

        # A participant paging on from a trade id that is gone gets what stays.
        sme = SMES[0]
        old = [t for t in driver.trades if sme in (t.funder, t.sme) and t.seq < cut]
        conn = resp.Connection.like(client)
        history = FillHistory(conn, KEYS)
        page = await history.page(sme, old[0].trade_id, 5)
        assert [t.trade_id.encode() for t in page.trades] == \
            trade_ids(driver, of=sme, from_seq=cut)[:5]
        history.close()
        await client.aclose()

    run(scenario())


def test_retention_runs_whenever_journal_time_moves_a_tenth_of_the_window_on(
        redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only after snapshots: a market too quiet to snapshot still sheds old fills;
    and a journal whose time stands still is not searched again."""
    from service import snapshots
    passes: list[int] = []

    async def counted(client: aioredis.Redis, keys: Keys, *, since_ts: int) -> Any:
        passes.append(since_ts)
        return await trim_fills(client, keys, since_ts=since_ts)

    monkeypatch.setattr(snapshots, "trim_fills", counted)

    async def scenario() -> None:
        client, driver = await market(redis_server, 57, 3000)
        span = driver.trades[-1].ts - driver.trades[0].ts
        window = span // 2
        follower = Snapshotter(client, KEYS, every=10**9, fill_retention_s=window / 1e9)
        await follower.start()
        assert not await follower.step()                    # no snapshot, but a trim
        cut = min(t.seq for t in driver.trades if t.ts >= follower.engine.ts - window)
        assert await ids(client, KEYS.fills) == trade_ids(driver, from_seq=cut)
        assert passes == [follower.engine.ts - window]
        await follower.step()                               # the journal's time stood still
        assert len(passes) == 1
        journal = Journal(client, KEYS, written_seq=driver.engine.seq)
        journal.start()
        while driver.ts - follower.engine.ts < window // 10:    # a tenth of the window on
            await play(driver, journal, 50)
        await journal.close()
        await follower.step()
        assert len(passes) == 2 and passes[1] == follower.engine.ts - window
        assert await client.get(KEYS.snapshot) is None       # never a snapshot
        await client.aclose()

    run(scenario())


def test_the_setting_is_checked_and_reaches_the_snapshotter(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[engine]\nfill_retention_hours = -1\n")
    with pytest.raises(msgspec.ValidationError, match=r"\$\.engine\.fill_retention_hours"):
        load(path, {})
    assert load(path, {"MATCHER_ENGINE_FILL_RETENTION_HOURS": "72"}).engine \
        .fill_retention_hours == 72
    assert load(None, {}).engine.fill_retention_hours > 0        # the demo trims
    argv = SnapshotterProcess("redis://x", KEYS, 10, fill_retention_hours=1.5).argv
    assert argv[argv.index("--fill-retention-hours") + 1] == "1.5"
    assert "--fill-retention-hours" not in SnapshotterProcess("redis://x", KEYS, 10).argv
    bad = subprocess.run([sys.executable, "-m", "service.cli", "snapshotter",
                          "--fill-retention-hours", "-2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--fill-retention-hours" in bad.stderr


def test_the_server_trims_old_fills_and_reports_what_the_stream_holds(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """`[engine] fill_retention_hours` reaches the gateway's snapshotter, and
    `matcher_fill_stream_*` follow the fill stream as it is trimmed."""
    from service.localredis import free_port
    from tests.conftest import ServerProcess, write_config
    from tests.test_service import F11, SME_X, ask, bid, line, metric, sessions
    port = free_port()
    path = write_config(tmp_path / "m.toml", redis_server.url, port)
    path.write_text(path.read_text().replace(         # a window of 0.36 ms: all but the newest
        "snapshot_every = 1000", "snapshot_every = 10\nfill_retention_hours = 0.0000001"))

    async def one_entry_per_node() -> None:       # trims whole nodes: make them small
        client = aioredis.Redis.from_url(redis_server.url)
        await client.config_set("stream-node-max-entries", 1)
        await client.aclose()

    run(one_entry_per_node())
    server = ServerProcess(path, port, tmp_path / "server.log").start()

    async def market() -> list[int]:
        seqs = []
        async with sessions(server, F11, SME_X) as (f11, sme):
            await f11.ok(line("DFM"))
            for i in range(30):
                await f11.ok(bid(f"b{i}", "DFM-30D", 250, 100_000))
            for i in range(30):
                seqs.append((await sme.ok(ask(f"a{i}", "DFM-30D", 100_000, tif="ioc")))["seq"])
                while (await sme.recv())["type"] != "done":
                    pass
        return seqs

    try:
        assert metric(server, "matcher_fill_stream_entries", required=True) == 0
        seqs = run(market())
        deadline = time.monotonic() + 20
        while metric(server, "matcher_fill_stream_start_seq") <= seqs[0]:
            assert time.monotonic() < deadline, "the fill stream was never trimmed"
            time.sleep(0.1)
        entries = metric(server, "matcher_fill_stream_entries")
        start = metric(server, "matcher_fill_stream_start_seq")
        assert 0 < entries < 30 and start in seqs
        assert entries == len([s for s in seqs if s >= start])
        assert metric(server, "matcher_fill_retention_seconds") == pytest.approx(0.00036)
        assert 0 <= metric(server, "matcher_fill_stream_oldest_age_seconds") < 0.1
        assert "left Redis" in (tmp_path / "server.log").read_text()
    finally:
        server.kill()


def test_the_platform_consumer_gets_every_fill_once_though_retention_ran_while_it_was_down(
        redis_server: LocalRedis) -> None:
    """Nothing acknowledged... and nothing undelivered is lost: the real consumer dies
    mid-way, a trim whose window covers every fill runs, and the restarted consumer
    still gets each fill it had not acknowledged, once; then a trim takes the rest."""
    from matcher import protocol as wire
    from service.platform import FillConsumer

    class Crash(Exception):
        pass

    async def scenario() -> None:
        client, driver = await market(redis_server, 56, 2000)
        late = driver.trades[-1].ts + 1
        handled: list[str] = []

        def dies_at_50(trade: wire.Trade) -> None:
            if len(handled) == 50:
                raise Crash
            handled.append(trade.trade_id)

        first = FillConsumer(client, dies_at_50, KEYS, consumer="c1", count=20, block_ms=100)
        with pytest.raises(Crash):
            await first.run()
        done = await trim_fills(client, KEYS, since_ts=late)
        assert done.held_by == "platform" and done.fills == 50     # the acknowledged ones

        stop_when_all = asyncio.Event()

        def the_rest(trade: wire.Trade) -> None:
            handled.append(trade.trade_id)
            if len(handled) == len(driver.trades):
                stop_when_all.set()

        again = FillConsumer(client, the_rest, KEYS, consumer="c1", count=20, block_ms=100)
        await asyncio.wait_for(again.run(stop_when_all), 20)
        assert handled == [t.trade_id for t in driver.trades]      # each once, in order
        await trim_fills(client, KEYS, since_ts=late)
        assert await client.xlen(KEYS.fills) == 0                  # all acknowledged: gone
        await client.aclose()

    run(scenario())
