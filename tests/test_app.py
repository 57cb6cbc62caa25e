"""Pieces of `matcher serve` tested in process: the end-of-day schedule and upkeep, settings."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from service.app import last_end_of_day, next_end_of_day
from service.config import load
from service.localredis import LocalRedis

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_end_of_day_is_today_before_the_cut_off_and_tomorrow_after_it() -> None:
    morning = dt.datetime(2026, 11, 23, 9, 0, tzinfo=SHANGHAI)
    assert next_end_of_day(morning, "16:30") == dt.datetime(2026, 11, 23, 16, 30,
                                                           tzinfo=SHANGHAI)
    evening = dt.datetime(2026, 11, 23, 16, 30, tzinfo=SHANGHAI)
    assert next_end_of_day(evening, "16:30") == dt.datetime(2026, 11, 24, 16, 30,
                                                           tzinfo=SHANGHAI)


def test_the_last_cut_off_is_at_or_before_now_and_seconds_may_be_given() -> None:
    at = dt.datetime(2026, 11, 23, 16, 30, tzinfo=SHANGHAI)
    assert last_end_of_day(at, "16:30") == at
    assert last_end_of_day(at - dt.timedelta(seconds=1), "16:30") == at - dt.timedelta(days=1)
    assert last_end_of_day(at, "16:29:59") == at - dt.timedelta(seconds=1)
    assert next_end_of_day(at, "16:30:01") == at + dt.timedelta(seconds=1)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[server]\nport = 8080\n[engine]\nend_of_day = "16:30"\n')
    cfg = load(path, {"MATCHER_SERVER_PORT": "9001", "MATCHER_ENGINE_END_OF_DAY": "17:00"})
    assert (cfg.server.port, cfg.engine.end_of_day) == (9001, "17:00")


def test_a_bad_setting_fails_at_load_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[engine]\nend_of_day = "25:00"\n')
    with pytest.raises(msgspec.ValidationError, match=r"\$\.engine\.end_of_day"):
        load(path, {})


@pytest.mark.parametrize(("environ", "says"), [
    ({"MATCHER_SERVER_PROT": "1"}, r"unknown field `prot` - at `\$\.server` \(set by the "
                                   r"environment variable MATCHER_SERVER_PROT\)"),
    ({"MATCHER_SERVER_PORT": "99999"}, r"<= 65535 - at `\$\.server\.port` \(set by the "
                                       r"environment variable MATCHER_SERVER_PORT\)"),
    # The checks after the types' own (found in review).
    ({"MATCHER_SERVER_TRUSTED_PROXIES": "10.0.0.1,nope"},
     r"`\$\.server\.trusted_proxies\[1\]` \(set by the environment variable "
     r"MATCHER_SERVER_TRUSTED_PROXIES\)"),
    ({"MATCHER_ENGINE_TIMEZONE": "Mars/Base"},
     r"`\$\.engine\.timezone` \(set by the environment variable MATCHER_ENGINE_TIMEZONE\)"),
    ({"MATCHER_ENGINE_TIMEZONE": "America"},            # a directory of zones: OSError
     r"unknown time zone 'America' - at `\$\.engine\.timezone`"),
])
def test_a_setting_the_environment_gave_is_refused_naming_the_variable(
        tmp_path: Path, environ: dict[str, str], says: str) -> None:
    """The operator reads the file and finds nothing wrong there (found in an audit)."""
    path = tmp_path / "m.toml"
    path.write_text("[server]\nport = 8080\n")
    with pytest.raises(msgspec.ValidationError, match=says):
        load(path, environ)
    with pytest.raises(msgspec.ValidationError) as in_file:
        path.write_text("[server]\nport = 99999\n")
        load(path, {})
    assert "environment" not in str(in_file.value)


def test_a_segment_configured_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    segment = '[[segments]]\nid = "B-60D"\ncore = "{}"\ntenor_days = 60\n'
    path.write_text(segment.format("B") + segment.format("C"))
    with pytest.raises(msgspec.ValidationError, match=r"'B-60D' is configured twice - at "
                                                      r"`\$\.segments\[1\]\.id`"):
        load(path, {})


@pytest.mark.parametrize(("text", "says"), [
    ("[server]\nport = 99999\n", "<= 65535 - at `$.server.port`"),
    ("[server\n", "Expected ']'"),
    (None, "No such file"),
    # These ended the start with a traceback (found in an operator's audit).
    ('[redis]\nurl = "http://127.0.0.1:6379"\n', "'http' is not a Redis URL: it starts "
     "with redis://, rediss://, unix:// - at `$.redis.url`"),
    ('[[participants]]\nid = 5\nname = "a"\nrole = "funder"\n',
     "participant 'a' needs exactly one of key, key_sha256 - at `$.participants[0]`"),
    ('[[participants]]\nid = 5\nname = "a"\nrole = "funder"\nkey = "k1"\n'
     '[[participants]]\nid = 5\nname = "b"\nrole = "sme"\nkey = "k2"\n',
     "id 5 is given twice - at `$.participants[1].id`"),
    ('[[participants]]\nid = 5\nname = "a"\nrole = "funder"\nkey = "k"\n'
     '[[participants]]\nid = 6\nname = "b"\nrole = "sme"\nkey = "k"\n',
     "b shares an API key with another - at `$.participants`"),
    ('[[participants]]\nid = 5\nname = "a"\nrole = "funder"\nkey = ""\n',
     "length >= 1 - at `$.participants[0].key`"),
    # TOML has inf: a shutdown that waits for ever never exits while Redis is down.
    ("[server]\nshutdown_timeout = inf\n", "<= 3600.0 - at `$.server.shutdown_timeout`"),
    ("[limits]\nrate = inf\n", "- at `$.limits.rate`"),
    # Refused at the start, before it reads anything (it failed at the first archive).
    ('[engine]\njournal_archive = "/proc/nope/archive"\n',
     "engine.journal_archive: cannot write to '/proc/nope/archive'"),
])
def test_matcher_serve_refuses_a_bad_configuration_in_one_line(
        tmp_path: Path, text: str | None, says: str) -> None:
    """No traceback to read past: the file, the setting and its path, exit status 2."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    path = tmp_path / "m.toml"
    if text is not None:
        path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--config",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"matcher serve: {path}: ") and says in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["serve", "replay", "fills", "archive"])
