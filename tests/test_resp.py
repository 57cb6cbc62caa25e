"""The journal's own Redis connection (`service.resp`), against a real redis-server and,
for the failures a real server does not produce on demand, a silent or rude fake."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.localredis import LocalRedis
from service.resp import Connection, NotNow, pack
from tests.conftest import run


def test_pack_is_the_redis_protocol() -> None:
    assert pack(b"SET", b"k", b"") == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"


def test_pipelined_calls_get_their_own_replies_in_order(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        conn = Connection(port=redis_server.port)
        replies = await asyncio.gather(*(conn.call(pack(b"INCR", b"n")) for _ in range(200)))
        assert replies == list(range(1, 201))
        assert await conn.call(pack(b"ECHO", b"x" * 100_000)) == b"x" * 100_000   # many reads
        conn.close()
    run(scenario())


def test_an_error_reply_raises_and_the_connection_stays_usable(
        redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        conn = Connection(port=redis_server.port)
        await conn.call(pack(b"SET", b"s", b"text"))
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await conn.call(pack(b"XADD", b"s", b"*", b"f", b"v"))
        assert not await conn.ensure()                    # same connection, still open
        assert await conn.call(pack(b"GET", b"s")) == b"text"
        conn.close()
    run(scenario())


def test_like_a_client_reaches_the_same_database_with_the_same_password(
        tmp_path: Path) -> None:
    server = LocalRedis(tmp_path / "auth", durability="no")
    server.start()

    async def scenario() -> None:
        admin = aioredis.Redis(port=server.port)
        await admin.config_set("requirepass", "s3cret")
        await admin.aclose()
        client = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        conn = Connection.like(client)
        await conn.call(pack(b"SET", b"where", b"db3"))
        assert await client.get("where") == b"db3"
        assert await aioredis.Redis.from_url(
            f"redis://:s3cret@127.0.0.1:{server.port}/0").get("where") is None
        refused = Connection(port=server.port)             # no password
        with pytest.raises(AuthenticationError, match="NOAUTH"):    # as redis-py has it
            await refused.call(pack(b"GET", b"where"))
        conn.close()
        await client.aclose()

    try:
        run(scenario())
    finally:
        server.stop()


async def _fake_server(on_connect: str) -> tuple[asyncio.Server, int, list[bytes]]:
    """A TCP server that reads requests and then stays silent or hangs up."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1000)
        received.append(data)
        if on_connect == "hang up":
            writer.close()
            return
        await asyncio.sleep(30)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


def test_no_reply_in_time_is_a_timeout_and_the_next_call_reconnects() -> None:
    async def scenario() -> None:
        server, port, received = await _fake_server("silent")
        conn = Connection(port=port, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await conn.call(pack(b"PING"))
        assert 0.15 < time.monotonic() - started < 2
        assert received == [pack(b"PING")]
        # The late reply must never be read as the next request's: a new connection.
        assert await conn.ensure()
        conn.close()
        server.close()
    run(scenario())


def test_a_dropped_connection_fails_the_waiting_calls() -> None:
    async def scenario() -> None:
        server, port, _ = await _fake_server("hang up")
        conn = Connection(port=port, timeout=5)
        with pytest.raises(RedisConnectionError, match="lost"):
            await conn.call(pack(b"PING"))
        server.close()
        await server.wait_closed()
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await conn.call(pack(b"PING"))
    run(scenario())


def test_error_replies_that_mean_try_later_are_connection_errors() -> None:
    """A Redis loading its data or at its client limit will work later: redis-py raises
    connection errors for those, and so does this connection, so the journal retries
    instead of stopping."""
    from redis.exceptions import BusyLoadingError

    from service.resp import reply_error
    assert isinstance(reply_error("LOADING Redis is loading the dataset in memory"),
                      BusyLoadingError)
    assert isinstance(reply_error("ERR max number of clients reached"), RedisConnectionError)
    # A Redis restarted with a password: a connection that fails, as redis-py has it (the
    # journal retries, and says so), not an error reply that stops it (found in review).
    for message in ("NOAUTH Authentication required.",
                    "WRONGPASS invalid username-password pair or user is disabled."):
        assert isinstance(reply_error(message), RedisConnectionError)
    for message in ("ERR unknown command", "NOSCRIPT No matching script",
                    "BUSYGROUP Consumer Group name already exists"):
        got = reply_error(message)
        assert type(got) is ResponseError and str(got) == message
    # Refusals of writes that last until Redis is mended: "later" too (NotNow).
    for message in ("OOM command not allowed when used memory > 'maxmemory'.",
                    "NOREPLICAS Not enough good replicas to write.",
                    "READONLY You can't write against a read only replica.",
                    "MISCONF Redis is configured to save RDB snapshots, but it's currently "
                    "unable to persist to disk.", "BUSY Redis is busy running a script."):
        got = reply_error(message)
        assert isinstance(got, NotNow) and str(got) == message


def test_a_redis_at_its_client_limit_is_a_connection_error(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        admin = aioredis.Redis.from_url(redis_server.url)
        await admin.ping()
        await admin.config_set("maxclients", 1)
        conn = Connection.like(admin)
        try:
            with pytest.raises(RedisConnectionError, match="max number of clients"):
                await conn.call(pack("PING"))
        finally:
            conn.close()
            await admin.config_set("maxclients", 10000)
            await admin.aclose()

    run(scenario())
