"""Load test: one workload through each re-cache strategy, every operation recorded, then checked.

Embedded (default): a MemoryStore with simulated I/O latency and a MemoryCache, writers, readers and (for
the actor strategy) Nodes as tasks of this one process. Real servers (``--redis URL --postgres DSN``):
writer and reader processes (``python -m graphcache.harness._procs``) and, for the actor strategy,
``python -m graphcache serve`` node processes, each strategy in a fresh Redis namespace and PostgreSQL
schema, removed afterwards however the run ends. The actor load starts once every sidecar sees all
members and their hand-off window has passed.

After the writers stop, the run settles: it records each root's committed version (``final``), waits until
the cache shows it (or ``--settle`` seconds pass), then records one last read per root. The checker then
judges the merged histories: G1 regressions, G2 torn graphs, G3 stale roots, and two lags: the
visibility lag (commit to the first put of it or newer the cache acknowledged: writers record their puts,
nodes theirs through ``Node(on_stored=...)`` or ``serve --record-puts``) and the read lag (commit to the
first read that saw it). Costs per update: store snapshot loads and cache puts.
Histories, report.json and report.png go to --out (default: a new ./loadtest-YYYYmmdd-HHMMSS).
Ctrl-C (or SIGTERM) stops the run cleanly and reports what was measured so far.

Your own tables (``--graph SPEC``, real servers only): the graph is the one a graph spec describes, in
tables that must already exist, and the writers UPDATE them with plain SQL, as your service would. The
run samples --roots root keys from the root table; each write sets one column of one row of a sampled
root (never a key or parent_key column, nor one under a constraint or unique index) to a new value, or
is a no-op update (SET key = key) where a table has no such column. Each strategy installs the spec's
change tracking (triggers on the tables) into its own fresh store schema and drops that schema, and the
triggers with it, afterwards. THE RUN WRITES TO YOUR TABLES: no table, column or row is created or
deleted, but every updated value stays as the last write left it (it is not restored). Point it at a
staging copy. It lists what it will write and asks first; --yes skips the question (needed without a
terminal).

Exit status: 0 when graphcache (``actor``) kept G1-G3 (or did not run); 1 if it violated one, or a server
was unreachable or failed; 2 on bad flags (with --graph also: a spec that does not fit the database, an
empty root table, or writes not confirmed).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import resource
import signal
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from .._cli import (
    count,
    count_or_zero,
    new_directory,
    number_or_zero,
    postgres_dsn,
    redis_url,
    seconds,
    seconds_or_zero,
)
from ..actors import DEFAULT_MIN_REBUILD_INTERVAL
from ._checker import check_with_all_lags
from ._history import Event, HistoryWriter, read_history
from ._lt_backends import Env, environment
from ._lt_config import (
    DEFAULT_FEED_INTERVAL,
    MAX_ZIPF_S,
    LoadConfig,
    config_from_args,
    fresh_out_directory,
    ring_sizes,
    shown,
    strategy_list,
    zipf_exponent,
)
from ._lt_fleet import need_sidecars_installed, node_fleet
from ._lt_fleet import share as _share  # noqa: F401  (tests/test_strategies.py still imports it from here)
from ._lt_graph import PLAN_FILE, confirm, prepare, seed_roots, writer_pool
from ._lt_load import load
from ._lt_settle import settle
from ._report import (
    StrategyResult,
    format_summary,
    format_table,
    representative,
    summarize,
    write_chart,
    write_json,
)
from ._servers import reach
from ._simulate import main as simulate_main
from ._strategies import NAMES
from ._workload import DEFAULT_CHILDREN, Stopper, create_roots, root_ids

__all__ = ("LoadConfig", "add_arguments", "run", "run_compare", "run_strategy")

MAX_LAGS_KEPT = 20_000
"""Lags kept per strategy for the chart and the JSON report (a seeded sample beyond this)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--strategy", type=strategy_list, default=("actor",), metavar="NAME[,NAME...]",
        help=f"strategies to run, in this order ({', '.join(NAMES)}; default: actor)",
    )  # fmt: skip
    what.add_argument(
        "--compare", action="store_true", help="every strategy, one after another, same workload"
    )
    what.add_argument(
        "--rounds", type=count, default=1, metavar="N",
        help="run the strategies round-robin N times and add a table of medians (a noisy machine's "
        "single run can mislead; default 1)",
    )  # fmt: skip
    what.add_argument(
        "--simulate-ring", type=ring_sizes, metavar="NODES",
        help="print the ring simulation for NODES (e.g. 3,10,100) instead of running load",
    )  # fmt: skip
    load = parser.add_argument_group("workload")
    load.add_argument("--roots", type=count, default=8, help="number of roots (default 8)")
    load.add_argument(
        "--children", type=count, default=DEFAULT_CHILDREN,
        help=f"children per root graph; each write rewrites one (default {DEFAULT_CHILDREN}; with --graph "
        "the tables' own rows are the graph)",
    )  # fmt: skip
    load.add_argument(
        "--dist", choices=("uniform", "zipf"), default="zipf", help="root popularity (default zipf)"
    )
    load.add_argument(
        "--zipf-s", type=zipf_exponent, default=1.1, help=f"zipf exponent, up to {MAX_ZIPF_S:g} (default 1.1)"
    )
    load.add_argument("--writers", type=count, default=64, help="writer tasks in total (default 64)")
    load.add_argument(
        "--writer-procs", type=count, default=2, help="writer processes, real servers (default 2)"
    )
    load.add_argument("--readers", type=count_or_zero, default=8, help="reader tasks in total (default 8)")
    load.add_argument(
        "--reader-procs", type=count, default=1, help="reader processes, real servers (default 1)"
    )
    load.add_argument(
        "--read-rate", type=number_or_zero, default=50.0,
        help="reads/s per reader task (default 50; 0: as fast as possible)",
    )  # fmt: skip
    load.add_argument(
        "--rate", type=number_or_zero, default=0.0,
        help="updates/s per writer task (default 0: as fast as possible)",
    )  # fmt: skip
    load.add_argument(
        "--duration", type=seconds, default=10.0, help="seconds of writes per strategy (default 10)"
    )
    load.add_argument(
        "--settle", type=seconds_or_zero, default=10.0,
        help="max seconds to wait for convergence (default 10)",
    )  # fmt: skip
    load.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    load.add_argument(
        "--nodes", type=count, default=2, help="graphcache nodes for the actor strategy (default 2)"
    )
    load.add_argument(
        "--min-rebuild-interval", type=seconds_or_zero, default=DEFAULT_MIN_REBUILD_INTERVAL,
        metavar="SECONDS",
        help="actor: seconds between the starts of two snapshot loads of one root, the nodes' pacing "
        f"(default {DEFAULT_MIN_REBUILD_INTERVAL}; 0: none)",
    )  # fmt: skip
    load.add_argument(
        "--feed-interval", type=seconds_or_zero, default=DEFAULT_FEED_INTERVAL, metavar="SECONDS",
        help="actor on real servers: seconds between two reads of each sidecar's change feed "
        f"(serve --feed-interval; default {DEFAULT_FEED_INTERVAL})",
    )  # fmt: skip
    load.add_argument(
        "--latency", type=seconds_or_zero, nargs=2, default=(0.0005, 0.002), metavar=("MIN", "MAX"),
        help="embedded store's simulated I/O latency in seconds (default 0.0005 0.002)",
    )  # fmt: skip
    load.add_argument(
        "--load-latency", type=seconds_or_zero, default=0.005, metavar="SECONDS",
        help="embedded store: extra seconds per whole-graph load, which costs more than a one-row write "
        "(default 0.005)",
    )  # fmt: skip
    where = parser.add_argument_group("where")
    where.add_argument(
        "--redis", type=redis_url, metavar="URL", help="real Redis (with --postgres); default: embedded"
    )
    where.add_argument("--postgres", type=postgres_dsn, metavar="DSN", help="real PostgreSQL (with --redis)")
    where.add_argument(
        "--out", type=new_directory, metavar="DIR",
        help="write histories, report.json and report.png here (default: a new ./loadtest-YYYYmmdd-HHMMSS)",
    )  # fmt: skip
    where.add_argument("--no-progress", action="store_true", help="no progress bar")
    own = parser.add_argument_group("your own tables (real servers only; WRITES TO THEM, see above)")
    own.add_argument(
        "--graph", metavar="SPEC",
        help="load-test the graph that the graph spec SPEC (TOML) describes, in its existing tables: "
        "writers UPDATE their rows with plain SQL and the new values stay (meant for a staging copy; "
        "needs --redis and --postgres)",
    )  # fmt: skip
    own.add_argument(
        "--yes", action="store_true",
        help="with --graph: go ahead without asking (needed when stdin is not a terminal)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``graphcache loadtest``: 0 when graphcache (actor) kept G1-G3, 1 if not or a server failed."""
    if args.simulate_ring is not None:
        # 20,000 roots keep it to seconds; ``python -m graphcache.harness._simulate --help`` has every knob.
        sizes = ",".join(map(str, args.simulate_ring))
        return simulate_main(["--nodes", sizes, "--roots", "20000", "--seed", str(args.seed)])
    config = config_from_args(args)
    names: Sequence[str] = NAMES if args.compare else args.strategy
    if not config.embedded:
        need_sidecars_installed(names)
        anyio.run(reach, config.redis, config.postgres)
    if config.graph is not None:
        config = _prepared(config, yes=args.yes)
    out = args.out or fresh_out_directory(Path.cwd())
    try:
        results = anyio.run(run_compare, config, names, out)
    except Exception as exc:
        exc.add_note(f"logs and histories so far in {out}")
        raise
    print(format_table(results))
    if config.rounds > 1:
        print(f"\nmedians over {config.rounds} rounds (ratios are of the medians):")
        print(format_summary(results))
    _write_reports(out, config, results)
    print(f"histories, report.json{_chart_name()} in {out}")
    return 0 if all(_kept_guarantees(r) for r in results if r.strategy == "actor") else 1


def _prepared(config: LoadConfig, *, yes: bool) -> LoadConfig:
    """--graph: the spec checked against the database, the roots sampled, the writes confirmed."""
    assert config.graph is not None
    assert config.postgres is not None
    workload = anyio.run(prepare, config.postgres, config.graph, config.roots, config.seed)
    confirm(config.postgres, workload, yes=yes)
    return msgspec.structs.replace(config, graph=workload, roots=len(workload.roots))


def _chart_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _chart_name() -> str:
    return " and report.png" if _chart_available() else " (no report.png: pip install 'graphcache-pg[chart]')"


def _kept_guarantees(result: StrategyResult) -> bool:
    report = result.check
    return report.regressions == 0 and report.torn == 0 and report.stale == 0


def _write_reports(out: Path, config: LoadConfig, results: Sequence[StrategyResult]) -> None:
    write_json(
        out / "report.json",
        {"config": shown(config), "results": list(results), "summary": summarize(results)},
    )
    if _chart_available():
        write_chart(out / "report.png", representative(results))  # each strategy's median round


async def run_compare(
    config: LoadConfig, names: Sequence[str], out: Path, *, interrupt: Stopper | None = None
) -> list[StrategyResult]:
    """Each named strategy in turn on the same workload, ``config.rounds`` times round-robin (so a slow
    spell of the machine hits every strategy alike); Ctrl-C ends the current one, skips the rest."""
    interrupt = interrupt or Stopper()
    results: list[StrategyResult] = []
    async with anyio.create_task_group() as tg:
        await tg.start(_watch_interrupt, interrupt)
        for round_number in range(1, config.rounds + 1):
            for name in names:
                if interrupt.stopped:
                    break
                where = out / name if config.rounds == 1 else out / f"{name}-{round_number}"
                results.append(await run_strategy(config, name, where, interrupt=interrupt))
        tg.cancel_scope.cancel()
    return results


async def _watch_interrupt(
    interrupt: Stopper, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    # SIGTERM too (a CI job's timeout, a supervisor): a killed run would leave its schema and keys behind.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            print("\ninterrupted: stopping the writers, then settling and reporting what was measured")
            interrupt.stop()


async def run_strategy(
    config: LoadConfig, name: str, out: Path, *, interrupt: Stopper | None = None
) -> StrategyResult:
    """One strategy, start to finish: fresh backends, roots, load, settle, check."""
    interrupt = interrupt or Stopper()
    _fresh_directory(out)
    roots = root_ids(config.roots) if config.graph is None else list(config.graph.roots)
    async with environment(config) as env:
        with HistoryWriter(out / "main.jsonl") as main:
            await _create(env, roots, main, out)
            cpu_before = _cpu_seconds()  # from here: nodes, load, settle (not creating the roots)
            async with node_fleet(env, name, out) as node_tally:
                tally, seconds = await load(env, name, out, interrupt)
                await settle(env.store, env.cache, roots, main, patience=config.settle)
                tally.add(await node_tally())
    cpu = _cpu_seconds() - cpu_before
    report, lags = check_with_all_lags(_histories(out))
    updates = max(tally.updates, 1)
    return StrategyResult(
        strategy=name,
        updates=tally.updates,
        seconds=seconds,
        updates_per_s=tally.updates / seconds if seconds > 0 else 0.0,
        rebuilds=tally.rebuilds,
        rebuilds_per_update=tally.rebuilds / updates,
        puts_refused=tally.refused,
        cpu_s_per_1000=cpu / updates * 1000,
        check=report,
        lags=_sample(lags.read, config.seed),
        puts=tally.puts,
        loads=tally.loads,
        loads_per_update=tally.loads / updates,
        puts_per_update=tally.puts / updates,
        visibility_lags=_sample(lags.visibility, config.seed),
    )


async def _create(env: Env, roots: list[str], history: HistoryWriter, out: Path) -> None:
    """Each root's first version (recorded as its create): built-in roots with their children, or, with
    --graph, a no-op update of each sampled root's row, which also lists its rows for the writers."""
    config = env.config
    if config.graph is None:
        await create_roots(env.store, roots, history, children=config.children)
        return
    assert config.postgres is not None
    async with writer_pool(config.postgres) as pool:
        await seed_roots(pool, env.store, config.graph, history, out / PLAN_FILE)


def _histories(out: Path) -> list[Event]:
    """Every process's history of one strategy run. Read synchronously: every task of the run is over."""
    return read_history(*sorted(out.glob("*.jsonl")))


def _fresh_directory(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.jsonl", "*.log", "*.metrics.txt"):
        for stale in out.glob(pattern):
            stale.unlink()


def _cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (node, writer, reader processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sample(lags: list[float], seed: int) -> list[float]:
    if len(lags) <= MAX_LAGS_KEPT:
        return lags
    return random.Random(seed).sample(lags, MAX_LAGS_KEPT)
