"""A lean WebSocket client for the load generator: RFC 6455 framing on an asyncio Protocol.

The generator shares two cores with the server and Redis, so every microsecond it spends
on a message is taken from the thing it measures. aiohttp's client hands each incoming
message through a queue to a reader task (a task switch per message); here frames are
parsed in `data_received` and handed to a callback, and a send is one `transport.write`.
It still speaks real WebSocket over TCP to the real server: an upgrade handshake with the
accept key checked, masked client frames, fragmented and extended-length messages, ping
and close handled as the RFC says.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import time
from collections.abc import Callable
from urllib.parse import urlsplit

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class ArrivalClock:
    """When the data of a `data_received` call arrived, as nearly as one thread serving
    thousands of connections can tell.

    The event loop polls, then runs the callback of every socket that had data, one
    after another. Stamped as each callback runs, the last of a burst of replies would
    carry the generator's processing of all those before it (about 30 us each), time a
    client with its one connection does not spend. Everything a poll reported was there
    when it returned, so the time of the poll's first callback is later than each of
    its arrivals, and never earlier: all callbacks of one poll share it. uvloop runs
    `call_soon` callbacks only after every I/O callback of the poll (checked in
    tests/test_wsclient.py), so that is where the stamp is forgotten.

    The bound has one gap (found in review): a socket whose callback runs late in the
    poll reads what it holds then, including bytes that arrived while the callbacks
    before it ran, and those get the poll's earlier stamp. Such a reply is measured
    early by up to the time the poll's callbacks took before it: the `ack` figures can
    be that much low in a burst, which `ack_handled` (stamped as each callback runs)
    bounds from above.
    """

    __slots__ = ("_now",)

    def __init__(self) -> None:
        self._now: int | None = None

    def __call__(self) -> int:
        now = self._now
        if now is None:
            now = self._now = time.perf_counter_ns()
            asyncio.get_running_loop().call_soon(self._forget)
        return now

    def _forget(self) -> None:
        self._now = None


class HandshakeError(ConnectionError):
    """The server did not upgrade the connection (wrong status, bad accept key)."""


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key repeated (RFC 6455 5.3), as one big-integer operation."""
    n = len(payload)
    if n == 0:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little")


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


class WebSocket(asyncio.Protocol):
    """One client connection. `on_message(payload)` gets each whole text or binary
    message and the `ArrivalClock`'s time for it; `closed` resolves with the close code
    when the connection ends."""

    def __init__(self, host: str, path: str, headers: dict[str, str],
                 on_message: Callable[[bytes, int], None], clock: ArrivalClock) -> None:
        self._on_message = on_message
        self._clock = clock
        self._arrived = 0
        self._key = base64.b64encode(os.urandom(16))
        self._request = "".join(
            [f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
             "Sec-WebSocket-Version: 13\r\n",
             *(f"{k}: {v}\r\n" for k, v in headers.items()), "\r\n"]).encode()
        self._buf = bytearray()
        self._upgraded = False
        self._fragments: list[bytes] = []
        self._close_sent = False
        self._masks = random.Random(os.urandom(8))   # not the workload's seeded generator
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int | None] = loop.create_future()
        self.transport: asyncio.Transport | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._arrived = self._clock()
        self._buf += data
        if not self._upgraded:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).decode("latin-1")
            del self._buf[:end + 4]
            try:
                self._check_upgrade(head)
            except HandshakeError as exc:
                if not self.opened.done():
                    self.opened.set_exception(exc)
                assert self.transport is not None
                self.transport.close()
                return
            self._upgraded = True
            self.opened.set_result(None)
        self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    # --- the protocol ---

    def _check_upgrade(self, head: str) -> None:
        status, *lines = head.split("\r\n")
        if not status.startswith("HTTP/1.1 101"):
            raise HandshakeError(f"upgrade refused: {status!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept", "").encode() != accept_key(self._key):
            raise HandshakeError("wrong Sec-WebSocket-Accept")

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if b1 & 0x80:
                self._fail(1002, "a server must not mask its frames")
                return
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head:pos + head + n])
            pos += head + n
            self._frame(bool(b0 & 0x80), b0 & 0x0F, payload)
        del buf[:pos]

    def _frame(self, fin: bool, opcode: int, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if fin and not self._fragments:
                self._on_message(payload, self._arrived)
            elif fin:
                self._fragments.append(payload)
                whole, self._fragments = b"".join(self._fragments), []
                self._on_message(whole, self._arrived)
            else:
                self._fragments.append(payload)
        elif opcode == OP_PING:
            self._write(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            if not self._close_sent:
                self._write(OP_CLOSE, payload[:2])
                self._close_sent = True
            if not self.closed.done():
                self.closed.set_result(code)
            assert self.transport is not None
            self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        self._write(OP_CLOSE, code.to_bytes(2, "big") + reason.encode())
        self._close_sent = True
        assert self.transport is not None
        self.transport.close()

    def _write(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
        key = self._masks.getrandbits(32).to_bytes(4, "big")
        self.transport.write(head + key + mask(payload, key))

    # --- the API ---

    def send(self, payload: bytes, *, binary: bool = False) -> None:
        """Queue one message; never waits (the generator is open loop)."""
        self._write(OP_BINARY if binary else OP_TEXT, payload)

    async def close(self, code: int = 1000, timeout: float = 5.0) -> int | None:
        """Send a close frame, wait for the server's, and return its code."""
        if not self._close_sent:
            self._write(OP_CLOSE, code.to_bytes(2, "big"))
            self._close_sent = True
        try:
            return await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except TimeoutError:
            return None
        finally:
            if self.transport is not None:
                self.transport.close()


async def connect(url: str, on_message: Callable[[bytes, int], None], *,
                  headers: dict[str, str] | None = None, timeout: float = 30.0,
                  clock: ArrivalClock | None = None) -> WebSocket:
    """Open `ws://host:port/path` and complete the upgrade. Connections that share a
    `clock` share the stamps of one poll (without one, each has its own)."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None:
        raise ValueError(f"url: only ws://host:port/path is supported, not {url!r}")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    loop = asyncio.get_running_loop()
    _, ws = await loop.create_connection(
        lambda: WebSocket(f"{parts.hostname}:{port}", path, headers or {}, on_message,
                          clock or ArrivalClock()),
        parts.hostname, port)
    try:
        await asyncio.wait_for(ws.opened, timeout)
    except BaseException:
        if ws.transport is not None:
            ws.transport.close()
        raise
    return ws
