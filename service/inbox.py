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
queues, and once a data message has been queued, later ones queue behind it until the
handler loop has taken and handled all of them (`WebSocket.caught_up`): messages are
handled in the order they were sent. (An empty queue alone does not say that: when the
queue was full, aiohttp resumes parsing as a message is taken, before it is handled.)
A close frame queues everything after it the same way: the handler loop ends at the
close, so data a client sends after its own close (which RFC 6455 forbids) is never
acted on, as with aiohttp's own queue.

This replaces one private step of aiohttp's WebSocketResponse (`_post_start`, which
builds the queue and the frame parser), so aiohttp is pinned to the minor version it
was written against; tests/test_inbox.py checks on a real server that messages go the
direct way and keep their order.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.helpers import DEFAULT_CHUNK_SIZE

log = logging.getLogger("matcher.gateway")

_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)


class Inbox(WebSocketDataQueue):
    """aiohttp's message queue, which hands data messages to `handler` once it is set
    and no data message taken by the queue is still unhandled."""

    handler: Callable[[bytes], None] | None = None
    queued = False                   # a data message went to the queue, not yet handled
    direct = 0                       # messages handed over without the queue

    def feed_data(self, data: Any, size: int) -> None:
        if data[0] in _DATA:
            handler = self.handler
            if handler is not None and not self.queued:
                self.direct += 1
                try:
                    handler(data[1])
                except Exception:
                    # The parser turns an exception into a failed connection; say why.
                    log.exception("handling a WebSocket message failed")
                    raise
                return
            self.queued = True
        elif data[0] == WSMsgType.CLOSE:
            self.queued = True       # nothing after it is handled: it queues behind it
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
        callback = None if self._heartbeat is None else _weakly(self)
        request.protocol.set_parser(self._parser, data_received_cb=callback)
        request.protocol.keep_alive(False)

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"",
                    drain: bool = True) -> bool:
        # aiohttp keeps the exception that ended a connection (a protocol error such as
        # a frame over the size limit, or the failed write of the close frame to a
        # client that dropped without one), and every connection ends here; its
        # traceback keeps the frames that keep this response: a reference cycle per
        # such connection, kept all day with collection off. The close code and the
        # log say what the traceback would.
        try:
            return await super().close(code=code, message=message, drain=drain)
        finally:
            forget_traceback(self._exception)

    def deliver(self, handler: Callable[[bytes], None] | None) -> None:
        """Hand each later text or binary message to `handler` as it is parsed (None:
        queue them for `receive()` again), once those already queued are handled."""
        assert self.inbox is not None, "prepare() first"
        self.inbox.handler = handler
        self.caught_up()

    def caught_up(self) -> None:
        """Say that every message taken from `receive()` so far has been handled: when
        the queue holds no more, later messages go straight to the handler."""
        inbox = self.inbox
        if inbox is not None and not inbox._buffer:
            inbox.queued = False


def forget_traceback(exc: BaseException | None) -> None:
    """Drop the tracebacks of `exc` and of the exceptions it was raised from or while
    handling, which keep the frames they passed through."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            todo += (e.__cause__, e.__context__)


def _weakly(ws: WebSocket) -> Callable[[], None]:
    """The heartbeat's data callback without a strong reference to the response.

    aiohttp keeps the callback on the connection's protocol after the connection is
    lost, and the response reaches the protocol again through its request and its
    queue: a reference cycle per connection. The gateway runs with automatic garbage
    collection off (`service/gctune.py`), so each such cycle, about 11 KB, would stay
    until the end of day's collection.
    """
    ref = weakref.ref(ws)

    def on_data_received() -> None:
        alive = ref()
        if alive is not None:
            alive._on_data_received()

    return on_data_received
