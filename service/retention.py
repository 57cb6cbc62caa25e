"""How long fills stay in Redis: the fill stream and every participant's stream trimmed
to a window of journal time, never past an entry a consumer group still needs.

Every loan adds an entry to the platform's fill stream and one to each party's stream,
and Redis holds them all in memory: about 1.25 MB a second in the load test's mix,
where the journal itself is already bounded by its archive (ADR 20). Fills are derived
data, not the record: the journal (with its archive) gives them back exactly by replay,
and the platform keeps each loan in its own store. So once older than the window they
can leave Redis, with one exception: the fill stream is the platform's delivery channel,
and an entry a consumer group has not acknowledged stays whatever its age
([ADR 21](../docs/adr/0021-fill-retention.md)).

The snapshotter trims whenever the journal's time has moved on by a tenth of the window
(ten minutes at most), in small steps as it moves the journal: approximate trims
(`XTRIM MINID ~ ... LIMIT`) remove whole stream nodes, a bounded number per call, and
then one exact trim per stream removes what is left of the window's first node, so a
quiet stream whose one node spans days is trimmed as exactly as a busy one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from service.journal import Keys, stream_seq

log = logging.getLogger("matcher.retention")

#: Entries one XTRIM may remove (Redis's own default for an approximate trim is 100
#: nodes of 100), then a pause, as the archive's moves pause: a trim of a million
#: entries at once would hold Redis, and every journal write behind it, for a while.
TRIM_LIMIT = 5_000
SCAN_COUNT = 1_000           # keys SCAN looks at per call, of every shard and kind
#: Participants' streams trimmed in one pipeline: an XTRIM that removes nothing costs
#: Redis about 5 us, so a step holds it for about a tenth of a millisecond.
KEYS_PER_STEP = 25
PAUSE_S = 0.002

StreamId = tuple[int, int]


def parse_id(entry_id: bytes | str) -> StreamId:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, n = text.partition("-")
    return int(ms), int(n or 0)


def format_id(stream_id: StreamId) -> bytes:
    return b"%d-%d" % stream_id


@dataclass(frozen=True, slots=True)
class Trimmed:
    """What one pass removed. `cut`: the first sequence number kept by age (None: no
    fills at all); `held_by`: the consumer group that kept older fills on the stream."""

    cut: int | None
    held_by: str | None
    fills: int
    streams: int
    entries: int


@dataclass(frozen=True, slots=True)
class Span:
    """What the fill stream holds: how many fills, and its oldest one's sequence number
    and journal time (0 and 0 when it is empty)."""

    entries: int = 0
    first_seq: int = 0
    first_ts: int = 0


async def fill_stream_span(client: aioredis.Redis, keys: Keys) -> Span:
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.fills)
    pipe.xrange(keys.fills, count=1)
    length, first = await pipe.execute()
    if not first:
        return Span(int(length))
    return Span(int(length), stream_seq(first[0][0]), int(first[0][1].get(b"ts", 0)))


async def first_seq_since(client: aioredis.Redis, key: str, since_ts: int) -> int | None:
    """The sequence number of the first fill of `key` not older than `since_ts` (one
    past the last fill if all are older): trimming below it removes exactly the fills
    older than the window. None for an empty stream.

    A binary search over stream ids (`<seq>-<n>`): a fill's `ts` is its command's
    journal time, which never goes backwards along the sequence, so "the first fill at
    or after m is recent" holds from some m on. Forty reads at most, each one entry.
    """
    first: Any = await client.xrange(key, count=1)
    last: Any = await client.xrevrange(key, count=1)
    if not first:
        return None
    lo, hi = stream_seq(first[0][0]), stream_seq(last[0][0]) + 1

    async def first_from(m: int) -> tuple[int, int] | None:
        """(seq, ts) of the first fill at or after sequence number m."""
        rows: Any = await client.xrange(key, min=b"%d-0" % m, count=1)
        if not rows:
            return None
        return stream_seq(rows[0][0]), int(rows[0][1].get(b"ts", 0))   # no ts: old

    while lo < hi:
        mid = (lo + hi) // 2
        found = await first_from(mid)
        if found is None or found[1] >= since_ts:
            hi = mid
        else:
            lo = found[0] + 1             # that fill and all before it are old
    found = await first_from(lo)
    return found[0] if found is not None else lo


async def group_floor(client: aioredis.Redis, key: str) -> tuple[StreamId, str] | None:
    """The lowest entry id a consumer group of `key` still needs, and the group's name:
    its oldest pending entry (delivered, not acknowledged), else the entry after the
    last one delivered to it. None when the stream has no groups."""
    floor: tuple[StreamId, str] | None = None
    groups: Any = await client.xinfo_groups(key)
    for group in groups:
        name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
        ms, n = parse_id(group["last-delivered-id"])
        needed = (ms, n + 1)
        if group["pending"]:
            summary: Any = await client.xpending(key, name)
            # None: its consumers acknowledged the rest since XINFO; the entry after
            # the last delivered then is what it needs (read before: never too high).
            if summary["min"] is not None:
                needed = parse_id(summary["min"])
        if floor is None or needed < floor[0]:
            floor = (needed, name)
    return floor


async def _trim(client: aioredis.Redis, keys: Sequence[bytes | str], minid: StreamId) -> int:
    """Remove the entries of `keys` below `minid`: approximate trims in a pipeline per
    step, each removing at most TRIM_LIMIT entries of whole nodes, again for the streams
    that had more, then one exact trim each for the rest of the node the cut falls in
    (at most a node: quick)."""
    removed = 0
    todo = list(keys)
    while todo:
        pipe = client.pipeline(transaction=False)
        for key in todo:
            pipe.xtrim(key, minid=format_id(minid), approximate=True, limit=TRIM_LIMIT)
        counts: list[Any] = await pipe.execute()
        removed += sum(int(n) for n in counts)
        todo = [key for key, n in zip(todo, counts, strict=True) if n]
        await asyncio.sleep(PAUSE_S)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xtrim(key, minid=format_id(minid), approximate=False)
    return removed + sum(int(n) for n in await pipe.execute())


async def _holds(client: aioredis.Redis, key: str, floor: StreamId, minid: StreamId) -> bool:
    """Whether an entry at or after the group's floor is older than the cut: a group
    that has had everything holds nothing back, though its floor is below the cut."""
    rows: Any = await client.xrange(key, min=format_id(floor), count=1)
    return bool(rows) and parse_id(rows[0][0]) < minid


async def trim_fills(client: aioredis.Redis, keys: Keys, *, since_ts: int) -> Trimmed:
    """Trim fills older than `since_ts` (journal time, ns) from the fill stream, as far
    as its consumer groups allow, and from every participant's stream of this shard.

    Participants' streams ignore the groups: they serve a funder's or an SME's look back
    at its own loans (`fills` requests), not delivery, and a page asked for after a
    trimmed trade id goes on from the oldest one kept.
    """
    cut = await first_seq_since(client, keys.fills, since_ts)
    if cut is None:
        return Trimmed(None, None, 0, 0, 0)
    minid: StreamId = (cut, 0)
    held_by = None
    floor = await group_floor(client, keys.fills)
    if floor is not None and floor[0] < minid and await _holds(client, keys.fills, floor[0],
                                                               minid):
        minid, held_by = floor
        log.warning("consumer group %r of %s has not acknowledged fills from %s on: they "
                    "stay in Redis beyond the retention window until it does", held_by,
                    keys.fills, format_id(minid).decode())
    fills = await _trim(client, [keys.fills], minid)
    streams = entries = 0
    # matcher:{shard}:fills-of:* (a shard id has no glob characters: protocol.NewId)
    pattern = keys.fills_of(0)[:-1] + "*"
    batch: list[bytes] = []
    async for key in client.scan_iter(match=pattern, count=SCAN_COUNT, _type="stream"):
        batch.append(key)
        if len(batch) == KEYS_PER_STEP:
            entries += await _trim(client, batch, (cut, 0))
            streams += len(batch)
            batch = []
    if batch:
        entries += await _trim(client, batch, (cut, 0))
        streams += len(batch)
    return Trimmed(cut, held_by, fills, streams, entries)
