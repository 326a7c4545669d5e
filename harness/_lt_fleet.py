"""The load test's processes: graphcache nodes (in-process, or ``graphcache serve`` sidecars) and the
writer and reader worker processes on the real servers.

Sidecars are read through their Prometheus ``/metrics`` page (a plain HTTP GET, parsed with
prometheus_client's own text parser): the members they see, the rebuilds, snapshot loads and puts they
did. Every node, in-process or sidecar, records each put the cache acknowledged as stored into a history
of its own (``nodes.jsonl``; a sidecar's ``--record-puts node-N.jsonl``) for the visibility lag. Worker
processes speak the line protocol of ``harness/_procs.py``. Every process started here is stopped again
(SIGTERM, then SIGKILL after a grace period) however the run ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio

from .._cli import CommandError, UsageError
from ..actors import Node, StaticMembership
from ._history import Event, HistoryWriter
from ._lt_backends import Env
from ._lt_graph import PLAN_FILE
from ._procs import Child, spawn, worker_argv
from ._strategies import Tally

__all__ = (
    "NODE_HANDOFF",
    "NodeTally",
    "finish",
    "metric",
    "need_sidecars_installed",
    "node_fleet",
    "serve_argv",
    "tally_from_metrics",
    "worker_processes",
)

NodeTally = Callable[[], Awaitable[Tally]]
"""How to read the nodes' rebuild, load and put counts once the run is over."""

SERVE_READY = "ready"
"""The sidecar prints one line containing this word (and its metrics address) once it serves."""
NODE_TTL, NODE_HEARTBEAT = 3.0, 1.0
"""The sidecars' membership ``--ttl`` and ``--heartbeat``, passed on their command line."""
NODE_HANDOFF = NODE_TTL + 2 * NODE_HEARTBEAT
"""Seconds a sidecar keeps serving roots it lost in a view change: ``graphcache serve`` sets the Node's
``handoff`` to ``--ttl`` + 2 x ``--heartbeat``."""
SCRAPE_TIMEOUT = 5.0
"""Seconds a sidecar gets to answer a GET of its /metrics page."""
READY_PATIENCE = 60.0
"""Seconds a process gets to connect to the servers and say it is ready."""
VIEW_PATIENCE = 30.0
"""Seconds the sidecars get to see each other in their membership views."""


def need_sidecars_installed(names: Sequence[str]) -> None:
    """The actor strategy on real servers starts ``graphcache serve`` nodes: they need prometheus_client."""
    if "actor" in names and importlib.util.find_spec("prometheus_client") is None:
        raise UsageError(
            "the actor strategy on real servers runs graphcache serve nodes, which need the 'loadtest' "
            "extra: pip install 'graphcache-pg[loadtest]'"
        )


async def _no_rebuilds() -> Tally:
    return Tally()


@contextlib.asynccontextmanager
async def node_fleet(env: Env, name: str, out: Path) -> AsyncIterator[NodeTally]:
    """For the actor strategy, ``config.nodes`` graphcache nodes; yields how to read their counts."""
    if name != "actor":
        yield _no_rebuilds
    elif env.config.embedded:
        async with _embedded_nodes(env, out) as tally:
            yield tally
    else:
        async with _serve_nodes(env, out) as tally:
            yield tally


def _put_recorder(history: HistoryWriter, node_id: str) -> Callable[[str, int], None]:
    """A Node's ``on_stored``: each put the cache acknowledged, as a "rebuild" ok event of ``node_id``."""

    def on_stored(root_id: str, version: int) -> None:
        history.record(Event(node_id, "ok", "rebuild", root_id, time.monotonic(), version=version))

    return on_stored


@contextlib.asynccontextmanager
async def _embedded_nodes(env: Env, out: Path) -> AsyncIterator[NodeTally]:
    """In-process Nodes on the shared MemoryStore/MemoryCache, one static view: each root has one owner."""
    ids = [f"node-{i}" for i in range(env.config.nodes)]
    async with contextlib.AsyncExitStack() as stack:
        history = stack.enter_context(HistoryWriter(out / "nodes.jsonl"))  # closed after the nodes stop
        nodes = [
            await stack.enter_async_context(
                Node(
                    store=env.store,
                    cache=env.cache,
                    node_id=node_id,
                    membership=StaticMembership(ids),
                    min_rebuild_interval=env.config.min_rebuild_interval,
                    on_stored=_put_recorder(history, node_id),
                )
            )
            for node_id in ids
        ]

        async def tally() -> Tally:
            stats = [node.statistics() for node in nodes]
            # Each read-through (a Node.get miss) is one snapshot load and one put besides the rebuilds.
            read_loads = sum(s.read_loads for s in stats)
            return Tally(
                rebuilds=sum(s.rebuilds for s in stats),
                refused=sum(s.puts_refused for s in stats),
                puts=sum(s.puts_stored + s.puts_refused for s in stats) + read_loads,
                loads=sum(s.snapshot_loads for s in stats) + read_loads,
            )

        yield tally


