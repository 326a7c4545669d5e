"""graphcache.harness: load generator, history recorder, consistency checker, benchmarks."""

from ._checker import CheckReport, Lags, Violation, check, check_with_all_lags, check_with_lags
from ._history import Event, HistoryError, HistoryWriter, graph_hash, read_history
from ._report import (
    StrategyResult,
    StrategySummary,
    format_report,
    format_summary,
    format_table,
    summarize,
    write_chart,
    write_json,
)

__all__ = (
    "CheckReport",
    "Event",
    "HistoryError",
    "HistoryWriter",
    "Lags",
    "StrategyResult",
    "StrategySummary",
    "Violation",
    "check",
    "check_with_all_lags",
    "check_with_lags",
    "format_report",
    "format_summary",
    "format_table",
    "graph_hash",
    "read_history",
    "summarize",
    "write_chart",
    "write_json",
)
