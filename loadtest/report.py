"""Turn a load test's results dict into a terminal table, PNG plots and one HTML page.

Every output is a pure function of the results dict, so a report can be rebuilt later from
results.json alone. Plots use matplotlib's object-oriented API on an Agg canvas (no pyplot):
no display, no global backend switch, nothing left behind in the process that ran the load.
"""

from __future__ import annotations

import base64
import html as html_lib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

#: The results dict as the driver builds it (and as json.load gives it back).
Results = Mapping[str, Any]

#: Measures in the order people read them: the server's answer, the trade, the platform.
MEASURE_ORDER = ("ack", "ack_handled", "ask_fill", "platform", "fills_page", "sign_in")
#: The processes whose CPU the report shows, in this order.
CPU_ORDER = ("server", "redis", "generator", "snapshotter", "stolen")
#: Stolen CPU (of one core) from which a run's report says the machine was noisy: in the
#: same-day runs of 2026-11-22 with 5% or more stolen the p99 at 5,000/s was 13 to 31 ms,
#: against 5.7 to 10 ms with 1 to 3%.
NOISY_STOLEN = 0.05
#: Table columns: (heading, key in a measure summary).
PERCENTILE_COLUMNS = (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p999"),
                      ("max", "max"))
#: Percentiles that get a labelled tick on the latency plot's x axis.
PERCENTILE_TICKS = (0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999)
#: Above this ratio between the largest and smallest latency plotted, the y axis goes log:
#: a 0.3 ms ack and a 40 ms platform read would otherwise leave the ack flat on the floor.
LOG_Y_SPREAD = 50.0
FIGSIZE = (10.0, 5.6)
DPI = 110
MEASURE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


# ---------------------------------------------------------------------------------------------
# Formatting: one place, so the terminal table and the HTML page show the very same strings.
# ---------------------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """A finite float, or None: the driver may leave a latency empty (no samples that second)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def fmt_ms(value: Any) -> str:
    """Milliseconds to about three significant digits: sub-millisecond acks need decimals,
    a 250 ms tail does not."""
    number = _num(value)
    if number is None:
        return "-"
    size = abs(number)
    if size < 1:
        return f"{number:.3f}"
    if size < 10:
        return f"{number:.2f}"
    if size < 100:
        return f"{number:.1f}"
    return f"{number:.0f}"


def fmt_int(value: Any) -> str:
    """A count with thousands separators, so 300,000 and 30,000 are not confused."""
    number = _num(value)
    return "-" if number is None else f"{round(number):,}"


def fmt_rate(value: Any) -> str:
    """Commands per second, rounded: a rate is never meaningful below one command."""
    number = _num(value)
    return "-" if number is None else f"{number:,.0f}/s"


def fmt_bytes(value: Any) -> str:
    """Bytes as MiB, the unit RSS is usually discussed in."""
    number = _num(value)
    return "-" if number is None else f"{number / 2**20:,.1f} MiB"


def _percent_label(p: float) -> str:
    return f"{p:g}%"


# ---------------------------------------------------------------------------------------------
# The facts a report states, computed once.
# ---------------------------------------------------------------------------------------------

def _measures(results: Results) -> list[tuple[str, Mapping[str, Any]]]:
    """Measures in reading order: the known ones first, then whatever else the driver adds."""
    measures: Mapping[str, Any] = results.get("measures") or {}
    names = [m for m in MEASURE_ORDER if m in measures]
    names += [m for m in measures if m not in MEASURE_ORDER]
    return [(name, measures[name] or {}) for name in names]


def _measure_rows(results: Results) -> list[list[str]]:
    """[name, label, count, p50, p90, p99, p99.9, max] per measure, already formatted."""
    return [[name, str(m.get("label", "")), fmt_int(m.get("count"))]
            + [fmt_ms(m.get(key)) for _, key in PERCENTILE_COLUMNS]
            for name, m in _measures(results)]


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [v for v in (_num(row.get(key)) for row in rows) if v is not None]
    return sum(values) / len(values) if values else None


