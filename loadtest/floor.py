"""The transport floor: the gateway's way in and out for a message, and nothing else.

A load test's figures mix what the server does with what the machine, the event loop,
aiohttp and the loopback network cost the generator and the server before the server
does anything. This server keeps the second part as `matcher serve` has it (aiohttp on
uvloop, a WebSocket per participant signed in by its key, messages handed over as
parsed by `service.inbox`, replies framed and written as the gateway does, automatic
garbage collection off) and drops the first: every command is answered `accepted` at
once, with no engine, no journal and no Redis. `matcher-loadtest --serve --floor` runs
the generator against it, so the cost of the real server reads as a ratio against a
floor measured on the same machine in the same hour (README, Speed).

Only what the generator needs is served: `/v1/segments` from the configuration,
`/health`, `/metrics` (the process's CPU, for the report's `cpu` line) and `/ws`.
Nothing is matched, so no fill, `done` or book update is ever sent, and a `fills` or
`quote` request is answered with an empty page or an empty quote.
"""

from __future__ import annotations

import argparse
import gc

import msgspec
import uvloop
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from matcher import protocol as wire
from matcher.participants import Directory
from service import config as config_module
from service.gateway import bearer_key, frame
from service.inbox import WebSocket
from service.realtime import make_realtime


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
            return _encode(wire.Error(code="invalid", message=str(exc)))
        if msg.type == "fills":
            return _encode(wire.FillPage(fills=[], more=False, next=None, ref=msg.ref))
        if msg.type == "quote":
            return _encode(wire.Quote(segment=msg.segment, amount=msg.amount,
                                      single_funder=msg.single_funder, fillable=0,
                                      avg_rate_bps=None, worst_rate_bps=None, funders=0,
                                      seq=self.seq, ref=msg.ref))
        self.seq += 1
        return _encode(wire.Accepted(client_id=msg.client_id, seq=self.seq))

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
        transport.write(frame(_encode(wire.Welcome(
            participant=who.id, name=who.name, role=who.role,
            segments=self.segment_ids))))

        def handle(data: bytes) -> None:
            if not transport.is_closing():
                transport.write(frame(self.answer(data)))

        ws.deliver(handle)
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    handle(msg.data)
                    ws.caught_up()
        finally:
            ws.deliver(None)
        return ws


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
    web.run_app(floor.app(), host=args.host, port=args.port or config.server.port, print=None,
                loop=uvloop.new_event_loop(), handle_signals=True)


if __name__ == "__main__":
    main()
