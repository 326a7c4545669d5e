"""The demo shows the naive race happen and graphcache not have it, side by side."""

from __future__ import annotations

import argparse

import anyio
import pytest

from graphcache import _cli
from graphcache.harness import _demo
from graphcache.harness._demo import DemoColumn, DemoResult, format_demo, run_demo


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _demo.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    """One short embedded demo (both columns), shared by the tests below."""
    config = _demo.demo_config(demo_args("--duration", "1.5", "--no-progress"))
    result = anyio.run(run_demo, config, tmp_path_factory.mktemp("demo"))
    assert result is not None
    return result


def test_naive_column_shows_the_race(demo_result: DemoResult) -> None:
    """Readers of the naive re-cache see regressions or torn graphs."""
    naive = demo_result.naive
    assert naive.strategy == "naive"
    assert naive.regressions + naive.torn > 0


def test_graphcache_column_is_clean_and_coalesces(demo_result: DemoResult) -> None:
    """graphcache: zero regressions, torn graphs and stale roots; puts never exceed updates, and snapshot
    loads are far fewer (the actors patch from the feed's row images)."""
    ours = demo_result.graphcache
    assert ours.strategy == "actor"
    assert (ours.regressions, ours.torn, ours.stale) == (0, 0, 0)
    assert ours.reads > 0
    assert 0 < ours.puts <= ours.updates + ours.loads  # read-throughs: one load and one put each
    assert 0 < ours.loads < ours.updates / 10


def test_table_puts_both_columns_side_by_side(demo_result: DemoResult) -> None:
    """The printed table has both headers and each row shows the naive then the graphcache figure."""
    text = format_demo(demo_result)
    header, *rows = text.splitlines()
    assert header.split() == ["naive", "graphcache"]
    torn_row = next(row for row in rows if row.startswith("torn graphs"))
    assert torn_row.split()[-2:] == [f"{demo_result.naive.torn:,}", "0"]


def test_verdict_names_a_violation_when_there_is_one() -> None:
    """If graphcache ever showed a violation, the demo would say so instead of claiming success."""
    bad = DemoColumn("actor", updates=10, loads=1, puts=5, regressions=1, torn=0, stale=0, reads=10)
    good_naive = DemoColumn("naive", updates=10, loads=10, puts=10, regressions=0, torn=3, stale=0, reads=10)
    text = format_demo(DemoResult(naive=good_naive, graphcache=bad))
    assert "VIOLATIONS FOUND" in text
    assert "no regression" not in text


def test_cli_prints_both_columns(capsys: pytest.CaptureFixture[str]) -> None:
    """``graphcache demo`` exits 0 and prints the side-by-side table."""
    code = _cli.main(["demo", "--duration", "1", "--writers", "24", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].split() == ["naive", "graphcache"]
    assert "regressions seen by readers (G1)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--postgres", "postgresql://x"], "graphcache demo: --redis and --postgres go together"),
        (["--duration", "-1"], "graphcache demo: argument --duration: must be a positive number of seconds"),
        (["--writers", "0"], "graphcache demo: argument --writers: must be 1 or more"),
        (["--redis", "memcached://x", "--postgres", "postgresql://x"], "graphcache demo: argument --redis:"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad flag, or half a server pair, is one line on stderr and exit 2 before anything runs."""
    assert _cli.main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message)
    assert captured.err.count("\n") == 1
    assert captured.out == ""


def test_unreachable_servers_exit_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """With Redis down the real-server demo is one line naming --redis and exit 1, before any column."""
    argv = ["--redis", "redis://127.0.0.1:1/0", "--postgres", "postgresql://postgres@127.0.0.1:1/postgres"]
    assert _cli.main(["demo", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("graphcache demo: cannot reach Redis (--redis redis://127.0.0.1:1/0)")
    assert err.count("\n") == 1
