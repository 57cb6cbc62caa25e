"""Prometheus metrics of one gateway: plain numbers on the hot path, exported on scrape.

prometheus-client's own metric objects take a lock on every increment, which cost the
gateway a third of its CPU at 40,000 commands/s. The gateway is single-threaded, so here
every metric is a plain int or float updated in place, and a custom collector turns them
into Prometheus metric families only when `/metrics` is read. Each gateway has a registry
of its own (tests run several).

The process's own figures (memory, CPU, open files) are in a second registry, which the
gateway collects in a worker thread (`exposition`): counting the open files lists
/proc/self/fd, one entry per connection, and with 6,400 connections that took 7.3 ms, a
stall of the event loop at every scrape. In a thread the listing's system calls run
without the GIL and the loop goes on (measured: its longest pause 0.6 ms).

What is left on the loop is still a few milliseconds with thousands of connections, and
`/metrics` takes no key: scrapes closer together than `max_age` (`[server]
metrics_cache_ms`) share one text, so however often it is asked for, the loop makes at
most one in that time.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import get_args

import msgspec
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from matcher.protocol import Role

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Histogram:
    """Counts per bucket, a sum and a count; `observe` is a bisect and two additions."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)      # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.sum)


class Metrics:
    def __init__(self, max_age: float = 0.0) -> None:
        # By command type, named on scrape (a name made per command is a new string).
        self.commands: defaultdict[type[msgspec.Struct], int] = defaultdict(int)
        self.rejects: defaultdict[str, int] = defaultdict(int)      # by code
        self.connections: defaultdict[str, int] = defaultdict(int)  # by role
        # Series that alerts compare with zero exist from the start: a series that
        # appears only once it is above zero cannot say "none" (no funder connected).
        for role in get_args(Role):
            self.connections[role] = 0
        self.rejects["unavailable"] = 0
        self.fills = 0
        self.filled_fen = 0
        self.quotes = 0
        self.fill_pages = 0
        self.fill_page_failures = 0
        self.dropped = 0
        self.seq = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.loop_lag = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.journal_write = Histogram(LATENCY_BUCKETS)
        self._read: dict[str, tuple[str, Callable[[], float], bool]] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.process = CollectorRegistry()    # memory, CPU and files, for soak runs
        ProcessCollector(registry=self.process)
        self.max_age = max_age
        self._text: asyncio.Future[bytes] | None = None     # the latest, or being made
        self._made = 0.0

    async def exposition(self) -> bytes:
        """The text `/metrics` serves; the one made for another scrape less than
        `max_age` ago, or being made now, if there is one (see above)."""
        now = time.monotonic()
        text = self._text
        if (text is None or now - self._made >= self.max_age
                or (text.done() and (text.cancelled() or text.exception() is not None))):
            self._made = now
            text = self._text = asyncio.ensure_future(self._expose())
            # Its error is read here if every scrape waiting for it gave up: not logged
            # as never retrieved (the next scrape makes a new text).
            text.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(text)    # a scrape that gives up stops no other

    async def _expose(self) -> bytes:
        """The gateway's metrics, read on the event loop (they are its state), then the
        process's, read in a worker thread (see above)."""
        own = generate_latest(self.registry)
        return own + await asyncio.to_thread(generate_latest, self.process)

    def command(self, kind: type) -> None:
        self.commands[kind] += 1

    def read_on_scrape(self, name: str, doc: str, read: Callable[[], float], *,
                       counter: bool = False) -> None:
        """A value read when scraped: for state that changes when nothing is counted, such
        as a journal that has stopped writing (its backlog grows with no batch to say so)."""
        self._read[name] = (doc, read, counter)

    def journal_batch(self, commands: int, seconds: float | None) -> None:
        self.batch_size.observe(commands)
        if seconds is not None:         # None: written again after a failure
            self.journal_write.observe(seconds)

    def reject(self, code: str) -> None:
        self.rejects[code] += 1

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus-client on each scrape."""
        def labelled(family: CounterMetricFamily | GaugeMetricFamily,
                     values: dict[str, int]) -> CounterMetricFamily | GaugeMetricFamily:
            for label, value in sorted(values.items()):
                family.add_metric([label], value)
            return family

        yield labelled(CounterMetricFamily("matcher_commands", "Commands accepted, by type",
                                           labels=["type"]),
                       # the message's `type`, as protocol.md names it
                       {str(kind.__struct_config__.tag): n
                        for kind, n in self.commands.items()})
        yield labelled(CounterMetricFamily("matcher_rejects",
                                           "Commands and messages refused, by code",
                                           labels=["code"]), self.rejects)
        yield CounterMetricFamily("matcher_fills", "Fills (loans made)", value=self.fills)
        yield CounterMetricFamily("matcher_filled_fen", "Amount lent, in fen",
                                  value=self.filled_fen)
        yield CounterMetricFamily("matcher_quotes", "Quotes answered", value=self.quotes)
        yield CounterMetricFamily("matcher_fill_pages", "Pages of own fills read back",
                                  value=self.fill_pages)
        yield CounterMetricFamily("matcher_fill_page_failures",
                                  "Pages of own fills that Redis could not read",
                                  value=self.fill_page_failures)
        yield CounterMetricFamily("matcher_slow_consumers_dropped",
                                  "Connections closed because they could not keep up",
                                  value=self.dropped)
        yield labelled(GaugeMetricFamily("matcher_connections",
                                         "Open WebSocket connections, by role",
                                         labels=["role"]), self.connections)
        yield GaugeMetricFamily("matcher_sequence", "Last sequence number applied",
                                value=self.seq)
        for name, (doc, read, counter) in self._read.items():
            yield (CounterMetricFamily(name, doc, value=read()) if counter
                   else GaugeMetricFamily(name, doc, value=read()))
        yield self.latency.family("matcher_command_latency_seconds",
                                  "From receiving a command to releasing its replies "
                                  "(journal write included)")
        yield self.loop_lag.family("matcher_event_loop_lag_seconds",
                                   "How late the event loop ran a 10 ms timer: about how "
                                   "long a message that arrives waits before it is read "
                                   "(below 1 ms: the timers' granularity)")
        yield self.batch_size.family("matcher_journal_batch_commands",
                                     "Commands per journal write (group commit)")
        yield self.journal_write.family("matcher_journal_write_seconds",
                                        "From sending a journal write to Redis's answer "
                                        "(Redis, its fsync, and the wait to read the answer)")
