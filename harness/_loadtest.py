"""Load test: one workload through each re-cache strategy, every operation recorded, then checked.

Embedded (default): a MemoryStore with simulated I/O latency and a MemoryCache, writers, readers and (for
the actor strategy) Nodes as tasks of this one process. Real servers (``--redis URL --postgres DSN``):
writer and reader processes (``python -m graphcache.harness._procs``) and, for the actor strategy,
``python -m graphcache serve`` node processes, each strategy in a fresh Redis namespace and PostgreSQL
schema (removed afterwards).
The actor load starts once every sidecar sees all members and their hand-off window has passed.

After the writers stop, the run settles: it records each root's committed version (``final``), waits until
the cache shows it (or ``--settle`` seconds pass), then records one last read per root. The checker then
judges the merged histories: G1 regressions, G2 torn graphs, G3 stale roots, commit-to-visible lag.
Ctrl-C stops the run cleanly and reports what was measured so far. Exit code 1 if graphcache (``actor``)
violated G1-G3, 2 on bad flags.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import re
import resource
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
import msgspec

from ..actors import DEFAULT_MIN_REBUILD_INTERVAL, Node, StaticMembership, graph_key
from ..cache import MemoryCache, VersionedCache
from ..storage import Graph, GraphStore, MemoryStore
from ._checker import check_with_lags
from ._history import Event, HistoryWriter, read_history
from ._procs import Child, open_cache, open_store, spawn, worker_argv
from ._report import (
    StrategyResult,
    format_summary,
    format_table,
    representative,
    summarize,
    write_chart,
    write_json,
)
from ._simulate import main as simulate_main
from ._strategies import NAMES, STRATEGIES, Tally
from ._workload import (
    DEFAULT_CHILDREN,
    Dist,
    Lane,
    RootPicker,
    SlowLoads,
    Stopper,
    create_roots,
    read_loop,
    record_read,
    root_ids,
    task_picker,
    write_loop,
)

__all__ = ("LoadConfig", "add_arguments", "run", "run_compare", "run_strategy")

logger = logging.getLogger(__name__)
MAX_LAGS_KEPT = 20_000
"""Lags kept per strategy for the chart and the JSON report (a seeded sample beyond this)."""


class LoadConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that defines a run; the same config and seed give every strategy the same workload."""

    roots: int = 8
    children: int = DEFAULT_CHILDREN
    dist: Dist = "zipf"
    zipf_s: float = 1.1
    writers: int = 64
    writer_procs: int = 2
    readers: int = 8
    reader_procs: int = 1
    read_rate: float = 50.0
    rate: float = 0.0
    duration: float = 10.0
    settle: float = 10.0
    seed: int = 1
    nodes: int = 2
    min_rebuild_interval: float = DEFAULT_MIN_REBUILD_INTERVAL
    latency: tuple[float, float] = (0.0005, 0.002)
    load_latency: float = 0.005
    redis: str | None = None
    postgres: str | None = None
    progress: bool = True
    rounds: int = 1

    @property
    def embedded(self) -> bool:
        return self.redis is None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--strategy", type=_strategy_list, default=("actor",), metavar="NAME[,NAME...]",
        help=f"strategies to run, in this order ({', '.join(NAMES)}; default: actor)",
    )  # fmt: skip
    what.add_argument(
        "--compare", action="store_true", help="every strategy, one after another, same workload"
    )
    what.add_argument(
        "--rounds", type=int, default=1, metavar="N",
        help="run the strategies round-robin N times and add a table of medians (a noisy machine's "
        "single run can mislead; default 1)",
    )  # fmt: skip
    what.add_argument(
        "--simulate-ring", metavar="NODES", help="print the ring simulation for NODES (e.g. 3,10,100)"
    )
    load = parser.add_argument_group("workload")
    load.add_argument("--roots", type=int, default=8, help="number of roots (default 8)")
    load.add_argument(
        "--children", type=int, default=DEFAULT_CHILDREN,
        help=f"children per root graph; each write rewrites one (default {DEFAULT_CHILDREN})",
    )  # fmt: skip
    load.add_argument(
        "--dist", choices=("uniform", "zipf"), default="zipf", help="root popularity (default zipf)"
    )
    load.add_argument("--zipf-s", type=float, default=1.1, help="zipf exponent (default 1.1)")
    load.add_argument("--writers", type=int, default=64, help="writer tasks in total (default 64)")
    load.add_argument(
        "--writer-procs", type=int, default=2, help="writer processes, real servers (default 2)"
    )
    load.add_argument("--readers", type=int, default=8, help="reader tasks in total (default 8)")
    load.add_argument(
        "--reader-procs", type=int, default=1, help="reader processes, real servers (default 1)"
    )
    load.add_argument("--read-rate", type=float, default=50.0, help="reads/s per reader task (default 50)")
    load.add_argument(
        "--rate", type=float, default=0.0, help="updates/s per writer task (default 0: unpaced)"
    )
    load.add_argument(
        "--duration", type=float, default=10.0, help="seconds of writes per strategy (default 10)"
    )
    load.add_argument(
        "--settle", type=float, default=10.0, help="max seconds to wait for convergence (default 10)"
    )
    load.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    load.add_argument(
        "--nodes", type=int, default=2, help="graphcache nodes for the actor strategy (default 2)"
    )
    load.add_argument(
        "--min-rebuild-interval", type=float, default=DEFAULT_MIN_REBUILD_INTERVAL, metavar="SECONDS",
        help="actor: seconds between the starts of two rebuilds of one root, the nodes' pacing "
        f"(default {DEFAULT_MIN_REBUILD_INTERVAL}; 0: none)",
    )  # fmt: skip
    load.add_argument(
        "--latency", type=float, nargs=2, default=(0.0005, 0.002), metavar=("MIN", "MAX"),
        help="embedded store's simulated I/O latency in seconds (default 0.0005 0.002)",
    )  # fmt: skip
    load.add_argument(
        "--load-latency", type=float, default=0.005, metavar="SECONDS",
        help="embedded store: extra seconds per whole-graph load, which costs more than a one-row write "
        "(default 0.005)",
    )  # fmt: skip
    where = parser.add_argument_group("where")
    where.add_argument("--redis", metavar="URL", help="real Redis (with --postgres); default: embedded")
    where.add_argument("--postgres", metavar="DSN", help="real PostgreSQL (with --redis)")
    where.add_argument(
        "--out", type=Path, metavar="DIR", help="write histories, report.json and report.png here"
    )
    where.add_argument("--no-progress", action="store_true", help="no progress bar")


