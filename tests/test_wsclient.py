"""The load generator's WebSocket client (`loadtest.wsclient`) against a raw server that
writes exactly the frames the RFC allows (the real gateway is its peer in the load test)."""

from __future__ import annotations

import asyncio
import time

import pytest

from loadtest import wsclient
from tests.conftest import run


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    assert b1 & 0x80, "client frames must be masked"
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    key = await reader.readexactly(4)
    return b0 & 0x0F, wsclient.mask(await reader.readexactly(n), key)


def test_mask_is_its_own_inverse_and_matches_the_rfc() -> None:
    key = bytes((0x37, 0xFA, 0x21, 0x3D))
    assert wsclient.mask(b"Hello", key) == bytes((0x7F, 0x9F, 0x4D, 0x51, 0x58))  # RFC 5.7
    data = bytes(range(256)) * 3 + b"x"
    assert wsclient.mask(wsclient.mask(data, key), key) == data
    assert wsclient.mask(b"", key) == b""


def test_handshake_frames_ping_and_close() -> None:
    async def scenario() -> None:
        seen: dict[str, object] = {}
        finished = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if line)
            seen["auth"] = headers.get("Authorization")
            seen["path"] = head.split(" ")[1]
            accept = wsclient.accept_key(headers["Sec-WebSocket-Key"].encode()).decode()
            big = b"b" * 70_000
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode()
                + b"\r\n\r\n" + frame(1, b"small") + frame(1, b"m" * 300)
                + frame(1, b"frag", fin=False) + frame(9, b"are you there")
                + frame(0, b"men", fin=False) + frame(0, b"ted") + frame(2, big[:5]))
            writer.write(frame(2, big)[:1000])         # one message over many reads
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(frame(2, big)[1000:])
            seen["pong"] = await read_client_frame(reader)
            seen["sent"] = await read_client_frame(reader)
            writer.write(frame(8, (4401).to_bytes(2, "big") + b"bye"))
            seen["close"] = await read_client_frame(reader)
            writer.close()
            finished.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        got: list[bytes] = []
        ws = await wsclient.connect(f"ws://127.0.0.1:{port}/ws?x=1", lambda m, _: got.append(m),
                                    headers={"Authorization": "Bearer k"})
        ws.send(b'{"type": "status"}')
        assert await asyncio.wait_for(ws.closed, 5) == 4401
        await asyncio.wait_for(finished.wait(), 5)
        assert got == [b"small", b"m" * 300, b"fragmented", b"bbbbb", b"b" * 70_000]
        assert seen["auth"] == "Bearer k" and seen["path"] == "/ws?x=1"
        assert seen["pong"] == (wsclient.OP_PONG, b"are you there")
        assert seen["sent"] == (wsclient.OP_TEXT, b'{"type": "status"}')
        assert seen["close"] == (wsclient.OP_CLOSE, (4401).to_bytes(2, "big"))
        server.close()
    run(scenario())


@pytest.mark.parametrize("reply", [b"HTTP/1.1 403 Forbidden\r\n\r\n",
                                   b"HTTP/1.1 101 Switching Protocols\r\n"
                                   b"Sec-WebSocket-Accept: wrong\r\n\r\n"])
def test_a_refused_or_forged_upgrade_fails_the_connect(reply: bytes) -> None:
    async def scenario() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(wsclient.HandshakeError):
            await wsclient.connect(f"ws://127.0.0.1:{port}/ws", lambda _, __: None)
        server.close()
    run(scenario())


def test_replies_of_one_poll_share_the_stamp_of_its_first_callback() -> None:
    """The load generator's `ArrivalClock` under uvloop, as the generator runs: data
    that was waiting on five sockets when the loop polled is stamped once, before any of
    it is handled; data of a later poll gets a later stamp."""
    import socket

    import uvloop

    clock = wsclient.ArrivalClock()
    stamps: list[tuple[int, int]] = []

    class Stamped(asyncio.Protocol):
        def __init__(self, name: int) -> None:
            self.name = name

        def data_received(self, data: bytes) -> None:
            stamps.append((self.name, clock()))
            time.sleep(0.002)                 # the handling of one reply takes time

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(5)]
        for n, (ours, _) in enumerate(pairs):
            await loop.connect_accepted_socket(lambda n=n: Stamped(n), ours)
        await asyncio.sleep(0.05)
        for _, theirs in pairs:
            theirs.send(b"x")                 # all five readable before the next poll
        await asyncio.sleep(0.05)
        pairs[0][1].send(b"y")
        await asyncio.sleep(0.05)
        for ours, theirs in pairs:
            ours.close()
            theirs.close()

    uvloop.run(main())
    assert sorted(name for name, _ in stamps[:5]) == [0, 1, 2, 3, 4]
    assert len({stamp for _, stamp in stamps[:5]}) == 1       # one stamp for the poll
    assert stamps[5][0] == 0 and stamps[5][1] - stamps[0][1] > 10_000_000   # its own
