"""Snapshots: the snapshotter follows the journal with its own engine and stores its state
every N commands; whoever stores, the stored snapshot is the newest, and none covers a
command the journal does not hold."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from matcher import protocol as wire
from matcher import snapshot
from matcher.engine import Engine
from service.journal import Journal
from service.localredis import LocalRedis
from service.snapshots import (
    JournalDiverged,
    SnapshotAhead,
    SnapshotPartsLost,
    Snapshotter,
    adopt,
    store,
    stored_seq,
)
from tests.conftest import run
from tests.test_journal import KEYS, opened, play


def stored_state(blob: bytes | None) -> tuple[int, str]:
    assert blob is not None
    engine = snapshot.restore(snapshot.load(blob))
    return engine.seq, snapshot.state_hash(engine)


def test_a_snapshot_ahead_of_the_journal_is_refused(redis_server: LocalRedis) -> None:
    async def scenario() -> tuple[int, int, int]:
        client = aioredis.Redis.from_url(redis_server.url)
        engine = Engine()
        journal = Journal(client, KEYS)          # not started: nothing is written yet
        futures = []
        for i in range(5):
            out = engine.submit(1, "admin", wire.AddSegment(segment=f"S{i}", core="C",
                                                           tenor_days=30), i)
            assert out.entry is not None
            futures.append(journal.append(out.entry, out.trades))
        with pytest.raises(SnapshotAhead, match="seq 5 is ahead of the journal"):
            await store(client, KEYS, engine)
        nothing = await stored_seq(client, KEYS)
        assert await client.get(KEYS.snapshot) is None
        journal.start()
        await journal.flush()
        assert await store(client, KEYS, engine)
        after = await stored_seq(client, KEYS)
        engine.submit(1, "admin", wire.AddSegment(segment="T", core="C", tenor_days=30), 9)
        with pytest.raises(SnapshotAhead, match="seq 6 is ahead"):   # journal ends at 5
            await store(client, KEYS, engine)
        await journal.close()
        still = await stored_seq(client, KEYS)
        await client.aclose()
        return nothing, after, still

    assert run(scenario()) == (0, 5, 5)


def test_the_snapshotter_stores_the_live_state_every_n_commands(
        redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 21)
        await play(driver, journal, 2500)
        follower = Snapshotter(client, KEYS, every=1000)
        await follower.start()                       # recovers all that is journaled
        assert follower.engine.seq == driver.engine.seq >= 1000
        assert await follower.step()                 # none stored yet: one is due
        first = driver.engine.seq
        assert stored_state(await client.get(KEYS.snapshot)) == (
            first, snapshot.state_hash(driver.engine))

        await play(driver, journal, 300)             # fewer than 1000 new commands
        assert not await follower.step()
        assert follower.engine.seq == driver.engine.seq > first
        assert await stored_seq(client, KEYS) == first

        await play(driver, journal, 1500)
        assert await follower.step()
        assert await stored_seq(client, KEYS) == driver.engine.seq
        assert stored_state(await client.get(KEYS.snapshot)) == (
            driver.engine.seq, snapshot.state_hash(driver.engine))
        assert snapshot.state_hash(follower.engine) == snapshot.state_hash(driver.engine)

        # Another writer (the gateway at shutdown) stored the same state first: the
        # follower keeps it and counts from it.
        await play(driver, journal, 1500)
        assert await store(client, KEYS, driver.engine)
        assert not await follower.step()
        assert follower.stored == driver.engine.seq
        await journal.close()
        await client.aclose()

    run(scenario())


def test_a_snapshot_is_stored_in_parts_and_published_whole(redis_server: LocalRedis) -> None:
    """Many small writes instead of one large one (journal writes go between them), and
    the snapshot key only ever holds a whole snapshot; no parts are left behind."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 5)
        await play(driver, journal, 1500)
        blob = snapshot.dump(snapshot.capture(driver.engine))
        assert len(blob) > 1000
        seen: list[int] = []
        real_append = client.append

        async def spy(key: str, value: bytes) -> int:
            seen.append(len(value))
            assert await client.get(KEYS.snapshot) is None    # nothing published yet
            return await real_append(key, value)

        client.append = spy           # type: ignore[method-assign]
        assert await store(client, KEYS, driver.engine, part_bytes=100, pause_s=0)
        client.append = real_append   # type: ignore[method-assign]
        assert len(seen) == (len(blob) - 1) // 100 and set(seen[:-1]) == {100}
        assert await client.get(KEYS.snapshot) == blob
        assert await client.ttl(KEYS.snapshot) == -1                   # kept for good
        older = driver.engine.seq
        await play(driver, journal, 200)
        assert await store(client, KEYS, driver.engine, part_bytes=100, pause_s=0)
        behind = snapshot.restore(snapshot.load(blob))
        assert behind.seq == older
        assert not await store(client, KEYS, behind, part_bytes=100, pause_s=0)
        assert [k async for k in client.scan_iter(match="*staging*")] == []
        assert await stored_seq(client, KEYS) == driver.engine.seq > older
        await journal.close()
        await client.aclose()

    run(scenario())


