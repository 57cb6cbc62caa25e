"""The platform's reader of the fill stream `matcher:{<shard>}:fills`: each trade to a callback.
Design: a Redis consumer group, XACK only after the callback returns, so a crashed
consumer's unfinished entries are redelivered (its own pending at start, a dead one's by
XAUTOCLAIM): at least once. Duplicates are dropped by trade_id, the stream id; the
platform's own store must key by trade_id too, as a redelivery can follow a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import logging
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from matcher.protocol import Trade
from service import resp
from service.journal import Keys, decode_trade

log = logging.getLogger("matcher.platform")

Handler = Callable[[Trade], Awaitable[None] | None]
"""Called once per trade, in stream order; may be async. Raising stops the consumer and
leaves the trade unacknowledged, so it is delivered again on the next start."""

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


class _HandlerFailed(Exception):
    """The handler's own error, carried past the retries of Redis's: a handler whose
    database refused a connection raises an `OSError` too, and was retried as a fill
    stream outage, forever (found in an audit)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
Entry = tuple[bytes | str, dict[bytes, bytes] | None]


def describe(trade: Trade) -> str:
    """One line per loan, as the console prints it."""
    yuan, fen = divmod(trade.amount, 100)
    return (f"{trade.trade_id}  {trade.segment}  funder {trade.funder} lends SME {trade.sme} "
            f"{yuan:,}.{fen:02d} CNY at {trade.rate_bps / 100:.2f}% for {trade.tenor_days} "
            f"days  (bid {trade.bid_client_id}, ask {trade.ask_client_id})")


