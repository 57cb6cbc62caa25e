"""Rebuild the engine from Redis: the newest snapshot, then the journal after it.

Recovery runs `Engine.apply` on every journaled command, the same code that ran live;
a command the engine would now reject means the journal and the code disagree, and
recovery stops rather than serve a different market. Commands moved from Redis to the
journal's archive (`service.archive`) are read from there when Redis's journal starts
after the state recovered so far, which happens only without the snapshot that allowed
the move; without the archive, recovery stops and says which commands it lacks.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from matcher import protocol as wire
from matcher import snapshot
from matcher.engine import Engine
from service.archive import JournalArchive
from service.journal import Keys, journal_start, read_journal


class JournalGap(RuntimeError):
    """The journal goes on after a sequence number the state has not reached."""


@dataclass(frozen=True, slots=True)
class Recovered:
    engine: Engine
    snapshot_seq: int       # 0 without a snapshot
    replayed: int           # commands applied from the journal
    seconds: float


async def recover(client: aioredis.Redis, keys: Keys, names: Callable[[int], str] = str,
                  *, use_snapshot: bool = True,
                  on_row: Callable[[bytes, bytes], None] | None = None,
                  archive: JournalArchive | None = None) -> Recovered:
    """The engine as of the journal's end. `on_row` as for `read_journal`; `archive`
    holds what was trimmed from Redis, if anything was.

    A snapshotter run elsewhere (`start_snapshotter = false`) can store a snapshot and
    trim the journal while this reads it; the commands it trimmed are then behind that
    newer snapshot, so recovery starts again from it (a few times at most)."""
    start = time.perf_counter()
    attempt = 1
    while True:
        data: bytes | None = await client.get(keys.snapshot) if use_snapshot else None  # type: ignore[assignment]
        engine = snapshot.restore(snapshot.load(data), names) if data else Engine(names=names)
        snapshot_seq = engine.seq
        try:
            replayed = await catch_up(client, keys, engine, on_row=on_row, archive=archive)
        except JournalGap:
            stored: Any = await client.get(keys.snapshot_seq) if use_snapshot else None
            if attempt == _ATTEMPTS or int(stored or 0) <= snapshot_seq:
                raise
            attempt += 1
            continue
        return Recovered(engine, snapshot_seq, replayed, time.perf_counter() - start)


_ATTEMPTS = 3
_REDIS, _ARCHIVE = "Redis's journal", "the archive"


async def catch_up(client: aioredis.Redis, keys: Keys, engine: Engine,
                   on_row: Callable[[bytes, bytes], None] | None = None,
                   chunk: int = 200, archive: JournalArchive | None = None) -> int:
    """Apply every journaled command after the engine's sequence number; how many.
    `on_row` and `chunk` (journal entries per read) as for `read_journal`; the archive
    is read only if Redis's journal starts after the engine's next command."""
    replayed = 0
    enabled = gc.isenabled()
    gc.disable()      # millions of small objects and no cycles: collection is pure cost
    try:
        if archive is not None:
            start = await journal_start(client, keys)
            if start is not None and start > engine.seq + 1:
                for entries in archive.read(after=engine.seq):
                    replayed += _apply(engine, entries, _ARCHIVE)
        async with contextlib.aclosing(read_journal(client, keys, after=engine.seq,
                                                    chunk=chunk, on_row=on_row)) as rows:
            async for entries in rows:
                replayed += _apply(engine, entries, _REDIS)
    finally:
        if enabled:
            gc.enable()
    return replayed


def _apply(engine: Engine, entries: list[wire.JournalEntry], source: str) -> int:
    for entry in entries:
        if entry.seq != engine.seq + 1:
            why = ("They were archived and trimmed from Redis once a snapshot covered them; "
                   "recover with that snapshot, or give the archive ([engine] "
                   "journal_archive, --archive)") if source == _REDIS else (
                   "The archive lacks them (a file gone?); `matcher archive` lists what "
                   "it holds")
            raise JournalGap(f"{source} goes on at seq {entry.seq} but the state is at seq "
                             f"{engine.seq}: commands {engine.seq + 1} to {entry.seq - 1} "
                             f"are missing. {why}")
        out = engine.apply(entry, quiet=True)
        if not out.accepted:
            refusal = next((r for _, r in out.replies if isinstance(r, wire.Rejected)), None)
            why = (f"{refusal.code} at {refusal.path}: {refusal.message}"
                   if refusal is not None else "no answer")
            raise RuntimeError(
                f"journal seq {entry.seq} ({entry.command.__struct_config__.tag} of "
                f"participant {entry.participant}) is rejected on replay ({why}): the "
                "journal was written by another engine version, or over another state "
                "(a snapshot of another history)")
    return len(entries)
