"""The engine as a pure state machine: no Redis, no event loop, just commands in and
events out. Roles, names, credit lines, retries, end of day, determinism."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matcher import protocol as wire
from matcher.engine import RETRY_WINDOW_NS, Engine, Outcome, Segment
from matcher.snapshot import capture, decode, dump, encode, load, restore, state_hash

SEGMENTS = [Segment(id="DFM-30D", core="DFM", tenor_days=30),
            Segment(id="DFM-90D", core="DFM", tenor_days=90),
            Segment(id="SGCC-90D", core="SGCC", tenor_days=90, rate_cap_bps=500)]
F1, F2, S1, S2, ADMIN, PLATFORM = 11, 12, 21, 22, 1, 2
ROLE = {F1: "funder", F2: "funder", S1: "sme", S2: "sme", ADMIN: "admin",
        PLATFORM: "platform"}


class Market:
    """An engine plus a clock and a journal kept in a list, for the tests."""

    def __init__(self) -> None:
        self.engine = Engine(SEGMENTS, names=lambda p: f"P{p}")
        self.journal: list[wire.JournalEntry] = []
        self.ts = 0

    def send(self, who: int, cmd: Any) -> Outcome:
        self.ts += 1
        out = self.engine.submit(who, ROLE[who], cmd, self.ts)  # type: ignore[arg-type]
        if out.entry is not None:
            self.journal.append(out.entry)
        return out

    def line(self, funder: int, core: str, amount: int) -> Outcome:
        return self.send(funder, wire.SetCreditLine(core=core, amount=amount))

    def repay(self, funder: int, core: str, total: int) -> Outcome:
        return self.send(PLATFORM, wire.Repay(funder=funder, core=core, repaid_total=total))

    def bid(self, funder: int, cid: str, rate: int, amount: int, seg: str = "DFM-90D",
            **kw: Any) -> Outcome:
        return self.send(funder, wire.Bid(client_id=cid, segment=seg, rate_bps=rate,
                                          amount=amount, **kw))

    def ask(self, sme: int, cid: str, amount: int, seg: str = "DFM-90D", **kw: Any) -> Outcome:
        return self.send(sme, wire.Ask(client_id=cid, segment=seg, amount=amount, **kw))


def events(out: Outcome, who: int, kind: type) -> list[Any]:
    return [e for p, e in out.replies if p == who and isinstance(e, kind)]


def rejected(out: Outcome) -> wire.Rejected:
    assert out.entry is None
    [(_, event)] = out.replies
    assert isinstance(event, wire.Rejected)
    return event


# --- roles and names -----------------------------------------------------------------

def test_each_role_may_send_only_its_own_commands() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    assert rejected(m.send(S1, wire.Bid(client_id="b", segment="DFM-90D", rate_bps=250,
                                        amount=1))).code == "forbidden"
    assert rejected(m.send(F1, wire.Ask(client_id="a", segment="DFM-90D",
                                        amount=1))).code == "forbidden"
    assert rejected(m.send(S1, wire.Amend(client_id="a", amount=1))).code == "forbidden"
    assert rejected(m.send(S1, wire.SetCreditLine(core="DFM", amount=1))).code == "forbidden"
    assert rejected(m.send(F1, wire.EndOfDay())).code == "forbidden"
    assert rejected(m.send(F1, wire.AddSegment(segment="X", core="X",
                                               tenor_days=1))).code == "forbidden"
    assert m.send(ADMIN, wire.EndOfDay()).accepted
    assert m.engine.seq == 2


def test_cancel_all_ends_every_own_resting_order_and_nothing_else() -> None:
    m = Market()
    m.line(F1, "DFM", 10**6)
    m.line(F2, "DFM", 10**6)
    m.bid(F1, "x30", 250, 100, seg="DFM-30D")
    m.bid(F1, "x90", 260, 100)
    m.bid(F2, "y90", 255, 100)
    m.ask(S1, "a", 50, max_rate_bps=240, tif="gtc")
    m.bid(F1, "z90", 270, 100)
    assert rejected(m.send(F1, wire.CancelAll(segment="NOPE"))).code == "unknown_segment"
    assert rejected(m.send(ADMIN, wire.CancelAll())).code == "forbidden"
    out = m.send(F1, wire.CancelAll(segment="DFM-90D"))
    assert out.accepted and events(out, F1, wire.Accepted)[0].order_id is None
    assert [(d.client_id, d.reason, d.remaining) for d in events(out, F1, wire.Done)] == [
        ("x90", "cancelled", 100), ("z90", "cancelled", 100)]             # oldest first
    assert m.engine.books["DFM-90D"].depth() == [(255, 100, 1)]           # F2's stays
    assert m.engine.resting_client_ids(F1) == ["x30"]
    out = m.send(F1, wire.CancelAll())
    assert [d.client_id for d in events(out, F1, wire.Done)] == ["x30"]
    assert not m.engine.has_resting(F1) and m.engine.has_resting(F2)
    out = m.send(F1, wire.CancelAll())                   # nothing left: still accepted
    assert out.accepted and events(out, F1, wire.Done) == []
    out = m.send(S1, wire.CancelAll())                   # an SME's resting ask too
    assert [d.client_id for d in events(out, S1, wire.Done)] == ["a"]
    assert m.engine.books["DFM-90D"].demand() == (0, 0)


def test_nobody_can_cancel_or_amend_another_participants_order() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "mine", 250, 1_000)
    assert rejected(m.send(F2, wire.Cancel(client_id="mine"))).code == "unknown_order"
    assert rejected(m.send(F2, wire.Amend(client_id="mine", amount=5))).code == "unknown_order"
    assert rejected(m.send(S1, wire.Cancel(client_id="mine"))).code == "unknown_order"
    assert m.engine.books["DFM-90D"].depth() == [(250, 1_000, 1)]


def test_a_rejected_command_changes_nothing_and_takes_no_sequence_number() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    before = state_hash(m.engine)
    for cmd, code, path in [
        (wire.Bid(client_id="b", segment="NOPE", rate_bps=250, amount=5), "unknown_segment",
         "$.segment"),
        (wire.Bid(client_id="b", segment="SGCC-90D", rate_bps=250, amount=5), "no_credit_line",
         "$.segment"),
        (wire.Bid(client_id="b", segment="DFM-90D", rate_bps=3601, amount=5), "out_of_range",
         "$.rate_bps"),
        (wire.Cancel(client_id="ghost"), "unknown_order", "$.client_id"),
        (wire.Amend(client_id="ghost", amount=3), "unknown_order", "$.client_id"),
        (wire.SetCreditLine(core="NOPE", amount=3), "unknown_core", "$.core"),
    ]:
        r = rejected(m.send(F1, cmd))
        assert (r.code, r.path) == (code, path), cmd
    assert state_hash(m.engine) == before
    assert m.engine.seq == 1


def test_rate_above_the_segments_own_cap_is_rejected() -> None:
    m = Market()
    m.line(F1, "SGCC", 10_000)
    r = rejected(m.bid(F1, "b", 501, 100, seg="SGCC-90D"))
    assert (r.code, r.path) == ("out_of_range", "$.rate_bps")
    assert m.bid(F1, "b", 500, 100, seg="SGCC-90D").accepted


def test_fills_name_both_parties_and_carry_deterministic_trade_ids() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.line(F2, "DFM", 10_000)
    m.bid(F1, "f1-a", 250, 600)
    m.bid(F2, "f2-a", 240, 300)
    out = m.ask(S1, "s1-a", 800, max_rate_bps=260)
    seq = out.entry.seq  # type: ignore[union-attr]
    assert [(t.trade_id, t.funder, t.rate_bps, t.amount, t.bid_client_id, t.ask_client_id)
            for t in out.trades] == [(f"{seq}-0", F2, 240, 300, "f2-a", "s1-a"),
                                     (f"{seq}-1", F1, 250, 500, "f1-a", "s1-a")]
    sme_fills = events(out, S1, wire.Fill)
    assert [(f.funder, f.funder_name, f.side, f.client_id, f.amount) for f in sme_fills] == [
        (F2, "P12", "ask", "s1-a", 300), (F1, "P11", "ask", "s1-a", 500)]
    assert [(f.side, f.client_id, f.amount) for f in events(out, F1, wire.Fill)] == [
        ("bid", "f1-a", 500)]
    assert [(d.client_id, d.reason, d.filled) for d in events(out, F2, wire.Done)] == [
        ("f2-a", "filled", 300)]
    assert [(d.reason, d.filled, d.remaining) for d in events(out, S1, wire.Done)] == [
        ("filled", 800, 0)]


def test_an_ioc_ask_that_fills_partly_ends_unfilled_with_what_it_got() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "b", 250, 300)
    out = m.ask(S1, "a", 500)
    [done] = events(out, S1, wire.Done)
    assert (done.reason, done.filled, done.remaining) == ("unfilled", 300, 200)


# --- client ids and retries ----------------------------------------------------------

def test_a_retried_bid_returns_the_original_acceptance_and_places_nothing() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    first = m.bid(F1, "dup", 250, 1_000)
    again = m.bid(F1, "dup", 250, 1_000)          # the same message, sent again
    [a1], [a2] = events(first, F1, wire.Accepted), events(again, F1, wire.Accepted)
    assert (a2.order_id, a2.seq, a2.duplicate) == (a1.order_id, a1.seq, True)
    assert again.entry is None and not again.trades
    assert m.engine.books["DFM-90D"].depth() == [(250, 1_000, 1)]


def test_a_client_id_reused_for_other_terms_is_refused_and_changes_nothing() -> None:
    """A retry is the same message sent again. Another order under a name in use was
    answered as a retry: a funder that reused a name for a new rate believed it had
    re-quoted, and an SME that asked for more believed it had asked (found in an audit;
    ADR 8, addendum). Resting or ended, amended or not, the name answers only its own
    order; one forgotten after the retry window is free again."""
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "b", 250, 1_000)
    before = state_hash(m.engine)
    for other in (wire.Bid(client_id="b", segment="DFM-90D", rate_bps=240, amount=1_000),
                  wire.Bid(client_id="b", segment="DFM-30D", rate_bps=250, amount=1_000),
                  wire.Bid(client_id="b", segment="DFM-90D", rate_bps=250, amount=1_000,
                           tif="day")):
        refused = rejected(m.send(F1, other))
        assert (refused.code, refused.path, refused.client_id) == \
            ("client_id_in_use", "$.client_id", "b")
    assert state_hash(m.engine) == before
    assert m.send(F1, wire.Amend(client_id="b", rate_bps=245)).accepted
    assert events(m.bid(F1, "b", 250, 1_000), F1, wire.Accepted)[0].duplicate  # its own
    m.ask(S1, "a", 400, tif="ioc")                              # filled, ended
    assert events(m.ask(S1, "a", 400, tif="ioc"), S1, wire.Accepted)[0].duplicate
    assert rejected(m.ask(S1, "a", 500, tif="ioc")).code == "client_id_in_use"
    m.ts += RETRY_WINDOW_NS + 1
    assert not events(m.ask(S1, "a", 500, tif="ioc"), S1, wire.Accepted)[0].duplicate


def test_a_retried_ask_returns_its_done_and_makes_no_second_fill() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "b", 250, 1_000)
    first = m.ask(S1, "once", 400)
    again = m.ask(S1, "once", 400)
    assert len(first.trades) == 1 and not again.trades
    assert [type(e).__name__ for _, e in again.replies] == ["Accepted", "Done"]
    assert events(again, S1, wire.Done) == events(first, S1, wire.Done)
    assert m.engine.books["DFM-90D"].depth() == [(250, 600, 1)]


def test_client_ids_are_per_participant() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.line(F2, "DFM", 10_000)
    assert not events(m.bid(F1, "same", 250, 100), F1, wire.Accepted)[0].duplicate
    assert not events(m.bid(F2, "same", 250, 100), F2, wire.Accepted)[0].duplicate
    assert m.engine.books["DFM-90D"].depth() == [(250, 200, 2)]


def test_end_of_day_keeps_an_ended_order_for_retries_within_its_window() -> None:
    """An order that ended just before the cut-off still answers retries after it; one
    whose two minutes have passed is forgotten, as at any time; a resting order's name
    stays. (End of day forgot every ended order: an SME's ask retried across the cut-off
    was a second loan; found in review.)"""
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "gtc", 250, 1_000)
    m.ask(S1, "old", 50)
    m.ts += RETRY_WINDOW_NS
    m.ask(S1, "recent", 50)
    m.send(ADMIN, wire.EndOfDay())
    assert m.journal[-1].command == wire.EndOfDay(keep_retries=True)     # the rule journaled
    retry = m.ask(S1, "recent", 50)
    assert events(retry, S1, wire.Accepted)[0].duplicate and retry.trades == []
    assert events(retry, S1, wire.Done)[0].reason == "filled"
    assert not events(m.ask(S1, "old", 10), S1, wire.Accepted)[0].duplicate
    assert events(m.bid(F1, "gtc", 250, 1_000), F1, wire.Accepted)[0].duplicate


def test_a_restart_after_the_cut_off_keeps_an_ask_that_ended_before_it() -> None:
    """The crash of the finding: an ask filled at 16:29:50, the gateway back at 16:40.
    It journals `resume` (the downtime is not retry time), then the missed end of day;
    the SME's client retries the ask it never heard the answer of: no second loan."""
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "gtc", 250, 1_000)
    m.ask(S1, "a-17", 100)
    m.ts += 10 * 60 * 10**9                          # down for ten minutes
    m.send(ADMIN, wire.Resume())
    m.send(ADMIN, wire.EndOfDay())
    m.ts += 10 * 10**9
    retry = m.ask(S1, "a-17", 100)
    assert events(retry, S1, wire.Accepted)[0].duplicate and retry.trades == []
    assert m.engine.credit("DFM", F1) == (10_000, 100)