def _strategy_list(text: str) -> tuple[str, ...]:
    """``--strategy cas,actor``: known names, each once, in the order given."""
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"want a comma list of distinct strategies from {', '.join(NAMES)}; got {text!r}"
        )
    return names


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """The run's config; raises ``ValueError`` for inconsistent flags before anything starts."""
    if (args.redis is None) != (args.postgres is None):
        raise ValueError("--redis and --postgres go together (or neither, for the embedded run)")
    for name in (
        "roots",
        "children",
        "writers",
        "writer_procs",
        "readers",
        "reader_procs",
        "nodes",
        "rounds",
    ):
        if getattr(args, name) < (0 if name == "readers" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if (
        args.duration <= 0
        or min(args.settle, args.rate, args.read_rate, args.load_latency, args.min_rebuild_interval,
               *args.latency) < 0
    ):  # fmt: skip
        raise ValueError(
            "--duration must be > 0; --settle, --rate, --read-rate, --min-rebuild-interval and latencies"
            " must be >= 0"
        )
    return LoadConfig(
        roots=args.roots, children=args.children, dist=args.dist, zipf_s=args.zipf_s, writers=args.writers,
        writer_procs=min(args.writer_procs, args.writers), readers=args.readers,
        reader_procs=max(1, min(args.reader_procs, args.readers)), read_rate=args.read_rate, rate=args.rate,
        duration=args.duration, settle=args.settle, seed=args.seed, nodes=args.nodes,
        min_rebuild_interval=args.min_rebuild_interval,
        latency=tuple(args.latency), load_latency=args.load_latency, redis=args.redis, postgres=args.postgres,
        progress=not args.no_progress, rounds=args.rounds,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``graphcache loadtest``: exit 0 when graphcache (actor) kept G1-G3, 1 if not, 2 on bad flags."""
    if args.simulate_ring:
        return _print_ring_simulation(args.simulate_ring, args.seed)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"loadtest: {exc}")
        return 2
    names = NAMES if args.compare else args.strategy
    with contextlib.ExitStack() as stack:
        out = args.out or Path(stack.enter_context(_temporary_directory()))
        results = anyio.run(run_compare, config, names, out)
        print(format_table(results))
        if config.rounds > 1:
            print(f"\nmedians over {config.rounds} rounds (ratios are of the medians):")
            print(format_summary(results))
        if args.out is not None:
            _write_reports(args.out, config, results)
            print(f"histories, report.json and report.png in {args.out}")
    return 0 if all(_kept_guarantees(r) for r in results if r.strategy == "actor") else 1


def _temporary_directory() -> contextlib.AbstractContextManager[str]:
    import tempfile  # noqa: PLC0415  (only when no --out is given)

    return tempfile.TemporaryDirectory(prefix="graphcache-loadtest-")


def _kept_guarantees(result: StrategyResult) -> bool:
    report = result.check
    return report.regressions == 0 and report.torn == 0 and report.stale == 0


def _write_reports(out: Path, config: LoadConfig, results: Sequence[StrategyResult]) -> None:
    shown = msgspec.structs.replace(
        config, redis=_without_password(config.redis), postgres=_without_password(config.postgres)
    )
    write_json(
        out / "report.json", {"config": shown, "results": list(results), "summary": summarize(results)}
    )
    write_chart(out / "report.png", representative(results))  # each strategy's median round


def _without_password(url: str | None) -> str | None:
    """``url`` with any password replaced by ``***``: reports are files people share."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _print_ring_simulation(nodes: str, seed: int) -> int:
    """``--simulate-ring 3,10,100``: the ring simulation and actor memory estimate (harness/_simulate.py)."""
    try:
        counts = [int(n) for n in nodes.split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 2:
        print(f"loadtest: --simulate-ring wants a comma list of node counts >= 2, got {nodes!r}")
        return 2
    # 20,000 roots keep it to seconds; ``python -m graphcache.harness._simulate --help`` has every knob.
    return simulate_main(["--nodes", ",".join(map(str, counts)), "--roots", "20000", "--seed", str(seed)])


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
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        task_status.started()
        async for _ in signals:
            print("\ninterrupted: stopping the writers, then settling and reporting what was measured")
            interrupt.stop()


@dataclass
class _Env:
    """One strategy run's backends; ``namespace``/``schema`` name the real servers' fresh space."""

    config: LoadConfig
    store: GraphStore
    cache: VersionedCache
    namespace: str = ""
    schema: str = ""


async def run_strategy(
    config: LoadConfig, name: str, out: Path, *, interrupt: Stopper | None = None
) -> StrategyResult:
    """One strategy, start to finish: fresh backends, roots, load, settle, check."""
    interrupt = interrupt or Stopper()
    _fresh_directory(out)
    roots = root_ids(config.roots)
    async with _environment(config) as env:
        with HistoryWriter(out / "main.jsonl") as main:
            await create_roots(env.store, roots, main, children=config.children)
            cpu_before = _cpu_seconds()  # from here: nodes, load, settle (not creating the roots)
            async with node_fleet(env, name, out) as node_tally:
                tally, seconds = await _load(env, name, out, interrupt)
                await settle(env.store, env.cache, roots, main, patience=config.settle)
                tally.add(await node_tally())
    cpu = _cpu_seconds() - cpu_before
    report, lags = check_with_lags(read_history(*_histories(out)))
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
        lags=_sample(lags, config.seed),
    )


async def _no_rebuilds() -> Tally:
    return Tally()


@contextlib.asynccontextmanager
async def node_fleet(env: _Env, name: str, out: Path) -> AsyncIterator[Callable[[], Awaitable[Tally]]]:
    """For the actor strategy, ``config.nodes`` graphcache nodes; yields how to read their rebuild counts."""
    if name != "actor":
        yield _no_rebuilds
    elif env.config.embedded:
        async with _embedded_nodes(env) as tally:
            yield tally
    else:
        async with _serve_nodes(env, out) as tally:
            yield tally


@contextlib.asynccontextmanager
async def _embedded_nodes(env: _Env) -> AsyncIterator[Callable[[], Awaitable[Tally]]]:
    """In-process Nodes on the shared MemoryStore/MemoryCache, one static view: each root has one owner."""
    ids = [f"node-{i}" for i in range(env.config.nodes)]
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                Node(
                    store=env.store,
                    cache=env.cache,
                    node_id=node_id,
                    membership=StaticMembership(ids),
                    min_rebuild_interval=env.config.min_rebuild_interval,
                )
            )
            for node_id in ids
        ]

        async def tally() -> Tally:
            stats = [node.statistics() for node in nodes]
            return Tally(rebuilds=sum(s.rebuilds for s in stats), refused=sum(s.puts_refused for s in stats))

        yield tally


