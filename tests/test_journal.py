"""The journal against a real redis-server: group commit, the fill stream, replay and
snapshots equal to the live engine, Redis restarts and lost data, and the `matcher
replay` / `matcher snapshot` commands.

Everything runs in this process (Engine + Journal + recover on one event loop), driven by
`Driver`, a seeded random market session submitting commands as the gateway does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from websockets.asyncio.client import connect as ws_connect

from matcher import protocol as wire
from matcher import snapshot
from matcher.engine import Engine, Outcome
from matcher.protocol import Role
from service import resp
from service.history import FillHistory
from service.journal import (
    _SCRIPT_SHA,
    Journal,
    JournalLost,
    Keys,
    decode_trade,
    journal_start,
    read_journal,
    trade_fields,
    trade_from_row,
)
from service.localredis import LocalRedis, free_port
from service.platform import describe
from service.recovery import recover
from service.snapshots import store, stored_seq
from service.tasks import cancel_all
from tests.conftest import ROOT, ServerProcess, run, write_config

KEYS = Keys("main")
M = 1_000_000                      # 10,000 CNY in fen: the unit of the random amounts

ADMIN = 1
FUNDERS = (11, 12, 13, 14)
SMES = (21, 22, 23)
ROLES: dict[int, Role] = {ADMIN: "admin", **dict.fromkeys(FUNDERS, "funder"),
                          **dict.fromkeys(SMES, "sme")}
#: (segment, core, tenor_days, rate_cap_bps): two core enterprises, two tenors each.
SEGMENTS = (("DFM-30D", "DFM", 30, 3600), ("DFM-90D", "DFM", 90, 3600),
            ("SGCC-30D", "SGCC", 30, 400), ("SGCC-90D", "SGCC", 90, 3600))
CORES = ("DFM", "SGCC")


class Driver:
    """A seeded random market session that submits to an `Engine` as the gateway does.

    Bids, asks (every tif, market asks, single_funder), cancels, amends, credit-line
    changes, retries of orders as they were sent, client ids reused for other orders
    (refused), end of day, and a few commands the engine rejects. Keeps every accepted
    entry, outcome and trade in order.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.engine = Engine()
        self.ts = 1_767_225_600_000_000_000
        self.counter = 0
        self.used: dict[int, list[str]] = {p: [] for p in ROLES}
        self.entries: list[wire.JournalEntry] = []
        self.outcomes: list[Outcome] = []
        self.trades: list[wire.Trade] = []
        self.kinds: Counter[str] = Counter()      # accepted commands by type
        self.rejected = 0
        self.retries = 0
        self.placed: list[tuple[int, wire.Bid | wire.Ask]] = []   # orders placed, to retry

    def submit(self, participant: int, cmd: wire.Command) -> Outcome:
        self.ts += self.rng.randrange(1, 5_000_000)
        out = self.engine.submit(participant, ROLES[participant], cmd, self.ts)
        if out.entry is not None:
            self.entries.append(out.entry)
            self.outcomes.append(out)
            self.trades.extend(out.trades)
            self.kinds[type(cmd).__name__] += 1
        elif any(isinstance(event, wire.Rejected) for _, event in out.replies):
            self.rejected += 1
        else:
            self.retries += 1
        return out

    def opening(self) -> list[Outcome]:
        outs = [self.submit(ADMIN, wire.AddSegment(segment=s, core=c, tenor_days=t,
                                                   rate_cap_bps=cap))
                for s, c, t, cap in SEGMENTS]
        outs += [self.submit(f, wire.SetCreditLine(core=c,
                                                   amount=self.rng.randrange(500, 3000) * M))
                 for f in FUNDERS for c in CORES]
        return outs

    def step(self) -> Outcome:
        if self.placed and self.rng.random() < 0.03:      # an order sent again: a retry
            participant, cmd = self.rng.choice(self.placed)
            return self.submit(participant, cmd)
        participant, cmd = self.command()
        out = self.submit(participant, cmd)
        if out.entry is not None and isinstance(cmd, wire.Bid | wire.Ask):
            self.placed.append((participant, cmd))
        return out

    def _client_id(self, participant: int) -> str:
        rng = self.rng
        if self.used[participant] and rng.random() < 0.04:   # a reuse: mostly refused
            return rng.choice(self.used[participant])
        self.counter += 1
        cid = f"{participant}-{self.counter}"
        self.used[participant].append(cid)
        return cid

    def command(self) -> tuple[int, wire.Command]:
        rng = self.rng
        r = rng.random()
        segment, core, tenor, cap = rng.choice(SEGMENTS)
        base = 250 + tenor // 3
        if r < 0.34:
            f = rng.choice(FUNDERS)
            rate = base + rng.randint(-25, 25) if rng.random() > 0.01 else cap + 1
            return f, wire.Bid(
                client_id=self._client_id(f), segment=segment, rate_bps=rate,
                amount=rng.randint(1, 60) * M,
                min_ticket=rng.randint(1, 20) * M if rng.random() < 0.2 else 0,
                tif=rng.choices(("gtc", "day", "ioc", "fok"), (60, 25, 10, 5))[0])
        if r < 0.64:
            s = rng.choice(SMES)
            return s, wire.Ask(
                client_id=self._client_id(s), segment=segment, amount=rng.randint(1, 80) * M,
                max_rate_bps=None if rng.random() < 0.2 else base + rng.randint(-40, 30),
                tif=rng.choices(("ioc", "fok", "gtc", "day"), (55, 15, 18, 12))[0],
                single_funder=rng.random() < 0.15)
        if r < 0.76:
            p = rng.choice(FUNDERS + SMES)
            resting = self.engine.resting_client_ids(p)
            if resting and rng.random() < 0.9:
                return p, wire.Cancel(client_id=rng.choice(resting))
            return p, wire.Cancel(client_id=rng.choice(self.used[p] or ["nothing"]))
        if r < 0.88:
            f = rng.choice(FUNDERS)
            resting = self.engine.resting_client_ids(f)
            cid = rng.choice(resting) if resting else f"{f}-none"
            rate = base + rng.randint(-30, 30) if rng.random() < 0.6 else None
            amount = rng.randint(1, 60) * M if rate is None or rng.random() < 0.4 else None
            if rng.random() < 0.03:
                rate = amount = None                     # rejected: nothing to amend
            return f, wire.Amend(client_id=cid, rate_bps=rate, amount=amount)
        if r < 0.95:
            f, core = rng.choice(FUNDERS), rng.choice(CORES)
            _line, used = self.engine.credit(core, f)
            amount = used + rng.randrange(0, 1500) * M if rng.random() < 0.9 else \
                rng.randrange(0, max(1, used // M + 1)) * M
            return f, wire.SetCreditLine(core=core, amount=amount)
        if r < 0.985:
            s = rng.choice(SMES)
            return s, wire.Ask(client_id=self._client_id(s), segment="NO-SUCH", amount=M)
        return ADMIN, wire.EndOfDay()


def connect(server: LocalRedis) -> aioredis.Redis:
    return aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=2)


async def play(driver: Driver, journal: Journal, commands: int, *, pause_every: int = 25,
               snapshot_every: int = 0,
               snapshots: list[tuple[int, str]] | None = None) -> None:
    """Submit `commands` random commands, journal the accepted ones, wait until durable.

    The loop yields every `pause_every` commands so writes go out while commands keep
    coming (group commit under load); every `snapshot_every` commands it waits until
    all is durable and stores a snapshot, as the snapshotter does; `snapshots` gets
    (seq, state hash) of each one.
    """
    futures: list[asyncio.Future[int]] = []
    for n in range(1, commands + 1):
        out = driver.step()
        if out.entry is not None:
            futures.append(journal.append(out.entry, out.trades))
        if snapshot_every and n % snapshot_every == 0:
            await journal.flush()
            assert await store(journal.client, journal.keys, driver.engine)
            if snapshots is not None:
                snapshots.append((driver.engine.seq, snapshot.state_hash(driver.engine)))
        if pause_every and n % pause_every == 0:
            await asyncio.sleep(0)
    await asyncio.gather(*futures)


async def open_market(driver: Driver, journal: Journal) -> None:
    futures = [journal.append(out.entry, out.trades) for out in driver.opening() if out.entry]
    await asyncio.gather(*futures)


async def journal_rows(client: aioredis.Redis) -> list[tuple[str, list[wire.JournalEntry]]]:
    rows = await client.xrange(KEYS.journal)
    return [(entry_id.decode(), wire.journal_decoder.decode(fields[b"e"]))
            for entry_id, fields in rows]


async def journaled(client: aioredis.Redis) -> list[wire.JournalEntry]:
    return [e async for batch in read_journal(client, KEYS) for e in batch]


async def fill_stream(client: aioredis.Redis) -> list[tuple[str, wire.Trade]]:
    rows = await client.xrange(KEYS.fills)
    return [(entry_id.decode(), decode_trade(fields)) for entry_id, fields in rows]




async def assert_written_once(client: aioredis.Redis, driver: Driver) -> None:
    """Redis holds every command the driver made, and every trade, each exactly once."""
    assert await journaled(client) == driver.entries
    assert [t for _, t in await fill_stream(client)] == driver.trades


#: Journal windows the robustness tests run with: one write in flight (the default) and
#: several pipelined on one connection.
WINDOWS = pytest.mark.parametrize("window", [1, 4])


async def opened(redis_server: LocalRedis, seed: int,
                 **journal_options: Any) -> tuple[aioredis.Redis, Journal, Driver]:
    """A started journal on the test Redis and a driver whose market is open."""
    client = connect(redis_server)
    journal = Journal(client, KEYS, **journal_options)
    journal.start()
    driver = Driver(seed=seed)
    await open_market(driver, journal)
    return client, journal, driver

async def write_trades(redis_server: LocalRedis, driver: Driver, commands: int) -> None:
    """Run `commands` more random commands through a Journal (trades -> fill stream)."""
    client = connect(redis_server)
    journal = Journal(client, KEYS, written_seq=driver.engine.seq)
    journal.start()
    if driver.engine.seq == 0:
        await open_market(driver, journal)
    await play(driver, journal, commands)
    await journal.close()
    await client.aclose()

# --- group commit ---------------------------------------------------------------------


def test_group_commit_writes_many_commands_at_once(redis_server: LocalRedis) -> None:
    """1,000 commands appended without awaiting go out in a handful of writes, each a
    stream entry whose id is the batch's last sequence number."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 1)
        batches0, entries0 = journal.batches, await client.xlen(KEYS.journal)
        appended: list[tuple[int, asyncio.Future[int]]] = []
        for _ in range(5000):                       # bounded; ~60% of commands are accepted
            out = driver.step()
            if out.entry is not None:
                appended.append((out.entry.seq, journal.append(out.entry, out.trades)))
                if len(appended) == 1000:
                    break
        assert len(appended) == 1000
        results = await asyncio.wait_for(asyncio.gather(*(f for _, f in appended)), 10)
        assert all(durable >= seq for (seq, _), durable in zip(appended, results, strict=True))
        writes = journal.batches - batches0
        stream_entries = await client.xlen(KEYS.journal) - entries0
        assert writes == stream_entries
        assert 1 <= writes <= 5, f"{writes} writes for 1000 commands: no group commit"
        rows = await journal_rows(client)
        for entry_id, entries in rows:
            assert entry_id == f"{entries[-1].seq}-0"
        assert [e for _, entries in rows for e in entries] == driver.entries
        await journal.close()
        await client.aclose()
    run(scenario())


def test_group_commit_batches_what_arrives_during_a_write(redis_server: LocalRedis) -> None:
    """With the loop free between commands, each write takes everything that arrived
    while the previous one was in flight: several writes, far fewer than commands."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 2)
        batches0 = journal.batches
        seq0 = driver.engine.seq
        await play(driver, journal, 2000, pause_every=10)
        commands = driver.engine.seq - seq0
        writes = journal.batches - batches0
        assert 2 <= writes <= 2000 // 10 + 1 < commands
        rows = await journal_rows(client)
        assert len(rows) == journal.batches
        for entry_id, entries in rows:
            assert entry_id == f"{entries[-1].seq}-0"
            assert [e.seq for e in entries] == list(range(entries[0].seq, entries[-1].seq + 1))
        assert [e for _, entries in rows for e in entries] == driver.entries
        await journal.close()
        await client.aclose()
    run(scenario())


# --- the fill stream ------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("amount", "1e3"), ("amount", "100.0"), ("amount", "-7"), ("amount", "0"),
    ("rate_bps", " 250"), ("funder", "\u0663"),               # an Arabic-Indic three
])
def test_a_fill_entry_the_script_could_not_have_written_is_refused(field: str,
                                                                  value: str) -> None:
    trade = wire.Trade(trade_id="7-0", seq=7, ts=1, segment="S", core="C", tenor_days=30,
                       funder=11, sme=21, bid_order_id=3, ask_order_id=7, bid_client_id="b",
                       ask_client_id="a", rate_bps=250, amount=1_000)
    fields = {k.encode(): str(v).encode() for k, v in trade_fields(trade).items()}
    assert decode_trade(fields) == trade
    fields[field.encode()] = value.encode()
    with pytest.raises(ValueError, match=field):
        decode_trade(fields)