def throughput(results: Results) -> dict[str, float | None]:
    """Offered, sent and achieved (acked) commands/s over the measured time.

    Achieved means acknowledged by the server: a command the generator sent but the server
    never answered is not throughput. The timeline's seconds also hold the warm-up
    (nothing measured) and a last, partial second of late acks, so the totals are divided
    by the measured time (`measured_s`), not averaged over its rows (which made them 5%
    low for a 60 s run). Reports written before that field: the mean of the rows.
    Without a timeline, acks / duration.
    """
    timeline: Sequence[Mapping[str, Any]] = results.get("timeline") or []
    measured = _num(results.get("measured_s"))
    if timeline and measured:
        def rate(key: str) -> float:
            return sum(_num(row.get(key)) or 0.0 for row in timeline) / measured
        return {"offered": rate("offered"), "sent": rate("sent"), "achieved": rate("acked"),
                "seconds": measured}
    if timeline:
        return {"offered": _mean(timeline, "offered"), "sent": _mean(timeline, "sent"),
                "achieved": _mean(timeline, "acked"), "seconds": float(len(timeline))}
    acks = _num((results.get("reconciliation") or {}).get("acks"))
    duration = _num(results.get("duration_s"))
    achieved = acks / duration if acks is not None and duration else None
    return {"offered": None, "sent": None, "achieved": achieved, "seconds": duration}


def reconciliation_problems(results: Results) -> list[str]:
    """The reconciliation's problems, plus one if it says not ok without saying why,
    so a failure is never reported with an empty list."""
    rec: Mapping[str, Any] = results.get("reconciliation") or {}
    problems = [str(p) for p in rec.get("problems") or []]
    if not rec:
        problems.append("no reconciliation in the results")
    elif not rec.get("ok") and not problems:
        problems.append("reconciliation not ok (no problem given)")
    return problems


def failures(results: Results) -> list[str]:
    """Why the run fails; empty means PASS.

    The run passes only if the driver said ok AND the reconciliation is clean AND the
    generator kept to its schedule: any one of them alone can hide a broken run (a lagging
    generator offers less than it claims, so its latencies flatter the server).
    """
    reasons: list[str] = []
    rec: Mapping[str, Any] = results.get("reconciliation") or {}
    if not rec.get("ok") or rec.get("problems"):
        reasons.append("reconciliation failed")
    lag: Mapping[str, Any] = results.get("lag") or {}
    if lag and not lag.get("ok", True):
        reasons.append(f"generator lag p99 {fmt_ms(lag.get('p99'))} ms over the limit "
                       f"{fmt_ms(lag.get('limit_p99'))} ms")
    if not results.get("ok") and not reasons:
        reasons.append("the driver reported the run as not ok")
    return reasons


def verdict(results: Results) -> str:
    """PASS or FAIL, the single word a reader looks for first."""
    return "FAIL" if failures(results) else "PASS"


# ---------------------------------------------------------------------------------------------
# Terminal table
# ---------------------------------------------------------------------------------------------

