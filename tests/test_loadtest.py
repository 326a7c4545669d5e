"""The load generator on the memory backends: every strategy runs, is checked, and is reported."""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import anyio
import msgspec
import pytest

from graphcache.harness import StrategyResult, _loadtest, read_history
from graphcache.harness._loadtest import LoadConfig, _tally_from_metrics, run_compare
from graphcache.harness._strategies import NAMES


def loadtest(argv: list[str]) -> int:
    """``run.py loadtest ARGV`` (the same add_arguments/run pair run.py wires up)."""
    parser = argparse.ArgumentParser()
    _loadtest.add_arguments(parser)
    return _loadtest.run(parser.parse_args(argv))


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
    """Each strategy keeps its histories (writes, reads, final versions); report.png is a PNG."""
    out = compare_run[1]
    assert (out / "report.png").read_bytes().startswith(PNG_SIGNATURE)
    for name in NAMES:
        events = read_history(*sorted((out / name).glob("*.jsonl")))
        ops = {(e.op, e.type) for e in events}
        assert {("create", "ok"), ("write", "ok"), ("read", "ok"), ("final", "ok")} <= ops


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


def test_ctrl_c_stops_with_a_partial_report(tmp_path: Path) -> None:
    """SIGINT during the first strategy ends it, skips the rest, and still returns its checked result."""

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
            os.kill(os.getpid(), signal.SIGINT)
        return results

    results = anyio.run(main)
    assert [r.strategy for r in results] == ["cas"]
    assert results[0].updates > 0
    assert results[0].check.torn == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--redis", "redis://127.0.0.1:6379/0"], "--redis and --postgres go together"),
        (["--writers", "0"], "--writers must be positive"),
        (["--duration", "0"], "--duration must be > 0"),
        (["--rounds", "0"], "--rounds must be positive"),
        (["--min-rebuild-interval", "-0.1"], "--min-rebuild-interval and latencies must be >= 0"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Inconsistent flags exit 2 with a specific message and write nothing."""
    code = loadtest([*argv, "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().out
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
    assert "comma list of node counts" in capsys.readouterr().out


def test_sidecar_counts_are_read_from_prometheus_text() -> None:
    """Rebuilds and refused puts come from the sidecar's /metrics families, summed over label sets."""
    page = "\n".join(
        [
            "HTTP/1.1 200 OK",
            "",
            "# HELP graphcache_rebuilds_total Rebuilds.",
            'graphcache_rebuilds_total{node="node-0"} 736.0',
            'graphcache_rebuild_failures_total{node="node-0"} 9.0',
            'graphcache_puts_total{node="node-0",result="stored"} 586.0',
            'graphcache_puts_total{node="node-0",result="refused"} 150.0',
            'graphcache_rebuild_seconds_count{node="node-0"} 736.0',
        ]
    )
    tally = _tally_from_metrics(page)
    assert (tally.rebuilds, tally.refused, tally.updates) == (736, 150, 0)


def test_report_json_never_holds_a_password(tmp_path: Path) -> None:
    """report.json keeps the server addresses but replaces a URL's password with ***."""
    config = LoadConfig(
        redis="redis://user:s3cret@127.0.0.1:6379/0",
        postgres="postgresql://postgres:hunter2@127.0.0.1:5432/postgres",
    )
    _loadtest._write_reports(tmp_path, config, [])
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
    with pytest.raises(SystemExit) as exited:
        loadtest(["--strategy", value])
    assert exited.value.code == 2
    assert "actor, cas, naive, checkset, lock, none" in capsys.readouterr().err


def test_min_rebuild_interval_reaches_the_config() -> None:
    """--min-rebuild-interval is the actor nodes' pacing in the run's config (and the sidecars' flag)."""
    parser = argparse.ArgumentParser()
    _loadtest.add_arguments(parser)
    config = _loadtest.config_from_args(parser.parse_args(["--min-rebuild-interval", "0.25"]))
    assert config.min_rebuild_interval == 0.25
    env = _loadtest._Env(config, store=None, cache=None, namespace="ns", schema="sc")  # type: ignore[arg-type]
    argv = _loadtest._serve_argv(env, "node-0")
    assert argv[argv.index("--min-rebuild-interval") + 1] == "0.25"
