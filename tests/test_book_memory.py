"""Memory: a million resting orders fit in 200 MB; an empty book costs at most 4 KB.

Each measurement runs in a fresh interpreter and reads the resident set size from
/proc, so what other tests allocated does not count.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

RSS = """
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
"""


def measure(body: str) -> int:
    code = RSS + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    return int(out.stdout.strip().splitlines()[-1])


def test_a_million_resting_orders_stay_within_200_mb() -> None:
    growth = measure("""
        from array import array
        import matcher
        book = matcher.Book(rate_cap_bps=3600)
        chunk = 100_000
        book.apply(array("q", [1, 0, 0, 300, 1, 0, 0, 0]))   # warm up the scratch buffers
        book.cancel(0)
        base = rss()
        for c in range(10):
            words = array("q")
            for i in range(c * chunk + 1, (c + 1) * chunk + 1):
                words.extend((1, i, i % 67, 220 + i % 80, 150_000_000, 0, 0, 0))
            book.apply(words)
            del words
        assert len(book) == 1_000_000, len(book)
        print(rss() - base)
    """)
    assert growth <= 200 * 2**20, f"{growth / 2**20:.0f} MB"


def test_an_empty_book_costs_at_most_4_kb() -> None:
    per_book = measure("""
        import matcher
        warm = [matcher.Book() for _ in range(1000)]
        base = rss()
        books = [matcher.Book() for _ in range(100_000)]
        print((rss() - base) // len(books))
    """)
    assert per_book <= 4096, f"{per_book} bytes per empty book"