SERVE_READY = "ready"
"""The sidecar prints one line containing this word (and its metrics address) once it serves."""
NODE_TTL, NODE_HEARTBEAT = 3.0, 1.0
"""The sidecars' membership ``--ttl`` and ``--heartbeat``, passed on their command line."""
NODE_HANDOFF = NODE_TTL + 2 * NODE_HEARTBEAT
"""Seconds a sidecar keeps serving roots it lost in a view change: ``graphcache serve`` sets the Node's
``handoff`` to ``--ttl`` + 2 x ``--heartbeat``."""


@contextlib.asynccontextmanager
async def _serve_nodes(env: _Env, out: Path) -> AsyncIterator[Callable[[], Awaitable[Tally]]]:
    """``config.nodes`` sidecars (``graphcache serve``) with Redis membership; counts come from /metrics."""
    config = env.config
    nodes = [await spawn(f"node-{i}", _serve_argv(env, f"node-{i}"), log=out / f"node-{i}.log",
                         ready_marker=SERVE_READY)
             for i in range(config.nodes)]  # fmt: skip
    try:
        async with anyio.create_task_group() as tg:
            for node in nodes:
                tg.start_soon(node.pump)
            await _all_ready(nodes)

            await _until_full_view(nodes)
            # A node that lost roots to a joiner keeps rebuilding them for the hand-off window (actors.Node's
            # ``handoff``): a start-up transient of duplicate rebuilds. Measure the steady state after it.
            await anyio.sleep(NODE_HANDOFF)

            async def tally() -> Tally:
                total = Tally()
                for node in nodes:
                    body = await _scrape(node)
                    (out / f"{node.name}.metrics.txt").write_text(body)
                    total.add(_tally_from_metrics(body))
                return total

            yield tally
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for node in nodes:
                await node.stop()


