"""The run itself: real WebSocket clients for every funder and SME, a reader on the
platform's Redis fill stream, and an open-loop scheduler.

The scheduler sends each message at its intended time from a seeded Poisson schedule and
never waits for answers; latency is measured from the intended time (or the actual send,
if the timer fired early), so a stall anywhere shows in the numbers. Timestamps stay in
the clients' own tables, keyed by client id, never in the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import sys
import time
import urllib.request
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aioredis

from loadtest import wsclient
from loadtest.measure import FUNDER, PLATFORM, SME, FillLedger, Recorder, Tally, summary
from loadtest.profiles import Profile
from loadtest.workload import FunderState, Market, Segment, arrivals
from matcher import protocol as wire
from service import gctune, resp
from service.journal import Keys

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(wire.Event).decode
#: Send up to 1 ms before the intended time. uvloop's timers have millisecond resolution
#: (libuv) and fire up to about a millisecond either side of their due time; a message
#: sent early is timed from its real send, one sent late from its intended time, so with
#: less slack the timer's own error was counted as server latency (ADR 12, addendum).
EARLY_NS = 1_000_000
#: The `ref` of the watchers' `subscribe`: a refusal of it names it (else a watcher that
#: follows nothing would go unseen, and the run would measure no fan-out).
FOLLOW = "follow"


@dataclass
class Participant:
    id: int
    key: str


@dataclass
class Step:
    """One rate of a ramp: latencies of the commands scheduled in it, and the acks that
    arrived while it lasted (what the server kept up with, whatever was scheduled)."""

    offered: float
    start_ns: int = 0
    end_ns: int = 0
    ack: Tally = field(default_factory=Tally)
    acked: int = 0           # acks that arrived during the step
    backlog: int = 0         # commands sent and not yet answered when the step ended

    def record(self, origin: int, now: int) -> None:
        if self.start_ns <= origin < self.end_ns:
            self.ack.add(max(1, (now - origin) // 1000))
        if self.start_ns <= now < self.end_ns:
            self.acked += 1

    def row(self, duration_s: float, objective_p99_ms: float) -> dict[str, Any]:
        s = summary(self.ack, f"{self.offered:.0f}/s")
        achieved = self.acked / duration_s
        # Kept up: answered about what was offered, and no queue left growing: at the
        # end at most 100 ms worth of the offered rate still waited for its answer.
        kept_up = achieved >= 0.95 * self.offered and self.backlog <= 0.1 * self.offered
        return {"offered": self.offered, "achieved": achieved, "p50": s["p50"],
                "p99": s["p99"], "backlog": self.backlog, "kept_up": kept_up,
                "ok": kept_up and s["p99"] <= objective_p99_ms}


def sustained_rate(rows: list[dict[str, Any]]) -> float | None:
    """The highest offered rate that kept up with every lower one kept up too (a later
    step can "achieve" more than it offered while the server works off a backlog)."""
    sustained = None
    for r in rows:
        if not r["kept_up"]:
            break
        sustained = r["offered"]
    return sustained


class Client:
    """One authenticated connection; its events are handled as they arrive."""

    def __init__(self, run: Run, who: Participant, role: str, index: int) -> None:
        self.run, self.who, self.role, self.index = run, who, role, index
        self.ws: wsclient.WebSocket | None = None
        self.pending: dict[str | None, deque[tuple[int, bool]]] = defaultdict(deque)
        self.asks: dict[str, tuple[int, bool]] = {}        # ask client id -> (origin, measured)
        self.reads: dict[str, tuple[int, bool]] = {}       # fills request ref -> (origin, ...)
        self.open: set[str] = set()     # own asks not yet ended (a `done` or a rejection)
        self.away = False               # left, signing in again: sends go to another SME
        self.watching = False           # follows every segment's book, again at each sign-in
        self._welcome: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        welcome = self._welcome = asyncio.get_running_loop().create_future()
        self.ws = await wsclient.connect(
            self.run.url, self._on_message, clock=self.run.arrivals,
            headers={"Authorization": f"Bearer {self.who.key}"})
        await asyncio.wait_for(welcome, 30)
        if self.watching:               # as the board does at every welcome
            self.ws.send(self.run.following)

    def idle(self) -> bool:
        """Nothing of this client's is under way: it may leave without missing an
        answer, a fill or a `done` that the reconciliation counts."""
        return not (self.away or self.pending or self.asks or self.reads or self.open)

    async def reconnect(self, *, drop: bool) -> None:
        """Leave and sign in again, as an SME closing its board and coming back; with
        `drop`, without a close frame (the socket reset, as a network lost). The caller
        has set `away` already: nothing may be sent here once it chose this one. An SME
        that cannot sign in again stays away for the rest of the run."""
        ws = self.ws
        assert ws is not None and self.away
        try:
            if drop:
                assert ws.transport is not None
                ws.transport.abort()
                await ws.closed
            else:
                await ws.close()
            start = time.perf_counter_ns()
            await self.connect()
            self.run.rec.sign_in.add(max(1, (time.perf_counter_ns() - start) // 1000))
            self.run.rec.reconnects += 1
        except Exception as exc:    # the run reports it; the SME takes nothing more
            self.run.rec.reconnects_failed.append(f"SME {self.who.id}: {exc!r}")
            return
        self.away = False
        self.run.away -= 1

    def send(self, msg: dict[str, Any], intended_ns: int, measured: bool) -> None:
        assert self.ws is not None
        now = time.perf_counter_ns()
        origin = min(intended_ns, now)     # late: from the schedule; early: the real send
        self.pending[msg.get("client_id")].append((origin, measured))
        if msg["type"] == "ask":
            self.open.add(msg["client_id"])
            if msg.get("tif", "ioc") in ("ioc", "fok"):
                self.asks[msg["client_id"]] = (origin, measured)   # answered now or never
        self.run.rec.record_send(intended_ns, now, measured)
        self.ws.send(_encode(msg))

    def read(self, ref: str, intended_ns: int, measured: bool) -> None:
        """Ask for one's 5 latest loans, as the board does at every sign-in."""
        assert self.ws is not None
        now = time.perf_counter_ns()
        self.reads[ref] = (min(intended_ns, now), measured)
        self.run.rec.reads_sent += 1
        self.ws.send(_encode({"type": "fills", "limit": 5, "ref": ref}))

    def _on_message(self, data: bytes, now: int) -> None:
        if self._welcome is not None:
            welcome, self._welcome = self._welcome, None
            if b'"welcome"' in data:
                welcome.set_result(None)
            else:
                welcome.set_exception(RuntimeError(
                    f"participant {self.who.id} was not welcomed: {data!r}"))
            return
        rec = self.run.rec
        if data.startswith(b'{"type":"book"'):       # a watcher's: counted, not read
            rec.books += 1
            return
        event = _decode(data)
        if isinstance(event, wire.Accepted | wire.Rejected):
            queue = self.pending.get(event.client_id)
            if not queue:                   # an answer to nothing this client sent
                rec.unmatched += 1
                return
            origin, measured = queue.popleft()
            if not queue:                   # one entry per id ever sent would add up
                del self.pending[event.client_id]
            code = event.code if isinstance(event, wire.Rejected) else None
            if code is not None and event.client_id is not None:     # the ask ended
                self.open.discard(event.client_id)
                self.asks.pop(event.client_id, None)
            rec.record_ack(origin, now, code, measured)
            if measured:      # the same, stamped when this callback runs (ArrivalClock)
                rec.ack_handled.add(max(1, (time.perf_counter_ns() - origin) // 1000))
            self.run.step_ack(origin, now, measured)
            self.run.outstanding -= 1
        elif isinstance(event, wire.Fill):
            if self.role == "sme":
                rec.fills.seen(SME, event.trade_id, event.amount, event.funder, event.sme)
                first = self.asks.pop(event.client_id, None)
                if first is not None and first[1]:
                    rec.ask_fill.add(max(1, (now - first[0]) // 1000))
                rec.second(now).fills += 1
            else:
                rec.fills.seen(FUNDER, event.trade_id, event.amount, event.funder, event.sme)
                rec.lent[(event.funder, event.core)] += event.amount
        elif isinstance(event, wire.Done):
            if self.role == "funder":
                self.run.market.funders[self.index].live.pop(event.client_id, None)
            else:
                self.asks.pop(event.client_id, None)
                self.open.discard(event.client_id)
        elif isinstance(event, wire.FillPage | wire.Error) and event.ref in self.reads:
            origin, measured = self.reads.pop(event.ref)
            if isinstance(event, wire.Error):
                rec.reads_refused[event.code] += 1
                return
            rec.reads_answered += 1
            if measured:
                rec.fills_page.add(max(1, (now - origin) // 1000))
        elif isinstance(event, wire.Error):
            if event.ref == FOLLOW:
                rec.follows_refused[event.code] += 1
            else:
                rec.errors_unmatched[event.code] += 1


class Run:
    """Connect, open the market, offer the load, drain, reconcile."""

    def __init__(self, profile: Profile, url: str, redis_url: str, shard: str,
                 funders: list[Participant], smes: list[Participant]) -> None:
        self.profile = profile
        self.url = url
        self.arrivals = wsclient.ArrivalClock()   # shared by all connections: one stamp per poll
        self.http = re.sub(r"^ws", "http", url).rsplit("/ws", 1)[0]
        self.redis_url = redis_url
        self.keys = Keys(shard)
        self.rec = Recorder(fills=FillLedger({p.id for p in funders}, {p.id for p in smes}))
        self.run_id = f"lt{time.time_ns() // 1_000_000 % 10**9}"
        self.funders = [Client(self, p, "funder", i) for i, p in enumerate(funders)]
        self.smes = [Client(self, p, "sme", i) for i, p in enumerate(smes)]
        self.segments = self._segments()
        self.following = _encode({"type": "subscribe", "ref": FOLLOW,
                                  "segments": [s.id for s in self.segments]})
        for watcher in self.smes[:profile.watchers]:
            watcher.watching = True
        self.market = Market(self.segments, len(funders), len(smes), profile.seed,
                             profile.bids_per_funder, self.run_id)
        self.lines: dict[tuple[int, str], int] = {}
        self.steps = [Step(rate) for rate in profile.steps()]
        self.offered: dict[int, int] = defaultdict(int)
        self.outstanding = 0
        self.away = 0                   # SMEs signing in again (`offer_reconnects`)
        self.memory: list[list[float]] = []          # [s, server RSS]
        self.redis_memory: list[list[float]] = []    # [s, Redis's used_memory]
        self._measure_wall_ns = 0
        self.server: dict[str, dict[str, Any] | None] = {}
        self.cpu: dict[str, float] = {}
        self.redis_time: dict[str, Any] = {}
        self._redis_samples: list[dict[str, Any]] = []     # INFO cpu and commandstats

    def _segments(self) -> list[Segment]:
        with urllib.request.urlopen(f"{self.http}/v1/segments", timeout=10) as r:
            rows = msgspec.json.decode(r.read())
        return [Segment(s["id"], s["core"], s["tenor_days"]) for s in rows]

    def step_ack(self, origin: int, now: int, measured: bool) -> None:
        """Count an ack in the ramp's steps. Latest first, and no further back than the
        step that ended before the command was scheduled (it and those before it can
        hold neither time): one or two steps an ack, not all of them, at the rates
        where the generator's CPU is what limits the run."""
        if not measured:
            return
        for step in reversed(self.steps):
            if not step.end_ns:             # not reached yet
                continue
            if step.end_ns <= origin:
                return
            step.record(origin, now)

    def _send(self, client: Client, msg: dict[str, Any], intended_ns: int,
              measured: bool) -> None:
        self.outstanding += 1
        client.send(msg, intended_ns, measured)

    async def _cpu(self) -> dict[str, float]:
        """`cpu_seconds`; Redis's CPU and its time by command are kept for `redis_time`."""
        redis = aioredis.Redis.from_url(self.redis_url)
        try:
            info: dict[str, Any] = await redis.info("cpu")
            self._redis_samples.append({**info, **await redis.info("commandstats")})
        except (OSError, aioredis.RedisError):
            info = {}
        finally:
            await redis.aclose()
        return await asyncio.to_thread(cpu_seconds, self.http, self.redis_url, info)

    async def _await_acks(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.outstanding > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # --- phases ---

    async def open_market(self) -> None:
        """Credit lines for every funder and core, then each funder's opening bids."""
        now = time.perf_counter_ns()
        for client in self.funders:
            for core in sorted({s.core for s in self.segments}):
                self.lines[(client.who.id, core)] = self.profile.credit_line
                self._send(client, {"type": "set_credit_line", "core": core,
                                          "amount": self.profile.credit_line}, now, False)
        await self._await_acks(30)
        for client, state in zip(self.funders, self.market.funders, strict=True):
            for _ in range(self.profile.bids_per_funder):
                self._send(client, self.market.bid(state), now, False)
        await self._await_acks(30)

    async def offer(self, t0: int) -> None:
        """The open-loop schedule, step after step, from `t0` (perf_counter ns)."""
        p = self.profile
        rng = self.market.rng
        # The times have a generator of their own: they are drawn as the run goes (see
        # `arrivals`), and the content's draws depend on what the server answered.
        times_rng = random.Random(p.seed + 2)
        offset = 0.0
        late = 0
        for k, step in enumerate(self.steps):
            warm = p.warmup_s if k == 0 else 0.0
            times = arrivals(step.offered, offset, offset + warm + p.duration_s, times_rng)
            step.start_ns = t0 + int((offset + warm) * 1e9)
            step.end_ns = t0 + int((offset + warm + p.duration_s) * 1e9)
            for t in times:
                intended = t0 + int(t * 1e9)
                measured = intended >= step.start_ns
                if measured:
                    self.offered[int((intended - t0) // 1_000_000_000)] += 1
                wait = intended - EARLY_NS - time.perf_counter_ns()
                if wait > 0:
                    await asyncio.sleep(wait / 1e9)
                    late = 0
                else:
                    late += 1
                    if late % 16 == 0:     # behind schedule: let the clients read, now
                        await asyncio.sleep(0)     # and then (each yield costs a loop turn)
                if rng.random() < p.ask_share:
                    sme, msg = self.market.ask()
                    self._send(self._sme(sme), msg, intended, measured)
                else:
                    f: FunderState = rng.choice(self.market.funders)
                    self._send(self.funders[f.index], self.market.requote(f), intended,
                                     measured)
            step.backlog = self.outstanding
            offset += warm + p.duration_s

    async def offer_reads(self, t0: int) -> None:
        """SMEs' `fills` requests, open loop on a schedule of their own (a separate seeded
        generator: the commands' schedule stays the one without reads)."""
        p = self.profile
        if p.reads <= 0:
            return
        rng = random.Random(p.seed + 1)
        total = p.warmup_s + p.duration_s * len(self.steps)
        for n, t in enumerate(arrivals(p.reads, 0.0, total, rng)):
            intended = t0 + int(t * 1e9)
            wait = intended - EARLY_NS - time.perf_counter_ns()
            if wait > 0:
                await asyncio.sleep(wait / 1e9)
            self._sme(rng.randrange(len(self.smes))).read(
                f"r{n}", intended, intended >= t0 + int(p.warmup_s * 1e9))

    def _sme(self, index: int) -> Client:
        """SME `index`, or the next one that is not away (`offer_reconnects` always
        leaves one)."""
        n = len(self.smes)
        for k in range(n):
            client = self.smes[(index + k) % n]
            if not client.away:
                return client
        raise AssertionError("every SME is away")

    async def offer_reconnects(self, t0: int) -> None:
        """SMEs leaving and signing in again, open loop on a schedule of its own: each
        time the first idle SME from a random one (an SME with an ask under way stays,
        so every fill is still seen by the three views); every other one drops its
        connection without a close frame."""
        p = self.profile
        if p.reconnects <= 0:
            return
        rng = random.Random(p.seed + 3)
        total = p.warmup_s + p.duration_s * len(self.steps)
        n = len(self.smes)
        going: set[asyncio.Task[None]] = set()
        for k, t in enumerate(arrivals(p.reconnects, 0.0, total, rng)):
            wait = t0 + int(t * 1e9) - time.perf_counter_ns()
            if wait > 0:
                await asyncio.sleep(wait / 1e9)
            if self.away >= n - 1:
                continue                              # one stays to take the asks
            first = rng.randrange(n)
            client = next((c for j in range(n) if (c := self.smes[(first + j) % n]).idle()),
                          None)
            if client is not None:
                client.away = True
                self.away += 1
                task = asyncio.get_running_loop().create_task(client.reconnect(drop=k % 2 == 1))
                going.add(task)
                task.add_done_callback(going.discard)
        await asyncio.gather(*going)

    async def _await_reads(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(c.reads for c in self.smes) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def platform_reader(self, stop: asyncio.Event, start_id: str) -> None:
        """The platform's view: every fill on the Redis stream, and how late it arrived.

        Plain XREAD on a lean connection (hiredis parses the reply, no per-entry Python
        decoding): it reads thousands of fills a second on the cores it measures.
        """
        url_client = aioredis.Redis.from_url(self.redis_url)
        conn = resp.Connection.like(url_client)
        await url_client.aclose()
        key = self.keys.fills.encode()
        last = start_id.encode()
        try:
            while True:
                reply = await conn.call(resp.pack(b"XREAD", b"COUNT", b"1000", b"BLOCK", b"50",
                                                  b"STREAMS", key, last))
                if not reply:
                    if stop.is_set():
                        return
                    continue
                now = time.time_ns()
                for entry_id, flat in reply[0][1]:
                    last = entry_id
                    fields = dict(zip(flat[::2], flat[1::2], strict=True))
                    self.rec.fills.seen(PLATFORM, entry_id.decode(), int(fields[b"amount"]),
                                        int(fields[b"funder"]), int(fields[b"sme"]))
                    ts = int(fields[b"ts"])
                    if ts >= self._measure_wall_ns > 0:
                        self.rec.platform.add(max(1, (now - ts) // 1000))
        finally:
            conn.close()

    async def sample_memory(self, stop: asyncio.Event) -> None:
        """The server's RSS and Redis's memory every 5 s: the journal's archive and
        fill retention are what keep the second from growing with every command."""
        start = time.monotonic()
        redis = aioredis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            while not stop.is_set():
                rss = await asyncio.to_thread(server_rss, self.http)
                t = round(time.monotonic() - start, 1)
                if rss is not None:
                    self.memory.append([t, rss])
                with contextlib.suppress(OSError, aioredis.RedisError):
                    info: dict[str, Any] = await redis.info("memory")
                    self.redis_memory.append([t, float(info["used_memory"])])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 5)
        finally:
            await redis.aclose()

    async def sample_stolen(self, stop: asyncio.Event) -> None:
        """The machine's stolen CPU time second by second of the run (`Recorder.stolen_ms`):
        on a shared VM a slow second is often one when the hypervisor ran someone else."""
        start = self.rec.start_ns
        await asyncio.sleep(max(0.0, (start - time.perf_counter_ns()) / 1e9))
        last = machine_stolen()
        n = 0
        while last is not None and not stop.is_set():
            n += 1
            due = (start + n * 1_000_000_000 - time.perf_counter_ns()) / 1e9
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, due))
            now = machine_stolen()
            if now is None:
                return
            self.rec.stolen_ms[n - 1] = (now - last) * 1000
            last = now

    async def progress(self, stop: asyncio.Event, total_s: float) -> None:
        tty = sys.stderr.isatty()
        started = time.monotonic()
        last_print = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            elapsed = time.monotonic() - started
            sec = self.rec.seconds.get(int((time.perf_counter_ns() - self.rec.start_ns) / 1e9) - 1)
            p99 = sec.ack.percentile(99) / 1000 if sec and sec.acked else 0.0
            rate = sec.acked if sec else 0
            line = (f"[{elapsed:6.1f}/{total_s:.0f}s] {rate:>7,} acks/s  p99 {p99:7.2f} ms  "
                    f"sent {self.rec.sent:,}  fills {self.rec.fills.count[SME]:,}")
            if tty:
                sys.stderr.write("\r" + line)
                sys.stderr.flush()
            elif elapsed - last_print >= 5:
                print(line, file=sys.stderr, flush=True)
                last_print = elapsed
        if tty:
            sys.stderr.write("\n")

    async def execute(self) -> dict[str, Any]:
        p = self.profile
        redis = aioredis.Redis.from_url(self.redis_url)
        newest: Any = await redis.xrevrange(self.keys.fills, count=1)
        await redis.aclose()
        start_id = newest[0][0].decode() if newest else "0-0"
        clients = self.funders + self.smes
        # Set on the way out, however the run ends: the background tasks end on it by
        # themselves. A run that fails is left to `asyncio.run` to cancel them, and
        # redis-py can lose a cancellation that lands in a command (service/tasks.py),
        # which would keep the platform reader polling and the generator from exiting.
        stop = asyncio.Event()
        try:
            for i in range(0, len(clients), 200):    # connect in waves, not all at once
                await asyncio.gather(*(c.connect() for c in clients[i:i + 200]))
            gctune.tune()           # the generator must not stall either
            reader = asyncio.get_running_loop().create_task(self.platform_reader(stop, start_id))
            memory = asyncio.get_running_loop().create_task(self.sample_memory(stop))
            await self.open_market()
            total = p.warmup_s + p.duration_s * len(self.steps)
            progress = asyncio.get_running_loop().create_task(self.progress(stop, total))
            buckets = await asyncio.to_thread(server_buckets, self.http)
            cpu_before, cpu_start = await self._cpu(), time.monotonic()
            t0 = self.rec.start_ns = time.perf_counter_ns() + 50_000_000
            # Fills of measured commands only, as for the acks: the warm-up's are not.
            self._measure_wall_ns = time.time_ns() + 50_000_000 + int(p.warmup_s * 1e9)
            stolen = asyncio.get_running_loop().create_task(self.sample_stolen(stop))
            await asyncio.gather(self.offer(t0), self.offer_reads(t0), self.offer_reconnects(t0))
            await self._await_acks(30)
            await self._await_reads(30)
            # Let the platform reader catch up with every fill the clients saw.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.rec.fills.platform_behind():
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            after = await asyncio.to_thread(server_buckets, self.http)
            self.server = {key: server_view(buckets.get(key, {}), after.get(key, {}))
                           for key in SERVER_HISTOGRAMS}
            cpu_after, seconds = await self._cpu(), time.monotonic() - cpu_start
            self.cpu = cpu_shares(cpu_before, cpu_after, seconds)
            if len(self._redis_samples) == 2:
                self.redis_time = redis_time(*self._redis_samples[:2])
            stop.set()
            await asyncio.gather(reader, memory, progress, stolen)
        finally:
            stop.set()
            for i in range(0, len(clients), 500):
                await asyncio.gather(*(c.ws.close() for c in clients[i:i + 500]
                                       if c.ws is not None))
        return self.results()

    def results(self) -> dict[str, Any]:
        p = self.profile
        rec = self.rec
        lag = summary(rec.lag, "generator lag behind schedule")
        lag_ok = lag["p99"] <= p.max_lag_p99_ms
        recon = rec.reconcile(self.lines)
        ramp = None
        capacity = sustained = None
        if p.ramp:
            ramp = [step.row(p.duration_s, p.objective_p99_ms) for step in self.steps]
            passing = [r["offered"] for r in ramp if r["ok"]]
            capacity = max(passing) if passing else None
            sustained = sustained_rate(ramp)
        memory: dict[str, Any] | None = None
        if self.memory:
            memory = {"rss_start": self.memory[0][1], "rss_end": self.memory[-1][1],
                      "samples": self.memory}
        if self.redis_memory:
            used = [m for _, m in self.redis_memory]
            memory = {**(memory or {}), "redis_start": used[0], "redis_end": used[-1],
                      "redis_peak": max(used), "redis_samples": self.redis_memory}
        return {
            "profile": p.name,
            "ok": bool(recon["ok"] and lag_ok),
            "duration_s": p.warmup_s + p.duration_s * len(self.steps),
            "measured_s": p.duration_s * len(self.steps),
            "measures": {
                "ack": summary(rec.ack, "send → accepted"),
                "ack_handled": summary(rec.ack_handled, "send → accepted, stamped when handled"),
                "ask_fill": summary(rec.ask_fill, "SME ask sent → fill received"),
                "platform": summary(rec.platform, "command received → fill read by the platform"),
                **({"fills_page": summary(rec.fills_page, "SME fills sent → page received")}
                   if p.reads > 0 else {}),
                **({"sign_in": summary(rec.sign_in, "SME back: connect → welcome")}
                   if p.reconnects > 0 else {}),
            },
            "timeline": rec.timeline(dict(self.offered)),
            "watchers": {"connections": min(p.watchers, len(self.smes)), "books": rec.books},
            "ramp": ramp,
            "capacity": capacity,
            "sustained": sustained,
            "objective_p99_ms": p.objective_p99_ms,
            "lag": {"p50": lag["p50"], "p99": lag["p99"], "max": lag["max"],
                    "limit_p99": p.max_lag_p99_ms, "ok": lag_ok},
            "reconciliation": recon,
            "memory": memory,
            "cpu": self.cpu or None,
            "redis_time": self.redis_time or None,
            **{key: self.server.get(key) for key in SERVER_HISTOGRAMS},
        }


def _metrics(http: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{http}/metrics", timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return None


def cpu_seconds(http: str, redis_url: str, redis_info: dict[str, Any]) -> dict[str, float]:
    """CPU seconds used so far by each process of the run that can be found: the
    generator (this process), the server (its Prometheus metrics, so also when remote),
    its Redis (`INFO cpu`, main process) and, on this machine, each snapshotter that
    follows a Redis on that port (`snapshotter/<pid>`); and `stolen`, the time the
    hypervisor ran other guests on this machine's CPUs while this one wanted them (the
    steal column of /proc/stat, all CPUs added): what tells a slow hour on a shared VM
    from a slow build."""
    out = {"generator": time.process_time()}
    stolen = machine_stolen()
    if stolen is not None:
        out["stolen"] = stolen
    m = re.search(r"^process_cpu_seconds_total ([0-9.e+]+)$", _metrics(http) or "", re.M)
    if m:
        out["server"] = float(m.group(1))
    if "used_cpu_user" in redis_info:
        out["redis"] = float(redis_info["used_cpu_user"]) + float(redis_info["used_cpu_sys"])
    port, tick = urlsplit(redis_url).port or 6379, os.sysconf("SC_CLK_TCK")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"snapshotter" not in args:
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
            urls = [a.split(b"=", 1)[1] for a in env if a.startswith(b"MATCHER_REDIS_URL=")]
            urls += [args[i + 1] for i, a in enumerate(args[:-1]) if a == b"--redis-url"]
            if not any((urlsplit(u.decode()).port or 6379) == port for u in urls):
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        out[f"snapshotter/{proc.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def machine_stolen(stat: Path = Path("/proc/stat")) -> float | None:
    """Seconds of steal time of all CPUs since boot (None where the kernel does not
    report it)."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def redis_time(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Where Redis's CPU went between two samples of `INFO cpu` and `INFO commandstats`:
    its CPU seconds and the kernel's part of them, and each command's calls, time per
    call and share of that CPU, largest first. A script's time includes the commands it
    runs, which are also counted on their own."""
    def cpu(sample: dict[str, Any], part: str) -> float:
        return float(sample.get(f"used_cpu_{part}", 0.0))
    sys_s = cpu(after, "sys") - cpu(before, "sys")
    cpu_s = cpu(after, "user") - cpu(before, "user") + sys_s
    out: dict[str, Any] = {"cpu_s": round(cpu_s, 3), "sys_s": round(sys_s, 3),
                           "commands": []}
    for key, now in after.items():
        if not key.startswith("cmdstat_") or cpu_s <= 0:
            continue
        then = before.get(key, {"calls": 0, "usec": 0})
        calls, usec = now["calls"] - then["calls"], now["usec"] - then["usec"]
        if calls > 0:
            out["commands"].append({"command": key.removeprefix("cmdstat_"), "calls": calls,
                                    "us_per_call": round(usec / calls, 1),
                                    "share": round(usec / 1e6 / cpu_s, 4)})
    out["commands"].sort(key=lambda c: -c["share"])
    return out


def cpu_shares(before: dict[str, float], after: dict[str, float],
               seconds: float) -> dict[str, float]:
    """Each process's share of one core between two `cpu_seconds` samples. Processes
    are counted only if in both (a snapshotter that restarted between them is left
    out); the snapshotters are added up as `snapshotter`."""
    shares: dict[str, float] = {}
    for key in after:
        if key in before and seconds > 0:
            name = key.split("/", 1)[0]
            shares[name] = shares.get(name, 0.0) + (after[key] - before[key]) / seconds
    return {name: round(share, 4) for name, share in shares.items()}


def server_rss(http: str) -> float | None:
    """The server's resident memory, from its Prometheus metrics."""
    text = _metrics(http)
    m = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text or "", re.M)
    return float(m.group(1)) if m else None


#: The server's histograms the report reads: its own latency (receive to reply released),
#: its event loop's lag (how long a message that arrives waits before it is read) and
#: its journal writes (send to Redis's answer: the part of every ack that is Redis's).
SERVER_HISTOGRAMS = {"server_view": "matcher_command_latency_seconds",
                     "server_loop_lag": "matcher_event_loop_lag_seconds",
                     "server_journal": "matcher_journal_write_seconds"}


def server_buckets(http: str) -> dict[str, dict[str, float]]:
    """Each of `SERVER_HISTOGRAMS`, cumulative counts by bucket bound."""
    text = _metrics(http) or ""
    out = {}
    for key, name in SERVER_HISTOGRAMS.items():
        pattern = re.compile(rf'^{name}_bucket\{{le="([^"]+)"\}} ([0-9.e+]+)$', re.M)
        out[key] = {le: float(n) for le, n in pattern.findall(text)}
    return out


def server_view(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """The share of the run's observations within each bucket bound: for the latency,
    the server's side of it, without the network and the generator."""
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    if total <= 0:
        return None
    within = [[float(le) * 1000, (n - before.get(le, 0.0)) / total]
              for le, n in after.items() if le != "+Inf"]
    return {"count": int(total), "within_ms": sorted(within)}