def test_fill_stream_has_one_entry_per_trade_keyed_by_trade_id(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 3)
        await play(driver, journal, 2000)
        assert len(driver.trades) > 200
        rows = await client.xrange(KEYS.fills)
        assert len(rows) == len(driver.trades)
        for (entry_id, fields), trade in zip(rows, driver.trades, strict=True):
            assert entry_id.decode() == trade.trade_id
            assert {k.decode() for k in fields} == set(wire.Trade.__struct_fields__)
            assert decode_trade(fields) == trade
            assert fields == {k.encode(): str(v).encode() for k, v in trade_fields(trade).items()}
        order = [tuple(map(int, entry_id.split(b"-"))) for entry_id, _ in rows]
        assert order == sorted(order)                    # sequence order, n-th fill order
        assert [t.seq for t in driver.trades] == sorted(t.seq for t in driver.trades)
        await journal.close()
        await client.aclose()
    run(scenario())


async def assert_own_streams(client: aioredis.Redis, trades: list[wire.Trade]) -> None:
    """Each participant's own stream holds exactly its trades, in order, as `fills` does."""
    for who in FUNDERS + SMES:
        rows = await client.xrange(KEYS.fills_of(who))
        assert [(i.decode(), trade_from_row(f)) for i, f in rows] == [
            (t.trade_id, t) for t in trades if who in (t.funder, t.sme)]


