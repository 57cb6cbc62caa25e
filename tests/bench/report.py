"""Turn a pytest-benchmark JSON file into the README's table.

Each figure is commands per second at the median round; the ratio compares it with the
baseline of its group measured in the same run (`BASELINES`).

    python -m tests.bench.report results/bench.json
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

#: The baseline of each group, measured in the same run.
BASELINES = {
    "book-thin": "test_calls[reference-thin]",
    "book-deep": "test_calls[reference-deep]",
    "journal": "test_journal_throughput[xadd-per-command]",
    "recovery": "test_full_recovery[read-and-decode-only]",
    "gateway": "test_gateway_path[decode-and-engine]",
}


def rows(data: dict) -> list[tuple[str, str, float, float]]:
    rate: dict[str, float] = {}
    for b in data["benchmarks"]:
        rate[b["name"]] = b["extra_info"]["commands"] / b["stats"]["median"]
    out = []
    for b in sorted(data["benchmarks"], key=lambda b: (b["group"] or "", b["name"])):
        group = b["group"] or ""
        base = rate.get(BASELINES.get(group, ""))
        name = b["name"]
        out.append((group, name, rate[name], rate[name] / base if base else float("nan")))
    return out


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    info = data["machine_info"]
    print(f"machine: {info.get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"{info.get('cpu', {}).get('count', '?')} cores, Python {info['python_version']}; "
          f"{data['datetime'][:10]}")
    print("| group | benchmark | commands/s (median) | median s | x baseline |")
    print("|---|---|---:|---:|---:|")
    medians = {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}
    for group, name, per_s, ratio in rows(data):
        print(f"| {group} | {name} | {per_s:,.0f} | {medians[name]:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/bench.json")
