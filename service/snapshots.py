"""Snapshots, taken by a follower process so that the gateway never pays for one.

The snapshotter (`matcher snapshotter`, started and watched by `matcher serve`) keeps its
own engine: it recovers as the gateway does, then reads the journal as it grows and
applies each command, the same deterministic code, so its state at a sequence number is
the gateway's state at that number. Every `every` commands it encodes that state and
stores it. The gateway's event loop never captures or encodes a snapshot while it
serves, and never forks (ADR 17): the fork of a 300 MB gateway and its copy-on-write
stalled the loop for up to 340 ms a second (ADR 11, superseded).

Every writer of the snapshot (the snapshotter, the gateway at shutdown, `matcher
snapshot`) stores through one script that keeps the newest: a snapshot replaces the
stored one only if it covers more of the journal, and only if the journal holds all it
covers. Writers need not know of each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from matcher import snapshot
from matcher.engine import Engine
from service import gctune, resp
from service.archive import ArchiveWriteFailed, JournalArchive, archive_and_trim
from service.children import Supervised
from service.journal import Keys, stream_seq
from service.recovery import catch_up, recover
from service.retention import trim_fills

log = logging.getLogger("matcher.snapshots")

#: A snapshot goes to Redis in parts of this size, each its own command. Redis writes
#: every command to its append-only file and, with `appendfsync always`, syncs it before
#: it answers the journal writes that came in with it: one SET of several megabytes held
#: them for 80 to 120 ms in the soak; a part holds them for about a millisecond or two.
PART_BYTES = 128 * 1024
PART_PAUSE_S = 0.002        # between parts: room for journal writes on their own
STAGING_TTL_S = 600         # parts of a writer that died go away by themselves
#: Journal entries per read while following. Redis builds a reply while journal writes
#: wait; recovery's 200 (a few hundred kilobytes) is fine when nothing else runs.
READ_CHUNK = 20

#: Publish the parts staged under KEYS[1] as the snapshot, if it is the newest.
#: KEYS: staging, snapshot, snapshot-seq, journal. ARGV: the sequence number covered,
#: the snapshot's length, and the id and SHA-1 of the last journal entry the state
#: applied ("" to skip that check). 1: stored; 0: the stored one covers as much or more;
#: -1: the journal ends before it; -2: parts are missing; -3: that journal entry is not
#: the one the state applied (the journal lost it and moved on). The staging key is gone
#: either way. A snapshot-seq without a snapshot, or unreadable, counts as none.
_PUBLISH_IF_NEWER = """
local seq = tonumber(ARGV[1])
local function refuse(code)
  redis.call('DEL', KEYS[1])
  return code
end
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[2]) then return refuse(-2) end
local stored = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  stored = tonumber(redis.call('GET', KEYS[3]) or '0') or 0
end
if stored >= seq then return refuse(0) end
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
if #last == 0 or tonumber(string.match(last[1][1], '^%d+')) < seq then return refuse(-1) end
if ARGV[3] ~= '' then
  local row = redis.call('XRANGE', KEYS[4], ARGV[3], ARGV[3])
  if #row == 0 or row[1][2][3] ~= 'e' or redis.sha1hex(row[1][2][4]) ~= ARGV[4] then
    return refuse(-3)
  end
