"""Reporting a check and a strategy comparison: readable text, an aligned table, JSON and a PNG chart."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ._checker import CheckReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = (
    "StrategyResult",
    "StrategySummary",
    "chart",
    "format_report",
    "format_summary",
    "format_table",
    "representative",
    "summarize",
    "write_chart",
    "write_json",
)


class StrategyResult(msgspec.Struct):
    """One strategy's run: one row of the compare table.

    Costs per committed update: ``loads_per_update`` (store snapshot loads done for caching: the writers'
    loads, or the nodes' snapshot and read-through loads; patched rebuilds load nothing) and
    ``puts_per_update`` (cache writes, refused ones included). ``rebuilds`` is the writers' loads or the
    nodes' rebuilds (one put each). Freshness is in ``check``: ``visibility_lag_p50``/``p99`` (commit to
    the first stored put of it or newer) and the read lag ``lag_p50``/``p99`` (commit to the first read
    that saw it). The per-update fields are None in a report written before they were counted.
    """

    strategy: str
    updates: int
    seconds: float
    updates_per_s: float
    rebuilds: int
    rebuilds_per_update: float
    puts_refused: int
    cpu_s_per_1000: float
    check: CheckReport
    lags: list[float] = []  # raw read lags (seconds) for the chart; may be a sample
    # Cache writes, refused ones included; None in a report written before they were counted.
    puts: int | None = None
    loads: int | None = None  # store snapshot loads done for caching
    loads_per_update: float | None = None
    puts_per_update: float | None = None
    visibility_lags: list[float] = []  # raw visibility lags (seconds) for the chart; may be a sample

    @property
    def broke_safety(self) -> bool:
        """Readers saw a regression (G1) or a torn graph (G2): what this strategy served was wrong."""
        return self.check.regressions > 0 or self.check.torn > 0


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
        f"  visibility lag  p50/p95/p99 {_ms(report.visibility_lag_p50)} / {_ms(report.visibility_lag_p95)}"
        f" / {_ms(report.visibility_lag_p99)}   (commit -> stored put; writes never stored:"
        f" {report.invisible_commits}; puts: {report.stored_puts})",
        f"  read lag        p50/p95/p99 {_ms(report.lag_p50)} / {_ms(report.lag_p95)} / "
        f"{_ms(report.lag_p99)}   (commit -> seen by a read; writes never seen: {report.unseen_commits})",
    ]
    if report.visible_within:
        shares = ", ".join(f"{_pct(share)} within {name}" for name, share in report.visible_within.items())
        lines.append(f"  seen by reads  {shares}")
    if report.examples:
        lines.append("  examples:")
        lines.extend(f"    [{v.kind}] root {v.root!r}: {v.detail}" for v in report.examples)
    return "\n".join(lines)


_Column = tuple[str, Callable[[StrategyResult], str]]
_COLUMNS: tuple[_Column, ...] = (
    ("strategy", lambda r: r.strategy),
    ("updates", lambda r: str(r.updates)),
    ("updates/s", lambda r: f"{r.updates_per_s:.0f}"),
    ("loads/upd", lambda r: _ratio(r.loads_per_update)),
    ("puts/upd", lambda r: _ratio(r.puts_per_update)),
    ("puts refused", lambda r: str(r.puts_refused)),
    ("G1", lambda r: str(r.check.regressions)),
    ("G2", lambda r: str(r.check.torn)),
    ("G3", lambda r: str(r.check.stale)),
    ("vis lag p50", lambda r: _ms(r.check.visibility_lag_p50)),
    ("vis lag p99", lambda r: _ms(r.check.visibility_lag_p99)),
    ("read lag p50", lambda r: _ms(r.check.lag_p50)),
    ("read lag p99", lambda r: _ms(r.check.lag_p99)),
    ("CPU s/1000", lambda r: f"{r.cpu_s_per_1000:.3f}"),
)
"""The compare table. vis lag: commit -> first stored put of it or newer (put acknowledgements); read lag:
commit -> the first later read that saw it (includes the readers' sampling delay)."""


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
    lag_p99: float | None  # median of the rounds' read-lag p99s
    regressions: int  # G1, G2, G3: summed over the rounds
    torn: int
    stale: int
    loads_per_update: float | None = None  # medians over the rounds that counted them
    puts_per_update: float | None = None
    visibility_lag_p99: float | None = None  # median of the rounds' visibility-lag p99s


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
                lag_p99=_median(r.check.lag_p99 for r in runs),
                regressions=sum(r.check.regressions for r in runs),
                torn=sum(r.check.torn for r in runs),
                stale=sum(r.check.stale for r in runs),
                loads_per_update=_median(r.loads_per_update for r in runs),
                puts_per_update=_median(r.puts_per_update for r in runs),
                visibility_lag_p99=_median(r.check.visibility_lag_p99 for r in runs),
            )
        )
    return summaries


