"""A day's traffic leaves no cyclic garbage.

The gateway runs with automatic garbage collection off (`service/gctune.py`): whatever
forms a reference cycle stays in memory until the end of day's collection. One cycle
per WebSocket connection (aiohttp's heartbeat callback, about 11 KB) grew the server by
10 MB per thousand connections. Here the service runs in this process on uvloop, as
`matcher serve` runs it, with collection off; real clients connect, trade, misbehave and
leave; then a collection that keeps what it finds must find nothing.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop
import websockets

from service import gctune
from service.app import Service
from service.config import load
from service.localredis import LocalRedis
from tests.conftest import write_config


async def _http(port: int, request: str) -> bytes:
    """One request on its own connection (a monitoring probe, an SME's platform, a
    scanner); the status line of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{request}\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer.split(b"\r\n", 1)[0]


async def _drop(port: int, key: str | None, *, abort: bool) -> bytes:
    """A WebSocket whose client goes without a close frame (a laptop shut, a network
    lost): signed in by `key` and welcomed, or (None) before signing in; then the socket
    is reset (`abort`) or just closed. What the server had sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    signed = "" if key is None else f"Authorization: Bearer {key}\r\n"
    writer.write(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{signed}\r\n").encode())
    got = await reader.readuntil(b"\r\n\r\n")
    while key is not None and b"welcome" not in got:
        got += await reader.read(4096)
    if abort:
        writer.transport.abort()
    else:
        writer.close()
    return got


async def _session(url: str, key: str, *sends: Any,
                   until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Sign in, send, and read until `until(what came)` holds."""
    async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        got = [json.loads(await ws.recv())]                    # welcome
        for msg in sends:
            await ws.send(msg if isinstance(msg, str) else json.dumps(msg))
        while not until(got):
            got.append(json.loads(await ws.recv()))
        return got


def _count(kind: str, n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda got: sum(m["type"] == kind for m in got) >= n


async def _traffic(port: int, round: str, n: int) -> list[Any]:
    """Each kind of connection a day sees, `n` times over; what came back, to check.
    Client ids start with `round`: a repeated one would be answered as a retry."""
    url = f"ws://127.0.0.1:{port}/ws"
    seen: list[Any] = []
    for i in (f"{round}{k}" for k in range(n)):
        # A funder sets its line, bids and leaves its bid resting: cancel on disconnect.
        seen += await _session(url, "key-f11", {
            "type": "set_credit_line", "core": "DFM", "amount": 10**12}, {
            "type": "bid", "client_id": f"b{i}", "segment": "DFM-30D", "rate_bps": 250,
            "amount": 10**8, "tif": "day"}, until=_count("accepted", 2))
        # Another funder's bid, amended, then filled by an SME who quoted and watched.
        async with websockets.connect(url, additional_headers={
                "Authorization": "Bearer key-f12"}) as funder:
            await funder.recv()
            for msg in ({"type": "set_credit_line", "core": "DFM", "amount": 10**12},
                        {"type": "bid", "client_id": f"c{i}", "segment": "DFM-30D",
                         "rate_bps": 240, "amount": 10**8, "tif": "day"},
                        {"type": "amend", "client_id": f"c{i}", "rate_bps": 239}):
                await funder.send(json.dumps(msg))
            seen += [json.loads(await funder.recv()) for _ in range(4)]   # and the line
            async with websockets.connect(url, additional_headers={
                    "Authorization": "Bearer key-platform"}) as platform:
                await platform.recv()
                await platform.send(json.dumps({"type": "subscribe", "segments": [],
                                                "fills": True}))
                seen += await _session(url, "key-s21", {
                    "type": "subscribe", "segments": ["DFM-30D"]}, {
                    "type": "quote", "segment": "DFM-30D", "amount": 10**7}, {
                    "type": "ask", "client_id": f"a{i}", "segment": "DFM-30D",
                    "amount": 10**7}, {"type": "fills", "limit": 5, "ref": i},
                    {"type": "status"}, until=lambda got: {
                        "quote", "fill", "done", "fills", "status"} <= {m["type"] for m in got})
                while (trade := json.loads(await platform.recv()))["type"] != "trade":
                    pass
                seen.append(trade)
        # Bad input of each kind the connection survives, then one it does not.
        seen += await _session(url, "key-s22", "{not json", {"type": "bid"}, {
            "type": "quote", "segment": "NOPE", "amount": 1}, {
            "type": "quote", "segment": "DFM-30D", "amount": 1, "extra": 1},
            until=_count("error", 4))
        async with websockets.connect(url, additional_headers={
                "Authorization": "Bearer key-s22"}, max_size=None) as ws:
            await ws.recv()
            await ws.send("x" * 70_000)                         # over max_frame_bytes
            await ws.wait_closed()
            seen.append(ws.close_code)
        # A wrong key, and a browser signing in by message.
        async with websockets.connect(url, additional_headers={
                "Authorization": "Bearer wrong"}) as ws:
            await ws.wait_closed()
            seen.append(ws.close_code)
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "key": "key-f13"}))
            seen.append(json.loads(await ws.recv())["type"])
        # Clients gone without a close frame, signed in or not yet.
        for key, abort in (("key-s21", True), ("key-f11", False), (None, False)):
            seen.append((await _drop(port, key, abort=abort)).split(b"\r\n", 1)[0])
        for target in ("/health", "/metrics", "/v1/segments", "/", "/static/app.js",
                       "/v1/segments/DFM-30D/quote?amount=100",
                       "/v1/segments/NOPE/quote?amount=1", "/nowhere", "/static/nowhere.js",
                       "/v1/segments/DFM-30D/quote?amount=x"):
            seen.append(await _http(port, f"GET {target} HTTP/1.1"))
        seen.append(await _http(port, "GET /v1/fills?limit=5 HTTP/1.1\r\n"
                                      "Authorization: Bearer key-s21"))
        seen.append(await _http(port, "POST /health HTTP/1.1"))
        for request in ("GET /ws HTTP/1.1", "GET /static/ HTTP/1.1", "OPTIONS * HTTP/1.1",
                        "CONNECT 127.0.0.1:443 HTTP/1.1", "GET /a%0Ab HTTP/1.1",
                        f"GET /static/{'x' * 300} HTTP/1.1",
                        # an expectation aiohttp meets, and ones it cannot
                        "GET /health HTTP/1.1\r\nExpect: 100-continue",
                        "GET /health HTTP/1.1\r\nExpect: foo",
                        "GET /nowhere HTTP/1.1\r\nExpect: foo",
                        "GET /static/app.js HTTP/1.1\r\nExpect: foo"):
            seen.append(await _http(port, request))
        seen.append(await _http(port, "NONSENSE"))      # a scanner, a TLS hello
    return seen


