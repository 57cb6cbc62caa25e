"""SIGKILL of `matcher serve` in the middle of a load, then a restart on the same Redis.

Several WebSocket clients (funders bidding, SMEs asking IOC) keep commands in flight; the
server is killed after a number of acknowledgements. After the restart: every
acknowledged command is there (a retry with its client id answers `duplicate` with the
same order id), an unacknowledged command is either wholly journaled or absent, the
platform's fill stream is exactly the trades the journal regenerates (no fill twice, under
one id or two), and recovery with the snapshot equals a full replay.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from matcher import protocol as wire
from matcher import snapshot
from matcher.engine import Engine
from service.journal import Keys, read_journal
from service.localredis import LocalRedis, free_port
from service.recovery import recover
from service.snapshots import stored_seq
from tests.conftest import PARTICIPANTS, SEGMENTS, ServerProcess, run, write_config

KEYS = Keys("main")
M = 1_000_000
FUNDERS = (11, 12, 13)
SMES = (21, 22)
KILL_AFTER = 3000        # acknowledgements before the SIGKILL (snapshot_every is 1000),
                         # and a snapshot stored by the snapshotter
WINDOW = 40              # commands each client keeps in flight


def headers(pid: int) -> dict[str, str]:
    return {"Authorization": f"Bearer {PARTICIPANTS[pid][2]}"}


@dataclass
class Client:
    """One participant's connection under load: what it sent and what was acknowledged."""

    pid: int
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)   # client id -> message
    acked: dict[str, int] = field(default_factory=dict)             # client id -> order id
    answered: set[str] = field(default_factory=set)                 # acked or rejected
    rejected: list[dict[str, Any]] = field(default_factory=list)


def message(pid: int, n: int, rng: random.Random) -> dict[str, Any]:
    segment, _core, tenor = rng.choice(SEGMENTS)
    base = 250 + tenor // 3
    cid = f"load-{pid}-{n}"
    if pid in FUNDERS:
        return {"type": "bid", "client_id": cid, "segment": segment,
                "rate_bps": base + rng.randint(-25, 25), "amount": rng.randint(1, 40) * M,
                "tif": rng.choice(("gtc", "gtc", "day"))}
    return {"type": "ask", "client_id": cid, "segment": segment,
            "amount": rng.randint(1, 60) * M, "tif": "ioc",
            "max_rate_bps": None if rng.random() < 0.2 else base + rng.randint(-30, 30)}


async def welcome(ws: ClientConnection) -> None:
    first = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert first["type"] == "welcome", first


async def set_credit_lines(url: str) -> None:
    for pid in FUNDERS:
        async with connect(url, additional_headers=headers(pid)) as ws:
            await welcome(ws)
            for core in sorted({core for _, core, _ in SEGMENTS}):
                await ws.send(json.dumps({"type": "set_credit_line", "core": core,
                                          "amount": 10**13}))
            answered = 0          # each line's `accepted`, then its `line` event
            while answered < 4:
                reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert reply["type"] in ("accepted", "line", "book"), reply
                answered += reply["type"] != "book"


async def load(url: str, clients: list[Client], total_acks: list[int],
               killed: asyncio.Event) -> None:
    """Send with WINDOW commands in flight until the connection dies (or 30 s pass)."""
    async def one(client: Client) -> None:
        rng = random.Random(client.pid)
        deadline = time.monotonic() + 30
        # close_timeout: the server is SIGKILLed, no closing handshake will come back
        async with connect(url, additional_headers=headers(client.pid), close_timeout=1) as ws:
            await welcome(ws)
            n = 0
            try:
                while time.monotonic() < deadline and not killed.is_set():
                    while len(client.sent) - len(client.answered) < WINDOW:
                        msg = message(client.pid, n, rng)
                        n += 1
                        client.sent[msg["client_id"]] = msg
                        await ws.send(json.dumps(msg))
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if reply["type"] == "accepted":
                        assert not reply["duplicate"], reply
                        client.acked[reply["client_id"]] = reply["order_id"]
                        client.answered.add(reply["client_id"])
                        total_acks[0] += 1
                    elif reply["type"] == "rejected":
                        client.rejected.append(reply)
                        client.answered.add(reply["client_id"])
            except ConnectionClosed:
                pass

    await asyncio.gather(*(one(c) for c in clients))