@contextlib.asynccontextmanager
async def _serve_nodes(env: Env, out: Path) -> AsyncIterator[NodeTally]:
    """``config.nodes`` sidecars (``graphcache serve``) with Redis membership; counts come from /metrics."""
    commands = [
        (f"node-{i}", serve_argv(env, f"node-{i}", record_puts=out / f"node-{i}.jsonl"))
        for i in range(env.config.nodes)
    ]
    async with _started(commands, out, SERVE_READY) as nodes:
        await _until_full_view(nodes)
        # A node that lost roots to a joiner keeps rebuilding them for the hand-off window (actors.Node's
        # ``handoff``): a start-up transient of duplicate rebuilds. Measure the steady state after it.
        await anyio.sleep(NODE_HANDOFF)

        async def tally() -> Tally:
            total = Tally()
            for node in nodes:
                body = await scrape(node)
                (out / f"{node.name}.metrics.txt").write_text(body)
                total.add(tally_from_metrics(body))
            return total

        yield tally


def serve_argv(env: Env, node_id: str, *, record_puts: Path | None = None) -> list[str]:
    """The command line of one sidecar of this run; with ``record_puts``, it appends each put the cache
    acknowledged to that history file (``serve --record-puts``, a hidden flag)."""
    config = env.config
    extra = [] if config.graph is None else ["--graph", config.graph.path]
    if record_puts is not None:
        extra += ["--record-puts", str(record_puts)]
    return [
        sys.executable, "-m", "graphcache", "serve", "--redis", str(config.redis),
        "--postgres", str(config.postgres), "--namespace", env.namespace, "--schema", env.schema,
        *extra, "--node-id", node_id, "--membership", "redis", "--host", "127.0.0.1", "--port", "0",
        "--min-rebuild-interval", str(config.min_rebuild_interval),
        "--feed-interval", str(config.feed_interval), "--ttl", str(NODE_TTL),
        "--heartbeat", str(NODE_HEARTBEAT),
    ]  # fmt: skip


def _metrics_url(node: Child) -> str:
    """Where a sidecar's /metrics is: its ready line says ``graphcache node ID ready http://HOST:PORT``."""
    _, found, rest = node.ready_line.partition(" ready ")
    base = rest.strip().rstrip("/")
    if not found or not base.startswith("http://") or " " in base:
        raise CommandError(f"{node.name} did not say where it serves: {node.ready_line!r}")
    return base + "/metrics"


def _get(url: str) -> str:
    # Only ever the http:// URL our own sidecar printed (checked in _metrics_url).
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:  # noqa: S310
        body: bytes = response.read()
    return body.decode()


async def scrape(node: Child) -> str:
    """A sidecar's Prometheus /metrics page."""
    return await anyio.to_thread.run_sync(_get, _metrics_url(node))


def _samples(body: str) -> Iterator[Any]:
    # Imported here: only real-server actor runs scrape sidecars, and they need the extra anyway.
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    for family in text_string_to_metric_families(body):
        yield from family.samples


def metric(body: str, name: str) -> float:
    """The sum of sample ``name`` over its label sets (0 if absent)."""
    return sum(float(sample.value) for sample in _samples(body) if sample.name == name)


def tally_from_metrics(body: str) -> Tally:
    """A sidecar's rebuilds, snapshot loads, puts and refused puts, from its /metrics page.

    Loads: ``graphcache_snapshot_loads_total`` (rebuilds patched from the feed load nothing) plus
    ``graphcache_read_loads_total``; puts: ``graphcache_puts_total`` (one per rebuild) plus the read
    loads again, since each read-through load is followed by one put.
    """
    tally = Tally()
    for sample in _samples(body):
        value = int(sample.value)
        if sample.name == "graphcache_rebuilds_total":
            tally.rebuilds += value
        elif sample.name == "graphcache_snapshot_loads_total":
            tally.loads += value
        elif sample.name == "graphcache_read_loads_total":
            tally.loads += value
            tally.puts += value
        elif sample.name == "graphcache_puts_total":
            tally.puts += value
            if sample.labels.get("result") == "refused":
                tally.refused += value
    return tally


