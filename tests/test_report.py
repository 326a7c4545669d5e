"""Reports: the readable check, the compare table, JSON, the PNG chart and ``run.py check``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from graphcache import _cli
from graphcache.harness import (
    CheckReport,
    Event,
    HistoryWriter,
    StrategyResult,
    Violation,
    check,
    format_report,
    format_summary,
    format_table,
    graph_hash,
    summarize,
    write_chart,
    write_json,
)
from graphcache.harness._report import CHART_TITLES, chart
from graphcache.storage import Graph, Node, Upsert

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def a_report(**changes: object) -> CheckReport:
    base = CheckReport(
        reads=120,
        writes=40,
        roots=2,
        regressions=0,
        torn=0,
        unjudged=0,
        stale=0,
        absent_at_end=0,
        lag_p50=0.0012,
        lag_p95=0.0101,
        lag_p99=0.0505,
        visible_within={"10ms": 0.9, "100ms": 1.0, "1s": 1.0},
        examples=[],
        visibility_lag_p50=0.0008,
        visibility_lag_p95=0.0032,
        visibility_lag_p99=0.0204,
        stored_puts=50,
    )
    return msgspec.structs.replace(base, **changes)


def a_result(strategy: str, **changes: object) -> StrategyResult:
    base = StrategyResult(
        strategy=strategy,
        updates=1000,
        seconds=2.0,
        updates_per_s=500.0,
        rebuilds=50,
        rebuilds_per_update=0.05,
        puts_refused=3,
        cpu_s_per_1000=0.25,
        check=a_report(),
        lags=[0.001, 0.002, 0.004, 0.0],
        visibility_lags=[0.0005, 0.001, 0.0, 0.002],
    )
    return msgspec.structs.replace(base, **changes)


def test_table_has_a_header_a_rule_and_one_aligned_row_per_strategy() -> None:
    """Every line of the table is as wide as the rule; each strategy's figures appear in its row: loads and
    puts per update, then the visibility lag and the read lag, p50 and p99 each."""
    rows = [
        a_result("actor", loads_per_update=0.02, puts_per_update=0.05),
        a_result("naive", updates_per_s=12345.6, check=a_report(regressions=7, torn=2)),
    ]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    header, rule, actor, naive = lines
    assert header.split()[:3] == ["strategy", "updates", "updates/s"]
    assert "vis lag p50" in header
    assert "read lag p99" in header
    assert set(rule) == {"-", " "}
    assert {len(header), len(actor), len(naive)} == {len(rule)}
    counts = ["actor", "1000", "500", "0.020", "0.050", "3", "0", "0", "0"]
    assert actor.split() == [*counts, "0.8ms", "20.4ms", "1.2ms", "50.5ms", "0.250"]
    assert naive.split()[2] == "12346"
    assert naive.split()[3:5] == ["-", "-"]  # a report from before loads and puts were counted
    assert naive.split()[6:8] == ["7", "2"]


def test_table_shows_a_dash_for_a_missing_lag() -> None:
    """A strategy whose commits were never cached nor seen has no percentiles: shown as '-'."""
    check = a_report(
        lag_p50=None, lag_p95=None, lag_p99=None, visibility_lag_p50=None, visibility_lag_p99=None
    )
    row = format_table([a_result("none", check=check)])
    assert row.splitlines()[2].split()[9:13] == ["-", "-", "-", "-"]


def test_summary_takes_medians_over_rounds_and_ratios_of_medians() -> None:
    """Three rounds each: median and range of updates/s, ratios of the medians to none and cas, the
    median p99, and G1-G3 summed over every round (one bad round is not hidden by the median)."""
    costs = {"loads_per_update": 0.02, "puts_per_update": 0.05}
    rows = [
        a_result("actor", updates_per_s=900.0, check=a_report(lag_p99=0.2), **costs),
        a_result("cas", updates_per_s=700.0),
        a_result("none", updates_per_s=1000.0, check=a_report(lag_p99=None, visibility_lag_p99=None)),
        a_result("actor", updates_per_s=1100.0, check=a_report(lag_p99=0.3, torn=1), **costs),
        a_result("cas", updates_per_s=800.0),
        a_result("none", updates_per_s=1200.0, check=a_report(lag_p99=None, visibility_lag_p99=None)),
        a_result("actor", updates_per_s=1000.0, check=a_report(lag_p99=0.1, visibility_lag_p99=0.01)),
        a_result("cas", updates_per_s=750.0),
        a_result("none", updates_per_s=1100.0, check=a_report(lag_p99=None, visibility_lag_p99=None)),
    ]
    actor, cas, none = summarize(rows)
    assert (actor.strategy, actor.runs, actor.updates_per_s) == ("actor", 3, 1000.0)
    assert (actor.updates_per_s_min, actor.updates_per_s_max) == (900.0, 1100.0)
    assert actor.vs_none == pytest.approx(1000 / 1100)
    assert actor.vs_cas == pytest.approx(1000 / 750)
    assert actor.lag_p99 == pytest.approx(0.2)
    assert actor.visibility_lag_p99 == pytest.approx(0.0204)
    assert (actor.loads_per_update, actor.puts_per_update) == (0.02, 0.05)  # the rounds that counted them
    assert (actor.regressions, actor.torn, actor.stale) == (0, 1, 0)
    assert none.lag_p99 is None
    assert none.visibility_lag_p99 is None
    assert cas.vs_cas == 1.0
    lines = format_summary(rows).splitlines()
    medians = ["0.020", "0.050", "20.4ms", "200.0ms", "0+1+0"]
    assert lines[2].split() == ["actor", "3", "1000", "900-1100", "0.91", "1.33", *medians]
    assert lines[4].split()[6:10] == ["-", "-", "-", "-"]


def test_summary_without_a_baseline_shows_dashes() -> None:
    """Ratios need the baseline strategy in the run: without none or cas they are absent."""
    (only,) = summarize([a_result("actor")])
    assert only.vs_none is None
    assert only.vs_cas is None
    assert format_summary([a_result("actor")]).splitlines()[2].split()[4:6] == ["-", "-"]


def test_format_report_names_the_verdict_and_each_example() -> None:
    """A failed check says FAIL and prints each example with its kind and root."""
    example = Violation("G1", "root-7", "reader-2 read v3 after reader-1's read of v5 had ended")
    text = format_report(a_report(regressions=1, examples=[example]), title="naive")
    assert text.startswith("naive: FAIL")
    assert "G1 regressions  1" in text
    assert "[G1] root 'root-7': reader-2 read v3 after reader-1's read of v5 had ended" in text


def test_format_report_passes_a_clean_check() -> None:
    """A clean check says PASS and shows the visibility shares."""
    text = format_report(a_report())
    assert text.startswith("consistency check: PASS")
    assert "90.0% within 10ms" in text


def test_write_json_round_trips_a_strategy_result(tmp_path: Path) -> None:
    """The JSON file decodes back into the same StrategyResults."""
    results = [a_result("actor"), a_result("cas", check=a_report(examples=[Violation("G3", "r", "stale")]))]
    path = tmp_path / "report.json"
    write_json(path, {"results": results})
    decoded = msgspec.json.decode(path.read_bytes(), type=dict[str, list[StrategyResult]])
    assert decoded == {"results": results}


def test_write_chart_writes_a_png(tmp_path: Path) -> None:
    """The chart is a PNG file drawn with matplotlib's Agg renderer, also for a strategy with no lags."""
    path = tmp_path / "report.png"
    none = a_result("none", lags=[], visibility_lags=[], rebuilds_per_update=0.0)
    write_chart(path, [a_result("actor"), none])
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def _bar_heights(axes: object) -> list[float]:
    return [patch.get_height() for patch in axes.patches]  # type: ignore[attr-defined]


