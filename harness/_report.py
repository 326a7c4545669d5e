"""Reporting a check and a strategy comparison: readable text, an aligned table, JSON and a PNG chart."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ._checker import CheckReport

__all__ = (
    "StrategyResult",
    "StrategySummary",
    "format_report",
    "format_summary",
    "format_table",
    "representative",
    "summarize",
    "write_chart",
    "write_json",
)


class StrategyResult(msgspec.Struct):
    """One strategy's run: one row of the compare table."""

    strategy: str
    updates: int
    seconds: float
    updates_per_s: float
    rebuilds: int
    rebuilds_per_update: float
    puts_refused: int
    cpu_s_per_1000: float
    check: CheckReport
    lags: list[float] = []  # raw commit->visible lags (seconds) for the chart; may be a sample


def format_report(report: CheckReport, *, title: str = "consistency check") -> str:
    """A readable multi-line account of a check, with its examples."""
    verdict = "PASS" if report.ok else "FAIL"
    lines = [
        f"{title}: {verdict}",
        f"  events     {report.reads} reads ({report.absent_reads} absent), {report.writes} writes, "
        f"{report.roots} roots",
        f"  G1 regressions  {report.regressions}",
        f"  G2 torn graphs  {report.torn}   (unjudged reads past an unknown write: {report.unjudged})",
        f"  G3 stale roots  {report.stale}   (absent at end: {report.absent_at_end}, "
        f"not read at end: {report.unread_at_end})",
        f"  lag p50/p95/p99 {_ms(report.lag_p50)} / {_ms(report.lag_p95)} / {_ms(report.lag_p99)}   "
        f"(writes never seen by a later read: {report.unseen_commits})",
    ]
    if report.visible_within:
        shares = ", ".join(f"{_pct(share)} within {name}" for name, share in report.visible_within.items())
        lines.append(f"  visible    {shares}")
    if report.examples:
        lines.append("  examples:")
        lines.extend(f"    [{v.kind}] root {v.root!r}: {v.detail}" for v in report.examples)
    return "\n".join(lines)


_Column = tuple[str, Callable[[StrategyResult], str]]
_COLUMNS: tuple[_Column, ...] = (
    ("strategy", lambda r: r.strategy),
    ("updates", lambda r: str(r.updates)),
    ("updates/s", lambda r: f"{r.updates_per_s:.0f}"),
    ("rebuilds", lambda r: str(r.rebuilds)),
    ("rebuilds/upd", lambda r: f"{r.rebuilds_per_update:.3f}"),
    ("puts refused", lambda r: str(r.puts_refused)),
    ("G1", lambda r: str(r.check.regressions)),
    ("G2", lambda r: str(r.check.torn)),
    ("G3", lambda r: str(r.check.stale)),
    ("lag p50", lambda r: _ms(r.check.lag_p50)),
    ("lag p95", lambda r: _ms(r.check.lag_p95)),
    ("lag p99", lambda r: _ms(r.check.lag_p99)),
    ("CPU s/1000", lambda r: f"{r.cpu_s_per_1000:.3f}"),
)


def format_table(rows: Sequence[StrategyResult]) -> str:
    """The compare table: one line per strategy, columns aligned (text left, numbers right)."""
    return _render([[name for name, _ in _COLUMNS]] + [[cell(row) for _, cell in _COLUMNS] for row in rows])


class StrategySummary(msgspec.Struct):
    """One strategy over every round of a run: medians, the throughput range, and ratios of medians."""

    strategy: str
    runs: int
    updates_per_s: float  # median over the rounds
    updates_per_s_min: float
    updates_per_s_max: float
    vs_none: float | None  # median updates/s over none's median (None if none did not run)
    vs_cas: float | None
    rebuilds_per_update: float  # median
    lag_p99: float | None  # median of the rounds' p99s
    regressions: int  # G1, G2, G3: summed over the rounds
    torn: int
    stale: int


def summarize(rows: Sequence[StrategyResult]) -> list[StrategySummary]:
    """Per strategy (in first-seen order), the medians over its rounds and ratios to none's and cas's."""
    by_name: dict[str, list[StrategyResult]] = {}
    for row in rows:
        by_name.setdefault(row.strategy, []).append(row)
    medians = {name: statistics.median(r.updates_per_s for r in runs) for name, runs in by_name.items()}

    def ratio(name: str, base: str) -> float | None:
        baseline = medians.get(base)
        return medians[name] / baseline if baseline else None

    summaries = []
    for name, runs in by_name.items():
        p99s = [r.check.lag_p99 for r in runs if r.check.lag_p99 is not None]
        summaries.append(
            StrategySummary(
                strategy=name,
                runs=len(runs),
                updates_per_s=medians[name],
                updates_per_s_min=min(r.updates_per_s for r in runs),
                updates_per_s_max=max(r.updates_per_s for r in runs),
                vs_none=ratio(name, "none"),
                vs_cas=ratio(name, "cas"),
                rebuilds_per_update=statistics.median(r.rebuilds_per_update for r in runs),
                lag_p99=statistics.median(p99s) if p99s else None,
                regressions=sum(r.check.regressions for r in runs),
                torn=sum(r.check.torn for r in runs),
                stale=sum(r.check.stale for r in runs),
            )
        )
    return summaries


