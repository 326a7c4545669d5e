"""See the race, then see it gone: a naive re-cache and graphcache on the same workload, side by side.

Dozens of concurrent writers update a few hot roots while readers sample the cache. First every writer
re-caches the naive way (read the version, read the children, set the pair); then graphcache's nodes
rebuild from the change feed instead. The consistency checker counts what the readers saw.
Embedded by default (no servers); ``--redis URL --postgres DSN`` runs the same on real servers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anyio
import msgspec

from .._cli import CommandError, UsageError, count, postgres_dsn, redis_url, seconds
from ._loadtest import LoadConfig, run_compare
from ._lt_fleet import need_sidecars_installed
from ._report import StrategyResult
from ._servers import reach

__all__ = ("DemoColumn", "DemoResult", "add_arguments", "demo_config", "format_demo", "run", "run_demo")

STRATEGIES = ("naive", "actor")
"""The demo's two columns: the naive re-cache, then graphcache."""


class DemoColumn(msgspec.Struct, frozen=True):
    """What one strategy did and what the readers saw."""

    strategy: str
    updates: int
    loads: int
    puts: int
    regressions: int
    torn: int
    stale: int
    reads: int

    @classmethod
    def from_result(cls, result: StrategyResult) -> DemoColumn:
        report = result.check
        return cls(
            strategy=result.strategy,
            updates=result.updates,
            loads=result.rebuilds if result.loads is None else result.loads,
            puts=result.rebuilds if result.puts is None else result.puts,
            regressions=report.regressions,
            torn=report.torn,
            stale=report.stale,
            reads=report.reads,
        )


class DemoResult(msgspec.Struct, frozen=True):
    naive: DemoColumn
    graphcache: DemoColumn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=seconds, default=5.0, help="seconds of writes per column (default 5)"
    )
    parser.add_argument("--writers", type=count, default=48, help="concurrent writer tasks (default 48)")
    parser.add_argument("--roots", type=count, default=4, help="hot roots they all update (default 4)")
    parser.add_argument("--nodes", type=count, default=3, help="graphcache nodes (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument(
        "--redis", type=redis_url, metavar="URL", help="real Redis (with --postgres); default: embedded"
    )
    parser.add_argument("--postgres", type=postgres_dsn, metavar="DSN", help="real PostgreSQL (with --redis)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo_config(args: argparse.Namespace) -> LoadConfig:
    """The demo's workload: uniform over a few hot roots, readers sampling all the time."""
    if (args.redis is None) != (args.postgres is None):
        raise UsageError("--redis and --postgres go together (or neither, for the embedded demo)")
    return LoadConfig(
        roots=args.roots, dist="uniform", writers=args.writers, writer_procs=2, readers=8, reader_procs=1,
        read_rate=200.0, load_latency=0.01, duration=args.duration, settle=3.0, seed=args.seed,
        nodes=args.nodes, redis=args.redis, postgres=args.postgres, progress=not args.no_progress,
    )  # fmt: skip


async def run_demo(config: LoadConfig, out: Path) -> DemoResult | None:
    """Both columns on the same workload and seed (histories go to ``out``); None if interrupted early."""
    results = await run_compare(config, STRATEGIES, out)
    if len(results) < len(STRATEGIES):
        return None
    naive, actor = results
    return DemoResult(naive=DemoColumn.from_result(naive), graphcache=DemoColumn.from_result(actor))


_ROWS = (
    ("updates committed", "updates"),
    ("store snapshot loads for the cache", "loads"),
    ("cache puts", "puts"),
    ("regressions seen by readers (G1)", "regressions"),
    ("torn graphs seen by readers (G2)", "torn"),
    ("roots stale at the end (G3)", "stale"),
    ("cache reads checked", "reads"),
)


def format_demo(result: DemoResult) -> str:
    """The side-by-side table and what it means."""
    label_width = max(len(label) for label, _ in _ROWS)
    lines = [f"{'':{label_width}}  {'naive':>12}  {'graphcache':>12}"]
    for label, field in _ROWS:
        naive, ours = getattr(result.naive, field), getattr(result.graphcache, field)
        lines.append(f"{label:{label_width}}  {naive:>12,}  {ours:>12,}")
    lines += ["", *_verdict(result)]
    return "\n".join(lines)


def _verdict(result: DemoResult) -> list[str]:
    naive, ours = result.naive, result.graphcache
    said = []
    if naive.regressions or naive.torn:
        said.append(
            f"naive: readers saw {naive.regressions:,} version regressions and {naive.torn:,} torn graphs "
            "(a graph stamped with a version it never had at that version)."
        )
    else:
        said.append("naive: no race caught this time; try --writers 64 or --duration 10.")
    if ours.regressions == ours.torn == ours.stale == 0:
        said.append(
            f"graphcache: no regression, no torn graph, converged; {ours.puts:,} puts and "
            f"{ours.loads:,} snapshot loads for {ours.updates:,} updates (each actor patches the graph it "
            "keeps from the feed's row images; changes arriving during a put share the next one)."
        )
    else:
        said.append(
            "graphcache: VIOLATIONS FOUND; please report this run (loadtest --out DIR keeps histories)."
        )
    return said


def run(args: argparse.Namespace) -> int:
    """``graphcache demo``: 0 when graphcache kept its guarantees; 1 if not, or a server was unreachable or
    failed (nothing of the run is left on it); 2 on bad flags."""
    config = demo_config(args)
    if config.redis is not None and config.postgres is not None:
        need_sidecars_installed(STRATEGIES)
        anyio.run(reach, config.redis, config.postgres)
    with tempfile.TemporaryDirectory(prefix="graphcache-demo-") as out:
        result = anyio.run(run_demo, config, Path(out))
    if result is None:
        raise CommandError("interrupted before both columns ran")
    print(format_demo(result))
    ours = result.graphcache
    return 0 if ours.regressions == ours.torn == ours.stale == 0 else 1
