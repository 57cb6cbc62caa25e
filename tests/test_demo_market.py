"""The demo's market that moves by itself: its script alone, then beside a real server
(started by `matcher serve` with `[demo] activity`), with real WebSocket clients."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from service.demo_market import Market, Script
from service.localredis import LocalRedis, free_port
from tests.conftest import ServerProcess, run, write_config
from tests.test_service import ADMIN, sessions

MARKETS = [Market("DFM-30D", "DFM", 30, 3600), Market("DFM-180D", "DFM", 180, 3600),
           Market("CRRC-90D", "CRRC", 90, 260)]


def script(**kw: float) -> Script:
    return Script(MARKETS, [1001, 1002], [100001, 100002, 100003], prefix="live7",
                  seed=7, **kw)


def test_a_funder_amends_its_resting_bid_and_bids_again_once_it_ended() -> None:
    s = script()
    sent = [s.next() for _ in range(400)]
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
    for _, m in bids + amends + asks:            # within each segment's cap and range
        market = next(x for x in MARKETS if x.id == m.get("segment", "")) if "segment" in m \
            else None
        rate = m.get("rate_bps", m.get("max_rate_bps"))
        assert 0 <= rate <= (market.rate_cap_bps if market else 3600)
    assert all(m["tif"] == "ioc" and 100_000_00 <= m["amount"] <= 20_000_000_00
               for _, m in asks)
    # A bid that ended is bid afresh.
    who, first = bids[0]
    s.ended(first["client_id"])
    s.ended("someone-elses")                     # not one of its bids: nothing happens
    again = next(m for w, m in iter(s.next, None)
                 if w == who and m.get("segment") == first["segment"]
                 and m["type"] in ("bid", "amend"))
    assert again["type"] == "bid" and again["client_id"] != first["client_id"]


def test_the_same_seed_sends_the_same_market() -> None:
    one, two = script(), script()
    assert [one.next() for _ in range(200)] == [two.next() for _ in range(200)]


def test_loans_are_repaid_when_due_as_running_totals_from_what_the_engine_counted() -> None:
    s = script(repay_after_s=60)
    s.known_total(1001, "DFM", 500)              # counted before a restart
    s.known_total(1001, "DFM", 300)              # a lower total never goes back
    s.lent(0.0, 1001, "DFM", 100)
    s.lent(1.0, 1002, "CRRC", 40)
    s.lent(2.0, 1001, "DFM", 10)
    assert s.repayments(59.9) == []
    assert s.repayments(61.0) == [
        {"type": "repay", "funder": 1001, "core": "DFM", "repaid_total": 600},
        {"type": "repay", "funder": 1002, "core": "CRRC", "repaid_total": 40}]
    assert s.repayments(62.0) == [
        {"type": "repay", "funder": 1001, "core": "DFM", "repaid_total": 610}]
    assert s.repayments(1000.0) == []


def test_a_market_needs_somewhere_to_trade_and_someone_to_trade() -> None:
    with pytest.raises(ValueError):
        Script([], [1], [2], prefix="x")


def test_serve_starts_a_moving_market_that_repays_and_ends_with_the_gateway(
        tmp_path: Path, redis_server: LocalRedis) -> None:
    """`[demo] activity`: demo funders bid and re-quote, demo SMEs borrow, the platform
    repays each loan; nothing it sends is wrong, and it ends with the gateway."""
    port = free_port()
    config = write_config(tmp_path / "matcher.toml", redis_server.url, port, extra="\n".join([
        "[demo]", "funders = 3", "smes = 4", "credit_line = 10000000000",
        "seed_bids = true", "activity = 40", "repay_after_s = 0.3", ""]))
    server = ServerProcess(config, port, tmp_path / "server.log").start()
    try:
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and client.xlen("matcher:{main}:fills") < 10:
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
        children = [p for p in Path("/proc").glob("[0-9]*")
                    if (p / "cmdline").exists() and b"demo-market" in (p / "cmdline").read_bytes()
                    and f"--parent\0{server.process.pid}".encode()      # type: ignore[union-attr]
                    in (p / "cmdline").read_bytes()]
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
    json.dumps(seen)                                 # plain data all through
