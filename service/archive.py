"""The journal's older part, moved from Redis to files once a snapshot covers it.

Redis holds the journal in memory, a few hundred bytes a command, and a busy day of
re-quotes is millions of commands. Recovery needs only what follows the stored snapshot,
so the snapshotter, after storing one, copies the journal entries before it to a file
here, makes the file durable, and only then removes them from Redis (`XTRIM MINID`).
Every command stays on record: in Redis or in the archive, never in neither
([ADR 20](../docs/adr/0020-journal-archive.md)).

Layout: `<dir>/<shard>-<journal id>/<first seq, 12 digits>.mpk`, each file a MessagePack
array of at most `FILE_ENTRIES` `[entry id, batch]` pairs exactly as the stream held
them, each trimmed from Redis once written. The journal id is a random name Redis keeps
beside the journal (`Keys.journal_id`): a Redis started empty begins a new journal whose
sequence numbers start again at 1, and its archive must not be read as the old one's.
A file is written under a temporary name, synced, renamed and its directory synced: it
is whole or absent. A move cut short after a file was written leaves its entries in
Redis; the next one starts at the same entry and writes the same file again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from matcher import protocol as wire
from service.journal import Keys, read_journal, stream_seq

log = logging.getLogger("matcher.archive")

_Row = tuple[str, bytes]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[tuple[str, bytes]]).decode


class ArchiveWriteFailed(RuntimeError):
    """The archive's file could not be written (a full disk, no permission)."""


#: The move holds Redis, and the disk Redis syncs its append-only file to, in small
#: steps with room between them for the journal's writes, as a snapshot's parts do: a
#: read of 1,000 entries holds Redis for a millisecond or more, and a 6 MB file synced
#: at once made small syncs of another file on the same disk (as Redis's are) wait up
#: to 7.3 ms; in 128 KB parts, 2.1 ms.
READ_CHUNK = 200
FILE_ENTRIES = 50_000        # about 15 MB: what one file holds, and memory while moving
PART_BYTES = 128 * 1024
PAUSE_S = 0.002


async def journal_id(client: aioredis.Redis, keys: Keys) -> str:
    """The name of the journal Redis holds, made the first time it is asked for."""
    await client.set(keys.journal_id, uuid.uuid4().hex, nx=True)
    value: Any = await client.get(keys.journal_id)
    return str(value.decode())


class JournalArchive:
    """The archive of one journal: `directory` is `<dir>/<shard>-<journal id>`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    async def of(cls, root: str | Path, client: aioredis.Redis, keys: Keys) -> JournalArchive:
        return cls(Path(root) / f"{keys.shard}-{await journal_id(client, keys)}")

    def files(self) -> list[Path]:
        """The archive's files, oldest first (their names sort by first seq)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if p.suffix == ".mpk")

    async def write(self, rows: list[_Row]) -> Path:
        """Store journal entries, oldest first, durably; returns the file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{stream_seq(rows[0][0]):012d}.mpk"
        tmp = path.with_suffix(".tmp")
        data = memoryview(_encode(rows))
        with open(tmp, "wb") as f:
            for start in range(0, len(data), PART_BYTES):
                f.write(data[start:start + PART_BYTES])
                f.flush()
                os.fdatasync(f.fileno())
                await asyncio.sleep(PAUSE_S)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)              # the rename itself, through a power cut
        finally:
            os.close(fd)
        return path

    def read(self, after: int = 0) -> Iterator[list[wire.JournalEntry]]:
        """The archived commands with sequence numbers above `after`, batch by batch, as
        `journal.read_journal` gives Redis's (files that overlap give each once)."""
        files = self.files()
        for i, path in enumerate(files):
            if i + 1 < len(files) and int(files[i + 1].stem) <= after:
                continue     # what it holds that the next does not ends before `after`
            for entry_id, batch in _decode(path.read_bytes()):
                if stream_seq(entry_id) <= after:
                    continue
                entries = [e for e in wire.journal_decoder.decode(batch) if e.seq > after]
                if entries:
                    after = entries[-1].seq
                    yield entries


