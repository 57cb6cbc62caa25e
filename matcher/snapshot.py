"""Engine state as one MessagePack document, and the hash that proves two states equal.

A snapshot holds everything `Engine.apply` reads: the books (each in queue order, so
time priority survives), credit lines, resting orders' names and progress, the client-id
map and today's finished orders (for retries). It is canonical: capturing the same state
always gives the same bytes, so `state_hash` is simply their SHA-256, and "recovery
equals full replay equals live" is one comparison.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import msgspec
from msgspec import Struct

from matcher import protocol as wire
from matcher.engine import Engine, OrderInfo, Segment
from matcher.types import Order

VERSION = 1


class BookState(Struct, array_like=True):
    segment: Segment
    orders: list[Order]


class State(Struct, kw_only=True):
    version: int = VERSION
    seq: int
    books: list[BookState]                      # by segment id
    lines: dict[str, list[tuple[int, int, int]]]  # core -> [(funder, line, used)], sorted
    orders: list[OrderInfo]                     # by order id
    clients: list[tuple[int, str, int]]         # (participant, client id, order id)
    finished: list[wire.Done]                   # by order id


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(State)


def capture(engine: Engine) -> State:
    """The engine's state in canonical order.

    Orders, clients and finished orders are kept in order-id order by the engine (ids
    are sequence numbers, inserted in order), so sorting them here costs a linear pass.
    """
    return State(
        seq=engine.seq,
        books=[BookState(engine.segments[s], engine.books[s].orders())
               for s in sorted(engine.segments)],
        lines={core: lines.items() for core, lines in sorted(engine.lines.items())},
        orders=sorted(engine.orders.values(), key=lambda o: o.order_id),
        clients=sorted(((p, c, o) for (p, c), o in engine.clients.items()),
                       key=lambda t: t[2]),
        finished=sorted(engine.finished.values(), key=lambda d: d.order_id),
    )


def restore(state: State, names: Callable[[int], str] = str) -> Engine:
    if state.version != VERSION:
        raise ValueError(f"snapshot version {state.version}, this engine reads {VERSION}")
    engine = Engine((b.segment for b in state.books), names=names)
    engine.seq = state.seq
    for core, items in state.lines.items():
        lines = engine.lines[core]        # opened with its segments above
        for funder, line, used in items:
            lines.restore(funder, line, used)
    for b in state.books:
        engine.books[b.segment.id].restore(b.orders)
    engine.orders = {o.order_id: o for o in state.orders}
    engine.clients = {(p, c): o for p, c, o in state.clients}
    engine.finished = {d.order_id: d for d in state.finished}
    return engine


def encode(state: State) -> bytes:
    return _encoder.encode(state)


def decode(data: bytes) -> State:
    return _decoder.decode(data)


def state_hash(engine: Engine) -> str:
    return hashlib.sha256(encode(capture(engine))).hexdigest()
