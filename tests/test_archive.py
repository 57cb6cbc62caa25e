"""The journal's archive: once a snapshot is stored, the journal before it moves from
Redis to files; every command is then in exactly one of the two, and recovery is exact
from the snapshot, or from the archive and Redis together when the snapshot is gone."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from matcher import protocol as wire
from matcher import snapshot
from service.archive import JournalArchive, archive_and_trim, check, journal_id
from service.journal import journal_start, read_journal
from service.localredis import LocalRedis
from service.recovery import JournalGap, recover
from service.snapshots import Snapshotter, stored_seq
from tests.conftest import ServerProcess, run, write_config
from tests.test_journal import KEYS, opened, play


async def every_seq(client: aioredis.Redis, archive: JournalArchive) -> list[int]:
    """The sequence numbers of the archive, then of Redis's journal, in order."""
    seqs = [e.seq for batch in archive.read() for e in batch]
    async for batch in read_journal(client, KEYS):
        seqs += [e.seq for e in batch]
    return seqs


async def forget_the_snapshot(client: aioredis.Redis) -> None:
    await client.delete(KEYS.snapshot, KEYS.snapshot_seq)


def test_after_a_snapshot_the_journal_before_it_moves_to_the_archive(
        redis_server: LocalRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="matcher.archive")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 31)
        await play(driver, journal, 2500)
        follower = Snapshotter(client, KEYS, every=1000, archive_root=tmp_path / "archive")
        await follower.start()
        assert await journal_start(client, KEYS) == 1        # nothing moved yet
        assert await follower.step()                        # stored, then trimmed
        first = await stored_seq(client, KEYS)
        archive = follower.archive
        assert archive is not None and len(archive.files()) == 1
        # Redis keeps the entry the snapshot ends at (its publication checks it).
        oldest = await client.xrange(KEYS.journal, count=1)
        assert oldest[0][0] == b"%d-0" % first
        assert await every_seq(client, archive) == list(range(1, driver.engine.seq + 1))
        # In sequence numbers, as the runbook reads it (it logged entry ids).
        assert re.search(r"journal: archived \d+ entries, seq \d+ to \d+, in ", caplog.text)

        await play(driver, journal, 1500)
        assert await follower.step()
        assert len(archive.files()) == 2
        assert await every_seq(client, archive) == list(range(1, driver.engine.seq + 1))
        archived = [e.seq for batch in archive.read() for e in batch]
        for after in (first - 1, first, first + 7):     # into the second file
            assert [e.seq for batch in archive.read(after) for e in batch] == \
                [seq for seq in archived if seq > after]
        live = snapshot.state_hash(driver.engine)

        # With the snapshot: exact, and the archive is not even read.
        assert snapshot.state_hash((await recover(client, KEYS, archive=archive)).engine) \
            == live
        # Without it, Redis alone lacks the start and says so; with the archive, exact.
        await forget_the_snapshot(client)
        with pytest.raises(JournalGap, match=r"commands 1 to \d+ are missing"):
            await recover(client, KEYS)
        again = await recover(client, KEYS, archive=archive)
        assert (again.snapshot_seq, snapshot.state_hash(again.engine)) == (0, live)
        assert again.replayed == driver.engine.seq
        await journal.close()
        await client.aclose()

    run(scenario())


