"""One gateway writes a shard's journal (ADR 31): the writer lease and the write script's
fencing, against a real Redis and real `matcher serve` processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from matcher import protocol as wire
from matcher.engine import Engine
from service.journal import Journal, JournalLost, Keys, WriterReplaced
from service.lease import Lease, ShardTaken, _pid_space, holder_gone
from service.localredis import LocalRedis, free_port
from tests.conftest import ROOT, ServerProcess, run, write_config
from tests.test_service import F11, bid, bid_answer, line, session

KEYS = Keys("main")
OTHER_HOST = "another-host.example:4242:0123456789ab:0badcafe"   # live, elsewhere
ADMIN, SME = 1, 21


def journal_state(url: str) -> tuple[int, Any, Any]:
    """What a start that writes nothing leaves as it was: the journal and the snapshot."""
    client = redis.Redis.from_url(url)
    try:
        return (client.xlen(KEYS.journal), client.xrevrange(KEYS.journal, count=1),
                client.get(KEYS.snapshot_seq))
    finally:
        client.close()


def written_since(url: str, state: tuple[int, Any, Any]) -> tuple[list[str], Any]:
    """The commands journaled after `state` was read, and the snapshot's seq now: the
    first gateway's own (its funder's bids cancelled on disconnect) may follow."""
    client = redis.Redis.from_url(url)
    try:
        rows = client.xrange(KEYS.journal, min=b"(" + state[1][0][0])
        return ([type(e.command).__name__ for _, fields in rows
                 for e in wire.journal_decoder.decode(fields[b"e"])],
                client.get(KEYS.snapshot_seq))
    finally:
        client.close()


def serve(config: Path, env: dict[str, str],
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "serve", "--config",
                           str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


async def bid_accepted(server: ServerProcess, client_id: str) -> dict[str, Any]:
    async with session(server, F11) as funder:
        await funder.ok(line("DFM"))
        return await funder.command(bid(client_id, "DFM-30D", 250, 1_000))


def test_a_second_gateway_on_the_shard_writes_nothing_and_the_first_goes_on(
        server: ServerProcess, redis_server: LocalRedis, tmp_path: Path) -> None:
    """A second `matcher serve` on the same shard journaled its `resume` and a snapshot,
    then failed to bind the first's port, and the first stopped for good on its next
    write (found in an audit); on another port both served."""
    assert run(bid_accepted(server, "b1"))["type"] == "accepted"
    before = journal_state(redis_server.url)
    # Another port: it waits a lease (1 s here) plus a renewal for the first's to lapse.
    other = write_config(tmp_path / "second.toml", redis_server.url, free_port())
    started = time.monotonic()
    done = serve(other, {"MATCHER_REDIS_WRITER_LEASE_S": "1"})
    assert done.returncode == 1, done.stderr
    assert "another gateway writes this shard's journal" in done.stderr
    assert f"{socket.gethostname()}:{server.process.pid}:" in done.stderr    # who holds it
    assert "waiting up to" in done.stderr and time.monotonic() - started >= 1.2
    # The first's port: refused at once, in one line, before anything is read.
    done = serve(server.config, {})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"matcher serve: {server.config}: server.port: cannot "
                                  f"listen on 127.0.0.1 port {server.port}")
    assert "Traceback" not in done.stderr
    commands, snapshot_seq = written_since(redis_server.url, before)
    assert "Resume" not in commands and snapshot_seq == before[2]      # nothing of theirs
    assert run(bid_accepted(server, "b2"))["type"] == "accepted"
    assert server.get("/health")[0] == 200


def test_a_gateway_whose_lease_another_took_stops_at_once(
        server: ServerProcess, redis_server: LocalRedis) -> None:
    """In a quiet market too: its renewal finds the other holder, and its journal stops
    before it could write after the other (the write script would refuse it anyway)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set(KEYS.writer, OTHER_HOST, px=60_000)
    finally:
        client.close()
    before = journal_state(redis_server.url)
    deadline = time.monotonic() + 10            # renewed every 2 s
    while server.get("/health")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.get("/health")[0] == 503
    answer = run(bid_answer(server, "b1"))
    assert (answer["type"], answer["code"]) == ("rejected", "unavailable")
    assert journal_state(redis_server.url) == before
    log = server.log.read_text()
    assert f"another gateway ({OTHER_HOST}) holds this shard's writer lease" in log
    assert server.terminate() == 1              # its last writes could not be finished
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get(KEYS.writer) == OTHER_HOST.encode()     # not its own to free
    finally:
        client.close()


