"""The journal's older part, moved from Redis to files once a snapshot covers it.

Redis holds the journal in memory, a few hundred bytes a command, and a busy day of
re-quotes is millions of commands. Recovery needs only what follows the stored snapshot,
so the snapshotter, after storing one, copies the journal entries before it to a file
here, makes the file durable, and only then removes them from Redis (`XTRIM MINID`).
Every command stays on record: in Redis or in the archive, never in neither
([ADR 20](../docs/adr/0020-journal-archive.md)).

Layout: `<dir>/<shard>-<journal id>/<first entry id, 12 digits>.mpk`, each file a MessagePack
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
import filecmp
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
from redis.exceptions import RedisError

from matcher import protocol as wire
from service.journal import Keys, lax_decoded, read_journal, stream_seq

log = logging.getLogger("matcher.archive")

_Row = tuple[str, bytes]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[tuple[str, bytes]]).decode


class ArchiveWriteFailed(RuntimeError):
    """The archive's file could not be written (a full disk, no permission)."""


class JournalIdMissing(RuntimeError):
    """Redis has no journal id, so no archive can be its journal's."""


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


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new subdirectory) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournalArchive:
    """The archive of one journal: `directory` is `<dir>/<shard>-<journal id>`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # The journal id ends the name (a uuid's hex: no "-" in it, a shard may have).
        self.journal_id = directory.name.rpartition("-")[2]

    @classmethod
    async def of(cls, root: str | Path, client: aioredis.Redis, keys: Keys, *,
                 create: bool = True) -> JournalArchive:
        """The archive of the journal `client` holds. `create=False` (tools that only
        read) never names a journal: without one, Redis holds none to read with it."""
        if create:
            name = await journal_id(client, keys)
        else:
            value: Any = await client.get(keys.journal_id)
            if value is None:
                raise JournalIdMissing(f"Redis holds no {keys.journal_id}: no journal was "
                                       "ever archived from it, so no archive belongs to it")
            name = value.decode()
        return cls(Path(root) / f"{keys.shard}-{name}")

    def files(self) -> list[Path]:
        """The archive's files in the order of their names, the id of each one's first
        journal entry (other files, such as those a new history set aside, are not
        read)."""
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir()
                       if p.suffix == ".mpk" and p.stem.isdigit()), key=lambda p: int(p.stem))

    async def stage(self, rows: list[_Row], token: str = "") -> Path:
        """Write `rows` to a temporary file of this writer's own (`token`) and sync it:
        whole, but not yet read by anyone. Removed again if the write fails."""
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.directory.parent)          # the new directory's own entry
        tmp = self._path(rows).with_suffix(f".{token or uuid.uuid4().hex}.tmp")
        view = memoryview(_encode(rows))
        try:
            with open(tmp, "wb") as f:
                for start in range(0, len(view), PART_BYTES):
                    f.write(view[start:start + PART_BYTES])
                    f.flush()
                    os.fdatasync(f.fileno())
                    await asyncio.sleep(PAUSE_S)
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)      # a full disk is no place for half a file
            raise
        return tmp

    def publish(self, rows: list[_Row], tmp: Path) -> Path:
        """Rename the staged file of `rows` into place. No awaits: it runs right after
        the mover's check that Redis still starts its journal at these rows.

        Files are written in the order of the journal, so a file whose name is at or
        after this one's can only be from an earlier attempt at this move (whose entries
        Redis still holds: they start at the same entry) or from another history of the
        same journal id (Redis brought back from an older copy, whose commands went on
        differently): it is set aside (`.superseded`), never read again, and Redis's
        journal is the truth.
        """
        path = self._path(rows)
        if not tmp.exists():      # removed by a mover that took over: set nothing aside
            raise FileNotFoundError(f"the staged file {tmp} is gone")
        try:
            for other in self.files():
                if int(other.stem) >= int(path.stem) and not (
                        other == path and filecmp.cmp(other, tmp, shallow=False)):
                    aside = other.with_name(f"{other.name}.superseded-{uuid.uuid4().hex[:8]}")
                    log.warning("journal archive: %s is from an earlier attempt at this "
                                "move or from another history of this journal (Redis "
                                "brought back from an older copy): set aside as %s",
                                other, aside.name)
                    os.replace(other, aside)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)            # the renames, through a power cut
        return path

    def discard_stale(self) -> int:
        """Remove temporary files that movers killed mid-write left (run while holding
        the lock: no live mover is writing one). Returns how many."""
        if not self.directory.is_dir():
            return 0
        stale = [p for p in self.directory.iterdir() if p.name.endswith(".tmp")]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def _path(self, rows: list[_Row]) -> Path:
        return self.directory / f"{stream_seq(rows[0][0]):012d}.mpk"

    def batch(self, entry_id: bytes) -> bytes | None:
        """The batch the archive holds under `entry_id`, as the stream held it; None if
        no file has it. Reads the one file whose range can hold it (the last one that
        starts at or before it)."""
        seq = stream_seq(entry_id)
        files = [p for p in self.files() if int(p.stem) <= seq]
        if not files:
            return None
        wanted = entry_id.decode()
        return next((batch for row_id, batch in _decode(files[-1].read_bytes())
                     if row_id == wanted), None)

    def read(self, after: int = 0) -> Iterator[list[wire.JournalEntry]]:
        """The archived commands with sequence numbers above `after`, batch by batch, as
        `journal.read_journal` gives Redis's.

        Where two files overlap, the later one is read: within one history overlapping
        files hold the same commands, and after Redis came back from an older copy the
        later file is the history Redis went on with (`publish` set aside those written
        after it; one written before it can still reach into it).
        """
        files = self.files()
        following: list[_Row] | None = None         # the next file, once decoded
        for i, path in enumerate(files):
            if i + 1 < len(files) and int(files[i + 1].stem) <= after:
                following = None
                continue     # what it holds that the next does not ends before `after`
            rows = following if following is not None else _decode(path.read_bytes())
            following = _decode(files[i + 1].read_bytes()) if i + 1 < len(files) else None
            limit = (wire.decode_journal(following[0][1], lax_decoded)[0].seq
                     if following else None)        # where the next file takes over
            if limit is not None and rows and stream_seq(rows[-1][0]) >= limit:
                log.warning("journal archive: %s and %s overlap from command %d on; the "
                            "later file is read", path.name, files[i + 1].name, limit)
            for entry_id, batch in rows:
                if stream_seq(entry_id) <= after:
                    continue
                entries = [e for e in wire.decode_journal(batch, lax_decoded)
                           if e.seq > after and (limit is None or e.seq < limit)]
                if entries:
                    after = entries[-1].ends_at
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
        # Most often another snapshotter's move. A mover killed mid-move (the OOM killer)
        # holds it until it expires, and nothing else says so (found in an audit).
        left: Any = await client.pttl(keys.archive_lock)      # -1: no expiry; -2: gone
        lasts = ("with no expiry: set by hand? delete it if no mover runs" if left == -1
                 else f"for {max(int(left or 0), 0) / 1000:.0f} s more")
        log.warning("another process holds the journal archive's lock (%s): this "
                    "snapshotter does not move the journal now. If no other one runs, a "
                    "mover died mid-move and the next move after the lock expires goes "
                    "on", lasts)
        return 0
    try:
        if n := archive.discard_stale():      # movers killed mid-write left them
            log.info("journal archive: removed %d unfinished files of earlier moves", n)
        return await _move(client, keys, archive, keep_from, token)
    finally:
        try:
            await client.eval(_HOLD, 1, keys.archive_lock, token, 0)    # 0: release
        except (RedisError, OSError) as exc:       # it expires; what failed matters more
            log.warning("could not release the journal's archive lock (%s)", exc)


#: Extend the lock (ARGV[2] ms) or, with 0, release it, if ARGV[1] still holds it.
_HOLD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
LOCK_MS = 600_000            # a holder that died lets go after this; renewed per file

#: Trim what a file now holds (`XTRIM MINID` ARGV[4]; with "", trim nothing: the check
#: before a file is published), only if this mover still holds the lock (ARGV[1]), Redis
#: still holds the archive's journal (ARGV[2], its id) and that journal still starts at
#: the file's first entry (ARGV[3]): a mover that stalled past its lock, or a Redis that
#: came back empty or failed over while the file was written, publishes and trims
#: nothing. KEYS: journal, lock, journal id. Returns the entries removed (0 for the
#: check), or -1, -2, -3.
_TRIM = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return -2 end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first == 0 or first[1][1] ~= ARGV[3] then return -3 end
if ARGV[4] == '' then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', ARGV[4])
"""
_REFUSED = {-1: "this process no longer holds the archive lock",
            -2: "Redis no longer holds this archive's journal (a different journal id)",
            -3: "Redis's journal no longer starts at the file's first entry"}


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
        checks = (3, keys.journal, keys.archive_lock, keys.journal_id, token,
                  archive.journal_id, rows[0][0])
        try:
            tmp = await archive.stage(rows, token)
        except OSError as exc:
            raise ArchiveWriteFailed(f"could not archive the journal in "
                                     f"{archive.directory} ({exc})") from exc
        # The file took time: only a mover that still holds the lock, and whose rows are
        # still where the journal starts, may publish it, or it could set aside or
        # replace a file another mover wrote (after this one's lock expired) and trimmed.
        try:
            current: Any = await client.eval(_TRIM, *checks, "")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if current < 0:
            tmp.unlink(missing_ok=True)
            log.warning("journal: %d entries staged for the archive were not published: %s",
                        len(rows), _REFUSED[current])
            return moved
        try:
            path = archive.publish(rows, tmp)
        except FileNotFoundError:
            # Stalled after the check, past its lock: the next mover removed the staged
            # file (`discard_stale`) and moved the journal on. Nothing of ours to trim.
            log.warning("journal: %d entries staged for the archive were removed by "
                        "another mover before they were published", len(rows))
            return moved
        except OSError as exc:
            raise ArchiveWriteFailed(f"could not archive the journal in "
                                     f"{archive.directory} ({exc})") from exc
        # Exact (no `~`, which stops at whole nodes and at most 100 of them a call).
        removed: Any = await client.eval(_TRIM, *checks, f"{stream_seq(rows[-1][0])}-1")
        if removed < 0:
            log.warning("journal: archived %d entries in %s but trimmed none: %s", len(rows),
                        path, _REFUSED[removed])
            return moved
        if removed != len(rows):    # nothing else trims the journal: worth a look
            log.warning("journal trim removed %d entries, %d were archived", removed,
                        len(rows))
        log.info("journal: archived %d entries, seq %d to %d, in %s; trimmed from Redis "
                 "(%.2f s)", len(rows), stream_seq(rows[0][0]), stream_seq(rows[-1][0]),
                 path, time.monotonic() - began)
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
            expected = max(expected, entry.ends_at + 1)     # past what a `skip` skips
        span[:] = [span[0] if span else entries[0].seq, entries[-1].ends_at]

    archived: list[int] = []             # first and last seen, once something is
    for entries in archive.read():
        see(entries, archived)
    in_redis: list[int] = []
    async for entries in read_journal(client, keys, after=expected - 1):
        see(entries, in_redis)
    return Coverage(len(archive.files()), _span(archived), _span(in_redis), missing)


def _span(seen: list[int]) -> tuple[int, int] | None:
    return (seen[0], seen[1]) if seen else None
