"""Periodic snapshots in the background: fork, and let the child serialise and write.

Capturing the state takes time proportional to its size (half a second for a busy
morning's retry window), and the event loop must not stop for that. As Redis does for
BGSAVE, the gateway forks: the child is a copy-on-write image of the engine at one
sequence number; it encodes it, waits until the journal holds that sequence number (a
snapshot must never cover a command that is not journaled), writes it and exits. The
gateway only pays for the fork. The snapshot at shutdown is taken in the process, after
the last child has finished, so it is always the newest.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from matcher import snapshot
from matcher.engine import Engine
from service.journal import Keys, stream_seq

log = logging.getLogger("matcher.snapshots")

#: Set the snapshot only while the journal still ends at the entry the state ends at.
#: KEYS: journal, snapshot. ARGV: that entry's id, the snapshot.
_STORE_IF_CURRENT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 1 and last[1][1] == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


async def store_if_current(client: aioredis.Redis, keys: Keys, engine: Engine) -> bool:
    """Store the engine's snapshot if no command was journaled after its state; False
    (nothing written) otherwise.

    For `matcher snapshot`, which may run beside a live gateway: checking the journal
    and then writing would leave a gap in which the gateway can journal more and store
    a newer snapshot, which this one would then replace. One script does both at once.
    """
    data = snapshot.dump(snapshot.capture(engine))
    stored = await client.eval(_STORE_IF_CURRENT, 2, keys.journal,
                               keys.snapshot, f"{engine.seq}-0", data)
    return bool(stored)


class BackgroundSnapshots:
    """At most one snapshot child at a time."""

    def __init__(self, redis_url: str, keys: Keys, timeout: float = 120.0) -> None:
        self.redis_url = redis_url
        self.keys = keys
        self.timeout = timeout
        self.child: int | None = None
        self.written = 0            # snapshots the children reported written
        self.failed = 0             # children that exited without writing theirs
        self.newest_seq = 0         # the sequence number the newest written one covers
        self._child_seq = 0

    def start(self, engine: Engine) -> bool:
        """Fork a child that writes the engine's state as of now; False if one is busy."""
        self.reap()
        if self.child is not None:
            return False
        seq = engine.seq
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:                                  # the child: never returns
            code = 1
            try:
                # Let go of every inherited socket (the listening one above all): a
                # child outliving a killed gateway must not keep its port taken.
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                code = self._write(engine, seq, parent)
            except BaseException as exc:   # report, then exit either way
                log.error("snapshot at seq %d failed: %s", seq, exc)
            finally:
                os._exit(code)
        self.child, self._child_seq = pid, seq
        return True

    def _write(self, engine: Engine, seq: int, parent: int) -> int:
        data = snapshot.dump(snapshot.capture(engine))
        client = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        deadline = time.monotonic() + self.timeout
        while True:
            newest: Any = client.xrevrange(self.keys.journal, count=1)
            last = stream_seq(newest[0][0]) if newest else 0
            if last >= seq:
                break
            if os.getppid() != parent:
                log.error("snapshot at seq %d abandoned: the gateway is gone", seq)
                return 1
            if time.monotonic() > deadline:
                log.error("snapshot at seq %d abandoned: the journal is still at %d",
                          seq, last)
                return 1
            time.sleep(0.005)
        client.set(self.keys.snapshot, data)
        return 0

    def reap(self) -> None:
        """Collect a finished child, without waiting."""
        if self.child is None:
            return
        pid, status = os.waitpid(self.child, os.WNOHANG)
        if pid:
            self._reaped(status)

    def wait(self) -> None:
        """Wait for the child (blocking: call it from a thread)."""
        if self.child is not None:
            _, status = os.waitpid(self.child, 0)
            self._reaped(status)

    def _reaped(self, status: int) -> None:
        self.child = None
        if os.waitstatus_to_exitcode(status) == 0:
            self.written += 1
            self.newest_seq = max(self.newest_seq, self._child_seq)
        else:
            self.failed += 1
            log.error("a snapshot child failed (status %d); the next one will retry", status)
