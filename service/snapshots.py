"""Snapshots, taken by a follower process so that the gateway never pays for one.

The snapshotter (`matcher snapshotter`, started and watched by `matcher serve`) keeps its
own engine: it recovers as the gateway does, then reads the journal as it grows and
applies each command, the same deterministic code, so its state at a sequence number is
the gateway's state at that number. Every `every` commands it encodes that state and
stores it. The gateway's event loop never captures, encodes or forks (ADR 17): the fork
of a 300 MB gateway and its copy-on-write stalled the loop for up to 340 ms a second
(ADR 11, superseded).

Every writer of the snapshot (the snapshotter, the gateway at shutdown, `matcher
snapshot`) stores through one script that keeps the newest: a snapshot replaces the
stored one only if it covers more of the journal, and only if the journal holds all it
covers. Writers need not know of each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from matcher import snapshot
from matcher.engine import Engine
from service import gctune
from service.journal import Keys
from service.recovery import catch_up, recover

log = logging.getLogger("matcher.snapshots")

#: A snapshot goes to Redis in parts of this size, each its own command. Redis writes
#: every command to its append-only file and, with `appendfsync always`, syncs it before
#: it answers the journal writes that came in with it: one SET of several megabytes held
#: them for 80 to 120 ms in the soak; a part holds them for about a millisecond or two.
PART_BYTES = 128 * 1024
PART_PAUSE_S = 0.002        # between parts: room for journal writes on their own
STAGING_TTL_S = 600         # parts of a writer that died go away by themselves

#: Publish the parts staged under KEYS[1] as the snapshot, if it is the newest.
#: KEYS: staging, snapshot, snapshot-seq, journal. ARGV: the sequence number covered,
#: the snapshot's length. 1: stored; 0: the stored one covers as much or more; -1: the
#: journal ends before it; -2: parts are missing. The staging key is gone either way.
_PUBLISH_IF_NEWER = """
local seq = tonumber(ARGV[1])
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return -2
end
local stored = tonumber(redis.call('GET', KEYS[3]) or '0')
if stored >= seq then
  redis.call('DEL', KEYS[1])
  return 0
end
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
if #last == 0 or tonumber(string.match(last[1][1], '^%d+')) < seq then
  redis.call('DEL', KEYS[1])
  return -1
