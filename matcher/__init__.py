"""The matching engine's core: order books per segment, and the values they return.

`Book` is the compiled book. There is deliberately no fallback to the pure-Python twin
(`matcher.reference`): a missing build must fail here, loudly, not run 20x slower.
"""

try:
    from matcher._core import Book, CreditLines, walked
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "matcher._core is not built: run `pip install -e .` (needs Cython and a C compiler)"
    ) from exc

from matcher.types import MAX_AMOUNT, BatchError, Fill, Order, OrderError, Quote

__all__ = [
    "MAX_AMOUNT",
    "BatchError",
    "Book",
    "CreditLines",
    "Fill",
    "Order",
    "OrderError",
    "Quote",
    "walked",
]
