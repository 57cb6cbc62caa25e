"""The measuring tools in tools/ still run against the code they measure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_instruction_count_runs_the_gateway_path_it_counts() -> None:
    """`tools/instructions.py` counts what its child runs under valgrind; the child, run
    here without it, must still set up and run both paths of the gateway benchmark (a
    renamed function would otherwise show only as a failed valgrind run)."""
    for path in ("gateway", "engine"):
        done = subprocess.run([sys.executable, "tools/instructions.py", "--child", path,
                               "200", "1"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