def test_each_participant_pages_through_its_own_trades(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 3)
        await play(driver, journal, 1500)
        await assert_own_streams(client, driver.trades)
        history = FillHistory(resp.Connection.like(client), KEYS)
        for who in FUNDERS + SMES:
            own = [t for t in driver.trades if who in (t.funder, t.sme)]
            assert len(own) > 20
            pages = [await history.page(who, "0-0", 7)]
            while pages[-1].more:
                pages.append(await history.page(who, pages[-1].next, 7))
            assert [t for p in pages for t in p.trades] == own
            assert [len(p.trades) for p in pages[:-1]] == [7] * (len(pages) - 1)
            assert all(p.next == p.trades[-1].trade_id for p in pages)
            newest = await history.page(who, None, 5)
            assert (newest.trades, newest.more, newest.next) == (own[-5:], False,
                                                                 own[-1].trade_id)
            after_last = await history.page(who, own[-1].trade_id, 5)
            assert (after_last.trades, after_last.more, after_last.next) == \
                ([], False, own[-1].trade_id)                   # still a cursor to keep
        nobody = await history.page(999, None, 5)
        assert (nobody.trades, nobody.more, nobody.next) == ([], False, None)
        await journal.close()
        history.close()
        await client.aclose()
    run(scenario())


def test_a_participant_stream_keeps_any_client_id(redis_server: LocalRedis) -> None:
    """Client ids are any 64 characters: the row the script packs keeps them exactly."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 3)
        funder, sme = FUNDERS[0], SMES[0]
        for who, cmd in ((funder, wire.Bid(client_id="出价-①'\"\\", segment="DFM-30D",
                                           rate_bps=200, amount=5 * M, tif="gtc")),
                         (sme, wire.Ask(client_id="借款 ☃ " + "x" * 56, segment="DFM-30D",
                                        amount=M, max_rate_bps=200))):
            out = driver.submit(who, cmd)
            assert out.entry is not None
            await journal.append(out.entry, out.trades)
        trade = driver.trades[-1]
        assert (trade.bid_client_id, trade.sme) == ("出价-①'\"\\", sme)
        history = FillHistory(resp.Connection.like(client), KEYS)
        assert (await history.page(sme, None, 1)).trades == [trade]
        assert (await history.page(funder, None, 1)).trades == [trade]
        history.close()
        await journal.close()
        await client.aclose()
    run(scenario())


def test_rows_stored_in_format_t1_still_read_as_the_same_trade() -> None:
    """The participants' streams keep rows across versions: a change of `wire.Trade` that
    breaks this needs a new row format (ROW_FIELD) and a migration, not an edit here."""
    row = ["7-1", "7", "1767225600000000000", "DFM-30D", "DFM", "30", "11", "21", "3", "7",
           "b-1", "a-1", "250", "100000"]
    assert trade_from_row({b"t1": msgspec.msgpack.encode(row)}) == wire.Trade(
        trade_id="7-1", seq=7, ts=1_767_225_600_000_000_000, segment="DFM-30D", core="DFM",
        tenor_days=30, funder=11, sme=21, bid_order_id=3, ask_order_id=7,
        bid_client_id="b-1", ask_client_id="a-1", rate_bps=250, amount=100_000)
    with pytest.raises(ValueError, match="not a trade row"):
        trade_from_row({b"side": b"bid"})


def test_a_write_that_fails_part_way_journals_nothing(redis_server: LocalRedis,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A script is not rolled back when one of its commands fails. A participant's
    stream left from another journal (a later id than the next trade's) fails the write
    after the trade went to the fill stream: the command is not journaled and not
    acknowledged, and the journal stops, loudly, rather than acknowledge a command whose
    fill is missing from a participant's stream."""
    caplog.set_level(logging.CRITICAL, logger="matcher.journal")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 3)
        while not (out := driver.step()).trades:                # bounded: trades are common
            if out.entry is not None:
                await journal.append(out.entry, out.trades)
        before = await journaled(client)
        funder = out.trades[0].funder
        await client.xadd(KEYS.fills_of(funder), {"side": "bid"}, id="99999999-0")
        assert out.entry is not None
        with pytest.raises(Exception, match="equal or smaller"):
            await asyncio.wait_for(journal.append(out.entry, out.trades), 5)
        assert not journal.healthy
        assert await journaled(client) == before                # the commit record: absent
        await journal.close()
        await client.aclose()
    run(scenario())
    assert any("journal stopped" in r.getMessage() for r in caplog.records)


async def streams(client: aioredis.Redis) -> dict[str, int]:
    """How many entries the journal, the fill stream and every participant's stream
    hold."""
    names = [KEYS.journal, KEYS.fills] + [KEYS.fills_of(p) for p in ROLES]
    return {name: int(await client.xlen(name)) for name in names}


def test_a_batch_already_journaled_is_not_written_again(redis_server: LocalRedis) -> None:
    """A write that landed after its reply timed out, then sent again (or a second
    writer's copy), writes nothing: the script sees the journal already ends at or
    after it, and answers 0."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 12)
        while not (out := driver.step()).trades:                # bounded: trades are common
            if out.entry is not None:
                await journal.append(out.entry, out.trades)
        assert out.entry is not None
        await journal.append(out.entry, out.trades)
        before = await streams(client)
        again = await journal._conn.call(journal._pack([out.entry], out.trades, _SCRIPT_SHA))
        assert again == 0 and await streams(client) == before
        await journal.close()
        await client.aclose()
    run(scenario())


def test_a_batch_that_does_not_follow_the_journal_is_refused_whole(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture) -> None:
    """With several writes in flight, one that fails must not leave a gap behind the
    next: a batch writes only right after the one before it. The journal then stops
    with that error, keeps it, sends nothing more, and `flush` raises it."""
    caplog.set_level(logging.CRITICAL, logger="matcher.journal")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 13, max_inflight=2)
        outs = []
        while len(outs) < 2 or not outs[-1].trades:             # bounded: trades are common
            if (out := driver.step()).entry is not None:
                outs.append(out)
        before = await streams(client)
        skipped, last = outs[0], outs[-1]                 # a batch without the one before
        assert last.entry is not None and skipped.entry is not None
        with pytest.raises(ResponseError, match=r"^GAP the journal ends at \d+-0, this "
                                                r"write follows \d+-0"):
            await journal._conn.call(journal._pack([last.entry], last.trades, _SCRIPT_SHA))
        assert await streams(client) == before              # nothing of it, trades included
        # Through the journal itself: it stops on the gap and stays stopped with it.
        sent = journal._conn.generation, journal.batches
        with pytest.raises(ResponseError, match=r"^GAP"):
            await asyncio.wait_for(journal.append(last.entry, last.trades), 5)
        await asyncio.sleep(0.1)
        assert isinstance(journal.error, ResponseError) and "GAP" in str(journal.error)
        assert (journal._conn.generation, journal.batches) == sent and not journal._window
        with pytest.raises(ResponseError, match=r"^GAP"):
            await journal.flush()
        with pytest.raises(ResponseError, match=r"^GAP"):
            await journal.append(skipped.entry, skipped.trades)
        assert await streams(client) == before
        await journal.close()
        await client.aclose()
    run(scenario())
    stopped = [r for r in caplog.records if "journal stopped" in r.getMessage()]
    assert len(stopped) == 1, [r.getMessage() for r in stopped]


def test_writes_are_checked_where_one_can_follow_a_failure_or_another_redis(
        redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check costs Redis a read a write: with one write in flight it is asked for on
    the first write of each connection (the one `_connected` checked may have been
    replaced before it) and on writes sent again; with several in flight, on every one."""
    async def scenario(window: int) -> tuple[list[bool], int]:
        fresh = connect(redis_server)
        await fresh.flushall()              # each run its own journal from seq 1
        await fresh.aclose()
        client, journal, driver = await opened(redis_server, 14 + window,
                                               max_inflight=window)
        checks: list[bool] = []
        real = journal._pack

        def recorded(entries: Any, trades: Any, sha: Any, *, check: bool = True) -> bytes:
            checks.append(check)
            return real(entries, trades, sha, check=check)

        monkeypatch.setattr(journal, "_pack", recorded)
        await play(driver, journal, 30, pause_every=5)
        dropped = len(checks)
        journal._conn.close()                 # dropped: the next write reconnects
        await play(driver, journal, 30, pause_every=5)
        await journal.close()
        await client.aclose()
        return checks, dropped

    one, dropped = run(scenario(1))
    assert 0 < dropped < len(one), one
    assert one == [False] * dropped + [True] + [False] * (len(one) - dropped - 1), one
    many, _ = run(scenario(2))
    assert many and all(many)