def test_a_killed_gateway_of_this_host_is_taken_over_at_once(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash and restart on one machine waits for no lease to lapse (60 s here); a
    shutdown lets it go."""
    monkeypatch.setenv("MATCHER_REDIS_WRITER_LEASE_S", "60")
    port = free_port()
    config = write_config(tmp_path / "m.toml", redis_server.url, port)
    first = ServerProcess(config, port, tmp_path / "first.log").start()
    assert run(bid_accepted(first, "b1"))["type"] == "accepted"
    first.kill()
    started = time.monotonic()
    second = ServerProcess(config, port, tmp_path / "second.log").start(timeout=30)
    try:
        assert time.monotonic() - started < 30
        assert (f"took over the journal's writer lease from {socket.gethostname()}:"
                f"{first.process.pid}:") in second.log.read_text()
        assert run(bid_accepted(second, "b2"))["type"] == "accepted"
        assert second.terminate() == 0
    finally:
        if second.process.poll() is None:
            second.kill()
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.get(KEYS.writer) is None                   # released at shutdown
    finally:
        client.close()


async def _market(url: str) -> tuple[aioredis.Redis, Engine, Callable[..., Any]]:
    """A client, an engine and `submit(participant, role, command)` stamping times."""
    client = aioredis.Redis.from_url(url)
    engine = Engine()
    clock = [time.time_ns()]

    def submit(participant: int, role: str, cmd: Any) -> Any:
        clock[0] += 1000
        out = engine.submit(participant, role, cmd, clock[0])     # type: ignore[arg-type]
        assert out.entry is not None, out.replies
        return out
    return client, engine, submit


def _journal(client: aioredis.Redis, token: str, seq: int = 0) -> Journal:
    journal = Journal(client, KEYS, writer=token, writer_ttl_ms=60_000, written_seq=seq)
    journal.start()
    return journal


def test_a_writer_whose_lease_lapsed_writes_nothing_after_another_wrote(
        redis_server: LocalRedis) -> None:
    """Fencing in the write script. Gateway A stalls past its lease; B takes it, journals
    and releases it; A's next write, with a trade in it, must write nothing at all: it
    went through when the key was absent, its trade on the fill streams under a number
    B had used and its journal entry refused, a loan the journal never made (found in
    review)."""
    async def scenario() -> tuple[Any, ...]:
        client, engine, submit = await _market(redis_server.url)
        a = _journal(client, "A")
        await client.set(KEYS.writer, "A")
        for cmd, who, role in ((wire.AddSegment(segment="X-30", core="X", tenor_days=30),
                                ADMIN, "admin"),
                               (wire.SetCreditLine(core="X", amount=10**9), F11, "funder"),
                               (wire.Bid(client_id="b1", segment="X-30", rate_bps=300,
                                         amount=10**6), F11, "funder")):
            out = submit(who, role, cmd)
            await a.append(out.entry, out.trades)
        ask = submit(SME, "sme", wire.Ask(client_id="a1", segment="X-30", amount=10**6))
        assert ask.trades                                   # A's engine lent
        await client.delete(KEYS.writer)                    # A's lease lapsed; B's turn
        b = _journal(client, "B", seq=engine.seq - 1)
        resume = wire.JournalEntry(engine.seq, time.time_ns(), 0, wire.Resume())
        await b.append(resume, [])                          # B takes the lapsed lease
        b_held = await client.get(KEYS.writer)
        await b.close()
        await client.delete(KEYS.writer)                    # B's shutdown releases it
        refused: BaseException | None = None
        try:
            await a.append(ask.entry, ask.trades)
        except WriterReplaced as exc:
            refused = exc
        streams = [await client.xlen(k) for k in (KEYS.fills, KEYS.fills_of(SME))]
        journal = [i for i, _ in await client.xrange(KEYS.journal)]
        await a.close()
        await client.aclose()
        return b_held, refused, streams, journal, engine.seq

    b_held, refused, streams, journal, seq = run(scenario())
    assert b_held == b"B"
    assert refused is not None and "lapsed and another wrote the journal" in str(refused)
    assert streams == [0, 0]                               # no trade left behind
    assert journal[-1] == f"{seq}-0".encode()              # B's resume, A's nothing


def test_a_writer_whose_lease_lapsed_takes_it_again_if_no_one_wrote(
        redis_server: LocalRedis) -> None:
    """A stall longer than the lease with no other gateway about: the next write takes
    the lease again (the journal ends where it left it) and goes on; another's lease
    refuses it."""
    async def scenario() -> tuple[Any, ...]:
        client, _engine, submit = await _market(redis_server.url)
        a = _journal(client, "A")
        out = submit(ADMIN, "admin", wire.AddSegment(segment="X-30", core="X", tenor_days=30))
        await a.append(out.entry, out.trades)              # no key yet: taken
        taken = await client.get(KEYS.writer)
        await client.delete(KEYS.writer)
        out = submit(F11, "funder", wire.SetCreditLine(core="X", amount=10**9))
        await a.append(out.entry, out.trades)              # lapsed, nobody wrote: again
        again = await client.get(KEYS.writer)
        await client.set(KEYS.writer, OTHER_HOST)
        refused: BaseException | None = None
        try:
            out = submit(F11, "funder", wire.SetCreditLine(core="X", amount=1))
            await a.append(out.entry, out.trades)
        except WriterReplaced as exc:
            refused = exc
        written = await client.xlen(KEYS.journal)
        await a.close()
        await client.aclose()
        return taken, again, refused, written

    taken, again, refused, written = run(scenario())
    assert taken == again == b"A" and written == 2
    assert refused is not None and f"another gateway ({OTHER_HOST})" in str(refused)


def test_the_lease_is_taken_renewed_and_released_only_by_its_holder(
        redis_server: LocalRedis) -> None:
    async def scenario() -> list[Any]:
        client = aioredis.Redis.from_url(redis_server.url)
        # Another live process of this host (this one's own pid would count as gone).
        mine = Lease(client, KEYS.writer, KEYS.journal,
                     f"{socket.gethostname()}:{os.getppid()}:{_pid_space()}:aa", ttl_s=5)
        theirs = Lease(client, KEYS.writer, KEYS.journal, OTHER_HOST, ttl_s=5)
        await mine.acquire(wait_s=0)
        seen: list[Any] = [await theirs.renew(None), await mine.renew(None)]
        try:
            await theirs.acquire(wait_s=0.3)
        except ShardTaken as exc:
            seen.append(str(exc))
        await theirs.release()                      # not its own: nothing happens
        seen.append(await client.get(KEYS.writer) == mine.token.encode())
        # Lapsed: taken again only where the journal still ends where it was left.
        await client.delete(KEYS.writer)
        seen.append(await mine.renew(None))                      # writes on their way
        seen.append(await client.get(KEYS.writer))
        seen.append(await mine.renew(b"7-0"))                    # it ends at 0-0
        seen.append(await mine.renew(b"0-0"))
        seen.append(await client.get(KEYS.writer) == mine.token.encode())
        await mine.release()
        seen.append(await client.get(KEYS.writer))
        await client.aclose()
        return seen

    (fenced, renewed, refused, still_mine, lapsed, left, moved, retaken, again,
     released) = run(scenario())
    assert fenced.startswith(f"FENCED {socket.gethostname()}:{os.getppid()}:")
    assert renewed is None
    assert f"held by {socket.gethostname()}:{os.getppid()}:" in refused
    assert still_mine and lapsed is None and left is None
    assert moved == "LAPSED 0-0" and retaken is None and again
    assert released is None


def test_a_holder_is_gone_only_if_it_was_a_process_of_this_host_that_ended() -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host, space, ended = socket.gethostname(), _pid_space(), done.stdout.strip()
    assert holder_gone(f"{host}:{ended}:{space}:00")               # ended
    assert holder_gone(f"{host}:{os.getpid()}:{space}:00")      # this pid, an earlier life
    assert not holder_gone(f"{host}:{os.getppid()}:{space}:00")    # running
    assert not holder_gone(f"another-{host}:{ended}:{space}:00")
    # The same host name and pid in another boot or pid namespace (a container on the
    # host's network, a cloned machine) says nothing of the holder.
    assert not holder_gone(f"{host}:{ended}:0123456789ab:00")
    assert not holder_gone("garbage")


def test_a_lapsed_lease_over_a_journal_that_lost_writes_says_redis_lost_them(
        redis_server: LocalRedis) -> None:
    """A Redis restarted empty takes the lease's key with the journal: the renewal finds
    the journal behind what was acknowledged, which is lost writes (the runbook's
    section for it), not another gateway (the first words once said so)."""
    async def scenario() -> BaseException | None:
        client = aioredis.Redis.from_url(redis_server.url)
        journal = _journal(client, "A", seq=5)              # acknowledged up to 5
        lease = Lease(client, KEYS.writer, KEYS.journal, "A", ttl_s=5)
        journal.replaced(await lease.renew(journal.quiet_tail()) or "")
        await journal.close()
        await client.aclose()
        return journal.error

    error = run(scenario())
    assert isinstance(error, JournalLost)
    assert str(error).startswith("Redis journal ends at seq 0, but 5 was acknowledged")


def test_pipelined_writes_after_a_lapse_behind_a_refused_one_are_written_again(
        redis_server: LocalRedis) -> None:
    """`writes_in_flight` 2, Redis refusing writes past the lease (NOREPLICAS): the
    first write is refused, the one behind it finds the journal short of where it
    follows. That is a gap, rewritten in order, not another gateway's journal: the only
    gateway was stopped for good (found in review)."""
    async def scenario() -> tuple[Any, ...]:
        client, _engine, submit = await _market(redis_server.url)
        journal = Journal(client, KEYS, writer="A", writer_ttl_ms=300, max_inflight=2,
                          max_retry_delay=0.1)
        journal.start()
        out = submit(ADMIN, "admin", wire.AddSegment(segment="X-30", core="X", tenor_days=30))
        await journal.append(out.entry, out.trades)
        await client.config_set("min-replicas-to-write", 1)    # refuses writes
        await asyncio.sleep(0.5)                                # the lease lapses
        futures = []
        for amount in (10**9, 10**8):
            out = submit(F11, "funder", wire.SetCreditLine(core="X", amount=amount))
            futures.append(journal.append(out.entry, out.trades))
            journal._pump()                    # sent at once, the second behind the first
        await asyncio.sleep(0.3)
        await client.config_set("min-replicas-to-write", 0)
        done = [await asyncio.wait_for(asyncio.shield(f), 10) for f in futures]
        entries = [i for i, _ in await client.xrange(KEYS.journal)]
        error = journal.error
        await journal.close()
        await client.aclose()
        return done, entries, error

    done, entries, error = run(scenario())
    assert error is None and done == [2, 3]
    assert entries == [b"1-0", b"2-0", b"3-0"]


def test_a_retried_write_found_under_its_number_must_be_its_own(
        redis_server: LocalRedis) -> None:
    """A write whose reply was lost is checked before it is sent again: something under
    its number was taken for it. Another gateway that took the lapsed lease and
    journaled there meanwhile had its entry acknowledged as this one's (found in
    review)."""
    async def scenario() -> tuple[Any, ...]:
        client, engine, submit = await _market(redis_server.url)
        journal = _journal(client, "A")
        out = submit(ADMIN, "admin", wire.AddSegment(segment="X-30", core="X", tenor_days=30))
        await journal.append(out.entry, out.trades)
        mine = submit(F11, "funder", wire.SetCreditLine(core="X", amount=10**9))
        theirs = wire.JournalEntry(mine.entry.seq, time.time_ns(), 0, wire.Resume())
        await client.xadd(KEYS.journal, {"n": 1, "e": wire.journal_encoder.encode([theirs])},
                          id=f"{theirs.seq}-0")           # B's, under the number
        # A's write goes out and its reply is lost (the partition): not sent at all, and
        # settled as the connection settles a reply.
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[Any] = loop.create_future()
        lost.set_exception(RedisConnectionError("connection lost"))

        def send(batch: Any) -> asyncio.Future[Any]:
            loop.call_soon(journal._settle)
            return lost
        journal._send = send                                # type: ignore[method-assign]
        refused: BaseException | None = None
        try:
            await journal.append(mine.entry, mine.trades)
        except WriterReplaced as exc:
            refused = exc
        error = journal.error
        await journal.close()
        await client.aclose()
        return refused, error, engine.seq

    refused, error, seq = run(scenario())
    assert refused is not None and f"entry {seq}-0 is not the batch" in str(refused)
    assert error is refused


def test_the_journal_is_healthy_again_once_a_check_that_met_busy_passes(
        redis_server: LocalRedis) -> None:
    """A check between writes that Redis answered BUSY (a long script elsewhere) left the
    journal unhealthy on a connection that stayed good: /health 503 for good while
    writes landed (found in review)."""
    async def scenario() -> tuple[bool, bool]:
        client, _engine, submit = await _market(redis_server.url)
        await client.config_set("busy-reply-threshold", 50)
        journal = _journal(client, "A")
        out = submit(ADMIN, "admin", wire.AddSegment(segment="X-30", core="X", tenor_days=30))
        await journal.append(out.entry, out.trades)
        busy = await asyncio.create_subprocess_exec(
            "redis-cli", "-p", str(redis_server.port), "eval",
            "local i = 0 while i < 1e10 do i = i + 1 end return i", "0",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.sleep(0.4)                  # past the threshold: BUSY
        journal.verify()
        await asyncio.sleep(0.2)
        during = journal.healthy
        await client.script_kill()                # what an operator does about it
        await busy.wait()
        journal.verify()
        deadline = time.monotonic() + 5
        while not journal.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            journal.verify()
        after = journal.healthy
        await journal.close()
        await client.aclose()
        return during, after

    during, after = run(scenario())
    assert not during and after


def test_an_abandoned_write_is_not_written_once_redis_takes_writes_again(
        redis_server: LocalRedis) -> None:
    """A shutdown that could wait no longer answered it `unconfirmed`; it was still
    retried, and written, after (found in review)."""
    async def scenario() -> tuple[Any, ...]:
        client, _engine, submit = await _market(redis_server.url)
        journal = Journal(client, KEYS, writer="A", writer_ttl_ms=60_000,
                          max_retry_delay=0.1)
        journal.start()
        out = submit(ADMIN, "admin", wire.AddSegment(segment="X-30", core="X", tenor_days=30))
        await journal.append(out.entry, out.trades)
        await client.config_set("min-replicas-to-write", 1)
        out = submit(F11, "funder", wire.SetCreditLine(core="X", amount=10**9))
        held = journal.append(out.entry, out.trades)
        await asyncio.sleep(0.4)                              # refused, retrying
        journal.abandon("stopped")
        answer = await asyncio.gather(held, return_exceptions=True)
        await client.config_set("min-replicas-to-write", 0)
        await asyncio.sleep(0.5)
        entries = await client.xlen(KEYS.journal)
        error = journal.error
        await journal.close()
        await client.aclose()
        return answer, entries, error

    [answer], entries, error = run(scenario())
    assert isinstance(answer, RuntimeError) and str(error) == "stopped"
    assert entries == 1
