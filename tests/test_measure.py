"""The load test's latency tally: cheap to add to, and its figures match exact ones."""

from __future__ import annotations

import json
import math
import random

from loadtest.measure import Recorder, Tally, summary


def exact(values: list[int], p: float) -> int:
    """The smallest value with at least p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * p / 100) - 1)]


def test_percentiles_match_the_exact_ones_within_the_precision() -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(7, 1.2)) + 1 for _ in range(50_000)]
    tally = Tally()
    for v in values:
        tally.add(v)
    assert tally.total == len(values)
    assert len(tally.counts) < 12_000               # bounded, whatever the spread
    for p in (50, 90, 99, 99.9):
        want = exact(values, p)
        assert abs(tally.percentile(p) - want) <= want / 1000 + 1, p
    figures = summary(tally, "x")
    for key, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
        want = exact(values, p)
        assert abs(figures[key] * 1000 - want) <= want / 500 + 1, key


def test_merge_equals_adding_everything_to_one() -> None:
    a, b, both = Tally(), Tally(), Tally()
    for v in range(1, 5000, 7):
        a.add(v)
        both.add(v)
    for v in range(3, 90_000, 13):
        b.add(v)
        both.add(v)
    a.merge(b)
    assert a.counts == both.counts and a.total == both.total
    assert Tally().percentile(99) == 0 and summary(Tally(), "empty")["count"] == 0


def test_a_ramp_step_counts_acks_that_arrived_during_it() -> None:
    """A server that falls behind answers later than the step lasts: those acks do not
    count as achieved in it, whatever their scheduled time."""
    from loadtest.driver import Step
    step = Step(offered=1000, start_ns=0, end_ns=10**9)
    for k in range(1000):                      # 1,000 scheduled in the step's second
        origin = k * 10**6
        arrival = origin + (10**6 if k < 600 else 10**9)   # 400 answered a second late
        step.record(origin, arrival)
    step.record(-5, 10)                        # scheduled before, answered during
    row = step.row(duration_s=1.0, objective_p99_ms=2.0)
    assert row["achieved"] == 601 and not row["ok"]
    assert step.ack.total == 1000
    assert row["p50"] == 1.0 and row["p99"] > 900


def test_a_step_with_a_growing_queue_did_not_keep_up() -> None:
    """Answering 97% of the offered rate looks like keeping up; 2,000 commands still
    waiting at the end (0.13 s of a 15,000/s step) say the queue is growing."""
    from loadtest.driver import Step, sustained_rate
    rows = []
    for offered, acked, backlog in ((5_000, 5_000, 10), (10_000, 9_600, 900),
                                    (15_000, 14_500, 2_000), (20_000, 20_500, 30)):
        step = Step(offered=offered, start_ns=0, end_ns=10**9, acked=acked, backlog=backlog)
        rows.append(step.row(duration_s=1.0, objective_p99_ms=2.0))
    assert [r["kept_up"] for r in rows] == [True, True, False, True]
    assert sustained_rate(rows) == 10_000          # 20,000 worked off what was queued
    assert sustained_rate([]) is None


def test_the_fill_ledger_settles_and_forgets_agreeing_trades() -> None:
    from loadtest.measure import FUNDER, PLATFORM, SME, FillLedger
    ledger = FillLedger(funders={1, 2}, smes={10})
    ledger.seen(PLATFORM, "5-0", 100, 1, 10)
    ledger.seen(SME, "5-0", 100, 1, 10)
    assert ledger.open and not ledger.platform_behind()
    ledger.seen(FUNDER, "5-0", 100, 1, 10)
    ledger.seen(SME, "6-0", 70, 99, 10)          # funder 99 is outside the run
    assert ledger.platform_behind()
    ledger.seen(PLATFORM, "6-0", 70, 99, 10)
    assert ledger.open == {} and ledger.settled == 2 and ledger.problems() == []
    assert ledger.count == [2, 1, 2] and ledger.amount == [170, 100, 170]


def test_the_fill_ledger_names_what_went_wrong() -> None:
    from loadtest.measure import FUNDER, PLATFORM, SME, FillLedger
    ledger = FillLedger(funders={1}, smes={10})
    ledger.seen(SME, "1-0", 100, 1, 10)          # the platform never sees it
    ledger.seen(PLATFORM, "2-0", 50, 1, 10)      # the funder's view says 60
    ledger.seen(FUNDER, "2-0", 60, 1, 10)
    ledger.seen(SME, "2-0", 50, 1, 10)
    ledger.seen(FUNDER, "3-0", 10, 7, 10)        # funder 7's fill reached our funder
    ledger.seen(PLATFORM, "4-0", 10, 1, 10)
    ledger.seen(PLATFORM, "4-0", 10, 1, 10)      # twice on the stream
    for view in (SME, FUNDER, PLATFORM, SME):    # closed, then the SME sees it again
        ledger.seen(view, "5-1", 20, 1, 10)
    assert "5-1" not in ledger.open
    assert ledger.problems() == [
        "fills seen by SMEs: 1 missing, 0 not theirs, 1 twice",
        "fills seen by funders: 2 missing, 1 not theirs, 0 twice",
        "fills seen by the platform: 1 missing, 0 not theirs, 1 twice",
        "1 fills with amounts that differ between views",
    ]


def test_closed_trades_spread_over_the_shards() -> None:
    """A long run closes a million trades; the ledger keeps their ids in a sharded map
    (growing a set of that size copies it whole: 55 ms at 630,000), and the ids, most of
    them `<seq>-0`, must spread over every shard for that to help."""
    from loadtest.measure import FUNDER, PLATFORM, SME, FillLedger
    from matcher.maps import SHARDS
    ledger = FillLedger({1}, {2})
    for seq in range(1, 50_001):
        for view in (SME, FUNDER, PLATFORM):
            ledger.seen(view, f"{seq}-{seq % 3 // 2}", 100, 1, 2)
    sizes = [len(shard) for shard in ledger.closed._shards]
    assert sum(sizes) == ledger.settled == 50_000 and not ledger.open
    assert max(sizes) < 2 * 50_000 / SHARDS


def test_stolen_time_joins_the_timeline_without_adding_seconds() -> None:
    rec = Recorder(start_ns=0)
    rec.record_send(0, 100_000, True)                       # second 0
    rec.record_ack(0, 1_000_000_100, None, True)            # second 1
    rec.stolen_ms.update({0: 20.0, 1: 0.0, 2: 10.0, 3: 10.0})   # sampled past the end
    rows = rec.timeline({0: 1})
    assert [(r["t"], r["stolen_ms"]) for r in rows] == [(0, 20.0), (1, 0.0)]


def test_an_ack_is_counted_in_the_steps_as_if_each_step_saw_it() -> None:
    """`Run.step_ack` looks at the steps that can hold the ack, not all of them: the
    counts are those of offering every ack to every step."""
    from loadtest.driver import Run, Step

    def ramp() -> list[Step]:
        steps = [Step(offered=1000.0 * (k + 1), start_ns=k * 10**9, end_ns=(k + 1) * 10**9)
                 for k in range(4)]
        steps.append(Step(offered=9000.0))          # not reached: no times yet
        return steps

    run = Run.__new__(Run)
    run.steps, every = ramp(), ramp()
    rng = random.Random(7)
    for _ in range(5000):
        origin = rng.randrange(0, 4 * 10**9)
        now = origin + rng.choice((10**5, 10**8, 2 * 10**9))
        run.step_ack(origin, now, True)
        for step in every:
            step.record(origin, now)
    run.step_ack(1, 2, False)                       # not measured: nowhere
    assert [(s.acked, s.ack.total, s.ack.counts) for s in run.steps] == \
        [(s.acked, s.ack.total, s.ack.counts) for s in every]
    assert all(s.ack.total for s in run.steps[:4])


def test_an_answer_to_no_command_fails_the_reconciliation() -> None:
    """A second `accepted` for one command (or one for a command never sent) would take
    the timing of another; it must show, not be dropped."""
    rec = Recorder()
    rec.sent, rec.accepted = 1, 1
    assert rec.reconcile({})["ok"]
    rec.unmatched = 1
    out = rec.reconcile({})
    assert not out["ok"] and "1 answers matched no command sent" in out["problems"]


def test_arrival_times_are_drawn_as_they_are_needed() -> None:
    """A step's schedule made at once held the generator at the step's start (150 ms for
    15 s at 30,000/s): the first time must cost one draw, not the step's."""
    from loadtest.workload import arrivals
    rng, one = random.Random(5), random.Random(5)
    first = next(iter(arrivals(30_000, 0.0, 15.0, rng)))
    assert first == one.expovariate(30_000) and rng.getstate() == one.getstate()
    again = list(arrivals(1_000, 0.0, 2.0, random.Random(6)))
    assert 1_800 < len(again) < 2_200 and again == sorted(again) and again[-1] < 2.0


def test_a_refused_subscribe_of_the_watchers_fails_the_reconciliation() -> None:
    """A watcher whose `subscribe` was refused follows nothing, and the run would have
    measured no fan-out without a word; an `error` that answers nothing sent shows too."""
    from loadtest.driver import FOLLOW, Client, Participant, Run

    run = Run.__new__(Run)
    run.rec = Recorder()
    client = Client(run, Participant(id=7, key="k"), "sme", 0)
    client._on_message(b'{"type":"book","segment":"S"}', 1)
    assert run.rec.reconcile({})["ok"]
    client._on_message(json.dumps({"type": "error", "code": "rate_limited", "message": "m",
                                   "path": None, "ref": FOLLOW}).encode(), 2)
    client._on_message(json.dumps({"type": "error", "code": "invalid", "message": "m",
                                   "path": "$.x"}).encode(), 3)
    out = run.rec.reconcile({})
    assert (out["follows_refused"], out["errors_unmatched"]) == ({"rate_limited": 1},
                                                                  {"invalid": 1})
    assert not out["ok"]
    assert "watchers' subscribes refused: {'rate_limited': 1}" in out["problems"]
    assert "errors answering nothing sent: {'invalid': 1}" in out["problems"]
