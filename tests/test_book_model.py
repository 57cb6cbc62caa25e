"""The Cython book against its pure-Python twin, on random command streams.

Both books get the same commands; they must return the same fills (or the same error)
and hold the same orders in the same queue order after every step. On top of that
agreement, each step is checked against the rules themselves (docs/book.md), so a bug
the two books share still fails: amounts are conserved, the book is never left crossed
by a matchable pair, every fill is at the bid's rate within the ask's limit, and
min_ticket and single_funder hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import matcher
from matcher import reference
from matcher.types import Fill, Order, OrderError

CAP = 400
RATES = st.integers(min_value=240, max_value=260)
AMOUNTS = st.integers(min_value=1, max_value=1_000)
TIFS = st.sampled_from(["gtc", "gtc", "day", "ioc", "fok"])


def fill_qty(bid: Order, ask: Order) -> int:
    """The rule of docs/book.md "Who can fill whom", written out again (no credit)."""
    r, m, a = bid.remaining, bid.min_ticket, ask.remaining
    if ask.single_funder:
        q = a if r >= a else 0
    else:
        q = min(r, a)
    return q if q >= max(1, min(m, r)) else 0


@st.composite
def commands(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    n = draw(st.integers(min_value=1, max_value=60))
    out: list[tuple[Any, ...]] = []
    for i in range(n):
        kind = draw(st.sampled_from(["bid"] * 4 + ["ask"] * 3 + ["cancel", "amend", "amend",
                                                               "expire", "quote", "bad"]))
        # Ids are fresh per command; cancels and amends pick earlier ones (maybe gone).
        target = draw(st.integers(min_value=0, max_value=max(i - 1, 0)))
        if kind == "bid":
            out.append(("bid", i, draw(st.integers(0, 3)), draw(RATES), draw(AMOUNTS),
                        draw(st.sampled_from([0, 0, 50, 300, 2_000])), draw(TIFS)))
        elif kind == "ask":
            out.append(("ask", i, draw(st.integers(10, 13)),
                        draw(st.one_of(st.none(), RATES)), draw(AMOUNTS),
                        draw(TIFS), draw(st.booleans())))
        elif kind == "cancel":
            out.append(("cancel", target))
        elif kind == "amend":
            out.append(("amend", target, draw(st.one_of(st.none(), RATES)),
                        draw(st.one_of(st.none(), AMOUNTS))))
        elif kind == "expire":
            out.append(("expire",))
        elif kind == "quote":
            out.append(("quote", draw(AMOUNTS), draw(st.booleans())))
        else:
            out.append(("bad", target, draw(st.sampled_from(
                ["amount", "rate", "min_ticket", "tif", "duplicate", "big"]))))
    return out


def run(book: Any, cmd: tuple[Any, ...]) -> Any:
    """Apply one command; return what it returned or a comparable form of what it raised."""
    kind = cmd[0]
    try:
        if kind == "bid":
            _, oid, funder, rate, amount, min_ticket, tif = cmd
            return book.bid(oid, funder, rate, amount, min_ticket=min_ticket, tif=tif)
        if kind == "ask":
            _, oid, sme, max_rate, amount, tif, single = cmd
            return book.ask(oid, sme, max_rate, amount, tif=tif, single_funder=single)
        if kind == "cancel":
            return book.cancel(cmd[1])
        if kind == "amend":
            return book.amend(cmd[1], rate_bps=cmd[2], amount=cmd[3])
        if kind == "expire":
            return book.expire_day()
        if kind == "quote":
            return book.quote(cmd[1], single_funder=cmd[2])
        _, target, what = cmd
        resting = [o.order_id for o in book.orders()]
        args: dict[str, Any] = {"order_id": 10_000 + target, "funder": 1, "rate_bps": 250,
                                "amount": 100, "min_ticket": 0, "tif": "gtc"}
        if what == "amount":
            args["amount"] = 0
        elif what == "rate":
            args["rate_bps"] = CAP + 1
        elif what == "min_ticket":
            args["min_ticket"] = -1
        elif what == "tif":
            args["tif"] = "gtd"
        elif what == "big":
            args["amount"] = 2**63
        elif resting:
            args["order_id"] = resting[target % len(resting)]
        else:
            return "nothing resting"
        oid, funder, rate, amount = (args.pop(k) for k in
                                     ("order_id", "funder", "rate_bps", "amount"))
        return book.bid(oid, funder, rate, amount, **args)
    except OrderError as e:
        return ("OrderError", e.field, e.reason)
    except KeyError as e:
        return ("KeyError", e.args)


@dataclass
class Ledger:
    """What the test knows of every order, to check conservation independently."""

    amount: dict[int, int] = field(default_factory=dict)     # submitted or amended to
    filled: dict[int, int] = field(default_factory=dict)
    removed: dict[int, int] = field(default_factory=dict)    # cancelled, expired, dropped


def check_step(cmd: tuple[Any, ...], result: Any, before: list[Order], after: list[Order],
               ledger: Ledger) -> None:
    was = {o.order_id: o for o in before}
    now = {o.order_id: o for o in after}
    fills: list[Fill] = result if isinstance(result, list) and cmd[0] != "expire" else []
    if isinstance(result, tuple) and result and result[0] in ("OrderError", "KeyError"):
        assert before == after, "a rejected command changed the book"
        return
    if cmd[0] == "quote":
        assert before == after, "a quote changed the book"
    # Each fill: the bid's rate, within the ask's limit, min_ticket and single_funder kept.
    remaining = {oid: o.remaining for oid, o in was.items()}
    new_tif = cmd[6] if cmd[0] == "bid" else cmd[5] if cmd[0] == "ask" else None
    if cmd[0] in ("bid", "ask"):
        remaining[cmd[1]] = cmd[4]
    if cmd[0] == "amend" and cmd[1] in was:
        o = was[cmd[1]]
        remaining[o.order_id] = o.remaining if cmd[3] is None else cmd[3]
    bid_rate: dict[int, int] = {oid: o.rate_bps for oid, o in was.items() if o.side == "bid"}
    ask_limit = {oid: o.rate_bps for oid, o in was.items() if o.side == "ask"}
    min_ticket = {oid: o.min_ticket for oid, o in was.items()}
    single = {oid: o.single_funder for oid, o in was.items()}
    if cmd[0] == "bid":
        bid_rate[cmd[1]], min_ticket[cmd[1]] = cmd[3], cmd[5]
    if cmd[0] == "ask":
        ask_limit[cmd[1]], single[cmd[1]] = (CAP if cmd[3] is None else cmd[3]), cmd[6]
    if cmd[0] == "amend" and cmd[1] in was and cmd[2] is not None:
        (bid_rate if was[cmd[1]].side == "bid" else ask_limit)[cmd[1]] = cmd[2]
    for f in fills:
        assert f.rate_bps == bid_rate[f.bid_id], "pay-as-bid"
        assert f.rate_bps <= ask_limit[f.ask_id], "within the ask's max rate"
        r = remaining[f.bid_id]
        assert f.amount >= max(1, min(min_ticket[f.bid_id], r)), "min_ticket"
        if single[f.ask_id]:
            assert f.amount == remaining[f.ask_id], "single_funder takes the whole ask"
        remaining[f.bid_id] -= f.amount
        remaining[f.ask_id] -= f.amount
        assert remaining[f.bid_id] >= 0 and remaining[f.ask_id] >= 0
        for oid in (f.bid_id, f.ask_id):
            ledger.filled[oid] = ledger.filled.get(oid, 0) + f.amount
    if cmd[0] in ("bid", "ask"):
        ledger.amount[cmd[1]] = cmd[4]
        if new_tif == "fok":
            own = sum(f.amount for f in fills if cmd[1] in (f.bid_id, f.ask_id))
            assert own in (0, cmd[4]), "FOK is all or nothing"
    if cmd[0] == "amend" and cmd[1] in was:
        o = was[cmd[1]]
        ledger.amount[o.order_id] += (o.remaining if cmd[3] is None else cmd[3]) - o.remaining
    # Orders that left without being filled were cancelled, expired or dropped.
    for oid, rem in remaining.items():
        if oid not in now and rem:
            assert (cmd[0] in ("cancel", "expire") or new_tif in ("ioc", "fok")), (
                f"order {oid} vanished with {rem} left")
            assert cmd[0] == "expire" or oid == cmd[1], f"order {oid} vanished"
            ledger.removed[oid] = ledger.removed.get(oid, 0) + rem
        elif oid in now:
            assert now[oid].remaining == rem, f"order {oid}: remaining off"
    if cmd[0] == "expire":
        assert result == sorted(o.order_id for o in before if o.tif == "day")
        assert all(o.tif != "day" for o in after)
    if cmd[0] == "cancel" and isinstance(result, int):
        assert result == was[cmd[1]].remaining
    # Conservation: amount = filled + resting + removed, for every order ever seen.
    for oid, amount in ledger.amount.items():
        resting = now[oid].remaining if oid in now else 0
        assert amount == ledger.filled.get(oid, 0) + resting + ledger.removed.get(oid, 0)
    # Never crossed: no resting pair that crosses could be filled.
    bids = [o for o in after if o.side == "bid"]
    asks = [o for o in after if o.side == "ask"]
    for a in asks:
        for b in bids:
            if a.rate_bps >= b.rate_bps:
                assert fill_qty(b, a) == 0, f"crossed: bid {b} and ask {a} could fill"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands())
def test_core_agrees_with_reference_and_keeps_the_rules(cmds: list[tuple[Any, ...]]) -> None:
    core = matcher.Book(rate_cap_bps=CAP)
    ref = reference.Book(rate_cap_bps=CAP)
    ledger = Ledger()
    for cmd in cmds:
        before = ref.orders()
        got, want = run(core, cmd), run(ref, cmd)
        assert got == want, f"{cmd}: core {got} != reference {want}"
        after = ref.orders()
        assert core.orders() == after
        assert core.depth(100) == ref.depth(100)
        assert core.demand() == ref.demand()
        assert core.best_bid() == ref.best_bid()
        assert len(core) == len(ref) == len(after)
        check_step(cmd, want, before, after, ledger)


@st.composite
def credit_commands(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Commands over two books of one core enterprise, with credit lines moving: set, and
    freed by repayments (some of more than is lent, which both must refuse)."""
    n = draw(st.integers(min_value=1, max_value=50))
    out: list[tuple[Any, ...]] = []
    for i in range(n):
        kind = draw(st.sampled_from(["bid"] * 4 + ["ask"] * 3
                                    + ["line", "line", "cancel", "repay"]))
        book = draw(st.integers(0, 1))
        if kind == "bid":
            out.append(("bid", book, i, draw(st.integers(0, 2)), draw(RATES), draw(AMOUNTS),
                        draw(st.sampled_from([0, 0, 200])), "gtc"))
        elif kind == "ask":
            out.append(("ask", book, i, draw(st.integers(10, 12)),
                        draw(st.one_of(st.none(), RATES)), draw(AMOUNTS),
                        draw(st.sampled_from(["ioc", "gtc", "fok"])), draw(st.booleans())))
        elif kind == "line":
            out.append(("line", draw(st.integers(0, 2)), draw(st.integers(0, 1_500))))
        elif kind == "repay":
            out.append(("repay", draw(st.integers(0, 2)), draw(st.integers(0, 1_200))))
        else:
            out.append(("cancel", book, draw(st.integers(0, max(i - 1, 0)))))
    return out


