"""Journal throughput (group commit) and full recovery time, against a real redis-server
with `appendfsync always`.

Baselines measured in the same run: for the journal, one awaited XADD per command (no
group commit); for recovery, reading and decoding the journal without applying it, so the
ratio shows what the engine itself costs. With `--benchmark-disable` (the normal test run)
the sizes shrink so the suite stays fast, and each case still checks its result.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from matcher import protocol as wire
from matcher.engine import Engine
from matcher.snapshot import state_hash
from service.journal import Journal, Keys, read_journal
from service.localredis import LocalRedis
from service.recovery import recover
from tests.conftest import run

SEGMENTS = [wire.AddSegment(segment=f"{core}-{tenor}D", core=core, tenor_days=tenor)
            for core in ("DFM", "CRRC", "SGCC") for tenor in (30, 90, 180)]
FUNDERS = range(1001, 1068)


def commands(n: int, seed: int = 3) -> Iterator[tuple[int, str, Any]]:
    """Opening segments and lines, then the same-day mix: mostly bids, some SME asks."""
    rng = random.Random(seed)
    for seg in SEGMENTS:
        yield 1, "admin", seg
    for funder in FUNDERS:
        for core in ("DFM", "CRRC", "SGCC"):
            yield funder, "funder", wire.SetCreditLine(core=core, amount=10**14)
    for i in range(n):
        seg = SEGMENTS[rng.randrange(len(SEGMENTS))].segment
        if rng.random() < 0.8:
            yield (rng.choice(FUNDERS), "funder",
                   wire.Bid(client_id=f"b{i}", segment=seg, rate_bps=220 + rng.randrange(80),
                            amount=rng.randrange(10**8, 5 * 10**8), tif="day"))
        else:
            yield (100_001 + rng.randrange(6_300), "sme",
                   wire.Ask(client_id=f"a{i}", segment=seg,
                            amount=int(rng.lognormvariate(18.8, 0.6)) + 1))


async def journal_all(client: aioredis.Redis, keys: Keys, n: int, group: bool) -> Engine:
    """Submit `n` commands; with `group`, through the group-commit journal."""
    engine = Engine()
    # As the gateway writes: each write's script checks the writer lease (ADR 31).
    journal = Journal(client, keys, writer="bench", writer_ttl_ms=600_000)
    journal.start()
    last: asyncio.Future[int] | None = None
    for ts, (who, role, cmd) in enumerate(commands(n)):
        out = engine.submit(who, role, cmd, ts)  # type: ignore[arg-type]
        assert out.entry is not None
        if group:
            last = journal.append(out.entry, out.trades)
            if journal.backlog >= 5_000:        # a gateway would be receiving meanwhile
                await asyncio.sleep(0)
        else:
            await client.xadd(keys.journal, {"e": wire.journal_encoder.encode([out.entry])},
                              id=f"{out.entry.seq}-0")
    if last is not None:
        await last
    await journal.close()
    return engine


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = LocalRedis(Path(tmp_path_factory.mktemp("bench-redis")), durability="always")
    server.start()
    yield server.url
    server.stop()


async def fresh(url: str, keys: Keys) -> aioredis.Redis:
    client = aioredis.Redis.from_url(url)
    await client.delete(keys.journal, keys.fills, keys.snapshot,
                        *await client.keys(keys.fills_of(0)[:-1] + "*"))
    return client


@pytest.mark.parametrize("mode", ["group-commit", "xadd-per-command"])
def test_journal_throughput(benchmark: Any, redis_url: str, mode: str) -> None:
    n = 5_000 if benchmark.disabled else (100_000 if mode == "group-commit" else 20_000)
    keys = Keys("bench")
    benchmark.group = "journal"
    benchmark.extra_info["commands"] = n

    def once() -> int:
        async def go() -> int:
            client = await fresh(redis_url, keys)
            try:
                engine = await journal_all(client, keys, n, group=mode == "group-commit")
                assert await client.xlen(keys.journal) >= 1
                return engine.seq
            finally:
                await client.aclose()
        return run(go(), timeout=600)

    seq = benchmark.pedantic(once, rounds=3)
    assert seq == n + len(SEGMENTS) + 3 * len(FUNDERS)


@pytest.fixture(scope="module")
def journaled(redis_url: str, request: pytest.FixtureRequest) -> tuple[int, str]:
    """A journal of a million commands (fewer when benchmarks are off) and its state hash."""
    disabled = request.config.getoption("benchmark_disable", False)
    n = 20_000 if disabled else 1_000_000
    keys = Keys("recovery")

    async def go() -> tuple[int, str]:
        client = aioredis.Redis.from_url(redis_url)
        try:
            engine = await journal_all(client, keys, n, group=True)
            return engine.seq, state_hash(engine)
        finally:
            await client.aclose()
    return run(go(), timeout=1200)


@pytest.mark.parametrize("mode", ["recover", "read-and-decode-only"])
def test_full_recovery(benchmark: Any, redis_url: str, journaled: tuple[int, str],
                       mode: str) -> None:
    seq, digest = journaled
    keys = Keys("recovery")
    benchmark.group = "recovery"
    benchmark.extra_info["commands"] = seq

    def once() -> Engine | int:
        async def go() -> Engine | int:
            client = aioredis.Redis.from_url(redis_url)
            try:
                if mode == "recover":
                    return (await recover(client, keys, use_snapshot=False)).engine
                count = 0
                async for entries in read_journal(client, keys):
                    count += len(entries)
                return count
            finally:
                await client.aclose()
        return run(go(), timeout=600)

    result = benchmark.pedantic(once, rounds=3)
    if isinstance(result, Engine):
        assert (result.seq, state_hash(result)) == (seq, digest)
    else:
        assert result == seq
