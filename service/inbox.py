"""A WebSocket whose messages reach the gateway as they are parsed, not through a task.

aiohttp parses frames in the connection's `data_received` and puts each message on a
queue; the handler task awaiting `receive()` is then woken to take it. Per message that
is a future resolved, a task step scheduled and run, and `receive()`'s bookkeeping:
about a tenth of the server's CPU at 5,000 commands/s, on a path where the gateway does
nothing that needs a task (`Gateway.handle` never awaits). Here the queue itself hands
text and binary messages to a callback the moment the parser produces them
([ADR 19](../docs/adr/0019-messages-handled-as-parsed.md)).

Only data messages go straight through. Ping, pong, close and errors still take the
queue to `receive()`, so aiohttp answers pings, runs the heartbeat and closes as it
always does. Until the callback is set (before the client is signed in) everything
queues, and a data message that arrives while older ones still wait in the queue queues
behind them: messages are handled in the order they were sent.

This replaces one private step of aiohttp's WebSocketResponse (`_post_start`, which
builds the queue and the frame parser), so aiohttp is pinned to the minor version it
was written against; tests/test_service.py checks on a real server that messages go
the direct way and keep their order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.helpers import DEFAULT_CHUNK_SIZE

log = logging.getLogger("matcher.gateway")

_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)


class Inbox(WebSocketDataQueue):
    """aiohttp's message queue, which hands data messages to `handler` once it is set
    and nothing older is queued."""

    handler: Callable[[bytes], None] | None = None
    direct = 0                       # messages handed over without the queue

    def feed_data(self, data: Any, size: int) -> None:
        handler = self.handler
        if handler is not None and data[0] in _DATA and not self._buffer:
            self.direct += 1
            try:
                handler(data[1])
            except Exception:
                # The parser turns an exception into a failed connection; say why.
                log.exception("handling a WebSocket message failed")
                raise
            return
        super().feed_data(data, size)


class WebSocket(web.WebSocketResponse):
    """A WebSocketResponse with an `Inbox` for a queue: `deliver(handler)` starts handing
    messages over as they are parsed."""

    inbox: Inbox | None = None

    def _post_start(self, request: web.BaseRequest, protocol: str | None,
                    writer: Any) -> None:
        # aiohttp 3.14's own steps, with an Inbox in place of its WebSocketDataQueue.
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        loop = self._loop
        assert loop is not None
        self.inbox = Inbox(request._protocol, DEFAULT_CHUNK_SIZE, loop=loop)
        self._reader = self.inbox
        self._parser = WebSocketReader(self.inbox, self._max_msg_size,
                                       compress=bool(self._compress),
                                       decode_text=self._decode_text)
        callback = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(self._parser, data_received_cb=callback)
        request.protocol.keep_alive(False)

    def deliver(self, handler: Callable[[bytes], None] | None) -> None:
        """Hand each later text or binary message to `handler` as it is parsed (None:
        queue them for `receive()` again)."""
        assert self.inbox is not None, "prepare() first"
        self.inbox.handler = handler