def run_credit(books: list[Any], lines: Any, cmd: tuple[Any, ...]) -> Any:
    """One command; a line change re-matches the funder on every book, in book order."""
    try:
        if cmd[0] == "line":
            lines.set(cmd[1], cmd[2])
            return [fill for book in books for fill in book.rematch(cmd[1])]
        if cmd[0] == "repay":
            lines.repay(cmd[1], cmd[2])
            return [fill for book in books for fill in book.rematch(cmd[1])]
        book = books[cmd[1]]
        if cmd[0] == "bid":
            _, _, oid, funder, rate, amount, min_ticket, tif = cmd
            return book.bid(oid, funder, rate, amount, min_ticket=min_ticket, tif=tif)
        if cmd[0] == "ask":
            _, _, oid, sme, max_rate, amount, tif, single = cmd
            return book.ask(oid, sme, max_rate, amount, tif=tif, single_funder=single)
        return book.cancel(cmd[2])
    except KeyError as e:
        return ("KeyError", e.args)
    except OrderError as e:
        return ("OrderError", e.field, e.reason)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(credit_commands())
def test_shared_credit_lines_agree_and_are_never_exceeded(cmds: list[tuple[Any, ...]]) -> None:
    core_lines, ref_lines = matcher.CreditLines(), reference.CreditLines()
    core = [matcher.Book(rate_cap_bps=CAP, credit=core_lines) for _ in range(2)]
    ref = [reference.Book(rate_cap_bps=CAP, credit=ref_lines) for _ in range(2)]
    for cmd in cmds:
        used_before = {f: used for f, _, used in ref_lines.items()}
        got, want = run_credit(core, core_lines, cmd), run_credit(ref, ref_lines, cmd)
        assert got == want, f"{cmd}: core {got} != reference {want}"
        assert core_lines.items() == ref_lines.items()
        for c, r in zip(core, ref, strict=True):
            assert c.orders() == r.orders()
            assert c.depth(100) == r.depth(100)
            assert c.best_bid() == r.best_bid()
            # Depth is what a market ask for everything could get, level by level.
            lendable = sum(amount for _, amount, _ in r.depth(100))
            quote = r.quote(min(10**9, sum(o.remaining for o in r.orders())) or 1)
            assert lendable == (quote.fillable if quote else 0)
        # No funder lends past its line: a step can use at most what was left.
        for funder, line, used in ref_lines.items():
            assert used <= max(line, used_before.get(funder, 0)), f"funder {funder} over line"
        # Never crossed: no resting pair that crosses could be filled with the credit left.
        for book in ref:
            orders = book.orders()
            for a in (o for o in orders if o.side == "ask"):
                for b in (o for o in orders if o.side == "bid"):
                    line, used = ref_lines.get(b.owner)
                    if a.rate_bps >= b.rate_bps and fill_qty(b, a) and line - used > 0:
                        left = line - used
                        q = (a.remaining if b.remaining >= a.remaining <= left else 0
                             ) if a.single_funder else min(b.remaining, a.remaining, left)
                        assert q < max(1, min(b.min_ticket, b.remaining)), (
                            f"crossed: {b} and {a} could fill {q}")