def _median(values: Iterable[float | None]) -> float | None:
    """The median of the values present (None if none is)."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


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
    ("loads/upd", lambda s: _ratio(s.loads_per_update)),
    ("puts/upd", lambda s: _ratio(s.puts_per_update)),
    ("vis lag p99", lambda s: _ms(s.visibility_lag_p99)),
    ("read lag p99", lambda s: _ms(s.lag_p99)),
    ("G1+G2+G3", lambda s: f"{s.regressions}+{s.torn}+{s.stale}"),
)


def format_summary(rows: Sequence[StrategyResult]) -> str:
    """The medians table over rounds: throughput (median and range), ratios of medians, loads and puts per
    update, both lags' p99."""
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


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(share: float) -> str:
    return f"{share * 100:.1f}%"


def write_json(path: str | Path, payload: Any) -> None:
    """Write any msgspec-encodable payload (Structs, dicts, lists) as indented JSON."""
    encoded = msgspec.json.format(msgspec.json.encode(payload), indent=2)
    Path(path).write_bytes(encoded + b"\n")


CHART_TITLES = (
    "throughput (updates/s)",
    "snapshot loads and puts per update",
    "commit -> in cache (solid), -> seen by a read (dotted): CDF",
    "G1 / G2 / G3 violations",
)
"""The chart's panels, left to right and top to bottom."""
_BROKEN = "broke G1/G2"
_SAFE_COLOR, _BROKEN_COLOR = "tab:blue", "tab:red"
_LINE_COLORS = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:gray")
"""Lag lines of strategies that kept G1/G2: never red, which marks the ones that did not."""
_LABEL_SIZE = 8


def write_chart(path: str | Path, results: Sequence[StrategyResult]) -> None:
    """A PNG of `chart` (rendered with Agg: a bare Figure needs no pyplot state)."""
    chart(results).savefig(Path(path), format="png", dpi=100)


def chart(results: Sequence[StrategyResult]) -> Figure:
    """Per strategy: throughput, loads and puts per update, both lags' CDFs and the G1/G2/G3 counts.

    A strategy whose readers saw regressions or torn graphs is drawn in red, hatched and named
    "broke G1/G2" in every panel: its throughput and lag were bought by serving wrong graphs, so it must
    not read as the fast, cheap winner.
    """
    # Imported lazily: matplotlib is slow to import, optional (the 'chart' extra), and only this needs it.
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(13, 8.5), layout="constrained")
    (speed, cost), (lag, violations) = figure.subplots(2, 2)
    labels = [_label(r) for r in results]
    _plot_throughput(speed, results, labels)
    _plot_costs(cost, results, labels)
    _plot_lags(lag, results, labels)
    _plot_violations(violations, results, labels)
    if any(r.broke_safety for r in results):
        figure.suptitle(f"red, hatched: readers saw regressed or torn graphs ({_BROKEN}); not a fair race")
    return figure


def _label(result: StrategyResult) -> str:
    return f"{result.strategy}\n({_BROKEN})" if result.broke_safety else result.strategy


