"""The load generator on the memory backends: every strategy runs, is checked, and is reported."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import msgspec
import pytest

from graphcache import _cli
from graphcache._cli import UsageError
from graphcache.harness import StrategyResult, _loadtest, read_history
from graphcache.harness._loadtest import LoadConfig, run_compare
from graphcache.harness._lt_backends import Env
from graphcache.harness._lt_config import fresh_out_directory
from graphcache.harness._lt_fleet import scrape, serve_argv, tally_from_metrics
from graphcache.harness._lt_graph import GraphWorkload, WritableColumn, WritableTable, confirm, new_value
from graphcache.harness._procs import spawn
from graphcache.harness._strategies import NAMES
from graphcache.storage import GraphSpec


def loadtest(argv: list[str]) -> int:
    """``graphcache loadtest ARGV``, in this process."""
    return _cli.main(["loadtest", *argv])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMOKE = ["--duration", "1.5", "--settle", "3", "--no-progress", "--seed", "7"]


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """One short ``loadtest --compare`` on the embedded backends, shared by the tests below."""
    out = tmp_path_factory.mktemp("compare")
    code = loadtest(["--compare", *SMOKE, "--out", str(out)])
    return code, out


def results_of(out: Path) -> dict[str, StrategyResult]:
    payload = json.loads((out / "report.json").read_bytes())
    results = msgspec.convert(payload["results"], list[StrategyResult])
    return {r.strategy: r for r in results}


def test_compare_reports_every_strategy(compare_run: tuple[int, Path]) -> None:
    """report.json has one row per strategy, in compare order, each with committed updates and reads."""
    code, out = compare_run
    results = results_of(out)
    assert code == 0
    assert list(results) == list(NAMES)
    assert all(r.updates > 0 and r.check.reads > 0 for r in results.values())


def test_graphcache_keeps_its_guarantees(compare_run: tuple[int, Path]) -> None:
    """actor: no regression, no torn graph, every written root converged, fewer rebuilds than updates."""
    actor = results_of(compare_run[1])["actor"]
    assert (actor.check.regressions, actor.check.torn, actor.check.stale) == (0, 0, 0)
    assert actor.check.unread_at_end == 0
    assert 0 < actor.rebuilds < actor.updates


def test_naive_is_caught(compare_run: tuple[int, Path]) -> None:
    """naive: the checker finds regressions or torn graphs, with examples naming the root."""
    naive = results_of(compare_run[1])["naive"]
    assert naive.check.regressions + naive.check.torn > 0
    assert naive.check.examples
    assert all(v.root.startswith("root-") for v in naive.check.examples)


def test_writer_side_strategies_rebuild_once_per_update(compare_run: tuple[int, Path]) -> None:
    """cas, naive and checkset load once per committed update; none never does."""
    results = results_of(compare_run[1])
    for name in ("cas", "naive", "checkset"):
        assert results[name].rebuilds == results[name].updates
    assert results["none"].rebuilds == 0
    assert results["none"].check.absent_reads == results["none"].check.reads


def test_histories_chart_and_json_are_written(compare_run: tuple[int, Path]) -> None:
    """Each strategy keeps its histories (writes, reads, final versions, and the puts the cache stored:
    by the writers, or by the nodes for actor); report.png is a PNG."""
    out = compare_run[1]
    assert (out / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    for name in NAMES:
        events = read_history(*sorted((out / name).glob("*.jsonl")))
        ops = {(e.op, e.type) for e in events}
        assert {("create", "ok"), ("write", "ok"), ("read", "ok"), ("final", "ok")} <= ops
        assert (("rebuild", "ok") in ops) == (name != "none")
    puts = read_history(out / "actor" / "nodes.jsonl")
    assert puts
    assert {e.process for e in puts} <= {"node-0", "node-1"}


REPORT_FIELDS = {"updates_per_s", "loads_per_update", "puts_per_update"}
CHECK_FIELDS = {
    "visibility_lag_p50",
    "visibility_lag_p99",
    "regressions",
    "torn",
    "stale",
    "lag_p50",
    "lag_p99",
}


def test_report_json_names_the_figures_targets_read(compare_run: tuple[int, Path]) -> None:
    """Each result in report.json has updates_per_s, loads_per_update, puts_per_update and, under check,
    the visibility lag p50/p99 (seconds, finite for every strategy that maintains the cache), the read
    lag beside it, and G1-G3; none stores nothing, so all its commits are invisible."""
    payload = json.loads((compare_run[1] / "report.json").read_bytes())
    rows = {row["strategy"]: row for row in payload["results"]}
    assert all(row.keys() >= REPORT_FIELDS and row["check"].keys() >= CHECK_FIELDS for row in rows.values())
    for name in ("actor", "cas", "naive", "checkset", "lock"):
        row, check = rows[name], rows[name]["check"]
        assert row["loads_per_update"] > 0
        assert row["puts_per_update"] > 0
        assert 0 <= check["visibility_lag_p50"] <= check["visibility_lag_p99"] < 60
        assert check["stored_puts"] > 0
    assert rows["cas"]["loads_per_update"] == rows["cas"]["puts_per_update"] == 1.0
    assert rows["actor"]["puts_per_update"] < 1.0
    none = rows["none"]
    assert (none["loads_per_update"], none["puts_per_update"], none["check"]["visibility_lag_p50"]) == (
        0,
        0,
        None,
    )
    assert none["check"]["invisible_commits"] == none["check"]["writes"] > 0


def test_same_seed_same_workload(tmp_path: Path) -> None:
    """Two runs with one seed send the first writes of each writer task to the same roots."""

    def first_roots(out: Path) -> dict[str, str]:
        firsts: dict[str, str] = {}
        for e in read_history(*sorted(out.glob("*/*.jsonl"))):
            if e.op == "write" and e.type == "invoke" and e.process.startswith("writer-"):
                firsts.setdefault(e.process, e.root)
        return firsts

    config = LoadConfig(duration=0.3, settle=0.5, writers=16, readers=1, progress=False, seed=3)
    anyio.run(run_compare, config, ["none"], tmp_path / "a")
    anyio.run(run_compare, config, ["cas"], tmp_path / "b")
    a, b = first_roots(tmp_path / "a"), first_roots(tmp_path / "b")
    assert len(a) == 16
    assert a == b


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_with_a_partial_report(tmp_path: Path, signum: signal.Signals) -> None:
    """SIGINT (or SIGTERM) during the first strategy ends it, skips the rest, and still returns its checked
    result: the run ends through its clean-up, never killed midway."""

    async def main() -> list[StrategyResult]:
        config = LoadConfig(duration=600, settle=1, writers=8, readers=1, progress=False)
        async with anyio.create_task_group() as tg:
            results: list[StrategyResult] = []

            async def load() -> None:
                results.extend(await run_compare(config, ["cas", "naive"], tmp_path))

            tg.start_soon(load)
            history = tmp_path / "cas" / "embedded.jsonl"
            with anyio.fail_after(30):
                # the writers' first flushed events: a file condition, polled under a deadline
                while not (history.exists() and history.stat().st_size > 0):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            os.kill(os.getpid(), signum)
        return results

    results = anyio.run(main)
    assert [r.strategy for r in results] == ["cas"]
    assert results[0].updates > 0
    assert results[0].check.torn == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--redis", "redis://127.0.0.1:6379/0"], "--redis and --postgres go together"),
        (["--writers", "0"], "argument --writers: must be 1 or more"),
        (["--duration", "0"], "argument --duration: must be a positive number of seconds"),
        (["--rounds", "0"], "argument --rounds: must be 1 or more"),
        (
            ["--min-rebuild-interval", "-0.1"],
            "argument --min-rebuild-interval: must be 0 or a positive number",
        ),
        (["--latency", "0.2", "0.1"], "--latency MIN MAX: MIN (0.2) must not exceed MAX (0.1)"),
        (["--graph", "shop.toml"], "--graph runs on the real servers only"),
        (  # the spec file is read before any server is contacted (these two are not even there)
            [
                "--graph",
                "/nonexistent/shop.toml",
                "--redis",
                "redis://127.0.0.1:1/0",
                "--postgres",
                "postgresql://u@127.0.0.1:1/x",
            ],
            "graph spec /nonexistent/shop.toml: cannot read it",
        ),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Inconsistent flags exit 2 with one line on stderr naming the flag, and write nothing."""
    code = loadtest([*argv, "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("graphcache loadtest: ")
    assert message in captured.err
    assert captured.err.count("\n") == 1
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_simulate_ring_runs_the_ring_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """--simulate-ring hands the node counts and seed to the ring simulation instead of running load."""
    calls: list[list[str]] = []
    monkeypatch.setattr(_loadtest, "simulate_main", lambda argv: calls.append(argv) or 0)
    assert loadtest(["--simulate-ring", "3, 10", "--seed", "5"]) == 0
    assert calls == [["--nodes", "3,10", "--roots", "20000", "--seed", "5"]]


def test_simulate_ring_refuses_a_bad_list(capsys: pytest.CaptureFixture[str]) -> None:
    """A node list that is not integers >= 2 exits 2 with the reason."""
    assert loadtest(["--simulate-ring", "3,x"]) == 2
    assert "argument --simulate-ring: want a comma list of node counts" in capsys.readouterr().err


METRICS_PAGE = "\n".join(
    [
        "# HELP graphcache_rebuilds_total Rebuilds.",
        "# TYPE graphcache_rebuilds_total counter",
        'graphcache_rebuilds_total{node="node-0"} 736.0',
        'graphcache_rebuild_failures_total{node="node-0"} 9.0',
        "# HELP graphcache_puts_total Versioned puts by result.",
        "# TYPE graphcache_puts_total counter",
        'graphcache_puts_total{node="node-0",result="stored"} 586.0',
        'graphcache_puts_total{node="node-0",result="refused"} 150.0',
        'graphcache_snapshot_loads_total{node="node-0"} 120.0',
        'graphcache_patched_rebuilds_total{node="node-0"} 616.0',
        'graphcache_read_loads_total{node="node-0"} 4.0',
        'graphcache_rebuild_seconds_count{node="node-0"} 736.0',
        'graphcache_members{node="node-0"} 2.0',
        "",
    ]
)


def test_sidecar_counts_are_read_from_prometheus_text() -> None:
    """Rebuilds, puts and refused puts come from the sidecar's /metrics families, summed over label sets;
    loads are the snapshot loads plus the read-through loads, each of which also puts once."""
    tally = tally_from_metrics(METRICS_PAGE)
    assert (tally.rebuilds, tally.puts, tally.refused, tally.updates) == (736, 740, 150, 0)
    assert tally.loads == 124


class _MetricsPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = METRICS_PAGE.encode() if self.path == "/metrics" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_sidecar_page_is_fetched_with_a_plain_http_get() -> None:
    """scrape() GETs the metrics URL of the sidecar's ready line and returns the page as text."""
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetricsPage) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            port = server.server_address[1]
            node = SimpleNamespace(
                name="node-0", ready_line=f"graphcache node n ready http://127.0.0.1:{port}"
            )
            page = anyio.run(scrape, node)
        finally:
            server.shutdown()
    assert tally_from_metrics(page).rebuilds == 736


def test_report_json_never_holds_a_password(tmp_path: Path) -> None:
    """report.json keeps the server addresses but replaces a URL's password with ***."""
    config = LoadConfig(
        redis="redis://user:s3cret@127.0.0.1:6379/0",
        postgres="postgresql://postgres:hunter2@127.0.0.1:5432/postgres",
    )
    _loadtest._write_reports(tmp_path, config, [])  # the report of a run interrupted before any result
    text = (tmp_path / "report.json").read_text()
    assert "s3cret" not in text
    assert "hunter2" not in text
    shown = json.loads(text)["config"]
    assert shown["redis"] == "redis://user:***@127.0.0.1:6379/0"
    assert shown["postgres"] == "postgresql://postgres:***@127.0.0.1:5432/postgres"


def test_strategy_list_with_rounds_runs_those_round_robin_and_summarizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--strategy none,cas --rounds 2`` runs none, cas, none, cas, and adds a table of medians."""
    assert loadtest(["--strategy", "none,cas", "--rounds", "2", *SMOKE, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "report.json").read_bytes())
    assert [row["strategy"] for row in payload["results"]] == ["none", "cas", "none", "cas"]
    assert [(row["strategy"], row["runs"]) for row in payload["summary"]] == [("none", 2), ("cas", 2)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["cas-1", "cas-2", "none-1", "none-2"]
    assert "medians over 2 rounds" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["cas,bogus", "cas,cas", ""])
def test_strategy_list_refuses_unknown_or_repeated_names(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown or repeated strategy name is a usage error (exit 2) that lists the known names."""
    assert loadtest(["--strategy", value]) == 2
    assert "actor, cas, naive, checkset, lock, none" in capsys.readouterr().err


def test_min_rebuild_interval_reaches_the_config() -> None:
    """--min-rebuild-interval is the actor nodes' pacing in the run's config (and the sidecars' flag)."""
    parser = argparse.ArgumentParser()
    _loadtest.add_arguments(parser)
    args = ["--min-rebuild-interval", "0.25", "--feed-interval", "0.02"]
    config = _loadtest.config_from_args(parser.parse_args(args))
    assert (config.min_rebuild_interval, config.feed_interval) == (0.25, 0.02)
    env = Env(config, store=None, cache=None, namespace="ns", schema="sc")  # type: ignore[arg-type]
    argv = serve_argv(env, "node-0")
    assert argv[argv.index("--min-rebuild-interval") + 1] == "0.25"
    assert argv[argv.index("--feed-interval") + 1] == "0.02"


def test_out_defaults_to_a_new_folder_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --out the run writes to a new ./loadtest-YYYYmmdd-HHMMSS and prints that path last."""
    monkeypatch.chdir(tmp_path)
    assert loadtest(["--strategy", "none", "--duration", "0.3", "--settle", "0.5", "--no-progress"]) == 0
    (out,) = tmp_path.iterdir()
    assert re.fullmatch(r"loadtest-\d{8}-\d{6}", out.name)
    assert {"report.json", "report.png", "none"} <= {p.name for p in out.iterdir()}
    assert capsys.readouterr().out.splitlines()[-1] == f"histories, report.json and report.png in {out}"


def test_a_slow_rate_does_not_stretch_the_run_past_its_duration(tmp_path: Path) -> None:
    """At one update per 100 s a writer's pause outlasts the run; the stop ends it, not the pause."""
    started = time.monotonic()
    argv = ["--strategy", "cas", "--rate", "0.01", "--read-rate", "0.01", "--duration", "0.5"]
    assert loadtest([*argv, "--settle", "0.5", "--no-progress", "--out", str(tmp_path)]) == 0
    assert time.monotonic() - started < 30  # the pauses alone would take 100 s


def test_a_new_out_folder_never_reuses_an_existing_one(tmp_path: Path) -> None:
    """Two runs started in the same second get two folders (the second one suffixed)."""
    first, second = fresh_out_directory(tmp_path), fresh_out_directory(tmp_path)
    assert first != second
    assert first.is_dir()
    assert second.is_dir()


def test_nothing_is_run_or_written_when_a_server_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreachable Redis is one line naming --redis, exit 1, before the out folder is made."""
    monkeypatch.chdir(tmp_path)
    argv = ["--redis", "redis://127.0.0.1:1/0", "--postgres", "postgresql://postgres@127.0.0.1:1/postgres"]
    assert loadtest(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("graphcache loadtest: cannot reach Redis (--redis redis://127.0.0.1:1/0)")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


SHOP = GraphWorkload(
    path="shop.toml",
    spec=GraphSpec.loads('[graph]\nroot = "orders"\n[tables.orders]\nkey = "id"\n'),
    roots=("1", "2"),
    tables=(WritableTable("orders", "id", "int8", (WritableColumn("customer", "text"),)),),
)


def test_graph_writes_go_ahead_with_yes_or_a_typed_yes() -> None:
    """--yes, or "yes" typed at a terminal, lets a --graph run write; anything else stops it, exit 2."""
    dsn = "postgresql://team:secret@staging/shop"
    confirm(dsn, SHOP, yes=True, interactive=lambda: pytest.fail("asked despite --yes"))
    confirm(dsn, SHOP, yes=False, interactive=lambda: True, ask=lambda prompt: "yes\n")
    with pytest.raises(UsageError, match="not confirmed: nothing was written"):
        confirm(dsn, SHOP, yes=False, interactive=lambda: True, ask=lambda prompt: "y")
    with pytest.raises(UsageError) as refused:
        confirm(dsn, SHOP, yes=False, interactive=lambda: False)
    message = str(refused.value)
    assert "public.orders (customer)" in message
    assert "2 sampled roots" in message
    assert message.endswith("add --yes to go ahead")
    assert "secret" not in message


@pytest.mark.parametrize(
    ("type_name", "typmod", "fits"),
    [
        ("varchar", 3 + 4, lambda v: isinstance(v, str) and 0 < len(v) <= 3),
        ("text", -1, lambda v: v == "w7.123"),
        ("numeric", ((4 << 16) | 2) + 4, lambda v: 0 <= v < 100 and v == round(v, 2)),
        ("numeric", ((3 << 16) | 3) + 4, lambda v: 0 <= v < 1),
        ("int2", -1, lambda v: -(2**15) <= v < 2**15),
        ("jsonb", -1, lambda v: v == {"writer": 7, "seq": 123}),
    ],
)
def test_graph_writers_make_values_that_fit_the_column(
    type_name: str, typmod: int, fits: Callable[[Any], bool]
) -> None:
    """A new value respects its column's length or precision, so no update is refused for its size."""
    rng = random.Random(1)
    for _ in range(200):
        assert fits(new_value(WritableColumn("c", type_name, typmod), rng, 7, 123))


def test_a_child_whose_output_is_no_longer_read_is_still_stopped_by_sigterm(tmp_path: Path) -> None:
    """After the parent stops reading a child's output (its pump task cancelled, as when a fleet of
    sidecars is torn down), stop() still sends SIGTERM, rather than waiting out the grace period for a
    SIGKILL: the child ends through its own handler."""
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
        "print('ready', flush=True)\n"
        "signal.pause()\n"
    )

    async def main() -> int | None:
        child = await spawn("child", [sys.executable, "-c", script], log=tmp_path / "child.log")
        async with anyio.create_task_group() as tg:
            tg.start_soon(child.pump)
            with anyio.fail_after(30):
                await child.ready.wait()
            tg.cancel_scope.cancel()
        await child.stop(grace=60)
        return child.returncode

    assert anyio.run(main) == 3
