"""`matcher serve`: recover, open the market, serve WebSocket and HTTP, stop cleanly.

Start: connect to Redis (or start a local one), recover the engine from the newest
snapshot and the journal, journal whatever the configuration adds (segments, demo
credit lines), start the snapshotter, then listen; `/health` says ready only from then
on. SIGTERM: stop taking commands, let in-flight journal writes finish, write a
snapshot, close connections with 1001, exit 0.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import logging
import math
import os
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import redis.asyncio as aioredis
from aiohttp import WSMsgType, hdrs, web, web_urldispatcher
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import MatchInfoError
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from matcher import protocol as wire
from matcher.engine import Segment
from matcher.participants import Directory, Participant
from service import demo_market, forwarded, gctune, resp
from service.archive import JournalArchive
from service.config import DEMO_FUNDER_BASE, DEMO_SME_BASE, Config, demo_key
from service.gateway import (
    CLOSE_GOING_AWAY,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    DECODE_ERRORS,
    Budgets,
    Gateway,
    bearer_key,
    decode_error,
    fills_refused,
    system,
)
from service.inbox import WebSocket, forget_traceback
from service.journal import Journal, Keys, check_streams_follow, journal_start
from service.lease import Lease, ShardTaken, new_token
from service.localredis import LocalRedis
from service.metrics import Metrics
from service.realtime import make_realtime
from service.recovery import recover
from service.retention import Span, fill_stream_span
from service.snapshots import SnapshotterProcess, adopt, store, stored_seq
from service.tasks import cancel_all

log = logging.getLogger("matcher.serve")
LOOP_PROBE_S = 0.01     # the event loop lag probe's period: 100 timers a second
#: Connections waiting to be accepted. After a restart every client reconnects at once;
#: with aiohttp's default of 128, 6,000 of them overflowed the queue by the thousand and
#: the dropped ones retried a second later (0.9 to 2.0 s for all; with 4096: 0.9 to 1.0
#: s and no drops). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096
#: How long a connection that never signed in may take to answer its close frame.
CLOSE_UNSIGNED_S = 1.0
#: How long the every-second reads and write may take before they count as a miss,
#: and how many misses in a row make Redis count as not answering.
REDIS_PROBE_TIMEOUT_S = 2.0
REDIS_PROBE_MISSES = 3
STATIC = Path(__file__).with_name("static")


class Service:
    """One running gateway: the pieces `serve` wires together, also used by the tests."""

    def __init__(self, config: Config, *, lost_up_to: int = 0) -> None:
        self.config = config
        self.lost_up_to = lost_up_to    # `matcher serve --lost-up-to` (`_skip_lost`)
        self.directory = Directory(config.all_participants())
        self.metrics = Metrics(max_age=config.server.metrics_cache_ms / 1000)
        self.local_redis: LocalRedis | None = None
        self.client: aioredis.Redis | None = None
        self.gateway: Gateway | None = None
        self.keys = Keys(config.redis.shard)
        self.snapshotter: SnapshotterProcess | None = None
        self.lease: Lease | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self.demo_market: demo_market.DemoMarketProcess | None = None
        self.snapshot_seq = 0       # what the stored snapshot covers, read every second
        self.journal_start = 0      # the first command in Redis's journal, likewise
        self.archive_failures = 0   # as the snapshotter counted them in Redis, likewise
        self.fill_stream = Span()   # what the fill stream holds, likewise
        # Whether Redis answered those reads: the journal learns that Redis is away only
        # when it writes, so in a quiet market (before the open) this is what tells.
        self.redis_answers = True
        self.runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.stopping = False       # SIGTERM: no new connections (`accepting`: commands)
        self._signing_in = 0        # connections not signed in by a header key, yet
        self._signing_in_from: dict[str | None, int] = {}    # ... by address (budget key)
        # ... waiting for their `auth` message: closed with 1001 at shutdown too
        self._unsigned: dict[web.WebSocketResponse, web.Request] = {}
        self.port = config.server.port
        self.ready = False
        self.exit_code = 0
        self.stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        limits = config.limits     # each HTTP client has the budget of one connection
        self._fills_budgets = Budgets(limits.rate, limits.burst)    # per key
        self._quote_budgets = Budgets(limits.rate, limits.burst)    # per address
        self._connect_budgets = Budgets(limits.connect_rate, limits.connect_burst)
        self._proxies = forwarded.networks(config.server.trusted_proxies)
        self._forwarded_header = config.server.forwarded_header    # the header they append to

    # --- lifecycle ---

    async def start(self) -> None:
        cfg = self.config
        check_listen(cfg.server.host, cfg.server.port)      # before anything is read
        if cfg.engine.journal_archive and cfg.engine.start_snapshotter:
            check_archive(cfg.engine.journal_archive)
        url = cfg.redis.url
        realtime = cfg.server.realtime_priority
        if realtime and make_realtime(realtime):
            log.info("running under SCHED_RR at priority %d", realtime)
        if url is None:
            self.local_redis = LocalRedis(cfg.redis.data_dir, durability=cfg.redis.durability,
                                          prefer_port=cfg.redis.local_port)
            url = await asyncio.to_thread(self.local_redis.start)
            log.info("started a local redis-server at %s, data in %s", url, cfg.redis.data_dir)
            if realtime and self.local_redis.process is not None:
                make_realtime(realtime, self.local_redis.process.pid)
        self.redis_url = url
        self.client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                              health_check_interval=0)
        await self._check_durability()
        keys = self.keys
        # Before anything is read or written: one gateway a shard (ADR 31).
        lease = self.lease = Lease(self.client, keys.writer, keys.journal, new_token(),
                                   ttl_s=cfg.redis.writer_lease_s)
        await lease.acquire(wait_s=lease.ttl_s + lease.renew_s)
        # Its own task, stopped last: the shutdown's writes and snapshot are under it.
        self._lease_task = asyncio.get_running_loop().create_task(self._keep_lease())
        root = cfg.engine.journal_archive
        archive = await JournalArchive.of(root, self.client, keys) if root else None
        recovered = await recover(self.client, keys, self.directory.name, archive=archive)
        engine = recovered.engine
        await check_streams_follow(self.client, keys, engine.seq,
                                   (p.id for p in self.directory if p.role in ("funder", "sme")))
        log.info("recovered seq %d: snapshot at %d + %d journaled commands in %.2fs",
                 engine.seq, recovered.snapshot_seq, recovered.replayed, recovered.seconds)
        # Still ours after the recovery, which may have taken longer than the lease.
        lost = await lease.renew(b"%d-0" % engine.seq)
        if lost is not None:
            raise ShardTaken(f"the journal's writer lease was taken while this gateway "
                             f"recovered ({lost}): another gateway writes this shard")
        journal = Journal(self.client, keys, max_retry_delay=cfg.redis.max_retry_delay,
                          written_seq=engine.seq, on_batch=self.metrics.journal_batch,
                          max_inflight=cfg.redis.writes_in_flight, writer=lease.token,
                          writer_ttl_ms=lease.ttl_ms)
        journal.start()
        self.gateway = Gateway(engine, journal, self.directory, cfg.limits, self.metrics)
        await adopt(self.client, keys, recovered.snapshot_seq)
        self.snapshot_seq = recovered.snapshot_seq
        if recovered.replayed >= cfg.engine.snapshot_every:
            await self._snapshot_now("after recovery", cfg.server.shutdown_timeout)
        self.metrics.seq = engine.seq
        if cfg.engine.start_snapshotter:
            self.snapshotter = SnapshotterProcess(
                url, keys, cfg.engine.snapshot_every, archive=root or None,
                fill_retention_hours=cfg.engine.fill_retention_hours)
        self._watch(self.gateway, self.snapshotter)
        zone = ZoneInfo(cfg.engine.timezone)       # an unknown zone fails here, at start
        first_start = engine.seq == 0               # (a skip moves it)
        await self._skip_lost()
        day_ended = self._resume(zone)
        await self._open_market(first_start=first_start)
        if day_ended:                               # before serving, as at the cut-off
            await self._day_upkeep()
        if self.snapshotter is not None:
            self.snapshotter.start()
        app = self._app()
        # aiohttp rounds timeouts of over 5 s up to a whole second, so the WebSocket
        # heartbeats of clients that connected together (all of them, after a restart)
        # fell due in the same loop turn: 6,300 timer callbacks at once stalled the loop
        # for 15 ms some 30 s after they connected. Never rounded, they keep the spread
        # of the connections themselves.
        # Handlers still open when the connections are closed (one waiting for a client
        # that never signs in) are given `shutdown_timeout`, not aiohttp's minute.
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                    logger=_SERVER_LOG, timeout_ceil_threshold=math.inf,
                                    shutdown_timeout=cfg.server.shutdown_timeout)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.server.host, cfg.server.port, reuse_address=True,
                           backlog=LISTEN_BACKLOG)
        await site.start()
        self._site = site
        server: Any = site._server
        if server is not None and server.sockets:       # port 0: what the OS chose
            self.port = server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.get_running_loop().create_task(self._end_of_day_timer(zone)))
        self._tasks.append(asyncio.get_running_loop().create_task(self._probe_loop()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._follow_snapshots()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._cancel_absent()))
        self.ready = True
        log.info("serving on http://%s:%d (WebSocket at /ws)", cfg.server.host, self.port)
        self._start_demo_market()

    def _start_demo_market(self) -> None:
        """`[demo] activity`: a market that moves by itself, as a client of ours."""
        demo = self.config.demo
        if not (demo.activity > 0 and demo.funders and demo.smes):
            return
        plain = {p.role: p.key for p in reversed(self.config.participants) if p.key}
        keys = demo_market.Keys(
            funders={DEMO_FUNDER_BASE + n: demo_key(demo, "funder", n)
                     for n in range(1, min(demo.funders, demo_market.FUNDERS) + 1)},
            smes={DEMO_SME_BASE + n: demo_key(demo, "sme", n)
                  for n in range(1, min(demo.smes, demo_market.SMES) + 1)},
            platform=plain.get("platform"), admin=plain.get("admin"),
            lenders=tuple(DEMO_FUNDER_BASE + n for n in range(1, demo.funders + 1)))
        # A wildcard is reached at its loopback address (an IPv6 socket takes only IPv6).
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(
            self.config.server.host, self.config.server.host)
        host = f"[{host}]" if ":" in host else host
        self.demo_market = demo_market.DemoMarketProcess(
            f"ws://{host}:{self.port}/ws", keys, demo.activity, demo.repay_after_s)
        self.demo_market.start()

    def _watch(self, gw: Gateway, snapshotter: SnapshotterProcess | None) -> None:
        """What /metrics reads from the journal and the snapshots when it is scraped."""
        journal = gw.journal
        m = self.metrics
        m.read_on_scrape("matcher_journal_backlog", "Commands applied but not yet written",
                         lambda: journal.backlog)
        m.read_on_scrape("matcher_journal_up", "1 while the journal can write; 0 while "
                         "it retries Redis, after three seconds in a row in which Redis "
                         "did not answer the gateway's reads or take its probe write, "
                         "or after it stopped (nothing is acknowledged)",
                         lambda: 1.0 if self.journal_up else 0.0)
        m.read_on_scrape("matcher_snapshot_seq", "The sequence number the newest snapshot "
                         "stored covers (recovery replays the journal after it)",
                         lambda: self.snapshot_seq)
        m.read_on_scrape("matcher_journal_start_seq", "The first command Redis's journal "
                         "holds: those before it were moved to the archive "
                         "([engine] journal_archive) once a snapshot covered them",
                         lambda: self.journal_start)
        m.read_on_scrape("matcher_journal_archive_failures", "Times the snapshotter could "
                         "not write the journal's archive (the journal then stays in Redis)",
                         lambda: self.archive_failures, counter=True)
        m.read_on_scrape("matcher_fill_stream_entries", "Fills the platform's fill stream "
                         "holds in Redis; with [engine] fill_retention_hours it stops "
                         "growing once the window is full", lambda: self.fill_stream.entries)
        m.read_on_scrape("matcher_fill_stream_start_seq", "The sequence number of the "
                         "oldest fill on the fill stream (0: none); retention moves it on, "
                         "a consumer group that acknowledges nothing holds it",
                         lambda: self.fill_stream.first_seq)
        m.read_on_scrape("matcher_fill_stream_oldest_age_seconds", "How much older than the "
                         "last command the oldest fill on the fill stream is, in journal "
                         "time (0: none); with retention, at most about 1.1 windows",
                         lambda: (gw.engine.ts - self.fill_stream.first_ts) / 1e9
                         if self.fill_stream.entries else 0.0)
        retention_s = self.config.engine.fill_retention_hours * 3600
        m.read_on_scrape("matcher_fill_retention_seconds", "[engine] fill_retention_hours "
                         "in seconds (0: fills stay in Redis)", lambda: retention_s)
        m.read_on_scrape("matcher_snapshot_failures", "Times the snapshotter process "
                         "ended while the gateway ran (it is started again)",
                         lambda: snapshotter.exits if snapshotter else 0, counter=True)

    async def stop(self) -> None:
        """Finish in-flight writes, snapshot, close connections with 1001."""
        if self.gateway is None:          # the start failed before it served
            await cancel_all(self._tasks)
            await self._release_lease()
            if self.local_redis is not None:
                await asyncio.to_thread(self.local_redis.stop)
            return
        self.ready = False
        self.stopping = True
        gw = self.gateway
        gw.accepting = False
        if self._site is not None:
            # No new connections: a client closed with 1001 that comes straight back
            # is refused, not let in to a server that no longer serves it.
            await self._site.stop()
        await cancel_all(self._tasks)
        # The demo market before the connections close (not restarted as they do); both
        # at once, each given its few seconds to end.
        await asyncio.gather(*(child.stop() for child in (self.demo_market, self.snapshotter)
                               if child is not None))
        timeout = self.config.server.shutdown_timeout
        try:
            await asyncio.wait_for(gw.journal.flush(), timeout)
        except Exception as exc:
            self.exit_code = 1
            why = (f"Redis did not take them within shutdown_timeout, {timeout:g} s"
                   if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}")
            log.error("could not finish the journal writes (%s); the commands not yet "
                      "written may or may not land (a write on its way can), none was "
                      "acknowledged, and their senders are told `unconfirmed`", why)
            # Their senders are told so before the connections close (found in review).
            gw.journal.abandon(f"the gateway stopped before Redis took these writes ({why})")
            for _ in range(3):          # the batches' callbacks, then the sends they queue
                await asyncio.sleep(0)
        else:
            await self._snapshot_now("at shutdown", timeout)
        await gw.close_all(timeout)
        # Those still signing in are no connections of the gateway's, but are told the
        # same (they had waited for their auth timeout, then got 4401, "wrong key").
        await asyncio.gather(*(self._close_unsigned(ws, request, CLOSE_GOING_AWAY,
                                                    b"server shutting down")
                               for ws, request in list(self._unsigned.items())))
        gw.history.close()
        await gw.journal.close()
        await self._release_lease()         # only if it is still ours (`_RELEASE`)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.client is not None:
            await self.client.aclose()
        if self.local_redis is not None:
            await asyncio.to_thread(self.local_redis.stop)
        self.stopped.set()

    async def _keep_lease(self) -> None:
        """Renew the writer lease; if another gateway holds it now (this one stalled
        past its expiry, and another started), stop writing at once, also in a quiet
        market: its write script would refuse the next write anyway (ADR 31). A Redis
        that does not answer is the probe's to report."""
        assert self.lease is not None
        while True:
            await asyncio.sleep(self.lease.renew_s)
            gw = self.gateway
            if gw is None:          # recovering: the start checks the lease after it
                tail = None
            else:
                tail = gw.journal.quiet_tail()
            try:
                async with asyncio.timeout(REDIS_PROBE_TIMEOUT_S):
                    lost = await self.lease.renew(tail)
            except (RedisError, OSError, TimeoutError):
                continue
            if lost is not None and gw is not None:
                gw.journal.replaced(lost)
                return

    async def _release_lease(self) -> None:
        if self._lease_task is not None:
            await cancel_all([self._lease_task])
        if self.lease is None or self.client is None:
            return
        try:
            async with asyncio.timeout(REDIS_PROBE_TIMEOUT_S):
                await self.lease.release()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not release the journal's writer lease (%s: %s): the next "
                        "start waits up to %g s for it to lapse", type(exc).__name__, exc,
                        self.lease.ttl_s)

    async def _snapshot_now(self, when: str, timeout: float) -> None:
        """Store the state in this process, at the two moments a stall harms no one:
        at shutdown, so a restart replays nothing, and after a recovery that replayed
        a snapshot's worth of journal (a crash), before serving, so that neither a
        second crash nor the snapshotter starting beside us replays it all again.
        Everything is journaled by then; a failure only makes a recovery longer."""
        assert self.gateway is not None and self.client is not None
        seq = self.gateway.engine.seq
        try:
            digest = await asyncio.wait_for(store(self.client, self.keys,
                                                  self.gateway.engine), timeout)
            if digest is not None:
                self.snapshot_seq = seq
                log.info("snapshot written at seq %d (%s), state hash %s", seq, when,
                         digest)
            else:
                log.info("the stored snapshot already covers seq %d", seq)
        except Exception as exc:        # the connections and the local Redis still close
            log.warning("could not write the snapshot at seq %d %s (%s: %s); the next "
                        "start replays more of the journal", seq, when,
                        type(exc).__name__, exc)

    @property
    def journal_up(self) -> bool:
        """The journal can write: it is not retrying or stopped, and Redis answers."""
        gw = self.gateway
        return (gw is not None and gw.journal.healthy and gw.journal.error is None
                and self.redis_answers)

    async def _follow_snapshots(self) -> None:
        """Read the stored snapshot's sequence number every second, for
        `matcher_snapshot_seq`: whoever stored it, the snapshotter or anyone else; where
        Redis's journal starts, for `matcher_journal_start_seq`; and what the fill
        stream holds, for `matcher_fill_stream_*` (fill retention trims it).

        With them a short-lived key is written: whether Redis takes writes is
        `redis_answers`, which `/health` and `matcher_journal_up` read, so a Redis that
        went away, or that refuses writes while it still reads (a replica after a
        failover, out of memory, a failed background save), shows in a quiet market,
        before the first order. It turns false after `REDIS_PROBE_MISSES` misses in a
        row, not one slow second."""
        assert self.client is not None
        assert self.gateway is not None
        journal = self.gateway.journal
        misses = 0
        pause = 0.0             # the first reads at once: metrics read 0 for a second
        while True:
            await asyncio.sleep(pause)
            pause = 1.0
            failure: BaseException | None = None
            try:
                async with asyncio.timeout(REDIS_PROBE_TIMEOUT_S):
                    self.snapshot_seq = await stored_seq(self.client, self.keys)
                    self.journal_start = await journal_start(self.client, self.keys) or 0
                    failures: Any = await self.client.get(self.keys.archive_failures)
                    self.archive_failures = int(failures or 0)
                    self.fill_stream = await fill_stream_span(self.client, self.keys)
            except (RedisError, OSError, TimeoutError) as exc:
                failure = exc
            # Apart from the reads, which go on while Redis refuses writes; and only in
            # a quiet second: a journal write that landed says as much, and with
            # `appendfsync always` each write costs Redis a sync on its main thread.
            if time.monotonic() - journal.written_at > 1.0:
                try:
                    async with asyncio.timeout(REDIS_PROBE_TIMEOUT_S):
                        await self.client.set(self.keys.probe, time.time_ns(), px=5000)
                except (RedisError, OSError, TimeoutError) as exc:
                    failure = exc
                if failure is None:     # and it still holds the journal (restarted empty?)
                    journal.verify()
            if failure is not None:
                misses += 1
                if resp.wrong_node(failure):    # a failover: connect afresh (as the journal)
                    await resp.reconnect_idle(self.client)
                if misses == REDIS_PROBE_MISSES:
                    log.warning("Redis does not answer or take writes (%s: %s): /health "
                                "says unavailable until it does",
                                type(failure).__name__, failure)
                    self.redis_answers = False
            else:
                if not self.redis_answers:
                    log.info("Redis answers again")
                misses = 0
                self.redis_answers = True

    async def _probe_loop(self) -> None:
        """Time how late a timer fires, for `matcher_event_loop_lag_seconds`.

        The command latency histogram starts when a handler runs; a message that arrives
        while the loop is busy (a large batch of replies, a burst of connections) waits
        before that, unseen. The lag of a timer is about that wait.
        """
        while True:
            due = time.perf_counter() + LOOP_PROBE_S
            await asyncio.sleep(LOOP_PROBE_S)
            self.metrics.loop_lag.observe(max(0.0, time.perf_counter() - due))

    async def _check_durability(self) -> None:
        assert self.client is not None
        want = self.config.redis.durability
        try:
            got = await self.client.config_get("append*")
        except (RedisConnectionError, RedisTimeoutError):
            raise               # Redis is not there: that, not its settings, is the news
        except Exception as exc:  # managed Redis may refuse CONFIG
            log.warning("cannot read the Redis persistence settings (%s); make sure "
                        "appendonly=yes and appendfsync=%s", exc, want)
            return
        aof = got.get("appendonly") == "yes"
        have = got.get("appendfsync") if aof else "no"
        order = {"no": 0, "everysec": 1, "always": 2}
        if order.get(str(have), 0) < order[want]:
            log.warning("Redis persistence is weaker than configured: %s, durability=%s "
                        "wants appendonly yes + appendfsync %s (see README, Durability)",
                        f"appendfsync {have}" if aof else "appendonly no", want, want)

    async def _skip_lost(self) -> None:
        """`--lost-up-to M`: Redis lost acknowledged commands up to M, so number on from
        M + 1 (ADR 29). Journaled alone and first, before any other command of this
        start. Nothing to do once the journal has reached M: the flag may stay on later
        starts."""
        gw = self.gateway
        assert gw is not None
        last, seq = self.lost_up_to, gw.engine.seq
        if not last:
            return
        if last <= seq:
            # Harmless, but a flag left on through a second loss would skip to the first
            # loss's M: say so where it is seen.
            log.warning("--lost-up-to %d: the journal is at seq %d already, nothing to "
                        "skip; remove the flag", last, seq)
            return
        log.warning("--lost-up-to %d: commands %d to %d were acknowledged and lost with "
                    "Redis's writes; their sequence numbers, order ids and trade ids are "
                    "skipped, and numbering goes on from %d", last, seq + 1, last, last + 1)
        gw.submit(system(), wire.Skip(last=last), time.perf_counter())
        await gw.journal.flush()

    def _resume(self, zone: ZoneInfo) -> bool:
        """Before serving again: `resume`, which keeps the downtime out of the retry
        window (ADR 8 addendum), then the end of day that fell due while the gateway was
        down (or whose `end_of_day` a crash kept out of the journal). In that order: an
        order that ended just before the stop still answers retries after the end of
        day, which keeps what is within the window, counted without the downtime. Both
        are journaled before any client's command (`_open_market` waits for them)."""
        gw = self.gateway
        assert gw is not None
        if gw.engine.seq == 0:               # a new journal: nothing to resume
            return False
        missed = self._day_missed(zone)      # before `resume` starts a day
        gw.submit(system(), wire.Resume(), time.perf_counter())
        if missed:
            gw.submit(system(), wire.EndOfDay(), time.perf_counter())
        return missed

    def _day_missed(self, zone: ZoneInfo) -> bool:
        """Whether the latest cut-off passed with no `end_of_day` journaled after the day's
        first command (logged when so)."""
        assert self.gateway is not None
        cut_off = last_end_of_day(dt.datetime.now(zone), self.config.engine.end_of_day)
        if not self.gateway.engine.day_missed(int(cut_off.timestamp()) * 10**9):
            return False
        log.warning("the end of day due %s was not journaled (the gateway was down then, "
                    "or stopped before it was written): issued now", cut_off)
        return True

    async def _open_market(self, first_start: bool) -> None:
        """Journal what the configuration adds: segments, and for the demo lines and bids."""
        gw = self.gateway
        assert gw is not None
        admin = system()
        cores_before = {s.core for s in gw.engine.segments.values()}
        for seg in self.config.segments:
            opened = gw.engine.segments.get(seg.id)
            if opened is not None and opened != seg.segment():
                log.warning("segment %s is configured as %s but was opened as %s: a "
                            "segment does not change once opened, and the opened one "
                            "stands; to trade other terms, add a segment with a new id",
                            seg.id, _terms(seg.segment()), _terms(opened))
            if opened is None:
                gw.submit(admin, wire.AddSegment(segment=seg.id, core=seg.core,
                                                 tenor_days=seg.tenor_days,
                                                 rate_cap_bps=seg.rate_cap_bps),
                          time.perf_counter())
        demo = self.config.demo
        if demo.credit_line:
            # For a core enterprise added to the configuration since the last start, and
            # for a funder with nothing to its name yet (every one at the first start,
            # one added by raising `[demo] funders` later): the demo's market bids
            # everywhere, and its bids were refused at every draw where a funder had no
            # line. Not where a funder closed a line (0): it has a history elsewhere, or
            # its lines are all closed and nothing was ever lent, which is the same as
            # new (the engine keeps no line of 0).
            funders = [p for p in self.directory if p.role == "funder"]
            cores = sorted({s.core for s in gw.engine.segments.values()})
            for funder in funders:
                known = gw.engine.status(funder.id)
                for core in (cores if not (known.lines or known.orders)
                             else [c for c in cores if c not in cores_before]):
                    gw.submit(funder, wire.SetCreditLine(core=core, amount=demo.credit_line),
                              time.perf_counter())
            if first_start and demo.seed_bids:
                self._seed_bids(funders)
        if n := gw.cancel_removed():
            log.warning("%d participants are no longer in the configuration: their "
                        "resting orders are cancelled", n)
        await gw.journal.flush()

    def _seed_bids(self, funders: list[Participant]) -> None:
        """A few GTC bids per segment so the demo board is not empty."""
        gw = self.gateway
        assert gw is not None
        rng = random.Random(2026)
        for segment in sorted(gw.engine.segments):
            tenor = gw.engine.segments[segment].tenor_days
            for n, funder in enumerate(rng.sample(funders, min(8, len(funders)))):
                rate = 220 + tenor // 6 + rng.randrange(0, 40)
                amount = rng.randrange(5, 50) * 10_000_000          # 0.5 to 5 million CNY
                gw.submit(funder, wire.Bid(client_id=f"seed-{segment}-{n}", segment=segment,
                                           rate_bps=rate, amount=amount, tif="gtc"),
                          time.perf_counter())

    async def _cancel_absent(self) -> None:
        """Once the grace after a start is over, cancel the bids of funders (with cancel on
        disconnect) that have not come back: cancel on disconnect could not run for the
        connections a stop or a crash closed."""
        grace = self.config.server.reconnect_grace_s
        await asyncio.sleep(grace)
        assert self.gateway is not None
        if n := self.gateway.cancel_absent():
            log.info("%d funders not back %.0f s after the start: their resting orders are "
                     "cancelled", n, grace)

    async def _end_of_day_timer(self, zone: ZoneInfo) -> None:
        """Issue `end_of_day` at the configured local time, every day; first, one whose
        cut-off passed while the gateway was starting (after `_resume` looked)."""
        if self._day_missed(zone):
            await self.close_day()
        while True:
            now = dt.datetime.now(zone)
            due = next_end_of_day(now, self.config.engine.end_of_day)
            await asyncio.sleep(max(0.0, seconds_until(due, time.time())))
            log.info("end of day %s: DAY orders expire", due.date())
            await self.close_day()

    async def close_day(self) -> None:
        """The cut-off, then the upkeep kept out of trading hours: a full garbage
        collection and, when Redis keeps an append-only file, its rewrite (a fork and a
        full write of the data set: a latency spike mid-morning, harmless now)."""
        gw = self.gateway
        assert gw is not None
        gw.submit(system(), wire.EndOfDay(), time.perf_counter())
        await self._day_upkeep()

    async def _day_upkeep(self) -> None:
        """Once the end of day is journaled: also after one issued at a start (it was
        missed), which skipped it, and left Redis's own rewrite to fall in the morning
        (found in an operator's audit)."""
        gw = self.gateway
        assert gw is not None and self.client is not None
        try:
            await gw.journal.flush()
        except Exception as exc:     # the journal stopped: it said why; nothing to upkeep
            log.error("end of day not journaled: %s", exc)
            return
        log.info("end of day: full garbage collection found %d objects",
                 gctune.full_collect())
        if self.config.redis.rewrite_at_end_of_day and self.config.redis.durability != "no":
            try:
                await self.client.bgrewriteaof()
                log.info("end of day: Redis is rewriting its append-only file")
            except RedisError as exc:      # already rewriting, or a managed Redis refusing
                log.warning("end of day: BGREWRITEAOF not started (%s)", exc)

    # --- HTTP and WebSocket ---

    def _app(self) -> web.Application:
        # aiohttp has no setting for the default of every route it makes, the router's
        # own refusals included: `_expect` takes the place of its module's.
        web_urldispatcher._default_expect_handler = _expect  # type: ignore[assignment]
        app = web.Application(middlewares=[_refusals, self._unkeyed_budget])
        app[_GATEWAY] = True
        app.add_routes([
            web.get("/ws", self._ws),
            web.get("/health", self._health),
            web.get("/metrics", self._metrics),
            web.get("/v1/segments", self._segments),
            web.get("/v1/segments/{segment}/quote", self._rest_quote),
            web.get("/v1/fills", self._rest_fills),
        ])
        if STATIC.is_dir():
            app.router.add_get("/", self._index)
            app.router.add_static("/static/", STATIC)
        app.on_response_prepare.append(_not_stored)
        return app

    @web.middleware
    async def _unkeyed_budget(self, request: web.Request,
                              handler: Handler) -> web.StreamResponse:
        """What takes no key costs the client address's budget, one place for all: the
        segment list, the quote (their handlers owe more for the orders they walk) and
        the board's files (a file was answered for nothing, as often as anyone asked).
        `/health` and `/metrics` do not: load balancers and Prometheus poll them, and a
        probe refused would say the gateway is down."""
        path = request.path
        if path == "/" or path.startswith(("/static/", "/v1/segments")):
            address = forwarded.budget_key(self._client(request))
            request[_ADDRESS] = address
            if not self._quote_budgets.allow(address):
                return self._rate_limited("this address")
        return await handler(request)

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def _health(self, request: web.Request) -> web.Response:
        gw = self.gateway
        ok = self.ready and self.journal_up
        body = {"status": "ready" if ok else "unavailable",
                "seq": gw.engine.seq if gw else 0,
                "journal_backlog": gw.journal.backlog if gw else 0}
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _segments(self, request: web.Request) -> web.Response:
        gw = self.gateway
        assert gw is not None
        address = request[_ADDRESS]                 # its budget allowed it (middleware)
        bad = _unknown_parameter(request, ())
        if bad is not None:
            return self._refused(400, bad)
        if gw.journal.error is not None:
            return self._refused(503, gw.unwritten())
        self._quote_budgets.owe(address, gw.book_cost(gw.engine.segments))
        out = []
        for seg_id in sorted(gw.engine.segments):
            seg = gw.engine.segments[seg_id]
            book = gw.engine.book_update(seg_id, levels=1)
            out.append({"id": seg.id, "core": seg.core, "tenor_days": seg.tenor_days,
                        "rate_cap_bps": seg.rate_cap_bps, "best_rate_bps": book.best_rate_bps,
                        "demand_amount": book.demand_amount, "halted": book.halted})
        return web.json_response(out)

    async def _rest_quote(self, request: web.Request) -> web.Response:
        gw = self.gateway
        assert gw is not None
        address = request[_ADDRESS]                 # its budget allowed it (middleware)
        # Its errors name its `ref`, as over the WebSocket (when it is a valid one).
        ref = _valid_ref(request.query.get("ref"))
        if gw.journal.error is not None:
            return self._refused(503, gw.unwritten(ref))
        segment = request.match_info["segment"]
        if segment not in gw.engine.books:
            return self._refused(404, wire.Error(code="unknown_segment", path="$.segment",
                                                 message=f"no segment {segment!r}", ref=ref))
        bad = _unknown_parameter(request, ("amount", "single_funder", "ref"))
        if bad is not None:
            return self._refused(400, msgspec.structs.replace(bad, ref=ref))
        amount = _whole_number(request.query.get("amount", ""))
        if not amount:      # 0 too: one message for the field, not two (found in an audit)
            return self._refused(400, wire.Error(
                code="invalid", path="$.amount", ref=ref,
                message="amount: a positive whole number of fen is required"))
        try:        # the WebSocket message's own checks; strict=False: "true" and "1" too
            req = msgspec.convert({**request.query, "segment": segment, "amount": amount},
                                  wire.QuoteRequest, strict=False)
        except msgspec.ValidationError as exc:
            error = decode_error(exc, b"")
            if error.path == "$.single_funder":
                error = msgspec.structs.replace(
                    error, message="single_funder: true, false, 1 or 0")
            return self._refused(400, msgspec.structs.replace(error, ref=ref))
        self.metrics.quotes += 1
        self._quote_budgets.owe(address, gw.book_cost((segment,)))
        return web.Response(body=wire.json_encoder.encode(gw.engine.quote(req)),
                            content_type="application/json")

    def _client(self, request: web.Request) -> str | None:
        """The client's address, behind the proxies we trust (ADR 22)."""
        header = self._forwarded_header        # header names are case-insensitive
        return forwarded.client_address(
            request.remote, request.headers.getall(header, ()), self._proxies, header)

    def _rate_limited(self, whose: str) -> web.Response:
        return self._refused(429, wire.Error(
            code="rate_limited", path=None,
            message=f"over {self.config.limits.rate:g} requests/s for {whose}"))

    def _refused(self, status: int, error: wire.Error,
                 headers: dict[str, str] | None = None) -> web.Response:
        """An HTTP API request refused, counted by code in `matcher_rejects_total` as the
        same refusal over the WebSocket is."""
        self.metrics.reject(error.code)
        return _error_response(status, error, headers)

    async def _rest_fills(self, request: web.Request) -> web.Response:
        """`fills` over HTTP, for an SME platform's back office: the key as a bearer token."""
        gw = self.gateway
        assert gw is not None
        who = gw.authenticate(bearer_key(request.headers.get("Authorization")))
        if who is None:
            return self._refused(401, wire.Error(
                code="unauthorized", path=None,
                message="a valid API key is required as 'Authorization: Bearer <key>'"),
                headers={"WWW-Authenticate": "Bearer"})
        refused = fills_refused(who)
        if refused is not None:
            return self._refused(403, refused)
        if not self._fills_budgets.allow(who.id):
            return self._rate_limited("this key")
        bad = _unknown_parameter(request, ("after", "limit", "ref"))
        if bad is not None:
            return self._refused(400, bad)
        query: dict[str, str | int] = dict(request.query)
        if "limit" in query:
            limit = _whole_number(request.query["limit"])
            if limit is None:
                return self._refused(400, wire.Error(
                    code="invalid", path="$.limit", message="limit: a whole number from 1 "
                    f"to {wire.MAX_FILLS_PAGE} is required"))
            query["limit"] = limit
        try:        # the WebSocket message's own checks
            req = msgspec.convert(query, wire.FillsRequest)
        except msgspec.ValidationError as exc:
            return self._refused(400, decode_error(exc, b""))
        answer = await gw.fill_page(who, req)
        if isinstance(answer, wire.Error):  # refused (counted there), or not now: again
            return _error_response({"rate_limited": 429, "invalid": 400}.get(answer.code, 503),
                                   answer)
        return web.Response(body=wire.json_encoder.encode(answer),
                            content_type="application/json")

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        gw = self.gateway
        assert gw is not None
        limits = self.config.limits
        if self.stopping:           # connect again to the next gateway
            return _json_error(503, "unavailable", "the server is shutting down", None)
        # A Bearer key in the header signs in before the upgrade and is never turned away
        # here. Another scheme is not ours (a browser sends a proxy's Basic credentials by
        # itself): such a connection signs in with its first message, as one without the
        # header does. Any connection not signed in yet costs a socket and a handler
        # until it signs in or is closed, for anyone who can connect: those are counted,
        # and bounded, so that they cannot use up the process's files.
        address = forwarded.budget_key(self._client(request))
        if not self._connect_budgets.allow(address):
            return self._refused(429, wire.Error(
                code="rate_limited", path=None,
                message=f"over {limits.connect_rate:g} connections/s from this address: "
                        "connect again shortly"))
        key = bearer_key(request.headers.get("Authorization"))
        who = gw.authenticate(key) if key is not None else None
        # One address may hold a tenth of them: a single client cannot take the pool
        # and leave every browser (they sign in with a message) a 503.
        if who is None and (
                self._signing_in >= limits.unauthenticated_connections
                or self._signing_in_from.get(address, 0)
                >= max(1, limits.unauthenticated_connections // 10)):
            if key is not None:     # wrong, not waiting: "connect again" would loop
                return self._refused(401, wire.Error(
                    code="unauthorized", path=None, message="wrong API key"),
                    headers={"WWW-Authenticate": "Bearer"})
            return _json_error(503, "unavailable", "too many connections are waiting to "
                               "sign in: connect again shortly", None)
        counted = who is None
        if counted:
            self._signing_in += 1
            self._signing_in_from[address] = self._signing_in_from.get(address, 0) + 1
        try:
            # aiohttp refuses a message of max_msg_size bytes itself (`>=`, 3.14).
            ws = WebSocket(max_msg_size=limits.max_frame_bytes + 1, compress=False,
                           decode_text=False, heartbeat=self.config.server.heartbeat_s)
            await ws.prepare(request)
            why = b"wrong API key"
            if who is None and key is None:
                self._unsigned[ws] = request
                try:
                    who, why = await self._auth_message(ws, limits.auth_timeout)
                finally:
                    del self._unsigned[ws]
            refusal = (
                (CLOSE_UNAUTHORIZED, why) if who is None
                else (CLOSE_GOING_AWAY, b"server shutting down") if self.stopping
                else (CLOSE_TOO_MANY, b"too many connections for this key")
                if gw.at_connection_cap(who) else None)
            if refusal is not None:
                await self._close_unsigned(ws, request, *refusal)
                return ws
        finally:
            if counted:
                self._signing_in -= 1
                if self._signing_in_from[address] == 1:
                    del self._signing_in_from[address]
                else:
                    self._signing_in_from[address] -= 1
        assert who is not None
        assert request.transport is not None
        conn = gw.attach(ws, request.transport, who)
        # From here on messages are handled as they are parsed (service/inbox.py); the
        # loop below still takes those queued before, and pings, pongs and the close.
        ws.deliver(lambda data: gw.handle(conn, data, time.perf_counter()))
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    gw.handle(conn, msg.data, time.perf_counter())
                    ws.caught_up()
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            ws.deliver(None)
            gw.detach(conn)
        return ws

    async def _close_unsigned(self, ws: web.WebSocketResponse, request: web.Request,
                              code: int, message: bytes) -> None:
        """Close a connection that never signed in. aiohttp waits up to ten seconds for
        the client's close frame; one that does not send it would hold its socket for
        that long, so after a second the socket is cut."""
        try:
            async with asyncio.timeout(CLOSE_UNSIGNED_S):
                await ws.close(code=code, message=message)
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()

    async def _auth_message(self, ws: web.WebSocketResponse,
                            timeout: float) -> tuple[Participant | None, bytes]:
        """The first message may be `{"type": "auth", "key": ...}` (browsers set no
        headers). Refused, with the close's reason: "unauthorized" for every case left
        an integrator guessing which (found in an audit); the key itself is never said
        to exist or not beyond "wrong"."""
        assert self.gateway is not None
        try:
            # One deadline for the whole wait: `receive(timeout)` starts again after
            # each ping or pong it answers, which would keep a silent client forever.
            async with asyncio.timeout(timeout):
                msg = await ws.receive()
        except TimeoutError:
            return None, b"no auth message within auth_timeout"
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return None, b"the first message must be auth"
        try:
            auth = wire.json_decoder.decode(msg.data)
        except DECODE_ERRORS:
            return None, b"the first message must be a valid auth"
        if not isinstance(auth, wire.Auth):
            return None, b"the first message must be auth"
        who = self.gateway.authenticate(auth.key)
        return who, b"wrong API key"


def next_end_of_day(now: dt.datetime, at: str) -> dt.datetime:
    """The next `at` ("HH:MM" or "HH:MM:SS") in `now`'s time zone, strictly after
    `now`."""
    hour, minute, second = [*map(int, at.split(":")), 0][:3]
    due = now.replace(hour=hour, minute=minute, second=second, microsecond=0)
    return due if due > now else due + dt.timedelta(days=1)


def seconds_until(due: dt.datetime, now: float) -> float:
    """From `now` (epoch seconds) to `due`. Not `due - now` in the zone: across a change
    of its UTC offset (daylight saving) two times of one zone differ by more or less
    than their difference shows."""
    return due.timestamp() - now


def last_end_of_day(now: dt.datetime, at: str) -> dt.datetime:
    """The latest `at` ("HH:MM" or "HH:MM:SS") in `now`'s time zone, at or before
    `now`."""
    return next_end_of_day(now, at) - dt.timedelta(days=1)


async def _not_stored(request: web.Request, response: web.StreamResponse) -> None:
    """The endpoints answer with the market as it is now: no browser or proxy may keep
    an answer for later, so a client need not add a cache-busting parameter (which the
    quote would refuse as unknown: a typo must not pass as a parameter left out). The
    board's own files may be kept, but asked after each time (a 304 when unchanged): a
    board from before an upgrade would misread the new server's messages."""
    board = request.path == "/" or request.path.startswith("/static/")
    response.headers.setdefault("Cache-Control", "no-cache" if board else "no-store")


class _ForgetfulLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's request handler logs a request it could not parse (a scanner's, a TLS
    hello on the plain port) with its exception, and keeps the exception, whose
    traceback keeps the frame that keeps it: a reference cycle per such request, kept
    until the end of day with automatic collection off (`service/gctune.py`). It logs
    through this adapter, which drops the traceback once the record is written."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stacklevel", 2)       # the record names aiohttp's caller
        try:
            super().log(level, msg, *args, **kwargs)
        finally:
            exc = kwargs.get("exc_info")
            if isinstance(exc, BaseException):
                forget_traceback(exc)


