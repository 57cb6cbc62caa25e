"""Instructions per command on the gateway's path, counted by valgrind: an A/B that
the machine's neighbours cannot move.

On this shared VM the same benchmark's time varies by half from one run to the next
(docs/speed.md), so a change of a few percent is lost in it. Instructions executed are
the same on every run of the same code, whatever else the host is doing. This runs the
gateway benchmark's path (`tests/bench/test_gateway_bench.py`: the load test's mix
through `Gateway.handle`, stand-ins for Redis and the sockets) under callgrind twice,
once to the end of its setup and once through N commands as well, and prints the
difference per command. Run it in each tree to compare:

    .venv/bin/python tools/instructions.py            # 3,000 commands, about a minute
    .venv/bin/python tools/instructions.py --engine   # the baseline: decode and apply

Instructions are not time (a cache miss costs more than an add), so a change should
also be measured in time when the hour allows; but a change that does less shows here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(path: str, commands: int, run: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.bench.test_gateway_bench import engine_path, gateway_path
    setup, go, _ = (engine_path if path == "engine" else gateway_path)(commands)
    setup()
    if run:
        go()


def _counted(path: str, commands: int, run: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, __file__, "--child", path, str(commands), str(int(run))],
            cwd=ROOT, capture_output=True, text=True, check=True,
            # The same hashes every run: str hashes order sets and dicts' growth, and
            # with them some of the work.
            env=dict(os.environ, PYTHONHASHSEED="0"))
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no count in valgrind's output: {out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=3_000)
    parser.add_argument("--engine", action="store_true",
                        help="the baseline instead: decode and apply to an engine alone")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    path = "engine" if args.engine else "gateway"
    before = _counted(path, args.commands, run=False)
    after = _counted(path, args.commands, run=True)
    print(f"{path}: {(after - before) / args.commands:,.0f} instructions a command "
          f"({args.commands:,} commands of the load test's mix)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
