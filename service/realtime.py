"""Real-time scheduling (`SCHED_RR`) for the gateway, its local Redis and the load test.

When the gateway, Redis and other busy processes share a few cores, most of the latency
tail is the scheduler, not our code: a process woken by a packet waits for a core while
others finish their time slices (several milliseconds under the default policy). Under
a real-time policy a woken process runs as soon as a core is free of ordinary work.
Round-robin rather than FIFO, so our processes at one priority take turns; the kernel
keeps 5% of every second for ordinary processes (`sched_rt_runtime_us`), so a runaway
one cannot take the machine. See ADR 14 for the measurements.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("matcher.realtime")


def make_realtime(priority: int, pid: int = 0) -> bool:
    """Put every thread of `pid` (0: this process) under `SCHED_RR` at `priority` (1-99).

    Processes and threads it starts later get the normal policy (`SCHED_RESET_ON_FORK`):
    the snapshotter and Redis's rewrite child work for seconds and must not take a core
    from the work they serve.

    Needs CAP_SYS_NICE or an `RLIMIT_RTPRIO` of at least `priority`. When the system
    refuses, logs a warning and returns False: the process runs on, as it would have
    without the setting.
    """
    target = pid or os.getpid()
    if not hasattr(os, "sched_setscheduler"):
        log.warning("real-time scheduling is not available on this system; process %d "
                    "keeps the normal policy", target)
        return False
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{target}/task")]
    except OSError:
        threads = [target]
    try:
        for tid in threads:
            try:
                os.sched_setscheduler(tid, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                                      os.sched_param(priority))
            except ProcessLookupError:       # a thread that ended meanwhile
                continue
    except OSError as exc:    # PermissionError: no CAP_SYS_NICE and no rtprio limit
        log.warning("could not give process %d real-time priority %d (%s); it keeps the "
                    "normal policy. Run as a user with CAP_SYS_NICE or an rtprio limit.",
                    target, priority, exc)
        return False
    return True


def is_realtime(pid: int = 0) -> bool:
    """Whether `pid` (0: this process) runs under `SCHED_RR`."""
    if not hasattr(os, "sched_getscheduler"):
        return False
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK == os.SCHED_RR
