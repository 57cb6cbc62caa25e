"""`matcher-loadtest`: run a profile against a running `matcher serve` (or start one).

The participants' keys come from the same configuration the server reads (the demo's
generated funders and SMEs, or `[[participants]]` with plain keys), so nothing is typed
twice. The exit status is 0 only when the run reconciles and the generator kept up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import uvloop

from loadtest import report
from loadtest.driver import Participant, Run
from loadtest.profiles import PROFILES, Profile
from service import config as config_module
from service.localredis import LocalRedis, free_port
from service.realtime import make_realtime


def participants(cfg: config_module.Config, role: str, n: int) -> list[Participant]:
    """Up to `n` participants of `role` with a known plain key."""
    found = []
    for p in cfg.participants + config_module.demo_participants(cfg.demo):
        if p.role == role and p.key is not None:
            found.append(Participant(p.id, p.key))
    if len(found) < n:
        raise SystemExit(f"the configuration has {len(found)} {role}s with plain keys; "
                         f"the profile wants {n} (lower --{role}s)")
    return found[:n]


@contextlib.contextmanager
def local_server(config_path: str | None, out: Path, durability: str,
                 realtime: int = 0, floor: bool = False) -> Iterator[tuple[str, str]]:
    """A redis-server and `matcher serve` of our own, for one-command runs; with `floor`,
    `loadtest.floor` instead of `matcher serve` (the Redis then only serves the
    generator's platform reader, which finds no fills)."""
    data = Path(tempfile.mkdtemp(prefix="loadtest-redis-", dir=out))
    redis = LocalRedis(data, durability=durability)
    redis.start()
    if realtime and redis.process is not None:
        make_realtime(realtime, redis.process.pid)
    port = free_port()
    env = dict(os.environ, MATCHER_REDIS_URL=redis.url, MATCHER_SERVER_PORT=str(port),
               MATCHER_REDIS_DURABILITY=durability, MATCHER_ENGINE_END_OF_DAY="23:59",
               MATCHER_SERVER_REALTIME_PRIORITY=str(realtime),
               MATCHER_SERVER_METRICS_CACHE_MS="0",    # the report reads at its own times
               MATCHER_DEMO_ACTIVITY="0",         # the demo's own market would be load too
               # Every client of the run connects from 127.0.0.1, all at once.
               MATCHER_LIMITS_CONNECT_BURST="1000000",
               # The journal's archive goes with the throwaway Redis whose journal it is.
               MATCHER_ENGINE_JOURNAL_ARCHIVE=str(data / "journal-archive"))
    cmd = [sys.executable, "-m", "service.cli", "serve"]
    if floor:
        cmd = [sys.executable, "-m", "loadtest.floor", "--port", str(port)]
    if config_path:
        cmd += ["--config", config_path]
    log = open(out / "server.log", "ab")   # noqa: SIM115 - closed below
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {out / 'server.log'}")
            time.sleep(0.1)
        yield f"ws://127.0.0.1:{port}/ws", redis.url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        redis.stop()
        shutil.rmtree(data, ignore_errors=True)     # a throwaway Redis: its data goes too


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="matcher-loadtest", description=__doc__)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    ap.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--shard", default="main")
    ap.add_argument("--config", help="the server's TOML (default: the packaged demo)")
    ap.add_argument("--serve", action="store_true",
                    help="start a local Redis and `matcher serve` for this run")
    ap.add_argument("--floor", action="store_true",
                    help="with --serve: serve the transport floor (loadtest/floor.py: "
                         "every command accepted at once, no engine, no journal) instead "
                         "of `matcher serve`, the baseline for the server's figures")
    ap.add_argument("--durability", choices=("always", "everysec", "no"), default="always",
                    help="the local Redis's persistence, with --serve")
    ap.add_argument("--out", default="results")
    ap.add_argument("--rate", type=float, help="commands/s offered")
    ap.add_argument("--reads", type=float,
                    help="SMEs' `fills` requests/s offered besides the commands (each asks "
                         "for its 5 latest loans, as the board does)")
    ap.add_argument("--reconnects", type=float,
                    help="SMEs leaving and signing in again per second (connection churn: "
                         "the server's memory must not grow with it)")
    ap.add_argument("--watchers", type=int,
                    help="SMEs that follow every segment's book, as the quote board does (the "
                         "books' fan-out is the gateway's; an SME that leaves stops following)")
    ap.add_argument("--duration", type=float, dest="duration_s", help="seconds (per step)")
    ap.add_argument("--ramp", type=lambda s: tuple(float(x) for x in s.split(",")),
                    help="offered rates, comma-separated")
    ap.add_argument("--funders", type=int)
    ap.add_argument("--smes", type=int)
    ap.add_argument("--objective-p99-ms", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--realtime", type=int, default=0, metavar="PRIORITY",
                    help="SCHED_RR at this priority (1-99) for the generator and, with "
                         "--serve, the server and its Redis (needs CAP_SYS_NICE)")
    args = ap.parse_args(argv)
    if not 0 <= args.realtime <= 99:
        ap.error("--realtime: must be in [0, 99]")
    if args.watchers is not None and args.watchers < 0:
        ap.error("--watchers: must be 0 or more")
    if args.floor and not args.serve:
        ap.error("--floor: only with --serve")
    if args.floor and args.watchers:
        ap.error("--watchers: the floor sends no books")
    if args.floor:          # the profile's own watchers too: it answers `unsupported`
        args.watchers = 0
    profile: Profile = PROFILES[args.profile].with_(
        rate=args.rate, reads=args.reads, reconnects=args.reconnects, watchers=args.watchers,
        duration_s=args.duration_s, ramp=args.ramp,
        funders=args.funders,
        smes=args.smes, objective_p99_ms=args.objective_p99_ms, seed=args.seed)
    cfg = config_module.load(args.config)
    funders = participants(cfg, "funder", profile.funders)
    smes = participants(cfg, "sme", profile.smes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with contextlib.ExitStack() as stack:
        url, redis_url = args.url, args.redis_url
        if args.serve:
            url, redis_url = stack.enter_context(local_server(
                args.config, out, args.durability, args.realtime, args.floor))
        if args.realtime and not make_realtime(args.realtime):
            args.realtime = 0                  # refused (and logged): say so in the report
        run = Run(profile, url, redis_url, args.shard, funders, smes)
        results = uvloop.run(run.execute())
    results.update(started=started, command=shlex.join(["matcher-loadtest", *sys.argv[1:]]
                                                       if argv is None else argv),
                   machine=machine(),
                   config={**asdict(profile), "url": url,
                           "durability": ("none (transport floor)" if args.floor
                                          else args.durability if args.serve
                                          else "(server's)"),
                           "realtime_priority": args.realtime})
    paths = report.write_all(results, out)
    print(report.summary_table(results))
    print(f"report: {paths.get('html', out)}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
