"""Scenario tests that read as the specification in docs/book.md, one rule per test.

Every test runs against both books: the pure-Python reference and the Cython core.
Until the core is built, run ``pytest -k reference``; ``core`` fails loudly on purpose.
"""

from __future__ import annotations

import importlib
from array import array
from collections.abc import Callable
from typing import Any

import pytest

from matcher.types import MAX_AMOUNT, BatchError, Fill, Order, OrderError, Quote

F1, F2, F3 = 101, 102, 103  # funders
S1, S2, S3 = 201, 202, 203  # SMEs
CAP = 3600
IDS = range(32)  # every test keeps its order ids in here, so snapshots see them all

BookCls = Callable[..., Any]
Snapshot = tuple[Any, ...]

# Batch words: op, order_id, owner, rate, amount, min_ticket, tif, flags.
BID, ASK, CANCEL, AMEND, EXPIRE = 1, 2, 3, 4, 5
GTC, DAY, IOC, FOK = 0, 1, 2, 3


@pytest.fixture(params=["reference", "core"])
def Book(request: pytest.FixtureRequest) -> BookCls:
    """The book class under test; ``core`` must import, a missing build is a failure."""
    module = "matcher.reference" if request.param == "reference" else "matcher._core"
    cls: BookCls = importlib.import_module(module).Book
    return cls


@pytest.fixture
def book(Book: BookCls) -> Any:
    return Book()


def snapshot(book: Any) -> Snapshot:
    """Everything a caller can observe, to prove a refused command changed nothing."""
    return (
        book.depth(len(IDS) + 1),
        book.demand(),
        book.best_bid(),
        len(book),
        [book.order(i) for i in IDS],
    )


def cmd(
    op: int,
    order_id: int = 0,
    owner: int = 0,
    rate: int = 0,
    amount: int = 0,
    min_ticket: int = 0,
    tif: int = GTC,
    flags: int = 0,
) -> list[int]:
    return [op, order_id, owner, rate, amount, min_ticket, tif, flags]


def batch(*commands: list[int]) -> array[int]:
    return array("q", [word for command in commands for word in command])


def rows(index: int, fills: list[Fill]) -> list[int]:
    """Call-API fills as the 7-word rows ``apply`` returns for command ``index``."""
    return [word for fill in fills for word in (index, *fill)]


# --------------------------------------------------------------------------- priority


def test_bids_at_one_rate_fill_in_arrival_order(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 300, 100)
    book.bid(3, F3, 300, 100)
    assert book.ask(10, S1, 300, 150) == [
        Fill(bid_id=1, ask_id=10, funder=F1, sme=S1, rate_bps=300, amount=100),
        Fill(bid_id=2, ask_id=10, funder=F2, sme=S1, rate_bps=300, amount=50),
    ]
    assert book.order(2).remaining == 50
    assert book.order(3).remaining == 100


def test_lower_rate_beats_earlier_arrival(book: Any) -> None:
    book.bid(1, F1, 310, 100)
    book.bid(2, F2, 300, 100)
    assert book.ask(10, S1, 400, 50) == [Fill(2, 10, F2, S1, 300, 50)]


def test_ask_sweeps_levels_best_first_each_fill_at_its_bid_rate(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 310, 100)
    book.bid(3, F3, 320, 100)
    assert book.ask(10, S1, 315, 250) == [
        Fill(1, 10, F1, S1, 300, 100),
        Fill(2, 10, F2, S1, 310, 100),
    ]
    assert book.depth() == [(320, 100, 1)]


def test_ask_does_not_fill_bids_above_its_max_rate(book: Any) -> None:
    book.bid(1, F1, 350, 100)
    assert book.ask(10, S1, 349, 100, tif="gtc") == []
    assert len(book) == 2


def test_new_bid_fills_resting_ask_at_the_bid_rate(book: Any) -> None:
    book.ask(10, S1, 350, 100, tif="gtc")
    assert book.bid(1, F1, 320, 100) == [Fill(1, 10, F1, S1, 320, 100)]
    assert len(book) == 0


def test_resting_asks_fill_highest_max_rate_first_then_earliest(book: Any) -> None:
    book.ask(10, S1, 330, 100, tif="gtc")
    book.ask(11, S2, 350, 100, tif="gtc")
    book.ask(12, S3, 350, 100, tif="gtc")
    assert book.bid(1, F1, 300, 250) == [
        Fill(1, 11, F1, S2, 300, 100),
        Fill(1, 12, F1, S3, 300, 100),
        Fill(1, 10, F1, S1, 300, 50),
    ]
    assert book.order(10).remaining == 50


def test_bid_does_not_fill_asks_below_its_rate(book: Any) -> None:
    book.ask(10, S1, 299, 100, tif="gtc")
    assert book.bid(1, F1, 300, 100) == []
    assert book.demand() == (100, 1)
    assert book.best_bid() == (300, 100)


# --------------------------------------------------------------------------- time in force