def representative(rows: Sequence[StrategyResult]) -> list[StrategyResult]:
    """Each strategy's median-throughput round (the lower middle one for an even count), for the chart."""
    by_name: dict[str, list[StrategyResult]] = {}
    for row in rows:
        by_name.setdefault(row.strategy, []).append(row)
    return [sorted(runs, key=lambda r: r.updates_per_s)[(len(runs) - 1) // 2] for runs in by_name.values()]


_SUMMARY_COLUMNS: tuple[tuple[str, Callable[[StrategySummary], str]], ...] = (
    ("strategy", lambda s: s.strategy),
    ("runs", lambda s: str(s.runs)),
    ("updates/s median", lambda s: f"{s.updates_per_s:.0f}"),
    ("range", lambda s: f"{s.updates_per_s_min:.0f}-{s.updates_per_s_max:.0f}"),
    ("x none", lambda s: "-" if s.vs_none is None else f"{s.vs_none:.2f}"),
    ("x cas", lambda s: "-" if s.vs_cas is None else f"{s.vs_cas:.2f}"),
    ("rebuilds/upd", lambda s: f"{s.rebuilds_per_update:.3f}"),
    ("lag p99 median", lambda s: _ms(s.lag_p99)),
    ("G1+G2+G3", lambda s: f"{s.regressions}+{s.torn}+{s.stale}"),
)


def format_summary(rows: Sequence[StrategyResult]) -> str:
    """The medians table over rounds: throughput (median and range), ratios of medians, rebuilds, lag."""
    header = [name for name, _ in _SUMMARY_COLUMNS]
    return _render([header] + [[cell(s) for _, cell in _SUMMARY_COLUMNS] for s in summarize(rows)])


def _render(cells: list[list[str]]) -> str:
    """A header line, a rule, then the rows: columns as wide as their widest cell, numbers right-aligned."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    rendered = [_align(line, widths) for line in cells]
    return "\n".join([rendered[0], "  ".join("-" * w for w in widths), *rendered[1:]])


def _align(line: list[str], widths: list[int]) -> str:
    first = line[0].ljust(widths[0])
    rest = (cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))
    return "  ".join([first, *rest]).rstrip()


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def _pct(share: float) -> str:
    return f"{share * 100:.1f}%"


def write_json(path: str | Path, payload: Any) -> None:
    """Write any msgspec-encodable payload (Structs, dicts, lists) as indented JSON."""
    encoded = msgspec.json.format(msgspec.json.encode(payload), indent=2)
    Path(path).write_bytes(encoded + b"\n")


def write_chart(path: str | Path, results: Sequence[StrategyResult]) -> None:
    """A PNG: commit-to-visible lag per strategy (CDF) and rebuilds per update, side by side."""
    # Imported lazily: matplotlib is slow to import and only the chart needs it.
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(12, 4.5), layout="constrained")
    lag_axes, rebuild_axes = figure.subplots(1, 2)
    _plot_lags(lag_axes, results)
    _plot_rebuilds(rebuild_axes, results)
    figure.savefig(Path(path), format="png", dpi=100)  # a bare Figure renders with Agg, no pyplot state


def _plot_lags(axes: Any, results: Sequence[StrategyResult]) -> None:
    axes.set_title("commit -> visible lag (CDF)")
    axes.set_xlabel("lag (ms, log scale)")
    axes.set_ylabel("share of observed commits")
    plotted = False
    for result in results:
        if not result.lags:
            continue
        lags_ms = sorted(max(lag * 1000, 1e-3) for lag in result.lags)  # log axis: no zeros
        shares = [(i + 1) / len(lags_ms) for i in range(len(lags_ms))]
        axes.step(lags_ms, shares, where="post", label=result.strategy)
        plotted = True
    if plotted:
        axes.set_xscale("log")
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "no lag data", ha="center", va="center", transform=axes.transAxes)


def _plot_rebuilds(axes: Any, results: Sequence[StrategyResult]) -> None:
    axes.set_title("rebuilds per update")
    names = [r.strategy for r in results]
    values = [r.rebuilds_per_update if math.isfinite(r.rebuilds_per_update) else 0.0 for r in results]
    bars = axes.bar(names, values, color="tab:blue")
    axes.bar_label(bars, fmt="%.3f")
    axes.set_ylabel("rebuilds / update")