async def _until_full_view(nodes: Sequence[Child]) -> None:
    """Wait until every node's membership view holds all of them, so the load starts on a settled ring
    (a ring settling mid-run costs duplicate rebuilds during the hand-off, which is not what we measure)."""
    try:
        with anyio.fail_after(VIEW_PATIENCE):
            for node in nodes:
                while metric(await scrape(node), "graphcache_members") < len(nodes):  # noqa: ASYNC110
                    await anyio.sleep(0.1)  # a remote condition: polled under a deadline
    except TimeoutError:
        raise CommandError(
            f"the {len(nodes)} nodes did not all see each other within {VIEW_PATIENCE:g}s"
        ) from None


@contextlib.asynccontextmanager
async def worker_processes(env: Env, name: str, out: Path) -> AsyncIterator[tuple[list[Child], list[Child]]]:
    """The writer and reader processes of ``name``'s run, started and ready: (writers, readers)."""
    config = env.config
    commands = [
        (f"writers-{i}", _worker_command("writer", env, name, out, i)) for i in range(config.writer_procs)
    ]
    readers = config.reader_procs if config.readers else 0
    commands += [(f"readers-{i}", _worker_command("reader", env, name, out, i)) for i in range(readers)]
    async with _started(commands, out, "ready") as children:
        yield children[: config.writer_procs], children[config.writer_procs :]
    failed = [c for c in children if not c.finished]
    if failed:
        raise CommandError(f"worker processes failed: {failed}; see the .log files in {out}")


@contextlib.asynccontextmanager
async def _started(
    commands: list[tuple[str, list[str]]], out: Path, marker: str
) -> AsyncIterator[list[Child]]:
    """Start each (name, argv), logs in ``out/<name>.log``, and wait until all say ``marker``; stop
    them all on the way out, whatever happened (shielded: a cancelled run leaves no process behind)."""
    children: list[Child] = []
    try:
        for child_name, argv in commands:
            children.append(await spawn(child_name, argv, log=out / f"{child_name}.log", ready_marker=marker))
        async with anyio.create_task_group() as tg:
            for child in children:
                tg.start_soon(child.pump)
            await _all_ready(children, out)
            yield children
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for child in children:
                await child.stop()


async def _all_ready(children: Sequence[Child], out: Path) -> None:
    try:
        with anyio.fail_after(READY_PATIENCE):
            for child in children:
                await child.ready.wait()
    except TimeoutError:
        slow = [c.name for c in children if not c.ready.is_set()]
        raise CommandError(f"not ready within {READY_PATIENCE:g}s: {slow}; see their logs in {out}") from None
    crashed = [c.name for c in children if c.done.is_set()]
    if crashed:
        raise CommandError(f"processes ended before the start: {crashed}; see their logs in {out}")


def _worker_command(role: str, env: Env, name: str, out: Path, index: int) -> list[str]:
    config = env.config
    tasks, procs = (
        (config.writers, config.writer_procs) if role == "writer" else (config.readers, config.reader_procs)
    )
    first, count = share(tasks, procs, index)
    options: dict[str, object] = {
        "redis": config.redis, "postgres": config.postgres, "namespace": env.namespace, "schema": env.schema,
        "strategy": name, "first": first, "tasks": count, "roots": config.roots, "dist": config.dist,
        "zipf_s": config.zipf_s, "children": config.children, "seed": config.seed,
        "duration": config.duration,
        "rate": config.rate if role == "writer" else config.read_rate,
        "history": out / f"{role}s-{index}.jsonl",
    }  # fmt: skip
    if config.graph is not None:
        options["graph_plan"] = out / PLAN_FILE  # written by the run's seed step (_lt_graph.seed_roots)
    return worker_argv(role, options)


def share(tasks: int, procs: int, index: int) -> tuple[int, int]:
    """Process ``index``'s slice of ``tasks`` tasks spread evenly over ``procs`` processes: (first, count)."""
    base, extra = divmod(tasks, procs)
    first = index * base + min(index, extra)
    return first, base + (1 if index < extra else 0)


async def finish(children: Sequence[Child], interrupt_event: anyio.Event) -> None:
    """Wait for each child's "done"; an interrupt forwards SIGTERM (they stop between operations)."""
    async with anyio.create_task_group() as tg:

        async def forward() -> None:
            await interrupt_event.wait()
            for child in children:
                child.signal(signal.SIGTERM)

        tg.start_soon(forward)
        for child in children:
            await child.done.wait()
        tg.cancel_scope.cancel()