def test_ioc_ask_remainder_is_dropped(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    assert book.ask(10, S1, 300, 250) == [Fill(1, 10, F1, S1, 300, 100)]
    assert book.order(10) is None
    assert book.demand() == (0, 0)
    assert len(book) == 0


def test_gtc_ask_remainder_rests(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    assert book.ask(10, S1, 300, 250, tif="gtc") == [Fill(1, 10, F1, S1, 300, 100)]
    assert book.order(10) == Order(10, "ask", S1, 300, 150, 0, "gtc", False)
    assert book.demand() == (150, 1)


def test_ioc_bid_remainder_is_dropped(book: Any) -> None:
    book.ask(10, S1, 350, 40, tif="gtc")
    assert book.bid(1, F1, 300, 100, tif="ioc") == [Fill(1, 10, F1, S1, 300, 40)]
    assert book.order(1) is None
    assert len(book) == 0


def test_fok_ask_that_cannot_fill_whole_is_rejected_and_changes_nothing(
    book: Any,
) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 310, 100)
    book.bid(3, F3, 400, 100)
    before = snapshot(book)
    assert book.ask(10, S1, 350, 250, tif="fok") == []
    assert snapshot(book) == before


def test_fok_ask_that_can_fill_whole_fills(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 310, 100)
    book.ask(10, S1, 350, 250, tif="fok")  # rejected first
    assert book.ask(11, S1, 350, 200, tif="fok") == [
        Fill(1, 11, F1, S1, 300, 100),
        Fill(2, 11, F2, S1, 310, 100),
    ]
    assert len(book) == 0


def test_fok_bid_is_rejected_unless_it_fills_whole(book: Any) -> None:
    book.ask(10, S1, 350, 60, tif="gtc")
    before = snapshot(book)
    assert book.bid(1, F1, 300, 100, tif="fok") == []
    assert snapshot(book) == before
    assert book.bid(2, F1, 300, 60, tif="fok") == [Fill(2, 10, F1, S1, 300, 60)]


def test_market_ask_crosses_every_rate_up_to_the_cap(book: Any) -> None:
    book.bid(1, F1, CAP, 100)
    book.bid(2, F2, 100, 100)
    assert book.ask(10, S1, None, 500) == [
        Fill(2, 10, F2, S1, 100, 100),
        Fill(1, 10, F1, S1, CAP, 100),
    ]


def test_resting_market_ask_is_stored_at_the_rate_cap(Book: BookCls) -> None:
    book = Book(rate_cap_bps=500)
    assert book.ask(10, S1, None, 100, tif="gtc") == []
    assert book.order(10) == Order(10, "ask", S1, 500, 100, 0, "gtc", False)
    assert book.bid(1, F1, 500, 30) == [Fill(1, 10, F1, S1, 500, 30)]


# --------------------------------------------------------------------------- min_ticket


def test_min_ticket_skips_a_bid_that_keeps_its_place(book: Any) -> None:
    book.bid(1, F1, 300, 1000, min_ticket=500)
    book.bid(2, F2, 300, 1000)
    assert book.ask(10, S1, 400, 200) == [Fill(2, 10, F2, S1, 300, 200)]
    assert book.order(1).remaining == 1000
    assert book.ask(11, S1, 400, 600) == [Fill(1, 11, F1, S1, 300, 600)]


def test_min_ticket_above_the_whole_bid_means_only_the_whole_bid(book: Any) -> None:
    book.bid(1, F1, 300, 300, min_ticket=500)
    assert book.ask(10, S1, 400, 299) == []
    assert book.ask(11, S1, 400, 1000) == [Fill(1, 11, F1, S1, 300, 300)]


def test_min_ticket_shrinks_to_the_bid_remaining_after_a_partial_fill(
    book: Any,
) -> None:
    book.bid(1, F1, 300, 1000, min_ticket=500)
    assert book.ask(10, S1, 400, 800) == [Fill(1, 10, F1, S1, 300, 800)]
    assert book.ask(11, S1, 400, 150) == []
    assert book.ask(12, S1, 400, 200) == [Fill(1, 12, F1, S1, 300, 200)]


# --------------------------------------------------------------------------- single funder


def test_single_funder_ask_skips_bids_too_small_and_fills_whole_from_one(
    book: Any,
) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 310, 500)
    book.bid(3, F3, 320, 1000)
    assert book.ask(10, S1, 400, 400, single_funder=True) == [Fill(2, 10, F2, S1, 310, 400)]
    assert book.order(1).remaining == 100
    assert book.order(2).remaining == 100


def test_single_funder_ask_gets_nothing_when_no_bid_can_take_it_whole(
    book: Any,
) -> None:
    book.bid(1, F1, 300, 300)
    book.bid(2, F2, 310, 300)
    before = snapshot(book)
    assert book.ask(10, S1, 400, 400, single_funder=True) == []
    assert snapshot(book) == before


def test_single_funder_ask_respects_min_ticket(book: Any) -> None:
    book.bid(1, F1, 300, 1000, min_ticket=500)
    assert book.ask(10, S1, 400, 400, single_funder=True) == []
    assert book.ask(11, S1, 400, 500, single_funder=True) == [Fill(1, 11, F1, S1, 300, 500)]


def test_resting_single_funder_ask_fills_only_from_a_bid_that_takes_it_whole(
    book: Any,
) -> None:
    assert book.ask(10, S1, 350, 400, tif="gtc", single_funder=True) == []
    assert book.order(10) == Order(10, "ask", S1, 350, 400, 0, "gtc", True)
    assert book.bid(1, F1, 300, 300) == []
    assert book.bid(2, F2, 320, 400) == [Fill(2, 10, F2, S1, 320, 400)]
    assert book.order(1).remaining == 300
    assert book.demand() == (0, 0)


# --------------------------------------------------------------------------- re-match


def test_partially_filled_bid_is_rematched_against_an_ask_it_skipped(
    book: Any,
) -> None:
    book.bid(1, F1, 300, 100, min_ticket=80)
    assert book.ask(10, S1, 350, 50, tif="gtc") == []  # 50 < min(80, 100): skipped
    # The 90 fill leaves r = 10, so min(m, r) = 10 and ask 10 becomes fillable.
    assert book.ask(11, S2, 300, 90) == [
        Fill(1, 11, F1, S2, 300, 90),
        Fill(1, 10, F1, S1, 300, 10),
    ]
    assert book.order(1) is None
    assert book.order(10).remaining == 40


