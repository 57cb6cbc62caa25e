"""The transport floor: the gateway's way in and out for a message, and nothing else.

A load test's figures mix what the server does with what the machine, the event loop,
aiohttp and the loopback network cost the generator and the server before the server
does anything. This server keeps the second part as `matcher serve` has it (aiohttp on
uvloop with the server's runner and listening settings, a WebSocket per participant
signed in by its key, messages handed over as parsed by `service.inbox`, replies sent
through the gateway's own `Connection`, which frames them and writes each client's
replies of a loop turn at once, automatic garbage collection off, SCHED_RR when the
configuration asks) and drops the first: every command is answered `accepted` at once,
with no engine, no journal and no Redis. `matcher-loadtest --serve --floor` runs the
generator against it, so the cost of the real server reads as a ratio against a floor
measured on the same machine in the same hour (README, Speed).

It answers one message with one reply, where the server also sends fills, `done`s and
book updates: the floor is what any server of this protocol pays per command at least,
not what this one would pay for the same traffic. Only what the generator needs is
served: `/v1/segments` from the configuration, `/health`, `/metrics` (the process's CPU,
for the report's `cpu` line) and `/ws` with the key in the `Authorization` header. A
command is `accepted`; `fills`, `quote` and `status` get an empty answer; `subscribe`,
`unsubscribe` and `auth` get an `error` with code `unsupported`, and what is not JSON
one with code `malformed`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import signal

import msgspec
import uvloop
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from matcher import protocol as wire
from matcher.participants import Directory
from service import config as config_module
from service.app import LISTEN_BACKLOG
from service.gateway import Connection, bearer_key
from service.inbox import WebSocket
from service.realtime import make_realtime

#: What `matcher serve` journals and answers `accepted`.
COMMANDS = frozenset(t.__struct_config__.tag for t in
                     (wire.Bid, wire.Ask, wire.Cancel, wire.CancelAll, wire.Amend,
                      wire.SetCreditLine, wire.Repay, wire.AddSegment, wire.Halt,
                      wire.Reopen, wire.Suspend, wire.Reinstate, wire.EndOfDay))


class _Any(msgspec.Struct):
    """What the floor reads of a message: its type and the ids it answers to."""

    type: str = ""
    client_id: str | None = None
    ref: str | None = None
    segment: str = ""
    amount: int = 0
    single_funder: bool = False


_decode = msgspec.json.Decoder(_Any).decode
_encode = wire.json_encoder.encode


class Floor:
    """Answers each message as cheaply as the protocol allows."""

    def __init__(self, config: config_module.Config) -> None:
        self.config = config
        self.directory = Directory(config.all_participants())
        self.segment_ids = sorted(s.id for s in config.segments)
        self.segments = [{"id": s.id, "core": s.core, "tenor_days": s.tenor_days,
                          "rate_cap_bps": s.rate_cap_bps} for s in config.segments]
        self.seq = 0
        self.metrics = CollectorRegistry()
        ProcessCollector(registry=self.metrics)

    def answer(self, data: bytes) -> bytes:
        """The reply to one message; a command is `accepted` with the next seq."""
        try:
            msg = _decode(data)
        except msgspec.DecodeError as exc:
            return _encode(wire.Error(code="malformed", message=str(exc)))
        if msg.type in COMMANDS:
            self.seq += 1
            return _encode(wire.Accepted(client_id=msg.client_id, seq=self.seq))
        if msg.type == "fills":
            return _encode(wire.FillPage(fills=[], more=False, next=None, ref=msg.ref))
        if msg.type == "quote":
            return _encode(wire.Quote(segment=msg.segment, amount=msg.amount,
                                      single_funder=msg.single_funder, fillable=0,
                                      avg_rate_bps=None, worst_rate_bps=None, funders=0,
                                      seq=self.seq, ref=msg.ref))
        if msg.type == "status":
            return _encode(wire.Status(orders=[], lines=[]))
        return _encode(wire.Error(code="unsupported", path="$.type",
                                  message=f"the transport floor does not serve {msg.type!r}"))

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/ws", self._ws), web.get("/health", self._health),
                        web.get("/metrics", self._metrics),
                        web.get("/v1/segments", self._segments)])
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "seq": self.seq})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics), content_type="text/plain")

    async def _segments(self, request: web.Request) -> web.Response:
        return web.json_response(self.segments)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = WebSocket(max_msg_size=self.config.limits.max_frame_bytes, compress=False,
                       decode_text=False, heartbeat=self.config.server.heartbeat_s)
        await ws.prepare(request)
        key = bearer_key(request.headers.get("Authorization"))
        who = self.directory.authenticate(key) if key else None
        if who is None:
            await ws.close(code=4401, message=b"unauthorized")
            return ws
        transport = request.transport
        assert transport is not None
        conn = Connection(ws, transport, who, self.config.limits,
                          lambda c: c.transport.abort())     # a slow consumer: cut
        conn.send(_encode(wire.Welcome(participant=who.id, name=who.name, role=who.role,
                                       segments=self.segment_ids)))

        def handle(data: bytes) -> None:
            if conn.allow():            # the per-connection rate limit, as the gateway
                conn.send(self.answer(data))
            else:
                conn.send(_encode(wire.Error(code="rate_limited", message="over the rate")))

        ws.deliver(handle)
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    handle(msg.data)
                    ws.caught_up()
        finally:
            ws.deliver(None)
            conn.closed = True
        return ws


async def serve(floor: Floor, host: str, port: int) -> None:
    """Listen as `matcher serve` does (service/app.py) until SIGTERM or SIGINT."""
    runner = web.AppRunner(floor.app(), handle_signals=False, access_log=None,
                           timeout_ceil_threshold=math.inf,
                           shutdown_timeout=floor.config.server.shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True, backlog=LISTEN_BACKLOG).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.floor", description=__doc__)
    ap.add_argument("--config", help="the TOML whose segments and keys to serve "
                                     "(default: the packaged demo)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    args = ap.parse_args(argv)
    config = config_module.load(args.config)
    floor = Floor(config)
    gc.disable()                  # as the gateway runs (ADR 10)
    if config.server.realtime_priority:          # as `matcher serve` does (ADR 14)
        make_realtime(config.server.realtime_priority)
    uvloop.run(serve(floor, args.host, args.port or config.server.port))


if __name__ == "__main__":
    main()