def test_the_trim_removes_exactly_what_was_archived_however_many(
        redis_server: LocalRedis, tmp_path: Path) -> None:
    """An approximate trim (`~`) removes at most 100 stream nodes a call; with one entry
    a node, a move of over a hundred entries shows whether the trim was exact."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 35)
        await client.config_set("stream-node-max-entries", 1)
        for _ in range(150):                     # each waits for its batch: 150 or more
            await play(driver, journal, 4)
        before = await client.xlen(KEYS.journal)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        moved = await archive_and_trim(client, KEYS, archive, driver.engine.seq)
        assert moved == before - 1 >= 150
        assert await client.xlen(KEYS.journal) == 1     # only the entry at the seq
        assert await every_seq(client, archive) == list(range(1, driver.engine.seq + 1))
        await journal.close()
        await client.aclose()

    run(scenario())


def test_one_process_moves_the_journal_at_a_time(
        redis_server: LocalRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two movers reading the same entries at different moments could write the same
    file, the later with fewer entries than the other trimmed: a lock in Redis lets one
    move at a time, and lets go when it is done. A lock held is a warning with how long
    it lasts: a mover killed mid-move holds it for minutes (found in an audit)."""
    caplog.set_level(logging.WARNING, logger="matcher.archive")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 39)
        for _ in range(20):
            await play(driver, journal, 4)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        await client.set(KEYS.archive_lock, "another mover", px=60_000)
        assert await archive_and_trim(client, KEYS, archive, driver.engine.seq) == 0
        assert await journal_start(client, KEYS) == 1 and not archive.files()
        assert re.search(r"holds the journal archive's lock \(for (59|60) s more\)",
                         caplog.text), caplog.text
        await client.delete(KEYS.archive_lock)
        assert await archive_and_trim(client, KEYS, archive, driver.engine.seq) > 0
        assert await client.exists(KEYS.archive_lock) == 0          # released
        assert await every_seq(client, archive) == list(range(1, driver.engine.seq + 1))
        await journal.close()
        await client.aclose()

    run(scenario())


def test_a_long_journal_moves_in_files_of_bounded_size(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal archived for the first time may hold months: it goes a file at a time,
    each trimmed as soon as it is written, never all of it in memory."""
    from service import archive as archive_module
    monkeypatch.setattr(archive_module, "FILE_ENTRIES", 7)
    monkeypatch.setattr(archive_module, "READ_CHUNK", 3)

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 36)
        for _ in range(40):
            await play(driver, journal, 4)
        before = await client.xlen(KEYS.journal)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        assert await archive_and_trim(client, KEYS, archive, driver.engine.seq) == before - 1
        files = archive.files()
        assert len(files) == -(-(before - 1) // 7)
        sizes = [len(archive_module._decode(f.read_bytes())) for f in files]
        assert max(sizes) == 7 and sum(sizes) == before - 1
        assert await every_seq(client, archive) == list(range(1, driver.engine.seq + 1))
        await journal.close()
        await client.aclose()

    run(scenario())


def test_numbers_a_skip_skipped_are_not_missing_from_the_archive(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ADR 29: archived, a `skip` still accounts for the numbers it skipped: the archive
    is complete, reads on past them, and recovery from it is exact."""
    from service import archive as archive_module
    from tests.test_journal import ADMIN
    monkeypatch.setattr(archive_module, "FILE_ENTRIES", 5)

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 39)
        for _ in range(10):
            await play(driver, journal, 4)
        before = driver.engine.seq
        out = driver.submit(ADMIN, wire.Skip(last=before + 500))
        assert out.entry is not None
        await journal.append(out.entry, out.trades)
        for _ in range(10):
            await play(driver, journal, 4)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        assert await archive_and_trim(client, KEYS, archive, driver.engine.seq) > 5
        numbers = [*range(1, before + 2), *range(before + 501, driver.engine.seq + 1)]
        assert await every_seq(client, archive) == numbers
        archived = [e.seq for batch in archive.read() for e in batch]
        assert archived[-1] > before + 500
        assert [e.seq for batch in archive.read(before + 500) for e in batch] == \
            [n for n in archived if n > before + 500]
        coverage = await check(client, KEYS, archive)
        assert coverage.complete and coverage.archived is not None
        assert coverage.archived[0] == 1
        assert coverage.in_redis is not None and coverage.in_redis[1] == driver.engine.seq
        await forget_the_snapshot(client)
        again = await recover(client, KEYS, archive=archive)
        assert snapshot.state_hash(again.engine) == snapshot.state_hash(driver.engine)
        await journal.close()
        await client.aclose()

    run(scenario())


