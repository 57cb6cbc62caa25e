"""Reading back one participant's fills: what a funder or an SME that was away missed.

The journal's write script puts each trade id in its funder's and its SME's index
(`Keys.fills_of`) in the same atomic write as the trade itself (ADR 18), so an index
lists exactly the durable fills, in order. A page is read by one read-only script: the
ids from the index, then each trade from the fill stream, in one round trip. The script
holds Redis (and every journal write) while it runs, which is why a page is at most
`MAX_FILLS_PAGE` fills: about 0.2 ms here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from matcher import protocol as wire
from service.journal import Keys, decode_trade

#: KEYS: the participant's index, the fill stream. ARGV: the trade id to read after
#: ("" for the newest), the page size. Returns {more, the last id read (else ARGV[1]),
#: then each trade as an [id, fields] entry}. Needs Redis 7 (the flags line).
READ_SCRIPT = """#!lua flags=no-writes
local n = tonumber(ARGV[2])
local rows
local more = 0
if ARGV[1] == '' then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', n)
  rows = {}
  for i = #newest, 1, -1 do rows[#rows + 1] = newest[i] end
else
  rows = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', n + 1)
  if #rows > n then
    more = 1
    rows[#rows] = nil
  end
end
local out = {more, ''}
for i = 1, #rows do
  local id = rows[i][1]
  local trade = redis.call('XRANGE', KEYS[2], id, id)
  if trade[1] then out[#out + 1] = trade[1] end
end
if #rows > 0 then out[2] = rows[#rows][1] else out[2] = ARGV[1] end
return out
"""


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
        self.keys = keys
        self._read = client.register_script(READ_SCRIPT)    # EVALSHA, loaded when missing

    async def page(self, participant: int, after: str | None, limit: int) -> Page:
        """The `limit` trades after trade id `after`, or the newest `limit` without it."""
        reply: Any = await self._read(keys=[self.keys.fills_of(participant), self.keys.fills],
                                      args=[after or "", limit])
        more, last, *rows = reply
        trades = [decode_trade(dict(zip(fields[::2], fields[1::2], strict=True)))
                  for _, fields in rows]
        return Page(trades, bool(more), last.decode() if last else None)
