"""The gateway's own Python per command, in process: the load test's same-day mix through
`Gateway.handle` (decoding, the rate limit, the engine, the journal's batching and the
packing of each write, every reply encoded, framed and written), with the journal's
Redis and the clients' sockets replaced by stand-ins.

The baseline, in the same run, is the same commands decoded and applied to an engine
alone, so the ratio is what the gateway adds around the engine. The load test measures
the server with its I/O; this measures the part of it that is ours, without the noise of
the network and of the other processes (docs/speed.md, "Where the capacity goes"). With
`--benchmark-disable` (the normal test run) it runs fewer commands once and checks that
both paths made the same trades and that every command was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
import uvloop

from loadtest.workload import Market
from loadtest.workload import Segment as LoadSegment
from matcher import protocol as wire
from matcher.engine import Engine
from matcher.participants import Directory, Participant
from service import config
from service.gateway import Gateway
from service.journal import _SCRIPT_SHA, Journal, Keys
from service.metrics import Metrics

FUNDERS, SMES, BIDS_PER_FUNDER = 67, 6_300, 12
BATCH = 12                      # commands a journal write holds at 5,000/s (load test)
DEMO = config.load(None, environ={})
SEGMENTS = [s.segment() for s in DEMO.segments]
PEOPLE = ([Participant(id=1_000 + i, name=f"Funder {i}", role="funder", key_sha256=f"f{i}")
           for i in range(FUNDERS)]
          + [Participant(id=100_000 + i, name=f"SME {i}", role="sme", key_sha256=f"s{i}")
             for i in range(SMES)])
Commands = list[tuple[Participant, bytes]]


@cache
def commands(n: int) -> tuple[Commands, Commands]:
    """(opening, mix): credit lines and bids, then `n` commands of the load test's mix.
    Funders re-quote the bids they still have, so the mix is made against an engine
    that applies it (whose ended orders the funders forget)."""
    market = Market([LoadSegment(s.id, s.core, s.tenor_days) for s in SEGMENTS], FUNDERS,
                    SMES, seed=2026, bids_per_funder=BIDS_PER_FUNDER, run_id="bench")
    engine = Engine(SEGMENTS)
    funders, smes = PEOPLE[:FUNDERS], PEOPLE[FUNDERS:]
    decode, encode = wire.json_decoder.decode, msgspec.json.encode
    opening: Commands = []
    mix: Commands = []

    def send(to: Commands, who: Participant, msg: dict[str, Any]) -> None:
        data = encode(msg)
        out = engine.submit(who.id, who.role, decode(data), len(opening) + len(mix))
        for participant, event in out.replies:
            if isinstance(event, wire.Done) and participant < 100_000:
                market.funders[participant - 1_000].live.pop(event.client_id, None)
        to.append((who, data))

    for f in funders:
        for core in sorted({s.core for s in SEGMENTS}):
            send(opening, f, {"type": "set_credit_line", "core": core, "amount": 2 * 10**12})
    for f, state in zip(funders, market.funders, strict=True):
        for _ in range(BIDS_PER_FUNDER):
            send(opening, f, market.bid(state))
    for _ in range(n):
        if market.rng.random() < 0.3:
            sme, msg = market.ask()
            send(mix, smes[sme], msg)
        else:
            state = market.rng.choice(market.funders)
            send(mix, funders[state.index], market.requote(state))
    return opening, mix


class _Journal(Journal):
    """The journal up to the wire: it batches and packs each write; `land` resolves it."""

    def start(self) -> None:
        pass

    def _batch_future(self) -> asyncio.Future[int]:
        if self._durable is None:
            self._durable = asyncio.get_running_loop().create_future()
        return self._durable

    def land(self) -> None:
        if self._durable is not None:
            batch = self._take()
            self.written += len(self._pack(batch.entries, batch.trades, _SCRIPT_SHA))
            batch.done.set_result(batch.entries[-1].seq)

    written = 0


class _Transport:
    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


async def _gateway() -> tuple[Gateway, _Journal, dict[int, Any]]:
    journal = _Journal(aioredis.Redis(host="127.0.0.1", port=1), Keys("bench"))
    gateway = Gateway(Engine(SEGMENTS), journal, Directory(PEOPLE), DEMO.limits, Metrics())
    conns = {p.id: gateway.attach(None, _Transport(), p)  # type: ignore[arg-type]
             for p in PEOPLE}
    return gateway, journal, conns


async def _through_gateway(gateway: Gateway, journal: _Journal, conns: dict[int, Any],
                           cmds: Commands) -> None:
    for i in range(0, len(cmds), BATCH):
        for who, data in cmds[i:i + BATCH]:
            gateway.handle(conns[who.id], data, time.perf_counter())
        journal.land()
        await asyncio.sleep(0)          # the batch's replies are delivered
        await asyncio.sleep(0)          # ... and written, one write per connection


@contextlib.contextmanager
def _without_gc() -> Iterator[None]:
    """As the server runs: automatic collection off (`service.gctune`)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def gateway_path(n: int) -> tuple[Callable[[], Any], Callable[[], None], dict[str, Any]]:
    """(setup, run, state) of the gateway path: setup opens the market in a new event
    loop, which the run closes."""
    opening, mix = commands(n)
    state: dict[str, Any] = {}

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        loop = state["loop"] = uvloop.new_event_loop()     # the server's loop
        gateway, journal, conns = loop.run_until_complete(_gateway())
        loop.run_until_complete(_through_gateway(gateway, journal, conns, opening))
        state.update(gateway=gateway, journal=journal, conns=conns)
        return (), {}

    def run() -> None:
        loop = state["loop"]
        with _without_gc():
            loop.run_until_complete(_through_gateway(state["gateway"], state["journal"],
                                                     state["conns"], mix))
        loop.close()

    return setup, run, state