def _garbage(tmp_path: Path, redis_url: str) -> tuple[list[Any], collections.Counter[str]]:
    """A day's traffic with collection off: what it sent back, and the cyclic garbage
    left after it, by type."""
    cfg = load(write_config(tmp_path / "m.toml", redis_url, 0), {})

    async def scenario() -> tuple[list[Any], collections.Counter[str]]:
        service = Service(cfg)
        await service.start()
        try:
            assert service.port is not None
            await _traffic(service.port, "warm", 1)   # what the first use of each path caches
            await asyncio.sleep(0.1)
            gctune.tune()
            seen = await _traffic(service.port, "day", 5)
            await asyncio.sleep(0.3)           # connections' last callbacks run
            gc.set_debug(gc.DEBUG_SAVEALL)     # what a collection frees, kept to be named
            try:
                gc.collect()
                found = collections.Counter(
                    f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
            return seen, found
        finally:
            gc.unfreeze()
            gc.enable()
            await service.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(scenario(), 120))


def test_a_days_connections_leave_no_cyclic_garbage(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    seen, found = _garbage(tmp_path, redis_server.url)
    # The traffic did what it says: trades, refusals, closes, HTTP answers.
    kinds = collections.Counter(m["type"] for m in seen if isinstance(m, dict))
    assert kinds["fill"] >= 5 and kinds["error"] >= 20 and kinds["accepted"] >= 25, kinds
    assert kinds["trade"] == kinds["fills"] == kinds["status"] == 5, kinds
    assert seen.count(1009) == 5 and seen.count(4401) == 5, seen
    statuses = collections.Counter(m for m in seen if isinstance(m, bytes))
    assert statuses == {b"HTTP/1.1 200 OK": 35, b"HTTP/1.1 404 Not Found": 35,
                        b"HTTP/1.1 400 Bad Request": 10, b"HTTP/1.1 403 Forbidden": 5,
                        b"HTTP/1.1 405 Method Not Allowed": 5,
                        b"HTTP/1.1 100 Continue": 5, b"HTTP/1.1 417 Expectation Failed": 15,
                        b"HTTP/1.1 101 Switching Protocols": 15,      # then dropped
                        b"HTTP/1.0 400 Bad Request": 5}     # the request line unread
    assert not found, f"cyclic garbage left by a day's connections: {found.most_common(12)}"