# --- replay and snapshots -------------------------------------------------------------


@WINDOWS
def test_replay_and_snapshot_replay_equal_the_live_engine(redis_server: LocalRedis,
                                                          window: int) -> None:
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 4, max_inflight=window)
        real_send, in_flight = journal._send, []

        def counting_send(batch: Any) -> asyncio.Future[Any]:
            in_flight.append(len(journal._window))      # with this one
            return real_send(batch)

        journal._send = counting_send   # type: ignore[method-assign]
        snapshots: list[tuple[int, str]] = []
        await play(driver, journal, 4000, snapshot_every=900, snapshots=snapshots)
        # The window is used (timing decides how full it gets) and never exceeded.
        assert max(in_flight) == 1 if window == 1 else 2 <= max(in_flight) <= window
        live = snapshot.state_hash(driver.engine)
        # the session is the one described: all kinds of commands, trades, days
        assert set(driver.kinds) == {"AddSegment", "SetCreditLine", "Bid", "Ask", "Cancel",
                                     "Amend", "EndOfDay"}
        assert driver.kinds["EndOfDay"] >= 3 and len(driver.trades) > 300
        assert driver.rejected > 50 and driver.retries > 5
        assert len(snapshots) == 4
        assert sum(len(b) for b in driver.engine.books.values()) > 0

        stored = await client.get(KEYS.snapshot)
        assert stored is not None
        state = snapshot.load(stored)
        assert (state.seq, snapshot.state_hash(snapshot.restore(state))) == snapshots[-1]

        with_snapshot = await recover(client, KEYS, use_snapshot=True)
        full = await recover(client, KEYS, use_snapshot=False)
        assert with_snapshot.snapshot_seq == snapshots[-1][0] > 0
        assert with_snapshot.replayed == driver.engine.seq - snapshots[-1][0] > 0
        assert (full.snapshot_seq, full.replayed) == (0, driver.engine.seq)
        assert with_snapshot.engine.seq == full.engine.seq == driver.engine.seq
        assert snapshot.state_hash(with_snapshot.engine) == live
        assert snapshot.state_hash(full.engine) == live
        await journal.close()
        await client.aclose()
    run(scenario())


def test_replay_makes_exactly_the_live_trades(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 5)
        await play(driver, journal, 3000)
        assert len(driver.trades) > 300
        engine = Engine()
        trades: list[wire.Trade] = []
        replies: list[list[tuple[int, wire.Event]]] = []
        async for entries in read_journal(client, KEYS):
            for entry in entries:
                out = engine.apply(entry)
                assert out.accepted
                trades.extend(out.trades)
                replies.append(out.replies)
        assert trades == driver.trades
        assert replies == [out.replies for out in driver.outcomes]   # fills, dones too
        assert snapshot.state_hash(engine) == snapshot.state_hash(driver.engine)
        await journal.close()
        await client.aclose()
    run(scenario())


# --- Redis going away -----------------------------------------------------------------


@WINDOWS
def test_writes_dropped_before_they_ran_are_written_again_once(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture, window: int) -> None:
    """Redis pauses writes, the journal's writes wait in it, and its connection is
    killed: those writes never ran. The journal finds them not landed on a new
    connection and writes them again, in order, each once; then acknowledges them."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 16, max_retry_delay=0.1,
                                               max_inflight=window)
        await play(driver, journal, 200)
        admin = connect(redis_server)
        await admin.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        futures = _append(driver, journal, 40)
        for _ in range(3):                               # more batches meanwhile
            await asyncio.sleep(0.05)
            futures += _append(driver, journal, 20)
        waiting: Any = [c for c in await admin.client_list() if c["cmd"] == "evalsha"]
        assert waiting and not any(f.done() for f in futures)
        for c in waiting:
            await admin.execute_command("CLIENT", "KILL", "ID", c["id"])
        await admin.execute_command("CLIENT", "UNPAUSE")
        done = await asyncio.wait_for(asyncio.gather(*futures), 20)
        assert all(seq >= 1 for seq in done)
        assert await journaled(client) == driver.entries                   # each once
        await journal.close()
        await client.aclose()
        await admin.aclose()
    run(scenario())
    assert any("retrying" in r.getMessage() or "failed" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@WINDOWS
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_redis_restart_holds_acks_then_writes_everything_once(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture, how: str,
        window: int) -> None:
    """Redis stopped (SIGTERM) or killed (SIGKILL; appendfsync always keeps every write)
    under load, then started again on the same port and data directory."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 6, max_retry_delay=0.1,
                                               max_inflight=window)
        await play(driver, journal, 300)
        appended: list[tuple[int, asyncio.Future[int]]] = []
        stop = asyncio.Event()

        async def producer() -> None:
            for _ in range(3000):               # bounded; one command every ~2 ms
                if stop.is_set():
                    return
                out = driver.step()
                if out.entry is not None:
                    appended.append((out.entry.seq, journal.append(out.entry, out.trades)))
                await asyncio.sleep(0.002)

        task = asyncio.create_task(producer())
        await asyncio.sleep(0.1)
        await asyncio.to_thread(getattr(redis_server, how))  # under load
        at_stop = len(appended)
        unresolved = [f for _, f in appended if not f.done()]
        await asyncio.sleep(0.3)
        stop.set()
        await task
        await asyncio.sleep(0.5)                             # Redis still down
        assert len(appended) > at_stop + 10
        assert not any(f.done() for f in unresolved), "acknowledged while Redis was down"
        assert not any(f.done() for _, f in appended[at_stop:])
        assert not journal.healthy
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("retrying" in m and "acknowledged" in m for m in warnings)

        await asyncio.to_thread(redis_server.start)          # same port, same data
        results = await asyncio.wait_for(asyncio.gather(*(f for _, f in appended)), 20)
        assert all(durable >= seq for (seq, _), durable in zip(appended, results, strict=True))
        assert journal.healthy
        assert any("succeeded after" in r.getMessage() or "reconnected" in r.getMessage()
                   for r in caplog.records)
        entries = await journaled(client)
        assert [e.seq for e in entries] == list(range(1, driver.engine.seq + 1))
        assert entries == driver.entries
        assert [t for _, t in await fill_stream(client)] == driver.trades
        await assert_own_streams(client, driver.trades)
        full = await recover(client, KEYS, use_snapshot=False)
        assert snapshot.state_hash(full.engine) == snapshot.state_hash(driver.engine)
        await journal.close()
        await client.aclose()
    run(scenario())


