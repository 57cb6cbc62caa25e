"""A market that moves by itself, for the demo: funders re-quote, SMEs finance, the
platform repays.

Without it the demo's board shows the opening bids and nothing else happens until
someone acts. With `[demo] activity` above zero (the packaged demo: two commands a
second), `matcher serve` starts `matcher demo-market` beside it: a client like any
other, in a process of its own, speaking the public WebSocket API with the demo's keys.
The engine and the gateway know nothing of it; stop it and the market is as it was.

- A dozen demo funders each keep one GTC bid in some segments and re-quote it (`amend`)
  around a rate that drifts by a basis point at a time, within the segment's range;
  one whose bid ended (lent in full, halted, suspended) bids again.
- Forty demo SMEs finance receivables of about 1.5 million CNY (log-normal), as IOC
  asks capped a little above the going rate, as the board's "Finance now" does.
- The platform repays what each demo funder has lent, `repay_after_s` after it saw
  it lent: the admin reads every lender's lines (`status`) every few seconds, and what
  a line has lent and not been repaid falls due as the running total `repaid + used`.
  So the demo's lines do not run dry, whoever borrowed, even loans made while the market
  was not running.

What to send is decided by `Script`, which does no I/O (a seeded random generator and
what it was told), so that it can be tested alone; `run` connects and sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from service.children import Supervised

log = logging.getLogger("matcher.demo_market")

#: How many of the demo's funders and SMEs take part: enough for a lively board, few
#: enough connections to be nothing for the gateway.
FUNDERS, SMES = 12, 40
#: Share of commands that are a funder's (re-)quote; the rest are SMEs' asks.
REQUOTE_SHARE = 0.65
#: Rates (bps) the drift stays in, before each segment's cap and its tenor's premium.
RATE_FLOOR, RATE_CEILING = 215, 300
#: Seconds a halted segment, or a suspended participant, is left alone after a refusal.
PAUSE_S = 30.0
#: Seconds between two reads of a lender's lines (at most; less when loans are repaid
#: sooner than that).
SWEEP_S = 10.0


@dataclass(frozen=True)
class Market:
    """A segment as `GET /v1/segments` lists it."""

    id: str
    core: str
    tenor_days: int
    rate_cap_bps: int


class Script:
    """What the market sends next, from a seeded generator and what it was told.

    `prefix` starts every client id it makes: a new one per run, so that ids never meet
    those of an earlier run (a resting order's id cannot be reused). `now` is the
    caller's clock (seconds), given with what depends on time."""

    def __init__(self, markets: Iterable[Market], funders: list[int], smes: list[int], *,
                 prefix: str, seed: int = 2026, repay_after_s: float = 60.0,
                 lenders: Iterable[int] = (), sweep_s: float | None = None) -> None:
        self.markets = sorted(markets, key=lambda m: m.id)
        if not self.markets or not funders or not smes:
            raise ValueError("a demo market needs segments, funders and SMEs")
        self.funders, self.smes = funders, smes
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.repay_after_s = repay_after_s
        # Each segment's going rate: the opening bids' level (`Service._seed_bids`).
        self.mid = {m.id: min(self._premium(m) + 40, m.rate_cap_bps) for m in self.markets}
        self.live: dict[tuple[int, str], str] = {}     # (funder, segment) -> its bid's id
        self._unanswered: set[str] = set()             # bids not yet accepted or refused
        self._sent: dict[str, tuple[int, str, str]] = {}   # id -> who, segment, type
        # participant, segment, or (funder, core) without a line there -> until when
        self._paused: dict[int | str | tuple[int, str], float] = {}
        self._core = {m.id: m.core for m in self.markets}
        self.repaid: dict[tuple[int, str], int] = {}   # (funder, core) -> total reported
        # Lines are read every `sweep_s`: a loan is repaid `repay_after_s` to that much
        # more after it was made.
        self.sweep_s = sweep_s if sweep_s is not None else min(repay_after_s, SWEEP_S)
        order = sorted(lenders)
        # When each is read, first as offsets into the first sweep (from the first call).
        self._next_read = {funder: n * self.sweep_s / len(order)
                           for n, funder in enumerate(order)}
        self._sweeping = False
        self._due: deque[tuple[float, int, str, int]] = deque()   # (when, funder, core, total)
        self._n = 0

    @staticmethod
    def _premium(market: Market) -> int:
        """The floor of the segment's rates: longer tenors cost more."""
        return RATE_FLOOR + market.tenor_days // 6

    def _client_id(self) -> str:
        self._n += 1
        return f"{self.prefix}-{self._n}"

    def _open(self, who: int | str | tuple[int, str], now: float) -> bool:
        return self._paused.get(who, 0.0) <= now

    def next(self, now: float) -> tuple[int, dict[str, Any]] | None:
        """The next command and the participant to send it as; None when the one drawn
        is paused (its segment halted, or it suspended)."""
        market = self.rng.choice(self.markets)
        low = min(self._premium(market), market.rate_cap_bps)
        high = min(RATE_CEILING + market.tenor_days // 6, market.rate_cap_bps)
        mid = self.mid[market.id] = max(low, min(high, self.mid[market.id]
                                                 + self.rng.choice((-1, 0, 0, 1))))
        requote = self.rng.random() < REQUOTE_SHARE
        who = self.rng.choice(self.funders if requote else self.smes)
        if not (self._open(market.id, now) and self._open(who, now)
                and self._open((who, market.core), now)):
            return None
        message: dict[str, Any]
        client_id = self.live.get((who, market.id)) if requote else None
        if client_id in self._unanswered:
            return None          # amended once placed: an answer names the command it is of
        kind = "amend" if client_id is not None else "bid" if requote else "ask"
        if client_id is None:
            client_id = self._client_id()
        if requote:
            message = {"type": kind, "client_id": client_id,
                       "rate_bps": max(0, min(market.rate_cap_bps,
                                              mid + self.rng.randrange(-3, 10))),
                       "amount": self.rng.randrange(2, 21) * 100_000_000}  # 2-20 M CNY
            if kind == "bid":
                message.update(segment=market.id, tif="gtc")
                self.live[(who, market.id)] = client_id
                self._unanswered.add(client_id)
        else:
            yuan = round(self.rng.lognormvariate(math.log(1_500_000), 0.6) / 10_000) * 10_000
            message = {"type": "ask", "client_id": client_id, "segment": market.id,
                       "amount": max(100_000, min(20_000_000, yuan)) * 100, "tif": "ioc",
                       "max_rate_bps": min(market.rate_cap_bps, mid + 15)}
        self._sent[client_id] = (who, market.id, kind)
        return who, message

    def answered(self, client_id: str | None, code: str | None, now: float) -> None:
        """`accepted` (code None) or `rejected` for one of its commands. A refused bid
        never rested, and an amend refused because its bid has ended is of no bid: the
        funder bids afresh next time. A halted segment, or a suspended participant, is
        left alone for a while instead of being refused again and again, and so is a
        funder without a line against a core enterprise, there; a flow-control
        refusal (`rate_limited`, `unavailable`) leaves a resting bid resting."""
        sent = self._sent.pop(client_id, None) if client_id is not None else None
        if sent is None:
            return
        self._unanswered.discard(client_id)
        if code is None:
            return
        who, segment, kind = sent
        if code == "segment_halted":
            self._paused[segment] = now + PAUSE_S
        elif code == "suspended":
            self._paused[who] = now + PAUSE_S
        elif code == "no_credit_line":           # until someone sets one
            self._paused[(who, self._core[segment])] = now + PAUSE_S
        if kind == "bid" or (kind == "amend" and code in ("not_resting", "unknown_order")):
            self.ended(who, segment, client_id)

    def done(self, client_id: str | None) -> None:
        """A bid of the market's is over (lent in full, halted, suspended, cancelled)."""
        for key, resting in list(self.live.items()):
            if resting == client_id:
                del self.live[key]

    def ended(self, who: int, segment: str, client_id: str | None) -> None:
        if self.live.get((who, segment)) == client_id:
            del self.live[(who, segment)]

    def reads(self, now: float) -> list[int]:
        """Lenders whose lines are to be read now (the admin's `status`), each about
        every `sweep_s`, spread over the sweep so that they do not come all at once."""
        if not self._sweeping:
            self._sweeping = True
            self._next_read = {funder: now + at for funder, at in self._next_read.items()}
        due = [funder for funder, at in self._next_read.items() if at <= now]
        for funder in due:
            self._next_read[funder] = math.inf          # until its lines are read
        return due

    def unread(self, funder: int, now: float) -> None:
        """A read that failed: asked again at the next sweep."""
        self._next_read[funder] = now + self.sweep_s

    def lines_read(self, funder: int, lines: Iterable[dict[str, int | str]],
                   now: float) -> None:
        """A lender's lines as the engine counts them (`status`): what it has lent and
        not yet been repaid (`used`) falls due `repay_after_s` from now, as the total
        `repaid + used`. Lent, whoever borrowed, and even while the market was not
        running: a loan that a stop or a refused `repay` left unpaid is repaid by the
        next read."""
        self._next_read[funder] = now + self.sweep_s
        for line in lines:
            key = (funder, str(line["core"]))
            repaid, used = int(line["repaid"]), int(line["used"])
            # The engine's count: lower than a total sent only if that one was refused
            # (or is still on its way: sent again, it is a `duplicate`, changing nothing).
            self.repaid[key] = repaid
            if used > 0:
                self._due.append((now + self.repay_after_s, funder, key[1], repaid + used))

    def repayments(self, now: float) -> list[dict[str, Any]]:
        """A `repay` for each line with a total that fell due by `now` and goes beyond
        what was reported before. Such a total is never more than the engine can free:
        what the line had lent and not been repaid when it was read is still lent, or
        was repaid since (the platform's totals only grow)."""
        totals: dict[tuple[int, str], int] = {}
        while self._due and self._due[0][0] <= now:
            _, funder, core, total = self._due.popleft()
            totals[(funder, core)] = max(totals.get((funder, core), 0), total)
        out = []
        for key, total in totals.items():
            if total > self.repaid.get(key, 0):
                self.repaid[key] = total
                out.append({"type": "repay", "funder": key[0], "core": key[1],
                            "repaid_total": total})
        return out


# --- I/O: connections to the gateway -----------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """The keys the market signs in with: funders and SMEs by id, and the platform's
    and the admin's (without both: no repayments); and the funders whose lines are
    repaid (every demo funder, not only those that trade here)."""

    funders: dict[int, str]
    smes: dict[int, str]
    platform: str | None
    admin: str | None
    lenders: tuple[int, ...] = ()


async def run(url: str, keys: Keys, rate: float, *, repay_after_s: float = 60.0,
              parent: int = 0, seed: int | None = None) -> int:
    """Send `rate` commands a second until a connection closes (the gateway stops or
    dropped it) or `parent` is no longer ours: 0 then, 1 when a connection closed or
    could not be made (the gateway that supervises it starts it again; one whose
    connections closed because it went has nobody left to)."""
    try:
        return await _run(url, keys, rate, repay_after_s, parent, seed)
    except (aiohttp.ClientError, OSError, RuntimeError) as exc:   # one line, not a trace
        log.error("demo market: %s: %s", type(exc).__name__, exc)
        return 1


async def _run(url: str, keys: Keys, rate: float, repay_after_s: float, parent: int,
               seed: int | None) -> int:
    http = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    http = http.rsplit("/ws", 1)[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{http}/v1/segments") as resp:
            if resp.status != 200:
                log.error("demo market: GET /v1/segments answered %d", resp.status)
                return 1
            markets = [Market(s["id"], s["core"], s["tenor_days"], s["rate_cap_bps"])
                       for s in await resp.json()]
        conns = {pid: await _signed_in(session, url, key)
                 for pid, key in {**keys.funders, **keys.smes}.items()}
        repaying = keys.platform is not None and keys.admin is not None
        if not repaying:
            log.warning("demo market: no platform or admin key with a plain `key` in the "
                        "configuration: loans are not repaid")
        platform = await _signed_in(session, url, keys.platform) if repaying else None
        admin = await _signed_in(session, url, keys.admin) if repaying else None
        script = Script(markets, sorted(keys.funders), sorted(keys.smes),
                        prefix=f"live{time.time_ns() // 1000 % 10**12:x}",
                        seed=seed if seed is not None else time.time_ns(),
                        repay_after_s=repay_after_s,
                        lenders=keys.lenders if repaying else ())
        for funder in keys.funders:
            await _withdraw_earlier(conns[funder])
        closed: asyncio.Event = asyncio.Event()
        tasks = [asyncio.create_task(_read(ws, closed, _trader(script))) for ws in conns.values()]
        if platform is not None:
            repayer = _Repayer(script, platform, admin)
            tasks += [asyncio.create_task(_read(platform, closed, repayer.on_platform)),
                      asyncio.create_task(_read(admin, closed, repayer.on_admin)),
                      asyncio.create_task(repayer.run(closed))]
        log.info("demo market: %d funders and %d SMEs, %.1f commands a second",
                 len(keys.funders), len(keys.smes), rate)
        try:
            gone = await _send(conns, script, rate, closed, parent)
        finally:
            for task in tasks:
                task.cancel()
            for ws in [*conns.values(), *(c for c in (platform, admin) if c is not None)]:
                await ws.close()
    if not gone:
        log.warning("demo market: a connection closed; it ends")
    return 0 if gone else 1


async def _signed_in(session: Any, url: str, key: str | None) -> Any:
    ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {key}"},
                                  heartbeat=None, autoping=True)
    welcome = await _answer(ws, "welcome")
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"not signed in: {welcome}")
    return ws


async def _answer(ws: Any, type_: str) -> dict[str, Any]:
    """The next message of `type_` (book updates and fills may come first), or `error`."""
    while True:
        msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"the connection closed ({ws.close_code})")
        event: dict[str, Any] = json.loads(msg.data)
        if event.get("type") in (type_, "error"):
            return event


async def _withdraw_earlier(ws: Any) -> None:
    """Cancel the bids an earlier run left resting (their ids are of its prefix)."""
    await ws.send_str(json.dumps({"type": "status"}))
    status = await _answer(ws, "status")
    for order in status.get("orders", ()):
        if order["client_id"].startswith("live") and order["side"] == "bid":
            await ws.send_str(json.dumps({"type": "cancel", "client_id": order["client_id"]}))


async def _read(ws: Any, closed: asyncio.Event,
                handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Hand each message to `handle`; set `closed` when the connection ends."""
    try:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await handle(json.loads(msg.data))
    except Exception:
        log.exception("demo market: reading a connection failed")
    finally:
        closed.set()


def _trader(script: Script) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """What a funder or an SME hears that the script needs: answers and ends."""
    async def handle(event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("accepted", "rejected"):
            script.answered(event.get("client_id"), event.get("code"), time.monotonic())
        elif kind == "done":
            script.done(event.get("client_id"))
    return handle


class _Repayer:
    """The admin's reads of the lenders' lines, and the platform's repayments. The
    admin sends nothing but these `status` requests, and the gateway answers a
    connection's messages in order, one answer each (`status`, or `error`): so the
    answers are matched to the funders asked, oldest first (a `status` does not say
    whose it is)."""

    def __init__(self, script: Script, platform: Any, admin: Any) -> None:
        self.script, self.platform, self.admin = script, platform, admin
        self.asked: deque[int] = deque()

    async def on_platform(self, event: dict[str, Any]) -> None:
        if event.get("type") in ("rejected", "error"):    # its total is sent again later
            log.warning("demo market: a repayment was refused: %s", event)

    async def on_admin(self, event: dict[str, Any]) -> None:
        if event.get("type") not in ("status", "error") or not self.asked:
            return
        funder = self.asked.popleft()
        if event["type"] == "status":
            self.script.lines_read(funder, event["lines"], time.monotonic())
        else:                                   # asked again at the next sweep
            log.warning("demo market: reading funder %d's lines failed: %s", funder, event)
            self.script.unread(funder, time.monotonic())

    async def run(self, closed: asyncio.Event) -> None:
        """Four times a second: the lines due to be read, and the totals that fell due."""
        while not closed.is_set():
            now = time.monotonic()
            for funder in self.script.reads(now):
                self.asked.append(funder)
                await self.admin.send_str(json.dumps({"type": "status",
                                                      "participant": funder}))
            for repay in self.script.repayments(now):
                await self.platform.send_str(json.dumps(repay))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), 0.25)


async def _send(conns: dict[int, Any], script: Script, rate: float, closed: asyncio.Event,
                parent: int) -> bool:
    """Send at `rate` until a connection closes (False) or the parent is gone (True).
    After a stall the next command goes at once and the pace resumes from there: what
    the stall missed is not made up for."""
    interval = 1.0 / rate
    due = time.monotonic()
    while not closed.is_set():
        if parent and os.getppid() != parent:
            return True
        now = time.monotonic()
        drawn = script.next(now)
        if drawn is not None:
            who, message = drawn
            await conns[who].send_str(json.dumps(message))
        due = max(due + interval, now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), max(0.0, due - time.monotonic()))
    return False


class DemoMarketProcess(Supervised):
    """`matcher demo-market` beside the gateway, for as long as it serves
    (service/children.py): started again if it ends, say when a connection of its was
    dropped; it ends by itself when the gateway is no longer its parent."""

    def __init__(self, url: str, keys: Keys, rate: float, repay_after_s: float) -> None:
        argv = [sys.executable, "-m", "service.cli", "demo-market", "--url", url,
                "--rate", repr(rate), "--repay-after", repr(repay_after_s),
                "--parent", str(os.getpid())]
        env = dict(os.environ, DEMO_MARKET_KEYS=json.dumps({     # not in `ps`
            "funders": keys.funders, "smes": keys.smes, "platform": keys.platform,
            "admin": keys.admin, "lenders": keys.lenders}))
        super().__init__("the demo market", argv, env, logger=log)


def keys_from_env() -> Keys:
    data = json.loads(os.environ["DEMO_MARKET_KEYS"])
    return Keys(funders={int(k): v for k, v in data["funders"].items()},
                smes={int(k): v for k, v in data["smes"].items()},
                platform=data["platform"], admin=data["admin"],
                lenders=tuple(data.get("lenders", ())))
