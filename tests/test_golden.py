"""Golden scenarios: commands in, the exact events out, in files any engine could run.

Each file in tests/golden/ is JSON lines: first `{"segments": [...]}`, then one step per
line, `{"from": id, "role": ..., "send": {command}, "expect": [{"to": id, "event": {...}},
...]}`. The command is decoded by the wire decoder (so it is a valid message), stamped
with the step number as its timestamp, and the engine's replies must equal `expect`
exactly. After editing a scenario's commands, `GOLDEN_UPDATE=1 pytest tests/test_golden.py`
rewrites the expectations; read the diff before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from matcher import protocol as wire
from matcher.engine import Engine, Segment

GOLDEN = Path(__file__).with_name("golden")


def play(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    engine = Engine([Segment(**s) for s in lines[0]["segments"]], names=lambda p: f"P{p}")
    out = [lines[0]]
    for ts, step in enumerate(lines[1:], start=1):
        cmd = wire.json_decoder.decode(json.dumps(step["send"]))
        got = engine.submit(step["from"], step["role"], cmd, ts)  # type: ignore[arg-type]
        events = [{"to": to, "event": msgspec.to_builtins(e)} for to, e in got.replies]
        out.append({**step, "expect": events})
    return out


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.jsonl")), ids=lambda p: p.stem)
def test_golden_scenario(path: Path) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    played = play(lines)
    if os.environ.get("GOLDEN_UPDATE") == "1":
        path.write_text("".join(json.dumps(line) + "\n" for line in played))
    for n, (want, got) in enumerate(zip(lines[1:], played[1:], strict=True), start=2):
        assert got["expect"] == want.get("expect"), f"{path.name}:{n}: {want['send']}"


def test_there_are_golden_scenarios() -> None:
    assert len(list(GOLDEN.glob("*.jsonl"))) >= 4