def _legend(axes: object) -> list[str]:
    """The labels of the lines that appear in the legend (an underscore hides one)."""
    labels = [line.get_label() for line in axes.get_lines()]  # type: ignore[attr-defined]
    return [label for label in labels if not label.startswith("_")]


def test_chart_shows_throughput_costs_lag_and_violations_per_strategy() -> None:
    """Four panels: updates/s, snapshot loads and puts per update, the visibility and read lag CDFs, and
    G1/G2/G3 counts, each per strategy."""
    results = [
        a_result(
            "actor", updates_per_s=900.0, rebuilds_per_update=0.2, loads_per_update=0.1, puts_per_update=0.2
        ),
        a_result(
            "cas", updates_per_s=700.0, rebuilds_per_update=1.0, loads_per_update=1.0, puts_per_update=1.0
        ),
    ]
    speed, cost, lag, violations = chart(results).axes
    assert [axes.get_title() for axes in (speed, cost, lag, violations)] == list(CHART_TITLES)
    assert CHART_TITLES == (
        "throughput (updates/s)",
        "snapshot loads and puts per update",
        "commit -> in cache (solid), -> seen by a read (dotted): CDF",
        "G1 / G2 / G3 violations",
    )
    assert _bar_heights(speed) == [900.0, 700.0]
    assert _bar_heights(cost) == [0.1, 0.2, 1.0, 1.0]  # loads, then puts, of each strategy
    assert len(lag.get_lines()) == 4  # each strategy's visibility lag (solid) and read lag (dotted)
    assert _legend(lag) == ["actor", "cas"]
    assert _bar_heights(violations) == [0, 0, 0, 0, 0, 0]