async def archive_and_trim(client: aioredis.Redis, keys: Keys, archive: JournalArchive,
                           keep_from: int) -> int:
    """Move the journal entries before the one that ends at `keep_from` (the stored
    snapshot's seq) to the archive, then out of Redis, at most `FILE_ENTRIES` to a file
    (a journal archived for the first time can hold months). Returns how many moved.

    One process moves at a time (a lock in Redis, `Keys.archive_lock`): two that read
    the same entries at different moments could otherwise each write the file of that
    name, the later one holding fewer entries than the other trimmed. With the lock,
    nothing else removes journal entries and new ones come after `keep_from`, so the
    entries read are exactly those `XTRIM MINID` removes: every id is `<seq>-0`, so
    `MINID <seq>-1` removes the entry at seq and all before it."""
    token = uuid.uuid4().hex
    if not await client.set(keys.archive_lock, token, nx=True, px=LOCK_MS):
        log.info("another process is archiving the journal; this one does not")
        return 0
    try:
        return await _move(client, keys, archive, keep_from, token)
    finally:
        await client.eval(_HOLD, 1, keys.archive_lock, token, 0)    # 0: release


#: Extend the lock (ARGV[2] ms) or, with 0, release it, if ARGV[1] still holds it.
_HOLD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
LOCK_MS = 600_000            # a holder that died lets go after this; renewed per file


async def _move(client: aioredis.Redis, keys: Keys, archive: JournalArchive,
                keep_from: int, token: str) -> int:
    moved = 0
    while True:
        if not await client.eval(_HOLD, 1, keys.archive_lock, token, LOCK_MS):
            log.warning("the journal's archive lock expired during a move; stopping it")
            return moved
        began = time.monotonic()
        rows = await _oldest(client, keys, keep_from)
        if not rows:
            return moved
        try:
            path = await archive.write(rows)
        except OSError as exc:
            raise ArchiveWriteFailed(f"could not archive the journal in "
                                     f"{archive.directory} ({exc})") from exc
        # Exact (`=`): redis-py asks for `~` by default, which stops at whole nodes and
        # at most 100 of them a call (measured: 9,995 of 20,286 entries removed).
        removed: Any = await client.xtrim(keys.journal, minid=f"{stream_seq(rows[-1][0])}-1",
                                          approximate=False)
        if removed != len(rows):    # someone else trimmed too: say so, the file holds ours
            log.warning("journal trim removed %d entries, %d were archived", removed,
                        len(rows))
        log.info("journal: archived %d entries, seq %s to %s, in %s; trimmed from Redis "
                 "(%.2f s)", len(rows), rows[0][0], rows[-1][0], path,
                 time.monotonic() - began)
        moved += len(rows)
        if len(rows) < FILE_ENTRIES:
            return moved


async def _oldest(client: aioredis.Redis, keys: Keys, before: int) -> list[_Row]:
    """Up to `FILE_ENTRIES` of the journal's oldest entries with ids below `before`."""
    rows: list[_Row] = []
    start = "-"
    while len(rows) < FILE_ENTRIES:
        got: Any = await client.xrange(keys.journal, min=start, max=f"({before}-0",
                                       count=min(READ_CHUNK, FILE_ENTRIES - len(rows)))
        rows += [(entry_id.decode(), fields[b"e"]) for entry_id, fields in got]
        if len(got) < READ_CHUNK:
            break
        start = f"({got[-1][0].decode()}"
        await asyncio.sleep(PAUSE_S)
    return rows


@dataclass(frozen=True, slots=True)
class Coverage:
    """Which commands the archive and Redis's journal hold together (`check`)."""

    files: int
    archived: tuple[int, int] | None    # first and last command in the archive
    in_redis: tuple[int, int] | None    # first and last command in Redis's journal
    missing: list[tuple[int, int]]      # ranges neither holds, below the last

    @property
    def complete(self) -> bool:
        return not self.missing


async def check(client: aioredis.Redis, keys: Keys, archive: JournalArchive) -> Coverage:
    """Read the whole archive and Redis's journal after it, as a recovery without a
    snapshot would, and say whether every command from 1 on is there: what to run
    before relying on an archive (a restored backup, a moved directory)."""
    missing: list[tuple[int, int]] = []
    expected = 1

    def see(entries: list[wire.JournalEntry], span: list[int]) -> None:
        nonlocal expected
        for entry in entries:
            if entry.seq > expected:
                missing.append((expected, entry.seq - 1))
            expected = max(expected, entry.seq + 1)
        span[:] = [span[0] if span else entries[0].seq, entries[-1].seq]

    archived: list[int] = []             # first and last seen, once something is
    for entries in archive.read():
        see(entries, archived)
    in_redis: list[int] = []
    async for entries in read_journal(client, keys, after=expected - 1):
        see(entries, in_redis)
    return Coverage(len(archive.files()), _span(archived), _span(in_redis), missing)


def _span(seen: list[int]) -> tuple[int, int] | None:
    return (seen[0], seen[1]) if seen else None