def test_bid_aggressor_rescans_from_the_best_ask_after_a_fill_that_followed_a_skip(
    book: Any,
) -> None:
    book.ask(10, S1, 400, 50, tif="gtc")
    book.ask(11, S2, 350, 90, tif="gtc")
    # IOC, so nothing rests and no re-match step can hide a missing rescan.
    assert book.bid(1, F1, 300, 100, min_ticket=80, tif="ioc") == [
        Fill(1, 11, F1, S2, 300, 90),
        Fill(1, 10, F1, S1, 300, 10),
    ]
    assert book.order(10).remaining == 40
    assert len(book) == 1


# --------------------------------------------------------------------------- cancel


def test_cancel_after_a_partial_fill_returns_the_remaining(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.ask(10, S1, 300, 30)
    assert book.cancel(1) == 70
    assert book.order(1) is None
    assert book.best_bid() is None
    assert len(book) == 0


def test_cancel_removes_a_resting_ask(book: Any) -> None:
    book.ask(10, S1, 300, 30, tif="day")
    assert book.cancel(10) == 30
    assert book.demand() == (0, 0)


def test_cancel_of_an_unknown_id_raises_key_error_and_changes_nothing(
    book: Any,
) -> None:
    book.bid(1, F1, 300, 100)
    before = snapshot(book)
    with pytest.raises(KeyError):
        book.cancel(2)
    assert snapshot(book) == before
    assert book.cancel(1) == 100
    with pytest.raises(KeyError):
        book.cancel(1)


def test_an_id_that_no_longer_rests_can_be_used_again(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.cancel(1)
    book.ask(2, S1, 300, 50, tif="gtc")
    book.bid(3, F1, 300, 50)  # fills ask 2 whole
    assert book.bid(1, F2, 310, 10) == []
    assert book.ask(2, S1, 400, 10) == [Fill(1, 2, F2, S1, 310, 10)]


# --------------------------------------------------------------------------- amend


def test_amend_reducing_the_amount_keeps_priority(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 300, 100)
    assert book.amend(1, amount=50) == []
    assert book.order(1).remaining == 50
    assert book.ask(10, S1, 300, 60) == [
        Fill(1, 10, F1, S1, 300, 50),
        Fill(2, 10, F2, S1, 300, 10),
    ]


def test_amend_to_the_same_rate_and_amount_keeps_priority(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 300, 100)
    assert book.amend(1, rate_bps=300, amount=100) == []
    assert book.ask(10, S1, 300, 60) == [Fill(1, 10, F1, S1, 300, 60)]


def test_amend_increasing_the_amount_loses_priority(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 300, 100)
    assert book.amend(1, amount=150) == []
    assert book.order(1).remaining == 150
    assert book.ask(10, S1, 300, 60) == [Fill(2, 10, F2, S1, 300, 60)]


def test_amend_changing_the_rate_loses_priority(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 310, 100)
    assert book.amend(1, rate_bps=310) == []
    assert book.order(1).rate_bps == 310
    assert book.ask(10, S1, 400, 60) == [Fill(2, 10, F2, S1, 310, 60)]


def test_amend_away_and_back_to_the_same_rate_queues_at_the_back(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 300, 100)
    book.amend(1, rate_bps=310)
    book.amend(1, rate_bps=300)
    assert book.ask(10, S1, 400, 60) == [Fill(2, 10, F2, S1, 300, 60)]


def test_amend_that_crosses_fills_at_the_bid_rate(book: Any) -> None:
    book.ask(10, S1, 330, 100, tif="gtc")
    assert book.bid(1, F1, 350, 100) == []
    assert book.amend(1, rate_bps=320) == [Fill(1, 10, F1, S1, 320, 100)]
    assert len(book) == 0


def test_amending_an_ask_up_to_a_bid_fills_at_the_bid_rate(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.ask(10, S1, 280, 60, tif="gtc")
    assert book.amend(10, rate_bps=320) == [Fill(1, 10, F1, S1, 300, 60)]
    assert book.order(10) is None
    assert book.order(1).remaining == 40


def test_amend_reduction_can_unlock_a_min_ticket_skip(book: Any) -> None:
    book.bid(1, F1, 300, 100, min_ticket=80)
    book.ask(10, S1, 350, 50, tif="gtc")
    assert book.amend(1, amount=60) == []  # 50 < min(80, 60)
    assert book.amend(1, amount=50) == [Fill(1, 10, F1, S1, 300, 50)]


def test_amend_reduction_can_unlock_a_single_funder_ask(book: Any) -> None:
    book.bid(1, F1, 300, 300)
    book.ask(10, S1, 350, 400, tif="gtc", single_funder=True)
    assert book.amend(10, amount=300) == [Fill(1, 10, F1, S1, 300, 300)]


def test_amend_of_an_unknown_id_raises_key_error_before_checking_fields(
    book: Any,
) -> None:
    book.bid(1, F1, 300, 100)
    before = snapshot(book)
    with pytest.raises(KeyError):
        book.amend(2, amount=50)
    with pytest.raises(KeyError):
        book.amend(2, rate_bps=-1)
    with pytest.raises(KeyError):
        book.amend(2)
    assert snapshot(book) == before


# --------------------------------------------------------------------------- expire_day


def test_expire_day_removes_only_day_orders_and_returns_sorted_ids(book: Any) -> None:
    book.bid(5, F1, 300, 100, tif="day")
    book.bid(3, F2, 300, 100)
    book.bid(2, F3, 310, 100, tif="day")
    book.ask(9, S1, 200, 100, tif="day")
    book.ask(7, S2, 200, 100, tif="gtc")
    assert book.expire_day() == [2, 5, 9]
    assert [i for i in IDS if book.order(i) is not None] == [3, 7]
    assert book.expire_day() == []


# --------------------------------------------------------------------------- reads


def test_an_empty_book_reads_as_empty(book: Any) -> None:
    assert book.best_bid() is None
    assert book.depth() == []
    assert book.demand() == (0, 0)
    assert book.quote(100) is None
    assert book.order(1) is None
    assert len(book) == 0


def test_depth_shows_only_what_funders_can_lend_now(Book: BookCls) -> None:
    """docs/book.md, Reads: depth is the plan of an unlimited market ask, by level."""
    lines = importlib.import_module(Book.__module__).CreditLines()
    book = Book(rate_cap_bps=CAP, credit=lines)
    lines.set(F1, 150)
    lines.set(F2, 1_000)
    lines.set(F3, 40)
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 300, 50)
    book.bid(3, F1, 310, 100)              # F1 has 50 of its line left for this one
    book.bid(4, F3, 320, 100, min_ticket=60)   # 40 of line < min_ticket: lends nothing
    book.bid(5, F2, 330, 30)
    assert book.depth() == [(300, 150, 2), (310, 50, 1), (330, 30, 1)]
    assert book.depth(2) == [(300, 150, 2), (310, 50, 1)]
    assert book.best_bid() == (300, 150)
    lines.set(F1, 0)                       # F1 lends nothing: its bids rest, unseen
    assert book.depth() == [(300, 50, 1), (330, 30, 1)]
    assert book.best_bid() == (300, 50)
    assert len(book) == 5
    lines.set(F2, 0)
    assert book.depth() == [] and book.best_bid() is None
    lines.set(F1, 150)                     # and nothing was spent by reading
    assert book.depth() == [(300, 100, 1), (310, 50, 1)]


@pytest.mark.parametrize(("funder", "amount", "field", "reason"), [
    (F1, 61, "amount", "out_of_range"),          # more than is lent
    (F2, 1, "amount", "out_of_range"),           # lent nothing
    (F1, -1, "amount", "out_of_range"),
    (F1, True, "amount", "not_int"),
    (F1, 1.0, "amount", "not_int"),
    (F1, 2**63, "amount", "out_of_range"),
    (-1, 1, "funder", "out_of_range"),
    (2**63, 1, "funder", "out_of_range"),
    (False, 1, "funder", "not_int"),
])
def test_a_repayment_takes_off_what_is_lent_and_refuses_more(
        Book: BookCls, funder: Any, amount: Any, field: str, reason: str) -> None:
    """`CreditLines.repay` (ADR 24): both books check alike and change nothing when
    refused; what it takes off lends again."""
    lines = importlib.import_module(Book.__module__).CreditLines()
    book = Book(rate_cap_bps=CAP, credit=lines)
    lines.set(F1, 100)
    book.bid(1, F1, 300, 1_000)
    book.ask(10, S1, None, 60)
    before = (lines.items(), book.depth())
    with pytest.raises(OrderError) as caught:
        lines.repay(funder, amount)
    assert (caught.value.field, caught.value.reason) == (field, reason)
    assert (lines.items(), book.depth()) == before == ([(F1, 100, 60)], [(300, 40, 1)])
    lines.repay(F1, 0)                           # nothing: allowed, nothing changes
    lines.repay(F1, 60)
    assert lines.get(F1) == (100, 0) and book.depth() == [(300, 100, 1)]


def test_reads_summarise_the_resting_orders(book: Any) -> None:
    book.bid(1, F1, 300, 100, min_ticket=20)
    book.bid(2, F2, 300, 50, tif="day")
    book.bid(3, F1, 310, 70)
    book.bid(4, F3, 320, 10)
    book.ask(10, S1, 250, 40, tif="gtc")
    book.ask(11, S2, 200, 60, tif="day", single_funder=True)
    assert book.best_bid() == (300, 150)
    assert book.depth() == [(300, 150, 2), (310, 70, 1), (320, 10, 1)]
    assert book.depth(2) == [(300, 150, 2), (310, 70, 1)]
    assert book.demand() == (100, 2)
    assert len(book) == 6
    assert book.order(1) == Order(1, "bid", F1, 300, 100, 20, "gtc", False)
    assert book.order(2) == Order(2, "bid", F2, 300, 50, 0, "day", False)
    assert book.order(11) == Order(11, "ask", S2, 200, 60, 0, "day", True)
    assert book.order(12) is None


def test_quote_is_amount_weighted_and_counts_distinct_funders(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 310, 100)
    book.bid(3, F1, 320, 100)
    before = snapshot(book)
    # (300*100 + 310*100 + 320*50) / 250 = 308
    assert book.quote(250) == Quote(fillable=250, avg_rate_bps=308.0, worst_rate_bps=320, funders=2)
    assert book.quote(1000) == Quote(300, 310.0, 320, 2)
    assert book.quote(50) == Quote(50, 300.0, 300, 1)
    assert snapshot(book) == before


def test_quote_honours_min_ticket(book: Any) -> None:
    book.bid(1, F1, 300, 1000, min_ticket=500)
    assert book.quote(499) is None
    assert book.quote(500) == Quote(500, 300.0, 300, 1)


def test_single_funder_quote_needs_one_bid_that_takes_it_whole(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    book.bid(2, F2, 310, 500)
    assert book.quote(400, single_funder=True) == Quote(400, 310.0, 310, 1)
    assert book.quote(600, single_funder=True) is None
    assert book.quote(600) == Quote(600, (100 * 300 + 500 * 310) / 600, 310, 2)


# --------------------------------------------------------------------------- validation


def _bad(
    call: Callable[[Any], object], field: str, reason: str, name: str
) -> Any:  # pytest.param's type is private
    return pytest.param(call, field, reason, id=name)


BAD_COMMANDS = [
    # bid fields, each wrong on its own
    _bad(lambda b: b.bid(-1, F1, 300, 10), "order_id", "out_of_range", "bid-id-neg"),
    _bad(lambda b: b.bid(2**63, F1, 300, 10), "order_id", "out_of_range", "bid-id-2**63"),
    _bad(lambda b: b.bid(True, F1, 300, 10), "order_id", "not_int", "bid-id-bool"),
    _bad(lambda b: b.bid(5.0, F1, 300, 10), "order_id", "not_int", "bid-id-float"),
    _bad(lambda b: b.bid("5", F1, 300, 10), "order_id", "not_int", "bid-id-str"),
    _bad(lambda b: b.bid(5, -1, 300, 10), "funder", "out_of_range", "funder-neg"),
    _bad(lambda b: b.bid(5, 2**63, 300, 10), "funder", "out_of_range", "funder-2**63"),
    _bad(lambda b: b.bid(5, False, 300, 10), "funder", "not_int", "funder-bool"),
    _bad(lambda b: b.bid(5, 1.5, 300, 10), "funder", "not_int", "funder-float"),
    _bad(lambda b: b.bid(5, F1, -1, 10), "rate_bps", "out_of_range", "rate-neg"),
    _bad(lambda b: b.bid(5, F1, CAP + 1, 10), "rate_bps", "out_of_range", "rate-cap+1"),
    _bad(lambda b: b.bid(5, F1, 2**63, 10), "rate_bps", "out_of_range", "rate-2**63"),
    _bad(lambda b: b.bid(5, F1, True, 10), "rate_bps", "not_int", "rate-bool"),
    _bad(lambda b: b.bid(5, F1, 300.0, 10), "rate_bps", "not_int", "rate-float"),
    _bad(lambda b: b.bid(5, F1, None, 10), "rate_bps", "not_int", "rate-none"),
    _bad(lambda b: b.bid(5, F1, 300, 0), "amount", "out_of_range", "bid-amount-zero"),
    _bad(lambda b: b.bid(5, F1, 300, -10), "amount", "out_of_range", "bid-amount-neg"),
    _bad(
        lambda b: b.bid(5, F1, 300, MAX_AMOUNT + 1),
        "amount",
        "out_of_range",
        "bid-amount-max+1",
    ),
    _bad(lambda b: b.bid(5, F1, 300, 2**63), "amount", "out_of_range", "bid-amount-2**63"),
    _bad(lambda b: b.bid(5, F1, 300, True), "amount", "not_int", "bid-amount-bool"),
    _bad(lambda b: b.bid(5, F1, 300, 10.0), "amount", "not_int", "bid-amount-float"),
    _bad(
        lambda b: b.bid(5, F1, 300, 10, min_ticket=-1),
        "min_ticket",
        "out_of_range",
        "min_ticket-neg",
    ),
    _bad(
        lambda b: b.bid(5, F1, 300, 10, min_ticket=MAX_AMOUNT + 1),
        "min_ticket",
        "out_of_range",
        "min_ticket-max+1",
    ),
    _bad(
        lambda b: b.bid(5, F1, 300, 10, min_ticket=True),
        "min_ticket",
        "not_int",
        "min_ticket-bool",
    ),
    _bad(
        lambda b: b.bid(5, F1, 300, 10, min_ticket=1.0),
        "min_ticket",
        "not_int",
        "min_ticket-float",
    ),
    _bad(lambda b: b.bid(5, F1, 300, 10, tif="GTC"), "tif", "bad_tif", "bid-tif-upper"),
    _bad(lambda b: b.bid(5, F1, 300, 10, tif="gtd"), "tif", "bad_tif", "bid-tif-unknown"),
    _bad(lambda b: b.bid(5, F1, 300, 10, tif=None), "tif", "bad_tif", "bid-tif-none"),
    _bad(lambda b: b.bid(1, F1, 300, 10), "order_id", "duplicate", "bid-dup-of-bid"),
    _bad(lambda b: b.bid(2, F1, 300, 10), "order_id", "duplicate", "bid-dup-of-ask"),
    _bad(
        lambda b: b.bid(1, F1, 300, 10, tif="ioc"),
        "order_id",
        "duplicate",
        "bid-dup-ioc",
    ),
    # bid: only the first failing check, in the documented order
    _bad(
        lambda b: b.bid(-1, -1, -1, 0, min_ticket=-1, tif="x"),
        "order_id",
        "out_of_range",
        "bid-order-id-first",
    ),
    _bad(
        lambda b: b.bid(1, -1, -1, 0, min_ticket=-1, tif="x"),
        "funder",
        "out_of_range",
        "bid-order-funder-before-dup",
    ),
    _bad(
        lambda b: b.bid(5, F1, -1, 0, min_ticket=-1, tif="x"),
        "rate_bps",
        "out_of_range",
        "bid-order-rate",
    ),
    _bad(
        lambda b: b.bid(5, F1, 300, 0, min_ticket=-1, tif="x"),
        "amount",
        "out_of_range",
        "bid-order-amount",
    ),
    _bad(
        lambda b: b.bid(5, F1, 300, 10, min_ticket=-1, tif="x"),
        "min_ticket",
        "out_of_range",
        "bid-order-min_ticket",
    ),
    _bad(
        lambda b: b.bid(1, F1, 300, 10, tif="x"),
        "tif",
        "bad_tif",
        "bid-order-tif-before-dup",
    ),
    # ask fields
    _bad(lambda b: b.ask(-1, S1, 300, 10), "order_id", "out_of_range", "ask-id-neg"),
    _bad(lambda b: b.ask(True, S1, 300, 10), "order_id", "not_int", "ask-id-bool"),
    _bad(lambda b: b.ask(5, -1, 300, 10), "sme", "out_of_range", "sme-neg"),
    _bad(lambda b: b.ask(5, 2**63, 300, 10), "sme", "out_of_range", "sme-2**63"),
    _bad(lambda b: b.ask(5, True, 300, 10), "sme", "not_int", "sme-bool"),
    _bad(lambda b: b.ask(5, S1, -1, 10), "max_rate_bps", "out_of_range", "max-rate-neg"),
    _bad(
        lambda b: b.ask(5, S1, CAP + 1, 10),
        "max_rate_bps",
        "out_of_range",
        "max-rate-cap+1",
    ),
    _bad(
        lambda b: b.ask(5, S1, 2**63, 10),
        "max_rate_bps",
        "out_of_range",
        "max-rate-2**63",
    ),
    _bad(lambda b: b.ask(5, S1, True, 10), "max_rate_bps", "not_int", "max-rate-bool"),
    _bad(lambda b: b.ask(5, S1, 300.5, 10), "max_rate_bps", "not_int", "max-rate-float"),
    _bad(lambda b: b.ask(5, S1, 300, 0), "amount", "out_of_range", "ask-amount-zero"),
    _bad(lambda b: b.ask(5, S1, 300, -1), "amount", "out_of_range", "ask-amount-neg"),
    _bad(lambda b: b.ask(5, S1, 300, 2**63), "amount", "out_of_range", "ask-amount-2**63"),
    _bad(lambda b: b.ask(5, S1, 300, True), "amount", "not_int", "ask-amount-bool"),
    _bad(lambda b: b.ask(5, S1, 300, 1.0), "amount", "not_int", "ask-amount-float"),
    _bad(lambda b: b.ask(5, S1, 300, 10, tif="day "), "tif", "bad_tif", "ask-tif-unknown"),
    _bad(lambda b: b.ask(5, S1, 300, 10, tif=2), "tif", "bad_tif", "ask-tif-int"),
    _bad(lambda b: b.ask(1, S1, 300, 10), "order_id", "duplicate", "ask-dup-of-bid"),
    _bad(lambda b: b.ask(2, S1, None, 10), "order_id", "duplicate", "ask-dup-of-ask"),
    _bad(
        lambda b: b.ask(1, -1, -1, 0, tif="x"),
        "sme",
        "out_of_range",
        "ask-order-sme-before-dup",
    ),
    _bad(
        lambda b: b.ask(5, S1, -1, 0, tif="x"),
        "max_rate_bps",
        "out_of_range",
        "ask-order-rate",
    ),
    _bad(
        lambda b: b.ask(5, S1, None, 0, tif="x"),
        "amount",
        "out_of_range",
        "ask-order-amount",
    ),
    _bad(
        lambda b: b.ask(2, S1, 300, 10, tif="x"),
        "tif",
        "bad_tif",
        "ask-order-tif-before-dup",
    ),
    # cancel
    _bad(lambda b: b.cancel(-1), "order_id", "out_of_range", "cancel-id-neg"),
    _bad(lambda b: b.cancel(2**63), "order_id", "out_of_range", "cancel-id-2**63"),
    _bad(lambda b: b.cancel(True), "order_id", "not_int", "cancel-id-bool"),
    _bad(lambda b: b.cancel(1.0), "order_id", "not_int", "cancel-id-float"),
    # amend
    _bad(lambda b: b.amend(1), "amount", "missing", "amend-nothing"),
    _bad(lambda b: b.amend(-1), "order_id", "out_of_range", "amend-id-before-missing"),
    _bad(lambda b: b.amend(True, amount=5), "order_id", "not_int", "amend-id-bool"),
    _bad(lambda b: b.amend(1, rate_bps=-1), "rate_bps", "out_of_range", "amend-rate-neg"),
    _bad(
        lambda b: b.amend(2, rate_bps=CAP + 1),
        "rate_bps",
        "out_of_range",
        "amend-rate-cap+1",
    ),
    _bad(lambda b: b.amend(1, rate_bps=True), "rate_bps", "not_int", "amend-rate-bool"),
    _bad(lambda b: b.amend(1, amount=0), "amount", "out_of_range", "amend-amount-zero"),
    _bad(
        lambda b: b.amend(1, amount=MAX_AMOUNT + 1),
        "amount",
        "out_of_range",
        "amend-amount-max+1",
    ),
    _bad(lambda b: b.amend(1, amount=2**63), "amount", "out_of_range", "amend-amt-2**63"),
    _bad(lambda b: b.amend(1, amount=50.0), "amount", "not_int", "amend-amount-float"),
    _bad(
        lambda b: b.amend(1, rate_bps=-1, amount=0),
        "rate_bps",
        "out_of_range",
        "amend-rate-before-amount",
    ),
    # quote
    _bad(lambda b: b.quote(0), "amount", "out_of_range", "quote-zero"),
    _bad(lambda b: b.quote(MAX_AMOUNT + 1), "amount", "out_of_range", "quote-max+1"),
    _bad(lambda b: b.quote(True), "amount", "not_int", "quote-bool"),
    _bad(lambda b: b.quote(1.5), "amount", "not_int", "quote-float"),
]


@pytest.mark.parametrize(("call", "field", "reason"), BAD_COMMANDS)
def test_bad_input_raises_order_error_naming_the_field_and_changes_nothing(
    book: Any, call: Callable[[Any], object], field: str, reason: str
) -> None:
    book.bid(1, F1, 300, 100, min_ticket=10)
    book.ask(2, S1, 250, 100, tif="gtc")
    before = snapshot(book)
    with pytest.raises(OrderError) as caught:
        call(book)
    assert (caught.value.field, caught.value.reason) == (field, reason)
    assert str(caught.value).startswith(field)
    assert snapshot(book) == before


def test_rate_cap_bounds_every_rate(Book: BookCls) -> None:
    book = Book(rate_cap_bps=500)
    assert book.bid(1, F1, 500, 100) == []
    with pytest.raises(OrderError) as caught:
        book.bid(2, F1, 501, 100)
    assert (caught.value.field, caught.value.reason) == ("rate_bps", "out_of_range")
    with pytest.raises(OrderError) as caught:
        book.amend(1, rate_bps=501)
    assert (caught.value.field, caught.value.reason) == ("rate_bps", "out_of_range")
    assert book.order(1).rate_bps == 500


# --------------------------------------------------------------------------- batch


SCRIPT = [
    cmd(BID, 1, F1, 300, 100, min_ticket=80),
    cmd(ASK, 10, S1, 350, 50, tif=DAY),  # skipped by bid 1's min_ticket, rests
    cmd(ASK, 11, S2, 300, 90, tif=IOC),  # partial fill of bid 1, then re-match
    cmd(BID, 2, F2, 360, 200, tif=DAY),  # above ask 10's max rate, rests
    cmd(ASK, 12, S3, -1, 150, tif=IOC, flags=1),  # market, single funder
    cmd(BID, 3, F3, 320, 500, tif=FOK),  # rejected: only 40 on offer
    cmd(AMEND, 2, 0, -1, 10),  # amount only: keeps place
    cmd(AMEND, 2, 0, 290, -1),  # rate only: now crosses ask 10
    cmd(ASK, 13, S1, 400, 1000, tif=FOK),  # rejected: no bids
    cmd(BID, 4, F1, 305, 20, tif=GTC),
    cmd(BID, 6, F2, 400, 50, tif=GTC),
    cmd(CANCEL, 6),
    cmd(EXPIRE),  # ask 10 lapses
    cmd(BID, 5, F2, 300, 20, tif=IOC),
    cmd(BID, 8, F1, 300, 10, tif=GTC),
]


def run_call_api(book: Any) -> list[int]:
    """SCRIPT through the call API, as the rows ``apply`` should return."""
    tifs = ["gtc", "day", "ioc", "fok"]
    out: list[int] = []
    for index, (op, oid, owner, rate, amount, ticket, tif, flags) in enumerate(SCRIPT):
        fills: list[Fill] = []
        if op == BID:
            fills = book.bid(oid, owner, rate, amount, min_ticket=ticket, tif=tifs[tif])
        elif op == ASK:
            max_rate = None if rate == -1 else rate
            fills = book.ask(oid, owner, max_rate, amount, tif=tifs[tif], single_funder=bool(flags))
        elif op == CANCEL:
            book.cancel(oid)
        elif op == AMEND:
            fills = book.amend(
                oid,
                rate_bps=None if rate == -1 else rate,
                amount=None if amount == -1 else amount,
            )
        else:
            book.expire_day()
        out += rows(index, fills)
    return out


def test_batch_apply_produces_the_same_fills_and_state_as_the_call_api(
    Book: BookCls,
) -> None:
    by_call, by_batch = Book(), Book()
    expected = run_call_api(by_call)
    assert expected == [
        *rows(2, [Fill(1, 11, F1, S2, 300, 90), Fill(1, 10, F1, S1, 300, 10)]),
        *rows(4, [Fill(2, 12, F2, S3, 360, 150)]),
        *rows(7, [Fill(2, 10, F2, S1, 290, 10)]),
        *rows(9, [Fill(4, 10, F1, S1, 305, 20)]),
    ]
    assert [i for i in IDS if by_call.order(i) is not None] == [8]
    got = by_batch.apply(batch(*SCRIPT))
    assert isinstance(got, array)
    assert got.typecode == "q"
    assert got.tolist() == expected
    assert snapshot(by_batch) == snapshot(by_call)


def test_batch_apply_accepts_any_int64_buffer(Book: BookCls) -> None:
    np = pytest.importorskip("numpy")
    commands = [cmd(BID, 1, F1, 300, 100), cmd(ASK, 10, S1, 300, 40, tif=IOC)]
    expected = [1, 1, 10, F1, S1, 300, 40]
    assert Book().apply(batch(*commands)).tolist() == expected
    assert Book().apply(batch(*commands).tobytes()).tolist() == expected
    assert Book().apply(np.array(commands, dtype=np.int64)).tolist() == expected


def test_batch_of_nothing_returns_no_fills(book: Any) -> None:
    assert book.apply(array("q")).tolist() == []


def test_batch_tif_day_and_expire_op(book: Any) -> None:
    book.apply(batch(cmd(BID, 1, F1, 300, 100, tif=DAY), cmd(BID, 2, F1, 300, 5)))
    assert book.order(1).tif == "day"
    book.apply(batch(cmd(EXPIRE)))
    assert [i for i in IDS if book.order(i) is not None] == [2]


def test_batch_error_names_the_index_keeps_the_prefix_and_stops(book: Any) -> None:
    commands = batch(
        cmd(BID, 1, F1, 300, 100),
        cmd(ASK, 10, S1, 300, 30, tif=IOC),
        cmd(BID, 2, F2, 300, 0),  # amount 0
        cmd(BID, 3, F3, 300, 100),
    )
    with pytest.raises(BatchError) as caught:
        book.apply(commands)
    assert caught.value.index == 2
    assert isinstance(caught.value.cause, OrderError)
    assert (caught.value.cause.field, caught.value.cause.reason) == ("amount", "out_of_range")
    assert caught.value.fills.tolist() == [1, 1, 10, F1, S1, 300, 30]  # the prefix's fills
    assert book.order(1).remaining == 70
    assert book.order(2) is None
    assert book.order(3) is None


def test_batch_error_carries_the_key_error_of_an_unknown_cancel(book: Any) -> None:
    book.bid(1, F1, 300, 100)
    before = snapshot(book)
    with pytest.raises(BatchError) as caught:
        book.apply(batch(cmd(CANCEL, 7)))
    assert caught.value.index == 0
    assert isinstance(caught.value.cause, KeyError)
    assert snapshot(book) == before


@pytest.mark.parametrize(
    ("command", "field", "reason"),
    [
        pytest.param(cmd(AMEND, 1, 0, -1, -1), "amount", "missing", id="amend-nothing"),
        pytest.param(cmd(BID, 5, F1, -1, 10), "rate_bps", "out_of_range", id="bid-rate-1"),
        pytest.param(cmd(ASK, 5, S1, -2, 10), "max_rate_bps", "out_of_range", id="ask-rate"),
        pytest.param(cmd(BID, 5, F1, 300, 10, tif=4), "tif", "bad_tif", id="tif-code"),
        pytest.param(cmd(BID, 1, F1, 300, 10), "order_id", "duplicate", id="duplicate"),
        pytest.param(cmd(BID, -1, F1, 300, 10), "order_id", "out_of_range", id="id-neg"),
    ],
)
def test_batch_error_carries_the_order_error_the_call_api_would_raise(
    book: Any, command: list[int], field: str, reason: str
) -> None:
    book.bid(1, F1, 300, 100)
    before = snapshot(book)
    with pytest.raises(BatchError) as caught:
        book.apply(batch(cmd(BID, 2, F2, 310, 10), command))
    assert caught.value.index == 1
    assert isinstance(caught.value.cause, OrderError)
    assert (caught.value.cause.field, caught.value.cause.reason) == (field, reason)
    assert book.order(2) is not None
    book.cancel(2)
    assert snapshot(book) == before


def test_the_compiled_books_count_the_orders_they_visit() -> None:
    """`walked()` counts the resting orders matching visits, all books together: the
    gateway charges a command for it. A bid whose line cannot lend its floor visits no
    ask at all (a funder's 1,000 such bids walked 1,000 asks each, and again on every
    line it set; found in an audit), with the same outcome as walking them."""
    from matcher._core import Book, CreditLines, walked

    lines = CreditLines()
    book = Book(rate_cap_bps=CAP, credit=lines)
    for i in range(1_000):                                # asks of 1 fen, resting
        book.ask(10_000 + i, 7, 400, 1, tif="gtc")
    lines.set(F1, 1)                                      # less than any bid's floor
    before = walked()
    for i in range(1_000):
        assert book.bid(1 + i, F1, 300, 100, min_ticket=2) == []
    assert walked() - before == 0
    before = walked()
    assert book.rematch(F1) == []
    assert walked() - before == 1_000                      # its bids, not the asks
    lines.set(F2, 10**9)                                  # a line that lends: it walks
    before = walked()
    assert len(book.bid(5_000, F2, 300, 10)) == 10
    assert walked() - before == 10
    # An ask visits every bid that cannot lend, for nothing.
    before = walked()
    assert book.ask(20_000, 8, 400, 5) == []
    assert walked() - before == 1_000


def test_a_bid_with_a_min_ticket_walks_the_asks_it_skips_once_not_once_per_fill() -> None:
    """Only a fill that leaves a bid below its min_ticket can make an ask it skipped
    fillable, so only then does it look at them again (once: from there a fill takes all
    it has left). It walked them again after every fill: 1,000 skipped asks and 10 fills
    visited 10,000 asks. The fills are the reference's, the rescan included."""
    from matcher import reference
    from matcher._core import Book, walked

    def market(book: Any) -> None:
        for i in range(1_000):                            # too small for its min_ticket
            book.ask(10_000 + i, S1, 400, 1, tif="gtc")
        book.ask(11_000, S2, 400, 600, tif="gtc")          # fillable once it is below
        for i in range(10):
            book.ask(12_000 + i, S3, 350, 1_000, tif="gtc")

    core, ref = Book(rate_cap_bps=CAP), reference.Book(rate_cap_bps=CAP)
    market(core)
    market(ref)
    before = walked()
    fills = core.bid(1, F1, 300, 10_000, min_ticket=1_000)
    assert walked() - before == 1_000 + 1 + 10             # each ask once
    assert fills == ref.bid(1, F1, 300, 10_000, min_ticket=1_000)
    assert [f.ask_id for f in fills] == [12_000 + i for i in range(10)]
    # Nothing of 1,000 left: a pass with no fill, and no rescan.
    before = walked()
    fills = core.bid(2, F1, 300, 10_500, min_ticket=1_000, tif="ioc")
    assert walked() - before == 1_001
    assert fills == ref.bid(2, F1, 300, 10_500, min_ticket=1_000, tif="ioc")
    assert fills == []
    # 500 left after the 10,000, below its min_ticket of 1,000: one rescan, and the 600
    # takes it all.
    core.ask(13_000, S3, 350, 10_000, tif="gtc")
    ref.ask(13_000, S3, 350, 10_000, tif="gtc")
    before = walked()
    fills = core.bid(3, F1, 300, 10_500, min_ticket=1_000, tif="ioc")
    assert walked() - before == 1_001 + 1_000 + 2          # skips, fill, rescan to the 600
    assert fills == ref.bid(3, F1, 300, 10_500, min_ticket=1_000, tif="ioc")
    assert [(f.ask_id, f.amount) for f in fills] == [(13_000, 10_000), (11_000, 500)]
