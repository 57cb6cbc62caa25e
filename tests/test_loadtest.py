"""The load test's smoke profile against a real server and Redis: the whole chain runs,
reconciles, and writes its report. Timings are not checked here (benchmarks are)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from service.localredis import LocalRedis
from tests.conftest import ROOT, ServerProcess


def test_smoke_profile_reconciles_and_writes_its_report(
        tmp_path: Path, server: ServerProcess, redis_server: LocalRedis) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.cli", "--profile", "smoke", "--url", server.ws_url,
         "--redis-url", redis_server.url, "--config", str(server.config), "--funders", "3",
         "--smes", "2", "--duration", "3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert "verdict" in proc.stdout, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    recon = results["reconciliation"]
    assert recon["ok"], recon["problems"]
    assert recon["commands_sent"] == recon["acks"] > 500
    assert recon["fills_sme"] == recon["fills_platform"] > 0
    assert recon["amount_sme"] == recon["amount_platform"]
    assert results["measures"]["ack"]["count"] > 0
    # the smoke profile's SMEs also ask for their latest loans, 20 times a second
    assert recon["reads_sent"] > 30
    assert recon["reads_answered"] + recon["reads_refused"].get("busy", 0) == \
        recon["reads_sent"]
    assert 0 < results["measures"]["fills_page"]["count"] <= recon["reads_answered"]
    assert "fills requests " in proc.stdout
    # ... and leave and sign in again, 5 times a second, each time with nothing under way
    assert recon["reconnects"] > 5
    assert results["measures"]["sign_in"]["count"] == recon["reconnects"]
    assert re.search(r"^sign_in ", proc.stdout, re.M), proc.stdout
    # ... and 5 of its SMEs follow every segment's book (the smoke test has 2 SMEs)
    assert results["watchers"]["connections"] == 2
    assert results["watchers"]["books"] > 2 * 4, results["watchers"]   # more than the first
    assert re.search(r"^watchers +2 SMEs following every book", proc.stdout, re.M)
    view = results["server_view"]                  # read from the real server's /metrics
    assert view["count"] >= recon["commands_sent"] * 0.9
    assert 0 < view["within_ms"][-1][1] <= 1
    lag = results["server_loop_lag"]               # a probe every 10 ms over the run
    assert lag["count"] >= 100 and 0 < lag["within_ms"][-1][1] <= 1
    journal = results["server_journal"]            # every batch of the run, timed
    assert 0 < journal["count"] <= recon["commands_sent"]
    assert 0 < journal["within_ms"][-1][1] <= 1
    cpu = results["cpu"]                # each process's share of a core over the run
    assert set(cpu) == {"server", "redis", "generator", "snapshotter", "stolen"}, cpu
    assert all(0 < cpu[name] < 2.5 for name in ("server", "redis", "generator")), cpu
    assert 0 <= cpu["snapshotter"] < 1, cpu
    assert 0 <= cpu["stolen"] <= os.cpu_count(), cpu      # the hypervisor's, all CPUs
    # ... and second by second: at most a second of each CPU's time in a second.
    assert all(0 <= row["stolen_ms"] <= 1000 * (os.cpu_count() or 1) + 50
               for row in results["timeline"]), results["timeline"]
    assert "cpu " in proc.stdout
    memory = results["memory"]          # the server's RSS and Redis's, every 5 s
    assert memory["rss_end"] > 0 and memory["redis_end"] > 100_000     # bytes, not MB
    assert memory["redis_peak"] == max(m for _, m in memory["redis_samples"])
    assert re.search(r"^memory .*; Redis .* peak", proc.stdout, re.M), proc.stdout
    for name in ("report.html", "latency.png", "timeline.png"):
        assert (out / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "reconcil" in html.lower()