end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('SET', KEYS[3], ARGV[1])
return 1
"""


class SnapshotAhead(RuntimeError):
    """A snapshot covers commands the journal does not hold: storing it would make
    recovery serve commands that were never durable."""


async def store(client: aioredis.Redis, keys: Keys, engine: Engine, *,
                part_bytes: int = PART_BYTES, pause_s: float = PART_PAUSE_S) -> bool:
    """Store the engine's state if it is newer than the stored snapshot; False if not.

    The parts go to a key of this writer's own, which one script then renames over the
    snapshot: readers see the old snapshot or the new one, never a part of it.
    """
    seq = engine.seq
    if await stored_seq(client, keys) >= seq:
        return False
    data = snapshot.dump(snapshot.capture(engine))
    staging = keys.snapshot_staging(uuid.uuid4().hex)
    for offset in range(0, len(data), part_bytes):
        part = data[offset:offset + part_bytes]
        if offset == 0:
            await client.set(staging, part, ex=STAGING_TTL_S)
        else:
            await client.append(staging, part)
        if pause_s:
            await asyncio.sleep(pause_s)
    done = await client.eval(_PUBLISH_IF_NEWER, 4, staging, keys.snapshot,
                             keys.snapshot_seq, keys.journal, seq, len(data))
    if done == -1:
        raise SnapshotAhead(f"a snapshot at seq {seq} is ahead of the journal")
    if done == -2:
        raise RuntimeError(f"parts of the snapshot at seq {seq} were lost before it was "
                           "published (Redis restarted, or they expired)")
    return bool(done)


async def stored_seq(client: aioredis.Redis, keys: Keys) -> int:
    """The sequence number the stored snapshot covers; 0 without one."""
    value = await client.get(keys.snapshot_seq)
    return int(value) if value else 0


class Snapshotter:
    """Follows the journal with its own engine; stores a snapshot every `every` commands.

    It reads the journal every `poll_s` rather than blocking on each write: a snapshot
    a fraction of a second older costs nothing, and a read per journal write (a thousand
    a second under load) would cost Redis and this process CPU the gateway needs.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, every: int,
                 *, poll_s: float = 0.2) -> None:
        self.client = client
        self.keys = keys
        self.every = every
        self.poll_s = poll_s
        self.engine = Engine()
        self.stored = 0

    async def start(self) -> None:
        recovered = await recover(self.client, self.keys)
        self.engine = recovered.engine
        self.stored = max(recovered.snapshot_seq, await stored_seq(self.client, self.keys))
        log.info("snapshotter at seq %d (snapshot at %d, %d commands replayed in %.2fs)",
                 self.engine.seq, recovered.snapshot_seq, recovered.replayed,
                 recovered.seconds)

    async def step(self) -> bool:
        """Read what the journal gained; store a snapshot if one is due. True if stored."""
        await catch_up(self.client, self.keys, self.engine)
        if self.engine.seq - self.stored < self.every:
            return False
        written = await store(self.client, self.keys, self.engine)
        # Not written: another writer stored a newer one (the gateway at shutdown).
        self.stored = self.engine.seq if written else await stored_seq(self.client, self.keys)
        if written:
            log.info("snapshot written at seq %d", self.engine.seq)
            # Automatic collection is off here as in the gateway (`gctune`); between
            # snapshots is this process's quiet moment to reclaim any cycles.
            gctune.full_collect()
        return written

    async def run(self, alive: Callable[[], bool]) -> None:
        """Step until `alive()` is false (the gateway that started it is gone)."""
        failing = False
        while alive():
            try:
                await self.step()
                if failing:
                    log.info("snapshotter: Redis is back")
                failing = False
            except (RedisError, OSError) as exc:   # Redis restarting: try again later
                if not failing:
                    log.warning("snapshotter cannot reach Redis (%s: %s); retrying",
                                type(exc).__name__, exc)
                failing = True
            await asyncio.sleep(self.poll_s)


def parent_alive(parent: int) -> Callable[[], bool]:
    """Whether the process that started us still is our parent: a snapshotter must not
    outlive a killed gateway (a restarted one starts its own)."""
    return lambda: os.getppid() == parent


class SnapshotterProcess:
    """`matcher snapshotter` beside the gateway, started again whenever it ends.

    A separate process, not a thread: its capture and encoding hold the GIL for
    seconds. The gateway does not depend on it: without snapshots recovery replays more
    of the journal, nothing else changes. So a crash is logged, counted
    (`matcher_snapshot_failures_total`) and followed by a restart, with a growing delay
    while it keeps failing.
    """

    def __init__(self, redis_url: str, keys: Keys, every: int, *, restart_delay: float = 1.0,
                 max_restart_delay: float = 30.0) -> None:
        self.argv = [sys.executable, "-m", "service.cli", "snapshotter",
                     "--redis-url", redis_url, "--shard", keys.shard,
                     "--every", str(every), "--parent", str(os.getpid())]
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.process: asyncio.subprocess.Process | None = None
        self.exits = 0                  # times it ended while the gateway ran
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(),
                                                            name="snapshotter")

    async def _supervise(self) -> None:
        delay = self.restart_delay
        while True:
            started = time.monotonic()
            self.process = await asyncio.create_subprocess_exec(*self.argv)
            code = await self.process.wait()
            self.exits += 1
            if time.monotonic() - started > 60:      # it had been working: retry soon
                delay = self.restart_delay
            log.error("the snapshotter exited (status %d); starting it again in %.0fs",
                      code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_restart_delay)

    async def stop(self, timeout: float = 5.0) -> None:
        """End it (a snapshot it is storing is atomic: it lands whole or not at all)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
