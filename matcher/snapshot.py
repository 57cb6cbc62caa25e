"""Engine state as one MessagePack document, and the hash that proves two states equal.

A snapshot holds everything `Engine.apply` reads: the books (each in queue order, so
time priority survives), credit lines and the platform's repaid totals, halted segments
and suspended participants, resting orders' names and progress, and today's finished
orders (for retries; the client-id map is derived from these). It is canonical:
capturing the same state always gives the same bytes, so `state_hash` is simply their
SHA-256, and "recovery equals full replay equals live" is one comparison.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable

import msgspec
from msgspec import Struct

from matcher.engine import Engine, Finished, OrderInfo, Segment
from matcher.types import Order

#: 2: without the client-id map, which restore derives; 3: with `day_started`; 4: with
#: `repaid` (ADR 24); 5: with `halted` (ADR 25); 6: with `suspended` (ADR 26); 7: with
#: each order's `body` (ADR 8, addendum); 8: with `day_closed_by`. 1 to 7 still load
#: (before 7 their orders' bodies are unknown: any retry matches them).
VERSION = 8
READS = (1, 2, 3, 4, 5, 6, 7, 8)


class BookState(Struct, array_like=True):
    segment: Segment
    orders: list[Order]


class State(Struct, kw_only=True):
    version: int = VERSION
    seq: int
    ts: int
    books: list[BookState]                      # by segment id
    lines: dict[str, list[tuple[int, int, int]]]  # core -> [(funder, line, used)], sorted
    orders: list[OrderInfo]                     # by order id
    finished: list[Finished]                    # in the order they ended
    day_started: int = 0                        # Engine.day_started (version 3)
    repaid: dict[str, list[tuple[int, int]]] = {}  # core -> [(funder, repaid_total)] (4)
    halted: list[str] = []                      # segments halted, sorted (version 5)
    suspended: list[int] = []                   # participants suspended, sorted (6)
    day_closed_by: str | None = None            # Engine.day_closed_by (version 8)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(State)


def capture(engine: Engine) -> State:
    """The engine's state in canonical order.

    Resting orders are in insertion order, which is the same for the live engine, a
    replay of its journal and a restored snapshot (the same operations in the same
    order); ended orders in the order they ended. The client-id map is not written: it
    is exactly the resting orders' and the remembered ended orders' names, which
    `restore` derives (version 1 wrote it: hundreds of thousands of entries that cost
    the forked child a sort and Redis a larger SET).
    """
    return State(
        seq=engine.seq,
        ts=engine.ts,
        books=[BookState(engine.segments[s], engine.books[s].orders())
               for s in sorted(engine.segments)],
        lines={core: lines.items() for core, lines in sorted(engine.lines.items())},
        orders=list(engine.orders.values()),
        finished=engine.ended(),
        day_started=engine.day_started,
        repaid={core: sorted(totals.items())
                for core, totals in sorted(engine.repaid.items())},
        halted=sorted(engine.halted),
        suspended=sorted(engine.suspended),
        day_closed_by=engine.day_closed_by,
    )


def restore(state: State, names: Callable[[int], str] = str) -> Engine:
    if state.version not in READS:
        raise ValueError(f"snapshot version {state.version}, this engine reads {READS}")
    engine = Engine((b.segment for b in state.books), names=names)
    engine.seq = state.seq
    engine.ts = state.ts
    for core, items in state.lines.items():
        lines = engine.lines[core]        # opened with its segments above
        for funder, line, used in items:
            lines.restore(funder, line, used)
    for core, totals in state.repaid.items():
        engine.repaid[core] = dict(totals)
    engine.halted = set(state.halted)
    engine.suspended = set(state.suspended)
    engine.day_closed_by = state.day_closed_by
    for b in state.books:
        engine.books[b.segment.id].restore(b.orders)
    engine.orders = {o.order_id: o for o in state.orders}
    engine.remember(state.finished)
    engine.rebuild_clients()
    # Before version 3 the day's start was not kept: take the snapshot's own time, so
    # an end of day missed after it is still found, and none before it is invented.
    engine.day_started = state.day_started if state.version >= 3 else state.ts
    return engine


def encode(state: State) -> bytes:
    return _encoder.encode(state)


def decode(data: bytes) -> State:
    return _decoder.decode(data)


#: Stored snapshots start with this marker and are zlib-compressed (level 1). A snapshot
#: is stored with one SET, which Redis writes to its append-only file and fsyncs while
#: every journal write waits: 20 MB stalled it for 83 ms here. Compressed, a busy state
#: is about a quarter of the size (5.0 MB to 1.2 MB in 30 ms). Older, uncompressed
#: snapshots (a MessagePack map, first byte 0x8n or 0xde) are still read.
STORED = b"MZ1\x00"


def dump(state: State) -> bytes:
    """`state` as stored in Redis. `encode` stays the canonical form `state_hash` uses:
    compressed bytes could differ between zlib versions."""
    return pack(encode(state))


def pack(encoded: bytes) -> bytes:
    """An encoded state as stored in Redis (`dump`)."""
    return STORED + zlib.compress(encoded, 1)


def digest(encoded: bytes) -> str:
    """The hash of an encoded state: `state_hash`, for one encoded already."""
    return hashlib.sha256(encoded).hexdigest()


def load(blob: bytes) -> State:
    """A stored snapshot, compressed or not."""
    if blob.startswith(STORED):
        return decode(zlib.decompress(blob[len(STORED):]))
    return decode(blob)


def state_hash(engine: Engine) -> str:
    return digest(encode(capture(engine)))
