"""Two engines, each owning its shard of the market, side by side on one Redis (ADR 7):
what "built to grow past one machine" holds today. Each has its own journal, sequence
numbers, fill streams and snapshots under its own hash tag, and stops and recovers
without the other noticing. Routing a client to the gateway of a segment's shard is
not built: a client connects to each gateway it trades on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from service.localredis import LocalRedis, free_port
from tests.conftest import SEGMENTS, ServerProcess, run, write_config
from tests.test_service import F11, SME_X, ask, bid, line, sessions

#: A shard owns core enterprises with all their segments: lines span a core's tenors.
EAST = [s for s in SEGMENTS if s[1] == "DFM"]
WEST = [s for s in SEGMENTS if s[1] == "SGCC"]


def _server(tmp_path: Path, redis_url: str, shard: str,
            segments: list[tuple[str, str, int]]) -> ServerProcess:
    port = free_port()
    config = write_config(tmp_path / f"{shard}.toml", redis_url, port, shard=shard,
                          segments=segments)
    return ServerProcess(config, port, tmp_path / f"{shard}.log").start()


async def _trade(server: ServerProcess, core: str, segment: str, tag: str) -> list[Any]:
    """A funder's line and bid, and an SME's ask that it fills, on one gateway."""
    async with sessions(server, F11, SME_X) as (f11, sme):
        await f11.ok(line(core))
        await f11.ok(bid(f"b-{tag}", segment, 250, 1_000_000, tif="gtc"))
        accepted = await sme.ok(ask(f"a-{tag}", segment, 1_000_000))
        fill = await sme.expect("fill")
        await sme.expect("done")
        await sme.send({"type": "fills", "limit": 10})
        page = await sme.expect("fills")
        # An ask that rests (no funder lends at 2%): an SME's orders outlive its session.
        await sme.ok(ask(f"rest-{tag}", segment, 2_000_000, max_rate_bps=200, tif="gtc"))
        return [accepted, fill, page]


def test_two_engines_share_one_redis_each_on_its_own_shard(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    east = _server(tmp_path, redis_server.url, "east", EAST)
    west = _server(tmp_path, redis_server.url, "west", WEST)
    try:
        east_trade = run(_trade(east, "DFM", "DFM-30D", "e"))
        west_trade = run(_trade(west, "SGCC", "SGCC-30D", "w"))
        # Each numbers its own commands: the same sequence numbers, apart.
        assert east_trade[0]["seq"] == west_trade[0]["seq"]
        assert east_trade[1]["trade_id"] == west_trade[1]["trade_id"]
        assert east_trade[1]["segment"] == "DFM-30D" and west_trade[1]["segment"] == "SGCC-30D"
        # A participant's fills are read from the shard of the gateway asked.
        assert [f["segment"] for f in east_trade[2]["fills"]] == ["DFM-30D"]
        assert [f["segment"] for f in west_trade[2]["fills"]] == ["SGCC-30D"]
        # A segment of the other shard is not known here.
        async def elsewhere() -> dict[str, Any]:
            async with sessions(east, F11) as (f11,):
                return await f11.command(bid("x", "SGCC-30D", 250, 1_000_000))
        assert run(elsewhere())["code"] == "unknown_segment"

        # East stops; west trades on; east comes back with its resting ask.
        assert east.terminate() == 0
        run(_trade(west, "SGCC", "SGCC-90D", "w2"))
        east.start()

        async def east_status() -> dict[str, Any]:
            async with sessions(east, SME_X) as (sme,):
                await sme.send({"type": "status"})
                status: dict[str, Any] = await sme.expect("status")
                return status
        assert [o["client_id"] for o in run(east_status())["orders"]] == ["rest-e"]
    finally:
        for server in (east, west):
            if server.process is not None and server.process.poll() is None:
                server.terminate()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = set(client.keys("matcher:*"))
    # Every key of a shard carries its hash tag, so that on Redis Cluster each shard's
    # keys share one slot and its journal's script stays legal.
    assert keys and all(k.startswith(("matcher:{east}:", "matcher:{west}:")) for k in keys)
    for shard, trades in (("east", 1), ("west", 2)):
        assert client.xlen(f"matcher:{{{shard}}}:fills") == trades
        assert client.exists(f"matcher:{{{shard}}}:journal", f"matcher:{{{shard}}}:snapshot") == 2
