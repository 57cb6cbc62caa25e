"""The pure-Python order book: the test oracle for the Cython core and its benchmark baseline.

Matching is planned before anything changes (one loop computes the fills over a simulated
view of remainings and credit, then a separate step applies them), so FOK, ``quote`` and
real matching share one code path and a failed FOK cannot leave a trace.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from sortedcontainers import SortedDict  # type: ignore[import-untyped]

from matcher.types import (
    MAX_AMOUNT,
    MAX_BOOK_RATE_CAP,
    MAX_ID,
    MAX_LINE,
    TIFS,
    BatchError,
    Fill,
    Order,
    OrderError,
    Quote,
    Side,
    Tif,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Book", "CreditLines"]

#: Batch ``tif`` word -> tif. Unknown codes are passed through so that validation rejects
#: them as ``bad_tif`` at their documented place in the check order.
_TIF_CODES: dict[int, Tif] = {0: "gtc", 1: "day", 2: "ioc", 3: "fok"}
_TIF_BY_NAME: dict[str, Tif] = {t: t for t in TIFS}
_OP_BID, _OP_ASK, _OP_CANCEL, _OP_AMEND, _OP_EXPIRE = 1, 2, 3, 4, 5
_WORDS_PER_COMMAND = 8


class _Rec:
    """A live order. Mutable (unlike ``Order``) because fills and amends shrink it in place."""

    __slots__ = (
        "min_ticket",
        "order_id",
        "owner",
        "rate",
        "remaining",
        "side",
        "single_funder",
        "tif",
    )

    def __init__(
        self,
        order_id: int,
        side: Side,
        owner: int,
        rate: int,
        remaining: int,
        min_ticket: int,
        tif: Tif,
        single_funder: bool,
    ) -> None:
        self.order_id = order_id
        self.side: Side = side
        self.owner = owner
        self.rate = rate
        self.remaining = remaining
        self.min_ticket = min_ticket
        self.tif: Tif = tif
        self.single_funder = single_funder

    def snapshot(self) -> Order:
        return Order(
            self.order_id,
            self.side,
            self.owner,
            self.rate,
            self.remaining,
            self.min_ticket,
            self.tif,
            self.single_funder,
        )


def _check_int(field: str, value: object, lo: int, hi: int) -> int:
    """Reject bool explicitly: it is an ``int`` subclass, and ``True`` as an id is a bug."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OrderError(field, "not_int", f"expected an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise OrderError(field, "out_of_range", f"{value} is outside [{lo}, {hi}]")
    return value


def _check_tif(value: object) -> Tif:
    """Look the name up rather than cast, so the stored tif is one of the four literals."""
    tif = _TIF_BY_NAME.get(value) if isinstance(value, str) else None
    if tif is None:
        raise OrderError("tif", "bad_tif", f"{value!r} is not one of {', '.join(TIFS)}")
    return tif


def _fill_qty(r: int, m: int, a: int, single_funder: bool, credit: int | None) -> int:
    """The documented ``q`` formula, kept verbatim so it can be read against docs/book.md."""
    if single_funder:
        q = a if r >= a and (credit is None or credit >= a) else 0
    else:
        q = min(r, a) if credit is None else min(r, a, credit)
    if q < max(1, min(m, r)):
        q = 0
    return q


class _Candidates:
    """The crossing counterparties in priority order, pulled lazily from the book.

    Lazy because a market ask can cross the whole book but usually fills from its top;
    cached because the aggressor loop rescans from the best candidate after each fill.
    """

    __slots__ = ("_seen", "_source")

    def __init__(self, source: Iterator[_Rec]) -> None:
        self._source = source
        self._seen: list[_Rec] = []

    def get(self, i: int) -> _Rec | None:
        while len(self._seen) <= i:
            nxt = next(self._source, None)
            if nxt is None:
                return None
            self._seen.append(nxt)
        return self._seen[i]


