"""The journal's own Redis connection: RESP over an asyncio Protocol, parsed by hiredis.

Every acknowledgement waits for a journal write, so the write's round trip is on every
order's path. Through redis-py's pool a call takes a lock, runs observability hooks and,
with a socket timeout, wraps the send in `wait_for` (a new task per call); measured at
idle on this VM, a journal write took 163 us that way against ~90 us for the bare round
trip. The journal makes one kind of call and owns one connection, so it speaks the
protocol itself: a request is one `transport.write`, replies resolve futures in order
(several requests may be in flight: Redis answers a connection in order), and a
missing reply closes the connection after a timeout. Fill pages use one of these too
(service/history.py). Everything else (recovery reads, snapshots, the platform's
consumer) stays on redis-py.

Errors are redis-py's exception types, so callers tell transient failures (connection,
timeout: retry) from error replies (a bug: stop) the same way everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def pack(*parts: bytes | str | int) -> bytes:
    """One command in the Redis protocol (RESP2), packed by hiredis in C: strings as
    UTF-8, integers in decimal, as redis-py sends them. The journal packs about a
    hundred arguments a write: this takes it 24 us a batch where a Python loop over the
    arguments, each turned into bytes first, took 41 us (the same bytes). Floats become
    their text; bool, None and bytearray raise TypeError."""
    # hiredis's stub types the tuple as having one element.
    return hiredis.pack_command(parts)  # type: ignore[arg-type,no-any-return]


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
              "required": ssl.CERT_REQUIRED}


class NotNow(RedisConnectionError):
    """An error reply that says "later", not "no": a script running past
    `busy-reply-threshold` (BUSY), a replica that lost its master (MASTERDOWN), a
    cluster moving a slot (TRYAGAIN); and a Redis that refuses writes until an operator
    or time mends it: over `maxmemory` (OOM), short of `min-replicas-to-write`
    (NOREPLICAS), a replica, as a master becomes after a failover (READONLY), or one
    whose background save failed (MISCONF). The command did not run (a script's first
    write is refused, and the journal's writes nothing before it); a caller that retries
    lost connections retries it (it is a `ConnectionError` for that), rather than take
    it for an answer. The journal took a BUSY for the end of its history, and stopped
    with "Redis lost writes" (found in review); it stopped for good at an OOM or a
    NOREPLICAS that lasted a moment (found in an operator's audit)."""


NOT_NOW = ("BUSY", "MASTERDOWN", "TRYAGAIN", "OOM", "NOREPLICAS", "READONLY", "MISCONF")


def wrong_node(exc: BaseException | None) -> bool:
    """A reply of a node that is not the master (READONLY: a replica now, as the old
    master is after a failover; MASTERDOWN: a replica without one; UNBLOCKED: a blocking
    read cut short as its master became a replica). The address may reach the new master
    on a new connection (a DNS name, a proxy): retrying on this one never would."""
    # redis-py strips the code from the errors it has a class for (ReadOnlyError,
    # MasterDownError); one raised again from it keeps it as its cause.
    for error in (exc, exc.__cause__ if exc is not None else None):
        if isinstance(error, ReadOnlyError | MasterDownError) or (
                isinstance(error, NotNow | ResponseError)
                and _code(str(error)) in ("READONLY", "MASTERDOWN", "UNBLOCKED")):
            return True
    return False


async def reconnect_idle(client: aioredis.Redis) -> None:
    """After a reply of a node that is not the master (`wrong_node`): close the redis-py
    client's idle pooled connections, so that its next command connects afresh, through
    an address that may have moved to the new master. Not the ones in use: closed under
    another task's command, they broke it (redis-py raised AttributeError half-way
    through connecting, which stopped the journal for good) or had redis-py send it
    again (found in review). One taken by another task while this runs may still see
    its command cut (redis-py retries it); one in use stays on its node until it
    fails there. Best effort: what fails to close is left."""
    with contextlib.suppress(RedisError, OSError):
        await client.connection_pool.disconnect(inuse_connections=False)


def not_now(exc: ResponseError) -> bool:
    """Whether redis-py's error reply says "later" (it strips the codes it has a class
    for from the message, and keeps the others')."""
    return isinstance(exc, MasterDownError | TryAgainError | OutOfMemoryError
                      | ReadOnlyError) or _code(str(exc)) in NOT_NOW


def _code(message: str) -> str:
    """An error reply's code: its first word, whole (BUSYGROUP and BUSYKEY say "no")."""
    return message.split(" ", 1)[0]


def reply_error(message: str) -> Exception:
    """An error reply as redis-py raises it, where the difference matters to a caller
    that retries: a Redis still loading its data, or at its client limit, is a
    connection that will work later (redis-py's `BusyLoadingError` and
    `ConnectionError`), as is one that says "later" (`NotNow`), not a refused command."""
    if message.startswith("LOADING"):
        return BusyLoadingError(message)
    if message.startswith("ERR max number of clients reached"):
        return RedisConnectionError(message)
    if _code(message) in ("NOAUTH", "WRONGPASS"):     # redis-py: a connection that fails
        return AuthenticationError(message)
    if _code(message) in NOT_NOW:
        return NotNow(message)
    return ResponseError(message)


class _Protocol(asyncio.Protocol):
    def __init__(self, on_settled: Callable[[], None] | None) -> None:
        self.reader = hiredis.Reader(replyError=reply_error)
        self.waiting: deque[tuple[asyncio.Future[Any], asyncio.TimerHandle]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.on_settled = on_settled

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        settled = False
        while self.waiting:
            reply = self.reader.gets()
            if reply is False:
                break
            fut, timer = self.waiting.popleft()
            timer.cancel()
            settled = True
            if fut.done():
                continue
            if isinstance(reply, Exception):        # an error reply (`reply_error`)
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
        if settled and self.on_settled is not None:
            self.on_settled()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))

    def fail(self, exc: Exception) -> None:
        self.lost = exc
        settled = bool(self.waiting)
        while self.waiting:
            fut, timer = self.waiting.popleft()
            timer.cancel()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.close()
        if settled and self.on_settled is not None:
            self.on_settled()


class Connection:
    """One connection, opened on first use and again after it is lost."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 6379, path: str | None = None,
                 db: int = 0, username: str | None = None, password: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = 5.0,
                 connect_timeout: float = 2.0) -> None:
        self.host, self.port, self.path = host, port, path
        self.db, self.username, self.password = db, username, password
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self.generation = 0          # connections opened so far: tells a new one apart
        #: Called from the protocol, at once, after replies (or a failure) settled request
        #: futures: a caller can act before the futures' callbacks get their loop turn.
        self.on_settled: Callable[[], None] | None = None

    @classmethod
    def like(cls, client: aioredis.Redis) -> Connection:
        """A connection to the server, database and credentials a redis-py client uses."""
        pool = client.connection_pool
        kw: dict[str, Any] = pool.connection_kwargs
        context = None
        if issubclass(pool.connection_class, SSLConnection):
            context = ssl.create_default_context(cafile=kw.get("ssl_ca_certs"))
            if kw.get("ssl_certfile"):
                context.load_cert_chain(kw["ssl_certfile"], kw.get("ssl_keyfile"))
            # As redis-py reads them: certificate required and host name checked unless
            # the URL says otherwise; no host name check without a certificate check.
            reqs = kw.get("ssl_cert_reqs", "required")
            mode = _CERT_REQS[reqs] if isinstance(reqs, str) else ssl.VerifyMode(reqs)
            context.check_hostname = bool(kw.get("ssl_check_hostname", True)) \
                and mode != ssl.CERT_NONE
            context.verify_mode = mode
        path = kw.get("path") if issubclass(pool.connection_class,
                                            UnixDomainSocketConnection) else None
        return cls(host=kw.get("host", "127.0.0.1"), port=int(kw.get("port", 6379)), path=path,
                   db=int(kw.get("db") or 0), username=kw.get("username"),
                   password=kw.get("password"), ssl_context=context,
                   timeout=float(kw.get("socket_timeout") or 5.0),
                   connect_timeout=float(kw.get("socket_connect_timeout") or 2.0))

    @property
    def connected(self) -> bool:
        return self._proto is not None and self._proto.lost is None

    async def ensure(self) -> bool:
        """Connect if not connected; True when a new connection was opened (the server
        may have been restarted or replaced since the last call)."""
        if self.connected:
            return False
        await self._connect()
        return True

    async def call(self, request: bytes) -> Any:
        """Send one packed command and return its reply; an error reply raises
        `ResponseError`, a lost connection or a late reply `ConnectionError` or
        `TimeoutError` (the connection is closed then: a late reply must not be taken for
        the answer to the next request)."""
        await self.ensure()
        return await self.request(request)

    def request(self, request: bytes) -> asyncio.Future[Any]:
        """Send on the open connection (`ensure` first) without waiting: requests queue
        up in Redis and their futures resolve in order, as `call` describes."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            raise RedisConnectionError("not connected to Redis")
        return self._send(proto, request)

    def _send(self, proto: _Protocol, request: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        proto.waiting.append((fut, loop.call_later(self.timeout, self._expire, proto, fut)))
        assert proto.transport is not None
        proto.transport.write(request)
        return fut

    @staticmethod
    def _expire(proto: _Protocol, fut: asyncio.Future[Any]) -> None:
        if not fut.done():
            proto.fail(RedisTimeoutError("no reply from Redis in time"))

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and self._proto.lost is None:
                return self._proto
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if self.path is not None:
                        _, proto = await loop.create_unix_connection(
                            lambda: _Protocol(self.on_settled), self.path)
                    else:
                        _, proto = await loop.create_connection(
                            lambda: _Protocol(self.on_settled), self.host, self.port,
                            ssl=self.ssl_context)
            except TimeoutError as exc:
                raise RedisTimeoutError("timed out connecting to Redis") from exc
            except OSError as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc}") from exc
            try:
                if self.password is not None:
                    auth = (self.username.encode(),) if self.username else ()
                    await self._send(proto, pack(b"AUTH", *auth, self.password.encode()))
                if self.db:
                    await self._send(proto, pack(b"SELECT", b"%d" % self.db))
            except BaseException:
                proto.fail(RedisConnectionError("connection setup failed"))
                raise
            self._proto = proto
            self.generation += 1
            return proto

    def close(self) -> None:
        if self._proto is not None:
            with contextlib.suppress(Exception):
                self._proto.fail(RedisConnectionError("closed"))
            self._proto = None
