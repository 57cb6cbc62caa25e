"""Redis over TLS, as managed Redis services require it.

The journal writes on its own connection (`service/resp.py`), not through redis-py, so
it must take the same `rediss://` URL, speak TLS and verify the server just as redis-py
does. Here the redis-server listens on a TLS port only, with a certificate from a test
authority (trustme), and the whole service runs a small day on it and restarts.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import redis.asyncio as aioredis
import trustme
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.localredis import LocalRedis, TlsFiles, free_port
from service.resp import Connection, pack
from tests.conftest import ServerProcess, run, write_config
from tests.test_service import F14, SME_X, STAY, ask, bid, line, sessions, stream


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_redis(tmp_path: Path, authority: trustme.CA) -> Iterator[LocalRedis]:
    where = tmp_path / "tls"
    where.mkdir()
    cert = authority.issue_cert("127.0.0.1")
    files = TlsFiles(cert=where / "redis.crt", key=where / "redis.key", ca=where / "ca.crt")
    with open(files.cert, "wb") as out:
        for pem in cert.cert_chain_pems:
            out.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(files.key))
    authority.cert_pem.write_to_path(str(files.ca))
    server = LocalRedis(tmp_path / "redis", durability="always", tls=files)
    server.start()
    yield server
    server.stop()


def test_the_journal_connection_speaks_tls_and_checks_the_server(
        tls_redis: LocalRedis, tmp_path: Path) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(tls_redis.url)
        conn = Connection.like(client)
        assert conn.ssl_context is not None
        assert await conn.call(pack(b"SET", b"k", b"v")) == b"OK"
        assert await client.get("k") == b"v"           # the same server, through redis-py
        await client.aclose()
        conn.close()

        # The port speaks only TLS: a plain connection gets no usable answer.
        plain = Connection(port=tls_redis.port, timeout=1.0, connect_timeout=1.0)
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await plain.call(pack(b"PING"))
        plain.close()

        # A server whose certificate this authority did not sign is refused.
        stranger = trustme.CA()
        stranger.cert_pem.write_to_path(str(tmp_path / "stranger.crt"))
        assert tls_redis.tls is not None
        url = tls_redis.url.replace(quote(str(tls_redis.tls.ca.resolve())),
                                    quote(str(tmp_path / "stranger.crt")))
        doubtful_client = aioredis.Redis.from_url(url)
        doubtful = Connection.like(doubtful_client)
        with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await doubtful.call(pack(b"PING"))
        doubtful.close()
        await doubtful_client.aclose()

    run(scenario())


def test_the_service_trades_and_recovers_on_a_tls_redis(
        tls_redis: LocalRedis, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "matcher.toml", tls_redis.url, port, extra=STAY)
    server = ServerProcess(config, port, tmp_path / "server.log").start()

    async def trade() -> list[str]:      # F14 keeps its bids when it disconnects
        async with sessions(server, F14, SME_X) as (f14, sme):
            await f14.ok(line("DFM"))
            await f14.ok(bid("b1", "DFM-30D", 250, 1_000_000))
            await sme.ok(ask("a1", "DFM-30D", 400_000))
            return [(await sme.recv())["type"] for _ in range(2)]

    async def resting() -> list[tuple[str, int]]:
        async with sessions(server, F14) as (f14,):
            await f14.send({"type": "status"})
            status = await f14.expect("status")
            return [(o["client_id"], o["remaining"]) for o in status["orders"]]

    try:
        assert run(trade()) == ["fill", "done"]
        fills = stream(tls_redis.url)
        assert [(f["bid_client_id"], f["amount"]) for _, f in fills] == [("b1", "400000")]
        assert server.terminate() == 0                 # snapshot and journal over TLS
        server.start()
        assert run(resting()) == [("b1", 600_000)]
        reader = redis.Redis.from_url(tls_redis.url)
        try:
            assert int(reader.xlen("matcher:{main}:journal")) >= 3
        finally:
            reader.close()
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


@pytest.mark.parametrize(("query", "mode", "hostname"), [
    ("", ssl.CERT_REQUIRED, True),
    ("&ssl_check_hostname=false", ssl.CERT_REQUIRED, False),
    ("&ssl_cert_reqs=optional", ssl.CERT_OPTIONAL, True),
    ("&ssl_cert_reqs=none", ssl.CERT_NONE, False),
])
def test_the_journal_connection_reads_the_tls_options_as_redis_py_does(
        query: str, mode: ssl.VerifyMode, hostname: bool) -> None:
    client = aioredis.Redis.from_url(f"rediss://127.0.0.1:6390/0?db=0{query}")
    context = Connection.like(client).ssl_context
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (mode, hostname)
