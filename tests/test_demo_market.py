"""The demo's market that moves by itself: its script alone, then beside a real server
(started by `matcher serve` with `[demo] activity`), with real WebSocket clients."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.asyncio.client import connect

from service.demo_market import PAUSE_S, Market, Script
from service.localredis import LocalRedis, free_port
from tests.conftest import SEGMENTS, ServerProcess, run, write_config
from tests.test_service import ADMIN, Client, sessions

MARKETS = [Market("DFM-30D", "DFM", 30, 3600), Market("DFM-180D", "DFM", 180, 3600),
           Market("CRRC-90D", "CRRC", 90, 260)]


def script(**kw: float) -> Script:
    return Script(MARKETS, [1001, 1002], [100001, 100002, 100003], prefix="live7",
                  seed=7, **kw)


def _accepted(s: Script, now: float, n: int = 400) -> list[tuple[int, dict[str, Any]]]:
    """`n` draws at `now`, each command accepted at once, as a gateway would answer."""
    sent = []
    for _ in range(n):
        drawn = s.next(now)
        if drawn is not None:
            s.answered(drawn[1]["client_id"], None, now)
            sent.append(drawn)
    return sent


def _segment(s: Script, segment_of: dict[str, str], message: dict[str, Any]) -> str:
    return message.get("segment") or segment_of[message["client_id"]]


def _next_for(s: Script, who: int, segment: str, now: float = 500.0) -> dict[str, Any]:
    """The script's next bid or amend for this funder and segment (unanswered)."""
    for _ in range(10_000):
        drawn = s.next(now)
        if drawn is not None and drawn[0] == who and drawn[1]["type"] in ("bid", "amend") \
                and (drawn[1].get("segment") == segment
                     or s.live.get((who, segment)) == drawn[1]["client_id"]):
            return drawn[1]
    raise AssertionError(f"nothing for {who} in {segment}")


def test_a_funder_amends_its_resting_bid_and_bids_again_once_it_ended() -> None:
    s = script()
    sent = _accepted(s, 0.0)
    assert len(sent) == 400                      # nothing paused, nothing waiting
    bids = [(who, m) for who, m in sent if m["type"] == "bid"]
    amends = [(who, m) for who, m in sent if m["type"] == "amend"]
    asks = [(who, m) for who, m in sent if m["type"] == "ask"]
    # Without ends, one bid per funder and segment, then amends of it.
    assert len(bids) == len({(who, m["segment"]) for who, m in bids}) == 6
    owner = {m["client_id"]: who for who, m in bids}
    assert amends and all(owner[m["client_id"]] == who for who, m in amends)
    assert 0.5 < len(bids + amends) / len(sent) < 0.8 and asks
    ids = [m["client_id"] for _, m in bids + asks]
    assert len(set(ids)) == len(ids) and all(i.startswith("live7-") for i in ids)
    caps = {m.id: m.rate_cap_bps for m in MARKETS}
    segment_of = {m["client_id"]: m["segment"] for _, m in bids}
    for _, m in bids + amends + asks:            # within each segment's cap
        assert 0 <= m.get("rate_bps", m.get("max_rate_bps")) <= caps[_segment(s, segment_of, m)]
    assert all(m["tif"] == "ioc" and 100_000_00 <= m["amount"] <= 20_000_000_00
               for _, m in asks)
    # A bid that ended is bid afresh; one that was refused too.
    who, first = bids[0]
    s.done(first["client_id"])
    s.done("someone-elses")                      # not one of its bids: nothing happens
    again = _next_for(s, who, first["segment"])
    assert again["type"] == "bid" and again["client_id"] != first["client_id"]
    s.answered(again["client_id"], "unavailable", 500.0)
    assert _next_for(s, who, first["segment"])["type"] == "bid"


def test_a_bid_is_amended_only_once_answered() -> None:
    """An amend reuses its bid's client id: sent before the bid's answer, the bid's
    refusal was taken for the amend's and the refused bid kept being amended (found in
    review). Until its answer, nothing more is sent for that funder and segment."""
    s = script()
    bid = _next_for(s, 1001, "DFM-30D")
    assert bid["type"] == "bid"
    drawn = _draws(s, 500.0)
    assert not [m for who, m in drawn if m["client_id"] == bid["client_id"]]
    s.answered(bid["client_id"], "unavailable", 500.0)
    assert _next_for(s, 1001, "DFM-30D")["type"] == "bid"