def _style(result: StrategyResult) -> dict[str, Any]:
    if result.broke_safety:
        return {"color": _BROKEN_COLOR, "hatch": "//", "edgecolor": "black"}
    return {"color": _SAFE_COLOR}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _plot_throughput(axes: Any, results: Sequence[StrategyResult], labels: list[str]) -> None:
    axes.set_title(CHART_TITLES[0])
    for x, result in enumerate(results):
        bars = axes.bar([x], [_finite(result.updates_per_s)], **_style(result))
        axes.bar_label(bars, fmt="%.0f", fontsize=_LABEL_SIZE)
    axes.set_xticks(range(len(results)), labels)
    axes.set_ylabel("committed updates / s")


def _plot_costs(axes: Any, results: Sequence[StrategyResult], labels: list[str]) -> None:
    axes.set_title(CHART_TITLES[1])
    width = 0.4
    for x, result in enumerate(results):
        style = _style(result)
        # A report from before loads were counted: its rebuilds were all snapshot loads.
        loads = result.rebuilds_per_update if result.loads_per_update is None else result.loads_per_update
        bars = axes.bar([x - width / 2], [_finite(loads)], width, **style)
        axes.bar_label(bars, fmt="%.2f", fontsize=_LABEL_SIZE)
        puts = result.puts_per_update
        if puts is not None:
            bars = axes.bar([x + width / 2], [_finite(puts)], width, **{**style, "alpha": 0.5})
            axes.bar_label(bars, fmt="%.2f", fontsize=_LABEL_SIZE)
    axes.set_xticks(range(len(results)), labels)
    axes.set_ylabel("per committed update (solid: loads, light: puts)")


def _plot_lags(axes: Any, results: Sequence[StrategyResult], labels: list[str]) -> None:
    axes.set_title(CHART_TITLES[2])
    axes.set_xlabel("lag (ms, log scale)")
    axes.set_ylabel("share of observed commits")
    plotted = False
    for index, (result, label) in enumerate(zip(results, labels, strict=True)):
        if result.broke_safety:
            color, line = _BROKEN_COLOR, "--"
        else:
            color, line = _LINE_COLORS[index % len(_LINE_COLORS)], "-"
        name = label.replace("\n", " ")
        # The visibility lag carries the legend; the read lag, dotted in the same colour, does not.
        for lags, style, legend in ((result.visibility_lags, line, name), (result.lags, ":", "_" + name)):
            if lags:
                _plot_cdf(axes, lags, style, color, legend)
                plotted = True
    if plotted:
        axes.set_xscale("log")
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "no lag data", ha="center", va="center", transform=axes.transAxes)


def _plot_cdf(axes: Any, lags: list[float], style: str, color: str, label: str) -> None:
    lags_ms = sorted(max(lag * 1000, 1e-3) for lag in lags)  # log axis: no zeros
    shares = [(i + 1) / len(lags_ms) for i in range(len(lags_ms))]
    axes.step(lags_ms, shares, style, color=color, where="post", label=label)


def _plot_violations(axes: Any, results: Sequence[StrategyResult], labels: list[str]) -> None:
    axes.set_title(CHART_TITLES[3])
    width, highest = 0.27, 0
    kinds = (("G1 regressions", "regressions", "tab:red"), ("G2 torn", "torn", "tab:orange"),
             ("G3 stale", "stale", "tab:purple"))  # fmt: skip
    for offset, (name, field, color) in zip((-width, 0.0, width), kinds, strict=True):
        counts = [getattr(r.check, field) for r in results]
        bars = axes.bar([x + offset for x in range(len(results))], counts, width, color=color, label=name)
        axes.bar_label(bars, fmt="%d", fontsize=_LABEL_SIZE)
        highest = max([highest, *counts])
    axes.set_xticks(range(len(results)), labels)
    axes.set_yscale("symlog")  # zero must show as zero, and 3 beside 30,000 must still show
    axes.set_ylim(0, max(10, highest * 4))  # room above the tallest bar for its label and the legend
    axes.set_ylabel("count (0 is the only good number)")
    axes.legend(loc="upper right")
