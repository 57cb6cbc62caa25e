"""What a run measures and what it reconciles, kept apart from the sockets.

Latencies go into HdrHistograms in microseconds, measured from each message's intended
send time (open loop: a stalled server or a stalled generator shows up as latency, no
coordinated omission). Everything the reconciliation needs is counted from the clients'
own view: what was sent, what was acknowledged, which fills each side saw.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from matcher.maps import ShardedDict

PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0)
EXPECTED_REJECTS = {"not_resting", "unknown_order"}   # a re-quote racing a fill


def histogram() -> HdrHistogram:
    return HdrHistogram(1, 120_000_000, 3)      # 1 us to 2 minutes, 3 digits


class Tally:
    """Latencies in microseconds, counted by value.

    Adding one is a dict update (a tenth of a microsecond) where HdrHistogram's
    `record_value`, written in Python, costs about three on the generator's hot path, for
    every message. Values keep 11 significant bits (0.05%, finer than the histogram's
    three digits), so a tally holds at most a few thousand keys whatever the run's
    length; the HdrHistogram is built when a figure is asked for.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, us: int) -> None:
        shift = us.bit_length() - 11
        if shift > 0:
            us = us >> shift << shift
        self.counts[us] = self.counts.get(us, 0) + 1
        self.total += 1

    def merge(self, other: Tally) -> None:
        for us, n in other.counts.items():
            self.counts[us] = self.counts.get(us, 0) + n
        self.total += other.total

    def percentile(self, p: float) -> int:
        """The smallest value with at least p% of the values at or below it (0 if empty)."""
        rank = p / 100 * self.total
        seen = 0
        for us in sorted(self.counts):
            seen += self.counts[us]
            if seen >= rank:
                return us
        return 0

    def histogram(self) -> HdrHistogram:
        h = histogram()
        for us, n in self.counts.items():
            h.record_value(max(1, min(us, 120_000_000)), n)
        return h


def summary(tally: Tally, label: str) -> dict[str, Any]:
    """The percentiles in milliseconds."""
    h = tally.histogram()

    def ms(p: float) -> float:
        return h.get_value_at_percentile(p) / 1000 if h.get_total_count() else 0.0
    return {"label": label, "count": h.get_total_count(), "p50": ms(50), "p90": ms(90),
            "p99": ms(99), "p999": ms(99.9), "max": h.get_max_value() / 1000,
            "mean": h.get_mean_value() / 1000 if h.get_total_count() else 0.0,
            "distribution": [[p, ms(p)] for p in PERCENTILES]}


@dataclass
class Second:
    """One second of the measured run."""

    offered: int = 0
    sent: int = 0
    acked: int = 0
    fills: int = 0
    ack: Tally = field(default_factory=Tally)


SME, FUNDER, PLATFORM = 0, 1, 2
VIEWS = ("SMEs", "funders", "the platform")


def _key(trade_id: str) -> int:
    """A trade id `<seq>-<n>` as one int (a fifth of the memory of the string in a set),
    the sequence number in the low bits, which pick its shard in `FillLedger.closed`."""
    seq, _, n = trade_id.partition("-")
    return int(n) << 48 | int(seq)


class FillLedger:
    """Every fill as the three views report it (the SME, the funder, the platform's
    stream), compared as the reports arrive.

    Once every view that should see a trade has reported it, the amounts are compared
    and the trade is closed: of a closed trade only its id is kept, as one integer, to
    catch a report that comes again later. (Three dicts of every trade id and amount
    reached 1.3 GB in a 30,000/s ramp.) A client view should see a trade when its party
    is one of the run's participants: resting bids of funders outside the run (a demo's
    opening bids) can fill this run's asks.
    """

    def __init__(self, funders: set[int], smes: set[int]) -> None:
        self.funders, self.smes = funders, smes
        self.open: dict[str, list[int | None]] = {}   # trade id -> amount per view
        # Closed trades by `_key`: a million in a long run, sharded so that growing it
        # never copies it whole (a pause the generator would count as latency).
        self.closed: ShardedDict[int, None] = ShardedDict()
        self.count = [0, 0, 0]                        # reports per view
        self.amount = [0, 0, 0]
        self.settled = 0
        self.extra = [0, 0, 0]       # a client view saw a trade that is not its party's
        self.duplicate = [0, 0, 0]
        self.differ = 0              # views that disagree on an amount

    def seen(self, view: int, trade_id: str, amount: int, funder: int, sme: int) -> None:
        self.count[view] += 1
        self.amount[view] += amount
        if (view == SME and sme not in self.smes) or (
                view == FUNDER and funder not in self.funders):
            self.extra[view] += 1
            return
        views = self.open.get(trade_id)
        if views is None:
            if _key(trade_id) in self.closed:       # every view already had it
                self.duplicate[view] += 1
                return
            views = self.open[trade_id] = [None, None, None]
            if sme not in self.smes:
                views[SME] = -1          # -1: this view is not expected to see it
            if funder not in self.funders:
                views[FUNDER] = -1
        if views[view] is not None:
            self.duplicate[view] += 1
            return
        views[view] = amount
        if None in views:
            return
        del self.open[trade_id]
        self.closed[_key(trade_id)] = None
        if len({a for a in views if a != -1}) > 1:
            self.differ += 1
        else:
            self.settled += 1

    def platform_behind(self) -> bool:
        """Some trade a client saw is not on the platform's stream yet."""
        return any(views[PLATFORM] is None for views in self.open.values())

    def problems(self) -> list[str]:
        out = []
        missing = [0, 0, 0]
        for views in self.open.values():
            for view, amount in enumerate(views):
                if amount is None:
                    missing[view] += 1
        for view, name in enumerate(VIEWS):
            if missing[view] or self.extra[view] or self.duplicate[view]:
                out.append(f"fills seen by {name}: {missing[view]} missing, "
                           f"{self.extra[view]} not theirs, {self.duplicate[view]} twice")
        if self.differ:
            out.append(f"{self.differ} fills with amounts that differ between views")
        return out