_SERVER_LOG = _ForgetfulLog(logging.getLogger("aiohttp.server"))

#: The `error` code of each status aiohttp refuses a request with by itself.
_HTTP_CODES = {403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
#: aiohttp's own answer to `Expect` (sends 100 Continue), which `_expect` hands on to.
_CONTINUE = web_urldispatcher._default_expect_handler
#: Marks the gateway's application: `_expect` answers for it alone.
_GATEWAY = web.AppKey("gateway", bool)


async def _refused(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()        # never called: stands in for a route's own method


def _unlink(request: web.Request) -> None:
    """The router's refusals (no route for the path or the method) come with a route
    whose handler is its own bound method: a reference cycle per request."""
    if isinstance(request.match_info, MatchInfoError):
        request.match_info.route._handler = _refused


class StartRefused(Exception):
    """A setting the start cannot work with, found before it reads or writes anything:
    `matcher serve` says which in one line and exits with status 2."""


def check_archive(root: str) -> None:
    """The journal's archive directory can be written (the snapshotter beside the
    gateway writes it): a path that is a file, or one the process may not write,
    started cleanly and failed only at the first archive, mid-morning (found in an
    operator's audit)."""
    probe = Path(root) / f".matcher-probe-{os.getpid()}"
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartRefused(f"engine.journal_archive: cannot write to {root!r} "
                           f"({exc.strerror})") from None


def check_listen(host: str, port: int) -> None:
    """Bind the address the gateway will listen on, and let it go: a port in use (a
    gateway already running) or a host that does not resolve is refused before the
    start reads or writes anything. Found in an audit: refused by the bind at the end
    of a start that had journaled and stored a snapshot, with a traceback."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartRefused(f"server.host: {host!r} does not resolve ({exc.strerror})"
                            ) from None
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as aiohttp
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise StartRefused(f"server.port: cannot listen on {address[0]} port "
                                    f"{port} ({exc.strerror}): is a gateway running "
                                    "there already?") from None


#: The request's client address as its budget knows it (`forwarded.budget_key`), set by
#: `Service._unkeyed_budget` for the handlers that owe more.
_ADDRESS = web.RequestKey[str | None]("address")


@web.middleware
async def _refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no route for the path or the method, a WebSocket request
    without the upgrade, a board file that is not there) answered with the API's
    `error` body, as a response rather than raised.

    aiohttp sends a raised refusal itself as the response, and its traceback keeps the
    frame that keeps it; the router's refusals also refer to themselves (`_unlink`).
    Each is a reference cycle per request, kept until the end of day with automatic
    collection off (`service/gctune.py`).
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        forget_traceback(exc)
        if exc.status < 400:
            return web.Response(status=exc.status, headers=exc.headers)
        code = _HTTP_CODES.get(exc.status, "invalid" if exc.status < 500 else "unavailable")
        why = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
        allow = exc.headers.get("Allow")
        return _json_error(exc.status, code, f"{request.method} {request.path}: {why}", None,
                           None if allow is None else {"Allow": allow})
    except OSError as exc:
        # A board file name the file system cannot take (one too long) escapes aiohttp's
        # static files as is: a 500 and an error logged with its traceback, for any
        # client to repeat. No such file is there.
        if (exc.errno != errno.ENAMETOOLONG
                or not isinstance(request.match_info.route.resource, web.StaticResource)):
            raise
        return _json_error(404, "not_found", f"{request.method} {request.path}: Not Found",
                           None)
    finally:
        _unlink(request)


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's answer to an `Expect` header, with the one it cannot meet answered 417
    `expectation_failed` rather than raised: it runs before any middleware, so
    `_refusals` would not see it, and every route (the router's refusals too) uses it."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if (request.version != HttpVersion11 or expect.lower() == "100-continue"
            or _GATEWAY not in request.app):       # another aiohttp app in the process
        await _CONTINUE(request)
        return None
    _unlink(request)
    return _json_error(417, "expectation_failed",
                       f"{request.method} {request.path}: Expect {expect!r} is not met", None)


def _valid_ref(text: str | None) -> str | None:
    """`text` if it is what a message's `ref` may be (`wire.Name`), else None."""
    try:
        return msgspec.convert(text, wire.Name | None)
    except msgspec.ValidationError:
        return None


def _whole_number(text: str) -> int | None:
    """A parameter that must be a count or an amount: ASCII digits only (not "50.0" or
    "5e1", which a lenient conversion reads as 50; "0100" is 100), and few enough of them
    to be one: the bounds are the message's own, checked after."""
    digits = text.lstrip("0")        # int() refuses more than 4,300 digits, zeros too
    if not (text.isascii() and text.isdigit()) or len(digits) > 19:
        return None
    return int(digits or "0")


def _unknown_parameter(request: web.Request, known: tuple[str, ...]) -> wire.Error | None:
    """A parameter given twice or not one of `known`, named: a typo must not be answered
    as if the parameter had been left out."""
    for name in request.query:
        if len(request.query.getall(name)) > 1:
            return wire.Error(code="invalid", path=f"$.{name}",
                              message=f"{name}: given more than once")
        if name not in known:
            return wire.Error(code="invalid", path=f"$.{name}",
                              message=f"{name}: not a parameter of this request"
                                      + (f" ({', '.join(known)})" if known else
                                         " (it takes none)"))
    return None


def _terms(segment: Segment) -> str:
    return (f"core {segment.core}, {segment.tenor_days} days, rate cap "
            f"{segment.rate_cap_bps} bps")


def _json_error(status: int, code: str, message: str, path: str | None,
                headers: dict[str, str] | None = None) -> web.Response:
    return _error_response(status, wire.Error(code=code, message=message, path=path),
                           headers)


def _error_response(status: int, error: wire.Error,
                    headers: dict[str, str] | None = None) -> web.Response:
    """The API's `error` body. A 429 or a 503 says to ask again: a budget refills, a
    page's readers free up, a stopping gateway's successor takes over, within a second
    or so (clients and proxies that honour `Retry-After` then wait that long)."""
    if status in (429, 503):
        headers = {"Retry-After": "1", **(headers or {})}
    return web.Response(status=status, content_type="application/json", headers=headers,
                        body=wire.json_encoder.encode(error))


async def serve(config: Config, *, lost_up_to: int = 0) -> int:
    """Run until SIGTERM or SIGINT; return the exit status. `lost_up_to`: see
    `Service._skip_lost`."""
    service = Service(config, lost_up_to=lost_up_to)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except Exception:
        await service.stop()
        raise
    gctune.tune()
    if config.demo.funders or config.demo.smes:
        print_demo_keys(config, service)
    await stop.wait()
    log.info("stopping: no new commands; flushing the journal and writing a snapshot")
    await service.stop()
    log.info("stopped at seq %d, exit status %d", service.gateway.engine.seq
             if service.gateway else 0, service.exit_code)
    return service.exit_code


def print_demo_keys(config: Config, service: Service) -> None:
    d = config.demo
    # Plain keys only: a key given as its digest cannot be printed, and is the operator's.
    named = "".join(f"\n  {p.role:<8} {p.key}   ({p.name}, id {p.id})"
                    for p in config.participants if p.key is not None)
    print(f"""
Demo marketplace at http://{config.server.host}:{service.port}/  (WebSocket: /ws)
Redis: {service.redis_url}   stream of fills: {Keys(config.redis.shard).fills}
API keys (demo only):
  funders  {d.key_prefix}-funder-1 .. {d.key_prefix}-funder-{d.funders}   (ids 1001 ..)
  SMEs     {d.key_prefix}-sme-1 .. {d.key_prefix}-sme-{d.smes}   (ids 100001 ..){named}
""", flush=True)