def _align(rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """Columns padded to their widest cell; the first `left` columns flush left, numbers right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows]


def _lag_line(results: Results) -> str:
    lag: Mapping[str, Any] = results.get("lag") or {}
    if not lag:
        return "not measured"
    state = "ok" if lag.get("ok", True) else "OVER LIMIT"
    return (f"p50 {fmt_ms(lag.get('p50'))}  p99 {fmt_ms(lag.get('p99'))}  "
            f"max {fmt_ms(lag.get('max'))} ms  (limit p99 {fmt_ms(lag.get('limit_p99'))} ms)"
            f"  {state}")


def _rejected_total(rec: Mapping[str, Any]) -> float:
    rejected: Mapping[str, Any] = rec.get("rejected") or {}
    return sum(_num(v) or 0.0 for v in rejected.values())


def _reconciliation_line(results: Results) -> str:
    rec: Mapping[str, Any] = results.get("reconciliation") or {}
    state = "FAIL" if "reconciliation failed" in failures(results) else "PASS"
    if not rec:
        return state
    rejected: Mapping[str, Any] = rec.get("rejected") or {}
    why = ", ".join(f"{k} {fmt_int(v)}" for k, v in rejected.items())
    return (f"{state}  sent {fmt_int(rec.get('commands_sent'))}  "
            f"acks {fmt_int(rec.get('acks'))}  accepted {fmt_int(rec.get('accepted'))}  "
            f"rejected {fmt_int(_rejected_total(rec))}{f' ({why})' if why else ''}")


def _reads_line(results: Results) -> str | None:
    """The SMEs' `fills` requests: each answered by a page or refused (`busy`: asked again
    before the previous page came)."""
    rec: Mapping[str, Any] = results.get("reconciliation") or {}
    if not rec.get("reads_sent"):
        return None
    refused: Mapping[str, Any] = rec.get("reads_refused") or {}
    why = "".join(f"  {code} {fmt_int(n)}" for code, n in refused.items())
    return (f"fills requests {fmt_int(rec.get('reads_sent'))}  pages "
            f"{fmt_int(rec.get('reads_answered'))}{why}")


def _fills_line(results: Results) -> str | None:
    """Fills and amounts as each side saw them: the three must agree, so they sit together."""
    rec: Mapping[str, Any] = results.get("reconciliation") or {}
    if not rec:
        return None
    sides = ("sme", "funder", "platform")
    return ("fills sme/funder/platform "
            + "/".join(fmt_int(rec.get(f"fills_{side}")) for side in sides)
            + "  amount " + "/".join(fmt_int(rec.get(f"amount_{side}")) for side in sides))


def _throughput_line(results: Results) -> str:
    tp = throughput(results)
    line = f"{fmt_rate(tp['achieved'])} achieved (acked)"
    extra = []
    if tp["offered"] is not None:
        extra.append(f"offered {fmt_rate(tp['offered'])}")
    if tp["sent"] is not None:
        extra.append(f"sent {fmt_rate(tp['sent'])}")
    if tp["seconds"]:
        extra.append(f"mean over {tp['seconds']:g} s")
    return f"{line}  ({', '.join(extra)})" if extra else line


def _capacity_line(results: Results) -> str | None:
    if results.get("ramp") is None and results.get("capacity") is None:
        return None
    objective = fmt_ms(results.get("objective_p99_ms"))
    sustained = _num(results.get("sustained"))
    tail = (f"; sustained up to {fmt_rate(sustained)} offered (it and every lower step "
            "answered within 5% of the rate and ended with under 100 ms of it waiting)"
            if sustained is not None else "")
    if _num(results.get("capacity")) is None:
        return (f"none: no offered rate both kept up and kept ack p99 under {objective} "
                f"ms{tail}")
    return (f"{fmt_rate(results.get('capacity'))} offered (highest rate that kept up with "
            f"ack p99 under {objective} ms){tail}")


def _memory_line(results: Results) -> str | None:
    mem: Mapping[str, Any] | None = results.get("memory")
    if not mem:
        return None
    def change(start: float | None, end: float | None) -> str:
        growth = f"  ({'+' if end - start >= 0 else '-'}{fmt_bytes(abs(end - start))})" \
            if start is not None and end is not None else ""
        return f"{fmt_bytes(start)} -> {fmt_bytes(end)}{growth}"

    parts = []
    if mem.get("rss_end") is not None:
        parts.append("server RSS " + change(_num(mem.get("rss_start")), _num(mem.get("rss_end"))))
    if mem.get("redis_end") is not None:
        parts.append(f"Redis {change(_num(mem.get('redis_start')), _num(mem.get('redis_end')))}"
                     f", peak {fmt_bytes(_num(mem.get('redis_peak')))}")
    return "; ".join(parts) or None


def _facts(results: Results, problems: bool = False) -> list[tuple[str, str]]:
    """(label, text) lines under the latency table, shared by the terminal and the HTML;
    with `problems`, the reconciliation's problems follow it (the HTML lists them apart)."""
    objective = f"ack p99 < {fmt_ms(results.get('objective_p99_ms'))} ms"
    if results.get("ramp") is None:     # one rate: the verdict does not depend on it
        objective += "  (what a ramp's steps are held to; not part of the verdict)"
    facts = [("objective", objective),
             ("throughput", _throughput_line(results)),
             ("generator lag", _lag_line(results)),
             ("reconciliation", _reconciliation_line(results))]
    fills = _fills_line(results)
    if fills is not None:
        facts.append(("", fills))
    reads = _reads_line(results)
    if reads is not None:
        facts.append(("", reads))
    watchers = results.get("watchers") or {}
    if watchers.get("connections"):
        facts.append(("watchers", f"{watchers['connections']} SMEs following every book: "
                                  f"{watchers['books']} book updates received"))
    if problems:
        over_line = (results.get("reconciliation") or {}).get("over_line") or []
        facts += [("", f"  - {p}") for p in reconciliation_problems(results)]
        facts += [("", f"  - over credit line: {item}") for item in over_line]
    capacity = _capacity_line(results)
    if capacity is not None:
        facts.append(("capacity", capacity))
    server = _server_line(results)
    if server is not None:
        facts.append(("server view", server))
    lag = _within_line(results.get("server_loop_lag"))
    if lag is not None:
        facts.append(("server loop", f"timer lag: {lag}  (the event loop's own histogram; "
                                      "a message waits about this long to be read)"))
    journal = _within_line(results.get("server_journal"))
    if journal is not None:
        facts.append(("journal", f"write to Redis's answer: {journal}  (its own histogram; "
                                 "the fsync of `always` is in here)"))
    memory = _memory_line(results)
    if memory is not None:
        facts.append(("memory", memory))
    cpu: Mapping[str, Any] | None = results.get("cpu")
    if cpu:
        shares = "  ".join(f"{name} {100 * float(cpu[name]):.0f}%"
                           for name in CPU_ORDER if name in cpu)
        facts.append(("cpu", f"{shares}  (of one core, from the first command to the last "
                                  "reply and fill read; stolen: the machine's CPUs taken "
                                  "by the hypervisor for other guests)"))
        stolen = float(cpu.get("stolen", 0.0))
        if stolen >= NOISY_STOLEN:
            facts.append(("noise", f"the hypervisor took {100 * stolen:.0f}% of a core from "
                                   "this machine during the run: its latency and capacity "
                                   "measure the neighbours too; compare builds in runs with "
                                   "little stolen, in pairs"))
    redis = _redis_line(results.get("redis_time"))
    if redis is not None:
        facts.append(("redis", redis))
    realtime = (results.get("config") or {}).get("realtime_priority")
    if realtime:
        facts.append(("scheduling", f"SCHED_RR priority {realtime} (generator; with --serve "
                                    "also the server and its Redis)"))
    return facts