class CreditLines:
    """Funders' lines against one core enterprise, shared by that enterprise's books.

    The twin of ``matcher.CreditLines``: a funder without a line cannot lend; lowering a
    line below what is used stops new fills and cancels nothing.
    """

    def __init__(self) -> None:
        self._lines: dict[int, list[int]] = {}  # funder -> [line, used]

    def set(self, funder: int, line: int) -> None:
        f = _check_int("funder", funder, 0, MAX_ID)
        v = _check_int("line", line, 0, MAX_LINE)
        self._lines.setdefault(f, [0, 0])[0] = v

    def repay(self, funder: int, amount: int) -> None:
        f = _check_int("funder", funder, 0, MAX_ID)
        lent = self._lines.get(f)
        v = _check_int("amount", amount, 0, lent[1] if lent else 0)
        if v:
            assert lent is not None
            lent[1] -= v

    def restore(self, funder: int, line: int, used: int) -> None:
        f = _check_int("funder", funder, 0, MAX_ID)
        v = _check_int("line", line, 0, MAX_LINE)
        self._lines[f] = [v, _check_int("used", used, 0, MAX_ID)]

    def get(self, funder: int) -> tuple[int, int]:
        line, used = self._lines.get(_check_int("funder", funder, 0, MAX_ID), (0, 0))
        return line, used

    def items(self) -> list[tuple[int, int, int]]:
        return sorted((f, line, used) for f, (line, used) in self._lines.items() if line or used)

    def left(self, funder: int) -> int:
        line, used = self._lines.get(funder, (0, 0))
        return max(0, line - used)

    def use(self, funder: int, amount: int) -> None:
        self._lines.setdefault(funder, [0, 0])[1] += amount


