"""Values the books hand out, and the errors they raise.

Both books (the Cython one and the pure-Python reference) return these very types, so
their results compare with ``==``. They are plain named tuples: cheap to build from
Cython, immutable, and easy to put in a snapshot.
"""

from __future__ import annotations

from array import array
from typing import Literal, NamedTuple

#: The largest amount (fen) one order may carry: 10 billion CNY. Bounding it keeps every
#: sum a book can form (level totals, demand) far inside int64, so nothing overflows.
MAX_AMOUNT = 10**12
#: The most orders one book may rest for every sum it forms (a level's total, the
#: demand) to stay inside int64 at `MAX_AMOUNT` each: 9,223,372. The books do not check
#: it on the hot path; the gateway refuses a new resting order past its
#: `resting_orders_per_segment`, which may not exceed this (ADR 4, addendum).
MAX_RESTING = (2**63 - 1) // MAX_AMOUNT
#: Ids and owners are non-negative int64.
MAX_ID = 2**63 - 1
#: The highest sequence number: the journal's scripts compare stream ids as Lua numbers,
#: doubles, exact only up to 2**53 (a `skip` is the only way to come near it).
MAX_SEQ = 2**53 - 1
#: The highest `rate_cap_bps` a book takes (bps; the service's segments stop at 10,000).
MAX_BOOK_RATE_CAP = 1_000_000
#: The largest credit line (fen) a funder may set against one core enterprise.
MAX_LINE = 10**15
#: The largest cumulative repayment (fen) reported for one funder against one core
#: enterprise: a thousand times the largest line, far inside int64 (ADR 24).
MAX_REPAID = 10**18

Side = Literal["bid", "ask"]
Tif = Literal["gtc", "day", "ioc", "fok"]
TIFS: tuple[Tif, ...] = ("gtc", "day", "ioc", "fok")


class Fill(NamedTuple):
    """One loan: ``funder`` lends ``amount`` fen to ``sme`` at the bid's rate."""

    bid_id: int
    ask_id: int
    funder: int
    sme: int
    rate_bps: int
    amount: int


class Quote(NamedTuple):
    """What an IOC market ask of some amount would get right now."""

    fillable: int
    avg_rate_bps: float
    worst_rate_bps: int
    funders: int


class Order(NamedTuple):
    """A resting order as the book holds it. ``rate_bps`` is the max rate of an ask."""

    order_id: int
    side: Side
    owner: int
    rate_bps: int
    remaining: int
    min_ticket: int
    tif: Tif
    single_funder: bool


class OrderError(ValueError):
    """A command the book refused; nothing changed. ``field`` names the culprit."""

    def __init__(self, field: str, reason: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = reason


class BatchError(ValueError):
    """Command ``index`` of a batch failed; the commands before it stay applied.

    ``fills`` holds the packed fills of those earlier commands, which did happen.
    """

    def __init__(self, index: int, cause: Exception, fills: array[int]) -> None:
        super().__init__(f"command {index}: {cause}")
        self.index = index
        self.cause = cause
        self.fills = fills
