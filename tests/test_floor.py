"""The transport floor (`loadtest/floor.py`): the baseline the load test measures the
server against must speak the same protocol to the generator, sign participants in by
their keys, and answer every command, or the baseline would flatter nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loadtest.floor import Floor
from matcher import protocol as wire
from service import config as config_module
from service.localredis import free_port
from tests.conftest import ROOT, SEGMENTS, run, write_config


@asynccontextmanager
async def floor_at(config: Path) -> AsyncIterator[str]:
    port = free_port()
    runner = web.AppRunner(Floor(config_module.load(config)).app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"ws://127.0.0.1:{port}/ws"
    finally:
        await runner.cleanup()


_event = msgspec.json.Decoder(wire.Event).decode


def test_floor_signs_in_by_key_and_accepts_each_command_in_order(tmp_path: Path) -> None:
    config = write_config(tmp_path / "m.toml", "redis://127.0.0.1:1/0", 1)

    async def scenario() -> None:
        async with floor_at(config) as url:
            async with connect(url, additional_headers={"Authorization": "Bearer key-f11"}) \
                    as ws:
                welcome = _event(await ws.recv())
                assert isinstance(welcome, wire.Welcome)
                assert (welcome.participant, welcome.role) == (11, "funder")
                assert welcome.segments == sorted(s for s, _, _ in SEGMENTS)
                for n in range(1, 4):
                    await ws.send(json.dumps({
                        "type": "bid", "client_id": f"b{n}", "segment": "DFM-30D",
                        "rate_bps": 250, "amount": 1_000_000}))
                    ack = _event(await ws.recv())
                    assert isinstance(ack, wire.Accepted)
                    assert (ack.client_id, ack.seq) == (f"b{n}", n)
                await ws.send(json.dumps({"type": "fills", "limit": 5, "ref": "r1"}))
                page = _event(await ws.recv())
                assert isinstance(page, wire.FillPage) and page.ref == "r1"
                assert page.fills == []
                await ws.send(json.dumps({"type": "status"}))
                status = _event(await ws.recv())
                assert isinstance(status, wire.Status) and status.orders == []
                await ws.send(b"{not json")
                error = _event(await ws.recv())
                assert isinstance(error, wire.Error) and error.code == "malformed"
                await ws.send(json.dumps({"type": "subscribe", "segments": ["DFM-30D"]}))
                error = _event(await ws.recv())
                assert isinstance(error, wire.Error) and error.code == "unsupported"
                await ws.send(json.dumps({"type": "ask", "client_id": "a1", "amount": 5,
                                          "segment": "DFM-30D"}))
                ack = _event(await ws.recv())           # the seq goes on from the bids
                assert isinstance(ack, wire.Accepted) and (ack.client_id, ack.seq) == ("a1", 4)
            async with connect(url, additional_headers={"Authorization": "Bearer nobody"}) \
                    as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401

    run(scenario())


def test_load_test_runs_against_the_floor_with_serve(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.cli", "--serve", "--floor", "--profile", "smoke",
         "--funders", "3", "--smes", "2", "--duration", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    recon = results["reconciliation"]
    assert recon["ok"], recon["problems"]
    assert recon["commands_sent"] == recon["acks"] == recon["accepted"] > 300
    assert recon["fills_sme"] == recon["fills_platform"] == 0    # nothing is matched
    assert results["config"]["durability"] == "none (transport floor)"
    assert 0 < results["cpu"]["server"] < 2.5, results["cpu"]   # from the floor's /metrics


def test_floor_is_refused_without_serve(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.cli", "--floor", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--floor: only with --serve" in proc.stderr