def _serve_argv(env: _Env, node_id: str) -> list[str]:
    config = env.config
    return [
        sys.executable, "-m", "graphcache", "serve", "--redis", str(config.redis),
        "--postgres", str(config.postgres), "--namespace", env.namespace, "--schema", env.schema,
        "--node-id", node_id, "--membership", "redis", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--min-rebuild-interval", str(config.min_rebuild_interval), "--ttl", str(NODE_TTL),
        "--heartbeat", str(NODE_HEARTBEAT),
    ]  # fmt: skip


_METRICS_ADDRESS = re.compile(r"https?://([\w.\-]+):(\d+)")
_SAMPLE = re.compile(r"^(graphcache_\w+)(\{[^}]*\})? (\S+)$", re.MULTILINE)


async def _scrape(node: Child) -> str:
    """A sidecar's Prometheus /metrics page (the address comes from its ready line)."""
    found = _METRICS_ADDRESS.search(node.ready_line)
    if found is None:
        raise RuntimeError(f"{node.name} did not say where its metrics are: {node.ready_line!r}")
    stream = await anyio.connect_tcp(found.group(1), int(found.group(2)))
    async with stream:
        await stream.send(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return b"".join([chunk async for chunk in stream]).decode()


def _metric(body: str, name: str) -> float:
    return sum(float(value) for found, _, value in _SAMPLE.findall(body) if found == name)


async def _until_full_view(nodes: Sequence[Child], *, patience: float = 30.0) -> None:
    """Wait until every node's membership view holds all of them, so the load starts on a settled ring
    (a ring settling mid-run costs duplicate rebuilds during the hand-off, which is not what we measure)."""
    with anyio.fail_after(patience):
        for node in nodes:
            while _metric(await _scrape(node), "graphcache_members") < len(nodes):  # noqa: ASYNC110
                await anyio.sleep(0.1)  # a remote condition: polled under a deadline


def _tally_from_metrics(body: str) -> Tally:
    tally = Tally()
    for name, labels, value in _SAMPLE.findall(body):
        if name == "graphcache_rebuilds_total":
            tally.rebuilds += int(float(value))
        elif name == "graphcache_puts_total" and 'result="refused"' in labels:
            tally.refused += int(float(value))
    return tally


def _fresh_directory(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for pattern in ("*.jsonl", "*.log", "*.metrics.txt"):
        for stale in out.glob(pattern):
            stale.unlink()


def _histories(out: Path) -> list[Path]:
    return sorted(out.glob("*.jsonl"))


def _cpu_seconds() -> float:
    """User + system CPU of this process and its waited-for children (node, writer, reader processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sample(lags: list[float], seed: int) -> list[float]:
    if len(lags) <= MAX_LAGS_KEPT:
        return lags
    return random.Random(seed).sample(lags, MAX_LAGS_KEPT)


@contextlib.asynccontextmanager
async def _environment(config: LoadConfig) -> AsyncIterator[_Env]:
    if config.redis is None or config.postgres is None:
        async with MemoryStore(latency=config.latency, seed=config.seed) as store, MemoryCache() as cache:
            slow = SlowLoads(store, config.load_latency) if config.load_latency > 0 else store
            yield _Env(config, slow, cache)
        return
    run_id = uuid.uuid4().hex[:10]
    namespace, schema = f"gclt{run_id}", f"gclt_{run_id}"
    try:
        async with open_store(config.postgres, schema) as store, open_cache(config.redis, namespace) as cache:
            yield _Env(config, store, cache, namespace, schema)
    finally:
        with anyio.CancelScope(shield=True):
            await _remove_namespace(config.redis, namespace)
            await _drop_schema(config.postgres, schema)


async def _remove_namespace(url: str, namespace: str) -> None:
    """Delete this run's keys (and only them: the namespace is fresh and unique). Never a flush."""
    import redis.asyncio  # noqa: PLC0415  (real servers only)

    client = redis.asyncio.Redis.from_url(url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg  # noqa: PLC0415  (real servers only)

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _load(env: _Env, name: str, out: Path, interrupt: Stopper) -> tuple[Tally, float]:
    """Run writers for ``duration`` (or until interrupted) with readers alongside; (tally, write seconds)."""
    if env.config.embedded:
        return await _load_embedded(env, name, out, interrupt)
    return await run_load_processes(env, name, out, interrupt)


def picker(config: LoadConfig, role: str, task: int) -> RootPicker:
    return task_picker(
        roots=config.roots, dist=config.dist, zipf_s=config.zipf_s, seed=config.seed, role=role, task=task
    )


async def _load_embedded(env: _Env, name: str, out: Path, interrupt: Stopper) -> tuple[Tally, float]:
    config, tally = env.config, Tally()
    writers_stop, readers_stop = Stopper(), Stopper()
    with HistoryWriter(out / "embedded.jsonl") as history:
        async with anyio.create_task_group() as readers:
            for i in range(config.readers):
                lane = Lane(
                    f"reader-{i}", i, picker(config, "reader", i), history, readers_stop, config.read_rate
                )
                readers.start_soon(read_loop, lane, env.cache)
            started = time.monotonic()
            async with anyio.create_task_group() as writers:
                for i in range(config.writers):
                    lane = Lane(
                        f"writer-{i}", i, picker(config, "writer", i), history, writers_stop, config.rate,
                        children=config.children,
                    )  # fmt: skip
                    writers.start_soon(write_loop, lane, env.store, env.cache, STRATEGIES[name], tally)
                await Progress(name, config, lambda: tally.updates).run(interrupt)
                writers_stop.stop()
            seconds = time.monotonic() - started
            readers_stop.stop()
    return tally, seconds


async def settle(
    store: GraphStore, cache: VersionedCache, roots: Sequence[str], history: HistoryWriter, *, patience: float
) -> None:
    """Record each root's committed version, wait (up to ``patience`` s) for the cache to show it, read."""
    finals: dict[str, int] = {}

    async def final(root_id: str) -> None:
        finals[root_id] = await store.version(root_id)
        history.record(Event("settle", "ok", "final", root_id, time.monotonic(), version=finals[root_id]))

    async def last_read(root_id: str) -> None:
        await record_read("settle", cache, root_id, history)

    await _for_each(roots, final)
    with anyio.move_on_after(patience):
        await _until_converged(cache, finals)
    await _for_each(roots, last_read)


async def _until_converged(cache: VersionedCache, finals: dict[str, int]) -> None:
    """Poll until every root's cached version is its final one (absent is fine for a never-written root)."""
    pending = sorted(finals)
    while pending:
        behind: list[str] = []

        async def probe(root_id: str, behind: list[str] = behind) -> None:
            item = await cache.get(graph_key(root_id), type=Graph)
            seen = 1 if item is None else item.value.version
            if seen != finals[root_id]:
                behind.append(root_id)

        await _for_each(pending, probe)
        pending = sorted(behind)
        if pending:
            await anyio.sleep(0.05)


async def _for_each(items: Sequence[str], fn: Callable[[str], Awaitable[None]], *, limit: int = 32) -> None:
    todo = iter(items)

    async def worker() -> None:
        for item in todo:
            await fn(item)

    async with anyio.create_task_group() as tg:
        for _ in range(min(limit, len(items))):
            tg.start_soon(worker)


class Progress:
    """Waits out the write phase (``duration`` or an interrupt) behind a tqdm bar of updates so far."""

    def __init__(self, name: str, config: LoadConfig, updates: Callable[[], int]) -> None:
        self._name = name
        self._duration = config.duration
        self._enabled = config.progress
        self._updates = updates

    async def run(self, interrupt: Stopper) -> None:
        from tqdm import tqdm  # noqa: PLC0415  (imported when a bar is shown)

        start = time.monotonic()
        deadline = start + self._duration
        fmt = "{desc}: {bar} {n:.0f}/{total:.0f}s{postfix}"
        with tqdm(total=self._duration, desc=self._name, bar_format=fmt, disable=not self._enabled) as bar:
            while not interrupt.stopped and (left := deadline - time.monotonic()) > 0:
                with anyio.move_on_after(min(0.5, left)):
                    await interrupt.event.wait()
                elapsed = time.monotonic() - start
                updates = self._updates()
                bar.n = min(elapsed, self._duration)
                bar.set_postfix_str(f"{updates} updates, {updates / elapsed:.0f}/s")


async def run_load_processes(env: _Env, name: str, out: Path, interrupt: Stopper) -> tuple[Tally, float]:
    """Writer and reader processes on the real servers; (summed writer tally, write seconds)."""
    config = env.config
    writers = [await spawn(f"writers-{i}", _worker("writer", env, name, out, i), log=out / f"writers-{i}.log")
               for i in range(config.writer_procs)]  # fmt: skip
    readers = [await spawn(f"readers-{i}", _worker("reader", env, name, out, i), log=out / f"readers-{i}.log")
               for i in range(config.reader_procs if config.readers else 0)]  # fmt: skip
    children = writers + readers
    try:
        async with anyio.create_task_group() as tg:
            for child in children:
                tg.start_soon(child.pump)
            await _all_ready(children)
            started = time.monotonic()
            for child in children:
                child.signal(signal.SIGUSR1)
            progress = Progress(name, config, lambda: sum(w.tally.updates for w in writers))
            await progress.run(interrupt)
            await _finish(writers, interrupt)
            seconds = time.monotonic() - started
            for reader in readers:
                reader.signal(signal.SIGTERM)
            await _finish(readers, interrupt)
    finally:
        with anyio.CancelScope(shield=True):
            for child in children:
                await child.stop()
    _check_finished(children, out)
    total = Tally()
    for writer in writers:
        total.add(writer.tally)
    return total, seconds


def _worker(role: str, env: _Env, name: str, out: Path, index: int) -> list[str]:
    config = env.config
    tasks, procs = (
        (config.writers, config.writer_procs) if role == "writer" else (config.readers, config.reader_procs)
    )
    first, count = _share(tasks, procs, index)
    options: dict[str, object] = {
        "redis": config.redis, "postgres": config.postgres, "namespace": env.namespace, "schema": env.schema,
        "strategy": name, "first": first, "tasks": count, "roots": config.roots, "dist": config.dist,
        "zipf_s": config.zipf_s, "children": config.children, "seed": config.seed,
        "duration": config.duration,
        "rate": config.rate if role == "writer" else config.read_rate,
        "history": out / f"{role}s-{index}.jsonl",
    }  # fmt: skip
    return worker_argv(role, options)


def _share(tasks: int, procs: int, index: int) -> tuple[int, int]:
    """Process ``index``'s slice of ``tasks`` tasks spread evenly over ``procs`` processes: (first, count)."""
    base, extra = divmod(tasks, procs)
    first = index * base + min(index, extra)
    return first, base + (1 if index < extra else 0)


async def _all_ready(children: Sequence[Child], *, patience: float = 60.0) -> None:
    with anyio.fail_after(patience):
        for child in children:
            await child.ready.wait()
    crashed = [c for c in children if c.done.is_set()]
    if crashed:
        raise RuntimeError(f"worker processes ended before the start: {crashed} (see their .log files)")


async def _finish(children: Sequence[Child], interrupt: Stopper) -> None:
    """Wait for each child's "done"; an interrupt forwards SIGTERM (they stop between operations)."""
    async with anyio.create_task_group() as tg:

        async def forward() -> None:
            await interrupt.event.wait()
            for child in children:
                child.signal(signal.SIGTERM)

        tg.start_soon(forward)
        for child in children:
            await child.done.wait()
        tg.cancel_scope.cancel()


def _check_finished(children: Sequence[Child], out: Path) -> None:
    failed = [c for c in children if not c.finished]
    if failed:
        raise RuntimeError(f"worker processes failed: {failed}; see the .log files in {out}")