def _server_line(results: Results) -> str | None:
    """How much of the latency is the server's: the share it released within 1, 2, 5 and
    10 ms, from its own histogram (warm-up and the market's opening included)."""
    view = results.get("server_view")
    within = _within_line(view)
    if view is None or within is None:
        return None
    return f"receive → reply released: {within}  ({fmt_int(view.get('count'))} " \
           "commands, its own histogram)"


def _redis_line(redis: Mapping[str, Any] | None) -> str | None:
    """Redis's CPU by command, the largest three, and the kernel's part of it."""
    if not redis or not redis.get("commands"):
        return None
    parts = [f"{c['command']} {100 * c['share']:.0f}% ({c['calls']:,} x "
             f"{c['us_per_call']:.0f} us)" for c in redis["commands"][:3]]
    kernel = redis["sys_s"] / redis["cpu_s"] if redis["cpu_s"] else 0.0
    return (f"{', '.join(parts)}; in the kernel {100 * kernel:.0f}%  (of Redis's "
            f"{redis['cpu_s']:.1f} s of CPU; a script's time includes its commands; the "
            "kernel's part is its sockets, its append-only file and its syncs)")


def _within_line(view: dict[str, Any] | None) -> str | None:
    """"x% within 1 ms, ..." for 1, 2, 5 and 10 ms of a server histogram's share."""
    if not view:
        return None
    shares = {round(float(ms), 3): float(share) for ms, share in view.get("within_ms", [])}
    parts = [f"{shares[ms] * 100:.1f}% within {ms:g} ms" for ms in (1.0, 2.0, 5.0, 10.0)
             if ms in shares]
    return ", ".join(parts)


def _title(results: Results) -> str:
    return (f"{results.get('profile', '?')}  started {results.get('started', '?')}  "
            f"duration {_num(results.get('duration_s')) or 0:g} s")


