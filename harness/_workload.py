"""The load-test workload, identical for every strategy given the same seed.

Roots are ``root-00000`` ... ; each write upserts one child of a root with data that names the writer and
its sequence number, so every committed version has a distinct graph and a torn read cannot hash like a
committed one. Writers and readers are plain task loops that record every operation into a history
(``harness/_history.py``); the same loops run as tasks of one process (embedded) or inside the writer and
reader processes of ``harness/_procs.py``.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.lowlevel
import msgspec

from ..actors import graph_key
from ..cache import CacheError, VersionedCache
from ..storage import (
    Change,
    Checkpoint,
    ConcurrencyConflict,
    Graph,
    GraphStore,
    Node,
    Op,
    SlotFilter,
    StoreError,
    Upsert,
)
from ._history import Event, HistoryWriter, graph_hash
from ._strategies import Strategy, Tally

__all__ = (
    "Commit",
    "Dist",
    "Lane",
    "RootPicker",
    "SlowLoads",
    "Stopper",
    "create_roots",
    "initial_graph",
    "read_loop",
    "record_read",
    "root_ids",
    "task_picker",
    "write_loop",
    "write_ops",
)

logger = logging.getLogger(__name__)

Dist = Literal["uniform", "zipf"]
DEFAULT_CHILDREN = 4
"""Children per root: created at setup, then each write rewrites one of them."""


def root_ids(count: int) -> list[str]:
    """The ids of a workload's roots, in popularity order (under zipf the first is the hottest)."""
    width = max(5, len(str(count - 1)))
    return [f"root-{i:0{width}d}" for i in range(count)]


class RootPicker:
    """Picks the root of the next operation: uniform, or zipf with exponent ``zipf_s`` over rank."""

    def __init__(self, roots: Sequence[str], *, dist: Dist, zipf_s: float, rng: random.Random) -> None:
        if not roots:
            raise ValueError("a workload needs at least one root")
        self._roots = list(roots)
        self._rng = rng
        self._cumulative: list[float] | None = None
        if dist == "zipf":
            weights = (1.0 / (rank**zipf_s) for rank in range(1, len(roots) + 1))
            self._cumulative = list(itertools.accumulate(weights))

    def pick(self) -> str:
        if self._cumulative is None:
            return self._roots[self._rng.randrange(len(self._roots))]
        point = self._rng.random() * self._cumulative[-1]
        return self._roots[min(bisect.bisect_right(self._cumulative, point), len(self._roots) - 1)]


def task_picker(
    *, roots: int, dist: Dist, zipf_s: float, seed: int, role: str, task: int, ids: Sequence[str] = ()
) -> RootPicker:
    """One task's root picker: its own random stream from (seed, role, task), so a task picks the same roots
    in the same order whichever strategy runs and whether it runs in this process or a worker process.
    ``ids``: the roots, most popular first (default: ``root_ids(roots)``)."""
    rng = random.Random(f"{seed}:{role}:{task}")
    return RootPicker(ids or root_ids(roots), dist=dist, zipf_s=zipf_s, rng=rng)


def initial_data(root_id: str) -> dict[str, Any]:
    return {"root": root_id}


def initial_graph(root_id: str) -> Graph:
    """The graph ``create_root(root_id, initial_data(root_id))`` commits at version 1."""
    return Graph(root_id, 1, {root_id: Node(root_id, None, initial_data(root_id), 1)})


def initial_children(root_id: str, children: int) -> list[Op]:
    """The setup transaction that gives a root its ``children`` children (version 2)."""
    return [Upsert(f"{root_id}/c{i}", root_id, {"i": i}) for i in range(children)]


def write_ops(root_id: str, writer: int, seq: int, children: int = DEFAULT_CHILDREN) -> list[Op]:
    """The one deterministic change writer ``writer`` makes in its ``seq``-th transaction."""
    child = f"{root_id}/c{(writer + seq) % children}"
    return [Upsert(child, root_id, {"w": writer, "s": seq})]


def _now() -> float:
    return time.monotonic()