def test_a_refusal_for_flow_control_leaves_the_bid_and_a_halt_pauses_its_segment() -> None:
    """`unavailable` says nothing of the bid: it still rests, and is amended, not bid
    again beside it (found in review). A halted segment and a suspended participant are
    left alone for a while rather than refused again and again."""
    s = script()
    bid = _next_for(s, 1001, "DFM-30D")
    s.answered(bid["client_id"], None, 0.0)                      # accepted: resting
    amend = _next_for(s, 1001, "DFM-30D")
    assert amend["type"] == "amend"
    s.answered(amend["client_id"], "unavailable", 0.0)
    assert _next_for(s, 1001, "DFM-30D")["type"] == "amend"
    # An SME's ask in the segment is refused: halted.
    sme, ask = next((who, m) for who, m in _draws(s, 5.0)
                    if m["type"] == "ask" and m["segment"] == "DFM-30D")
    s.answered(ask["client_id"], "segment_halted", 10.0)
    segment_of = {bid["client_id"]: "DFM-30D"}
    during = _accepted(s, 20.0)
    segment_of.update((m["client_id"], m["segment"]) for _, m in during if "segment" in m)
    assert during and all(_segment(s, segment_of, m) != "DFM-30D" for _, m in during)
    after = _accepted(s, 10.0 + PAUSE_S)
    assert any(_segment(s, {**segment_of, **{m["client_id"]: m["segment"] for _, m in after
                                             if "segment" in m}}, m) == "DFM-30D"
               for _, m in after)
    # An SME suspended: it is left alone too.
    s.answered(next(m for who, m in _draws(s, 100.0) if who == sme)["client_id"],
               "suspended", 100.0)
    assert all(who != sme for who, _ in _draws(s, 110.0))
    assert any(who == sme for who, _ in _draws(s, 100.0 + PAUSE_S))


def test_a_funder_without_a_line_is_left_alone_in_that_core_enterprise() -> None:
    """A core enterprise where a demo funder has no line (added after the demo's first
    start, or a line cut to 0): its bids there were refused at every draw (found in
    review). It is left alone there for a while, and bids elsewhere meanwhile."""
    s = script()
    bid = _next_for(s, 1001, "CRRC-90D")
    s.answered(bid["client_id"], "no_credit_line", 0.0)
    during = _accepted(s, 10.0, 2000)
    assert not [m for who, m in during if who == 1001 and m.get("segment") == "CRRC-90D"]
    assert [m for who, m in during if who == 1001 and m.get("segment") == "DFM-30D"]
    assert [m for who, m in during if who == 1002 and m.get("segment") == "CRRC-90D"]
    assert _next_for(s, 1001, "CRRC-90D", now=PAUSE_S)["type"] == "bid"