def test_an_end_of_day_journaled_before_keep_retries_replays_as_it_was_written() -> None:
    """Journals written before `keep_retries` forgot every ended order at the cut-off,
    and a retry after it was a new order: replayed, it still is (same journal in, same
    fills out)."""
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "gtc", 250, 1_000)
    m.ask(S1, "gone", 50)
    old = msgspec.json.decode(b'{"type": "end_of_day"}', type=wire.Command)
    assert old == wire.EndOfDay(keep_retries=False)
    m.ts += 1
    m.engine.apply(wire.JournalEntry(m.engine.seq + 1, m.ts, ADMIN, old))
    again = m.ask(S1, "gone", 50)
    assert not events(again, S1, wire.Accepted)[0].duplicate
    assert [t.amount for t in again.trades] == [50]
    assert events(m.bid(F1, "gtc", 250, 1_000), F1, wire.Accepted)[0].duplicate


# --- amend and cancel ----------------------------------------------------------------

def test_amend_down_keeps_priority_and_cancel_returns_done() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.line(F2, "DFM", 10_000)
    m.bid(F1, "first", 250, 500)
    m.bid(F2, "second", 250, 500)
    m.send(F1, wire.Amend(client_id="first", amount=200))
    out = m.ask(S1, "a", 300)
    assert [(t.funder, t.amount) for t in out.trades] == [(F1, 200), (F2, 100)]
    cancel = m.send(F2, wire.Cancel(client_id="second"))
    [done] = events(cancel, F2, wire.Done)
    assert (done.reason, done.filled, done.remaining) == ("cancelled", 100, 400)
    assert rejected(m.send(F2, wire.Cancel(client_id="second"))).code == "not_resting"