async def create_roots(
    store: GraphStore, roots: Sequence[str], history: HistoryWriter, *, children: int = 0, limit: int = 16
) -> None:
    """Create every root at version 1 (then give it ``children`` children at version 2), recording each
    step (ops, and the initial hash) for the checker. Both steps are recorded as ``create``: the root's
    initial graph, a commit the checker replays but does not measure (no strategy caches it: the load
    has not started yet)."""
    pending = iter(roots)

    async def creator() -> None:
        for root_id in pending:
            ops = msgspec.to_builtins([Upsert(root_id, None, initial_data(root_id))])
            history.record(Event("setup", "invoke", "create", root_id, _now()))
            version = await store.create_root(root_id, initial_data(root_id))
            digest = graph_hash(initial_graph(root_id))
            history.record(
                Event("setup", "ok", "create", root_id, _now(), version=version, hash=digest, ops=ops)
            )
            if children > 0:
                ops = initial_children(root_id, children)
                await _write("setup", history, store, root_id, ops, op="create")

    async with anyio.create_task_group() as tg:
        for _ in range(min(limit, len(roots))):
            tg.start_soon(creator)


@dataclass
class Stopper:
    """Shared stop flag for task loops; checked between operations, never cancelling one midway."""

    event: anyio.Event = field(default_factory=anyio.Event)

    @property
    def stopped(self) -> bool:
        return self.event.is_set()

    def stop(self) -> None:
        self.event.set()


@dataclass(frozen=True)
class Lane:
    """One writer or reader task: its name in the history, its number, its roots, and when to stop."""

    process: str
    index: int
    picker: RootPicker
    history: HistoryWriter
    stopper: Stopper
    rate: float = 0.0
    children: int = DEFAULT_CHILDREN


class _Pacer:
    """Spaces operations ``1/rate`` seconds apart (rate 0: as fast as possible, yielding each time).

    A wait ends early when ``stopper`` fires: at a slow rate the pause may be longer than the whole run,
    and the run must not outlast its ``--duration`` waiting for it.
    """

    def __init__(self, rate: float, stopper: Stopper) -> None:
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._next = _now()
        self._stopper = stopper

    async def wait(self) -> None:
        if self._interval == 0.0:
            await anyio.lowlevel.checkpoint()
            return
        self._next = max(self._next + self._interval, _now() - self._interval)
        with anyio.move_on_after(max(0.0, self._next - _now())):
            await self._stopper.event.wait()


Commit = Callable[[Lane, str, int], Awaitable[int | None]]
"""``commit(lane, root_id, seq)``: make and record writer ``lane``'s ``seq``-th change to ``root_id`` some
other way than ``store.apply`` (a --graph run's plain SQL); the committed version, or None."""


async def write_loop(
    lane: Lane,
    store: GraphStore,
    cache: VersionedCache,
    strategy: Strategy,
    tally: Tally,
    *,
    commit: Commit | None = None,
) -> None:
    """Commit one change per iteration, record it, then let the strategy maintain the cache its way."""
    pacer = _Pacer(lane.rate, lane.stopper)
    for seq in itertools.count():
        if lane.stopper.stopped:
            return
        root_id = lane.picker.pick()
        if commit is None:
            ops = write_ops(root_id, lane.index, seq, lane.children)
            version = await _write(lane.process, lane.history, store, root_id, ops)
        else:
            version = await commit(lane, root_id, seq)
        if version is not None:
            tally.updates += 1
            await _maintain(strategy, store, cache, lane, root_id, version=version, tally=tally)
        await pacer.wait()


async def _write(
    process: str,
    history: HistoryWriter,
    store: GraphStore,
    root_id: str,
    ops: list[Op],
    *,
    op: Literal["create", "write"] = "write",
) -> int | None:
    history.record(Event(process, "invoke", op, root_id, _now()))
    try:
        version = await store.apply(root_id, ops)
    except ConcurrencyConflict:
        history.record(Event(process, "fail", op, root_id, _now()))
        return None
    except StoreError as exc:
        # Outcome unknown (e.g. the connection dropped after sending): the checker will not judge the gap.
        logger.warning("write to %s failed: %r", root_id, exc)
        history.record(Event(process, "info", op, root_id, _now()))
        return None
    builtins = msgspec.to_builtins(ops)
    history.record(Event(process, "ok", op, root_id, _now(), version=version, ops=builtins))
    return version


