"""Rebuild the engine from Redis: the newest snapshot, then the journal after it.

Recovery runs `Engine.apply` on every journaled command, the same code that ran live;
a command the engine would now reject means the journal and the code disagree, and
recovery stops rather than serve a different market.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from matcher import snapshot
from matcher.engine import Engine
from service.journal import Keys, read_journal


@dataclass(frozen=True, slots=True)
class Recovered:
    engine: Engine
    snapshot_seq: int       # 0 without a snapshot
    replayed: int           # commands applied from the journal
    seconds: float


async def recover(client: aioredis.Redis, keys: Keys, names: Callable[[int], str] = str,
                  *, use_snapshot: bool = True,
                  on_row: Callable[[bytes, bytes], None] | None = None) -> Recovered:
    """The engine as of the journal's end. `on_row` as for `read_journal`."""
    start = time.perf_counter()
    data: bytes | None = await client.get(keys.snapshot) if use_snapshot else None  # type: ignore[assignment]
    engine = snapshot.restore(snapshot.load(data), names) if data else Engine(names=names)
    snapshot_seq = engine.seq
    replayed = await catch_up(client, keys, engine, on_row=on_row)
    return Recovered(engine, snapshot_seq, replayed, time.perf_counter() - start)


async def catch_up(client: aioredis.Redis, keys: Keys, engine: Engine,
                   on_row: Callable[[bytes, bytes], None] | None = None,
                   chunk: int = 200) -> int:
    """Apply every journaled command after the engine's sequence number; how many.
    `on_row` and `chunk` (journal entries per read) as for `read_journal`."""
    replayed = 0
    enabled = gc.isenabled()
    gc.disable()      # millions of small objects and no cycles: collection is pure cost
    try:
        async for entries in read_journal(client, keys, after=engine.seq, chunk=chunk,
                                          on_row=on_row):
            for entry in entries:
                if not engine.apply(entry, quiet=True).accepted:
                    raise RuntimeError(f"journal seq {entry.seq} is rejected on replay: the "
                                       "journal was written by a different engine version")
                replayed += 1
    finally:
        if enabled:
            gc.enable()
    return replayed