def test_amend_across_the_book_fills_at_the_bid_rate() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "b", 300, 500)
    m.ask(S1, "a", 400, max_rate_bps=280, tif="gtc")
    out = m.send(F1, wire.Amend(client_id="b", rate_bps=270))
    assert [(t.rate_bps, t.amount) for t in out.trades] == [(270, 400)]


# --- credit lines --------------------------------------------------------------------

def test_a_bid_needs_a_credit_line_against_the_core_enterprise() -> None:
    m = Market()
    assert rejected(m.bid(F1, "b", 250, 100)).code == "no_credit_line"
    m.line(F1, "DFM", 100)
    assert m.bid(F1, "b", 250, 100).accepted


def test_credit_is_shared_across_the_segments_of_one_core_enterprise() -> None:
    m = Market()
    m.line(F1, "DFM", 1_000)
    m.bid(F1, "short", 240, 800, seg="DFM-30D")
    m.bid(F1, "long", 250, 800, seg="DFM-90D")
    assert sum(t.amount for t in m.ask(S1, "a", 700, seg="DFM-30D").trades) == 700
    out = m.ask(S2, "b", 700, seg="DFM-90D")       # only 300 of the line is left
    assert [t.amount for t in out.trades] == [300]
    assert m.engine.credit("DFM", F1) == (1_000, 1_000)


def test_raising_a_line_rematches_resting_asks_and_lowering_cancels_nothing() -> None:
    m = Market()
    m.line(F1, "DFM", 100)
    m.bid(F1, "b", 250, 1_000)
    m.ask(S1, "a", 500, max_rate_bps=260, tif="gtc")      # gets 100: the line is used up
    assert m.engine.books["DFM-90D"].demand() == (400, 1)
    m.line(F1, "DFM", 50)                                  # below what is used
    assert m.engine.credit("DFM", F1) == (50, 100)
    book = m.engine.books["DFM-90D"]
    assert [(o.side, o.remaining) for o in book.orders()] == [("bid", 900), ("ask", 400)]
    assert book.depth() == []                              # rests, but can lend nothing now
    out = m.line(F1, "DFM", 1_000)
    assert [(t.amount, t.ask_client_id) for t in out.trades] == [(400, "a")]
    assert book.demand() == (0, 0)
    assert book.depth() == [(250, 500, 1)]                 # 1,000 line - 500 used


def test_a_repayment_frees_the_line_and_resting_bids_lend_again() -> None:
    m = Market()
    m.line(F1, "DFM", 1_000)
    m.bid(F1, "b", 250, 5_000)
    m.ask(S1, "a", 1_000)                                 # the whole line is lent
    m.ask(S2, "w", 700, max_rate_bps=260, tif="gtc")      # rests: nothing left to lend
    assert m.engine.books["DFM-90D"].demand() == (700, 1)
    out = m.repay(F1, "DFM", 400)
    assert events(out, PLATFORM, wire.Accepted) == [
        wire.Accepted(client_id=None, seq=out.entry.seq if out.entry else -1)]
    # The 400 freed lend at once to the waiting ask, in the same command.
    assert [(t.funder, t.sme, t.amount, t.ask_client_id) for t in out.trades] == [
        (F1, S2, 400, "w")]
    assert {"DFM-30D", "DFM-90D"} <= set(out.segments)
    assert m.engine.credit("DFM", F1) == (1_000, 1_000)
    # The funder hears of it after the fills: the line as it stands after them.
    assert [type(e).__name__ for p, e in out.replies if p == F1] == ["Fill", "LineUpdate"]
    assert events(out, F1, wire.LineUpdate) == [
        wire.LineUpdate(core="DFM", line=1_000, used=1_000, repaid=400, reason="repaid")]
    out = m.repay(F1, "DFM", 1_400)                       # everything lent so far
    assert [t.amount for t in out.trades] == [300]        # the rest of the waiting ask
    assert m.engine.credit("DFM", F1) == (1_000, 300)
    assert m.engine.status(F1).lines == [
        wire.LineStatus(core="DFM", line=1_000, used=300, repaid=1_400)]


def test_a_repaid_total_counts_once_however_often_it_is_sent() -> None:
    m = Market()
    m.line(F1, "DFM", 1_000)
    m.bid(F1, "b", 250, 1_000)
    m.ask(S1, "a", 800)
    first = m.repay(F1, "DFM", 300)
    assert first.entry is not None and m.engine.credit("DFM", F1) == (1_000, 500)
    before = state_hash(m.engine)
    for total in (300, 100, 0):                           # a retry; overtaken reports
        again = m.repay(F1, "DFM", total)
        assert again.entry is None and not again.trades
        assert not events(again, F1, wire.LineUpdate)
        assert events(again, PLATFORM, wire.Accepted) == [
            wire.Accepted(client_id=None, seq=first.entry.seq, duplicate=True)]
    assert state_hash(m.engine) == before
    m.repay(F1, "DFM", 450)                               # only the 150 more is new
    assert m.engine.credit("DFM", F1) == (1_000, 350)


def test_a_repayment_of_more_than_is_lent_is_rejected_and_changes_nothing() -> None:
    m = Market()
    m.line(F1, "DFM", 1_000)
    m.bid(F1, "b", 250, 1_000)
    m.ask(S1, "a", 600)
    m.repay(F1, "DFM", 100)
    before = state_hash(m.engine)
    cases: list[tuple[int, wire.Repay, str, str]] = [
        (PLATFORM, wire.Repay(funder=F1, core="DFM", repaid_total=601), "exceeds_used",
         "$.repaid_total"),                               # 501 more, but 500 are lent
        (PLATFORM, wire.Repay(funder=F2, core="DFM", repaid_total=1), "exceeds_used",
         "$.repaid_total"),                               # F2 never lent
        (PLATFORM, wire.Repay(funder=F1, core="SGCC", repaid_total=1), "exceeds_used",
         "$.repaid_total"),                               # nothing lent against SGCC
        (PLATFORM, wire.Repay(funder=F1, core="NOPE", repaid_total=1), "unknown_core",
         "$.core"),
        (F1, wire.Repay(funder=F1, core="DFM", repaid_total=600), "forbidden", "$.type"),
        (S1, wire.Repay(funder=F1, core="DFM", repaid_total=600), "forbidden", "$.type"),
        (ADMIN, wire.Repay(funder=F1, core="DFM", repaid_total=600), "forbidden", "$.type"),
    ]
    for who, cmd, code, path in cases:
        r = rejected(m.send(who, cmd))
        assert (r.code, r.path) == (code, path), (cmd, r)
    assert "501" in rejected(m.send(PLATFORM, cases[0][1])).message
    assert state_hash(m.engine) == before
    assert m.repay(F1, "DFM", 600).entry is not None      # exactly what is lent: taken
    assert m.engine.credit("DFM", F1) == (1_000, 0)


