"""Book throughput: one Python call per command, and the batch entry point.

Run with `./dev bench`. The reference book is the baseline in the same run; figures
are medians over rounds. In the normal test run (`--benchmark-disable`) each case runs
once and still checks its fill count against the reference, so the benchmark cannot
quietly measure a broken book.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import pytest

import matcher
from matcher import reference
from tests.bench.workload import ASK, BID, Command, packed, preload, workload

N = 100_000
SHAPES = {"thin": (0, 1_000), "deep": (100_000, None)}   # resting at start, cap on resting


def commands(shape: str) -> tuple[Command, ...]:
    resting, cap = SHAPES[shape]
    return workload(N, resting, cap)


def fresh(kind: Callable[..., Any], shape: str) -> Any:
    book = kind(rate_cap_bps=3600)
    resting = SHAPES[shape][0]
    if resting:
        if kind is matcher.Book:
            book.apply(packed(preload(resting)))
        else:
            for _, oid, owner, rate, amount in preload(resting):
                book.bid(oid, owner, rate, amount)
    return book


def run_calls(book: Any, cmds: tuple[Command, ...]) -> int:
    """The loop a Python caller would write: one book call per command."""
    bid, ask, cancel = book.bid, book.ask, book.cancel
    fills = 0
    for op, oid, owner, rate, amount in cmds:
        if op == BID:
            fills += len(bid(oid, owner, rate, amount))
        elif op == ASK:
            if rate < 0:
                fills += len(ask(oid, owner, None, amount))
            else:
                fills += len(ask(oid, owner, rate, amount, tif="gtc"))
        else:
            cancel(oid)
    return fills


@cache
def expected_fills(shape: str) -> int:
    return run_calls(fresh(reference.Book, shape), commands(shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["reference", "core"])
def test_calls(benchmark: Any, impl: str, shape: str) -> None:
    kind = reference.Book if impl == "reference" else matcher.Book
    cmds = commands(shape)
    benchmark.group = f"book-{shape}"
    benchmark.extra_info["commands"] = len(cmds)
    fills = benchmark.pedantic(run_calls, setup=lambda: ((fresh(kind, shape), cmds), {}),
                               rounds=3 if impl == "reference" else 9)
    assert fills == expected_fills(shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_batch(benchmark: Any, shape: str) -> None:
    cmds = commands(shape)
    words = packed(cmds)
    benchmark.group = f"book-{shape}"
    benchmark.extra_info["commands"] = len(cmds)
    out = benchmark.pedantic(lambda book: book.apply(words),
                             setup=lambda: ((fresh(matcher.Book, shape),), {}), rounds=15)
    assert len(out) // 7 == expected_fills(shape)
