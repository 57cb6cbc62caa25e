"""The writer lease: at most one gateway writes a shard's journal (ADR 31).

Two gateways on one shard each applied commands to their own engine and journaled them
under sequence numbers the other had used: the second start (even one that then failed
to bind its port) journaled its `resume` and a snapshot, and the first stopped for good
on its next write (found in an audit). Nothing but the operator's care kept them apart.

A key of the shard (`Keys.writer`) names the gateway that writes, with an expiry that
its holder renews. A start waits for a holder that lets it lapse (a gateway killed
without its shutdown) and gives up on one that keeps renewing; the journal's write
script checks the key on every write (fencing), so a gateway whose lease another took
while it stalled cannot write after it. The key only keeps two writers apart; which
commands are durable is still the journal's to say.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger("matcher.lease")

#: Renew one's own lease: "" then. Another's: "FENCED <holder>". One that lapsed (a
#: stall longer than it) is taken again only if the journal still ends at ARGV[3], where
#: this gateway left it: "" then, "LAPSED <where it ends>" if another wrote meanwhile;
#: without ARGV[3] (writes of ours on their way) "-", left for the next write's script,
#: which makes the same check.
_RENEW = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return ''
end
if held then return 'FENCED ' .. held end
if ARGV[3] == '' then return '-' end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local have = last[1] and last[1][1] or '0-0'
if have ~= ARGV[3] then return 'LAPSED ' .. have end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''
"""
#: Take the lease from the holder named, if it still holds it: 1 if taken.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class ShardTaken(RuntimeError):
    """Another gateway writes this shard's journal."""


def _pid_space() -> str:
    """Which pids a pid names here: this boot of this machine, and this process's pid
    namespace. Hostnames repeat (containers on the host's network have the host's,
    cloned machines their template's), and pids repeat across namespaces: a pid
    checked elsewhere said nothing of the holder, and a live gateway's lease was taken
    over at once (found in review)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        space = os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"
    return hashlib.sha256(f"{boot} {space}".encode()).hexdigest()[:12]


def new_token() -> str:
    """`<host>:<pid>:<pid space>:<random>`: who holds a lease, for the log, and for
    taking over at once a lease of a process of this host that is gone; the random
    part tells apart two processes that had the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{_pid_space()}:{secrets.token_hex(4)}"


def holder_gone(holder: str) -> bool:
    """The holder was a process of this machine and pid namespace that no longer runs
    (or had this process's pid in an earlier life: a restarted container's gateway has
    the same one)."""
    parts = holder.split(":")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    host, pid, space = parts[0], int(parts[1]), parts[2]
    if host != socket.gethostname() or space != _pid_space() or space == "unknown":
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:         # alive, another user's
        return False
    return False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Lease:
    """One gateway's hold on its shard."""

    def __init__(self, client: aioredis.Redis, key: str, journal_key: str, token: str, *,
                 ttl_s: float) -> None:
        """`ttl_s` (`[redis] writer_lease_s`): how long it lasts unrenewed: what a start
        waits after a gateway of another host was killed (one of this host that is gone
        is taken over at once), and how long the holder's event loop may stall before
        another start may take the shard. Renewed every fifth of it."""
        self.client, self.key, self.token = client, key, token
        self.journal_key = journal_key
        self.ttl_s = ttl_s
        self.renew_s = ttl_s / 5
        self.ttl_ms = int(ttl_s * 1000)

    async def acquire(self, wait_s: float) -> None:
        """Hold the lease, waiting up to `wait_s` for another's to lapse; `ShardTaken`
        if it does not."""
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            if await self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                return
            raw = await self.client.get(self.key)
            if raw is None:                 # lapsed just now: try again
                continue
            holder = _text(raw)
            if holder_gone(holder):
                if await self.client.eval(_TAKE_OVER, 1, self.key, holder, self.token,
                                          self.ttl_ms):
                    log.info("took over the journal's writer lease from %s, a process of "
                             "this host that is gone", holder)
                    return
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShardTaken(
                    f"another gateway writes this shard's journal (writer lease {self.key} "
                    f"held by {holder}, renewed within the last {self.ttl_ms / 1000:g} s): "
                    "stop it first, or give this one its own [redis] shard")
            if not told:
                log.warning("the journal's writer lease is held by %s; waiting up to %.0f "
                            "s for it to lapse (a gateway killed without its shutdown)",
                            holder, left)
                told = True
            await asyncio.sleep(min(0.5, left))

    async def renew(self, tail: bytes | None) -> str | None:
        """Renew it; None if it is ours (still, or again: it had lapsed, and the journal
        still ends at `tail`, where this gateway left it; no `tail`, writes of ours on
        their way: left lapsed, for the next write to take). Else why not:
        `FENCED <holder>`, or `LAPSED <where the journal ends>`."""
        said = _text(await self.client.eval(_RENEW, 2, self.key, self.journal_key,
                                            self.token, self.ttl_ms, tail or b""))
        return None if said in ("", "-") else said

    async def release(self) -> None:
        """Let it go, if it is still ours: the next start need not wait."""
        await self.client.eval(_RELEASE, 1, self.key, self.token)
