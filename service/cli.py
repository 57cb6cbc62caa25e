"""The `matcher` command: serve, replay, snapshot, snapshotter, fills, archive, admin."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from matcher import snapshot
from matcher.protocol import MAX_FILLS_PAGE, TradeId
from matcher.types import MAX_SEQ
from service import config as config_module
from service import gctune
from service.archive import JournalArchive, JournalIdMissing
from service.journal import JournalLost, Keys
from service.lease import ShardTaken
from service.recovery import JournalGap, recover
from service.snapshots import JournalDiverged, SnapshotAhead, Snapshotter, parent_alive, store
from service.tasks import keep_cancelling

log = logging.getLogger("matcher.snapshots")
SNAPSHOTTER_NICE = 10
STOP_GRACE_S = 2.0       # a snapshotter told to stop ends by then, whatever it is doing


def _replay(args: argparse.Namespace) -> int:
    async def run() -> int:
        client = aioredis.Redis.from_url(args.redis_url)
        keys = Keys(args.shard)
        try:
            try:
                archive = await JournalArchive.of(args.archive, client, keys, create=False) \
                    if args.archive else None
                got = await recover(client, keys, use_snapshot=not args.full,
                                    archive=archive)
            except (JournalGap, JournalIdMissing) as exc:
                print(exc, file=sys.stderr)
                return 1
            engine = got.engine
            orders = sum(len(book) for book in engine.books.values())
            print(f"seq {engine.seq}  snapshot {got.snapshot_seq}  replayed {got.replayed} "
                  f"commands in {got.seconds:.2f}s")
            print(f"segments {len(engine.segments)}  resting orders {orders}  "
                  f"credit lines {sum(len(lines.items()) for lines in engine.lines.values())}")
            print(f"state hash {snapshot.state_hash(engine)}")
            if args.write_snapshot:
                if engine.seq == 0:
                    print("the journal is empty; no snapshot written", file=sys.stderr)
                    return 1
                try:
                    digest = await store(client, keys, engine)
                except SnapshotAhead as exc:     # the journal was cut while we read it
                    print(f"{exc}; snapshot not written", file=sys.stderr)
                    return 1
                if digest is None:
                    print("the stored snapshot is as new or newer; snapshot not written",
                          file=sys.stderr)
                    return 1
                print(f"snapshot written at seq {engine.seq}")
            return 0
        finally:
            await client.aclose()
    return asyncio.run(run())


def _fills(args: argparse.Namespace) -> int:
    """A participant's loans, as its `fills` requests would read them: for an operator
    answering "I never got that fill"."""
    from service import resp
    from service.history import FillHistory
    from service.platform import describe

    async def run() -> int:
        client = aioredis.Redis.from_url(args.redis_url)
        history = FillHistory(resp.Connection.like(client), Keys(args.shard))
        try:
            after, shown = args.after, 0
            while True:
                page = await history.page(args.participant, after, min(args.limit - shown,
                                                                        MAX_FILLS_PAGE))
                for trade in page.trades:
                    print(describe(trade))
                shown += len(page.trades)
                if after is None or not page.more or shown >= args.limit:
                    break
                after = page.next
            if shown == 0:
                print(f"no fills of participant {args.participant}"
                      + (f" after {args.after}" if args.after else ""), file=sys.stderr)
            return 0
        finally:
            history.close()
            await client.aclose()
    return asyncio.run(run())


def _add_segment(args: argparse.Namespace) -> dict[str, object]:
    if args.core is None or args.tenor_days is None:
        raise ValueError("add-segment takes SEGMENT --core CORE --tenor-days N "
                         "[--rate-cap-bps N]")
    message: dict[str, object] = {"type": "add_segment", "segment": args.target,
                                  "core": args.core, "tenor_days": args.tenor_days}
    if args.rate_cap_bps is not None:
        message["rate_cap_bps"] = args.rate_cap_bps
    return message


def _participant(args: argparse.Namespace) -> int:
    try:
        return int(args.target)
    except ValueError:
        raise ValueError(f"{args.action} takes a participant id, not {args.target!r}") \
            from None


#: What `matcher admin` sends for each action, from its arguments (ValueError: they are
#: not what the action takes). The gateway checks the rest, as for any client.
ADMIN_ACTIONS: dict[str, Callable[[argparse.Namespace], dict[str, object]]] = {
    "halt": lambda args: {"type": "halt", "segment": args.target},
    "reopen": lambda args: {"type": "reopen", "segment": args.target},
    "suspend": lambda args: {"type": "suspend", "participant": _participant(args)},
    "reinstate": lambda args: {"type": "reinstate", "participant": _participant(args)},
    "status": lambda args: {"type": "status", "participant": _participant(args)},
    "add-segment": _add_segment,
    # Its name makes it safe to send again: the same name is answered as a repeat.
    "end-of-day": lambda args: {"type": "end_of_day", "client_id": args.target},
}


def _admin(args: argparse.Namespace) -> int:
    """One admin action over the WebSocket API, its answer printed as JSON: what the
    runbook asks an operator to do at 9:00, without composing messages by hand. The key
    comes from MATCHER_ADMIN_KEY (or --key, which `ps` shows to everyone)."""
    import json

    import aiohttp

    from service.gateway import CLOSE_UNAUTHORIZED

    key = args.key or os.environ.get("MATCHER_ADMIN_KEY")
    if not key:
        print("matcher admin: set MATCHER_ADMIN_KEY (or --key)", file=sys.stderr)
        return 2
    if args.target is None:
        print(f"matcher admin: {args.action} takes a target", file=sys.stderr)
        return 2
    try:
        message = ADMIN_ACTIONS[args.action](args)
    except ValueError as exc:
        print(f"matcher admin: {exc}", file=sys.stderr)
        return 2
    answers = {"accepted", "rejected", "error", "status"}

    async def run() -> int:
        # One deadline for all of it, the connection and its upgrade too: a port that
        # takes the connection and never answers held it for aiohttp's five minutes.
        async with asyncio.timeout(args.timeout), aiohttp.ClientSession() as session, \
                session.ws_connect(args.url, headers={"Authorization": f"Bearer {key}"},
                                   timeout=aiohttp.ClientWSTimeout(ws_close=1.0)) as ws:
            welcome = await ws.receive()
            if welcome.type != aiohttp.WSMsgType.TEXT:
                # 4401: the key is wrong; any other close (1001, the gateway stopping;
                # 4429, the admin's connections all taken) says nothing of the key.
                wrong_key = ws.close_code == CLOSE_UNAUTHORIZED
                print(f"matcher admin: {'not signed in' if wrong_key else 'closed'} "
                      f"(close code {ws.close_code})", file=sys.stderr)
                return 2 if wrong_key else 3
            if json.loads(welcome.data).get("role") != "admin":
                print("matcher admin: the key is not an admin's", file=sys.stderr)
                return 2
            await ws.send_str(json.dumps(message))
            while True:                 # book updates and the like are not answers
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:      # the gateway stopping, say
                    print("matcher admin: the connection closed before an answer "
                          f"(close code {ws.close_code})", file=sys.stderr)
                    return 3
                answer = json.loads(msg.data)
                if answer.get("type") in answers:
                    print(json.dumps(answer))
                    return 1 if answer["type"] in ("rejected", "error") else 0

    try:
        return asyncio.run(run())
    except TimeoutError:
        print(f"matcher admin: no answer from {args.url} within {args.timeout:g} s",
              file=sys.stderr)
    except (aiohttp.ClientError, OSError) as exc:     # down, a wrong path, stopping (503)
        print(f"matcher admin: cannot reach {args.url}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
    return 3


def _demo_market(args: argparse.Namespace) -> int:
    import uvloop

    from service import demo_market
    return uvloop.run(demo_market.run(args.url, demo_market.keys_from_env(), args.rate,
                                      repay_after_s=args.repay_after, parent=args.parent))


def _archive(args: argparse.Namespace) -> int:
    """Whether the journal's archive and Redis hold every command: before relying on an
    archive (a restored backup, a moved directory)."""
    from service.archive import check

    async def run() -> int:
        client = aioredis.Redis.from_url(args.redis_url)
        try:
            archive = await JournalArchive.of(args.archive, client, Keys(args.shard),
                                              create=False)
            got = await check(client, Keys(args.shard), archive)
        except JournalIdMissing as exc:
            print(exc, file=sys.stderr)
            return 1
        finally:
            await client.aclose()
        print(f"archive {archive.directory}: {got.files} files, commands "
              f"{_range(got.archived)}; Redis's journal: commands {_range(got.in_redis)}")
        for first, last in got.missing:
            print(f"missing: commands {first} to {last}", file=sys.stderr)
        if got.complete:
            print("complete: every command from 1 on is in one or the other")
        return 0 if got.complete else 1
    return asyncio.run(run())


def _range(span: tuple[int, int] | None) -> str:
    return f"{span[0]} to {span[1]}" if span else "none"


def _trade_id(text: str) -> str:
    try:
        return msgspec.convert(text, TradeId)
    except msgspec.ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a trade id (\"<seq>-<n>\")") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seq(text: str) -> int:
    value = _positive(text)
    if value > MAX_SEQ:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEQ}, not {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = _not_negative(text)
    if value == 0:                    # a read loop with no pause
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _not_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):       # also NaN
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, not {text}")
    return value


def _snapshotter(args: argparse.Namespace) -> int:
    # Below the gateway whatever its policy: it follows every command and encodes for
    # seconds at each snapshot, and must never take a core from the commands (started by
    # `serve`, it also gets the normal policy: SCHED_RESET_ON_FORK).
    os.nice(SNAPSHOTTER_NICE)
    gctune.tune()             # as the gateway; it collects after each snapshot
    if args.parent:
        # The gateway ends it with SIGTERM; a Ctrl-C at the terminal reaches the whole
        # process group and is the gateway's to handle. And it ends with its gateway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        die_with_parent()
    if not args.redis_url:
        print("snapshotter: give --redis-url or MATCHER_REDIS_URL", file=sys.stderr)
        return 2

    async def run() -> int:
        # SIGTERM (the gateway stopping it, or its death) ends the work in hand the way
        # an exception would: a move to the archive releases its lock and removes its
        # unfinished file, rather than leaving them to time out.
        main = asyncio.current_task()
        assert main is not None
        loop = asyncio.get_running_loop()

        def stop(signum: int, frame: object) -> None:
            # A plain handler runs even while the loop is held by seconds of capture
            # or encoding (where no lock is held): the task is cancelled when the loop
            # runs again, and if that takes longer than a moment the process ends
            # anyway, as a dead gateway's snapshotter must.
            # Again until it takes: redis-py can swallow a cancellation (service/tasks.py).
            loop.call_soon_threadsafe(keep_cancelling, main)
            deadline = threading.Timer(STOP_GRACE_S, os._exit, (0,))
            deadline.daemon = True
            deadline.start()
        signal.signal(signal.SIGTERM, stop)
        client = aioredis.Redis.from_url(args.redis_url, socket_timeout=30)
        follower = Snapshotter(client, Keys(args.shard), args.every, poll_s=args.poll,
                               archive_root=args.archive,
                               fill_retention_s=args.fill_retention_hours * 3600)
        try:
            await follower.run(parent_alive(args.parent) if args.parent else lambda: True)
            log.info("snapshotter: the gateway is gone; exiting")
            return 0
        except JournalDiverged as exc:
            log.error("snapshotter: %s; exiting, to be started afresh", exc)
            return 3
        except asyncio.CancelledError:
            log.info("snapshotter: stopped (SIGTERM)")
            return 0
        finally:
            await client.aclose()
    return asyncio.run(run())


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent ends (`prctl(PR_SET_PDEATHSIG)`), so a
    killed gateway's snapshotter ends at once, even while it replays or encodes; the
    parent check between steps covers other systems."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0     # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):       # no libc or no prctl: not Linux
        failed = True
    if failed:
        log.warning("snapshotter: cannot ask to end with the gateway (prctl: %s); it ends "
                    "within a poll of the gateway's end instead",
                    os.strerror(ctypes.get_errno()) or "unavailable")


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from service.app import StartRefused, serve
    try:
        cfg = config_module.load(args.config)
    except (OSError, ValueError) as exc:     # no file, not TOML, a setting refused
        # The setting and its path are the whole story: no traceback to read past.
        print(f"matcher serve: {args.config or 'the demo configuration'}: {exc}",
              file=sys.stderr)
        return 2
    try:
        return uvloop.run(serve(cfg, lost_up_to=args.lost_up_to))
    except StartRefused as exc:
        print(f"matcher serve: {args.config or 'the demo configuration'}: {exc}",
              file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="matcher", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway (the demo marketplace without --config)")
    p.add_argument("--config", help="TOML settings; environment MATCHER_<SECTION>_<KEY> "
                                    "overrides (default: the packaged demo)")
    p.add_argument("--demo", action="store_true", help="serve the demo marketplace (default)")
    p.add_argument("--lost-up-to", type=_seq, default=0, metavar="SEQ",
                   help="Redis lost acknowledged commands up to SEQ (the log's \"SEQ was "
                        "acknowledged\"): number on from SEQ + 1, so that no order id or "
                        "trade id of theirs is given again (docs/operations.md, \"Redis "
                        "lost acknowledged writes\"); nothing once the journal is past it")
    p.set_defaults(run=_serve)
    for name, helptext in (("replay", "rebuild state from the journal and print its hash"),
                           ("snapshot", "rebuild state from the journal and store a snapshot")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--redis-url", required=True)
        p.add_argument("--shard", default="main")
        if name == "replay":
            p.add_argument("--full", action="store_true",
                           help="ignore the snapshot: replay the whole journal")
        p.add_argument("--archive", metavar="DIR",
                       help="the journal's archive (engine.journal_archive), for commands "
                            "trimmed from Redis")
        p.set_defaults(run=_replay, write_snapshot=name == "snapshot",
                       full=getattr(p, "full", False))
    p = fills = sub.add_parser("fills", help="print a funder's or an SME's fills, as `fills` reads "
                                     "them: the newest, or all after a trade id")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--shard", default="main")
    p.add_argument("--participant", type=int, required=True)
    p.add_argument("--after", type=_trade_id, help="a trade id: every fill after it, oldest "
                                                   "first (\"0-0\": all)")
    p.add_argument("--limit", type=_positive, default=None,
                   help=f"at most this many (default: all after --after; without it, the "
                        f"20 newest, at most {MAX_FILLS_PAGE})")
    p.set_defaults(run=_fills)
    p = sub.add_parser("archive", help="check that the journal's archive and Redis hold "
                                        "every command, and print what each holds")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--shard", default="main")
    p.add_argument("--archive", metavar="DIR", required=True,
                   help="the journal's archive (engine.journal_archive)")
    p.set_defaults(run=_archive)
    p = sub.add_parser("admin", help="one admin action over the WebSocket API (key in "
                                      "MATCHER_ADMIN_KEY); prints the answer as JSON, exits "
                                      "1 if it was refused, 2 if not signed in, 3 if the "
                                      "gateway could not be reached or did not answer")
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    p.add_argument("--key", help="the admin's API key (better: MATCHER_ADMIN_KEY)")
    p.add_argument("--timeout", type=_positive_seconds, default=10.0)
    p.add_argument("action", choices=sorted(ADMIN_ACTIONS),
                   help="halt/reopen SEGMENT, suspend/reinstate/status PARTICIPANT, "
                        "add-segment SEGMENT --core CORE --tenor-days N, end-of-day NAME "
                        "(a name for this cut-off, eod-2026-11-23 say: sent again under "
                        "it, nothing more expires)")
    p.add_argument("target", nargs="?", help="a segment id, or a participant id")
    p.add_argument("--core", help="add-segment: its core enterprise (new or known)")
    p.add_argument("--tenor-days", type=int, help="add-segment: the receivables' tenor")
    p.add_argument("--rate-cap-bps", type=int,
                   help="add-segment: the highest rate it takes (default 3600)")
    p.set_defaults(run=_admin)
    p = sub.add_parser("demo-market", help="a market that moves by itself, for the demo "
                                            "(`serve` starts it with [demo] activity; keys "
                                            "in DEMO_MARKET_KEYS)")
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    p.add_argument("--rate", type=_positive_seconds, default=2.0, help="commands a second")
    p.add_argument("--repay-after", type=_positive_seconds, default=60.0,
                   help="seconds from a loan to its repayment")
    p.add_argument("--parent", type=int, default=0,
                   help="exit when this process is no longer our parent")
    p.set_defaults(run=_demo_market)
    p = sub.add_parser("snapshotter", help="follow the journal and store a snapshot every "
                                            "--every commands (`serve` starts one itself)")
    p.add_argument("--redis-url", default=os.environ.get("MATCHER_REDIS_URL"),
                   help="default: MATCHER_REDIS_URL (how `serve` passes it, out of `ps`)")
    p.add_argument("--shard", default="main")
    p.add_argument("--every", type=_positive, default=100_000,
                   help="commands between snapshots (the config's engine.snapshot_every)")
    p.add_argument("--poll", type=_positive_seconds, default=0.2,
                   help="seconds between journal reads")
    p.add_argument("--archive", metavar="DIR",
                   help="after each snapshot, move the journal before it from Redis to "
                        "files here (the config's engine.journal_archive)")
    p.add_argument("--fill-retention-hours", type=_not_negative, default=0.0,
                   help="trim fills older than this from Redis (every tenth of it), "
                        "except those a consumer group has not acknowledged (the config's "
                        "engine.fill_retention_hours; 0: keep all)")
    p.add_argument("--parent", type=int, default=0,
                   help="exit when this process is no longer our parent")
    p.set_defaults(run=_snapshotter)
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        args.full = False
    if args.command == "fills" and args.limit is None:
        args.limit = 20 if args.after is None else sys.maxsize
    if args.command == "fills" and args.after is None and args.limit > MAX_FILLS_PAGE:
        fills.error(f"--limit: the newest {MAX_FILLS_PAGE} at most; page on with --after")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # What an operator can mend gets one line, not a traceback to read to the end of.
    try:
        return int(args.run(args))
    except BrokenPipeError:
        if args.command not in ("fills", "replay", "snapshot", "archive", "admin"):
            raise                   # a service's own pipe: not a reader that has enough
        # `matcher fills ... | head`: the reader has had enough.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except AuthenticationError as exc:      # a ConnectionError to redis-py, but it answered
        print(f"matcher {args.command}: Redis refused the credentials of the URL "
              f"({exc})", file=sys.stderr)
        return 3
    except (RedisConnectionError, RedisTimeoutError) as exc:
        print(f"matcher {args.command}: Redis does not answer ({type(exc).__name__}: "
              f"{exc})", file=sys.stderr)
        return 3
    except (JournalGap, JournalLost, ShardTaken) as exc:    # the runbook's sections name them
        print(f"matcher {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
