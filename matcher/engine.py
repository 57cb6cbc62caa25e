"""The marketplace: one book per segment, credit lines per core enterprise, the
participants' order names, and the sequencer that stamps what it accepts.

A pure state machine (docs/adr/0001): `submit` takes a participant's command and the
gateway's clock reading and returns an `Outcome` (the journal entry to write, replies,
trades for the platform); `apply` is the deterministic half, used both by `submit` and by
recovery, so replaying the journal runs exactly the code that ran live. No I/O, no clock,
no randomness here.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal, cast

import msgspec
from msgspec import Struct

from matcher import Book, CreditLines, OrderError
from matcher import protocol as wire
from matcher.maps import ShardedDict
from matcher.participants import ALLOWED
from matcher.protocol import Role
from matcher.types import Fill


class Segment(Struct, frozen=True, kw_only=True):
    """One market: receivables owed by `core`, financed for `tenor_days`."""

    id: str
    core: str
    tenor_days: int
    rate_cap_bps: int = 3600


#: How long the client id of an order that has ended keeps answering retries, in the
#: journal's time: long enough for any client's timeout-and-retry, short enough that the
#: memory (and every snapshot) stays bounded at thousands of orders a second. A resting
#: order's client id answers retries for as long as the order rests.
RETRY_WINDOW_NS = 120 * 10**9
_EndOfDay = wire.EndOfDay
_VOWEL_ROLES = ("admin", "sme")     # "an SME" as it is read aloud: "an ess-em-ee"


class Finished(Struct, array_like=True, gc=False):
    """An order that has ended, kept for retries until `ts` + RETRY_WINDOW_NS."""

    ts: int
    owner: int
    done: wire.Done
    body: int = 0                  # the order's `OrderInfo.body`


class OrderInfo(Struct, kw_only=True, gc=False):
    """What the engine knows of a resting order beyond the book: names and progress."""

    order_id: int
    segment: str
    owner: int
    client_id: str
    side: Literal["bid", "ask"]
    filled: int
    remaining: int
    # A fingerprint of the command that placed it (`body_of`): a retry sends the same
    # command; another under the same client id is refused. 0: unknown (a snapshot from
    # before it was kept), which any retry matches.
    body: int = 0


def body_of(cmd: wire.Bid | wire.Ask) -> int:
    """The fingerprint of an order's command (`OrderInfo.body`): its MessagePack bytes'
    CRC-32, the same in every process (unlike `hash`), in 30 bits (a small int), never 0."""
    return zlib.crc32(wire.journal_encoder.encode(cmd)) & 0x3FFF_FFFF or 1


class Outcome:
    """The result of one command. `entry` is None when nothing changed (rejected, retry).

    `quiet` (recovery) skips building replies and trades: nobody is listening, and the
    state changes are the same either way. (A plain class: one is made per command, and
    a dataclass with list factories costs twice as much to create.)
    """

    __slots__ = ("entry", "quiet", "replies", "segments", "trades")

    def __init__(self, quiet: bool = False,
                 replies: list[tuple[int, wire.Event]] | None = None) -> None:
        self.quiet = quiet
        self.entry: wire.JournalEntry | None = None
        self.replies: list[tuple[int, wire.Event]] = replies if replies is not None else []
        self.trades: list[wire.Trade] = []
        self.segments: list[str] = []          # books that changed

    def __repr__(self) -> str:
        return (f"Outcome(entry={self.entry!r}, replies={self.replies!r}, "
                f"trades={self.trades!r}, segments={self.segments!r})")

    @property
    def accepted(self) -> bool:
        return self.entry is not None

    def accept(self, entry: wire.JournalEntry, client_id: str | None = None,
               order_id: int | None = None) -> None:
        """The command is applied: journal it and tell its sender."""
        self.entry = entry
        if not self.quiet:
            self.replies.append((entry.participant, wire.Accepted(
                client_id=client_id, seq=entry.seq, order_id=order_id)))


class Reject(Exception):
    """Raised inside `apply` before anything changes; becomes a `rejected` reply."""

    def __init__(self, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.path = code, message, path


def _client_id(cmd: wire.Command) -> str | None:
    return getattr(cmd, "client_id", None)


class Engine:
    """All segments of one engine shard and everything that must survive a restart."""

    def __init__(self, segments: Iterable[Segment] = (),
                 names: Callable[[int], str] = str) -> None:
        self.seq = 0
        self.ts = 0                                      # of the last command applied
        self.segments: dict[str, Segment] = {}
        self.books: dict[str, Book] = {}
        self.lines: dict[str, CreditLines] = {}          # core enterprise -> lines
        # core enterprise -> funder -> the platform's latest `repaid_total` (ADR 24)
        self.repaid: dict[str, dict[int, int]] = {}
        self.halted: set[str] = set()                    # segments closed to orders
        self.suspended: set[int] = set()                 # participants closed to orders
        self._of_core: dict[str, list[str]] = {}         # core enterprise -> its segments
        self.orders: dict[int, OrderInfo] = {}           # resting orders by order id
        # ... and by owner, oldest first: `status`, `cancel_all`, `suspend` and a funder's
        # disconnect read one participant's orders, not every order of the market.
        self.owned: dict[int, dict[int, OrderInfo]] = {}
        # (participant, client id) -> order id, and ended orders for retries: hundreds of
        # thousands in a busy retry window, in maps that grow without stalling (maps.py).
        self.clients: ShardedDict[tuple[int, str], int] = ShardedDict()
        self.finished: ShardedDict[int, Finished] = ShardedDict()
        self._expiry: deque[tuple[int, int]] = deque()   # (ts, order id) in end order
        # The time of the first command since the last end of day (0: none yet): a day
        # that began before the latest cut-off and was never closed missed its end of
        # day, which the gateway issues when it starts (`day_missed`).
        self.day_started = 0
        # The client id of the last end of day that had one: the same again is a repeat.
        self.day_closed_by: str | None = None
        self._names = names
        for segment in segments:
            self._open(segment)

    # --- the two entry points ---

    def submit(self, participant: int, role: Role, cmd: wire.Command, ts: int) -> Outcome:
        """Check the role, stamp the next sequence number and time, and apply.

        Stamped times never go backwards (a clock stepped back by NTP is held), so the
        journal's time is monotonic and the retry window can be measured in it.
        """
        if type(cmd) not in ALLOWED[role]:
            return self._rejected(participant, cmd, Reject(
                "forbidden", f"{'an' if role in _VOWEL_ROLES else 'a'} {role} may not send "
                f"{cmd.__struct_config__.tag}", "$.type"))
        if type(cmd) is _EndOfDay and not cmd.keep_retries:
            cmd = msgspec.structs.replace(cmd, keep_retries=True)   # this version's rule
        return self.apply(wire.JournalEntry(self.seq + 1, max(ts, self.ts), participant, cmd))

    def apply(self, entry: wire.JournalEntry, *, quiet: bool = False) -> Outcome:
        """Apply one stamped command. Deterministic: the same entries give the same state.

        State checks run first and raise `Reject` before anything changes, so a rejected
        command leaves no trace and consumes no sequence number.
        """
        if entry.seq != self.seq + 1:
            raise ValueError(f"seq {entry.seq} does not follow {self.seq}")
        out = Outcome(quiet=quiet)
        cmd = entry.command
        try:
            handler = _HANDLERS[type(cmd)]
            handler(self, entry, out)
        except Reject as r:
            return self._rejected(entry.participant, cmd, r)
        except OrderError as e:
            return self._rejected(entry.participant, cmd,
                                  Reject(e.reason, str(e), f"$.{e.field}"))
        if out.entry is None:             # a retry: nothing changed, nothing to journal
            return out
        if type(cmd) is wire.Skip:
            # Numbering only. Its time is the start's, after the downtime, which the
            # `resume` after it leaves out of the retry window: taken here, it would end
            # the window of every order that ended before the stop (a retried ask made
            # a second loan; found in review).
            self.seq = cmd.last
            return out
        self.seq = entry.seq
        self.ts = entry.ts
        if type(cmd) is wire.EndOfDay:
            self.day_started = 0
        elif not self.day_started:
            self.day_started = entry.ts
        self._forget(entry.ts - RETRY_WINDOW_NS)
        return out

    def day_missed(self, cut_off_ns: int) -> bool:
        """Whether commands of a day that began before the cut-off at `cut_off_ns` (the
        latest one, in journal time) are still waiting for its end of day: the gateway
        was down, or its `end_of_day` was not journaled, when it fell due."""
        return 0 < self.day_started < cut_off_ns

    def remember(self, finished: Iterable[Finished]) -> None:
        """Reload ended orders (from a snapshot), in the order they ended."""
        for f in finished:
            self.finished[f.done.order_id] = f
            self._expiry.append((f.ts, f.done.order_id))

    def rebuild_clients(self) -> None:
        """The client-id map from the orders it names: every resting order, and every
        ended order still remembered for retries. That is all it ever holds: a name is
        entered when its order is placed and dropped only with the ended order (after
        the retry window, or at end of day), and it cannot name a second order while it
        names one (that would be a retry). The resting orders by owner, likewise."""
        self.clients = ShardedDict(((o.owner, o.client_id), o.order_id)
                                   for o in self.orders.values())
        for f in self.finished.values():
            self.clients[(f.owner, f.done.client_id)] = f.done.order_id
        self.owned = {}
        for o in self.orders.values():                  # in order id order
            self.owned.setdefault(o.owner, {})[o.order_id] = o

    def ended(self) -> list[Finished]:
        """The ended orders still remembered, in the order they ended."""
        return [self.finished[order_id] for _ts, order_id in self._expiry]

    def _forget(self, before: int) -> None:
        """Drop ended orders older than the retry window: their client ids are free."""
        expiry = self._expiry
        while expiry and expiry[0][0] < before:
            order_id = expiry.popleft()[1]
            gone = self.finished.pop(order_id, None)
            if gone is not None:
                key = (gone.owner, gone.done.client_id)
                if self.clients.get(key) == order_id:
                    del self.clients[key]

    def _rejected(self, participant: int, cmd: wire.Command, r: Reject) -> Outcome:
        return Outcome(replies=[(participant, wire.Rejected(
            client_id=_client_id(cmd), code=r.code, message=r.message, path=r.path))])

    # --- reads ---

    def quote(self, req: wire.QuoteRequest) -> wire.Quote:
        q = self._book(req.segment).quote(req.amount, single_funder=req.single_funder)
        return wire.Quote(
            segment=req.segment, amount=req.amount, single_funder=req.single_funder,
            fillable=q.fillable if q else 0, avg_rate_bps=q.avg_rate_bps if q else None,
            worst_rate_bps=q.worst_rate_bps if q else None, funders=q.funders if q else 0,
            seq=self.seq, ref=req.ref)

    def book_update(self, segment: str, levels: int = 10,
                    last_fills: list[tuple[int, int]] | None = None) -> wire.BookUpdate:
        book = self.books[segment]
        depth = book.depth(levels)
        amount, orders = book.demand()
        return wire.BookUpdate(
            segment=segment, seq=self.seq, best_rate_bps=depth[0][0] if depth else None,
            levels=[wire.Level(*lv) for lv in depth], demand_amount=amount,
            demand_orders=orders, last_fills=last_fills or [],
            halted=segment in self.halted)

    def status(self, participant: int) -> wire.Status:
        """A participant's own resting orders and credit lines."""
        orders = []
        for o in self.owned.get(participant, {}).values():
            resting = self.books[o.segment].order(o.order_id)
            assert resting is not None
            orders.append(wire.OrderStatus(
                client_id=o.client_id, order_id=o.order_id, segment=o.segment,
                side=o.side, rate_bps=resting.rate_bps, remaining=o.remaining,
                filled=o.filled, tif=resting.tif, min_ticket=resting.min_ticket,
                single_funder=resting.single_funder))
        lines = [wire.LineStatus(core=core, line=line, used=used, repaid=repaid)
                 for core in sorted(self.lines)
                 for line, used in [self.lines[core].get(participant)]
                 for repaid in [self.repaid.get(core, {}).get(participant, 0)]
                 if line or used or repaid]
        return wire.Status(orders=orders, lines=lines,
                           suspended=participant in self.suspended)

    def resting_client_ids(self, participant: int) -> list[str]:
        """The participant's resting orders by client id, oldest first."""
        return [o.client_id for o in self.owned.get(participant, {}).values()]

    def has_resting(self, participant: int) -> bool:
        return participant in self.owned

    def resting_count(self, participant: int) -> int:
        return len(self.owned.get(participant, ()))

    def credit(self, core: str, funder: int) -> tuple[int, int]:
        """(line, used) of a funder against a core enterprise."""
        lines = self.lines.get(core)
        return lines.get(funder) if lines is not None else (0, 0)

    # --- handlers: check, then change ---

    def _book(self, segment: str) -> Book:
        book = self.books.get(segment)
        if book is None:
            raise Reject("unknown_segment", f"no segment {segment!r}", "$.segment")
        return book

    def _open(self, segment: Segment) -> None:
        lines = self.lines.setdefault(segment.core, CreditLines())
        self.segments[segment.id] = segment
        self._of_core.setdefault(segment.core, []).append(segment.id)
        self._of_core[segment.core].sort()
        self.books[segment.id] = Book(rate_cap_bps=segment.rate_cap_bps, credit=lines)

    def retried(self, participant: int, client_id: str, ts: int) -> int | None:
        """The order a new order under this client id, stamped `ts`, would be a retry of:
        one resting, or one that ended within the retry window. None: a new order."""
        order_id = self.clients.get((participant, client_id))
        if order_id is None:
            return None
        ended = self.finished.get(order_id)
        if ended is not None and ended.ts < max(ts, self.ts) - RETRY_WINDOW_NS:
            return None       # its window has passed (it is forgotten once time moves on)
        return order_id

    def _retry(self, entry: wire.JournalEntry, client_id: str, body: int,
               out: Outcome) -> bool:
        """A new order under a client id already used: answer as the first time did, if
        it is the same order sent again (`body`). Under another one's name it is refused
        (ADR 8, addendum): answered as a retry, a funder that reused a name for a new
        rate believed it had re-quoted."""
        order_id = self.retried(entry.participant, client_id, entry.ts)
        if order_id is None:
            return False
        ended = self.finished.get(order_id)
        placed = ended.body if ended is not None else self.orders[order_id].body
        if placed and placed != body:
            raise Reject("client_id_in_use", f"client id {client_id!r} names order "
                         f"{order_id}, placed with other terms: a retry sends the same "
                         "message, and a new order takes a new client id", "$.client_id")
        out.replies.append((entry.participant, wire.Accepted(
            client_id=client_id, seq=order_id, order_id=order_id, duplicate=True)))
        if ended is not None:
            out.replies.append((entry.participant, ended.done))
        return True

    def _bid(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.Bid)
        book = self._book(cmd.segment)
        body = body_of(cmd)
        if self._retry(entry, cmd.client_id, body, out):
            return
        self._check_open(cmd.segment, entry.participant)
        core = self.segments[cmd.segment].core
        # (0, 0): never set, or set to 0 with nothing lent. A line cut to 0 after
        # lending still takes bids (they lend nothing until it is raised): journals
        # hold such bids, and replay must accept what the live engine accepted.
        if self.lines[core].get(entry.participant) == (0, 0):
            raise Reject("no_credit_line", f"set a credit line against {core} first",
                         "$.segment")
        fills = book.bid(entry.seq, entry.participant, cmd.rate_bps, cmd.amount,
                         min_ticket=cmd.min_ticket, tif=cmd.tif)
        self._new_order(entry, cmd.client_id, cmd.segment, "bid", cmd.amount, cmd.tif, body,
                        fills, out)

    def _ask(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.Ask)
        book = self._book(cmd.segment)
        body = body_of(cmd)
        if self._retry(entry, cmd.client_id, body, out):
            return
        self._check_open(cmd.segment, entry.participant)
        fills = book.ask(entry.seq, entry.participant, cmd.max_rate_bps, cmd.amount,
                         tif=cmd.tif, single_funder=cmd.single_funder)
        self._new_order(entry, cmd.client_id, cmd.segment, "ask", cmd.amount, cmd.tif, body,
                        fills, out)

    def _check_open(self, segment: str, participant: int) -> None:
        """A new order in a halted segment, or from a suspended participant, is refused;
        a retry of one placed before is still answered as one (checked first)."""
        if participant in self.suspended:
            raise Reject("suspended", "an admin has suspended your trading: contact the "
                         "platform", "$.type")
        if segment in self.halted:
            raise Reject("segment_halted", f"trading in {segment!r} is halted until an "
                         "admin reopens it", "$.segment")

    def _new_order(self, entry: wire.JournalEntry, client_id: str, segment: str,
                   side: Literal["bid", "ask"], amount: int, tif: wire.Tif, body: int,
                   fills: list[Fill], out: Outcome) -> None:
        """Record a just-placed order; the book has already matched it."""
        order = OrderInfo(order_id=entry.seq, segment=segment, owner=entry.participant,
                          client_id=client_id, side=side, filled=0, remaining=amount,
                          body=body)
        self.orders[order.order_id] = order
        self.owned.setdefault(order.owner, {})[order.order_id] = order
        self.clients[(entry.participant, client_id)] = order.order_id
        out.accept(entry, client_id, order.order_id)
        if fills:
            self._fills(entry, segment, fills, out)
        if order.remaining and (tif == "ioc" or tif == "fok"):
            self._end(order, "unfilled", out)     # the rest is dropped
        out.segments.append(segment)

    def _target(self, entry: wire.JournalEntry, client_id: str) -> OrderInfo:
        """The resting order a cancel or an amend names. One that has ended is
        `not_resting` within its retry window, then `unknown_order`, as `retried` sees
        it: it is forgotten only when a later command comes, which in a quiet market
        can be long after (only the refusal's code depends on it, nothing journaled)."""
        order_id = self.clients.get((entry.participant, client_id))
        order = self.orders.get(order_id) if order_id is not None else None
        if order is None:
            why = f"no resting order {client_id!r} of yours"
            if order_id is not None and self.retried(entry.participant, client_id,
                                                     entry.ts) is not None:
                raise Reject("not_resting", why, "$.client_id")
            raise Reject("unknown_order", why, "$.client_id")
        return order

    def _cancel(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.Cancel)
        order = self._target(entry, cmd.client_id)
        self.books[order.segment].cancel(order.order_id)
        out.accept(entry, cmd.client_id, order.order_id)
        self._end(order, "cancelled", out)
        out.segments.append(order.segment)

    def _cancel_all(self, entry: wire.JournalEntry, out: Outcome) -> None:
        """Every resting order of the sender (in one segment, if named), oldest first:
        `self.orders` is in order id order, and a snapshot keeps that order."""
        cmd = entry.command
        assert isinstance(cmd, wire.CancelAll)
        if cmd.segment is not None:
            self._book(cmd.segment)                   # an unknown segment is rejected
        mine = [o for o in self.owned.get(entry.participant, {}).values()
                if cmd.segment is None or o.segment == cmd.segment]
        out.accept(entry)
        self._end_resting(mine, "cancelled", out)

    def _amend(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.Amend)
        order = self._target(entry, cmd.client_id)
        if cmd.rate_bps is None and cmd.amount is None:
            raise Reject("missing", "give rate_bps or amount to amend", "$.amount")
        fills = self.books[order.segment].amend(order.order_id, rate_bps=cmd.rate_bps,
                                                amount=cmd.amount)
        if cmd.amount is not None:
            order.remaining = cmd.amount
        out.accept(entry, cmd.client_id, order.order_id)
        self._fills(entry, order.segment, fills, out)
        out.segments.append(order.segment)

    def _lines(self, core: str) -> CreditLines:
        lines = self.lines.get(core)
        if lines is None:
            raise Reject("unknown_core", f"no segment of core enterprise {core!r}", "$.core")
        return lines

    def _set_credit_line(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.SetCreditLine)
        lines = self._lines(cmd.core)
        lines.set(entry.participant, cmd.amount)
        out.accept(entry)
        self._lending_moved(entry, cmd.core, entry.participant, out)
        self._line_update(cmd.core, entry.participant, lines, "set", out)

    def _repay(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.Repay)
        lines = self._lines(cmd.core)
        before = self.repaid.get(cmd.core, {}).get(cmd.funder, 0)
        freed = cmd.repaid_total - before
        if freed <= 0:                  # already counted
            self._unchanged(entry, out)
            return
        used = lines.get(cmd.funder)[1]
        if freed > used:
            raise Reject("exceeds_used",
                         f"repaid_total {cmd.repaid_total} would free {freed} fen, but "
                         f"funder {cmd.funder} has {used} lent and unrepaid against "
                         f"{cmd.core} (repaid_total so far: {before})", "$.repaid_total")
        lines.repay(cmd.funder, freed)
        self.repaid.setdefault(cmd.core, {})[cmd.funder] = cmd.repaid_total
        out.accept(entry)
        self._lending_moved(entry, cmd.core, cmd.funder, out)
        self._line_update(cmd.core, cmd.funder, lines, "repaid", out)

    def _line_update(self, core: str, funder: int, lines: CreditLines,
                     reason: Literal["set", "repaid"], out: Outcome) -> None:
        """The funder's line as it now stands, after the fills it lent at once."""
        if not out.quiet:
            line, used = lines.get(funder)
            out.replies.append((funder, wire.LineUpdate(
                core=core, line=line, used=used,
                repaid=self.repaid.get(core, {}).get(funder, 0), reason=reason)))

    def _lending_moved(self, entry: wire.JournalEntry, core: str, funder: int,
                       out: Outcome) -> None:
        """What the funder may lend against `core` rose (or fell): its resting bids may
        match now, segment by segment, and every book of the core shows a new depth."""
        for segment in self._of_core[core]:
            self._fills(entry, segment, self.books[segment].rematch(funder), out)
        out.segments.extend(self._of_core[core])

    def _add_segment(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.AddSegment)
        if cmd.segment in self.segments:
            raise Reject("duplicate_segment", f"segment {cmd.segment!r} exists", "$.segment")
        self._open(Segment(id=cmd.segment, core=cmd.core, tenor_days=cmd.tenor_days,
                           rate_cap_bps=cmd.rate_cap_bps))
        out.accept(entry)
        out.segments.append(cmd.segment)

    def _halt(self, entry: wire.JournalEntry, out: Outcome) -> None:
        """Every order resting in the segment ends, oldest first (`self.orders` is in
        order id order, and a snapshot keeps that order)."""
        cmd = entry.command
        assert isinstance(cmd, wire.Halt)
        book = self._book(cmd.segment)
        if cmd.segment in self.halted:
            self._unchanged(entry, out)
            return
        self.halted.add(cmd.segment)
        out.accept(entry)
        ended = [self.orders[o] for o in sorted(o.order_id for o in book.orders())]
        self._end_resting(ended, "halted", out)
        if not ended:
            out.segments.append(cmd.segment)       # its book says halted all the same

    def _reopen(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.Reopen)
        self._book(cmd.segment)
        if cmd.segment not in self.halted:
            self._unchanged(entry, out)
            return
        self.halted.discard(cmd.segment)
        out.accept(entry)
        out.segments.append(cmd.segment)

    def _suspend(self, entry: wire.JournalEntry, out: Outcome) -> None:
        """Every order the participant has resting ends, oldest first."""
        cmd = entry.command
        assert isinstance(cmd, wire.Suspend)
        if cmd.participant in self.suspended:
            self._unchanged(entry, out)
            return
        self.suspended.add(cmd.participant)
        out.accept(entry)
        self._end_resting(list(self.owned.get(cmd.participant, {}).values()), "suspended",
                          out)
        if not out.quiet:
            out.replies.append((cmd.participant, wire.SuspensionUpdate(suspended=True)))

    def _reinstate(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = entry.command
        assert isinstance(cmd, wire.Reinstate)
        if cmd.participant not in self.suspended:
            self._unchanged(entry, out)
            return
        self.suspended.discard(cmd.participant)
        out.accept(entry)
        if not out.quiet:
            out.replies.append((cmd.participant, wire.SuspensionUpdate(suspended=False)))

    def _unchanged(self, entry: wire.JournalEntry, out: Outcome,
                   client_id: str | None = None) -> None:
        """A command whose effect is already there (a retry, or a report overtaken by a
        later one): `accepted` with `duplicate`, nothing journaled; `seq` is the latest
        command's, which reflects it."""
        out.replies.append((entry.participant, wire.Accepted(
            client_id=client_id, seq=self.seq, duplicate=True)))

    def _end_of_day(self, entry: wire.JournalEntry, out: Outcome) -> None:
        cmd = cast(wire.EndOfDay, entry.command)
        if cmd.client_id is not None and cmd.client_id == self.day_closed_by:
            self._unchanged(entry, out, cmd.client_id)
            return
        if cmd.client_id is not None:
            self.day_closed_by = cmd.client_id
        out.accept(entry, client_id=cmd.client_id)
        for segment in sorted(self.books):
            expired = self.books[segment].expire_day()
            for order_id in expired:
                self._end(self.orders[order_id], "expired", out)
            if expired:
                out.segments.append(segment)
        # Orders that ended within the retry window answer retries across the cut-off,
        # as at any other time: a crash just before it, then a restart after it (which
        # journals the missed end of day), made an SME's retried ask a second loan
        # (found in review). Journals from before `keep_retries` forgot every ended
        # order, and so their names, here: they replay so.
        if not cmd.keep_retries:
            self.finished.clear()
            self._expiry.clear()
            self.rebuild_clients()

    def _resume(self, entry: wire.JournalEntry, out: Outcome) -> None:
        """The retry window counts trading time: an order that ended just before a stop
        still answers retries for its whole window after the start, however long the
        gateway was down (clients retry once they can reach it again). So the time since
        the last command moves every remembered order's end forward by as much."""
        out.accept(entry)
        gap = entry.ts - self.ts
        if gap > 0 and self._expiry:
            self._expiry = deque((ts + gap, order_id) for ts, order_id in self._expiry)
            for finished in self.finished.values():
                finished.ts += gap

    def _skip(self, entry: wire.JournalEntry, out: Outcome) -> None:
        """Number on after a history Redis lost (ADR 29): `apply` moves `seq` to the
        last number skipped, and nothing else (no time passes)."""
        cmd = entry.command
        assert isinstance(cmd, wire.Skip)
        if cmd.last < entry.seq:          # the skip uses up its own number at least
            raise Reject("invalid", f"a skip cannot end before its own seq {entry.seq}",
                         "$.last")
        out.accept(entry)

    # --- fills and ends ---

    def _fills(self, entry: wire.JournalEntry, segment: str, fills: list[Fill],
               out: Outcome) -> None:
        """Book the fills on both orders; report them as trades and fill events.

        The funders' lines are shared by every book of the core enterprise, so what
        the others can show as lendable moved too: they changed as well.
        """
        seg = self.segments[segment]
        if fills:
            out.segments.extend(self._of_core[seg.core])
        for fill in fills:
            bid, ask = self.orders[fill.bid_id], self.orders[fill.ask_id]
            if not out.quiet:
                self._report(entry, seg, fill, bid, ask, out)
            for order in (bid, ask):
                order.filled += fill.amount
                order.remaining -= fill.amount
                if order.remaining == 0:
                    self._end(order, "filled", out)

    def _report(self, entry: wire.JournalEntry, seg: Segment, fill: Fill, bid: OrderInfo,
                ask: OrderInfo, out: Outcome) -> None:
        trade = wire.Trade(
            trade_id=f"{entry.seq}-{len(out.trades)}", seq=entry.seq, ts=entry.ts,
            segment=seg.id, core=seg.core, tenor_days=seg.tenor_days, funder=fill.funder,
            sme=fill.sme, bid_order_id=fill.bid_id, ask_order_id=fill.ask_id,
            bid_client_id=bid.client_id, ask_client_id=ask.client_id,
            rate_bps=fill.rate_bps, amount=fill.amount)
        out.trades.append(trade)
        funder_name = self._names(fill.funder)
        out.replies.append((bid.owner, wire.fill_of(trade, "bid", funder_name)))
        out.replies.append((ask.owner, wire.fill_of(trade, "ask", funder_name)))

    def _end_resting(self, orders: list[OrderInfo], reason: wire.DoneReason,
                     out: Outcome) -> None:
        """Take resting orders off their books, in the order given, and end them; each
        segment is reported changed once."""
        for order in orders:
            self.books[order.segment].cancel(order.order_id)
            self._end(order, reason, out)
        out.segments.extend(dict.fromkeys(o.segment for o in orders))

    def _end(self, order: OrderInfo, reason: wire.DoneReason, out: Outcome) -> None:
        done = wire.Done(client_id=order.client_id, order_id=order.order_id, reason=reason,
                         filled=order.filled, remaining=order.remaining)
        del self.orders[order.order_id]
        mine = self.owned[order.owner]
        del mine[order.order_id]
        if not mine:
            del self.owned[order.owner]
        assert out.entry is not None             # every handler accepts before ending
        self.finished[order.order_id] = Finished(out.entry.ts, order.owner, done, order.body)
        self._expiry.append((out.entry.ts, order.order_id))
        if not out.quiet:
            out.replies.append((order.owner, done))


_HANDLERS: dict[type, Callable[[Engine, wire.JournalEntry, Outcome], None]] = {
    wire.Bid: Engine._bid,
    wire.Ask: Engine._ask,
    wire.Cancel: Engine._cancel,
    wire.CancelAll: Engine._cancel_all,
    wire.Amend: Engine._amend,
    wire.SetCreditLine: Engine._set_credit_line,
    wire.Repay: Engine._repay,
    wire.AddSegment: Engine._add_segment,
    wire.Halt: Engine._halt,
    wire.Reopen: Engine._reopen,
    wire.Suspend: Engine._suspend,
    wire.Reinstate: Engine._reinstate,
    wire.EndOfDay: Engine._end_of_day,
    wire.Resume: Engine._resume,
    wire.Skip: Engine._skip,
}