def test_a_halt_ends_every_order_in_the_segment_and_refuses_new_ones() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.line(F2, "DFM", 10_000)
    m.bid(F1, "b1", 250, 1_000)
    m.bid(F2, "b2", 260, 500, seg="DFM-90D", tif="day")
    m.bid(F1, "elsewhere", 250, 700, seg="DFM-30D")
    m.ask(S1, "w", 300, max_rate_bps=200, tif="gtc")
    out = m.send(ADMIN, wire.Halt(segment="DFM-90D"))
    assert out.entry is not None and out.segments == ["DFM-90D"]
    # Each order ends, oldest first, told to its owner with what it gave up.
    assert [(p, e.client_id, e.reason, e.remaining) for p, e in out.replies
            if isinstance(e, wire.Done)] == [
        (F1, "b1", "halted", 1_000), (F2, "b2", "halted", 500), (S1, "w", "halted", 300)]
    assert len(m.engine.books["DFM-90D"]) == 0 and len(m.engine.books["DFM-30D"]) == 1
    update = m.engine.book_update("DFM-90D")
    assert update.halted and update.levels == [] and update.demand_orders == 0
    assert not m.engine.book_update("DFM-30D").halted
    before = state_hash(m.engine)
    for who, cmd in [(F1, wire.Bid(client_id="new", segment="DFM-90D", rate_bps=250,
                                   amount=1)),
                     (S1, wire.Ask(client_id="new", segment="DFM-90D", amount=1))]:
        r = rejected(m.send(who, cmd))
        assert (r.code, r.path) == ("segment_halted", "$.segment")
    # A retry of an order placed before the halt is still answered as one, with its end.
    retried = m.bid(F1, "b1", 250, 1_000)
    assert events(retried, F1, wire.Accepted)[0].duplicate
    assert events(retried, F1, wire.Done)[0].reason == "halted"
    # Halting again changes nothing and is not journaled.
    again = m.send(ADMIN, wire.Halt(segment="DFM-90D"))
    assert again.entry is None and events(again, ADMIN, wire.Accepted)[0].duplicate
    assert state_hash(m.engine) == before
    assert m.ask(S2, "a", 100, seg="DFM-30D").trades      # the other tenor trades on
    # Reopened, it takes orders again, empty.
    assert m.send(ADMIN, wire.Reopen(segment="DFM-90D")).entry is not None
    assert not m.engine.book_update("DFM-90D").halted
    assert m.bid(F1, "b3", 250, 100).accepted
    assert m.send(ADMIN, wire.Reopen(segment="DFM-90D")).entry is None   # already open


def test_a_suspension_ends_a_participants_orders_and_refuses_new_ones() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.line(F2, "DFM", 10_000)
    m.bid(F1, "b1", 250, 1_000)
    m.bid(F1, "b2", 260, 500, seg="DFM-30D", tif="day")
    m.bid(F2, "other", 270, 800)
    out = m.send(ADMIN, wire.Suspend(participant=F1))
    assert out.entry is not None and set(out.segments) == {"DFM-30D", "DFM-90D"}
    assert [(p, e.client_id, e.reason, e.remaining) for p, e in out.replies
            if isinstance(e, wire.Done)] == [(F1, "b1", "suspended", 1_000),
                                             (F1, "b2", "suspended", 500)]
    assert m.engine.status(F1).suspended and not m.engine.status(F2).suspended
    assert m.engine.books["DFM-90D"].depth() == [(270, 800, 1)]     # F2's bid stays
    before = state_hash(m.engine)
    r = rejected(m.bid(F1, "new", 250, 100))
    assert (r.code, r.path) == ("suspended", "$.type")
    retried = m.bid(F1, "b1", 250, 1_000)                # a retry: answered as one
    assert events(retried, F1, wire.Accepted)[0].duplicate
    assert events(retried, F1, wire.Done)[0].reason == "suspended"
    again = m.send(ADMIN, wire.Suspend(participant=F1))
    assert again.entry is None and events(again, ADMIN, wire.Accepted)[0].duplicate
    assert state_hash(m.engine) == before
    assert m.line(F1, "DFM", 20_000).accepted            # it may still manage its lines
    assert m.ask(S1, "a", 300).trades                    # the market trades on
    assert m.send(ADMIN, wire.Reinstate(participant=F1)).entry is not None
    assert m.bid(F1, "b3", 250, 100).accepted and not m.engine.status(F1).suspended
    assert m.send(ADMIN, wire.Reinstate(participant=F1)).entry is None


def test_a_suspended_smes_ask_ends_and_its_new_asks_are_refused() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.ask(S1, "w", 500, max_rate_bps=200, tif="gtc")
    out = m.send(ADMIN, wire.Suspend(participant=S1))
    assert [(e.client_id, e.reason) for e in events(out, S1, wire.Done)] == [
        ("w", "suspended")]
    assert m.engine.books["DFM-90D"].demand() == (0, 0)
    m.bid(F1, "b", 250, 1_000)
    for tif in ("ioc", "fok", "gtc"):
        r = rejected(m.ask(S1, f"a-{tif}", 100, tif=tif))
        assert (r.code, r.path) == ("suspended", "$.type")
    assert m.ask(S2, "other", 100).trades              # another SME borrows


def test_halt_and_reopen_are_the_admins_and_name_a_segment() -> None:
    m = Market()
    for who in (F1, S1, PLATFORM):
        for cmd in (wire.Halt(segment="DFM-90D"), wire.Reopen(segment="DFM-90D"),
                    wire.Suspend(participant=S1), wire.Reinstate(participant=S1)):
            r = rejected(m.send(who, cmd))
            assert (r.code, r.path) == ("forbidden", "$.type")
    for cmd in (wire.Halt(segment="NOPE"), wire.Reopen(segment="NOPE")):
        r = rejected(m.send(ADMIN, cmd))
        assert (r.code, r.path) == ("unknown_segment", "$.segment")


def test_a_fill_in_one_tenor_changes_what_the_others_show() -> None:
    """The line is shared by the core enterprise's books, so a fill in one moves the
    lendable depth of all of them, and each is reported as changed."""
    m = Market()
    m.line(F1, "DFM", 1_000)
    m.bid(F1, "short", 250, 800, seg="DFM-30D")
    m.bid(F1, "long", 260, 800, seg="DFM-90D")
    assert m.engine.books["DFM-90D"].depth() == [(260, 800, 1)]
    out = m.ask(S1, "a", 600, seg="DFM-30D")
    assert [t.amount for t in out.trades] == [600]
    assert m.engine.books["DFM-90D"].depth() == [(260, 400, 1)]
    assert {"DFM-30D", "DFM-90D"} <= set(out.segments)
    out = m.line(F1, "DFM", 2_000)
    assert m.engine.books["DFM-90D"].depth() == [(260, 800, 1)]
    assert {"DFM-30D", "DFM-90D"} <= set(out.segments)


