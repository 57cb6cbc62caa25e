"""Prometheus metrics of one gateway, in a registry of its own (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.commands = Counter("matcher_commands", "Commands accepted, by type", ["type"],
                                registry=r)
        self.rejects = Counter("matcher_rejects", "Commands and messages refused, by code",
                               ["code"], registry=r)
        self.fills = Counter("matcher_fills", "Fills (loans made)", registry=r)
        self.filled_fen = Counter("matcher_filled_fen", "Amount lent, in fen", registry=r)
        self.quotes = Counter("matcher_quotes", "Quotes answered", registry=r)
        self.batch_size = Histogram("matcher_journal_batch_commands",
                                    "Commands per journal write (group commit)",
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
                                    registry=r)
        self.latency = Histogram("matcher_command_latency_seconds",
                                 "From receiving a command to releasing its replies "
                                 "(journal write included)", buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.connections = Gauge("matcher_connections", "Open WebSocket connections, by role",
                                 ["role"], registry=r)
        self.dropped = Counter("matcher_slow_consumers_dropped",
                               "Connections closed because they could not keep up", registry=r)
        self.seq = Gauge("matcher_sequence", "Last sequence number applied", registry=r)
        self.journal_backlog = Gauge("matcher_journal_backlog",
                                     "Commands applied but not yet written", registry=r)