def _outcome(call: Any) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except OrderError as exc:
        return ("refused", exc.field, exc.reason)


def _resting(**kw: Any) -> list[Order]:
    fields = dict(order_id=1, side="bid", owner=5, rate_bps=250, remaining=10,
                  min_ticket=0, tif="gtc", single_funder=False)
    return [Order(**{**fields, **kw})]


@pytest.mark.parametrize(("name", "call"), [
    ("cap over the book's maximum", lambda B: B(rate_cap_bps=2_000_000)),
    ("negative depth", lambda B: B().depth(-1)),
    ("an order id that is a string", lambda B: B().order("7")),
    ("a negative order id", lambda B: B().order(-1)),
    ("restoring nothing remaining", lambda B: B().restore(_resting(remaining=0))),
    ("restoring over the cap", lambda B: B(rate_cap_bps=300).restore(_resting(rate_bps=400))),
    ("restoring an unknown tif", lambda B: B().restore(_resting(tif="gfd"))),
    ("no such order", lambda B: B().order(3)),
    ("no depth asked", lambda B: B().depth(0)),
])
def test_both_books_refuse_the_same_calls_outside_the_engines_inputs(name: str,
                                                                      call: Any) -> None:
    """The twin is the oracle: it checked less than the compiled book where the engine
    never calls (it took a cap of 2,000,000, restored an order with nothing remaining,
    and answered None to a string id; found in review)."""
    assert _outcome(lambda: call(reference.Book)) == _outcome(lambda: call(matcher.Book))