@st.composite
def sessions(draw: st.DrawFn) -> list[tuple[int, Any]]:
    """Random commands on the two DFM segments (one core enterprise)."""
    cmds: list[tuple[int, Any]] = []
    for i in range(draw(st.integers(1, 80))):
        seg = draw(st.sampled_from(["DFM-30D", "DFM-90D"]))
        kind = draw(st.sampled_from(["bid", "bid", "ask", "ask", "line", "cancel", "amend",
                                     "bid", "cancel_all", "repay", "halt"]))
        funder = draw(st.sampled_from([F1, F2]))
        if kind == "bid":
            cmds.append((funder, wire.Bid(client_id=f"b{i}", segment=seg,
                                          rate_bps=draw(st.integers(240, 260)),
                                          amount=draw(st.integers(1, 2_000)),
                                          min_ticket=draw(st.sampled_from([0, 0, 500])))))
        elif kind == "ask":
            cmds.append((draw(st.sampled_from([S1, S2])), wire.Ask(
                client_id=f"a{i}", segment=seg, amount=draw(st.integers(1, 3_000)),
                tif=draw(st.sampled_from(["ioc", "gtc"])),
                single_funder=draw(st.booleans()))))
        elif kind == "line":
            cmds.append((funder, wire.SetCreditLine(core="DFM",
                                                    amount=draw(st.integers(0, 5_000)))))
        elif kind == "halt":
            # Reopened three times as often: a halted segment refuses orders, and long
            # halts would leave the credit checks little to check.
            cmds.append((ADMIN, wire.Halt(segment=seg) if draw(st.integers(0, 3)) == 0
                         else wire.Reopen(segment=seg)))
            who = draw(st.sampled_from([F1, F2, S1, S2]))
            cmds.append((ADMIN, wire.Suspend(participant=who) if draw(st.integers(0, 3)) == 0
                         else wire.Reinstate(participant=who)))
        elif kind == "repay":
            cmds.append((PLATFORM, wire.Repay(funder=funder, core="DFM",
                                              repaid_total=draw(st.integers(0, 6_000)))))
        elif kind == "cancel":
            cmds.append((funder, wire.Cancel(client_id=f"b{draw(st.integers(0, i))}")))
        elif kind == "cancel_all":
            cmds.append((draw(st.sampled_from([F1, F2, S1])), wire.CancelAll(
                segment=draw(st.sampled_from([None, seg])))))
        else:
            cmds.append((funder, wire.Amend(client_id=f"b{draw(st.integers(0, i))}",
                                            amount=draw(st.integers(1, 2_000)))))
    return cmds


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_credit_lines_hold_across_segments_under_random_load(
        cmds: list[tuple[int, Any]]) -> None:
    m = Market()
    lent: dict[int, int] = {F1: 0, F2: 0}     # lent and not repaid
    line: dict[int, int] = {F1: 0, F2: 0}
    repaid: dict[int, int] = {F1: 0, F2: 0}
    peak: dict[int, int] = {F1: 0, F2: 0}     # lending may stop below a lowered line...
    for who, cmd in cmds:
        if isinstance(cmd, wire.SetCreditLine):
            line[who] = cmd.amount
        out = m.send(who, cmd)
        if isinstance(cmd, wire.Repay):
            freed = cmd.repaid_total - repaid[cmd.funder]
            # A repayment frees exactly the new part of the total, never more than is
            # lent; anything else changes nothing.
            assert out.accepted == (freed > 0 and freed <= lent[cmd.funder])
            if out.accepted:
                lent[cmd.funder] -= freed
                repaid[cmd.funder] = cmd.repaid_total
                peak[cmd.funder] = lent[cmd.funder]
        for t in out.trades:
            lent[t.funder] += t.amount
            # ...but no fill may take a funder past the line in force when it happened.
            assert lent[t.funder] <= max(line[t.funder], peak[t.funder]), "over the line"
        for f in (F1, F2):
            peak[f] = max(peak[f], lent[f])
            assert m.engine.credit("DFM", f)[1] == lent[f]
        # A suspended participant has nothing resting and takes part in no loan.
        assert not m.engine.suspended & m.engine.owned.keys()
        assert not any({t.funder, t.sme} & m.engine.suspended for t in out.trades)
    # The same journal gives the same state, and so does snapshot + the rest of it.
    replay = Engine(SEGMENTS)
    for entry in m.journal:
        assert replay.apply(entry).accepted
    assert state_hash(replay) == state_hash(m.engine)


# --- determinism, snapshots ----------------------------------------------------------

def random_session(m: Market, n: int, seed: int) -> None:
    rng = random.Random(seed)
    for f in (F1, F2):
        m.line(f, "DFM", 10**9)
        m.line(f, "SGCC", 10**9)
    for i in range(n):
        seg = rng.choice([s.id for s in SEGMENTS])
        roll = rng.random()
        if roll < 0.45:
            m.bid(rng.choice([F1, F2]), f"b{i}", rng.randrange(240, 300), rng.randrange(1, 10**6),
                  seg=seg, tif=rng.choice(["gtc", "day"]))
        elif roll < 0.75:
            m.ask(rng.choice([S1, S2]), f"a{i}", rng.randrange(1, 2 * 10**6), seg=seg,
                  max_rate_bps=rng.choice([None, 260, 280]),
                  tif=rng.choice(["ioc", "ioc", "gtc", "fok"]))
        elif roll < 0.9:
            m.send(rng.choice([F1, F2]), wire.Cancel(client_id=f"b{rng.randrange(i + 1)}"))
        elif roll < 0.97:
            m.send(rng.choice([F1, F2]), wire.Amend(client_id=f"b{rng.randrange(i + 1)}",
                                                    rate_bps=rng.randrange(240, 300)))
        elif roll < 0.975:
            m.send(rng.choice([F1, F2, S1]), wire.CancelAll(segment=rng.choice([None, seg])))
        elif roll < 0.977:
            m.send(ADMIN, wire.Halt(segment=seg) if rng.random() < 0.25
                   else wire.Reopen(segment=seg))
            who = rng.choice([F1, F2, S1, S2])
            m.send(ADMIN, wire.Suspend(participant=who) if rng.random() < 0.25
                   else wire.Reinstate(participant=who))
        elif roll < 0.98:
            funder, core = rng.choice([F1, F2]), rng.choice(["DFM", "SGCC"])
            m.repay(funder, core, m.engine.repaid.get(core, {}).get(funder, 0)
                    + m.engine.credit(core, funder)[1] // 2)
        else:
            m.send(ADMIN, wire.EndOfDay())


def test_replay_and_snapshot_plus_replay_equal_the_live_engine() -> None:
    m = Market()
    random_session(m, 3_000, seed=5)
    live = state_hash(m.engine)
    full = Engine(SEGMENTS)
    half = len(m.journal) // 2
    for entry in m.journal[:half]:
        full.apply(entry)
    snap = encode(capture(full))
    names_at_half = dict(full.clients.items())
    for entry in m.journal[half:]:
        full.apply(entry)
    resumed = restore(decode(snap))
    # The snapshot does not hold the client-id map: restore derives it, exactly.
    assert dict(resumed.clients.items()) == names_at_half and names_at_half
    for entry in m.journal[half:]:
        assert resumed.apply(entry).accepted
    assert state_hash(full) == state_hash(resumed) == live
    assert dict(resumed.clients.items()) == dict(m.engine.clients.items())


def test_a_skip_numbers_on_after_a_lost_history_and_replays_so() -> None:
    """ADR 29: after `skip` to `last`, the next command, order and trade are numbered
    from `last + 1`; a skip that would go back is refused and changes nothing; replay and
    a snapshot taken at the skip give the live state."""
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "f1-a", 250, 600)
    seq = m.engine.seq
    before = state_hash(m.engine)
    refused = rejected(m.send(ADMIN, wire.Skip(last=seq)))   # its own number is seq + 1
    assert (refused.code, refused.path) == ("invalid", "$.last")
    assert m.engine.seq == seq and state_hash(m.engine) == before
    assert rejected(m.send(F1, wire.Skip(last=seq + 9))).code == "forbidden"
    out = m.send(ADMIN, wire.Skip(last=seq + 1))               # one number lost: its own
    assert out.accepted and m.engine.seq == seq + 1
    skip = m.send(ADMIN, wire.Skip(last=seq + 1000))
    assert skip.entry is not None and skip.entry.seq == seq + 2
    assert skip.entry.ends_at == m.engine.seq == seq + 1000
    bid = m.bid(F1, "f1-b", 240, 300)
    assert bid.entry is not None and bid.entry.seq == seq + 1001
    assert [e.order_id for e in events(bid, F1, wire.Accepted)] == [seq + 1001]
    ask = m.ask(S1, "s1-a", 800, max_rate_bps=260)
    assert [t.trade_id for t in ask.trades] == [f"{seq + 1002}-0", f"{seq + 1002}-1"]
    live = state_hash(m.engine)
    replayed = Engine(SEGMENTS)
    for entry in m.journal:
        assert replayed.apply(entry).accepted
    assert state_hash(replayed) == live
    at_skip = Engine(SEGMENTS)
    for entry in m.journal[:m.journal.index(skip.entry) + 1]:
        at_skip.apply(entry)
    resumed = restore(decode(encode(capture(at_skip))))
    assert resumed.seq == seq + 1000
    for entry in m.journal[m.journal.index(skip.entry) + 1:]:
        assert resumed.apply(entry).accepted
    assert state_hash(resumed) == live