def test_demo_lines_are_set_for_a_core_enterprise_added_since(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """The demo's lines were set at its first start only: a core enterprise added to the
    configuration later had no demo lines, and every bid there was refused (found in
    review). A start sets them for a core enterprise added since, and for a funder
    added since; a line someone set stays, also one closed (0), and the opening bids are
    not placed again."""
    port = free_port()
    demo = "\n".join(["[demo]", "funders = 2", "smes = 1", "credit_line = 700",
                      "seed_bids = true", ""])
    config = write_config(tmp_path / "matcher.toml", redis_server.url, port, extra=demo)

    async def lines_and_bids(*funders: int) -> dict[int, tuple[dict[str, int], int]]:
        async with sessions(server, ADMIN) as (admin,):
            out = {}
            for funder in funders:
                await admin.send({"type": "status", "participant": funder})
                got = await admin.expect("status")
                out[funder] = ({line["core"]: line["line"] for line in got["lines"]},
                               len(got["orders"]))
            return out

    async def set_line(core: str, amount: int) -> None:
        async with connect(server.ws_url,
                           additional_headers={"Authorization": "Bearer demo-funder-1"}) as ws:
            funder = Client(ws)
            await funder.expect("welcome")
            await funder.ok({"type": "set_credit_line", "core": core, "amount": amount})

    server = ServerProcess(config, port, tmp_path / "server.log").start()
    try:
        first = run(lines_and_bids(1001, 1002))
        run(set_line("DFM", 5))
        run(set_line("SGCC", 0))
    finally:
        assert server.terminate() == 0
    write_config(tmp_path / "matcher.toml", redis_server.url, port,
                 extra=demo.replace("funders = 2", "funders = 3"),
                 segments=[*SEGMENTS, ("CRRC-60D", "CRRC", 60)])
    server = ServerProcess(config, port, tmp_path / "server.log").start()
    try:
        again = run(lines_and_bids(1001, 1002, 1003))
    finally:
        assert server.terminate() == 0
    assert first[1001][0] == first[1002][0] == {"DFM": 700, "SGCC": 700}
    assert again[1001][0] == {"CRRC": 700, "DFM": 5}          # SGCC closed: not listed
    assert again[1002][0] == again[1003][0] == {"CRRC": 700, "DFM": 700, "SGCC": 700}
    assert [again[f][1] for f in (1001, 1002)] == [first[f][1] for f in (1001, 1002)]


def _draws(s: Script, now: float, n: int = 300) -> list[tuple[int, dict[str, Any]]]:
    """What the script sends in `n` draws at `now` (a paused one sends nothing)."""
    return [d for _ in range(n) if (d := s.next(now)) is not None]


def test_the_same_seed_sends_the_same_market() -> None:
    one, two = script(), script()
    assert [one.next(1.0) for _ in range(200)] == [two.next(1.0) for _ in range(200)]


def _line(core: str, used: int, repaid: int) -> dict[str, int | str]:
    return {"core": core, "line": 10**12, "used": used, "repaid": repaid}


def test_every_lenders_lines_are_read_in_turn_and_what_they_lent_is_repaid_when_due() -> None:
    """Repayments go by what the engine says each line has lent and not been repaid, not
    by the loans the market saw: a loan made while it was not running, or one whose
    `repay` was refused, is repaid after the next read."""
    s = Script(MARKETS, [1001], [100001], prefix="live7", seed=7, repay_after_s=60,
               lenders=[1004, 1001, 1002, 1003], sweep_s=10)
    # Spread over the first sweep, from the first call; each once until its answer.
    assert s.reads(100.0) == [1001]
    assert s.reads(102.4) == []
    assert s.reads(105.0) == [1002, 1003]
    s.lines_read(1001, [_line("DFM", 100, 500), _line("CRRC", 0, 7)], 100.0)
    s.unread(1002, 105.0)                      # its read failed: asked at the next sweep
    assert s.reads(109.9) == [1004]
    assert s.reads(110.0) == [1001]
    assert s.reads(114.9) == [] and s.reads(115.0) == [1002]
    assert s.repayments(159.9) == []
    assert s.repayments(160.0) == [
        {"type": "repay", "funder": 1001, "core": "DFM", "repaid_total": 600}]
    # Read again before that repayment: 30 more lent since; and by then a total is
    # never sent twice, nor one already counted.
    s.lines_read(1001, [_line("DFM", 130, 500)], 110.0)
    s.lines_read(1003, [_line("SGCC", 0, 40)], 115.0)
    assert s.repayments(169.9) == []
    assert s.repayments(170.0) == [
        {"type": "repay", "funder": 1001, "core": "DFM", "repaid_total": 630}]
    # That one was refused: the engine still counts 600, and 30 are lent: sent again.
    s.lines_read(1001, [_line("DFM", 30, 600)], 180.0)
    s.lines_read(1002, [_line("DFM", 0, 0)], 180.0)
    assert s.repayments(240.0) == [
        {"type": "repay", "funder": 1001, "core": "DFM", "repaid_total": 630}]
    # Read while that one was on its way: the same total falls due again, but a later
    # read found it counted: not sent (it would have been a `duplicate`).
    s.lines_read(1001, [_line("DFM", 30, 600)], 240.0)
    s.lines_read(1001, [_line("DFM", 0, 630)], 250.0)
    assert s.repayments(1000.0) == []


def test_without_lenders_nothing_is_read() -> None:
    s = script()
    assert s.reads(0.0) == [] and s.repayments(1000.0) == []


def test_a_market_needs_somewhere_to_trade_and_someone_to_trade() -> None:
    with pytest.raises(ValueError):
        Script([], [1], [2], prefix="x")


def _demo_markets_of(parent: int) -> list[Path]:
    """The /proc entries of the demo markets started by `parent`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:                               # it ended meanwhile
            continue
        if b"demo-market" in args and str(parent).encode() in args:
            found.append(proc)
    return found


def test_serve_starts_a_moving_market_that_repays_and_ends_with_the_gateway(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """`[demo] activity`: demo funders bid and re-quote, demo SMEs borrow, the platform
    repays each loan; nothing it sends is wrong; it is started again if it ends, and it
    ends with the gateway."""
    port = free_port()
    config = write_config(tmp_path / "matcher.toml", redis_server.url, port, extra="\n".join([
        "[demo]", "funders = 3", "smes = 4", "credit_line = 10000000000",
        "seed_bids = true", "activity = 40", "repay_after_s = 0.3", ""]))
    server = ServerProcess(config, port, tmp_path / "server.log").start()
    try:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        def lent() -> list[dict[str, str]]:
            return [f for _, f in client.xrange("matcher:{main}:fills")]

        # Until ten loans are made, one of them from a bid of the market's own (the
        # opening bids lend first: they were there before).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
                len(loans := lent()) >= 10
                and any(f["bid_client_id"].startswith("live") for f in loans)):
            time.sleep(0.2)
        time.sleep(1.0)                             # loans of 0.3 s ago are repaid

        async def statuses() -> list[dict[str, object]]:
            async with sessions(server, ADMIN) as (admin,):
                out = []
                for funder in (1001, 1002, 1003):
                    await admin.send({"type": "status", "participant": funder})
                    out.append(await admin.expect("status"))
                return out

        seen = run(statuses())
        status, metrics = server.get("/metrics")
        assert server.process is not None
        first = _demo_markets_of(server.process.pid)
        assert len(first) == 1
        os.kill(int(first[0].name), signal.SIGKILL)     # a crash: it is started again
        deadline = time.monotonic() + 15
        children: list[Path] = []
        while time.monotonic() < deadline and not children:
            time.sleep(0.1)
            children = [c for c in _demo_markets_of(server.process.pid) if c != first[0]]
    finally:
        code = server.terminate()
    fills = client.xrange("matcher:{main}:fills")
    # The demo SMEs borrow, from the market's bids and from the opening ones.
    assert len(fills) >= 10 and {int(f["sme"]) for _, f in fills} <= set(range(100001, 100005))
    assert any(f["bid_client_id"].startswith("live") for _, f in fills)
    repaid = [line["repaid"] for s in seen for line in s["lines"]]     # type: ignore[union-attr]
    assert sum(repaid) > 0
    live = [o for s in seen for o in s["orders"] if o["client_id"].startswith("live")]  # type: ignore[union-attr]
    assert live and all(o["side"] == "bid" for o in live)
    text = metrics.decode()
    assert 'matcher_commands_total{type="repay"}' in text
    # Only an amend racing the fill that ended its bid may be refused (as `not_resting`,
    # the `done` on its way): nothing the market sends is wrong.
    refused = [line for line in text.splitlines()
               if line.startswith("matcher_rejects_total") and not line.endswith(" 0.0")
               and 'code="not_resting"' not in line]
    assert refused == [], refused
    assert status == 200 and len(children) == 1 and code == 0
    for _ in range(50):                              # and it ended with the gateway
        if not children[0].exists():
            break
        time.sleep(0.1)
    assert not children[0].exists()
    log = (tmp_path / "server.log").read_text()
    assert "demo market: 3 funders and 4 SMEs, 40.0 commands a second" in log
    assert "Traceback" not in log, log[-3000:]
    assert "the demo market ended (-9); starting it again in 1s" in log