def engine_path(n: int) -> tuple[Callable[[], Any], Callable[[], None], dict[str, Any]]:
    """(setup, run, state) of the baseline: decode and apply, nothing else."""
    opening, mix = commands(n)
    decode = wire.json_decoder.decode
    state: dict[str, Any] = {}

    def apply(engine: Engine, cmds: Commands) -> None:
        trades = 0
        for who, data in cmds:
            trades += len(engine.submit(who.id, who.role, decode(data), time.time_ns()).trades)
        state["trades"] = state.get("trades", 0) + trades

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        engine = state["engine"] = Engine(SEGMENTS)
        apply(engine, opening)
        state["trades"] = 0
        return (), {}

    def run() -> None:
        with _without_gc():
            apply(state["engine"], mix)

    return setup, run, state


@pytest.mark.parametrize("path", ["gateway", "decode-and-engine"])
def test_gateway_path(benchmark: Any, path: str) -> None:
    n = 3_000 if benchmark.disabled else 30_000
    benchmark.group = "gateway"
    benchmark.extra_info["commands"] = n
    setup, once, state = (gateway_path if path == "gateway" else engine_path)(n)
    benchmark.pedantic(once, setup=setup, rounds=5)

    # Both paths made the same trades; the gateway answered every command and packed
    # every trade into a journal write.
    baseline_setup, baseline, reference = engine_path(n)
    baseline_setup()
    baseline()
    assert reference["trades"] > n // 10
    if path == "gateway":
        gateway: Gateway = state["gateway"]
        assert gateway.metrics.fills == reference["trades"]
        assert gateway.engine.seq == reference["engine"].seq
        answered = sum(gateway.metrics.commands.values()) + sum(gateway.metrics.rejects.values())
        assert answered == len(commands(n)[0]) + n
        assert state["journal"].written > 100 * reference["trades"]
        writes = sum(c.transport.writes for c in state["conns"].values())
        assert writes >= n // 2, writes