def test_a_skip_at_a_start_leaves_the_downtime_out_of_the_retry_window() -> None:
    """The gateway journals `skip` and then `resume` at a start, both stamped after the
    downtime. The skip took that time as trading time, and ended the retry window of
    every order that had ended before the stop: an SME's retried ask was a second loan
    (found in review)."""
    m = Market()
    m.line(F1, "DFM", 10**6)
    m.bid(F1, "f1-a", 250, 1_000)
    m.ask(S1, "s1-a", 1_000)                               # filled, ended: remembered
    ended = m.engine.ts
    start = ended + 10 * 60 * 10**9                        # ten minutes down
    for cmd in (wire.Skip(last=m.engine.seq + 50), wire.Resume()):
        assert m.engine.submit(ADMIN, "admin", cmd, start).accepted
    retry = m.engine.submit(S1, "sme", wire.Ask(client_id="s1-a", segment="DFM-90D",
                                                 amount=1_000), start + 1)
    assert retry.entry is None and retry.trades == []
    assert [(type(e).__name__, getattr(e, "duplicate", None)) for _, e in retry.replies] \
        == [("Accepted", True), ("Done", None)]


def test_the_derived_client_ids_answer_retries_as_the_live_engine_does() -> None:
    """A retried order gets the same answer from a restored engine as from the live one:
    the derived map names the same orders, resting and ended alike."""
    m = Market()
    rng = random.Random(11)
    for f in (F1, F2):
        m.line(f, "DFM", 10**9)
    for i in range(1_500):                    # no end of day: every name is remembered
        roll = rng.random()
        if roll < 0.5:
            m.bid(rng.choice([F1, F2]), f"b{i}", rng.randrange(240, 300), 10**5,
                  seg="DFM-30D", tif="day")
        elif roll < 0.8:
            m.ask(rng.choice([S1, S2]), f"a{i}", rng.randrange(1, 4 * 10**5), seg="DFM-30D",
                  tif=rng.choice(["ioc", "gtc"]))
        else:
            m.send(rng.choice([F1, F2]), wire.Cancel(client_id=f"b{rng.randrange(i + 1)}"))
    restored = restore(decode(encode(capture(m.engine))))
    names = list(m.engine.clients.items())
    assert len(names) > 1_000 and dict(restored.clients.items()) == dict(names)
    placed = {(e.participant, e.command.client_id): e.command for e in m.journal
              if isinstance(e.command, wire.Bid | wire.Ask)}
    for (who, client_id), _order_id in names[::7]:
        role = "sme" if who in (S1, S2) else "funder"
        other: wire.Command = (
            wire.Ask(client_id=client_id, segment="DFM-30D", amount=10**6 + 7)
            if role == "sme"          # an amount the session never asked for
            else wire.Bid(client_id=client_id, segment="DFM-30D", rate_bps=250, amount=1))
        for cmd, answer in ((placed[(who, client_id)], wire.Accepted),
                            (other, wire.Rejected)):
            live = m.engine.submit(who, role, cmd, m.engine.ts + 1).replies  # type: ignore[arg-type]
            again = restored.submit(who, role, cmd, restored.ts + 1).replies  # type: ignore[arg-type]
            assert live == again and type(live[0][1]) is answer, (client_id, live)


def test_a_stored_snapshot_is_compressed_and_older_ones_still_load() -> None:
    from matcher.snapshot import STORED
    m = Market()
    random_session(m, 3_000, seed=7)
    m.send(ADMIN, wire.Suspend(participant=S2))      # whatever the session left
    state = capture(m.engine)
    stored = dump(state)
    assert stored.startswith(STORED) and len(stored) * 2 < len(encode(state))
    assert state_hash(restore(load(stored))) == state_hash(m.engine)
    assert state_hash(restore(load(encode(state)))) == state_hash(m.engine)   # as before
    # The platform's repaid totals are kept (version 4), and the halted segments (5).
    assert state.repaid and state.repaid == capture(restore(load(stored))).repaid
    assert state.halted and restore(load(stored)).halted == m.engine.halted
    assert state.suspended and restore(load(stored)).suspended == m.engine.suspended
    # Version 1 also wrote the client-id map; it loads, and the map is derived.
    fields = msgspec.structs.asdict(state)
    del fields["day_started"]                   # version 3's
    del fields["repaid"]                        # version 4's
    del fields["halted"]                        # version 5's
    del fields["suspended"]                     # version 6's
    v1 = msgspec.msgpack.encode({**fields, "version": 1,
                                 "clients": [[p, c, o] for (p, c), o
                                             in m.engine.clients.items()]})
    old = restore(load(v1))
    # Without a day's start, the snapshot's own time stands for it: an end of day missed
    # after the snapshot is still found.
    assert old.day_started == state.ts != m.engine.day_started > 0
    old.day_started = m.engine.day_started
    assert old.repaid == {}                     # no version before 4 had repayments
    old.repaid = {core: dict(totals) for core, totals in m.engine.repaid.items()}
    assert old.halted == set() and m.engine.halted   # nor halts before version 5
    old.halted = set(m.engine.halted)
    assert old.suspended == set() and m.engine.suspended     # nor suspensions before 6
    old.suspended = set(m.engine.suspended)
    assert state_hash(old) == state_hash(m.engine)
    assert dict(old.clients.items()) == dict(m.engine.clients.items())


def test_the_state_hash_sees_a_difference_in_queue_order() -> None:
    a, b = Market(), Market()
    for m, first, second in ((a, "x", "y"), (b, "y", "x")):
        m.line(F1, "DFM", 1_000)
        m.line(F2, "DFM", 1_000)
        m.bid(F1 if first == "x" else F2, first, 250, 100)
        m.bid(F2 if first == "x" else F1, second, 250, 100)
    assert state_hash(a.engine) != state_hash(b.engine)


def test_a_journal_entry_out_of_sequence_is_refused() -> None:
    m = Market()
    m.line(F1, "DFM", 100)
    entry = wire.JournalEntry(5, 0, F1, wire.SetCreditLine(core="DFM", amount=1))
    try:
        m.engine.apply(entry)
    except ValueError as e:
        assert "does not follow" in str(e)
    else:
        raise AssertionError("applied out of sequence")