class Book:
    """A reverse-auction book: lowest bid rate wins, earliest breaks ties, pay-as-bid."""

    def __init__(self, rate_cap_bps: int = 3600, credit: CreditLines | None = None) -> None:
        self.rate_cap_bps = _check_int("rate_cap_bps", rate_cap_bps, 0, MAX_BOOK_RATE_CAP)
        #: Funders' credit lines, shared with the other books of the core enterprise;
        #: ``None``: unlimited.
        self.credit = credit
        # rate -> {order_id: rec}; dicts keep arrival order, which is time priority.
        self._bids: SortedDict = SortedDict()
        self._asks: SortedDict = SortedDict()
        self._orders: dict[int, _Rec] = {}

    # ----------------------------------------------------------------- credit hook

    def _credit_left(self, funder: int) -> int | None:
        """The one place credit enters matching; ``None`` means unlimited.

        The planner subtracts what the plan itself has already spent; ``_execute`` debits.
        """
        return None if self.credit is None else self.credit.left(funder)

    # ----------------------------------------------------------------- book plumbing

    def _side(self, side: Side) -> SortedDict:
        return self._bids if side == "bid" else self._asks

    def _insert(self, rec: _Rec) -> None:
        """Append at the back of its level: a (re)inserted order has the latest time."""
        level: dict[int, _Rec] = self._side(rec.side).setdefault(rec.rate, {})
        level[rec.order_id] = rec
        self._orders[rec.order_id] = rec

    def _remove(self, rec: _Rec) -> None:
        """Drop empty levels too, so level iteration never yields an empty level."""
        book = self._side(rec.side)
        level: dict[int, _Rec] = book[rec.rate]
        del level[rec.order_id]
        if not level:
            del book[rec.rate]
        del self._orders[rec.order_id]

    def _crossing(self, agg: _Rec) -> Iterator[_Rec]:
        """Counterparties that cross ``agg``, best first; stops where levels stop crossing."""
        if agg.side == "ask":
            rates = self._bids.irange(maximum=agg.rate)
            book = self._bids
        else:
            rates = self._asks.irange(minimum=agg.rate, reverse=True)
            book = self._asks
        for rate in rates:
            level: dict[int, _Rec] = book[rate]
            yield from level.values()

    # ----------------------------------------------------------------- matching

    def _plan(self, agg: _Rec) -> list[Fill]:
        """The fills ``agg`` would get as an aggressor now, without changing the book.

        Literally the rule: take the first crossing counterparty in priority order whose
        ``q > 0`` on the current (simulated) state, fill it, and rescan from the best one.
        Rescanning after every fill covers the bid-aggressor restart case without having
        to detect it; exhausted counterparties at the front are skipped for good.
        """
        left: dict[int, int] = {}  # counterparty id -> simulated remaining
        spent: dict[int, int] = {}  # funder -> credit used by this plan
        agg_left = agg.remaining
        cands = _Candidates(self._crossing(agg))
        head = 0
        fills: list[Fill] = []

        def remaining(rec: _Rec) -> int:
            return left.get(rec.order_id, rec.remaining)

        while agg_left > 0:
            chosen: _Rec | None = None
            qty = 0
            i = head
            while (cp := cands.get(i)) is not None:
                i += 1
                cp_left = remaining(cp)
                if cp_left == 0:
                    continue
                bid, ask = (agg, cp) if agg.side == "bid" else (cp, agg)
                r = agg_left if bid is agg else cp_left
                a = agg_left if ask is agg else cp_left
                credit = self._credit_left(bid.owner)
                if credit is not None:
                    credit -= spent.get(bid.owner, 0)
                qty = _fill_qty(r, bid.min_ticket, a, ask.single_funder, credit)
                if qty > 0:
                    chosen = cp
                    break
            if chosen is None:
                break
            bid, ask = (agg, chosen) if agg.side == "bid" else (chosen, agg)
            fills.append(Fill(bid.order_id, ask.order_id, bid.owner, ask.owner, bid.rate, qty))
            left[chosen.order_id] = remaining(chosen) - qty
            spent[bid.owner] = spent.get(bid.owner, 0) + qty
            agg_left -= qty
            while (cp := cands.get(head)) is not None and remaining(cp) == 0:
                head += 1
        return fills

    def _execute(self, agg: _Rec, fills: list[Fill]) -> list[int]:
        """Apply a plan; return the resting bids it partially filled, in fill order.

        ``agg`` may be resting (amend, re-match) or new (not yet in the book); either way
        it is the one side of every fill.
        """
        touched: list[int] = []
        for fill in fills:
            if self.credit is not None:
                self.credit.use(fill.funder, fill.amount)
            cp_id = fill.ask_id if agg.side == "bid" else fill.bid_id
            for rec in (agg, self._orders.get(cp_id)):
                assert rec is not None, "a plan only names resting counterparties"
                rec.remaining -= fill.amount
                resting = self._orders.get(rec.order_id) is rec
                if resting and rec.remaining == 0:
                    self._remove(rec)
                elif resting and rec.side == "bid" and rec.order_id not in touched:
                    touched.append(rec.order_id)
        return touched

    def _rematch(self, touched: list[int]) -> list[Fill]:
        """Step 5: a partially filled bid has a lower ``min(m, r)`` and may now match."""
        out: list[Fill] = []
        for bid_id in touched:
            rec = self._orders.get(bid_id)
            if rec is None or rec.side != "bid":
                continue
            fills = self._plan(rec)
            self._execute(rec, fills)
            out.extend(fills)
        return out

    def _submit(self, rec: _Rec) -> list[Fill]:
        """Steps 2-5 for a new, validated order."""
        fills = self._plan(rec)
        if rec.tif == "fok" and sum(f.amount for f in fills) != rec.remaining:
            return []
        touched = self._execute(rec, fills)
        if rec.remaining > 0 and rec.tif in ("gtc", "day"):
            self._insert(rec)
            if fills and rec.side == "bid":
                # The new bid itself was partially filled and now rests.
                touched.insert(0, rec.order_id)
        return fills + self._rematch(touched)

    # ----------------------------------------------------------------- commands

    def _check_id(self, order_id: object) -> int:
        return _check_int("order_id", order_id, 0, MAX_ID)

    def _check_new_id(self, order_id: int) -> None:
        """Duplicate is checked last, after every field, as docs/book.md orders it."""
        if order_id in self._orders:
            raise OrderError("order_id", "duplicate", f"{order_id} is already resting")

    def bid(
        self,
        order_id: int,
        funder: int,
        rate_bps: int,
        amount: int,
        *,
        min_ticket: int = 0,
        tif: str = "gtc",
    ) -> list[Fill]:
        """Offer to lend up to ``amount`` at ``rate_bps``; returns the fills, in order."""
        oid = self._check_id(order_id)
        owner = _check_int("funder", funder, 0, MAX_ID)
        rate = _check_int("rate_bps", rate_bps, 0, self.rate_cap_bps)
        qty = _check_int("amount", amount, 1, MAX_AMOUNT)
        ticket = _check_int("min_ticket", min_ticket, 0, MAX_AMOUNT)
        checked_tif = _check_tif(tif)
        self._check_new_id(oid)
        return self._submit(_Rec(oid, "bid", owner, rate, qty, ticket, checked_tif, False))

    def ask(
        self,
        order_id: int,
        sme: int,
        max_rate_bps: int | None,
        amount: int,
        *,
        tif: str = "ioc",
        single_funder: bool = False,
    ) -> list[Fill]:
        """Ask to borrow ``amount`` at no more than ``max_rate_bps`` (``None``: any rate)."""
        oid = self._check_id(order_id)
        owner = _check_int("sme", sme, 0, MAX_ID)
        if max_rate_bps is None:
            rate = self.rate_cap_bps
        else:
            rate = _check_int("max_rate_bps", max_rate_bps, 0, self.rate_cap_bps)
        qty = _check_int("amount", amount, 1, MAX_AMOUNT)
        checked_tif = _check_tif(tif)
        self._check_new_id(oid)
        return self._submit(_Rec(oid, "ask", owner, rate, qty, 0, checked_tif, bool(single_funder)))

    def _resting(self, order_id: object) -> _Rec:
        """Format errors come before "not found", so a malformed id is never a KeyError."""
        oid = self._check_id(order_id)
        rec = self._orders.get(oid)
        if rec is None:
            raise KeyError(oid)
        return rec

    def cancel(self, order_id: int) -> int:
        """Remove a resting order; its remaining is what the owner gets back."""
        rec = self._resting(order_id)
        self._remove(rec)
        return rec.remaining

    def amend(
        self, order_id: int, *, rate_bps: int | None = None, amount: int | None = None
    ) -> list[Fill]:
        """Change a resting order's rate and/or remaining; only a reduction keeps its place."""
        rec = self._resting(order_id)
        rate = rec.rate
        if rate_bps is not None:
            rate = _check_int("rate_bps", rate_bps, 0, self.rate_cap_bps)
        qty = rec.remaining
        if amount is not None:
            qty = _check_int("amount", amount, 1, MAX_AMOUNT)
        if rate_bps is None and amount is None:
            raise OrderError("amount", "missing", "give rate_bps, amount or both")
        if rate == rec.rate and qty <= rec.remaining:
            rec.remaining = qty
        else:
            self._remove(rec)
            rec.rate, rec.remaining = rate, qty
            self._insert(rec)
        fills = self._plan(rec)
        return fills + self._rematch(self._execute(rec, fills))

    def rematch(self, funder: int) -> list[Fill]:
        """Match the funder's resting bids again, best first (after its line rose)."""
        f = _check_int("funder", funder, 0, MAX_ID)
        ids = [rec.order_id for level in self._bids.values() for rec in level.values()
               if rec.owner == f]
        out: list[Fill] = []
        for oid in ids:
            rec = self._orders.get(oid)
            if rec is not None:
                fills = self._plan(rec)
                out += fills + self._rematch(self._execute(rec, fills))
        return out

    def restore(self, orders: Iterable[Order]) -> None:
        """Append resting orders (as from ``orders()``) at the back of their levels, all
        or none: every order is checked as the compiled book checks it (one with nothing
        remaining, over the cap, or with an id already resting or given twice is
        refused) before the first goes in, so a refusal changes nothing."""
        staged: dict[int, _Rec] = {}  # order_id -> record; keeps the given order
        for o in orders:
            oid = self._check_id(o.order_id)
            self._check_new_id(oid)
            if oid in staged:
                raise OrderError("order_id", "duplicate", f"{oid} is given twice")
            staged[oid] = _Rec(oid, "bid" if o.side == "bid" else "ask",
                               _check_int("owner", o.owner, 0, MAX_ID),
                               _check_int("rate_bps", o.rate_bps, 0, self.rate_cap_bps),
                               _check_int("remaining", o.remaining, 1, MAX_AMOUNT),
                               _check_int("min_ticket", o.min_ticket, 0, MAX_AMOUNT),
                               _check_tif(o.tif), bool(o.single_funder))
        for rec in staged.values():
            self._insert(rec)

    def expire_day(self) -> list[int]:
        """End of day: ``day`` orders lapse; sorted ids make the result deterministic."""
        expired = sorted(oid for oid, rec in self._orders.items() if rec.tif == "day")
        for oid in expired:
            self._remove(self._orders[oid])
        return expired

    # ----------------------------------------------------------------- reads

    def best_bid(self) -> tuple[int, int] | None:
        """The rate a market ask would get first, and how much funders can lend there."""
        top = self.depth(1)
        return (top[0][0], top[0][1]) if top else None

    def depth(self, n: int = 10) -> list[tuple[int, int, int]]:
        """Funder side by level as ``(rate_bps, amount, orders)``, best first: the plan of
        a market ask for everything on offer, summed by rate, so credit counts."""
        _check_int("n", n, 0, MAX_ID)
        everything = sum(rec.remaining for rec in self._orders.values() if rec.side == "bid")
        if n == 0 or not everything:
            return []
        probe = _Rec(-1, "ask", -1, self.rate_cap_bps, everything, 0, "ioc", False)
        levels: dict[int, list[int]] = {}
        for fill in self._plan(probe):
            level = levels.setdefault(fill.rate_bps, [0, 0])
            level[0] += fill.amount
            level[1] += 1
        return [(rate, amount, orders) for rate, (amount, orders) in levels.items()][:n]

    def demand(self) -> tuple[int, int]:
        """Resting asks as ``(amount, orders)``: the unmet borrowing need."""
        asks = [rec for rec in self._orders.values() if rec.side == "ask"]
        return sum(rec.remaining for rec in asks), len(asks)

    def quote(self, amount: int, *, single_funder: bool = False) -> Quote | None:
        """What an IOC market ask would get now, planned only: the book is untouched."""
        qty = _check_int("amount", amount, 1, MAX_AMOUNT)
        probe = _Rec(-1, "ask", -1, self.rate_cap_bps, qty, 0, "ioc", bool(single_funder))
        fills = self._plan(probe)
        if not fills:
            return None
        fillable = sum(f.amount for f in fills)
        weighted = sum(f.rate_bps * f.amount for f in fills)
        return Quote(
            fillable=fillable,
            avg_rate_bps=weighted / fillable,
            worst_rate_bps=max(f.rate_bps for f in fills),
            funders=len({f.funder for f in fills}),
        )

    def order(self, order_id: int) -> Order | None:
        """A snapshot, not the live record, so callers cannot corrupt the book."""
        rec = self._orders.get(self._check_id(order_id))
        return None if rec is None else rec.snapshot()

    def orders(self) -> list[Order]:
        """Every resting order, bids best first then asks best first, in queue order.

        The full state in one list, so two books (or one book over time) compare with ``==``.
        """
        out: list[Order] = []
        for book, rates in ((self._bids, self._bids.keys()), (self._asks, reversed(self._asks))):
            for rate in rates:
                level: dict[int, _Rec] = book[rate]
                out.extend(rec.snapshot() for rec in level.values())
        return out

    def __len__(self) -> int:
        return len(self._orders)

    # ----------------------------------------------------------------- batch

    def apply(self, commands: Buffer) -> array[int]:
        """Run a packed batch through the call API, so both paths share every rule.

        Returns 7 words per fill; the first is the index of the command that made it. On a
        bad command, ``BatchError.fills`` carries the fills of the commands already applied.
        """
        view = memoryview(commands)
        if view.itemsize not in (1, 8):
            raise TypeError(f"expected a buffer of int64, got item size {view.itemsize}")
        words = view.cast("B").cast("q")
        if len(words) % _WORDS_PER_COMMAND:
            raise ValueError(f"{len(words)} words is not a whole number of 8-word commands")
        out: array[int] = array("q")
        for index in range(len(words) // _WORDS_PER_COMMAND):
            base = index * _WORDS_PER_COMMAND
            cmd: list[int] = words[base : base + _WORDS_PER_COMMAND].tolist()
            try:
                fills = self._apply_one(cmd)
            except (OrderError, KeyError) as exc:
                raise BatchError(index, exc, out) from exc
            for fill in fills:
                out.append(index)
                out.extend(fill)
        return out

    def _apply_one(self, cmd: list[int]) -> list[Fill]:
        op, oid, owner, rate, amount, min_ticket, tif_code, flags = cmd
        tif: str = _TIF_CODES.get(tif_code, str(tif_code))
        if op == _OP_BID:
            return self.bid(oid, owner, rate, amount, min_ticket=min_ticket, tif=tif)
        if op == _OP_ASK:
            return self.ask(
                oid,
                owner,
                None if rate == -1 else rate,
                amount,
                tif=tif,
                single_funder=bool(flags & 1),
            )
        if op == _OP_CANCEL:
            self.cancel(oid)
            return []
        if op == _OP_AMEND:
            return self.amend(
                oid,
                rate_bps=None if rate == -1 else rate,
                amount=None if amount == -1 else amount,
            )
        if op == _OP_EXPIRE:
            self.expire_day()
            return []
        raise OrderError("op", "bad_op", f"{op} is not an op (1 bid .. 5 expire_day)")