def summary_table(results: Results) -> str:
    """The run on one screen: latencies, throughput, lag, reconciliation, capacity, verdict.

    Plain text with aligned columns so it reads the same in a terminal, a CI log or an
    email; the verdict is the last line, where a tail of the output shows it.
    """
    head = ["latency (ms)", "", "count"] + [h for h, _ in PERCENTILE_COLUMNS]
    rows = _measure_rows(results)
    lines = [_title(results), ""]
    lines += _align([head, *rows], left=2) if rows else ["latency (ms): no measures"]
    lines.append("")
    facts = _facts(results, problems=True)
    width = max(len(label) for label, _ in facts)
    lines += [f"{label.ljust(width)}  {text}" for label, text in facts]
    lines.append("")
    reasons = failures(results)
    lines.append(f"{'verdict'.ljust(width)}  {verdict(results)}"
                 + (f"  ({'; '.join(reasons)})" if reasons else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _new_figure(nrows: int = 1, height: float = FIGSIZE[1]) -> tuple[Figure, list[Axes]]:
    """A figure on its own Agg canvas: rendering never goes through pyplot's global state."""
    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
            fontsize=13, color="grey")


def _percentile_x(p: float) -> float:
    """HdrHistogram's x: 1/(1-p), so each extra nine gets the same width on a log axis."""
    return 1.0 / (1.0 - p / 100.0)


def _log_minor_label(y: float, _pos: int | None) -> str:
    """Label 2 and 5 between the powers of ten: with only 1, 10 and 100 marked, a reader
    cannot tell 1.9 ms from 2.5 ms near the objective."""
    if y <= 0:
        return ""
    lead = round(y / 10 ** math.floor(math.log10(y)), 6)
    return f"{y:g}" if lead in (2.0, 5.0) else ""


def _latency_axis(ax: Axes, values: Sequence[float], label: str = "latency") -> None:
    """Linear from zero, or log when the values span more than LOG_Y_SPREAD: a 0.3 ms ack
    and a 40 ms platform read (or a ramp's last, saturated step) then both stay readable."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if positive and max(positive) / min(positive) > LOG_Y_SPREAD:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_log_minor_label))
        ax.set_ylabel(f"{label} (ms, log scale)")
    else:
        ax.set_ylim(bottom=0, top=max(positive, default=1.0) * 1.15)
        ax.set_ylabel(f"{label} (ms)")


def _thousands(ax: Axes, axis: str) -> None:
    """Rates as 12,500 rather than 12500 or 1.25e4."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))


def plot_latency(results: Results, path: Path) -> Path:
    """Percentile distribution of every measure on the usual HdrHistogram log scale.

    p100 cannot sit on a 1/(1-p) axis (it is at infinity), so the max goes in the legend.
    The legend sits under the axes: the curves rise to the upper right and the slowest
    measure sits high on the left, so there is no free corner inside.
    """
    fig, (ax,) = _new_figure()
    values: list[float] = []
    percentiles: list[float] = []
    for i, (name, m) in enumerate(_measures(results)):
        points = [(p, v) for p, v in
                  ((_num(pair[0]), _num(pair[1])) for pair in m.get("distribution") or [])
                  if p is not None and v is not None and 0 <= p < 100]
        if not points:
            continue
        percentiles += [p for p, _ in points]
        values += [v for _, v in points]
        label = (f"{name}: {m.get('label', '')}  (n={fmt_int(m.get('count'))}, "
                 f"max {fmt_ms(m.get('max'))} ms)")
        ax.plot([_percentile_x(p) for p, _ in points], [v for _, v in points],
                marker="o", markersize=3.5, linewidth=1.8,
                color=MEASURE_COLOURS[i % len(MEASURE_COLOURS)], label=label)
    objective = _num(results.get("objective_p99_ms"))
    if values and objective is not None:
        ax.axhline(objective, color="crimson", linestyle="--", linewidth=1,
                   label=f"objective: ack p99 < {fmt_ms(objective)} ms")
    low, high = min(percentiles, default=50.0), max(percentiles, default=99.99)
    first = max((p for p in PERCENTILE_TICKS if p <= low), default=0.0)
    last = min((p for p in PERCENTILE_TICKS if p >= high), default=PERCENTILE_TICKS[-1])
    ticks = [p for p in PERCENTILE_TICKS if first <= p <= max(last, 99.0)]
    ax.set_xscale("log")
    ax.set_xlim(_percentile_x(ticks[0]) * 0.85, _percentile_x(ticks[-1]) * 1.2)
    ax.xaxis.set_major_locator(FixedLocator([_percentile_x(p) for p in ticks]))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda x, _pos: _percent_label(round(100.0 * (1.0 - 1.0 / x), 6)) if x > 0 else ""))
    ax.xaxis.set_minor_locator(NullLocator())
    _latency_axis(ax, values + ([objective] if values and objective else []))
    ax.set_xlabel("percentile (log scale of 1/(1-p): each extra nine gets the same width)")
    ax.set_title(f"Latency by percentile: {results.get('profile', '?')}")
    ax.grid(True, which="major", alpha=0.3)
    if values:
        fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    else:
        _no_data(ax, "no latency samples")
    return _save(fig, path)