# --- restore: all or none ------------------------------------------------------------

BOOKS = pytest.mark.parametrize("book_type", [matcher.Book, reference.Book],
                                ids=["core", "reference"])


def _order(order_id: int, **kw: Any) -> Order:
    fields = dict(order_id=order_id, side="bid", owner=7, rate_bps=255, remaining=20,
                  min_ticket=0, tif="gtc", single_funder=False)
    return Order(**{**fields, **kw})


def _market(book_type: Any) -> Any:
    """A book with two bid levels and an ask resting below them."""
    book = book_type(rate_cap_bps=CAP)
    book.bid(1, 5, 250, 100)
    book.bid(2, 6, 260, 50, min_ticket=10, tif="day")
    book.ask(3, 11, 240, 30, tif="gtc")
    return book


def _state(book: Any) -> tuple[Any, ...]:
    return book.orders(), len(book), book.depth(100), book.demand()


#: Good orders, then the one that is refused; the error names the same field in both books.
REFUSED_RESTORES = {
    "nothing remaining": (_order(12, remaining=0), ("remaining", "out_of_range")),
    "over the cap": (_order(12, rate_bps=CAP + 1), ("rate_bps", "out_of_range")),
    "an unknown tif": (_order(12, tif="gfd"), ("tif", "bad_tif")),
    "an id already resting": (_order(2, rate_bps=245), ("order_id", "duplicate")),
    "an id given twice": (_order(10, rate_bps=245), ("order_id", "duplicate")),
}