def test_segments_added_at_run_time_trade_at_once() -> None:
    m = Market()
    assert m.send(ADMIN, wire.AddSegment(segment="CRRC-60D", core="CRRC",
                                         tenor_days=60)).accepted
    assert rejected(m.send(ADMIN, wire.AddSegment(segment="CRRC-60D", core="CRRC",
                                                  tenor_days=60))).code == "duplicate_segment"
    m.line(F1, "CRRC", 1_000)
    m.bid(F1, "b", 250, 500, seg="CRRC-60D")
    assert [t.amount for t in m.ask(S1, "a", 200, seg="CRRC-60D").trades] == [200]


def test_end_of_day_expires_day_orders_and_keeps_gtc() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "day", 250, 100, tif="day")
    m.bid(F1, "gtc", 251, 100, tif="gtc")
    out = m.send(ADMIN, wire.EndOfDay())
    assert [(d.client_id, d.reason) for d in events(out, F1, wire.Done)] == [("day", "expired")]
    assert m.engine.books["DFM-90D"].depth() == [(251, 100, 1)]


def test_an_ended_orders_client_id_answers_retries_for_the_retry_window_only() -> None:
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "b", 250, 1_000)
    m.ask(S1, "gone", 100)                               # ends at once (IOC, filled)
    m.ts += RETRY_WINDOW_NS - 10
    assert events(m.ask(S1, "gone", 100), S1, wire.Accepted)[0].duplicate
    m.ts += 20                                           # the window has passed...
    m.line(F2, "DFM", 1)                                 # ...once the journal's time moves on
    again = events(m.ask(S1, "gone", 100), S1, wire.Accepted)[0]
    assert not again.duplicate and again.order_id == m.engine.seq
    assert events(m.bid(F1, "b", 250, 1_000), F1, wire.Accepted)[0].duplicate   # still resting


def test_after_its_window_a_client_id_names_a_new_order_even_in_a_quiet_market() -> None:
    """Nothing else happened since the order ended, so it is not forgotten yet: the
    window is still what decides."""
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "b", 250, 1_000)
    m.ask(S1, "x", 100)                                  # ends at once (IOC, filled)
    m.ts += RETRY_WINDOW_NS + 10
    again = m.ask(S1, "x", 100)
    assert not events(again, S1, wire.Accepted)[0].duplicate and again.trades
    replayed = Engine(SEGMENTS, names=lambda p: f"P{p}")
    for entry in m.journal:
        replayed.apply(entry)
    assert state_hash(replayed) == state_hash(m.engine)
    assert state_hash(restore(decode(encode(capture(m.engine))))) == state_hash(m.engine)
    assert events(m.ask(S1, "x", 100), S1, wire.Accepted)[0].duplicate   # the new one


def test_a_line_set_to_zero_with_nothing_lent_is_no_line() -> None:
    m = Market()
    m.line(F1, "DFM", 0)
    assert rejected(m.bid(F1, "b", 250, 100)).code == "no_credit_line"
    m.line(F1, "DFM", 100)
    m.bid(F1, "b", 250, 100)
    m.ask(S1, "a", 60)                                   # uses 60 of the line
    m.line(F1, "DFM", 0)                                 # cut: used 60, line 0
    placed = m.bid(F1, "c", 250, 100)                    # taken, as journals hold such
    assert events(placed, F1, wire.Accepted) and not placed.trades
    assert not m.ask(S1, "a2", 10).trades                # but it lends nothing


def test_downtime_does_not_count_against_the_retry_window() -> None:
    """An ask filled just before a crash, whose ack never reached the SME: after a
    restart that took longer than the window, the retry must find it, not fund twice."""
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "b", 250, 1_000)
    m.ask(S1, "funded", 100)                             # ends at once (IOC, filled)
    m.ts += 60 * 10**9                                   # a minute of trading...
    m.line(F2, "DFM", 1)
    m.ts += 10 * 60 * 10**9                              # ...then ten minutes down
    m.send(ADMIN, wire.Resume())                         # the gateway starts again
    m.line(F2, "DFM", 2)                                 # someone else's command first
    retry = m.ask(S1, "funded", 100)
    assert events(retry, S1, wire.Accepted)[0].duplicate and not retry.trades
    # The minute before the stop still counts: the window ends a minute early.
    m.ts += RETRY_WINDOW_NS - 60 * 10**9 + 10
    m.line(F2, "DFM", 3)
    assert not events(m.ask(S1, "funded", 100), S1, wire.Accepted)[0].duplicate
    # A snapshot and a replay shift the same ends: the state is the live one.
    assert state_hash(restore(decode(encode(capture(m.engine))))) == state_hash(m.engine)
    replayed = Engine(SEGMENTS, names=lambda p: f"P{p}")
    for entry in m.journal:
        replayed.apply(entry)
    assert state_hash(replayed) == state_hash(m.engine)


def test_a_day_not_closed_before_a_cut_off_is_found_missed() -> None:
    m = Market()
    assert not m.engine.day_missed(10)                   # nothing happened yet
    m.ts = 100
    m.line(F1, "DFM", 10_000)                            # the day starts at 101
    assert m.engine.day_started == 101
    assert not m.engine.day_missed(101) and m.engine.day_missed(102)
    m.send(ADMIN, wire.EndOfDay())
    assert m.engine.day_started == 0 and not m.engine.day_missed(10**9)
    m.send(ADMIN, wire.Resume())                         # any command starts the next
    assert m.engine.day_started == 103 and m.engine.day_missed(104)
    assert rejected(m.send(F1, wire.Resume())).code == "forbidden"


def test_stamped_time_never_goes_backwards() -> None:
    m = Market()
    m.ts = 1_000
    m.line(F1, "DFM", 10)
    m.ts = 10                                            # the clock stepped back
    out = m.line(F1, "DFM", 20)
    assert out.entry is not None and out.entry.ts == 1_001


class _NoScan(dict):  # type: ignore[type-arg]
    """The engine's orders, refusing to be walked whole."""

    def values(self) -> Any:
        raise AssertionError("walked every resting order of the market")


def test_one_participants_orders_are_read_without_walking_the_market() -> None:
    """`status`, `cancel_all` and the check a funder's disconnect makes walked every
    resting order of the market to find one participant's (found in review: 2 to 4 ms
    each with 100,000 resting, for a sender with none). They read an index by owner,
    oldest first, kept through fills, cancels and a snapshot."""
    m = Market()
    m.line(F1, "DFM", 10**12)
    m.line(F2, "DFM", 10**12)
    for n in range(50):                                   # the rest of the market
        m.bid(F2, f"o{n}", 200 + n % 7, 1_000_000)
    m.bid(F1, "a", 300, 500_000)
    m.bid(F1, "b", 290, 700_000, seg="DFM-30D")
    m.bid(F1, "c", 280, 900_000)
    m.ask(S1, "x", 800_000, max_rate_bps=285)             # fills F2's, not F1's
    m.send(F1, wire.Cancel(client_id="b"))

    def check(engine: Engine) -> None:
        engine.orders = _NoScan(engine.orders)
        assert [o.client_id for o in engine.status(F1).orders] == ["a", "c"]
        assert engine.resting_client_ids(F1) == ["a", "c"]
        assert engine.has_resting(F1) and not engine.has_resting(S2)
        assert engine.status(S2).orders == []
        out = engine.submit(F1, "funder", wire.CancelAll(segment="DFM-90D"), 10**6)
        assert [d.client_id for _, d in out.replies if isinstance(d, wire.Done)] == ["a", "c"]
        assert not engine.has_resting(F1) and engine.status(F1).orders == []

    after_snapshot = restore(decode(encode(capture(m.engine))))
    check(m.engine)
    check(after_snapshot)