def test_a_snapshot_whose_parts_were_lost_is_not_published(redis_server: LocalRedis) -> None:
    """Redis restarted without them, or they expired: a partial snapshot must never
    replace a whole one."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 6)
        await play(driver, journal, 1500)
        real_append = client.append
        calls = 0

        async def lose_the_start(key: str, value: bytes) -> int:
            nonlocal calls
            calls += 1
            if calls == 3:
                await client.delete(key)          # the first parts are gone
            return await real_append(key, value)

        client.append = lose_the_start   # type: ignore[method-assign]
        with pytest.raises(SnapshotPartsLost, match="were lost before it was published"):
            await store(client, KEYS, driver.engine, part_bytes=100, pause_s=0)
        assert calls > 3
        assert await client.get(KEYS.snapshot) is None
        assert await stored_seq(client, KEYS) == 0
        assert [k async for k in client.scan_iter(match="*staging*")] == []
        await journal.close()
        await client.aclose()

    run(scenario())


async def _lose_the_tail(client: aioredis.Redis) -> bytes:
    """Redis lost the journal's last three entries, and the gateway journaled another
    batch under the last one's id; that id."""
    rows = await client.xrange(KEYS.journal)
    await client.delete(KEYS.journal)
    for row_id, fields in rows[:-3]:
        await client.xadd(KEYS.journal, fields, id=row_id)
    other = dict(rows[-1][1])
    other[b"e"] = rows[-2][1][b"e"]
    await client.xadd(KEYS.journal, other, id=rows[-1][0])
    return bytes(rows[-1][0])


def test_a_journal_that_lost_what_was_applied_stops_the_snapshotter(
        redis_server: LocalRedis) -> None:
    """Redis lost the journal's tail and the gateway journaled other commands under the
    same sequence numbers: a follower that applied the lost ones must not store its
    state, nor read on as if nothing happened."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 8)
        await play(driver, journal, 600)
        follower = Snapshotter(client, KEYS, every=10**9)
        await follower.start()
        await play(driver, journal, 300)
        await follower.step()                     # applied up to the journal's end
        assert follower.applied is not None
        entry_id, sha = follower.applied
        with pytest.raises(JournalDiverged):      # the script checks it too
            await store(client, KEYS, follower.engine, applied=(entry_id, "0" * 40))
        assert await client.get(KEYS.snapshot) is None
        assert await store(client, KEYS, follower.engine, applied=(entry_id, sha))
        assert await _lose_the_tail(client) == entry_id
        with pytest.raises(JournalDiverged, match=entry_id.decode()):
            await follower.step()
        await journal.close()
        await client.aclose()

    run(scenario())


def test_the_snapshotter_rides_out_a_redis_restart(
        redis_server: LocalRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Redis goes away and comes back (with its data): the follower waits, then reads
    on and stores, without exiting (an exit would be counted as a failure)."""
    async def scenario() -> tuple[int, int, int]:
        client, journal, driver = await opened(redis_server, 9)
        await play(driver, journal, 400)
        await journal.close()
        follower = Snapshotter(client, KEYS, every=1, poll_s=0.05)
        steps = 0

        def alive() -> bool:
            nonlocal steps
            steps += 1
            return follower.stored < driver.engine.seq and steps < 400

        async def restart() -> None:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(redis_server.start)

        await asyncio.to_thread(redis_server.stop)     # down before it even starts
        back = asyncio.create_task(restart())
        await follower.run(alive)
        await back
        stored = await stored_seq(client, KEYS)
        await client.aclose()
        return stored, driver.engine.seq, steps

    with caplog.at_level("INFO", logger="matcher.snapshots"):
        stored, journaled, steps = run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot reach Redis" in m for m in messages)
    assert "snapshotter: Redis is back" in messages
    assert stored == journaled > 0 and steps > 5