def test_a_trim_cut_short_after_its_file_is_done_again_and_nothing_repeats(
        redis_server: LocalRedis, tmp_path: Path) -> None:
    """The snapshotter died between writing the file and trimming Redis: the next trim
    starts at the same entry and replaces the file with one that holds more."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 32)
        await play(driver, journal, 1500)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        half = driver.engine.seq // 2
        rows = await client.xrange(KEYS.journal, max=f"({half}-0")
        await write(archive, [(entry_id.decode(), fields[b"e"]) for entry_id, fields in rows])
        assert await journal_start(client, KEYS) == 1        # the trim never happened
        await play(driver, journal, 500)
        moved = await archive_and_trim(client, KEYS, archive, driver.engine.seq)
        assert moved > len(rows) and len(archive.files()) == 1
        assert await every_seq(client, archive) == list(range(1, driver.engine.seq + 1))
        await journal.close()
        await client.aclose()

    run(scenario())


def test_an_archive_that_cannot_be_written_trims_nothing(
        redis_server: LocalRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 33)
        await play(driver, journal, 1200)
        blocked = tmp_path / "not-a-directory"
        blocked.write_text("")
        follower = Snapshotter(client, KEYS, every=1000, archive_root=blocked)
        await follower.start()
        assert await follower.step()                 # the snapshot itself is stored
        assert follower.archive_failures == 1
        assert await journal_start(client, KEYS) == 1    # the journal stays whole
        assert await client.get(KEYS.archive_failures) == b"1"   # for the gateway's alert
        await journal.close()
        await client.aclose()

    run(scenario())
    assert "could not archive the journal" in caplog.text


def test_recovery_starts_again_from_a_snapshot_stored_and_trimmed_while_it_read(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshotter run elsewhere stores a newer snapshot and trims the journal after
    recovery loaded the older one: recovery starts again from the newer one. A gap
    with no newer snapshot to explain it still stops recovery."""
    from service import recovery
    from service.snapshots import store

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 37)
        await play(driver, journal, 600)
        assert await store(client, KEYS, driver.engine)
        older = driver.engine.seq
        await play(driver, journal, 600)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        real = recovery.catch_up
        calls = []

        async def meanwhile(*args: object, **kwargs: object) -> int:
            if not calls:               # after the first attempt loaded the older one
                assert await store(client, KEYS, driver.engine)
                await archive_and_trim(client, KEYS, archive, driver.engine.seq)
            calls.append(1)
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(recovery, "catch_up", meanwhile)
        got = await recover(client, KEYS)
        assert len(calls) == 2 and got.snapshot_seq == driver.engine.seq > older
        assert snapshot.state_hash(got.engine) == snapshot.state_hash(driver.engine)
        monkeypatch.setattr(recovery, "catch_up", real)
        await forget_the_snapshot(client)
        with pytest.raises(JournalGap):
            await recover(client, KEYS)
        await journal.close()
        await client.aclose()

    run(scenario())


def test_a_journal_begun_again_in_an_empty_redis_has_an_archive_of_its_own(
        redis_server: LocalRedis, tmp_path: Path) -> None:
    """Sequence numbers start again at 1 in an empty Redis: its archive must not be
    read as the old journal's."""
    async def scenario() -> tuple[str, str, str]:
        client = aioredis.Redis.from_url(redis_server.url)
        first = await journal_id(client, KEYS)
        same = await journal_id(client, KEYS)
        await client.flushall()
        other = await journal_id(client, KEYS)
        await client.aclose()
        return first, same, other

    first, same, other = run(scenario())
    assert first == same != other


def archiving_server(tmp_path: Path, redis_server: LocalRedis, root: Path) -> ServerProcess:
    """A server that snapshots every 40 commands, with `[engine] journal_archive`."""
    from service.localredis import free_port
    port = free_port()
    path = write_config(tmp_path / "m.toml", redis_server.url, port)
    path.write_text(path.read_text().replace(
        "snapshot_every = 1000", f'snapshot_every = 40\njournal_archive = "{root}"'))
    return ServerProcess(path, port, tmp_path / "server.log").start()