@dataclass
class Recorder:
    start_ns: int = 0                           # the measured phase begins
    ack_handled: Tally = field(default_factory=Tally)
    ask_fill: Tally = field(default_factory=Tally)
    platform: Tally = field(default_factory=Tally)
    fills_page: Tally = field(default_factory=Tally)   # a `fills` request sent -> its page
    sign_in: Tally = field(default_factory=Tally)      # an SME back: connect -> welcome
    lag: Tally = field(default_factory=Tally)
    seconds: dict[int, Second] = field(default_factory=lambda: defaultdict(Second))
    # CPU time the hypervisor took from this machine (all CPUs), by second of the run;
    # kept apart so that sampling it adds no second to the timeline.
    stolen_ms: dict[int, float] = field(default_factory=dict)
    sent: int = 0
    accepted: int = 0
    unmatched: int = 0                          # answers to no command sent (duplicates)
    reads_sent: int = 0
    reads_answered: int = 0                     # pages received
    reads_refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    reconnects: int = 0                         # SMEs that left and signed in again
    books: int = 0                              # book updates the watchers received
    follows_refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors_unmatched: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    reconnects_failed: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    fills: FillLedger = field(default_factory=lambda: FillLedger(set(), set()))
    lent: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))

    def second(self, t_ns: int) -> Second:
        return self.seconds[max(0, (t_ns - self.start_ns) // 1_000_000_000)]

    def record_send(self, intended_ns: int, now_ns: int, measured: bool) -> None:
        self.sent += 1
        if measured:
            self.lag.add(max(1, (now_ns - intended_ns) // 1000))
            self.second(now_ns).sent += 1

    def record_ack(self, intended_ns: int, now_ns: int, code: str | None,
                   measured: bool) -> None:
        if code is None:
            self.accepted += 1
        else:
            self.rejected[code] += 1
        if measured:
            sec = self.second(now_ns)
            sec.acked += 1
            sec.ack.add(max(1, (now_ns - intended_ns) // 1000))

    @property
    def ack(self) -> Tally:
        """Every measured acknowledgement (the seconds' tallies together)."""
        whole = Tally()
        for sec in self.seconds.values():
            whole.merge(sec.ack)
        return whole

    def reconcile(self, lines: dict[tuple[int, str], int]) -> dict[str, Any]:
        """Acks = sends; the three views of the fills agree to the fen; no line exceeded."""
        problems = []
        acks = self.accepted + sum(self.rejected.values())
        if acks != self.sent:
            problems.append(f"{self.sent} commands sent but {acks} acknowledged")
        if self.unmatched:       # a second answer to one command, or one to none
            problems.append(f"{self.unmatched} answers matched no command sent")
        problems += self.fills.problems()
        over = [f"funder {f} lent {amount} against {core}, line {lines[(f, core)]}"
                for (f, core), amount in sorted(self.lent.items())
                if amount > lines.get((f, core), 0)]
        problems += over
        unexpected = {c: n for c, n in self.rejected.items() if c not in EXPECTED_REJECTS}
        if unexpected:
            problems.append(f"unexpected rejections: {unexpected}")
        answered = self.reads_answered + sum(self.reads_refused.values())
        if answered != self.reads_sent:
            problems.append(f"{self.reads_sent} fills requests sent but {answered} answered")
        refused = {c: n for c, n in self.reads_refused.items() if c != "busy"}
        if refused:      # busy: the same SME asked again before its page came
            problems.append(f"fills requests refused: {refused}")
        if self.follows_refused:     # a watcher that follows nothing measures nothing
            problems.append(f"watchers' subscribes refused: {dict(self.follows_refused)}")
        if self.errors_unmatched:        # an `error` that answers nothing sent
            problems.append(f"errors answering nothing sent: {dict(self.errors_unmatched)}")
        problems += [f"an SME could not sign in again: {why}"
                     for why in self.reconnects_failed]
        return {
            "ok": not problems, "problems": problems, "commands_sent": self.sent,
            "acks": acks, "accepted": self.accepted, "rejected": dict(self.rejected),
            "unmatched": self.unmatched,
            "fills_sme": self.fills.count[SME], "fills_funder": self.fills.count[FUNDER],
            "fills_platform": self.fills.count[PLATFORM],
            "amount_sme": self.fills.amount[SME], "amount_funder": self.fills.amount[FUNDER],
            "amount_platform": self.fills.amount[PLATFORM], "over_line": over,
            "reads_sent": self.reads_sent, "reads_answered": self.reads_answered,
            "reads_refused": dict(self.reads_refused), "reconnects": self.reconnects,
            "follows_refused": dict(self.follows_refused),
            "errors_unmatched": dict(self.errors_unmatched),
        }

    def timeline(self, offered: dict[int, int]) -> list[dict[str, Any]]:
        last = max([*self.seconds, *offered], default=-1)
        rows = []
        for t in range(last + 1):
            s = self.seconds.get(t, Second())
            rows.append({"t": t, "offered": offered.get(t, 0), "sent": s.sent,
                         "acked": s.acked, "fills": s.fills,
                         "p99": s.ack.percentile(99) / 1000 if s.ack.total else 0.0,
                         "stolen_ms": round(self.stolen_ms.get(t, 0.0), 1)})
        return rows