async def _maintain(
    strategy: Strategy,
    store: GraphStore,
    cache: VersionedCache,
    lane: Lane,
    root_id: str,
    *,
    version: int,
    tally: Tally,
) -> None:
    """The strategy's cache maintenance after one commit; a put the cache acknowledged as stored is
    recorded (a "rebuild" ok with the stored version) as soon as it returns."""
    try:
        stored = await strategy.after_write(store, cache, root_id, version, tally)
    except (StoreError, CacheError) as exc:
        tally.failures += 1
        logger.warning("%s could not maintain %s: %r", strategy.name, root_id, exc)
        return
    if stored is not None:
        lane.history.record(Event(lane.process, "ok", "rebuild", root_id, _now(), version=stored))


async def record_read(
    process: str, cache: VersionedCache, root_id: str, history: HistoryWriter
) -> int | None:
    """One recorded cache read of ``root_id``'s graph; returns the version seen (None if absent)."""
    history.record(Event(process, "invoke", "read", root_id, _now()))
    item = await cache.get(graph_key(root_id), type=Graph)
    if item is None:
        history.record(Event(process, "ok", "read", root_id, _now()))
        return None
    graph: Graph = item.value
    digest = graph_hash(graph)
    history.record(Event(process, "ok", "read", root_id, _now(), version=graph.version, hash=digest))
    return graph.version


async def read_loop(lane: Lane, cache: VersionedCache) -> None:
    """Sample the cache until stopped, recording every read."""
    pacer = _Pacer(lane.rate, lane.stopper)
    while not lane.stopper.stopped:
        root_id = lane.picker.pick()
        try:
            await record_read(lane.process, cache, root_id, lane.history)
        except CacheError as exc:
            logger.warning("read of %s failed: %r", root_id, exc)
            lane.history.record(Event(lane.process, "fail", "read", root_id, _now()))
        await pacer.wait()


class SlowLoads:
    """A ``GraphStore`` whose whole-graph ``load`` costs ``extra`` more seconds than the wrapped store's.

    The embedded runs use it to model the problem this project exists for: loading a whole graph (many rows)
    costs far more than committing a one-row change. Every strategy goes through the same wrapper.
    """

    def __init__(self, store: GraphStore, extra: float) -> None:
        self._store = store
        self._extra = extra

    def __repr__(self) -> str:
        return f"<SlowLoads +{self._extra * 1000:.1f}ms {self._store!r}>"

    async def create_root(self, root_id: str, data: dict[str, Any]) -> int:
        return await self._store.create_root(root_id, data)

    async def apply(self, root_id: str, ops: Sequence[Op], *, expected_version: int | None = None) -> int:
        return await self._store.apply(root_id, ops, expected_version=expected_version)

    async def load(self, root_id: str) -> Graph:
        graph = await self._store.load(root_id)
        await anyio.sleep(self._extra)  # the snapshot is taken; the rows take time to arrive
        return graph

    async def version(self, root_id: str) -> int:
        return await self._store.version(root_id)

    async def cursor(self) -> int:
        return await self._store.cursor()

    def changes(self, *, after: int | None = None, slots: SlotFilter | None = None) -> AsyncIterator[Change]:
        return self._store.changes(after=after, slots=slots)

    async def save_checkpoint(self, name: str, cursor: int, *, slots: Collection[int] | None = None) -> None:
        await self._store.save_checkpoint(name, cursor, slots=slots)

    async def checkpoints(self) -> list[tuple[str, Checkpoint]]:
        return await self._store.checkpoints()

    async def load_checkpoint(self, name: str) -> Checkpoint | None:
        return await self._store.load_checkpoint(name)

    async def root_versions(self, *, after: str | None = None, limit: int = 1000) -> list[tuple[str, int]]:
        return await self._store.root_versions(after=after, limit=limit)

    async def aclose(self) -> None:
        await self._store.aclose()