@pytest.mark.parametrize("from_snapshot", [False, True])
def test_a_journal_that_diverged_before_the_first_read_stops_the_snapshotter(
        redis_server: LocalRedis, from_snapshot: bool) -> None:
    """The same as above, with the divergence between the follower's start (replaying
    the journal, or only loading a snapshot) and its first read."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 10)
        await play(driver, journal, 600)
        if from_snapshot:
            assert await store(client, KEYS, driver.engine)
        follower = Snapshotter(client, KEYS, every=10**9)
        await follower.start()
        assert follower.engine.seq == driver.engine.seq
        await _lose_the_tail(client)
        with pytest.raises(JournalDiverged):
            await follower.step()
        await journal.close()
        await client.aclose()

    run(scenario())


def test_a_snapshot_stored_before_snapshot_seq_existed_is_adopted(
        redis_server: LocalRedis) -> None:
    async def scenario() -> tuple[int, int, int]:
        client = aioredis.Redis.from_url(redis_server.url)
        await adopt(client, KEYS, 0)                  # nothing recovered: nothing recorded
        none = await stored_seq(client, KEYS)
        await client.set(KEYS.snapshot, b"an old snapshot")
        assert await stored_seq(client, KEYS) == 0     # not recorded yet
        await adopt(client, KEYS, 1200)               # the old snapshot's own seq
        adopted = await stored_seq(client, KEYS)
        await adopt(client, KEYS, 900)                # never over what is recorded
        kept = await stored_seq(client, KEYS)
        await client.delete(KEYS.snapshot)            # deleted by hand, or evicted
        assert await stored_seq(client, KEYS) == 0     # a seq alone counts as none
        await client.aclose()
        return none, adopted, kept

    assert run(scenario()) == (0, 1200, 1200)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_the_snapshotter_process_runs_niced_and_ends_with_its_gateway(
        redis_server: LocalRedis) -> None:
    """A snapshotter must not outlive a killed gateway: the restarted one starts its
    own, and two would do the work twice."""
    gateway = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time\n"
         "p = subprocess.Popen([sys.executable, '-m', 'service.cli', 'snapshotter',"
         " '--redis-url', sys.argv[1], '--shard', 'main', '--every', '10',"
         " '--parent', str(os.getpid())])\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(120)\n", redis_server.url],
        stdout=subprocess.PIPE)
    try:
        assert gateway.stdout is not None
        child = int(gateway.stdout.readline())
        deadline = time.monotonic() + 20
        while os.getpriority(os.PRIO_PROCESS, child) != 10:   # set when it has started
            assert time.monotonic() < deadline, "the snapshotter never lowered its priority"
            time.sleep(0.05)
        time.sleep(0.5)
        assert _alive(child)
        gateway.send_signal(signal.SIGKILL)
        gateway.wait()
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the snapshotter outlived its gateway"
            time.sleep(0.05)
    finally:
        gateway.kill()
        gateway.wait()


def test_sigterm_ends_the_snapshotter_cleanly(redis_server: LocalRedis) -> None:
    """SIGTERM (the gateway stopping it, or the gateway's death) is handled as a
    cancellation, so the work in hand runs its cleanup: see the next test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "snapshotter", "--redis-url", redis_server.url,
         "--shard", "sigterm", "--every", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        for line in proc.stdout:
            if "snapshotter at seq" in line:
                break
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "stopped (SIGTERM)" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()


def test_a_move_cut_short_releases_its_lock_and_leaves_no_unfinished_file(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service import archive as archive_module
    monkeypatch.setattr(archive_module, "PART_BYTES", 256)    # many parts: time to stop it

    root = tmp_path / "archive"

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 44)
        await play(driver, journal, 300)
        archive = await archive_module.JournalArchive.of(root, client, KEYS)
        move = asyncio.get_running_loop().create_task(archive_module.archive_and_trim(
            client, KEYS, archive, driver.engine.seq))
        while not list(root.glob("*/*.tmp")):          # in the middle of its file
            await asyncio.sleep(0.001)
        move.cancel()
        with pytest.raises(asyncio.CancelledError):
            await move
        assert await client.exists(KEYS.archive_lock) == 0
        assert not list(root.glob("*/*"))
        # One a kill left behind goes at the next move, which holds the lock.
        (archive.directory / "000000000001.deadbeef.tmp").write_bytes(b"half")
        assert await archive_module.archive_and_trim(client, KEYS, archive,
                                                     driver.engine.seq) > 0
        assert not list(root.glob("*/*.tmp")) and archive.files()
        await journal.close()
        await client.aclose()

    run(scenario())


def test_sigterm_ends_the_snapshotter_while_it_is_busy(redis_server: LocalRedis) -> None:
    """Capturing and encoding a snapshot holds the event loop for seconds, so a
    cancellation waits for it; a snapshotter told to stop (or whose gateway died) still
    ends within a moment."""
    busy = ("import sys, time\n"
            "from service import cli, snapshots\n"
            "async def step(self):\n"
            "    print('busy', flush=True)\n"
            "    end = time.monotonic() + 30\n"
            "    while time.monotonic() < end:\n"
            "        pass\n"
            "    return False\n"
            "snapshots.Snapshotter.step = step\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", busy, "snapshotter", "--redis-url", redis_server.url,
         "--shard", "busy", "--every", "10"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "busy"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
        proc.wait()


def test_a_snapshotter_reads_on_after_another_moved_its_last_entry_to_the_archive(
        redis_server: LocalRedis, tmp_path: Path) -> None:
    """Two snapshotters at once (a deploy's overlap): the one that stores a snapshot
    moves the journal before it to the archive, past the other's last applied entry.
    The other finds that entry in the archive, not a diverged journal, and reads on."""
    async def scenario() -> tuple[str, str]:
        client, journal, driver = await opened(redis_server, 45)
        await play(driver, journal, 400)
        slow = Snapshotter(client, KEYS, every=10**9, archive_root=tmp_path)
        await slow.start()
        await slow.step()                            # applied up to here
        await play(driver, journal, 400)
        busy = Snapshotter(client, KEYS, every=1, archive_root=tmp_path)
        await busy.start()
        assert await busy.step()                     # stored, and moved the journal
        assert slow.applied is not None
        first: Any = await client.xrange(KEYS.journal, count=1)
        assert int(first[0][0].split(b"-")[0]) > int(slow.applied[0].split(b"-")[0])
        await play(driver, journal, 100)
        await slow.step()
        await busy.step()
        await journal.close()
        await client.aclose()
        return snapshot.state_hash(slow.engine), snapshot.state_hash(driver.engine)

    slow, live = run(scenario())
    assert slow == live