def test_a_cancel_names_an_ended_order_not_resting_within_its_window_then_unknown() -> None:
    """In a quiet market an ended order is forgotten only when a later command comes: a
    cancel ten minutes on still said `not_resting`, where a retry of its order would be
    a new order (found in review)."""
    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "b", 250, 100)
    m.send(F1, wire.Cancel(client_id="b"))
    assert rejected(m.send(F1, wire.Cancel(client_id="b"))).code == "not_resting"
    m.ts += RETRY_WINDOW_NS
    assert rejected(m.send(F1, wire.Cancel(client_id="b"))).code == "unknown_order"
    assert rejected(m.send(F1, wire.Amend(client_id="b", amount=5))).code == "unknown_order"


def test_an_end_of_day_sent_again_under_its_client_id_is_a_repeat() -> None:
    """An admin who resent an `end_of_day` after a lost answer expired the DAY orders
    placed since the first (found in an audit): with a client id, the same one again is
    answered as a repeat and expires nothing, also after a snapshot; another id, or none,
    is a new cut-off."""
    from matcher.snapshot import capture, restore

    m = Market()
    m.line(F1, "DFM", 10_000)
    m.bid(F1, "day1", 250, 100, tif="day")
    first = m.send(ADMIN, wire.EndOfDay(client_id="eod-2026-11-23"))
    assert events(first, ADMIN, wire.Accepted)[0].client_id == "eod-2026-11-23"
    assert [d.client_id for d in events(first, F1, wire.Done)] == ["day1"]
    m.bid(F1, "day2", 250, 100, tif="day")
    journaled = len(m.journal)
    for engine in (m.engine, restore(capture(m.engine))):
        again = engine.submit(ADMIN, "admin", wire.EndOfDay(client_id="eod-2026-11-23"),
                              m.ts + 1)
        [answer] = events(again, ADMIN, wire.Accepted)
        assert answer.duplicate and answer.client_id == "eod-2026-11-23"
        assert again.entry is None and events(again, F1, wire.Done) == []
        assert [o.client_id for o in engine.status(F1).orders] == ["day2"]
    assert len(m.journal) == journaled
    assert [d.client_id for d in events(m.send(ADMIN, wire.EndOfDay(client_id="eod-2026-11-24")),
                                        F1, wire.Done)] == ["day2"]
    m.bid(F1, "day3", 250, 100, tif="day")
    assert [d.client_id for d in events(m.send(ADMIN, wire.EndOfDay()), F1, wire.Done)] == \
        ["day3"]                                       # none: every one is a cut-off


def mixed_session(m: Market, n: int, seed: int) -> list[list[Any]]:
    """Commands of every kind together, as a day has them and the plain session has
    not: retries of a name (the same order, or another under it), time that jumps past
    the retry window, `resume`, end of day with and without a name (and named again),
    min_ticket bids, single-funder asks, lines that move, halts and suspensions. The
    trades of each journaled command, in journal order."""
    rng = random.Random(seed)
    trades: list[list[Any]] = []

    def send(who: int, cmd: Any) -> None:
        out = m.send(who, cmd)
        if out.entry is not None:
            trades.append(out.trades)

    sent: list[tuple[int, Any]] = []
    for f in (F1, F2):
        send(f, wire.SetCreditLine(core="DFM", amount=rng.randrange(10**6, 10**8)))
    for i in range(n):
        seg = rng.choice([s.id for s in SEGMENTS if s.core == "DFM"])
        roll = rng.random()
        if roll < 0.35:
            cmd: Any = wire.Bid(client_id=f"b{i}", segment=seg, rate_bps=rng.randrange(240, 300),
                                amount=rng.randrange(1, 10**6), tif=rng.choice(["gtc", "day"]),
                                min_ticket=rng.choice([0, 0, 1_000, 50_000, 400_000]))
            who = rng.choice([F1, F2])
        elif roll < 0.6:
            cmd = wire.Ask(client_id=f"a{i}", segment=seg, amount=rng.randrange(1, 10**6),
                           max_rate_bps=rng.choice([None, 260, 290]),
                           tif=rng.choice(["ioc", "gtc", "fok", "day"]),
                           single_funder=rng.random() < 0.3)
            who = rng.choice([S1, S2])
        elif roll < 0.72 and sent:                      # a retry: the same, or not
            who, cmd = rng.choice(sent)
            if rng.random() < 0.3 and isinstance(cmd, wire.Bid):
                cmd = msgspec.structs.replace(cmd, amount=cmd.amount + 1)
        elif roll < 0.86 and sent:                      # one of the last orders sent
            who, order = rng.choice(sent[-40:])
            cmd = (wire.Amend(client_id=order.client_id, amount=rng.randrange(1, 10**6))
                   if roll < 0.8 and isinstance(order, wire.Bid)
                   else wire.Cancel(client_id=order.client_id))
        elif roll < 0.9:
            who = rng.choice([F1, F2])
            cmd = wire.SetCreditLine(core="DFM", amount=rng.randrange(0, 10**8))
        elif roll < 0.93:
            m.ts += rng.choice([10**9, 60 * 10**9, RETRY_WINDOW_NS + 1])   # time passes
            continue
        elif roll < 0.95:
            who, cmd = ADMIN, wire.Resume()
            m.ts += rng.randrange(10**9, 10**12)                             # downtime
        elif roll < 0.97:
            who, cmd = ADMIN, wire.EndOfDay(client_id=rng.choice([None, "eod-1", "eod-2"]))
        elif roll < 0.985:
            who = ADMIN
            cmd = (wire.Halt(segment=seg) if rng.random() < 0.3 else wire.Reopen(segment=seg))
        else:
            who = ADMIN
            target = rng.choice([F1, F2, S1, S2])
            cmd = (wire.Suspend(participant=target) if rng.random() < 0.3
                   else wire.Reinstate(participant=target))
        send(who, cmd)
        if isinstance(cmd, wire.Bid | wire.Ask):
            sent.append((who, cmd))
    return trades


@pytest.mark.parametrize("seed", range(6))
def test_a_day_of_every_kind_of_command_replays_exactly(seed: int) -> None:
    """Replay of the journal, and a snapshot at any point plus the journal after it,
    give the live engine's trades, command by command, and its state: with retries,
    time jumps, resumes and named ends of day among the orders (the plain session has
    none of them; a reviewer noted it)."""
    m = Market()
    trades = mixed_session(m, 2_500, seed)
    assert len(trades) == len(m.journal)
    live = state_hash(m.engine)
    replayed = Engine(SEGMENTS)
    cut = random.Random(seed).randrange(len(m.journal))
    snapshot_at_cut = None
    for k, entry in enumerate(m.journal):
        if k == cut:
            snapshot_at_cut = dump(capture(replayed))
        assert replayed.apply(entry).trades == trades[k], k
    assert state_hash(replayed) == live
    assert snapshot_at_cut is not None
    resumed = restore(load(snapshot_at_cut))
    for k, entry in enumerate(m.journal[cut:], cut):
        assert resumed.apply(entry).trades == trades[k], k
    assert state_hash(resumed) == live
