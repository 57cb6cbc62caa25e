"""The WebSocket side: authenticate, decode, hand commands to the engine, route replies.

Single-threaded on the event loop: a command is decoded, applied by the engine and queued
for the journal in one go, without awaiting, so matching never waits on I/O and commands
keep their arrival order. Replies of an accepted command are held until the journal write
that holds it returns; rejections and quotes change nothing and go out at once; a page
of one's own fills goes out when Redis has read it. Every connection's outbox is bounded
(see `Connection`): a client that cannot keep up is closed (4408) instead of slowing the
market or its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, cast

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from matcher import protocol as wire
from matcher import walked
from matcher.engine import Engine, Outcome
from matcher.participants import SYSTEM, Directory, Participant
from service import resp
from service.config import LimitsConfig
from service.history import FillHistory
from service.journal import Journal, stream_seq
from service.metrics import Metrics

log = logging.getLogger("matcher.gateway")

CLOSE_UNAUTHORIZED = 4401      # no valid key
CLOSE_SLOW_CONSUMER = 4408     # outbox full: the client does not read fast enough
CLOSE_GOING_AWAY = 1001        # shutdown
CLOSE_TOO_MANY = 4429          # the participant has `connections_per_participant` open
DROP_GRACE_S = 30.0            # a connection given up on is cut this long after its close
_SYSTEM = Participant(id=SYSTEM, name="system", role="admin", key_sha256="")
_Held = tuple[Outcome, float, "Connection | None"]   # an outcome waiting for its batch
_READERS = 2                   # pages of fills read from Redis at once
_WAITING = 256                 # pages of fills asked for and not yet read, at most
_WAITING_EACH = 4              # ... of them for one participant (all its connections
                               # and its HTTP requests), so no one takes all 256
#: Fills one participant may ask for a second, and at once: each is decoded on the event
#: loop (about 4 us), so a client asking for pages without end took it from everyone.
#: A catch-up of a day's loans fits in the burst; the board asks for 5 at sign-in.
FILLS_RATE, FILLS_BURST = 2_000, 20_000


class _Named(msgspec.Struct):
    """Only the client id and ref of a message that did not decode (others ignored)."""

    client_id: wire.Name | None = None
    ref: wire.Name | None = None


_read_names = msgspec.json.Decoder(_Named).decode

#: What decoding a client's message may raise: msgspec's errors, RecursionError for JSON
#: nested about a thousand levels deep, and UnicodeDecodeError for a string that is not
#: UTF-8 (msgspec raises both as they are). Either ended the connection with a traceback
#: instead of getting an `error`, and a funder's bids with it (cancel on disconnect).
DECODE_ERRORS = (msgspec.MsgspecError, RecursionError, UnicodeDecodeError)


def decode_error(exc: msgspec.MsgspecError | RecursionError | UnicodeDecodeError,
                 data: bytes | str) -> wire.Error:
    """msgspec's own message, with the JSON path split out, and the message's client id
    and ref when it has valid ones.

    msgspec puts the path of the object in which a field is unknown or missing, and
    nothing at the top level; the path given here ends at the field itself.
    """
    if isinstance(exc, RecursionError):
        return wire.Error(code="malformed", path=None,
                          message="JSON nested too deeply (at most a few hundred levels)")
    if isinstance(exc, UnicodeDecodeError):
        return wire.Error(code="malformed", path=None,
                          message=f"a string that is not UTF-8: {exc.reason}")
    text = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return wire.Error(code="malformed", message=text, path=None)
    path = wire.error_path(text)
    try:
        named = _read_names(data)
    except DECODE_ERRORS:
        named = _Named()
    return wire.Error(code="invalid", message=wire.plain_error(text), path=path,
                      client_id=named.client_id, ref=named.ref)


def frame(payload: bytes) -> bytes:
    """A final, unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


#: A `status` costs a message of the rate limit more for every this many orders it lists.
STATUS_ORDERS_PER_TOKEN = 25
#: A read of a segment's book (a quote, a book sent on `subscribe`, the segment list)
#: costs a message more for every this many orders resting in it: the most it can walk,
#: about 40 ns an order, so a token pays for about what a command costs.
BOOK_ORDERS_PER_TOKEN = 500
#: A command costs a message more for every this many resting orders its matching
#: visited (`matcher.walked`; 4 to 40 ns each): an ask walks the bids that cannot lend
#: (their funder's line used up), and a line set walks the funder's bids and the asks
#: they cannot fill, so one message could cost 10,000 commands' time (found in an audit).
WALK_ORDERS_PER_TOKEN = 2000
#: Book updates sent a second, to all connections together: what sets the spacing of the
#: ticks that send them once many connections follow books (`Gateway._tick`).
BOOK_SENDS_PER_S = 50_000