@BOOKS
@pytest.mark.parametrize("last", list(REFUSED_RESTORES), ids=list(REFUSED_RESTORES))
def test_a_restore_refused_at_its_last_order_changes_nothing(book_type: Any, last: str) -> None:
    bad, error = REFUSED_RESTORES[last]
    book = _market(book_type)
    before = _state(book)
    good = [_order(10), _order(11, side="ask", owner=12, rate_bps=230)]
    with pytest.raises(OrderError) as refused:
        book.restore([*good, bad])
    assert (refused.value.field, refused.value.reason) == error
    assert _state(book) == before


@BOOKS
def test_a_restore_from_a_generator_is_checked_whole_before_anything_goes_in(
        book_type: Any) -> None:
    book = _market(book_type)
    before = _state(book)
    with pytest.raises(OrderError, match="remaining"):
        book.restore(o for o in [_order(10), _order(11), _order(12, remaining=0)])
    assert _state(book) == before
    book.restore(o for o in [_order(10), _order(11)])
    assert [o.order_id for o in book.orders()] == [1, 10, 11, 2, 3]   # lowest rate first


@BOOKS
def test_a_refused_credit_restore_leaves_the_line_as_it_was(book_type: Any) -> None:
    lines = matcher.CreditLines() if book_type is matcher.Book else reference.CreditLines()
    lines.set(7, 1_000)
    with pytest.raises(OrderError, match="used"):
        lines.restore(7, 5_000, -1)
    assert lines.get(7) == (1_000, 0)


@st.composite
def restores(draw: st.DrawFn) -> list[Order]:
    """Orders to restore over a book built by `commands`: mostly fresh ids (from a few, so
    some repeat), now and then one already resting, now and then a bad field."""
    out: list[Order] = []
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        order_id = draw(st.one_of(st.integers(100, 112), st.integers(100, 112),
                                  st.integers(0, 59)))
        order = _order(order_id, side=draw(st.sampled_from(["bid", "ask"])),
                       owner=draw(st.integers(0, 13)), rate_bps=draw(RATES),
                       remaining=draw(AMOUNTS), tif=draw(st.sampled_from(["gtc", "day"])))
        flaw = draw(st.sampled_from([None] * 12 + ["remaining", "rate", "tif", "owner"]))
        if flaw == "remaining":
            order = order._replace(remaining=0)
        elif flaw == "rate":
            order = order._replace(rate_bps=CAP + 1)
        elif flaw == "tif":
            order = order._replace(tif="gtd")
        elif flaw == "owner":
            order = order._replace(owner=-1)
        out.append(order)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands(), restores())
def test_restore_is_all_or_none_and_both_books_agree(cmds: list[tuple[Any, ...]],
                                                     orders: list[Order]) -> None:
    core = matcher.Book(rate_cap_bps=CAP)
    ref = reference.Book(rate_cap_bps=CAP)
    for cmd in cmds:
        run(core, cmd)
        run(ref, cmd)
    before = _state(ref)
    got = _outcome(lambda: core.restore(iter(orders)))
    want = _outcome(lambda: ref.restore(orders))
    assert got == want
    assert _state(core) == _state(ref)
    if want[0] == "refused":
        assert _state(ref) == before
    else:
        assert len(ref) == before[1] + len(orders)