@WINDOWS
def test_a_write_that_landed_without_its_reply_is_not_repeated(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture, window: int) -> None:
    """The connection drops after Redis executed the transaction: the journal finds the
    batch there instead of writing it twice, and acknowledges it."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 10, max_retry_delay=0.1,
                                               max_inflight=window)
        real_send = journal._send
        lost: list[int] = []                         # commands per lost reply

        def send_then_lose_the_reply(batch: Any) -> asyncio.Future[Any]:
            reply = real_send(batch)
            if not (batch.entries and len(lost) < 3):
                return reply
            lost.append(len(batch.entries))
            lossy: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

            def lose(_: asyncio.Future[Any]) -> None:
                lossy.set_exception(RedisConnectionError(
                    "connection lost before the reply (simulated)"))
                journal._settle()                  # as the connection does on a failure

            reply.add_done_callback(lose)
            return lossy

        journal._send = send_then_lose_the_reply   # type: ignore[method-assign]
        snapshots: list[tuple[int, str]] = []
        await play(driver, journal, 1200, snapshot_every=400, snapshots=snapshots)
        assert len(lost) == 3
        assert journal.healthy and journal.written_seq == driver.engine.seq
        await assert_written_once(client, driver)               # each exactly once
        await assert_own_streams(client, driver.trades)
        stored = await client.get(KEYS.snapshot)
        assert stored is not None
        state = snapshot.load(stored)
        assert (state.seq, snapshot.state_hash(snapshot.restore(state))) == snapshots[-1]
        recovered = await recover(client, KEYS)
        assert recovered.snapshot_seq == snapshots[-1][0]
        assert snapshot.state_hash(recovered.engine) == snapshot.state_hash(driver.engine)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("none of them is acknowledged" in m for m in messages) == len(lost)
        await journal.close()
        await client.aclose()
    run(scenario())


@WINDOWS
def test_writes_go_on_when_redis_forgets_the_script_or_drops_the_connection(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture, window: int) -> None:
    """Writes name the script by its digest; a Redis that no longer knows it (restarted,
    SCRIPT FLUSH) gets the text once, and a connection closed by the server while the
    journal is idle is opened again (after checking that Redis still holds every
    acknowledged command) without a failed write."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 12, max_inflight=window)
        await play(driver, journal, 300)
        await client.script_flush()
        await play(driver, journal, 300)
        await client.execute_command("CLIENT", "KILL", "SKIPME", "yes")
        await asyncio.sleep(0.05)
        await play(driver, journal, 300)
        assert journal.healthy and journal.written_seq == driver.engine.seq
        await assert_written_once(client, driver)
        assert not [r for r in caplog.records if "failed" in r.getMessage()]
        await journal.close()
        await client.aclose()
    run(scenario())


#: Busy for `ARGV[1]` ms: Redis answers every other client BUSY meanwhile (once past
#: `busy-reply-threshold`).
_BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = t[1] * 1000 + math.floor(t[2] / 1000)
while true do
  t = redis.call('TIME')
  if t[1] * 1000 + math.floor(t[2] / 1000) - start > tonumber(ARGV[1]) then return 1 end
end
"""


@contextlib.asynccontextmanager
async def _busy(redis_server: LocalRedis, ms: int) -> AsyncIterator[asyncio.Task[Any]]:
    """Redis busy with a script for `ms` ms (the task of its call), answering others
    BUSY past a threshold of 50 ms; the threshold is put back after."""
    other = connect(redis_server)
    await other.config_set("busy-reply-threshold", 50)
    try:
        yield asyncio.create_task(other.eval(_BUSY_SCRIPT, 0, ms))
    finally:
        await other.config_set("busy-reply-threshold", 5000)
        await other.aclose()


def test_a_redis_busy_with_a_script_holds_acks_then_writes_everything_once(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture) -> None:
    """A BUSY reply (a script past `busy-reply-threshold`) says "later": the journal took
    it, read back as the end of its history, for "Redis lost writes" and stopped for good
    (found in review). Writes are held and retried, as for a lost connection."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 21, max_retry_delay=0.1)
        await play(driver, journal, 100)
        async with _busy(redis_server, 1500) as busy:
            await asyncio.sleep(0.3)
            futures = _append(driver, journal, 20)
            await asyncio.sleep(0.5)
            assert not any(f.done() for f in futures)        # held while Redis is busy
            assert await busy == 1
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert journal.healthy and journal.error is None
        assert journal.written_seq == driver.engine.seq
        await assert_written_once(client, driver)
        assert any("BUSY" in r.getMessage() for r in caplog.records)
        await journal.close()
        await client.aclose()
    run(scenario())


#: Ways a Redis refuses writes for a while, each with the error code it answers and the
#: setting that puts it back.
REFUSING_WRITES = {
    "over_maxmemory": ("OOM", ("maxmemory", "1"), ("maxmemory", "0")),
    "short_of_replicas": ("NOREPLICAS", ("min-replicas-to-write", "1"),
                          ("min-replicas-to-write", "0")),
    "a_replica": ("READONLY", ("replicaof", f"127.0.0.1 {free_port()}"),
                  ("replicaof", "no one")),
}