class TokenBucket:
    """`rate` messages a second, bursts up to `burst`: calling it takes one, if there is."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._refilled = time.monotonic()

    def __call__(self, cost: float = 1) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True

    def owe(self, cost: float) -> None:
        """Take `cost` more for a message that passed: as much as it costs, owed if the
        bucket holds less, so the messages after it wait until the refill has paid it.
        Over time it is paid whole whatever the burst (capped at the burst, a smaller
        burst made a large cost cheaper; found in review), and it never starves: it
        passes whenever the bucket is not in debt."""
        self._tokens -= cost

    def full(self) -> bool:
        """Refilled to its burst: it holds nothing a new bucket would not."""
        return self._tokens + (time.monotonic() - self._refilled) * self.rate >= self.burst


class Budgets:
    """A `TokenBucket` per key (an HTTP client's key or address), taken by `allow`.

    Keys such as addresses are not bounded by the directory, so once there are more than
    `prune_at` the full buckets are dropped: a full bucket is the same as a new one. If
    more than half are still spending (a flood from many addresses), the oldest of them
    go too, which gives those a fresh budget: so a prune, a pass over all of them, comes
    at most once per `prune_at / 2` new keys, never once per request.
    """

    def __init__(self, rate: float, burst: float, *, prune_at: int = 10_000) -> None:
        self.rate, self.burst, self.prune_at = rate, burst, prune_at
        self.buckets: dict[Hashable, TokenBucket] = {}

    def allow(self, key: Hashable, cost: float = 1) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.prune_at:
                kept = [(k, b) for k, b in self.buckets.items() if not b.full()]
                newest = max(0, len(kept) - self.prune_at // 2)
                self.buckets = dict(kept[newest:])
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket(cost)

    def owe(self, key: Hashable, cost: float) -> None:
        """`TokenBucket.owe` for the key `allow` has just let through."""
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket.owe(cost)


class Connection:
    """One WebSocket client: its participant, subscriptions, rate budget and outbox.

    Messages are framed here and written straight to the transport, all those sent in
    one turn of the event loop in one write: a batch of replies to one client costs one
    system call, not one per message (on this VM a small write is ~10 us). The kernel
    buffer and the transport's buffer are the outbox; when it holds more than
    `outbox_bytes` unsent, with what this turn queued, the client does not keep up and is
    closed. What is queued counts at once: one turn can queue a lot (a burst of
    messages read in one go, each answered by a large `status`), and checked only at the
    write, a single turn buffered a hundred megabytes (found in review).
    """

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport,
                 participant: Participant, limits: LimitsConfig,
                 on_slow: Callable[[Connection], None]) -> None:
        self.ws = ws
        self.transport = cast(asyncio.WriteTransport, transport)   # uvloop's is not a subclass
        self.participant = participant
        self.limits = limits
        self.segments: set[str] = set()
        self.book_seq: dict[str, int] = {}       # segment -> seq of the last book sent
        self.closed = False
        self.dropped = False                     # as a slow consumer
        self.unsent = 0                          # bytes unsent when it was found too slow
        self.reading: asyncio.Task[None] | None = None     # a page of fills being read
        self._frames: list[bytes] = []
        self._queued = 0                         # bytes in `_frames`
        self._outbox_bytes = limits.outbox_bytes
        self._loop = asyncio.get_running_loop()
        self.allow = TokenBucket(limits.rate, limits.burst)
        self._on_slow = on_slow

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._frames:
            self._loop.call_soon(self._flush)
        framed = frame(data)
        self._frames.append(framed)
        self._queued += len(framed)
        # Rare, so only then the buffer's size too. One answer alone is written whatever
        # its size: the outbox bounds what a client leaves unread, not a message.
        if self._queued > self._outbox_bytes and len(self._frames) > 1:
            self._check_outbox()

    def _check_outbox(self) -> None:
        """Past the outbox: nothing more is queued or handled for it (`closed`), and it
        is dropped in a callback of its own. Not here: `send` runs inside the loops that
        deliver a batch to every connection of a participant and to every fill
        subscriber, which the drop changes; dropped there, it ended that delivery for
        everyone after it (found in review)."""
        if self.backlog > self._outbox_bytes:
            self.closed = True
            self.unsent = self.backlog          # for the log: what made it too slow
            self._frames, self._queued = [], 0
            self._loop.call_soon(self._on_slow, self)

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        self._queued = 0
        if self.closed or not frames or self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() > self._outbox_bytes:
            self.unsent = self.transport.get_write_buffer_size() + sum(map(len, frames))
            self._on_slow(self)
            return
        self.transport.write(b"".join(frames))

    @property
    def backlog(self) -> int:
        """Bytes written but not yet taken by the network, and queued in this turn."""
        return self.transport.get_write_buffer_size() + self._queued

    async def close(self, code: int, message: str) -> None:
        """Send what is queued, then the close frame after it, without waiting for the
        client to take them (`drain`): only for its close frame in reply."""
        self._flush()
        self.closed = True
        await self.ws.close(code=code, message=message.encode(), drain=False)


@dataclass(slots=True)
class _WaitingBook:
    """Book updates waiting for the journal: `book` (seq, encoded) for the earliest write
    it waits for, and the newest one, for a later write, if any."""

    write: asyncio.Future[int]
    book: tuple[int, bytes]
    newest: tuple[asyncio.Future[int], tuple[int, bytes]] | None = None


class Gateway:
    """Routes messages between connections, the engine and the journal."""

    def __init__(self, engine: Engine, journal: Journal, directory: Directory,
                 limits: LimitsConfig, metrics: Metrics) -> None:
        self.engine = engine
        self.journal = journal
        self.directory = directory
        self.limits = limits
        self.metrics = metrics
        self.accepting = True
        self.connections: dict[int, set[Connection]] = {}
        self.subscribers: dict[str, set[Connection]] = {}
        self.fill_subscribers: set[Connection] = set()
        # The last sequence number whose trades went out: a new follower of the trades
        # gets those of every command after it.
        self._delivered_seq = engine.seq
        self._held_batch: asyncio.Future[int] | None = None
        self._held: list[_Held] = []
        self._held_from: dict[int, int] = {}    # of `_held`, by the participant who sent it
        self._last_fills: dict[str, deque[tuple[int, int]]] = {}   # rate, amount; public
        # Book updates go out together, at most every `book_spacing` seconds: the
        # segments that changed since the last tick, the time of that tick, the next.
        self._book_dirty: set[str] = set()
        self._book_ticked = 0.0
        self._book_tick: asyncio.Handle | None = None
        self.book_spacing = limits.book_interval_ms / 1000
        # The book updates waiting for the journal, by (connection, or None for all
        # subscribers, and segment).
        self._book_waiting: dict[tuple[Connection | None, str], _WaitingBook] = {}
        self._book_writes: dict[asyncio.Future[int], set[tuple[Connection | None, str]]] = {}
        self._encode = wire.json_encoder.encode
        self.history = FillHistory(resp.Connection.like(journal.client), journal.keys)
        journal.on_wrong_node = self.history.close     # a failover: pages connect afresh
        self._readers = asyncio.Semaphore(_READERS)
        self._waiting = 0                                  # pages asked for, not yet read
        self._waiting_of: dict[int, int] = {}              # ... by participant
        self._fill_budgets = Budgets(FILLS_RATE, FILLS_BURST)   # fills asked, by participant
        self._closing: set[asyncio.Task[bool]] = set()     # closes of dropped connections

    # --- commands ---

    def submit(self, who: Participant, cmd: wire.Command, received: float,
               conn: Connection | None = None) -> None:
        """Apply a command now; send its replies when the journal has it.

        The backlog limit holds back clients (`conn`); what the gateway issues itself
        (the configured market, end of day, cancels for funders that went away) is
        bounded and, for the cancels, lowers risk: it is never refused for a backlog.
        It counts the answers held for the next batch too: while Redis is away,
        rejections and retries' answers wait with the commands, and a client that
        keeps sending them would otherwise grow that list without bound.
        """
        limit = self.limits.journal_backlog
        # The journal's own error too: it stops a loop turn before `accepting` learns
        # of it, and commands taken meanwhile could never be written (found in review).
        if not self.accepting or self.journal.error is not None or (conn is not None and (
                self.journal.backlog >= limit
                or (self._held_batch is not None and (
                    len(self._held) >= limit
                    # A tenth each (100 at least): one client's answers cannot fill
                    # it for everyone.
                    or self._held_from.get(who.id, 0) >= max(100, limit // 10))))):
            why = ("the journal has stopped (see the server's log)"
                   if self.journal.error is not None
                   else "journal backlog is full" if self.accepting else "shutting down")
            self._refuse(who, conn, wire.Rejected(
                client_id=getattr(cmd, "client_id", None), code="unavailable",
                message=f"not accepting commands: {why}"))
            return
        now = time.time_ns()          # one reading: the cap asks the engine's retry rule
        refused = self._refused_here(who, cmd, now) if conn is not None else None
        if refused is not None:
            out = Outcome(replies=[(who.id, refused)])
        else:
            before = walked()
            out = self.engine.submit(who.id, who.role, cmd, now)
            if conn is not None and (visited := walked() - before) > WALK_ORDERS_PER_TOKEN:
                conn.allow.owe(visited / WALK_ORDERS_PER_TOKEN)
        if out.entry is None:
            # A rejection or a retry's answer is read from state that may not be written
            # yet (the original of a retry can still be in the batch being written), so
            # it waits for the journal too, and so never overtakes an earlier ack: also
            # not one whose batch became durable in this loop turn, whose replies go out
            # in the next (`_durable` is a done callback).
            barrier = self.journal.barrier() or self._held_batch
            if barrier is None:
                self._deliver(out, conn)
            else:
                self._hold(barrier, (out, received, conn))
            return
        self.metrics.command(type(cmd))
        # A book update is built from the live engine (and sent once that is durable,
        # `_send_book`), so its last fills are taken with the same state.
        for t in out.trades:
            last = self._last_fills.get(t.segment)
            if last is None:
                last = self._last_fills[t.segment] = deque(maxlen=10)
            last.appendleft((t.rate_bps, t.amount))
        self._hold(self.journal.append(out.entry, out.trades), (out, received, conn))

    def _refuse(self, who: Participant, conn: Connection | None,
                refusal: wire.Rejected) -> None:
        """A command refused before the engine saw it (`unavailable`, `rate_limited`):
        flow control, answered at once. It depends on no state, and a client that is
        told to slow down must hear it now, not after a journal that may be away for
        a while; so it can come before the acks of earlier commands still being written
        (docs/protocol.md, "Ordering and delivery")."""
        self.metrics.reject(refusal.code)
        if conn is not None:                    # the connection that sent it
            conn.send(self._encode(refusal))
        elif not _unnamed_answer(refusal):      # the gateway's own: to nobody (ADR 27)
            self._reply_now(who.id, refusal, conn)

    def _refused_here(self, who: Participant, cmd: wire.Command,
                      now: int) -> wire.Rejected | None:
        """What the gateway refuses before the engine sees it: the engine has no
        directory of participants, and its rules can never become stricter."""
        kind = type(cmd)        # not isinstance: 120 to 330 ns on msgspec's types, a command
        if (kind is wire.Suspend or kind is wire.Reinstate) and who.may(cmd):
            cmd = cast("wire.Suspend | wire.Reinstate", cmd)
            named = self.directory.get(cmd.participant)
            if named is None and not (
                    cmd.participant in self.engine.suspended if kind is wire.Reinstate
                    else self.engine.has_resting(cmd.participant)):
                # (One suspended and then removed from the directory can be reinstated:
                # its id would otherwise stay suspended for whoever gets it next. One
                # removed with orders still resting can be suspended, which ends them.)
                return wire.Rejected(client_id=None, code="unknown_participant",
                                     path="$.participant",
                                     message=f"no participant {cmd.participant}")
            if named is not None and named.role not in ("funder", "sme"):
                return wire.Rejected(client_id=None, code="not_a_trader",
                                     path="$.participant",
                                     message=f"{named.name} is the {named.role}: only "
                                             "funders and SMEs place orders")
        if kind is wire.Repay and who.may(cmd):
            return self._not_a_lender(cast("wire.Repay", cmd))
        return self._over_resting_cap(who, cmd, now)

    def _not_a_lender(self, cmd: wire.Repay) -> wire.Rejected | None:
        """A `repay` naming an id that is no funder's and never lent against the core: a
        mistyped id, which the engine answered `exceeds_used` ("has 0 lent"), or, for a
        total of 0, `duplicate` (found in an audit). What has lent is let through, a
        funder removed from the directory with loans still out too: the engine judges."""
        named = self.directory.get(cmd.funder)
        if named is not None and named.role == "funder":
            return None
        if cmd.core in self.engine.lines and (
                self.engine.credit(cmd.core, cmd.funder) != (0, 0)
                or cmd.funder in self.engine.repaid.get(cmd.core, {})):
            return None
        if named is None:
            return wire.Rejected(client_id=None, code="unknown_participant",
                                 path="$.funder", message=f"no participant {cmd.funder}")
        return wire.Rejected(client_id=None, code="not_a_funder", path="$.funder",
                             message=f"{named.name} is the {named.role}: only funders "
                                     "lend, and are repaid")

    def _over_resting_cap(self, who: Participant, cmd: wire.Command,
                          now: int) -> wire.Rejected | None:
        """The refusal of a new order that could rest, from a participant with its cap's
        worth resting or into a segment with its cap's worth; None to let it through.

        Checked here, not in the engine: the engine's rules can never become stricter
        (journals hold what they allowed, ADR 8), and a command refused here is never
        journaled, so replay is the same. Every resting order costs memory, and the
        levels of a book are walked for each update (a funder whose line is used up
        shows nothing, however many bids it rests). The segment's cap also keeps the
        book's sums inside int64 (ADR 4). A retry of an order placed before is let
        through: the engine answers it as one."""
        if type(cmd) not in _ORDERS:
            return None
        cmd = cast("wire.Bid | wire.Ask", cmd)
        if (cmd.tif in ("ioc", "fok")
                or cmd.segment in self.engine.halted        # the engine says why
                or who.id in self.engine.suspended):
            return None
        limits = self.limits
        owned = self.engine.owned.get(who.id)
        book = self.engine.books.get(cmd.segment)
        if owned is not None and len(owned) >= limits.resting_orders_per_participant:
            refusal = wire.Rejected(
                client_id=cmd.client_id, code="too_many_orders", path="$.client_id",
                message=f"{limits.resting_orders_per_participant} orders of yours rest "
                        "already: cancel some first")
        elif book is not None and len(book) >= limits.resting_orders_per_segment:
            refusal = wire.Rejected(
                client_id=cmd.client_id, code="segment_full", path="$.segment",
                message=f"{limits.resting_orders_per_segment} orders rest in "
                        f"{cmd.segment} already: an IOC or FOK order still trades")
        else:
            return None
        return refusal if self.engine.retried(who.id, cmd.client_id, now) is None else None

    def _hold(self, batch: asyncio.Future[int], held: _Held) -> None:
        """Keep the replies until their batch is durable: one callback per batch."""
        if batch is not self._held_batch:
            self._held_batch, self._held, self._held_from = batch, [], {}
            batch.add_done_callback(partial(self._durable, self._held))
        self._held.append(held)
        conn = held[2]
        if conn is not None:
            who = conn.participant.id
            self._held_from[who] = self._held_from.get(who, 0) + 1

    def _durable(self, held: list[_Held], batch: asyncio.Future[int]) -> None:
        if batch is self._held_batch:     # delivered now: later answers need not wait
            self._held_batch = None
        if batch.cancelled() or batch.exception() is not None:
            self.accepting = False        # the journal is gone: acknowledge nothing more
            self._unconfirmed(held)
            return
        self._delivered_seq = batch.result()
        now = time.perf_counter()
        segments: set[str] = set()
        trades = 0
        for out, received, conn in held:
            self._deliver(out, conn)
            self.metrics.latency.observe(now - received)
            segments.update(out.segments)
            if out.trades:
                trades += len(out.trades)
                self.metrics.filled_fen += sum(t.amount for t in out.trades)
                segments.update(t.segment for t in out.trades)
        self.metrics.fills += trades
        self.metrics.seq = self.engine.seq
        for segment in segments:
            self.book_changed(segment)

    def _deliver(self, out: Outcome, conn: Connection | None) -> None:
        """The replies, each to every connection of its participant; but the answer to
        a command without a client id only to the connection that sent it, and to none
        for one the gateway issued itself (`conn` None: a funder's cancels when it went
        away): the others could not tell whose command it answers (ADR 27; they hear of
        a line they did not set by its `line` event)."""
        for participant, event in out.replies:
            if type(event) is wire.Rejected:   # not isinstance: 150 ns on msgspec's types
                self.metrics.reject(event.code)
            if _unnamed_answer(event):
                if conn is not None and participant == conn.participant.id:
                    conn.send(self._encode(event))
            else:
                self._reply_now(participant, event, conn)
        if out.trades and self.fill_subscribers:
            for trade in out.trades:
                data = self._encode(trade)
                for c in self.fill_subscribers:
                    c.send(data)

    def _unconfirmed(self, held: list[_Held]) -> None:
        """The journal stopped before these commands' write returned: whether they
        survive a restart is unknown, so each answer becomes an `unconfirmed`, sent
        where the answer would have gone. Silence left a client waiting on a command
        it could only give up on (ADR 6)."""
        for out, _received, conn in held:
            self._deliver(Outcome(replies=[
                (participant, wire.Unconfirmed(client_id=event.client_id,  # type: ignore[union-attr]
                                               message=_UNCONFIRMED))
                for participant, event in out.replies if type(event) in _ANSWERS]), conn)

    def _reply_now(self, participant: int, event: wire.Event, conn: Connection | None) -> None:
        """To every connection of the participant (a system command has none)."""
        data = self._encode(event)
        for c in self.connections.get(participant, ()):
            c.send(data)

    # --- book updates, coalesced ---

    def book_changed(self, segment: str) -> None:
        """Send the segment's book at the next tick: at once (in the next loop turn,
        with every other segment the same batch moved) if the last tick is
        `book_spacing` ago, else when it is."""
        self._book_dirty.add(segment)
        if self._book_tick is None:
            loop = asyncio.get_running_loop()
            wait = self._book_ticked + self.book_spacing - time.monotonic()
            # uvloop's timers keep whole milliseconds and fire up to one early.
            self._book_tick = (loop.call_soon(self._tick) if wait <= 0
                               else loop.call_later(wait + 0.001, self._tick))

    def _tick(self) -> None:
        """Every segment that changed since the last tick, at once: a connection that
        follows several gets their books in one write (books waiting for the journal
        wait for the same write, and go out together too), not one per segment each at
        its own time. With many connections following books that fan-out, not
        matching, fills the loop: one segment's update to 6,300 took 46 ms, and 1,000
        connections following the demo's 9 segments, 150,000 books a second, made the
        acks of 5,000 commands/s take 0.1 to 0.6 s (found in an audit and a load test).
        So the spacing after a tick grows with the books it sent, to about
        `BOOK_SENDS_PER_S` a second (1,000 followers of 9 segments: a tick every 180 ms)."""
        self._book_tick = None
        self._book_ticked = time.monotonic()
        dirty, self._book_dirty = self._book_dirty, set()
        sends = 0
        for segment in dirty:
            followers = self.subscribers.get(segment)
            if followers:
                sends += len(followers)
                self._send_book(segment, None)
        self.book_spacing = max(self.limits.book_interval_ms / 1000, sends / BOOK_SENDS_PER_S)

    def _book_update(self, segment: str) -> wire.BookUpdate:
        last = self._last_fills.get(segment)
        return self.engine.book_update(segment, last_fills=list(last) if last else None)

    def _send_book(self, segment: str, conn: Connection | None) -> None:
        """The segment's book now, to `conn` or to all its subscribers, once the journal
        has every command it shows.

        The engine applies a command before its write returns (ADR 6), so the book can
        show bids that a failed write would take back: those are never acknowledged,
        and a crash loses them. Market data shows only what is durable: an update is
        built now (so its `seq` and its levels agree) and sent when the writes before it
        have returned, after the acks of the commands it shows; never once the journal
        has failed. Per segment (and per connection and segment, for the book a
        `subscribe` asked for) two updates wait at most: the one waiting for the
        earliest write, and the newest, which replaces any other. So what is held stays
        bounded while Redis is slow or away, and updates keep coming when every write
        takes about the coalescing interval: a newest that always replaced the one
        before it would wait for ever for a write still to come."""
        if self.journal.error is not None:      # the engine holds what was never written
            return
        key = (conn, segment)
        update = self._book_update(segment)
        book = (update.seq, self._encode(update))
        barrier = self.journal.barrier() or self._held_batch
        if barrier is None:
            self._book_waiting.pop(key, None)   # what still waits is older: replaced
            self._book_out(segment, conn, book)
            return
        waiting = self._book_waiting.get(key)
        if waiting is None:
            self._book_waiting[key] = _WaitingBook(barrier, book)
            self._wait_for(barrier, key)
        elif waiting.write is barrier:          # the same write: the newer book instead
            waiting.book = book
        else:
            waiting.newest = (barrier, book)

    def _wait_for(self, write: asyncio.Future[int], key: tuple[Connection | None, str]) -> None:
        """One callback per write for all the books waiting for it, as `_hold` has for
        answers: a callback per book piled up on a write that took long (subscribe and
        unsubscribe again and again while Redis was away)."""
        keys = self._book_writes.get(write)
        if keys is None:
            keys = self._book_writes[write] = set()
            write.add_done_callback(self._books_durable)
        keys.add(key)

    def _books_durable(self, write: asyncio.Future[int]) -> None:
        for key in self._book_writes.pop(write, ()):
            self._book_durable(key, write)

    def _book_durable(self, key: tuple[Connection | None, str],
                      batch: asyncio.Future[int]) -> None:
        waiting = self._book_waiting.get(key)
        if waiting is None or waiting.write is not batch:
            return                      # replaced by a newer update that went out at once
        book = waiting.book
        if batch.cancelled() or batch.exception() is not None:
            del self._book_waiting[key]         # the journal failed: nothing more is sent
            return
        if waiting.newest is None:
            del self._book_waiting[key]
        else:                           # the newest now waits first, for its own write
            (waiting.write, waiting.book), waiting.newest = waiting.newest, None
            self._wait_for(waiting.write, key)
        conn, segment = key
        self._book_out(segment, conn, book)

    def _book_out(self, segment: str, conn: Connection | None,
                  book: tuple[int, bytes]) -> None:
        seq, data = book
        for c in [conn] if conn is not None else list(self.subscribers.get(segment, ())):
            # Not to one that unsubscribed meanwhile; and never an older book after a
            # newer one (a subscribe's own book and the segment's updates wait apart).
            if segment in c.segments and c.book_seq.get(segment, -1) <= seq:
                c.book_seq[segment] = seq
                c.send(data)

    # --- connections ---

    def authenticate(self, key: str | None) -> Participant | None:
        return self.directory.authenticate(key) if key else None

    def at_connection_cap(self, who: Participant) -> bool:
        return len(self.connections.get(who.id, ())) >= self.limits.connections_per_participant

    def attach(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport,
               who: Participant) -> Connection:
        conn = Connection(ws, transport, who, self.limits, self._drop_slow)
        self.connections.setdefault(who.id, set()).add(conn)
        self.metrics.connections[who.role] += 1
        conn.send(self._encode(wire.Welcome(
            participant=who.id, name=who.name, role=who.role,
            segments=sorted(self.engine.segments),
            cancel_on_disconnect=who.role == "funder" and who.cancel_on_disconnect)))
        return conn

    def detach(self, conn: Connection) -> None:
        who = conn.participant
        conns = self.connections.get(who.id, set())
        if conn not in conns:
            return
        conns.discard(conn)
        conn.closed = True
        if conn.reading is not None:
            conn.reading.cancel()
        self.metrics.connections[who.role] -= 1
        for segment in conn.segments:
            self.subscribers.get(segment, set()).discard(conn)
            self._book_waiting.pop((conn, segment), None)
        self.fill_subscribers.discard(conn)
        if not conns:
            del self.connections[who.id]
            self._cancel_if_gone(who)

    def cancel_absent(self) -> int:
        """Cancel the resting orders of every funder with cancel on disconnect that is not
        connected; the number of funders. After a restart: the gateway could not see
        who went away while it was down, and the journal brought their bids back."""
        absent = [who for who in self.directory if who.id not in self.connections]
        return sum(self._cancel_if_gone(who) for who in absent)

    def cancel_removed(self) -> int:
        """Cancel what participants no longer in the configuration left resting, at a
        start, before serving: no one can manage those orders any more, and they went
        on lending and borrowing (a removed funder's bids filled asks; found in review).
        Cancelled as theirs, by the role their orders show; the number of such
        participants."""
        removed = sorted(pid for pid in self.engine.owned if self.directory.get(pid) is None)
        for pid in removed:
            orders = self.engine.owned[pid]
            side = next(iter(orders.values())).side
            log.warning("participant %d is not in the configuration: its %d resting "
                        "orders are cancelled", pid, len(orders))
            self.submit(Participant(id=pid, name=f"participant {pid}", key_sha256="",
                                    role="funder" if side == "bid" else "sme"),
                        wire.CancelAll(), time.perf_counter())
        return len(removed)

    def _cancel_if_gone(self, who: Participant) -> bool:
        """No stale quote outlives its sender: cancel what a funder left resting."""
        if who.role == "funder" and who.cancel_on_disconnect and self.accepting \
                and self.engine.has_resting(who.id):
            self.submit(who, wire.CancelAll(), time.perf_counter())
            return True
        return False

    def _drop_slow(self, conn: Connection) -> None:
        """Drop a client that does not keep up (it may already be `closed` by its own
        outbox check, waiting for this)."""
        if conn.dropped or conn not in self.connections.get(conn.participant.id, ()):
            return                          # (or it went away meanwhile)
        conn.dropped = True
        self.metrics.dropped += 1
        log.warning("closing %s: %d bytes unsent, it does not keep up",
                    conn.participant.name, conn.unsent)
        self._close_soon(conn, CLOSE_SLOW_CONSUMER, "slow consumer: outbox full")

    def _close_soon(self, conn: Connection, code: int, message: str) -> None:
        """End a connection the gateway gave up on. It is detached at once (cancel on
        disconnect runs now, nothing more is sent to it): a client that does not read
        would otherwise hold its close, and its bids, for as long as it likes. The close
        frame goes after what is queued; whatever is still open `DROP_GRACE_S` later
        is cut."""
        self.detach(conn)
        loop = asyncio.get_running_loop()
        task = loop.create_task(conn.ws.close(code=code, message=message.encode(),
                                              drain=False))
        self._closing.add(task)                      # the loop keeps only weak references
        task.add_done_callback(self._closing.discard)
        loop.call_later(DROP_GRACE_S, conn.transport.abort)

    # --- one message ---

    def handle(self, conn: Connection, data: bytes | str, received: float) -> None:
        if conn.closed:
            # Closing (a slow consumer dropped, shutdown): messages still parsed during
            # the close handshake are not acted on, as none could be answered.
            return
        allowed = conn.allow()         # every message counts, also one that is not valid
        try:
            msg = wire.json_decoder.decode(data)
        except DECODE_ERRORS as exc:
            self._error(conn, decode_error(exc, data) if allowed else self._over_rate(None))
            return
        who = conn.participant
        # By its type, not a chain of isinstance (120 to 330 ns each on msgspec's types):
        # every command went through five of them.
        read = _READS.get(type(msg))
        if not allowed:
            if read is None:            # a command is answered as refused commands are
                self._refuse(who, conn, wire.Rejected(
                    client_id=getattr(msg, "client_id", None), code="rate_limited",
                    message=self._over_rate(None).message))
            else:       # a read, a subscription, a sign-in: an `error`, by ref if it has one
                self._error(conn, self._over_rate(getattr(msg, "ref", None)))
            return
        if read is None:
            self.submit(who, cast(wire.Command, msg), received, conn)
        else:
            read(self, conn, msg)

    def _signed_in_already(self, conn: Connection, msg: wire.Auth) -> None:
        self._error(conn, wire.Error(code="already_authenticated",
                                     message="this connection is signed in", path="$.type"))

    def _over_rate(self, ref: str | None) -> wire.Error:
        return wire.Error(code="rate_limited", ref=ref, path=None,
                          message=f"over {self.limits.rate:g} messages/s on this connection")

    def _error(self, conn: Connection, error: wire.Error) -> None:
        self.metrics.reject(error.code)
        conn.send(self._encode(error))

    def unwritten(self, ref: str | None = None) -> wire.Error:
        """The answer to a read of the market once the journal has stopped (its `error`
        is set): the engine then holds commands that were never written, and will not
        be there after the restart (book updates stop then too). Quotes and statuses
        went on answering from them (found in review)."""
        return wire.Error(code="unavailable", path=None, ref=ref,
                          message="the journal has stopped (see the server's log): this "
                                  "gateway's market may hold commands that were never "
                                  "written; ask again after its restart")

    def _status(self, conn: Connection, req: wire.StatusRequest) -> None:
        if self.journal.error is not None:
            self._error(conn, self.unwritten())
            return
        whose = req.participant
        if whose is None or whose == conn.participant.id:
            whose = conn.participant.id
        elif conn.participant.role != "admin":
            self._error(conn, wire.Error(code="forbidden", path="$.participant",
                                         message="only an admin reads another's status"))
            return
        elif self.directory.get(whose) is None and whose not in self.engine.suspended:
            self._error(conn, wire.Error(code="unknown_participant", path="$.participant",
                                         message=f"no participant {whose}"))
            return
        # Its cost grows with the orders it lists (about 1 us each, 2 MB for the 10,000 a
        # funder may rest): one message's token does not pay for it, and a burst of them
        # stalled every client's matching (found in review). It costs a token more for
        # every `STATUS_ORDERS_PER_TOKEN` orders, about what a command costs, which the
        # connection's next messages wait for.
        conn.allow.owe(self.engine.resting_count(whose) / STATUS_ORDERS_PER_TOKEN)
        # Read now, sent once the journal holds every command it shows (and after the
        # answers to those commands): it listed orders and loans not yet written, which
        # a crash then took back, to a client told to rebuild its position from it
        # (found in an audit). Later commands are not in it.
        data = self._encode(self.engine.status(whose))
        barrier = self.journal.barrier() or self._held_batch
        if barrier is None:
            conn.send(data)
        else:
            barrier.add_done_callback(partial(self._status_durable, conn, data))

    def _status_durable(self, conn: Connection, data: bytes,
                        batch: asyncio.Future[int]) -> None:
        if batch.cancelled() or batch.exception() is not None:
            self._error(conn, self.unwritten())
        else:
            conn.send(data)

    def _quote(self, conn: Connection, req: wire.QuoteRequest) -> None:
        if self.journal.error is not None:
            self._error(conn, self.unwritten(req.ref))
            return
        if req.segment not in self.engine.books:
            self._error(conn, wire.Error(code="unknown_segment", ref=req.ref,
                                         message=f"no segment {req.segment!r}", path="$.segment"))
            return
        self.metrics.quotes += 1
        conn.allow.owe(self.book_cost((req.segment,)))
        conn.send(self._encode(self.engine.quote(req)))

    def book_cost(self, segments: Iterable[str]) -> float:
        """What reading these books costs beyond the message's own token: a quote (or a
        book's depth) walks the bids until it has the amount, past those whose funder's
        line is used up, so one of a segment with 100,000 orders resting took 5 ms;
        at one token each, a burst of them (over HTTP, anyone's) stalled every client
        for seconds (found in an audit). Bounded by the orders resting, known before the
        walk and the same whatever the client asks: a token more for every
        `BOOK_ORDERS_PER_TOKEN`, owed like a `status`'s."""
        books = self.engine.books
        return sum(len(books[s]) for s in segments) / BOOK_ORDERS_PER_TOKEN

    def _fills(self, conn: Connection, req: wire.FillsRequest) -> None:
        """Answered when Redis has read the page: the connection's later messages need
        not wait for it, and live fills keep coming meanwhile (a client tells the two
        apart by trade id). One page at a time per connection: each read holds Redis,
        and with it every journal write, for up to a fraction of a millisecond."""
        refused = fills_refused(conn.participant)
        if refused is None and conn.reading is not None:
            refused = _busy("a page of fills is being read for this connection: ask again "
                            "when it has come")
        if refused is not None:
            self._error(conn, msgspec.structs.replace(refused, ref=req.ref))
            return
        conn.reading = asyncio.get_running_loop().create_task(self._send_fills(conn, req))

    async def _send_fills(self, conn: Connection, req: wire.FillsRequest) -> None:
        try:
            answer = await self.fill_page(conn.participant, req)
        finally:
            conn.reading = None
        conn.send(self._encode(answer))

    async def fill_page(self, who: Participant,
                        req: wire.FillsRequest) -> wire.FillPage | wire.Error:
        """A page of the participant's own journaled fills (a funder or an SME only), or
        the error that says why not: `busy`, `rate_limited` or `unavailable` (now), or
        `invalid` (an `after` past every trade).

        At most `_READERS` pages are read at once, whoever asks (WebSocket or HTTP), so
        a reconnection storm's catch-ups queue here instead of in Redis; beyond
        `_WAITING` waiting, `busy`. A failure is not a refused command (the alert on
        `matcher_rejects_total{code="unavailable"}` reads those): it is counted apart.
        """
        if req.after is not None and stream_seq(req.after) > self.engine.seq:
            # A cursor is a trade id the participant was sent, never past the engine: one
            # that is would page nothing until the market caught up with it, silently.
            self.metrics.reject("invalid")
            return wire.Error(code="invalid", path="$.after", ref=req.ref,
                              message=f"after: no trade {req.after} yet (the newest command "
                                      f"is seq {self.engine.seq}): a cursor is the trade_id "
                                      "of a fill; if Redis lost that fill, ask without "
                                      "`after`")
        if self._waiting >= _WAITING:
            return _busy(f"{self._waiting} pages of fills are waiting to be read: ask again "
                         "shortly", req.ref)
        own = self._waiting_of.get(who.id, 0)
        if own >= _WAITING_EACH:
            return _busy(f"{own} pages of your fills are being read: ask again when they "
                         "have come", req.ref)
        if not self._fill_budgets.allow(who.id, req.limit):
            self.metrics.reject("rate_limited")
            return wire.Error(code="rate_limited", path="$.limit", ref=req.ref,
                              message=f"over {FILLS_RATE:,} fills/s for this participant: "
                                      "ask again shortly")
        self._waiting += 1
        self._waiting_of[who.id] = own + 1
        try:
            async with self._readers:
                page = await self.history.page(who.id, req.after, req.limit)
        except (RedisError, OSError, ValueError) as exc:     # ValueError: a bad row
            if resp.wrong_node(exc):     # a failover: the next page connects afresh
                self.history.close()
            self.metrics.fill_page_failures += 1
            log.warning("fills of participant %d could not be read: %s", who.id, exc)
            return wire.Error(code="unavailable", path=None, ref=req.ref,
                              message=f"fills cannot be read now: {exc}")
        finally:
            self._waiting -= 1
            if self._waiting_of[who.id] == 1:
                del self._waiting_of[who.id]
            else:
                self._waiting_of[who.id] -= 1
        side: Literal["bid", "ask"] = "bid" if who.role == "funder" else "ask"
        self.metrics.fill_pages += 1
        return wire.FillPage(
            fills=[wire.fill_of(t, side, self.directory.name(t.funder)) for t in page.trades],
            more=page.more, next=page.next, ref=req.ref)

    def _subscribe(self, conn: Connection, msg: wire.Subscribe | wire.Unsubscribe) -> None:
        for i, segment in enumerate(msg.segments):
            if segment not in self.engine.books:
                self._error(conn, wire.Error(code="unknown_segment",
                                             message=f"no segment {segment!r}",
                                             path=f"$.segments[{i}]", ref=msg.ref))
                return
        if isinstance(msg, wire.Unsubscribe):
            for segment in msg.segments:
                conn.segments.discard(segment)
                self.subscribers.get(segment, set()).discard(conn)
                self._book_waiting.pop((conn, segment), None)
            if msg.fills:
                self.fill_subscribers.discard(conn)
            return
        if msg.fills:
            if conn.participant.role not in ("platform", "admin"):
                self._error(conn, wire.Error(code="forbidden", path="$.fills", ref=msg.ref,
                                             message="only the platform and admins may "
                                                     "follow all fills"))
                return
            if self.journal.error is not None:      # no trade will come: say so
                self._error(conn, self.unwritten(msg.ref))
                return
            self.fill_subscribers.add(conn)
            conn.send(self._encode(wire.Subscribed(fills=True, seq=self._delivered_seq,
                                                   ref=msg.ref)))
        # Each segment once, and not one already followed: its updates come anyway, and
        # a book built per repeat (1,000 in one message) made one message cost a
        # thousand (found in review: a few such messages stalled every client). Each
        # book built costs a message, and its walk (`book_cost`): else a `subscribe` to
        # every segment and an `unsubscribe`, over and over, built them all for two.
        new = [s for s in dict.fromkeys(msg.segments) if s not in conn.segments]
        if new:
            conn.allow.owe(len(new) - 1 + self.book_cost(new))
        for segment in new:
            conn.segments.add(segment)
            self.subscribers.setdefault(segment, set()).add(conn)
            self._send_book(segment, conn)

    async def close_all(self, timeout: float) -> None:
        """Close every connection with 1001, all at once: one client that does not read
        must not hold the others' close, nor the exit. Cut those still open after
        `timeout`."""
        conns = [c for cs in self.connections.values() for c in cs]
        closing = [asyncio.ensure_future(c.close(CLOSE_GOING_AWAY, "server shutting down"))
                   for c in conns]
        if closing:
            await asyncio.wait(closing, timeout=timeout)
        for conn, task in zip(conns, closing, strict=True):
            if not task.done():
                conn.transport.abort()
                task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task


#: A command's answers: each goes where its client id says (ADR 27).
_ANSWERS = (wire.Accepted, wire.Rejected, wire.Unconfirmed)
_UNCONFIRMED = ("the journal stopped before this command was known to be written: once "
                "the gateway is back, read status and fills to see whether it took effect "
                "before sending it again")
_ORDERS = (wire.Bid, wire.Ask)
#: The messages answered at once, by their handler; every other is a command.
_READS: dict[type, Callable[[Gateway, Connection, Any], None]] = {
    wire.QuoteRequest: Gateway._quote, wire.StatusRequest: Gateway._status,
    wire.FillsRequest: Gateway._fills, wire.Subscribe: Gateway._subscribe,
    wire.Unsubscribe: Gateway._subscribe, wire.Auth: Gateway._signed_in_already,
}


def _unnamed_answer(event: wire.Event) -> bool:
    """The answer to a command without a client id: only its sender can tell it is its
    own (ADR 27)."""
    return type(event) in _ANSWERS and event.client_id is None   # type: ignore[union-attr]


def bearer_key(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (the scheme in any case); None
    for no header or another scheme. An empty key is `""`: a Bearer header says the
    client signs in with it, so an empty one is a wrong key, refused at once."""
    if header is None:
        return None
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip()


def _busy(why: str, ref: str | None = None) -> wire.Error:
    return wire.Error(code="busy", path="$.type", message=why, ref=ref)


def fills_refused(who: Participant) -> wire.Error | None:
    """Only funders and SMEs have fills of their own to read back."""
    if who.role in ("funder", "sme"):
        return None
    return wire.Error(code="forbidden", path="$.type",
                      message="only funders and SMEs read their own fills; the platform "
                              "reads the fill stream")


def system() -> Participant:
    """The gateway's own identity, for commands it issues (end of day, opening segments)."""
    return _SYSTEM