class FillConsumer:
    """One member of a consumer group on one shard's fill stream."""

    def __init__(self, client: aioredis.Redis, handler: Handler, keys: Keys | None = None,
                 *, group: str = "platform", consumer: str = "c1", block_ms: int = 1000,
                 count: int = 100, claim_idle_ms: int = 60_000, remember: int = 100_000,
                 max_retry_delay: float = 5.0) -> None:
        self.client = client
        self.handler = handler
        self.keys = keys or Keys()
        self.group = group
        self.consumer = consumer
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms       # a consumer silent this long is dead
        self.max_retry_delay = max_retry_delay
        self.handled = 0                          # trades given to the handler
        self.duplicates = 0                       # deliveries dropped by trade_id
        self.vanished = 0                         # pending entries found trimmed away
        self._remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()   # recent trade ids, bounded
        self._grouped = False                     # the group is known to exist

    @property
    def stream(self) -> str:
        return self.keys.fills

    async def ensure_group(self) -> None:
        """Create the group at the start of the stream (and the stream) if missing: once
        per consumer, and again only after NOGROUP (a Redis over `maxmemory` refuses the
        create, a write, where reading and acknowledging go on; found in review)."""
        if self._grouped:
            return
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc) and not (resp.not_now(exc)
                                                    and await self._group_exists()):
                raise
        self._grouped = True

    async def _group_exists(self) -> bool:
        try:
            groups: Any = await self.client.xinfo_groups(self.stream)
        except ResponseError:                                  # no such stream
            return False
        return any(g["name"] in (self.group, self.group.encode()) for g in groups)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until `stop` is set; survive Redis restarts; a handler error stops it."""
        delay = 0.1
        failed: Exception | None = None
        while failed is None and (stop is None or not stop.is_set()):
            try:
                await self.ensure_group()
                await self.recover()
                delay = 0.1                      # Redis answers: a later outage starts afresh
                claimed = time.monotonic()
                while stop is None or not stop.is_set():
                    # Take over what a dead consumer left (or a read whose reply was
                    # lost left in our own list) when quiet, and at least every half
                    # `claim_idle_ms`: a busy market never has a quiet poll.
                    if (not await self.poll()
                            or time.monotonic() - claimed >= self.claim_idle_ms / 2000):
                        await self.claim_idle()
                        claimed = time.monotonic()
            except _HandlerFailed as handler:
                failed = handler.error
            except (*_TRANSIENT, ResponseError) as exc:
                # Redis away; or a failover (the blocking read cut short, a replica's
                # refusal), or a Redis that says "later" (OOM, NOREPLICAS, BUSY, ...),
                # which the journal waits out too, and the consumer stopped on (found in
                # review); or the group gone.
                if isinstance(exc, ResponseError) and not (resp.wrong_node(exc)
                                                           or resp.not_now(exc)):
                    if "NOGROUP" not in str(exc):
                        raise
                    self._grouped = False
                    log.warning("consumer group %r is gone (Redis lost data?); recreating "
                                "it: trades are delivered again and dropped by trade_id",
                                self.group)
                    continue
                log.warning("fill stream unavailable (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, delay)
                if resp.wrong_node(exc):
                    await resp.reconnect_idle(self.client)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)
        if failed is not None:
            raise failed          # as the handler raised it, its own cause and traceback

    async def recover(self) -> int:
        """Deliver again what this consumer read and did not acknowledge, then claim what
        dead consumers left. Returns how many entries were delivered."""
        delivered = 0
        after: bytes | str = "0"
        while True:
            entries = await self._read(after, block=None)
            if not entries:
                break
            for entry in entries:
                await self._deliver(entry)
            delivered += len(entries)
            after = entries[-1][0]
        return delivered + await self.claim_idle()

    async def claim_idle(self) -> int:
        """XAUTOCLAIM entries pending longer than `claim_idle_ms`: another consumer's,
        dead, or our own that a lost reply left undelivered."""
        delivered = 0
        cursor: bytes | str = "0-0"
        while True:
            reply: Any = await self.client.xautoclaim(
                self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms,
                start_id=cursor, count=self.count)
            cursor, claimed = reply[0], reply[1]
            for entry in claimed:
                await self._deliver(entry)
            delivered += len(claimed)
            if cursor in (b"0-0", "0-0"):
                return delivered

    async def poll(self) -> int:
        """Wait up to `block_ms` for new entries and deliver them; how many there were."""
        entries = await self._read(">", block=self.block_ms)
        for entry in entries:
            await self._deliver(entry)
        return len(entries)

    async def _read(self, after: bytes | str, block: int | None) -> list[Entry]:
        reply: Any = await self.client.xreadgroup(self.group, self.consumer,
                                                  {self.stream: after}, count=self.count,
                                                  block=block)
        return list(reply[0][1]) if reply else []       # RESP2: [[stream, entries]]

    async def _deliver(self, entry: Entry) -> None:
        entry_id, fields = entry
        trade_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if not fields:                                   # trimmed away while pending
            self.vanished += 1
            log.warning("fill %s left the stream before it was handled (fill retention "
                        "trimmed it, or it was deleted by hand); acknowledged", trade_id)
        elif trade_id in self._seen:
            self.duplicates += 1
        else:
            trade = decode_trade(fields)
            if trade.trade_id != trade_id:               # nothing else writes this stream
                raise ValueError(f"the fill stream's entry {trade_id} holds trade "
                                 f"{trade.trade_id}: written by something else")
            try:
                result = self.handler(trade)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                raise _HandlerFailed(exc) from exc
            self._seen[trade_id] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
            self.handled += 1
        await self.client.xack(self.stream, self.group, trade_id)


async def _main(args: argparse.Namespace) -> int:
    client = aioredis.Redis.from_url(args.redis_url, socket_connect_timeout=2,
                                     socket_timeout=args.block_ms / 1000 + 5)
    consumer = FillConsumer(client, lambda trade: print(describe(trade), flush=True),
                            Keys(args.shard), group=args.group, consumer=args.consumer,
                            block_ms=args.block_ms)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await consumer.run(stop)
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.platform",
                                     description="Print the loans of the fill stream, one "
                                                 "line each, as a consumer group member.")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--shard", default="main")
    parser.add_argument("--group", default="platform")
    parser.add_argument("--consumer", default="c1")
    parser.add_argument("--block-ms", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
