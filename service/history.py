"""Reading back one participant's fills: what a funder or an SME that was away missed.

The journal's write script adds each trade to its funder's and its SME's stream
(`Keys.fills_of`) in the same atomic write as to the fill stream (ADR 18), so a
participant's stream holds exactly its journaled fills, in order, under their trade
ids, each as one packed row. A page is one `XRANGE` (or `XREVRANGE`) of it: Redis walks
consecutive entries, where looking each trade up in the fill stream by id took 3.5 ms
for 200 (measured here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from matcher import protocol as wire
from service.journal import Keys, trade_from_row


@dataclass(frozen=True, slots=True)
class Page:
    """Trades oldest first; `more`: later ones exist; `next`: the cursor to go on from
    (the last id read, else the `after` asked for; None for no fills at all)."""

    trades: list[wire.Trade]
    more: bool
    next: str | None


class FillHistory:
    """Pages of one participant's trades, read from Redis."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def page(self, participant: int, after: str | None, limit: int) -> Page:
        """The `limit` trades after trade id `after`, or the newest `limit` without it."""
        key = self.keys.fills_of(participant)
        rows: Any
        if after is None:
            rows = await self.client.xrevrange(key, count=limit)
            rows.reverse()
            more = False
        else:
            rows = await self.client.xrange(key, min=f"({after}", count=limit + 1)
            more = len(rows) > limit
            del rows[limit:]
        last = rows[-1][0].decode() if rows else after
        return Page([trade_from_row(fields) for _, fields in rows], more, last)