@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("how", sorted(REFUSING_WRITES))
def test_a_redis_refusing_writes_for_a_while_holds_acks_then_writes_everything_once(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture, how: str,
        window: int) -> None:
    """Over `maxmemory`, short of `min-replicas-to-write`, or turned into a replica (a
    failover), Redis refuses the script's first write and nothing of it runs: the
    journal held its acks and retried as for a lost connection, where it stopped for
    good (found in an operator's audit)."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")
    code, refuse, mend = REFUSING_WRITES[how]

    async def configure(client: aioredis.Redis, setting: tuple[str, str]) -> None:
        name, value = setting
        if name == "replicaof":
            await client.execute_command("REPLICAOF", *value.split())
        else:
            await client.config_set(name, value)

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 23, max_retry_delay=0.1,
                                               max_inflight=window)
        await play(driver, journal, 100)
        await configure(client, refuse)
        connection = journal._conn.generation
        try:
            futures = _append(driver, journal, 20)
            await asyncio.sleep(0.5)
            assert not any(f.done() for f in futures)        # held while Redis refuses
            assert journal.error is None and not journal.healthy
            # A replica: the retries connect again, which may reach the new master
            # (a DNS name, a proxy); the same connection never would (found in review).
            assert (journal._conn.generation > connection) == (code == "READONLY")
        finally:
            await configure(client, mend)
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert journal.healthy and journal.error is None
        assert journal.written_seq == driver.engine.seq
        await assert_written_once(client, driver)
        assert any(code in r.getMessage() for r in caplog.records)
        await journal.close()
        await client.aclose()
    run(scenario())


class SwitchingProxy:
    """A TCP proxy on 127.0.0.1 in front of one Redis, then another: one address over a
    failover, as a DNS name or a managed Redis's endpoint is. Connections already made
    stay with the node they reached; new ones go to `port`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _connect(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.close()

    async def close(self) -> None:
        self.server.close()
        await cancel_all(list(self._pipes))


@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("old_master", ["a_replica", "a_replica_serving_nothing"])
def test_after_a_failover_behind_one_address_the_journal_writes_to_the_new_master(
        redis_server: LocalRedis, tmp_path: Path, old_master: str, window: int) -> None:
    """The replica is promoted, the address moves to it, and the old master becomes a
    replica: of the new one (READONLY to writes), or of one it cannot reach, serving
    nothing (MASTERDOWN to reads too). The journal's connection, which its loss check
    also reads through, kept asking the old node for ever; it is dropped, and the
    retries reach the new master (found in review)."""
    new = LocalRedis(tmp_path / "new", durability="always")
    new.start()

    async def scenario() -> None:
        proxy = SwitchingProxy(redis_server.port)
        client = aioredis.Redis(host="127.0.0.1", port=await proxy.start(), socket_timeout=5)
        old, promoted = connect(redis_server), connect(new)
        try:
            # Redis waits repl-diskless-sync-delay (5 s) before a first sync: not here.
            await old.config_set("repl-diskless-sync-delay", 0)
            await promoted.execute_command("REPLICAOF", "127.0.0.1", str(redis_server.port))
            journal = Journal(client, KEYS, max_retry_delay=0.1, max_inflight=window)
            told: list[int] = []          # the readers on other connections (fill pages)
            journal.on_wrong_node = lambda: told.append(journal._conn.generation)
            journal.start()
            driver = Driver(seed=24)
            await open_market(driver, journal)
            await play(driver, journal, 100)
            # The replica has all of it (WAIT on this connection, which wrote nothing,
            # would not wait for the journal's writes: a flaky test promoted an empty one).
            newest = await old.xrevrange(KEYS.journal, count=1)
            deadline = time.monotonic() + 5
            while await promoted.xrevrange(KEYS.journal, count=1) != newest:
                assert time.monotonic() < deadline, "the replica did not catch up"
                await asyncio.sleep(0.02)
            await promoted.execute_command("REPLICAOF", "NO", "ONE")
            proxy.port = new.port
            if old_master == "a_replica":
                await old.execute_command("REPLICAOF", "127.0.0.1", str(new.port))
            else:
                await old.config_set("replica-serve-stale-data", "no")
                await old.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            assert told == []
            futures = _append(driver, journal, 20)
            await asyncio.wait_for(asyncio.gather(*futures), 10)
            assert journal.error is None and journal.healthy
            assert told, "the readers on other connections were not told"
            await assert_written_once(promoted, driver)
            await journal.close()
        finally:
            await old.execute_command("REPLICAOF", "NO", "ONE")
            await old.config_set("replica-serve-stale-data", "yes")
            await old.config_set("repl-diskless-sync-delay", 5)
            for c in (client, old, promoted):
                await c.aclose()
            await proxy.close()

    try:
        run(scenario())
    finally:
        new.kill()      # its data is not needed, and a Redis asked to stop with a replica
        #                 syncing from it waits for that replica (30 s here)


def test_a_batch_pipelined_behind_a_busy_one_is_written_again_after_it(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Several writes in flight: batch N is answered BUSY; the script ends; batch N+1,
    sent before N's reply was read, runs and finds the journal short of N (`GAP`). It did
    not run either: both are written again, in order (the GAP stopped the journal; found
    in review)."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 22, max_retry_delay=0.1,
                                               max_inflight=4)
        await play(driver, journal, 50)
        async with _busy(redis_server, 800) as busy:
            await asyncio.sleep(0.3)                   # past the threshold
            first = _append(driver, journal, 1)        # N: sent, answered BUSY
            await asyncio.sleep(0)
            time.sleep(0.8)        # the loop does not read N's answer; the script ends
            second = _append(driver, journal, 1)       # N+1: sent before N's answer is read
            await asyncio.wait_for(asyncio.gather(*first, *second), 10)
            assert await busy == 1
        assert journal.error is None and journal.written_seq == driver.engine.seq
        await assert_written_once(client, driver)
        await journal.close()
        await client.aclose()
    run(scenario())


async def _acked_then_down(redis_server: LocalRedis, seed: int
                           ) -> tuple[aioredis.Redis, Journal, Driver]:
    client, journal, driver = await opened(redis_server, seed, max_retry_delay=0.1)
    await play(driver, journal, 300)
    assert journal.written_seq == driver.engine.seq > 100
    return client, journal, driver


def _append(driver: Driver, journal: Journal, n: int) -> list[asyncio.Future[int]]:
    futures = []
    for _ in range(20 * n):
        out = driver.step()
        if out.entry is not None:
            futures.append(journal.append(out.entry, out.trades))
            if len(futures) == n:
                break
    return futures


def _assert_journal_stopped(futures: list[asyncio.Future[int]], journal: Journal,
                            caplog: pytest.LogCaptureFixture) -> None:
    assert futures and all(f.done() for f in futures)
    for f in futures:
        assert isinstance(f.exception(), JournalLost)
    assert not journal.healthy
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert any("journal stopped" in m and "lost writes" in m for m in critical), critical


@WINDOWS
def test_a_skip_is_journaled_as_the_numbers_it_uses_up_and_recovered_past(
        redis_server: LocalRedis, window: int) -> None:
    """ADR 29: the batch of a `skip` has the journal id of the last number skipped and
    counts every number it uses up, so a journal restarted right after it finds all it
    acknowledged, the next batch follows it without a gap, the journal's first command is
    still known when it is the skip, and recovery, with or without a snapshot, numbers
    on after it."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 41, max_inflight=window)
        await play(driver, journal, 300, snapshot_every=100)
        before = driver.engine.seq
        last = before + 1_000
        out = driver.submit(ADMIN, wire.Skip(last=last))
        assert out.entry is not None and driver.engine.seq == last
        assert await journal.append(out.entry, out.trades) == last
        assert journal.written_seq == last
        await journal.close()
        newest = (await client.xrevrange(KEYS.journal, count=1))[0]
        assert newest[0] == b"%d-0" % last and newest[1][b"n"] == b"%d" % (last - before)
        # A restart right after the skip: Redis holds all that was acknowledged.
        recovered = await recover(client, KEYS)
        assert recovered.engine.seq == last
        assert snapshot.state_hash(recovered.engine) == snapshot.state_hash(driver.engine)
        journal = Journal(client, KEYS, written_seq=last, max_inflight=window)
        journal.start()
        await play(driver, journal, 300)
        assert journal.error is None
        after = [e.seq for e in driver.entries if e.seq > before + 1]
        assert after[0] == last + 1 and after == list(range(last + 1, driver.engine.seq + 1))
        assert all(t.seq > last for t in driver.trades if t.seq > before)
        await assert_written_once(client, driver)
        live = snapshot.state_hash(driver.engine)
        for use_snapshot in (True, False):
            again = await recover(client, KEYS, use_snapshot=use_snapshot)
            assert snapshot.state_hash(again.engine) == live
        assert await stored_seq(client, KEYS) <= before
        assert await store(client, KEYS, driver.engine)       # past the skip: it is read
        assert snapshot.state_hash((await recover(client, KEYS)).engine) == live
        # Trimmed up to the skip, the journal still says where it starts.
        await client.xtrim(KEYS.journal, minid=f"{last}-0", approximate=False)
        assert await journal_start(client, KEYS) == before + 1
        await journal.close()
        await client.aclose()
    run(scenario())


def test_redis_back_with_less_data_stops_the_journal(
        redis_server: LocalRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Redis restarted empty while a write is being retried: JournalLost, nothing acked."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")
    fresh = LocalRedis(tmp_path / "empty", port=redis_server.port, durability="always")

    async def scenario() -> None:
        client, journal, driver = await _acked_then_down(redis_server, seed=7)
        await asyncio.to_thread(redis_server.kill)
        futures = _append(driver, journal, 20)
        await asyncio.sleep(0.3)                         # retrying against no Redis
        assert not any(f.done() for f in futures)
        await asyncio.to_thread(fresh.start)             # same port, no data
        await asyncio.wait(futures, timeout=10)
        _assert_journal_stopped(futures, journal, caplog)
        later = _append(driver, journal, 5)              # nothing is acknowledged any more
        await asyncio.wait(later, timeout=0.5)
        assert not any(f.done() and f.exception() is None for f in later)
        assert await client.xlen(KEYS.journal) == 0      # and nothing written over the hole
        await client.aclose()

    try:
        run(scenario())
    finally:
        fresh.stop()


def test_redis_back_with_less_data_while_idle_stops_the_journal(
        redis_server: LocalRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Redis replaced by an empty one between two writes: the next write must not land
    on top of the hole (seq N+1 in an empty journal cannot be recovered)."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")
    fresh = LocalRedis(tmp_path / "empty", port=redis_server.port, durability="always")

    async def scenario() -> None:
        client, journal, driver = await _acked_then_down(redis_server, seed=8)
        await asyncio.to_thread(redis_server.kill)
        await asyncio.to_thread(fresh.start)             # same port, no data
        futures = _append(driver, journal, 20)
        await asyncio.wait(futures, timeout=10)
        try:
            _assert_journal_stopped(futures, journal, caplog)
            assert await client.xlen(KEYS.journal) == 0
        finally:
            await client.aclose()

    try:
        run(scenario())
    finally:
        fresh.stop()


# --- the command line -----------------------------------------------------------------


def matcher_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def parse_replay(out: str) -> tuple[int, int, int, str]:
    """(seq, snapshot seq, replayed, state hash) of `matcher replay`'s report."""
    m = re.search(r"seq (\d+)\s+snapshot (\d+)\s+replayed (\d+) commands", out)
    h = re.search(r"state hash ([0-9a-f]{64})", out)
    assert m and h, out
    return int(m[1]), int(m[2]), int(m[3]), h[1]


def test_the_gateway_logs_the_state_hash_a_replay_prints(
        server: ServerProcess, redis_server: LocalRedis) -> None:
    """The runbook's check compares a replay's hash with the gateway's own state at the
    same sequence number, which nothing showed (found in an operator's audit): each
    snapshot it stores is logged with the state's hash."""
    from tests.test_service import bid_answer
    assert run(bid_answer(server, "b1"))["type"] == "accepted"
    assert server.terminate() == 0
    logged = re.search(r"snapshot written at seq (\d+) \(at shutdown\), state hash "
                       r"([0-9a-f]{64})", server.log.read_text())
    assert logged, server.log.read_text()[-2000:]
    seq, _snapshot, _replayed, replayed = parse_replay(
        matcher_cli("replay", "--redis-url", redis_server.url, "--full"))
    assert (seq, replayed) == (int(logged[1]), logged[2])
    assert f"stopped at seq {seq}, exit status 0" in server.log.read_text()   # the last word


def test_cli_replay_and_snapshot(redis_server: LocalRedis) -> None:
    driver = Driver(seed=9)

    run(write_trades(redis_server, driver, 1500))
    seq, live = driver.engine.seq, snapshot.state_hash(driver.engine)
    url = redis_server.url
    out = matcher_cli("replay", "--redis-url", url)
    assert parse_replay(out) == (seq, 0, seq, live)
    orders = sum(len(b) for b in driver.engine.books.values())
    assert f"segments 4  resting orders {orders}  " in out
    assert parse_replay(matcher_cli("replay", "--redis-url", url, "--full")) == (seq, 0, seq, live)

    out = matcher_cli("snapshot", "--redis-url", url)
    assert parse_replay(out) == (seq, 0, seq, live)
    assert f"snapshot written at seq {seq}" in out
    assert parse_replay(matcher_cli("replay", "--redis-url", url)) == (seq, seq, 0, live)

    run(write_trades(redis_server, driver, 500))             # the journal moves on
    seq2, live2 = driver.engine.seq, snapshot.state_hash(driver.engine)
    assert seq2 > seq
    assert parse_replay(matcher_cli("replay", "--redis-url", url)) == (seq2, seq, seq2 - seq,
                                                                      live2)
    assert parse_replay(matcher_cli("replay", "--redis-url", url, "--full")) == (seq2, 0, seq2,
                                                                                live2)


def test_cli_fills_prints_a_participants_loans(redis_server: LocalRedis) -> None:
    driver = Driver(seed=5)
    run(write_trades(redis_server, driver, 1500))
    sme = SMES[0]
    own = [t for t in driver.trades if t.sme == sme]
    assert len(own) > 25
    url = redis_server.url
    newest = matcher_cli("fills", "--redis-url", url, "--participant", str(sme))
    assert newest.splitlines() == [describe(t) for t in own[-20:]]
    everything = matcher_cli("fills", "--redis-url", url, "--participant", str(sme),
                             "--after", "0-0")
    assert everything.splitlines() == [describe(t) for t in own]
    some = matcher_cli("fills", "--redis-url", url, "--participant", str(sme),
                       "--after", own[2].trade_id, "--limit", "3")
    assert some.splitlines() == [describe(t) for t in own[3:6]]
    bad = subprocess.run([sys.executable, "-m", "service.cli", "fills", "--redis-url", url,
                          "--participant", str(sme), "--after", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'3' is not a trade id" in bad.stderr
    too_many = subprocess.run([sys.executable, "-m", "service.cli", "fills", "--redis-url", url,
                               "--participant", str(sme), "--limit", "101"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert too_many.returncode == 2 and "the newest 100 at most" in too_many.stderr


def test_a_snapshot_replaces_only_an_older_one(redis_server: LocalRedis) -> None:
    """`matcher snapshot` beside a live gateway and its snapshotter: whoever stores
    last, the stored snapshot is the one that covers the most of the journal."""
    driver = Driver(seed=4)
    run(write_trades(redis_server, driver, 300))
    keys = KEYS

    async def go() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            behind = (await recover(client, keys)).engine
            await write_trades(redis_server, driver, 100)     # the gateway journals on
            current = (await recover(client, keys)).engine
            assert current.seq == driver.engine.seq > behind.seq
            assert await store(client, keys, current)
            assert not await store(client, keys, behind)      # late, and older
            assert not await store(client, keys, current)     # no newer than stored
            assert await stored_seq(client, keys) == current.seq
            assert (await recover(client, keys)).snapshot_seq == current.seq
            await write_trades(redis_server, driver, 50)
            assert await store(client, keys, (await recover(client, keys)).engine)
            assert await stored_seq(client, keys) == driver.engine.seq > current.seq
        finally:
            await client.aclose()
    run(go())


# --- a journal that has stopped ------------------------------------------------------


def test_a_write_that_cannot_be_sent_fails_its_commands(
        redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send that raises (a bug in packing, say) stops the journal. Its batch was taken
    from the pending commands but not yet in the window, so the stop failed nothing and
    its commands waited for ever, answered neither way (found in review)."""
    async def scenario() -> list[asyncio.Future[int]]:
        client, journal, driver = await opened(redis_server, 21)

        def broken(*args: Any, **kwargs: Any) -> bytes:
            raise ValueError("cannot pack")

        monkeypatch.setattr(journal, "_pack", broken)
        futures = _append(driver, journal, 3)
        await asyncio.wait(futures, timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(journal.close(), 2)
        await client.aclose()
        return futures

    futures = run(scenario())
    assert futures and all(f.done() and isinstance(f.exception(), ValueError)
                           for f in futures), futures


def test_a_stopped_journal_fails_what_comes_later_and_closes(
        redis_server: LocalRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Once stopped (JournalLost), the journal fails what is appended after, and
    `close()` returns: a stopped journal must not keep
    `matcher serve` from exiting."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")
    fresh = LocalRedis(tmp_path / "empty", port=redis_server.port, durability="always")

    async def scenario() -> None:
        client, journal, driver = await _acked_then_down(redis_server, seed=11)
        await asyncio.to_thread(redis_server.kill)
        futures = _append(driver, journal, 20)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(fresh.start)
        await asyncio.wait(futures, timeout=10)
        _assert_journal_stopped(futures, journal, caplog)
        later = _append(driver, journal, 5)
        try:
            await asyncio.wait(later, timeout=2)
            assert all(f.done() and f.exception() is not None for f in later), \
                "appended after the journal stopped: neither acknowledged nor failed"
            with contextlib.suppress(JournalLost):
                await asyncio.wait_for(journal.close(), 2)
        finally:
            await client.aclose()

    try:
        run(scenario())
    finally:
        fresh.stop()


def test_serve_exits_on_sigterm_after_its_journal_stopped(
        redis_server: LocalRedis, tmp_path: Path) -> None:
    fresh = LocalRedis(tmp_path / "empty", port=redis_server.port, durability="always")
    port = free_port()
    config = write_config(tmp_path / "matcher.toml", redis_server.url, port)
    server = ServerProcess(config, port, tmp_path / "server.log").start()
    try:
        redis_server.kill()
        fresh.start()                                    # Redis back with nothing

        async def one_command() -> None:
            async with ws_connect(server.ws_url, close_timeout=1,
                                  additional_headers={"Authorization": "Bearer key-f11"}) as ws:
                await asyncio.wait_for(ws.recv(), 5)     # welcome
                await ws.send(json.dumps({"type": "set_credit_line", "core": "DFM",
                                          "amount": 100}))
                deadline = time.monotonic() + 10
                while "Redis lost writes" not in server.log.read_text():
                    assert time.monotonic() < deadline, "the journal did not stop"
                    await asyncio.sleep(0.05)
                # Its line was set in the engine, never written: answered `unconfirmed`,
                # and no read shows it now.
                before = []
                for read in ({"type": "status"},
                             {"type": "quote", "segment": "DFM-30D", "amount": 1, "ref": "q"}):
                    await ws.send(json.dumps(read))
                    while (got := json.loads(await asyncio.wait_for(ws.recv(), 5)))[
                            "type"] != "error":
                        before.append(got)
                    assert got["code"] == "unavailable" and got["ref"] == read.get("ref"), got
                assert [(m["type"], m["client_id"]) for m in before] == [
                    ("unconfirmed", None)], before

        run(one_command())
        assert server.get("/health")[0] == 503
        assert server.get("/v1/segments")[0] == 503
        try:
            server.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("matcher serve still running 15 s after SIGTERM; its journal had "
                        "stopped: " + server.log.read_text()[-600:])
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()
        fresh.stop()


def test_an_entry_refused_on_replay_is_named_with_the_reason() -> None:
    """The reason was dropped for "written by a different engine version", which may be
    wrong (found in review): the command, its participant and the refusal are named."""
    from service.recovery import _apply

    engine = Engine([])
    entry = wire.JournalEntry(1, 10, 11, wire.Bid(client_id="b1", segment="ACME-30D",
                                                  rate_bps=250, amount=100))
    with pytest.raises(RuntimeError) as refused:
        _apply(engine, [entry], "Redis")
    assert ("journal seq 1 (bid of participant 11) is rejected on replay (unknown_segment "
            "at $.segment: no segment 'ACME-30D')") in str(refused.value)
    assert engine.seq == 0


def test_an_entry_journaled_before_a_bound_was_tightened_still_replays() -> None:
    """The journal's decoder checked today's bounds of the wire types: a segment id
    ending in a newline, journaled before ids could not, no longer decoded, and the
    journal no longer replayed (found in review). Such an entry is decoded without the
    bounds; what the engine's rules refuse still fails, and a field missing still does."""
    raw = msgspec.msgpack.encode([
        [1, 10, 1, {"type": "add_segment", "segment": "X-30\n", "core": "X",
                    "tenor_days": 30, "rate_cap_bps": 3600}],
        [2, 11, 11, {"type": "set_credit_line", "core": "X", "amount": 1_000}],
        [3, 12, 11, {"type": "bid", "client_id": "b" * 70, "segment": "X-30\n",
                     "rate_bps": 250, "amount": 100}]])
    with pytest.raises(msgspec.ValidationError, match=r"\$\[0\]\[3\]\.segment"):
        wire.journal_decoder.decode(raw)
    entries = wire.decode_journal(raw)
    assert [type(e.command) for e in entries] == [wire.AddSegment, wire.SetCreditLine,
                                                  wire.Bid]
    engine = Engine([])
    assert all(engine.apply(e).accepted for e in entries)
    assert engine.books["X-30\n"].depth() == [(250, 100, 1)]
    with pytest.raises(msgspec.ValidationError, match="client_id"):
        wire.decode_journal(msgspec.msgpack.encode([[4, 13, 11, {"type": "cancel"}]]))
    # Optional fields too (`X | None` is a typing.Union, which a first version kept
    # bounded; found in review).
    optional = wire.decode_journal(msgspec.msgpack.encode([
        [4, 13, 11, {"type": "cancel_all", "segment": "S" * 40}],
        [5, 14, 11, {"type": "amend", "client_id": "c", "amount": 10**13}],
        [6, 15, 21, {"type": "ask", "client_id": "a", "segment": "X-30\n",
                     "amount": 5, "max_rate_bps": 20_000}]]))
    assert [(e.seq, type(e.command)) for e in optional] == [
        (4, wire.CancelAll), (5, wire.Amend), (6, wire.Ask)]
    assert optional[0].command.segment == "S" * 40                  # type: ignore[union-attr]
    assert optional[2].command.max_rate_bps == 20_000               # type: ignore[union-attr]


def test_a_journal_batch_read_without_todays_bounds_is_logged(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Read from Redis, such a batch replays, and the operator hears of it."""
    caplog.set_level(logging.WARNING, logger="matcher.journal")
    raw = msgspec.msgpack.encode([
        [1, 10, 1, {"type": "add_segment", "segment": "X-30\n", "core": "X",
                    "tenor_days": 30, "rate_cap_bps": 3600}]])

    async def scenario() -> list[wire.JournalEntry]:
        client = connect(redis_server)
        await client.delete(KEYS.journal)
        await client.xadd(KEYS.journal, {"e": raw, "n": 1}, id="1-0")
        try:
            return await journaled(client)
        finally:
            await client.delete(KEYS.journal)
            await client.aclose()

    entries = run(scenario())
    assert [(e.seq, e.command) for e in entries] == [(1, wire.AddSegment(
        segment="X-30\n", core="X", tenor_days=30, rate_cap_bps=3600))]
    assert any("fails this version's bounds" in r.getMessage() for r in caplog.records)
