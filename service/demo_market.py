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
- The platform repays every loan it sees on its fill subscription `repay_after_s`
  later (its running totals, read back at start through the admin's `status`), so the
  demo's lines never run dry, also after a load test against the demo.

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
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("matcher.demo_market")

#: How many of the demo's funders and SMEs take part: enough for a lively board, few
#: enough connections to be nothing for the gateway.
FUNDERS, SMES = 12, 40
#: Share of commands that are a funder's (re-)quote; the rest are SMEs' asks.
REQUOTE_SHARE = 0.65
#: Rates (bps) the drift stays in, before each segment's cap and its tenor's premium.
RATE_FLOOR, RATE_CEILING = 215, 300


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
    those of an earlier run (a resting order's id cannot be reused)."""

    def __init__(self, markets: Iterable[Market], funders: list[int], smes: list[int], *,
                 prefix: str, seed: int = 2026, repay_after_s: float = 60.0) -> None:
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
        self._owner: dict[str, tuple[int, str]] = {}
        self.repaid: dict[tuple[int, str], int] = {}   # (funder, core) -> total reported
        self._due: deque[tuple[float, int, str, int]] = deque()   # loans to repay
        self._n = 0

    @staticmethod
    def _premium(market: Market) -> int:
        """The floor of the segment's rates: longer tenors cost more."""
        return RATE_FLOOR + market.tenor_days // 6

    def _client_id(self) -> str:
        self._n += 1
        return f"{self.prefix}-{self._n}"

    def next(self) -> tuple[int, dict[str, Any]]:
        """The next command and the participant to send it as."""
        market = self.rng.choice(self.markets)
        low = min(self._premium(market), market.rate_cap_bps)
        high = min(RATE_CEILING + market.tenor_days // 6, market.rate_cap_bps)
        mid = self.mid[market.id] = max(low, min(high, self.mid[market.id]
                                                 + self.rng.choice((-1, 0, 0, 1))))
        if self.rng.random() < REQUOTE_SHARE:
            funder = self.rng.choice(self.funders)
            rate = max(0, min(market.rate_cap_bps, mid + self.rng.randrange(-3, 10)))
            amount = self.rng.randrange(2, 21) * 100_000_000        # 2 to 20 million CNY
            resting = self.live.get((funder, market.id))
            if resting is not None:
                return funder, {"type": "amend", "client_id": resting, "rate_bps": rate,
                                "amount": amount}
            cid = self._client_id()
            self.live[(funder, market.id)] = cid
            self._owner[cid] = (funder, market.id)
            return funder, {"type": "bid", "client_id": cid, "segment": market.id,
                            "rate_bps": rate, "amount": amount, "tif": "gtc"}
        sme = self.rng.choice(self.smes)
        yuan = round(self.rng.lognormvariate(math.log(1_500_000), 0.6) / 10_000) * 10_000
        fen = max(100_000, min(20_000_000, yuan)) * 100
        return sme, {"type": "ask", "client_id": self._client_id(), "segment": market.id,
                     "amount": fen, "tif": "ioc",
                     "max_rate_bps": min(market.rate_cap_bps, mid + 15)}

    def ended(self, client_id: str | None) -> None:
        """A bid of the market's is over (`done`), or was refused (`rejected`): its
        funder bids afresh next time rather than amending it."""
        key = self._owner.pop(client_id, None) if client_id is not None else None
        if key is not None and self.live.get(key) == client_id:
            del self.live[key]

    def known_total(self, funder: int, core: str, total: int) -> None:
        """What the engine has counted repaid so far (the admin's `status`): totals go on
        from there, or the first ones after a restart would count nothing."""
        key = (funder, core)
        self.repaid[key] = max(self.repaid.get(key, 0), total)

    def lent(self, now: float, funder: int, core: str, amount: int) -> None:
        """A loan on the platform's fill subscription: repaid `repay_after_s` from now."""
        self._due.append((now + self.repay_after_s, funder, core, amount))

    def repayments(self, now: float) -> list[dict[str, Any]]:
        """A `repay` with the new total for each line whose loans fell due by `now`."""
        changed: list[tuple[int, str]] = []
        while self._due and self._due[0][0] <= now:
            _, funder, core, amount = self._due.popleft()
            key = (funder, core)
            if key not in changed:
                changed.append(key)
            self.repaid[key] = self.repaid.get(key, 0) + amount
        return [{"type": "repay", "funder": funder, "core": core,
                 "repaid_total": self.repaid[(funder, core)]} for funder, core in changed]


# --- I/O: connections to the gateway -----------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """The keys the market signs in with: funders and SMEs by id, and the platform's
    and the admin's (None: no repayments)."""

    funders: dict[int, str]
    smes: dict[int, str]
    platform: str | None
    admin: str | None


async def run(url: str, keys: Keys, rate: float, *, repay_after_s: float = 60.0,
              parent: int = 0, seed: int | None = None) -> int:
    """Send `rate` commands a second until a connection closes (the gateway stops) or
    `parent` is no longer ours."""
    import aiohttp

    http = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    http = http.rsplit("/ws", 1)[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{http}/v1/segments") as resp:
            markets = [Market(s["id"], s["core"], s["tenor_days"], s["rate_cap_bps"])
                       for s in await resp.json()]
        conns = {pid: await _signed_in(session, url, key)
                 for pid, key in {**keys.funders, **keys.smes}.items()}
        platform = await _signed_in(session, url, keys.platform) if keys.platform else None
        script = Script(markets, sorted(keys.funders), sorted(keys.smes),
                        prefix=f"live{int(time.time()) % 10**8}",
                        seed=seed if seed is not None else int(time.time()),
                        repay_after_s=repay_after_s)
        for funder in keys.funders:
            await _withdraw_earlier(conns[funder])
        if keys.admin and platform is not None:
            admin = await _signed_in(session, url, keys.admin)
            await _read_totals(admin, script, keys.funders)
            await admin.close()
        closed = asyncio.Event()
        readers = [asyncio.create_task(_read(ws, script, closed, funder=pid in keys.funders))
                   for pid, ws in conns.items()]
        if platform is not None:
            await platform.send_str(json.dumps({"type": "subscribe", "fills": True}))
            readers.append(asyncio.create_task(_read(platform, script, closed,
                                                     platform=True)))
        log.info("demo market: %d funders and %d SMEs, %.1f commands a second",
                 len(keys.funders), len(keys.smes), rate)
        try:
            await _send(conns, platform, script, rate, closed, parent)
        finally:
            for task in readers:
                task.cancel()
            for ws in [*conns.values(), *([platform] if platform else [])]:
                await ws.close()
    return 0


async def _signed_in(session: Any, url: str, key: str) -> Any:
    ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {key}"},
                                  heartbeat=None, autoping=True)
    welcome = await ws.receive_json()
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"not signed in: {welcome}")
    return ws


async def _answer(ws: Any, type_: str) -> dict[str, Any]:
    """The next message of `type_` (book updates and fills may come first)."""
    while True:
        msg: dict[str, Any] = await ws.receive_json()
        if msg.get("type") in (type_, "error"):
            return msg


async def _withdraw_earlier(ws: Any) -> None:
    """Cancel the bids an earlier run left resting (their ids are of its prefix)."""
    await ws.send_str(json.dumps({"type": "status"}))
    status = await _answer(ws, "status")
    for order in status.get("orders", ()):
        if order["client_id"].startswith("live") and order["side"] == "bid":
            await ws.send_str(json.dumps({"type": "cancel", "client_id": order["client_id"]}))


async def _read_totals(admin: Any, script: Script, funders: Iterable[int]) -> None:
    for funder in funders:
        await admin.send_str(json.dumps({"type": "status", "participant": funder}))
        status = await _answer(admin, "status")
        for line in status.get("lines", ()):
            script.known_total(funder, line["core"], line["repaid"])


async def _read(ws: Any, script: Script, closed: asyncio.Event, *, funder: bool = False,
                platform: bool = False) -> None:
    """Tell the script what it needs to know; set `closed` when the connection ends."""
    import aiohttp

    try:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            kind = event.get("type")
            if funder and kind in ("done", "rejected"):
                script.ended(event.get("client_id"))
            elif platform and kind == "trade":
                script.lent(time.monotonic(), event["funder"], event["core"], event["amount"])
    finally:
        closed.set()


async def _send(conns: dict[int, Any], platform: Any, script: Script, rate: float,
                closed: asyncio.Event, parent: int) -> None:
    interval = 1.0 / rate
    due = time.monotonic()
    while not closed.is_set() and (not parent or os.getppid() == parent):
        pid, message = script.next()
        await conns[pid].send_str(json.dumps(message))
        if platform is not None:
            for repay in script.repayments(time.monotonic()):
                await platform.send_str(json.dumps(repay))
        due += interval
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closed.wait(), max(0.0, due - time.monotonic()))


class DemoMarketProcess:
    """`matcher demo-market` beside the gateway, for as long as it serves.

    Started with `subprocess.Popen` (vfork, as the snapshotter), in its own process
    group, so a Ctrl-C is the gateway's to handle; it ends when the gateway's
    connections close, or when the gateway is no longer its parent."""

    def __init__(self, url: str, keys: Keys, rate: float, repay_after_s: float) -> None:
        self.argv = [sys.executable, "-m", "service.cli", "demo-market", "--url", url,
                     "--rate", repr(rate), "--repay-after", repr(repay_after_s),
                     "--parent", str(os.getpid())]
        # Keys in the environment, not in `ps`.
        self.env = dict(os.environ, DEMO_MARKET_KEYS=json.dumps({
            "funders": keys.funders, "smes": keys.smes, "platform": keys.platform,
            "admin": keys.admin}))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, process_group=0)

    async def stop(self, timeout: float = 5.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def keys_from_env() -> Keys:
    data = json.loads(os.environ["DEMO_MARKET_KEYS"])
    return Keys(funders={int(k): v for k, v in data["funders"].items()},
                smes={int(k): v for k, v in data["smes"].items()},
                platform=data["platform"], admin=data["admin"])