def test_chart_takes_rebuilds_as_loads_from_a_report_before_loads_were_counted() -> None:
    """An older report (no loads_per_update) draws its rebuilds per update, which were all loads then."""
    cost = chart([a_result("cas", rebuilds_per_update=1.0)]).axes[1]
    assert _bar_heights(cost) == [1.0]


def test_chart_marks_a_strategy_that_broke_g1_or_g2_in_every_panel() -> None:
    """A strategy whose readers saw regressions or torn graphs is named as such on every axis and drawn
    in red, so its speed cannot pass for a fair win; its violation counts are the bars that stand out."""
    results = [
        a_result("actor", updates_per_s=900.0),
        a_result("naive", updates_per_s=950.0, check=a_report(regressions=3, torn=40)),
    ]
    figure = chart(results)
    speed, cost, lag, violations = figure.axes
    for axes in (speed, cost, violations):
        assert [tick.get_text() for tick in axes.get_xticklabels()] == ["actor", "naive\n(broke G1/G2)"]
    assert _legend(lag) == ["actor", "naive (broke G1/G2)"]
    safe, broken = speed.patches
    assert safe.get_facecolor() != broken.get_facecolor()
    assert broken.get_hatch() == "//"
    assert sorted(_bar_heights(violations)) == [0, 0, 0, 0, 3, 40]
    assert "broke G1/G2" in figure.get_suptitle()


def test_chart_leaves_puts_out_when_a_report_did_not_count_them() -> None:
    """Results from before puts were counted (puts=None) show rebuilds only, and nobody is called broken."""
    figure = chart([a_result("actor"), a_result("cas")])
    assert len(figure.axes[1].patches) == 2
    assert figure.get_suptitle() == ""


def test_write_chart_without_any_lag_still_writes_a_png(tmp_path: Path) -> None:
    """No lag data at all (e.g. only the 'none' strategy) still gives a chart."""
    path = tmp_path / "empty.png"
    write_chart(path, [a_result("none", lags=[], visibility_lags=[])])
    assert path.read_bytes().startswith(PNG_SIGNATURE)


# ---- run.py check ---------------------------------------------------------------------------------


def record(path: Path, events: list[Event]) -> Path:
    with HistoryWriter(path) as writer:
        for event in events:
            writer.record(event)
    return path


