"""Processes the gateway runs beside it, started again whenever they end.

Started with `subprocess.Popen`, which uses vfork: uvloop's own subprocess support
forks, and a fork of the gateway is what ADR 17 removed. Each runs in its own process
group, so a Ctrl-C at the terminal is the gateway's to handle (it then ends them), even
while one is still importing; each is given `--parent` and ends by itself if the
gateway goes without stopping it. The gateway does not depend on them: an exit is
logged, counted and followed by a restart, with a growing delay while it keeps failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time

log = logging.getLogger("matcher.serve")


class Supervised:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], *,
                 restart_delay: float = 1.0, max_restart_delay: float = 30.0,
                 logger: logging.Logger = log) -> None:
        self.name, self.log = name, logger
        self.argv, self.env = argv, env
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.process: subprocess.Popen[bytes] | None = None
        self.exits = 0                  # times it ended, or could not start, while we ran
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(),
                                                            name=self.name)

    async def _supervise(self) -> None:
        delay = self.restart_delay
        while True:
            started = time.monotonic()
            try:
                self.process = subprocess.Popen(self.argv, env=self.env, process_group=0)
                code: int | str = await asyncio.to_thread(self.process.wait)
            except OSError as exc:       # no memory or no pids left: try again later
                code = f"{type(exc).__name__}: {exc}"
            self.exits += 1
            if time.monotonic() - started > 60:      # it had been working: retry soon
                delay = self.restart_delay
            self.log.error("%s ended (%s); starting it again in %.0fs", self.name, code,
                           delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_restart_delay)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not ended within `timeout`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
