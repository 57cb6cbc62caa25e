"""What the simulated market sends: funders quoting and re-quoting DAY bids, SMEs asking.

Arrival times are a seeded Poisson process fixed before the run (open loop: they do not
wait for the server). The content of a funder's re-quote is decided at send time from
the bids it believes live (it learns of fills and ends from its own events), so a funder
behaves like a bank moving its quotes, not like a replay.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: Median rates (bps) by tenor, inside the 2.2% to 3% band of the real platform.
MID_BY_TENOR = {30: 232, 90: 248, 180: 262}
ASK_MU = math.log(1.5e8) - 0.18        # log-normal, mean about 1.5 million CNY (in fen)
ASK_SIGMA = 0.6


@dataclass
class Segment:
    id: str
    core: str
    tenor_days: int

    @property
    def mid(self) -> int:
        return MID_BY_TENOR.get(self.tenor_days, 250)


@dataclass
class FunderState:
    index: int
    live: dict[str, tuple[str, int]] = field(default_factory=dict)   # client id -> (segment, rate)
    next_id: int = 0

    def new_id(self, run: str) -> str:
        self.next_id += 1
        return f"{run}-f{self.index}-{self.next_id}"


def arrivals(rate: float, start: float, end: float, rng: random.Random) -> Iterator[float]:
    """Poisson arrival times (seconds) in [start, end) at `rate` per second, each made
    when it is asked for: a 15 s step at 30,000/s built at once held the generator for
    150 ms at the step's start, and its first commands went out late."""
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return
        yield t


class Market:
    """Decides each message's content. Seeded, so a run can be repeated."""

    def __init__(self, segments: list[Segment], funders: int, smes: int, seed: int,
                 bids_per_funder: int, run_id: str) -> None:
        self.segments = segments
        self.rng = random.Random(seed)
        self.funders = [FunderState(i) for i in range(funders)]
        self.smes = smes
        self.bids_per_funder = bids_per_funder
        self.run_id = run_id
        self._ask_no = 0

    def bid(self, f: FunderState) -> dict[str, Any]:
        seg = self.rng.choice(self.segments)
        rate = seg.mid + self.rng.randrange(-12, 16)
        cid = f.new_id(self.run_id)
        f.live[cid] = (seg.id, rate)
        return {"type": "bid", "client_id": cid, "segment": seg.id, "rate_bps": rate,
                "amount": self.rng.randrange(100, 500) * 1_000_000, "tif": "day"}

    def requote(self, f: FunderState) -> dict[str, Any]:
        """A bank moves its quotes: a new bid, a rate change, or cancel (to replace)."""
        roll = self.rng.random()
        if len(f.live) < self.bids_per_funder and (roll < 0.6 or not f.live):
            return self.bid(f)
        cid = self.rng.choice(list(f.live))
        segment, rate = f.live[cid]
        if roll < 0.8:
            new_rate = max(1, rate + self.rng.choice((-3, -2, -1, 1, 2, 3)))
            f.live[cid] = (segment, new_rate)
            return {"type": "amend", "client_id": cid, "rate_bps": new_rate}
        del f.live[cid]
        return {"type": "cancel", "client_id": cid}

    def ask(self) -> tuple[int, dict[str, Any]]:
        """(SME index, message): sizes log-normal, some single-funder, most IOC."""
        self._ask_no += 1
        seg = self.rng.choice(self.segments)
        msg: dict[str, Any] = {
            "type": "ask", "client_id": f"{self.run_id}-a{self._ask_no}", "segment": seg.id,
            "amount": max(1, int(self.rng.lognormvariate(ASK_MU, ASK_SIGMA)))}
        if self.rng.random() < 0.3:
            msg["max_rate_bps"] = seg.mid + 12
        if self.rng.random() < 0.1:
            msg["single_funder"] = True
        roll = self.rng.random()
        if roll < 0.05:
            msg["tif"] = "fok"
        elif roll < 0.1:
            msg["tif"] = "day"
        return self.rng.randrange(self.smes), msg