def plot_timeline(results: Results, path: Path) -> Path:
    """Achieved throughput (left axis) and ack p99 (right axis) second by second, with the
    offered rate dashed: a gap between offered and achieved is the server falling behind.
    Below, when the machine reports it, the CPU time the hypervisor took from it each
    second: on a shared VM, the seconds with a high p99 are often those."""
    timeline: Sequence[Mapping[str, Any]] = results.get("timeline") or []

    def series(key: str) -> list[float]:
        return [math.nan if (v := _num(row.get(key))) is None else v for row in timeline]

    def peak(values: Sequence[float]) -> float:
        return max((v for v in values if math.isfinite(v)), default=0.0)

    stolen = series("stolen_ms")
    low: Axes | None = None
    if any(math.isfinite(v) and v > 0 for v in stolen):
        fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 1.25), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
        ax = fig.add_subplot(grid[0])
        low = fig.add_subplot(grid[1], sharex=ax)
    else:
        fig, (ax,) = _new_figure()
    t = series("t")
    handles: list[Line2D] = []
    if timeline:
        offered, acked, p99 = series("offered"), series("acked"), series("p99")
        handles += ax.plot(t, offered, color="grey", linestyle="--", linewidth=1.2,
                           label="offered (commands/s)")
        handles += ax.plot(t, acked, color="#1f77b4", linewidth=1.8,
                           label="achieved: acked (commands/s)")
        # Headroom above the rates, and the p99 scale from zero, keep the lines off the frame.
        ax.set_ylim(bottom=0, top=max(peak(offered), peak(acked), 1.0) * 1.3)
        _thousands(ax, "y")
        right = ax.twinx()
        handles += right.plot(t, p99, color="#d62728", linewidth=1.4, label="ack p99 (ms)")
        objective = _num(results.get("objective_p99_ms"))
        if objective is not None:
            handles.append(right.axhline(objective, color="#d62728", linestyle=":",
                                         linewidth=1.2,
                                         label=f"objective p99 {fmt_ms(objective)} ms"))
        right.set_ylim(bottom=0, top=max(peak(p99), objective or 0.0, 0.001) * 1.3)
        right.set_ylabel("ack p99 (ms)", color="#d62728")
        right.tick_params(axis="y", colors="#d62728")
        if low is not None:
            handles += low.plot(t, stolen, color="#9467bd", linewidth=1.4,
                                label="CPU stolen by the hypervisor (ms per s, all CPUs)")
            low.set_ylim(bottom=0, top=max(peak(stolen), 1.0) * 1.2)
            low.set_ylabel("stolen (ms/s)", color="#9467bd")
            low.grid(True, alpha=0.3)
        fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9,
                   frameon=False)
    else:
        _no_data(ax, "no timeline")
    (low or ax).set_xlabel("time since start (s)")
    ax.set_ylabel("throughput (commands/s)", color="#1f77b4")
    ax.set_title(f"Throughput and ack p99 over time: {results.get('profile', '?')}")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_ramp(results: Results, path: Path) -> Path:
    """Ack p99 and p50 against offered rate (top) and achieved against offered (bottom),
    with the objective and the capacity marked: where the knee is, and why it is there."""
    steps: Sequence[Mapping[str, Any]] = results.get("ramp") or []
    if not steps:
        fig, (ax,) = _new_figure()
        ax.set_title("Ramp: no steps")
        _no_data(ax, "no ramp steps")
        return _save(fig, path)
    fig, (top, bottom) = _new_figure(nrows=2, height=8.5)

    def series(key: str) -> list[float]:
        return [math.nan if (v := _num(s.get(key))) is None else v for s in steps]

    offered, p99, p50 = series("offered"), series("p99"), series("p50")
    top.plot(offered, p99, color="#d62728", linewidth=1.8, label="ack p99")
    top.plot(offered, p50, color="#1f77b4", linewidth=1.4, label="ack p50")
    for ok in (True, False):
        chosen = [(x, y) for x, y, s in zip(offered, p99, steps, strict=True)
                  if bool(s.get("ok")) is ok]
        if chosen:
            top.scatter([x for x, _ in chosen], [y for _, y in chosen], zorder=3, s=40,
                        color="#2ca02c" if ok else "#d62728", edgecolors="black",
                        linewidths=0.5,
                        label="step within objective" if ok else "step over objective")
    objective = _num(results.get("objective_p99_ms"))
    if objective is not None:
        top.axhline(objective, color="black", linestyle="--", linewidth=1,
                    label=f"objective p99 {fmt_ms(objective)} ms")
    bottom.plot(offered, offered, color="grey", linestyle="--", linewidth=1,
                label="achieved = offered")
    bottom.plot(offered, series("achieved"), color="#1f77b4", marker="o", markersize=4,
                linewidth=1.8, label="achieved (acked)")
    capacity = _num(results.get("capacity"))
    for ax in (top, bottom):
        if capacity is not None:
            ax.axvline(capacity, color="#2ca02c", linestyle="-.", linewidth=1.4,
                       label=f"capacity {fmt_rate(capacity)}")
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        _thousands(ax, "x")
        ax.legend(loc="upper left", fontsize=9)
    _latency_axis(top, p99 + p50 + ([objective] if objective else []), "ack latency")
    bottom.set_ylim(bottom=0)
    _thousands(bottom, "y")
    top.set_title(f"Ramp: ack latency against offered rate (capacity "
                  f"{fmt_rate(capacity) if capacity is not None else 'none'})")
    bottom.set_title("Achieved against offered rate")
    bottom.set_xlabel("offered rate (commands/s)")
    bottom.set_ylabel("achieved (commands/s)")
    return _save(fig, path)