async def resend(url: str, client: Client, client_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Send the same commands again; return the `accepted` reply for each client id.

    Only replies about an order itself count (`seq == order_id`): the `accepted` of a
    cancel (the cancel-on-disconnect of an earlier connection) names the cancelled
    order's client id too, under a later seq.
    """
    got: dict[str, dict[str, Any]] = {}
    async with connect(url, additional_headers=headers(client.pid)) as ws:
        await welcome(ws)
        for cid in client_ids:
            await ws.send(json.dumps(client.sent[cid]))
        deadline = time.monotonic() + 20
        while len(got) < len(client_ids) and time.monotonic() < deadline:
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["type"] not in ("rejected", "error"), reply
            if reply["type"] == "accepted" and reply["seq"] == reply["order_id"]:
                assert reply["client_id"] not in got, reply
                got[reply["client_id"]] = reply
    return got


def trade_key(trade: wire.Trade) -> tuple[Any, ...]:
    """Everything of a trade but its id: the same loan under two ids has the same key."""
    return tuple(getattr(trade, f) for f in wire.Trade.__struct_fields__ if f != "trade_id")


async def read_back(url: str) -> tuple[list[wire.JournalEntry], list[tuple[str, wire.Trade]],
                                       str, str, int]:
    """The journal, the fill stream, hashes of recovery with snapshot and full replay."""
    client = aioredis.Redis.from_url(url)
    try:
        entries = [e async for batch in read_journal(client, KEYS) for e in batch]
        rows = await client.xrange(KEYS.fills)
        fills = [(entry_id.decode(),
                  msgspec.convert({k.decode(): v.decode() for k, v in fields.items()},
                                  wire.Trade, strict=False)) for entry_id, fields in rows]
        with_snapshot = await recover(client, KEYS, use_snapshot=True)
        full = await recover(client, KEYS, use_snapshot=False)
        assert with_snapshot.engine.seq == full.engine.seq == len(entries)
        return (entries, fills, snapshot.state_hash(with_snapshot.engine),
                snapshot.state_hash(full.engine), with_snapshot.snapshot_seq)
    finally:
        await client.aclose()


async def assert_own_streams(url: str, trades: list[wire.Trade]) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        for pid in FUNDERS + SMES:
            rows = await client.xrange(KEYS.fills_of(pid))
            assert [i.decode() for i, _ in rows] == \
                [t.trade_id for t in trades if pid in (t.funder, t.sme)], pid
    finally:
        await client.aclose()


def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path,
                                                         redis_server: LocalRedis) -> None:
    port = free_port()
    config = write_config(tmp_path / "matcher.toml", redis_server.url, port)
    server = ServerProcess(config, port, tmp_path / "server.log").start()
    clients = [Client(pid) for pid in FUNDERS + SMES]
    in_flight_at_kill = 0

    async def until_killed() -> None:
        nonlocal in_flight_at_kill
        await set_credit_lines(server.ws_url)
        total_acks, killed = [0], asyncio.Event()
        loader = asyncio.create_task(load(server.ws_url, clients, total_acks, killed))
        deadline = time.monotonic() + 30
        redis = aioredis.Redis.from_url(redis_server.url)
        stored = 0
        while ((total_acks[0] < KILL_AFTER or not stored) and time.monotonic() < deadline
               and not loader.done()):
            await asyncio.sleep(0.001)
            if total_acks[0] >= KILL_AFTER:
                stored = await stored_seq(redis, KEYS)
        await redis.aclose()
        assert total_acks[0] >= KILL_AFTER and stored, server.log.read_text()[-3000:]
        assert server.process is not None
        server.process.kill()                                   # SIGKILL, mid-load
        in_flight_at_kill = sum(len(c.sent) - len(c.answered) for c in clients)
        killed.set()
        await asyncio.to_thread(server.process.wait, 10)
        await asyncio.wait_for(loader, 15)

    try:
        run(until_killed())
        assert in_flight_at_kill > 0
        assert server.process is not None and server.process.returncode == -9

        entries, fills, recovered_hash, full_hash, snapshot_seq = run(read_back(redis_server.url))

        # recovery through the snapshot written under load equals a full replay
        assert snapshot_seq > 0
        assert recovered_hash == full_hash

        # every acknowledged command is in the journal, under the order id acknowledged
        journaled: dict[tuple[int, str], int] = {}
        for e in entries:
            cid = getattr(e.command, "client_id", None)
            if isinstance(e.command, wire.Bid | wire.Ask):
                assert (e.participant, cid) not in journaled, f"{cid} journaled twice"
                journaled[(e.participant, cid)] = e.seq
        for c in clients:
            for cid, order_id in c.acked.items():
                assert journaled.get((c.pid, cid)) == order_id, cid
        # and nothing the clients did not send got in
        sent = {(c.pid, cid) for c in clients for cid in c.sent}
        assert set(journaled) <= sent

        # the fill stream is exactly the trades of the journaled commands
        engine, regenerated = Engine(), []
        for e in entries:
            out = engine.apply(e)
            assert out.accepted
            regenerated.extend(out.trades)
        assert len(regenerated) > 100
        ids = [trade_id for trade_id, _ in fills]
        assert len(ids) == len(set(ids)), "a trade id twice in the fill stream"
        keys = [trade_key(t) for _, t in fills]
        assert len(keys) == len(set(keys)), "the same fill under two trade ids"
        assert all(trade_id == t.trade_id for trade_id, t in fills)
        assert [t for _, t in fills] == regenerated
        # and each participant's own stream holds exactly its trades, in order, once
        run(assert_own_streams(redis_server.url, regenerated))

        # restart on the same Redis: it serves exactly the journal
        server = ServerProcess(config, port, tmp_path / "server2.log").start()
        status, body = server.get("/health")
        assert status == 200 and json.loads(body)["seq"] == len(entries) + 1   # + `resume`

        async def after_restart() -> None:
            for c in clients:
                # an unacknowledged command was applied wholly (duplicate) or not at all
                rejected = {r["client_id"] for r in c.rejected}
                unacked = sorted(set(c.sent) - set(c.acked) - rejected)
                got = await resend(server.ws_url, c, sorted(c.acked) + unacked)
                assert set(got) == set(c.acked) | set(unacked)
                for cid, order_id in c.acked.items():
                    assert got[cid]["duplicate"] is True, got[cid]
                    assert got[cid]["order_id"] == order_id
                for cid in unacked:
                    journaled_id = journaled.get((c.pid, cid))
                    assert got[cid]["duplicate"] is (journaled_id is not None), got[cid]
                    if journaled_id is not None:
                        assert got[cid]["order_id"] == journaled_id

        run(after_restart())
        status, body = server.get("/health")
        assert status == 200
        assert server.terminate() == 0
        entries2, fills2, recovered2, full2, _ = run(read_back(redis_server.url))
        assert entries2[:len(entries)] == entries
        assert fills2[:len(fills)] == fills
        assert recovered2 == full2
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


def test_after_redis_lost_acknowledged_writes_no_order_or_trade_id_is_given_again(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """The runbook's "Redis lost acknowledged writes" with no copy that holds them (ADR
    29): Redis comes back from an older copy under a running gateway, whose log names
    `M`, the last command it acknowledged; started with `--lost-up-to M`, the gateway
    gives the next orders and loans numbers after M, never those of the lost ones, and a
    later start with the flag still on skips nothing more."""
    import shutil

    from tests.test_service import F11, SME_X, ask, bid, line, session

    port = free_port()
    config = write_config(tmp_path / "matcher.toml", redis_server.url, port)
    log = tmp_path / "server.log"

    async def trade(server: ServerProcess, n: int, tag: str) -> tuple[list[int], list[str]]:
        """n loans; the order ids and trade ids they got."""
        orders: list[int] = []
        trades: list[str] = []
        async with session(server, F11) as funder, session(server, SME_X) as sme:
            if tag == "a":
                await funder.ok(line("DFM"))
            for i in range(n):
                orders.append((await funder.ok(bid(f"{tag}-b{i}", "DFM-90D", 250,
                                                   1_000_000)))["order_id"])
                orders.append((await sme.ok(ask(f"{tag}-a{i}", "DFM-90D", 1_000_000,
                                                tif="ioc")))["order_id"])
                trades.append((await sme.expect("fill"))["trade_id"])
                await sme.expect("done")
                assert (await funder.expect("fill"))["trade_id"] == trades[-1]
                await funder.expect("done")
        return orders, trades

    servers: list[ServerProcess] = []

    def started(*args: str) -> ServerProcess:
        servers.append(ServerProcess(config, port, log, args))
        return servers[-1].start()

    try:
        older = tmp_path / "redis-older"
        server = started()
        run(trade(server, 3, "a"))
        assert server.terminate() == 0
        redis_server.stop()
        shutil.copytree(redis_server.data_dir, older)        # the copy Redis comes back from
        redis_server.start()
        server.start()
        lost_orders, lost_trades = run(trade(server, 4, "b"))
        # Redis lost what it took since the copy: it comes back from it under the gateway.
        redis_server.kill()
        shutil.rmtree(redis_server.data_dir)
        shutil.copytree(older, redis_server.data_dir)
        redis_server.start()

        async def refused() -> re.Match[str]:
            """A command's write finds the loss (the command is answered `unconfirmed`),
            and the gateway refuses the next."""
            async with session(server, F11) as funder:
                await funder.send(bid("c-b0", "DFM-90D", 250, 1_000_000))
                pattern = re.compile(r"Redis journal ends at seq (\d+), but (\d+) was "
                                     "acknowledged")
                for _ in range(200):
                    if found := pattern.search(log.read_text()):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(log.read_text()[-3000:])
                reply = await funder.command(bid("c-b1", "DFM-90D", 250, 1_000_000))
                assert (reply["type"], reply["client_id"]) == ("unconfirmed", "c-b0"), reply
                reply = await funder.recv()
                assert reply["type"] == "rejected" and "journal has stopped" in reply["message"]
                return found
        found = run(refused())
        kept, acknowledged = int(found[1]), int(found[2])
        assert kept < min(lost_orders) and acknowledged >= max(lost_orders)
        server.kill()

        again = started("--lost-up-to", str(acknowledged))
        orders, trades = run(trade(again, 2, "c"))
        assert min(orders) > acknowledged
        assert all(int(t.split("-")[0]) > acknowledged for t in trades)
        assert not set(trades) & set(lost_trades)
        assert again.terminate() == 0
        later = started("--lost-up-to", str(acknowledged))
        more, _ = run(trade(later, 1, "d"))
        assert min(more) > max(orders)
        assert "nothing to skip" in log.read_text()
        assert later.terminate() == 0
    finally:
        for proc in servers:
            if proc.process is not None and proc.process.poll() is None:
                proc.kill()