def test_the_tools_say_in_one_line_that_redis_does_not_answer(
        tmp_path: Path, command: str) -> None:
    """Exit status 3 and one line, not a traceback whose first line warned of Redis's
    persistence settings (found in an operator's audit)."""
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"   # nothing listens there
    config = tmp_path / "m.toml"
    config.write_text(f'[server]\nport = 0\n[redis]\nurl = "{url}"\n')
    argv = {"serve": ["--config", str(config)], "replay": ["--redis-url", url],
            "fills": ["--redis-url", url, "--participant", "21"],
            "archive": ["--redis-url", url, "--archive", str(tmp_path)]}[command]
    done = subprocess.run([sys.executable, "-m", "service.cli", command, *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    said = [line for line in done.stderr.splitlines() if "matcher." not in line]   # logs
    assert said == [said[0]] and said[0].startswith(f"matcher {command}: Redis does not "
                                                    "answer"), done.stderr
    assert "Traceback" not in done.stderr and "persistence" not in done.stderr


def test_the_packaged_demo_loads_with_its_participants() -> None:
    cfg = load(None, {})
    people = cfg.all_participants()
    assert sum(p.role == "funder" for p in people) == 67
    assert sum(p.role == "sme" for p in people) == 6300
    assert all(len(p.key_sha256) == 64 for p in people)


def test_gc_tuning_freezes_startup_and_turns_automatic_collection_off() -> None:
    import gc

    from service import gctune
    try:
        gctune.tune()
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle                                  # only a full collection finds it
        assert gctune.full_collect() >= 1
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_close_day_expires_day_orders_then_rewrites_the_append_only_file(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """The end of day, in process: the cut-off is journaled, then Redis is asked to
    rewrite its append-only file (its own rewrite, at 1 GB for the local one, would
    otherwise fork during trading)."""
    from service.app import Service
    from service.journal import Keys, read_journal
    from tests.conftest import run, write_config

    async def scenario() -> tuple[int, int, str, str]:
        cfg = load(write_config(tmp_path / "m.toml", redis_server.url, 0), {})
        service = Service(cfg)
        await service.start()
        assert service.client is not None and service.gateway is not None
        before = (await service.client.info("persistence"))["aof_rewrites"]
        minimum = (await service.client.config_get("auto-aof-rewrite-min-size"))
        await service.close_day()
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            info = await service.client.info("persistence")
            if info["aof_rewrites"] > before and not info["aof_rewrite_in_progress"]:
                break
            assert asyncio.get_running_loop().time() < deadline, info
            await asyncio.sleep(0.05)
        last = [e async for batch in read_journal(service.client, Keys()) for e in batch][-1]
        await service.stop()
        return before, info["aof_rewrites"], type(last.command).__name__, \
            minimum["auto-aof-rewrite-min-size"]

    before, after, last, minimum = run(scenario())
    assert after == before + 1
    assert last == "EndOfDay"
    assert int(minimum) == 1024**3


# --- real-time scheduling ---------------------------------------------------------------


def _policy(tid: int) -> tuple[int, int, bool]:
    """(policy, priority, reset on fork) of one thread."""
    import os
    raw = os.sched_getscheduler(tid)
    return (raw & ~os.SCHED_RESET_ON_FORK, os.sched_getparam(tid).sched_priority,
            bool(raw & os.SCHED_RESET_ON_FORK))


def _threads(pid: int) -> list[int]:
    return sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())


def _may_use_realtime(priority: int) -> bool:
    """Whether this system lets us give a process SCHED_RR at `priority`: asked of a
    throwaway process, since root in a container may lack CAP_SYS_NICE."""
    import os
    import subprocess
    probe = subprocess.Popen(["sleep", "30"])
    try:
        os.sched_setscheduler(probe.pid, os.SCHED_RR, os.sched_param(priority))
        return True
    except PermissionError:
        return False
    finally:
        probe.kill()
        probe.wait()


def test_make_realtime_covers_every_thread_and_not_what_they_fork(
        caplog: pytest.LogCaptureFixture) -> None:
    """Where the system allows it: SCHED_RR for each thread, reset for children (a
    snapshot writer must not compete at real-time priority). Where it does not: a
    warning, and nothing changes."""
    import os
    import subprocess
    import sys
    import time

    from service.realtime import is_realtime, make_realtime
    # A process with two threads that, when told, starts a child of its own.
    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, threading, time\n"
         "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
         "sys.stdin.readline()\n"
         "print(subprocess.Popen(['sleep', '30']).pid, flush=True)\n"
         "time.sleep(30)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    grandchild = 0
    try:
        deadline = time.monotonic() + 10
        while len(_threads(child.pid)) < 2:
            assert time.monotonic() < deadline, "the child did not start its thread"
            time.sleep(0.01)
        before = [_policy(t) for t in _threads(child.pid)]
        done = make_realtime(3, child.pid)
        after = [_policy(t) for t in _threads(child.pid)]
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("fork\n")
        child.stdin.flush()
        grandchild = int(child.stdout.readline())
        if _may_use_realtime(3):
            assert done and is_realtime(child.pid)
            assert after == [(os.SCHED_RR, 3, True)] * 2
        else:
            assert not done and not is_realtime(child.pid)
            assert after == before
            assert "keeps the normal policy" in caplog.text
        assert _policy(grandchild) == (os.SCHED_OTHER, 0, False)
    finally:
        if grandchild:
            os.kill(grandchild, 9)
        child.kill()
        child.wait()
    assert not is_realtime()                        # this process was never touched


def test_the_realtime_setting_is_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[server]\nrealtime_priority = 100\n")
    with pytest.raises(msgspec.ValidationError, match=r"\$\.server\.realtime_priority"):
        load(path, {})
    assert load(path, {"MATCHER_SERVER_REALTIME_PRIORITY": "10"}).server.realtime_priority == 10


def test_matcher_serve_runs_itself_and_its_redis_under_sched_rr(tmp_path: Path) -> None:
    """`[server] realtime_priority`: the gateway and the local Redis it starts (all of
    Redis's threads) run under SCHED_RR; without the right to, the server still serves."""
    import os

    from service.localredis import free_port
    from service.realtime import is_realtime
    from tests.conftest import ServerProcess, write_config
    port = free_port()
    path = write_config(tmp_path / "m.toml", "unused", port)
    text = path.read_text().replace('url = "unused"', f'data_dir = "{tmp_path / "redis"}"\n'
                                                      "local_port = 0")
    path.write_text(text.replace("[server]\n", "[server]\nrealtime_priority = 4\n", 1))
    server = ServerProcess(path, port, tmp_path / "server.log").start()
    try:
        assert server.process is not None
        pid = server.process.pid
        children = [c for t in _threads(pid)           # listed under the forking thread
                    for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        redis = [int(c) for c in children
                 if b"redis-server" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(redis) == 1
        if _may_use_realtime(4):
            assert _policy(pid) == (os.SCHED_RR, 4, True)
            assert {_policy(t) for t in _threads(redis[0])} == {(os.SCHED_RR, 4, True)}
        else:
            assert not is_realtime(pid) and not is_realtime(redis[0])
            assert "keeps the normal policy" in (tmp_path / "server.log").read_text()
        assert server.get("/health")[0] == 200
    finally:
        assert server.terminate() == 0


def test_the_process_metrics_are_read_off_the_event_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting open files lists /proc/self/fd, one entry per connection: milliseconds
    with thousands connected. The scrape reads the process's figures in a worker thread,
    the gateway's own on the loop, and serves both."""
    import threading

    from prometheus_client import ProcessCollector

    from service.metrics import Metrics

    threads: list[int] = []
    collect = ProcessCollector.collect

    def spy(self: ProcessCollector) -> object:
        threads.append(threading.get_ident())
        return collect(self)

    monkeypatch.setattr(ProcessCollector, "collect", spy)
    metrics = Metrics()
    metrics.fills = 3

    async def scrape() -> tuple[bytes, int]:
        return await metrics.exposition(), threading.get_ident()

    text, loop_thread = asyncio.run(scrape())
    lines = text.decode().splitlines()
    assert "matcher_fills_total 3.0" in lines
    assert any(line.startswith("process_open_fds ") for line in lines)
    assert any(line.startswith("process_resident_memory_bytes ") for line in lines)
    assert threads and loop_thread not in threads


def test_scrapes_closer_than_the_cache_age_share_one_text(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`/metrics` takes no key and each text costs the event loop milliseconds with
    thousands of connections: scrapes within `max_age` of the one before, or while it is
    being made, share it, and a later one reads afresh."""
    from service import metrics as metrics_module
    from service.metrics import Metrics

    now = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    made = []
    expose = Metrics._expose

    async def counted(self: Metrics) -> bytes:
        made.append(now[0])
        return await expose(self)

    monkeypatch.setattr(Metrics, "_expose", counted)
    metrics = Metrics(max_age=1.0)

    def fills(text: bytes) -> str:
        return next(line for line in text.decode().splitlines()
                    if line.startswith("matcher_fills_total"))

    async def scrapes() -> list[str]:
        metrics.fills = 1
        together = await asyncio.gather(*(metrics.exposition() for _ in range(5)))
        metrics.fills = 2
        now[0] += 0.9
        soon = await metrics.exposition()
        now[0] += 0.1
        later = await metrics.exposition()
        return [*map(fills, together), fills(soon), fills(later)]

    assert asyncio.run(scrapes()) == ["matcher_fills_total 1.0"] * 6 + [
        "matcher_fills_total 2.0"]
    assert made == [1000.0, 1001.0]


def test_a_cut_off_that_passes_while_the_gateway_starts_is_issued(
        tmp_path: Path, redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """`_resume` looks for a missed end of day before the start's slow steps; a cut-off
    between that and the timer's first look must not be skipped."""
    import time

    from service.app import Service
    from service.journal import Keys, read_journal
    from tests.conftest import run, write_config

    async def journal(service: Service) -> list[str]:
        assert service.client is not None
        return [type(e.command).__name__
                async for batch in read_journal(service.client, Keys()) for e in batch]

    async def scenario() -> list[str]:
        first = Service(load(write_config(tmp_path / "m.toml", redis_server.url, 0), {}))
        await first.start()
        await first.stop()
        cfg = load(write_config(tmp_path / "m.toml", redis_server.url, 0),
                   {"MATCHER_ENGINE_TIMEZONE": "UTC"})
        opening = Service._open_market

        async def slow_open(self: Service, first_start: bool) -> None:   # a slow flush
            # `_resume` has looked already: the cut-off falls a second later, before
            # the timer starts.
            cut_off = int(time.time()) + 1
            self.config.engine.end_of_day = time.strftime("%H:%M:%S", time.gmtime(cut_off))
            await asyncio.sleep(cut_off + 0.5 - time.time())
            await opening(self, first_start)
        monkeypatch.setattr(Service, "_open_market", slow_open)
        service = Service(cfg)
        try:
            await service.start()
            deadline = time.monotonic() + 5
            while "EndOfDay" not in await journal(service) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return await journal(service)
        finally:
            await service.stop()

    got = run(scenario())
    assert got[-2:] == ["Resume", "EndOfDay"]


def test_a_segment_reconfigured_after_it_opened_is_warned_of_and_stays_as_opened(
        tmp_path: Path, redis_server: LocalRedis, caplog: pytest.LogCaptureFixture) -> None:
    """A segment's terms cannot change once journaled; a configuration that says
    otherwise was started without a word (found in an operator's audit)."""
    import logging

    from service.app import Service
    from tests.conftest import SEGMENTS, run, write_config

    async def start(segments: list[tuple[str, str, int]]) -> tuple[str, int]:
        path = write_config(tmp_path / "m.toml", redis_server.url, 0, segments=segments)
        service = Service(load(path, {}))
        await service.start()
        try:
            assert service.gateway is not None
            opened = service.gateway.engine.segments["DFM-30D"]
            return opened.core, opened.tenor_days
        finally:
            await service.stop()

    caplog.set_level(logging.WARNING, logger="matcher.serve")
    assert run(start(SEGMENTS)) == ("DFM", 30)
    assert "configured as" not in caplog.text
    changed = [("DFM-30D", "ZZZ", 365), *SEGMENTS[1:]]
    assert run(start(changed)) == ("DFM", 30)
    assert ("segment DFM-30D is configured as core ZZZ, 365 days, rate cap 3600 bps but "
            "was opened as core DFM, 30 days, rate cap 3600 bps") in caplog.text


def test_a_stopped_journal_still_lets_clients_connect(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """When the journal stops (Redis lost writes) commands are refused, but clients can
    still connect and read: the gateway is not shutting down."""
    import aiohttp

    from service.app import Service
    from tests.conftest import run, write_config

    async def scenario() -> tuple[str, int]:
        service = Service(load(write_config(tmp_path / "m.toml", redis_server.url, 0), {}))
        await service.start()
        assert service.gateway is not None
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(RuntimeError("journal stopped"))      # as Journal._stop does
        service.gateway._durable([], failed)
        assert not service.gateway.accepting
        try:
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    f"http://127.0.0.1:{service.port}/ws",
                    headers={"Authorization": "Bearer key-f11"}) as ws:
                welcome = (await ws.receive_json())["type"]
                await ws.send_json({"type": "status"})
                return welcome, len((await ws.receive_json())["orders"])
        finally:
            await service.stop()

    assert run(scenario()) == ("welcome", 0)


def test_sleeping_until_the_cut_off_counts_a_change_of_the_utc_offset() -> None:
    """On the day clocks go forward, 01:00 to 16:30 in New York is 14.5 hours, not 15.5."""
    from service.app import seconds_until
    ny = ZoneInfo("America/New_York")
    now = dt.datetime(2026, 3, 8, 1, 0, tzinfo=ny)
    due = next_end_of_day(now, "16:30")
    assert seconds_until(due, now.timestamp()) == 14.5 * 3600


@pytest.mark.parametrize(("toml", "path"), [
    ('[engine]\ntimezone = "Mars/Olympus"\n', r"\$\.engine\.timezone"),
    # Past 9,223,372 resting orders of 10^12 fen a book's sums leave int64 (ADR 4).
    ("[limits]\nresting_orders_per_segment = 9223373\n",
     r"<= 9223372 - at `\$\.limits\.resting_orders_per_segment`"),
    ('[[participants]]\nid = 7\nname = "X"\nrole = "sme"\nkey_sha256 = "secret"\n',
     r"\$\.participants\[0\]\.key_sha256"),
    ('[[participants]]\nid = 7\nname = "X"\nrole = "sme"\nkey_sha256 = "' + "A" * 64 + '"\n',
     r"\$\.participants\[0\]\.key_sha256"),
])
def test_settings_that_could_only_fail_later_fail_at_load(tmp_path: Path, toml: str,
                                                           path: str) -> None:
    """An unknown time zone used to pass the load and stop the start after recovery and
    a snapshot; a key pasted as `key_sha256` loaded and never signed anyone in."""
    file = tmp_path / "m.toml"
    file.write_text(toml)
    with pytest.raises(msgspec.ValidationError, match=path):
        load(file, {})


def test_a_start_that_fails_stops_its_local_redis_and_a_left_one_is_stopped_first(
        tmp_path: Path) -> None:
    """A gateway that cannot start (a fill stream ahead of its journal) stops the
    redis-server it started; one a killed gateway left on the data directory is stopped
    before the next starts there: never two on one append-only file. The local Redis has
    its own process group, so a Ctrl-C reaches only the gateway, which stops it last."""
    import os

    import redis as sync_redis

    from service.app import Service
    from service.journal import JournalLost, Keys
    from service.localredis import LocalRedis, free_port
    from tests.conftest import run

    data = tmp_path / "redis"
    orphan = LocalRedis(data, port=free_port())          # as a killed gateway left it
    orphan.start()
    client = sync_redis.Redis.from_url(orphan.url)
    client.xadd(Keys().fills, {"seq": "5"}, id="5-1")   # trades the journal lacks
    client.close()
    assert orphan.process is not None
    left = orphan.process.pid
    assert os.getpgid(left) != os.getpgid(0)

    async def scenario() -> LocalRedis | None:
        cfg = load(None, {"MATCHER_REDIS_DATA_DIR": str(data), "MATCHER_SERVER_PORT": "0",
                          "MATCHER_REDIS_LOCAL_PORT": str(orphan.port)})
        service = Service(cfg)
        try:
            with pytest.raises(JournalLost):
                await service.start()
        finally:
            await service.stop()
        return service.local_redis

    mine = run(scenario())
    assert orphan.process.poll() is not None             # stopped before ours started
    assert mine is not None and mine.process is None     # and ours after the failure
    assert mine.port == orphan.port      # on the port it held, the one configured
    assert free_port(orphan.port) == orphan.port         # its port is free again at once


def test_an_empty_redis_url_is_refused_at_load() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.redis\.url"):
        load(None, {"MATCHER_REDIS_URL": ""})


@pytest.mark.parametrize("name", ["MATCHER_SERVR_PORT", "MATCHER_SEGMENTS"])
def test_an_environment_variable_that_sets_nothing_is_refused(name: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=name):
        load(None, {name: "9000"})


def test_matcher_admins_key_in_the_environment_does_not_stop_the_server() -> None:
    """`matcher admin` reads MATCHER_ADMIN_KEY: exported for it, the server refused to
    start from the same shell ("not a setting")."""
    assert load(None, {"MATCHER_ADMIN_KEY": "key-admin"}).server.port == load(None, {}).server.port


def test_the_snapshotters_poll_must_be_positive() -> None:
    from service.cli import main
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit) as exit_:
            main(["snapshotter", "--redis-url", "redis://127.0.0.1:1/0", "--poll", bad])
        assert exit_.value.code == 2


def test_a_local_redis_without_durability_keeps_its_data_across_a_planned_restart(
        tmp_path: Path) -> None:
    import redis as sync_redis

    from service.localredis import LocalRedis
    server = LocalRedis(tmp_path / "r", durability="no")
    for _ in range(2):
        server.start()
        client = sync_redis.Redis.from_url(server.url)
        client.incr("restarts")
        client.close()
        server.stop()
    server.start()
    client = sync_redis.Redis.from_url(server.url)
    try:
        assert client.get("restarts") == b"2"
        assert client.config_get("appendonly")["appendonly"] == "no"
    finally:
        client.close()
        server.stop()


def test_the_demo_banner_prints_the_configured_plain_keys(
        capsys: pytest.CaptureFixture[str]) -> None:
    """README: `./dev serve` prints the demo's keys, `demo-admin` and `demo-platform`
    too; they are `[[participants]]` of the packaged demo, which the banner only named as
    "any keys of [[participants]] in the configuration" (found trying the README on a
    fresh machine). A key given as its digest is never printed."""
    from types import SimpleNamespace

    from service.app import print_demo_keys

    config = load(None, {})
    assert {p.key for p in config.participants} >= {"demo-admin", "demo-platform"}
    print_demo_keys(config, SimpleNamespace(port=8080,  # type: ignore[arg-type]
                                            redis_url="redis://127.0.0.1:6379/0"))
    out = capsys.readouterr().out
    for p in config.participants:
        assert f"{p.role:<8} {p.key}   ({p.name}, id {p.id})" in out, out
    assert "demo-funder-1 .. demo-funder-67" in out


def test_the_gateways_expect_handler_leaves_other_aiohttp_apps_as_they_were(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """`Service._app` replaces aiohttp's default expect handler (a refusal it raised
    made a reference cycle per request); an aiohttp app beside it in the process keeps
    aiohttp's own answer, and both still send 100 Continue."""
    from aiohttp import web

    from service.app import Service
    from tests.conftest import run, write_config
    from tests.test_inbox import serve

    async def ask(port: int, path: str, expect: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nExpect: {expect}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
        return answer

    async def other(request: web.Request) -> web.Response:
        return web.Response(text="other")

    async def scenario() -> list[bytes]:
        service = Service(load(write_config(tmp_path / "m.toml", redis_server.url, 0), {}))
        await service.start()
        try:
            assert service.port is not None
            async with serve(other) as url:           # a plain aiohttp app, at /ws
                port = int(url.rsplit(":", 1)[1].split("/")[0])
                return [await ask(p, path, e)
                        for p, path in ((service.port, "/health"), (port, "/ws"))
                        for e in ("foo", "100-continue")]
        finally:
            await service.stop()

    ours_refused, ours_continued, other_refused, other_continued = run(scenario())
    assert ours_refused.startswith(b"HTTP/1.1 417") and b'"expectation_failed"' in ours_refused
    assert other_refused.startswith(b"HTTP/1.1 417") and b"Unknown Expect: foo" in other_refused
    assert ours_continued.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    assert other_continued.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