async def sixty_bids(server: ServerProcess) -> None:
    from tests.test_service import F11, bid, line, sessions
    async with sessions(server, F11) as (f11,):
        await f11.ok(line("DFM"))
        for i in range(60):
            await f11.ok(bid(f"b{i}", "DFM-30D", 250 + i % 7, 100_000))


def test_the_server_alerts_on_an_archive_it_cannot_write(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    from tests.test_service import metric
    blocked = tmp_path / "not-a-directory"
    server = archiving_server(tmp_path, redis_server, blocked)
    # Writable at the start (which refuses one that is not), a file once it serves: as
    # a disk that fills up or a mount that goes away.
    blocked.rmdir()
    blocked.write_text("")
    try:
        assert metric(server, "matcher_journal_archive_failures_total", required=True) == 0
        run(sixty_bids(server))
        deadline = time.monotonic() + 20
        while metric(server, "matcher_journal_archive_failures_total") < 1:
            assert time.monotonic() < deadline, "no archive failure counted"
            time.sleep(0.1)
        assert metric(server, "matcher_journal_start_seq") == 1     # nothing trimmed
    finally:
        server.kill()


def test_the_server_archives_and_recovers_from_the_archive_after_a_restart(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """`[engine] journal_archive`: the gateway's snapshotter moves the journal, and a
    gateway restarted without the snapshot recovers the same state from the archive."""
    from tests.test_service import metric

    root = tmp_path / "archive"
    server = archiving_server(tmp_path, redis_server, root)

    async def in_redis(then: str) -> int | None:
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            if then == "forget the snapshot":
                await forget_the_snapshot(client)
            return await journal_start(client, KEYS)
        finally:
            await client.aclose()

    try:
        run(sixty_bids(server))
        deadline = time.monotonic() + 20
        while (run(in_redis("look")) or 1) == 1:
            assert time.monotonic() < deadline, "the snapshotter never trimmed the journal"
            time.sleep(0.1)
        assert list(root.glob("main-*/*.mpk"))
        while metric(server, "matcher_journal_start_seq") <= 1:     # read every second
            assert time.monotonic() < deadline + 5, "matcher_journal_start_seq stays at 1"
            time.sleep(0.1)
        seq = json.loads(server.get("/health")[1])["seq"]
        assert server.terminate() == 0
        run(in_redis("forget the snapshot"))
        server.start()
        status, body = server.get("/health")
        assert status == 200 and json.loads(body)["seq"] == seq + 1      # and its `resume`
        assert f"recovered seq {seq}: snapshot at 0 + {seq} journaled commands" \
            in (tmp_path / "server.log").read_text()
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()



def test_matcher_replay_full_reads_the_archive_it_is_given(
        redis_server: LocalRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Without the archive it says which commands are missing, and only that: the
    journal's read ahead, left behind, logged "Task exception was never retrieved" with
    a traceback after it (found in an operator's audit)."""
    import gc

    from service.cli import main

    async def scenario() -> str:
        client, journal, driver = await opened(redis_server, 34)
        await play(driver, journal, 1300)
        follower = Snapshotter(client, KEYS, every=1000, archive_root=tmp_path)
        await follower.start()
        assert await follower.step()
        await journal.close()
        await client.aclose()
        return snapshot.state_hash(driver.engine)

    live = run(scenario())
    url = redis_server.url
    assert main(["replay", "--redis-url", url, "--full"]) == 1
    gc.collect()                        # a task left failed logs when it is collected
    assert "are missing" in capsys.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert main(["replay", "--redis-url", url, "--full", "--archive", str(tmp_path)]) == 0
    assert f"state hash {live}" in capsys.readouterr().out


def test_matcher_archive_checks_that_every_command_is_held(
        redis_server: LocalRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before relying on an archive (a restored backup): every command from 1 on is in
    the archive or in Redis; a file gone is a range reported missing."""
    from service import archive as archive_module
    from service.cli import main
    monkeypatch.setattr(archive_module, "FILE_ENTRIES", 10)

    async def scenario() -> int:
        client, journal, driver = await opened(redis_server, 38)
        for _ in range(40):
            await play(driver, journal, 4)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        await archive_and_trim(client, KEYS, archive, driver.engine.seq - 20)
        await journal.close()
        await client.aclose()
        return driver.engine.seq

    last = run(scenario())
    args = ["archive", "--redis-url", redis_server.url, "--archive", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"to {last}" in out and "complete" in out
    files = sorted(tmp_path.glob("main-*/*.mpk"))
    assert len(files) >= 3
    hole = archive_module._decode(files[1].read_bytes())
    files[1].unlink()
    assert main(args) == 1
    first = journal_seqs(hole[0][1])[0]
    assert f"missing: commands {first} to " in capsys.readouterr().err
    # Recovery without the snapshot stops at the same hole, and says where to look.
    replay = ["replay", "--redis-url", redis_server.url, "--full", "--archive", str(tmp_path)]
    assert main(replay) == 1
    err = capsys.readouterr().err
    assert f"commands {first} to " in err and "The archive lacks them" in err


async def write(archive: JournalArchive, rows: list[tuple[str, bytes]]) -> Path:
    """A file of `rows` as a move writes it, without the move's checks against Redis."""
    return archive.publish(rows, await archive.stage(rows))


def journal_seqs(batch: bytes) -> list[int]:
    from matcher import protocol as wire
    return [e.seq for e in wire.journal_decoder.decode(batch)]


MEANWHILE = ["the lock expired and another mover took it",
             "Redis came back empty and began a new journal",
             "someone else trimmed the journal"]


@pytest.mark.parametrize("meanwhile", MEANWHILE)
@pytest.mark.parametrize("when", ["staged", "published"])
def test_a_file_is_published_and_trimmed_only_if_redis_did_not_change_meanwhile(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        meanwhile: str, when: str) -> None:
    """Before publishing the file it wrote, and again in the trim's own script, a mover
    checks that it still holds the lock, that Redis still holds the archive's journal,
    and that it still starts at the file's first entry: a stalled mover or a Redis
    replaced meanwhile loses nothing."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 40)
        await play(driver, journal, 600)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        sync = redis.Redis.from_url(redis_server.url)
        if when == "staged":
            real_stage = archive.stage

            async def stage_then_change(rows: list[tuple[str, bytes]], token: str = "") -> Path:
                tmp = await real_stage(rows, token)
                run_sync_change(sync, meanwhile, rows)
                return tmp
            monkeypatch.setattr(archive, "stage", stage_then_change)
        else:
            real_publish = archive.publish

            def publish_then_change(rows: list[tuple[str, bytes]], tmp: Path) -> Path:
                path = real_publish(rows, tmp)
                run_sync_change(sync, meanwhile, rows)
                return path
            monkeypatch.setattr(archive, "publish", publish_then_change)
        first = await client.xrange(KEYS.journal, count=2)
        length = await client.xlen(KEYS.journal)
        assert await archive_and_trim(client, KEYS, archive, driver.engine.seq) == 0
        expected = length - 1 if meanwhile.startswith("someone") else length
        assert await client.xlen(KEYS.journal) == expected          # nothing of ours trimmed
        assert (await client.xrange(KEYS.journal, count=1))[0][0] == \
            first[1 if meanwhile.startswith("someone") else 0][0]
        # Refused before publishing: no file, and nothing half-written left behind.
        assert len(archive.files()) == (1 if when == "published" else 0)
        assert not list(archive.directory.glob("*.tmp"))
        sync.close()
        await journal.close()
        await client.aclose()

    run(scenario())


def run_sync_change(client: Any, meanwhile: str, rows: list[tuple[str, bytes]]) -> None:
    if meanwhile.startswith("the lock"):
        client.set(KEYS.archive_lock, "another mover", px=60_000)
    elif meanwhile.startswith("Redis came back"):
        client.set(KEYS.journal_id, "a-new-journal")
    else:
        client.xtrim(KEYS.journal, minid=rows[1][0], approximate=False)


def test_a_mover_that_stalled_past_its_lock_leaves_the_next_movers_file_alone(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mover 1 writes its file slowly; its lock expires; mover 2 archives more of the
    journal into a file of the same name and trims it. Mover 1 must neither set that
    file aside nor replace it with its shorter one: every command stays on record."""
    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 42)
        await play(driver, journal, 300)
        first_cut = driver.engine.seq
        await play(driver, journal, 300)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        real_stage = archive.stage
        stalled = True

        async def stall(rows: list[tuple[str, bytes]], token: str = "") -> Path:
            nonlocal stalled
            tmp = await real_stage(rows, token)
            if stalled:                     # mover 1 only: its lock expires, mover 2 runs
                stalled = False
                await client.delete(KEYS.archive_lock)
                assert await archive_and_trim(client, KEYS, archive, driver.engine.seq) > 0
            return tmp
        monkeypatch.setattr(archive, "stage", stall)
        assert await archive_and_trim(client, KEYS, archive, first_cut) == 0
        assert (await check(client, KEYS, archive)).missing == []
        assert len(archive.files()) == 1
        assert not [p for p in archive.directory.iterdir() if "superseded" in p.name]
        await journal.close()
        await client.aclose()

    run(scenario())


def test_a_file_that_cannot_be_finished_leaves_no_part_of_itself(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from service import archive as archive_module
    monkeypatch.setattr(archive_module, "PART_BYTES", 1024)
    syncs = []

    def disk_fills_up(fd: int) -> None:
        syncs.append(fd)
        if len(syncs) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        client, journal, driver = await opened(redis_server, 41)
        await play(driver, journal, 600)
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        length = await client.xlen(KEYS.journal)
        monkeypatch.setattr(os, "fdatasync", disk_fills_up)
        with pytest.raises(archive_module.ArchiveWriteFailed, match="No space left"):
            await archive_and_trim(client, KEYS, archive, driver.engine.seq)
        assert list(archive.directory.iterdir()) == []              # no .tmp left behind
        assert await client.xlen(KEYS.journal) == length            # nothing trimmed
        assert await client.exists(KEYS.archive_lock) == 0          # and the lock let go
        await journal.close()
        await client.aclose()

    run(scenario())


def entries_batch(seqs: range, participant: int) -> bytes:
    from matcher import protocol as wire
    return wire.journal_encoder.encode(
        [wire.JournalEntry(seq, 1_767_225_600_000_000_000 + seq, participant,
                           wire.Cancel(client_id=f"c{seq}")) for seq in seqs])


def test_after_redis_came_back_from_an_older_copy_the_history_it_went_on_with_is_read(
        tmp_path: Path) -> None:
    """Old history: commands 1-20 archived in two files. Redis comes back from a copy
    that ended at 7 (its journal starting at 5) and goes on differently from 8: the
    next move writes a file from 5 on. The old file after it is set aside, the one
    before it is read only up to where the new one takes over."""
    async def scenario() -> None:
        archive = JournalArchive(tmp_path / "main-0123abcd")
        await write(archive, [(f"{s}-0", entries_batch(range(s, s + 1), 11))
                             for s in range(1, 11)])                 # old 1..10
        await write(archive, [(f"{s}-0", entries_batch(range(s, s + 1), 11))
                             for s in range(11, 21)])                # old 11..20
        assert [p.name for p in archive.files()] == ["000000000001.mpk", "000000000011.mpk"]
        rows = [("5-0", entries_batch(range(5, 6), 11)),             # the same 5..7
                ("7-0", entries_batch(range(6, 8), 11))]
        rows += [(f"{s + 2}-0", entries_batch(range(s, s + 3), 22))  # new 8..16
                 for s in (8, 11, 14)]
        await write(archive, rows)
        names = sorted(p.name for p in archive.directory.iterdir())
        assert names[:2] == ["000000000001.mpk", "000000000005.mpk"]
        assert names[2].startswith("000000000011.mpk.superseded-")
        got = [(e.seq, e.participant) for batch in archive.read() for e in batch]
        assert got == [(s, 11) for s in range(1, 8)] + [(s, 22) for s in range(8, 17)]
        assert [e.seq for batch in archive.read(after=6) for e in batch] == \
            list(range(7, 17))

    run(scenario())


def test_files_are_ordered_by_number_and_others_are_not_read(tmp_path: Path) -> None:
    async def scenario() -> None:
        archive = JournalArchive(tmp_path / "main-0123abcd")
        big = 10**12 + 5                                   # past twelve digits
        await write(archive, [("999999999999-0",
                              entries_batch(range(999999999999, 10**12), 11))])
        await write(archive, [(f"{big}-0", entries_batch(range(big, big + 1), 11))])
        (archive.directory / "notes.mpk").write_bytes(b"not ours")
        assert [p.stem for p in archive.files()] == ["999999999999", str(big)]
        assert [e.seq for batch in archive.read() for e in batch] == [999999999999, big]

    run(scenario())


def test_tools_that_only_read_never_name_a_journal(
        redis_server: LocalRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main
    url = redis_server.url
    assert main(["archive", "--redis-url", url, "--archive", str(tmp_path)]) == 1
    assert "holds no matcher:{main}:journal-id" in capsys.readouterr().err
    assert main(["replay", "--redis-url", url, "--full", "--archive", str(tmp_path)]) == 1
    assert "no journal was ever archived" in capsys.readouterr().err

    async def named() -> int:
        client = aioredis.Redis.from_url(url)
        try:
            return int(await client.exists(KEYS.journal_id))
        finally:
            await client.aclose()
    assert run(named()) == 0


def test_a_mover_whose_staged_file_another_removed_stops_without_an_alarm(
        redis_server: LocalRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mover 1 passes its check, then stalls past its lock; mover 2 removes mover 1's
    staged file (`discard_stale`), archives further into the same file name and trims.
    Mover 1 then finds its file gone: it sets nothing aside and does not count as an
    archive failure (no `ArchiveWriteFailed`, which alerts)."""
    import threading

    from tests.test_journal import connect

    async def scenario() -> tuple[Any, list[str]]:
        client, journal, driver = await opened(redis_server, 43)
        await play(driver, journal, 300)
        first_cut = driver.engine.seq
        await play(driver, journal, 300)
        second_cut = driver.engine.seq
        archive = await JournalArchive.of(tmp_path, client, KEYS)
        publish = archive.publish
        stalled = True

        def stall(rows: list[tuple[str, bytes]], tmp: Path) -> Path:
            nonlocal stalled
            if stalled:                     # mover 1, paused right after its check
                stalled = False

                async def mover2() -> None:
                    other = connect(redis_server)
                    await other.delete(KEYS.archive_lock)          # mover 1's expired
                    assert await archive_and_trim(other, KEYS, JournalArchive(
                        archive.directory), second_cut) > 0
                    await other.aclose()
                thread = threading.Thread(target=lambda: asyncio.run(mover2()))
                thread.start()
                thread.join()
            return publish(rows, tmp)
        monkeypatch.setattr(archive, "publish", stall)
        assert await archive_and_trim(client, KEYS, archive, first_cut) == 0
        coverage = await check(client, KEYS, archive)
        aside = [p.name for p in archive.directory.iterdir() if "superseded" in p.name]
        await journal.close()
        await client.aclose()
        return coverage, aside

    coverage, aside = run(scenario())
    assert coverage.missing == [] and aside == []