end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('SET', KEYS[3], ARGV[1])
return 1
"""


class SnapshotAhead(RuntimeError):
    """A snapshot covers commands the journal does not hold: storing it would make
    recovery serve commands that were never durable."""


class JournalDiverged(RuntimeError):
    """The journal no longer holds an entry this state applied: Redis lost it and the
    gateway journaled other commands in its place. The state must be rebuilt."""


class SnapshotPartsLost(RedisError):
    """Parts of a snapshot being written vanished (Redis restarted without them, or
    they expired); a later attempt writes them all again."""


Row = tuple[bytes, str]         # a journal entry's id and the SHA-1 of its batch


async def store(client: aioredis.Redis, keys: Keys, engine: Engine, *,
                applied: Row | None = None, part_bytes: int = PART_BYTES,
                pause_s: float = PART_PAUSE_S) -> str | None:
    """Store the engine's state if it is newer than the stored snapshot: its hash
    (`snapshot.state_hash`, logged, for an operator to compare with a replay's), None
    if not. `applied`: the last journal entry the state applied, checked to be still
    there.

    The parts go to a key of this writer's own, which one script then renames over the
    snapshot: readers see the old snapshot or the new one, never a part of it.
    """
    seq = engine.seq
    if await stored_seq(client, keys) >= seq:
        return None
    encoded = snapshot.encode(snapshot.capture(engine))
    data = snapshot.pack(encoded)
    staging = keys.snapshot_staging(uuid.uuid4().hex)
    try:
        for offset in range(0, len(data), part_bytes):
            part = data[offset:offset + part_bytes]
            if offset == 0:
                await client.set(staging, part, ex=STAGING_TTL_S)
            else:
                await client.append(staging, part)
            if pause_s:
                await asyncio.sleep(pause_s)
        row_id, row_sha = applied if applied is not None else (b"", "")
        done = await client.eval(_PUBLISH_IF_NEWER, 4, staging, keys.snapshot,
                                 keys.snapshot_seq, keys.journal, seq, len(data),
                                 row_id, row_sha)
    except Exception:
        with contextlib.suppress(Exception):     # else it expires
            await client.delete(staging)
        raise
    if done == -1:
        raise SnapshotAhead(f"a snapshot at seq {seq} is ahead of the journal")
    if done == -2:
        raise SnapshotPartsLost(f"parts of the snapshot at seq {seq} were lost before it "
                                "was published")
    if done == -3:
        raise JournalDiverged(f"the journal no longer holds entry {row_id.decode()} as the "
                              f"snapshot at seq {seq} applied it")
    return snapshot.digest(encoded) if done else None


async def stored_seq(client: aioredis.Redis, keys: Keys) -> int:
    """The sequence number the stored snapshot covers; 0 without one (also when only
    `snapshot-seq` is left, the snapshot deleted by hand or evicted), as the publishing
    script counts it."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.exists(keys.snapshot)
        pipe.get(keys.snapshot_seq)
        exists, value = await pipe.execute()
    try:
        return int(value) if exists and value else 0
    except ValueError:
        return 0


async def adopt(client: aioredis.Redis, keys: Keys, seq: int) -> None:
    """Record `seq` as the stored snapshot's if nothing is recorded: a snapshot written
    before `snapshot-seq` existed would otherwise count as none (and
    `matcher_snapshot_seq` read 0) until the next one."""
    if seq:
        await client.set(keys.snapshot_seq, seq, nx=True)


#: Journal time between two passes of fill retention, at most (service/retention.py).
RETAIN_EVERY_S = 600


class Snapshotter:
    """Follows the journal with its own engine; stores a snapshot every `every` commands.

    It reads the journal every `poll_s` rather than blocking on each write: a snapshot
    a fraction of a second older costs nothing, and a read per journal write (a thousand
    a second under load) would cost Redis and this process CPU the gateway needs.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, every: int,
                 *, poll_s: float = 0.2, archive_root: str | Path | None = None,
                 fill_retention_s: float = 0.0) -> None:
        self.client = client
        self.keys = keys
        self.every = every
        self.poll_s = poll_s
        self.archive_root = archive_root        # None: the journal is never trimmed
        self.archive: JournalArchive | None = None
        self.archive_failures = 0
        self.fill_retention_ns = int(fill_retention_s * 1e9)     # 0: fills stay
        self._retained_ts = 0             # the journal's time at the last retention pass
        self.engine = Engine()
        self.stored = 0
        self._last: tuple[bytes, bytes] | None = None   # the last journal entry read

    def _read(self, entry_id: bytes, batch: bytes) -> None:
        self._last = (entry_id, batch)        # hashed only when a snapshot needs it

    @property
    def applied(self) -> Row | None:
        """The last journal entry read into the engine, as `store` checks it."""
        if self._last is None:
            return None
        return self._last[0], hashlib.sha1(self._last[1]).hexdigest()

    async def start(self) -> None:
        if self.archive_root is not None:
            self.archive = await JournalArchive.of(self.archive_root, self.client, self.keys)
        recovered = await recover(self.client, self.keys, on_row=self._read,
                                  archive=self.archive)
        self.engine = recovered.engine
        if self._last is None and self.engine.seq:
            # Nothing replayed: the state is the snapshot's. The entry that ends at its
            # seq is what a later divergence would change.
            self._last = await self._entry_from(b"%d-0" % self.engine.seq)
        self.stored = max(recovered.snapshot_seq, await stored_seq(self.client, self.keys))
        log.info("snapshotter at seq %d (snapshot at %d, %d commands replayed in %.2fs)",
                 self.engine.seq, recovered.snapshot_seq, recovered.replayed,
                 recovered.seconds)

    async def _entry_from(self, entry_id: bytes) -> tuple[bytes, bytes] | None:
        """The journal's first entry at or after `entry_id`: its id and its batch."""
        rows: Any = await self.client.xrange(self.keys.journal, min=entry_id, count=1)
        return (rows[0][0], rows[0][1][b"e"]) if rows else None

    async def _still_held(self, entry_id: bytes, batch: bytes) -> bool:
        """Whether the journal still holds the entry this state applied last: in Redis,
        or, once another snapshotter moved it out (two running at once, as in a
        deploy), in this journal's archive. Without an archive here to look in, an
        entry gone from Redis counts as not held."""
        if await self._entry_from(entry_id) == (entry_id, batch):
            return True
        if self.archive is None:
            return False
        first = await self._entry_from(b"0-0")
        name: Any = await self.client.get(self.keys.journal_id)   # the same journal?
        return (first is not None and stream_seq(first[0]) > stream_seq(entry_id)
                and name is not None and name.decode() == self.archive.journal_id
                and await asyncio.to_thread(self.archive.batch, entry_id) == batch)

    async def step(self) -> bool:
        """Read what the journal gained; store a snapshot if one is due, and trim old
        fills if that is due. True if a snapshot was stored. Raises JournalDiverged when
        the journal no longer holds what was applied."""
        if self._last is not None and not await self._still_held(*self._last):
            raise JournalDiverged(f"the journal no longer holds entry "
                                  f"{self._last[0].decode()} as this snapshotter applied it")
        await catch_up(self.client, self.keys, self.engine, on_row=self._read,
                       chunk=READ_CHUNK, archive=self.archive)
        written = self.engine.seq - self.stored >= self.every and await self._snapshot()
        await self._retain()
        return written

    async def _snapshot(self) -> bool:
        """Store one now, then move the journal it covers to the archive. True if
        stored."""
        digest = await store(self.client, self.keys, self.engine, applied=self.applied)
        # Not written: another writer stored a newer one (the gateway at shutdown).
        self.stored = self.engine.seq if digest else await stored_seq(self.client, self.keys)
        if digest:
            log.info("snapshot written at seq %d, state hash %s", self.engine.seq, digest)
            await self._trim()
            # Automatic collection is off here as in the gateway (`gctune`); between
            # snapshots is this process's quiet moment to reclaim any cycles.
            gctune.full_collect()
        return digest is not None

    async def _trim(self) -> None:
        """Move what the new snapshot covers to the archive, then out of Redis. A failed
        archive write (a full disk) trims nothing: the journal stays whole in Redis, and
        the next snapshot tries again."""
        if self.archive is None:
            return
        try:
            await archive_and_trim(self.client, self.keys, self.archive, self.engine.seq)
        except ArchiveWriteFailed as exc:
            self.archive_failures += 1
            log.error("%s; the journal is not trimmed", exc)
            with contextlib.suppress(RedisError, OSError):     # for the gateway's alert
                await self.client.incr(self.keys.archive_failures)

    async def _retain(self) -> None:
        """Trim fills older than the retention window, measured back from the journal's
        own time (the engine has no clock): a quiet night moves nothing out. A pass
        whenever the journal's time moved on by a tenth of the window (at most
        `RETAIN_EVERY_S`): fills stay at most about 1.1 windows, whatever the snapshots."""
        window = self.fill_retention_ns
        if not window or self.engine.ts - self._retained_ts < min(window // 10,
                                                                  RETAIN_EVERY_S * 10**9):
            return
        ts = self.engine.ts
        done = await trim_fills(self.client, self.keys, since_ts=ts - window)
        self._retained_ts = ts            # after it: a pass cut short is tried again soon
        if done.fills or done.entries:
            log.info("fills before seq %s left Redis: %d from the fill stream, %d from %d "
                     "participants' streams", done.cut, done.fills, done.entries, done.streams)

    async def run(self, alive: Callable[[], bool]) -> None:
        """Start and step until `alive()` is false (the gateway that started it is
        gone), riding out Redis's restarts."""
        started = failing = False
        while alive():
            try:
                if not started:
                    await self.start()
                    started = True
                await self.step()
                if failing:
                    log.info("snapshotter: Redis is back")
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("snapshotter cannot reach Redis (%s: %s); retrying",
                                type(exc).__name__, exc)
                failing = True
                if resp.wrong_node(exc):     # a failover: connect afresh (as the journal)
                    await resp.reconnect_idle(self.client)
            await asyncio.sleep(self.poll_s)


def parent_alive(parent: int) -> Callable[[], bool]:
    """Whether the process that started us still is our parent: a snapshotter must not
    outlive a killed gateway (a restarted one starts its own)."""
    return lambda: os.getppid() == parent


class SnapshotterProcess(Supervised):
    """`matcher snapshotter` beside the gateway (service/children.py).

    A separate process, not a thread: its capture and encoding hold the GIL for
    seconds. The gateway does not depend on it: without snapshots recovery replays more
    of the journal, nothing else changes. So a crash is logged, counted
    (`matcher_snapshot_failures_total`) and followed by a restart. A snapshot it is
    storing when stopped is atomic: it lands whole or not at all.
    """

    def __init__(self, redis_url: str, keys: Keys, every: int, *, restart_delay: float = 1.0,
                 max_restart_delay: float = 30.0, archive: str | None = None,
                 fill_retention_hours: float = 0.0) -> None:
        argv = [sys.executable, "-m", "service.cli", "snapshotter", "--shard", keys.shard,
                "--every", str(every), "--parent", str(os.getpid())]
        if archive:
            argv += ["--archive", os.path.abspath(archive)]
        if fill_retention_hours:
            argv += ["--fill-retention-hours", repr(fill_retention_hours)]
        super().__init__("the snapshotter", argv,
                         dict(os.environ, MATCHER_REDIS_URL=redis_url),  # not in `ps`
                         restart_delay=restart_delay, max_restart_delay=max_restart_delay,
                         logger=log)