def plot(results: Results, out_dir: Path) -> list[Path]:
    """Write latency.png and timeline.png always (with a 'no data' note when empty, so the
    set of files does not depend on the run's luck), and ramp.png when the run was a ramp."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_latency(results, out_dir / "latency.png"),
             plot_timeline(results, out_dir / "timeline.png")]
    if results.get("ramp") is not None:
        paths.append(plot_ramp(results, out_dir / "ramp.png"))
    return paths


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1180px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; font-size: 1.2em; }
.verdict { display: inline-block; padding: 0.25em 0.9em; border-radius: 4px; color: #fff;
           font-weight: 700; font-size: 1.3em; letter-spacing: 0.05em; }
.PASS { background: #2e7d32; } .FAIL { background: #c62828; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; text-align: left;
         vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
.problems li { color: #c62828; }
code, pre { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; white-space: pre-wrap; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
.muted { color: #666; }
"""


def _e(value: Any) -> str:
    return html_lib.escape(str(value))


def _value(value: Any) -> str:
    """A config or reconciliation value as text: scalars as they are, the rest as JSON."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(_value(v))}</code></td></tr>"
                   for k, v in items.items())
    return f"<table>{rows}</table>" if rows else '<p class="muted">none</p>'


def _list(items: Sequence[Any], css: str = "") -> str:
    if not items:
        return '<p class="muted">none</p>'
    cls = f' class="{css}"' if css else ""
    return f"<ul{cls}>" + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul>"


def _measures_html(results: Results) -> str:
    rows = _measure_rows(results)
    if not rows:
        return '<p class="muted">no measures</p>'
    head = ("<tr><th>measure</th><th></th><th class='n'>count</th>"
            + "".join(f"<th class='n'>{_e(h)} (ms)</th>" for h, _ in PERCENTILE_COLUMNS)
            + "</tr>")
    body = "".join("<tr>" + f"<td><b>{_e(r[0])}</b></td><td>{_e(r[1])}</td>"
                   + "".join(f"<td class='n'>{_e(c)}</td>" for c in r[2:]) + "</tr>"
                   for r in rows)
    return f"<table>{head}{body}</table>"


def _ramp_html(results: Results) -> str:
    steps: Sequence[Mapping[str, Any]] | None = results.get("ramp")
    if steps is None:
        return ""
    head = ("<tr><th class='n'>offered</th><th class='n'>achieved</th>"
            "<th class='n'>p50 (ms)</th><th class='n'>p99 (ms)</th>"
            "<th class='n'>waiting at its end</th><th>kept up</th>"
            "<th>kept up, p99 within objective</th></tr>")
    body = "".join(
        f"<tr><td class='n'>{_e(fmt_rate(s.get('offered')))}</td>"
        f"<td class='n'>{_e(fmt_rate(s.get('achieved')))}</td>"
        f"<td class='n'>{_e(fmt_ms(s.get('p50')))}</td>"
        f"<td class='n'>{_e(fmt_ms(s.get('p99')))}</td>"
        f"<td class='n'>{_e(fmt_int(s.get('backlog')))}</td>"
        f"<td>{'yes' if s.get('kept_up') else '<b>no</b>'}</td>"
        f"<td>{'yes' if s.get('ok') else '<b>no</b>'}</td></tr>" for s in steps)
    return f"<h2>Ramp</h2><table>{head}{body}</table>"


def _image_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = _e(path.stem)
    return (f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}.png</figcaption></figure>")


def html(results: Results, images: Sequence[Path]) -> str:
    """One self-contained page: images as base64 data URIs and inline CSS, so the file can be
    attached to a ticket or opened from a CI artifact with no server and nothing to fetch."""
    word = verdict(results)
    reasons = failures(results)
    rec: Mapping[str, Any] = results.get("reconciliation") or {}
    counts = {k: v for k, v in rec.items() if k not in ("ok", "problems", "over_line")}
    machine: Mapping[str, Any] = results.get("machine") or {}
    config: Mapping[str, Any] = results.get("config") or {}
    facts = "".join(f"<tr><th>{_e(label)}</th><td>{_e(text)}</td></tr>"
                    for label, text in _facts(results))
    title = f"Load test {results.get('profile', '?')}: {word}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>Load test: {_e(results.get('profile', '?'))}</h1>",
        f'<p class="muted">started {_e(results.get("started", "?"))}, '
        f"{_num(results.get('duration_s')) or 0:g} s</p>",
        f'<p><span class="verdict {word}">{word}</span></p>',
        _list(reasons, "problems") if reasons else "",
        "<h2>Summary</h2>", _measures_html(results), f"<table>{facts}</table>",
        "<h2>Reconciliation</h2>",
        f'<p><span class="verdict {"FAIL" if "reconciliation failed" in reasons else "PASS"}">'
        f'{"FAIL" if "reconciliation failed" in reasons else "PASS"}</span></p>',
        "<h3>Problems</h3>", _list(reconciliation_problems(results), "problems"),
        "<h3>Over credit line</h3>", _list(rec.get("over_line") or [], "problems"),
        "<h3>Counts</h3>", _kv_table(counts),
        _ramp_html(results),
        "<h2>Plots</h2>", "".join(_image_html(p) for p in images)
        or '<p class="muted">no plots</p>',
        "<h2>Command</h2>", f"<pre>{_e(results.get('command', ''))}</pre>",
        "<h2>Configuration</h2>", _kv_table(config),
        "<h2>Machine</h2>", _kv_table(machine),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """NaN and infinities become null: Python would write them, but they are not JSON and
    jq, browsers and most other readers refuse the whole file."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_all(results: Results, out_dir: Path) -> dict[str, Path]:
    """Write results.json, the plots and report.html into out_dir (created if missing).

    Returns {"results": ..., "latency": ..., "timeline": ..., ["ramp": ...,] "html": ...}.
    results.json goes first, so the raw numbers survive even if plotting fails.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"results": out_dir / "results.json"}
    paths["results"].write_text(
        json.dumps(_finite(results), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
        encoding="utf-8")
    images = plot(results, out_dir)
    paths.update({p.stem: p for p in images})
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text(html(results, images), encoding="utf-8")
    return paths