def history(*, regress: bool) -> list[Event]:
    """One root at v1 then v2; a reader sees v2, then (if ``regress``) v1 again."""
    root = {"r": Node("r", None, {}, 1)}
    child = {**root, "a": Node("a", "r", {"n": 1}, 1)}
    h1, h2 = graph_hash(Graph("r", 1, root)), graph_hash(Graph("r", 2, child))
    ops1 = msgspec.to_builtins([Upsert("r", None, {})])
    ops2 = msgspec.to_builtins([Upsert("a", "r", {"n": 1})])
    events = [
        Event("setup", "ok", "create", "r", 0.0, version=1, hash=h1, ops=ops1),
        Event("w", "invoke", "write", "r", 1.0),
        Event("w", "ok", "write", "r", 1.1, version=2, ops=ops2),
        Event("reader", "invoke", "read", "r", 1.2),
        Event("reader", "ok", "read", "r", 1.3, version=2, hash=h2),
        Event("reader", "invoke", "read", "r", 1.4),
        Event("reader", "ok", "read", "r", 1.5, version=1 if regress else 2, hash=h1 if regress else h2),
    ]
    return events


def run_check(*argv: str) -> int:
    """``graphcache check ARGV``, in this process."""
    return _cli.main(["check", *argv])


def test_cli_exits_0_on_a_clean_history_split_over_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Histories from several processes are merged; a clean one exits 0 and says PASS."""
    events = history(regress=False)
    writer_file = record(tmp_path / "writer.jsonl", [e for e in events if e.process != "reader"])
    reader_file = record(tmp_path / "reader.jsonl", [e for e in events if e.process == "reader"])
    assert run_check(str(writer_file), str(reader_file)) == 0
    assert "PASS" in capsys.readouterr().out


def test_cli_exits_1_on_a_violation_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A regression exits 1, prints its example, and --json writes the same report."""
    path = record(tmp_path / "h.jsonl", history(regress=True))
    out = tmp_path / "check.json"
    assert run_check(str(path), "--json", str(out)) == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed
    assert "[G1] root 'r'" in printed
    written = msgspec.json.decode(out.read_bytes(), type=CheckReport)
    assert written == check(history(regress=True))
    assert json.loads(out.read_text())["regressions"] == 1


def test_cli_names_the_malformed_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A line that is not an event exits 2 with the file and line number."""
    path = record(tmp_path / "h.jsonl", history(regress=False)[:2])
    with path.open("a") as f:
        f.write('{"process": "w", "type": "ok"}\n')
    assert run_check(str(path)) == 2
    assert f"{path}:3: not a history event" in capsys.readouterr().err


def test_cli_reports_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing history exits 2 and names the file."""
    missing = tmp_path / "nope.jsonl"
    assert run_check(str(missing)) == 2
    assert f"cannot read history: {missing}" in capsys.readouterr().err


def test_cli_refuses_negative_examples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--examples below zero exits 2 before reading anything."""
    assert run_check(str(tmp_path / "never-read.jsonl"), "--examples", "-1") == 2
    assert "argument --examples: must be 0 or more" in capsys.readouterr().err


def test_cli_refuses_a_json_report_it_could_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json into a missing directory exits 2 before checking anything."""
    path = record(tmp_path / "h.jsonl", history(regress=False))
    assert run_check(str(path), "--json", str(tmp_path / "no" / "report.json")) == 2
    assert capsys.readouterr().err.startswith("graphcache check: argument --json: no directory")


def test_run_py_check_exit_status_through_the_real_cli(tmp_path: Path) -> None:
    """`python run.py check` exits 0 on a clean history and 1 on a regression, printing the verdict."""
    clean = record(tmp_path / "clean.jsonl", history(regress=False))
    regressed = record(tmp_path / "regressed.jsonl", history(regress=True))
    root = Path(__file__).resolve().parent.parent
    outcomes = [
        subprocess.run(
            [sys.executable, str(root / "run.py"), "check", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        for path in (clean, regressed)
    ]
    assert [o.returncode for o in outcomes] == [0, 1]
    assert "PASS" in outcomes[0].stdout
    assert "FAIL" in outcomes[1].stdout
