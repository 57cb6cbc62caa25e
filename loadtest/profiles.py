"""The load profiles: what a run offers the server, and for how long.

A profile is a set of defaults; every field can be overridden from the command line.
Rates are commands per second offered open loop, whatever the server does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    rate: float = 5_000.0               # commands/s offered (the first step of a ramp)
    duration_s: float = 60.0            # per step for a ramp
    warmup_s: float = 2.0               # offered but not measured
    ramp: tuple[float, ...] = ()        # offered rates, step by step
    funders: int = 67
    smes: int = 6_300
    ask_share: float = 0.3              # of commands: SME asks; the rest are funders' quotes
    reads: float = 0.0                  # SMEs' `fills` requests/s, besides the commands
    reconnects: float = 0.0             # SMEs leaving and signing in again, per second
    watchers: int = 0                   # SMEs following every segment's book, as boards do
    bids_per_funder: int = 12           # resting bids a funder keeps (it re-quotes them)
    credit_line: int = 2 * 10**12       # fen per funder and core enterprise
    objective_p99_ms: float = 2.0       # send -> accepted, for the ramp's capacity
    max_lag_p99_ms: float = 50.0        # the generator fails the run beyond this
    seed: int = 2026
    extra: dict[str, Any] = field(default_factory=dict)

    def steps(self) -> tuple[float, ...]:
        return self.ramp or (self.rate,)

    def with_(self, **changes: Any) -> Profile:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PROFILES: dict[str, Profile] = {
    # Seconds, for CI: proves the whole chain and the reconciliation, not the speed.
    "smoke": Profile("smoke", rate=300, duration_s=4, warmup_s=0.5, funders=6, smes=20,
                     bids_per_funder=6, reads=20, reconnects=5, watchers=5),
    # The morning rush: all funders quoting, SMEs asking, at one rate.
    "same-day": Profile("same-day", rate=5_000, duration_s=60),
    # Raise the rate step by step; the capacity is the highest step within the objective.
    "ramp": Profile("ramp", duration_s=15, ramp=(1_000, 2_500, 5_000, 7_500, 10_000, 12_500,
                                                 15_000, 17_500, 20_000, 25_000, 30_000)),
    # A long run at a moderate rate: memory and latency drift, also over SMEs coming and
    # going (a reference cycle left per connection grew the server 11 KB each, ADR 10).
    "soak": Profile("soak", rate=3_000, duration_s=1_800, reconnects=20),
}
