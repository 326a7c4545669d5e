"""Scale by simulation: the consistent-hash ring at 3..1000 nodes, and what an actor costs in memory.

``simulate_ring`` builds real `actors.Ring` objects for each node count and measures, over ``roots``
root ids: balance (roots of the busiest and idlest node over the mean), the share of roots that move
when a node joins or leaves (against the ideal 1/N), moves that went anywhere else (must be 0), build
time, lookup time and the ring's memory (tracemalloc: the ring's own allocations, not the node id
strings the caller already holds). Counting a finite sample adds noise of about
``1/sqrt(roots per node)`` to the balance figures; the table shows it.

``estimate_memory`` measures with tracemalloc what the actors of one node cost, from objects shaped
like theirs (no import of the actor code, so the figure is reproducible on its own):
  live actor         a bounded mailbox (``anyio.create_memory_object_stream(16)``: the send/receive
                     pair and their shared state), a slotted state object of eight fields and its entry
                     in a ``dict`` keyed by the root id (the id string included)
  + parked task      the same plus a task blocked in ``receive()`` on that mailbox (asyncio backend)
  passivated root    one ``dict`` entry root id -> int (e.g. the last version built), id string included
  RootActor          as a cross-check, graphcache's own ``actors.RootActor`` (MemoryStore, MemoryCache),
                     started in a task group and idle; the deployment plan uses this figure

Run it: ``python -m graphcache.harness._simulate --nodes 3,10,100,1000 --roots 100000`` (or ``graphcache
loadtest --simulate-ring 3,10,100,1000``).
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, TypeVar

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..actors import DEFAULT_PROBES, Ring, RootActor
from ..cache import MemoryCache
from ..storage import MemoryStore

__all__ = (
    "BalanceRow",
    "InvalidSimulation",
    "MemoryEstimate",
    "PlanRow",
    "RingRow",
    "balance_study",
    "estimate_memory",
    "format_balance",
    "format_memory",
    "format_plan",
    "format_table",
    "plan_deployment",
    "simulate_ring",
)

T = TypeVar("T")
MAILBOX_SIZE = 16


class InvalidSimulation(ValueError):
    """A simulation argument is out of range; nothing was run."""


class RingRow(NamedTuple):
    nodes: int
    vnodes: int
    probes: int
    roots: int
    max_over_mean: float  # roots of the busiest node / mean roots per node
    min_over_mean: float  # roots of the idlest node / mean roots per node
    sampling_noise: float  # 1/sqrt(mean roots per node): the spread counting alone adds
    moved_on_join: float  # share of all roots that changed owner when one node joined
    ideal_join: float  # 1/(nodes + 1)
    moved_on_leave: float  # share of all roots that changed owner when one node left
    ideal_leave: float  # 1/nodes
    stray_moves: int  # moves not to the joining / not from the leaving node: must be 0
    build_ms: float
    lookup_us: float
    ring_bytes: int


class BalanceRow(NamedTuple):
    nodes: int
    vnodes: int
    probes: int
    clusters: int  # random node-name sets tried
    roots: int
    median_max: float  # median over clusters of max/mean
    p95_max: float
    worst_max: float
    worst_min: float  # lowest min/mean of any cluster
    beyond_15: float  # share of clusters whose busiest or idlest node is more than 15% off the mean


class MemoryEstimate(NamedTuple):
    objects: int  # objects measured per shape
    live_actor_bytes: float
    live_actor_with_task_bytes: float
    passivated_root_bytes: float
    root_actor_bytes: float  # graphcache's own RootActor, started and idle (the plan uses this)


class PlanRow(NamedTuple):
    nodes: int
    roots: int
    hot_share: float
    roots_per_node: int
    actors_per_node: int
    ring_bytes: int
    actors_bytes: float
    passivated_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.ring_bytes + self.actors_bytes + self.passivated_bytes


def _node_ids(count: int, rng: random.Random) -> list[str]:
    return [f"node-{index}-{rng.getrandbits(32):08x}" for index in range(count)]


def _traced_bytes(build: Callable[[], T]) -> tuple[T, int]:
    """What ``build()`` returns, and the bytes it still holds allocated (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = build()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _moves(before: Sequence[str], after: Sequence[str]) -> list[tuple[str, str]]:
    return [(old, new) for old, new in zip(before, after, strict=True) if old != new]


def _spread(owners: Sequence[str], nodes: Iterable[str], mean: float) -> tuple[float, float]:
    counts = dict.fromkeys(nodes, 0)
    for owner in owners:
        counts[owner] += 1
    return max(counts.values()) / mean, min(counts.values()) / mean


def _simulate_one(count: int, root_ids: Sequence[str], vnodes: int, probes: int, seed: int) -> RingRow:
    rng = random.Random(f"{seed}:{count}")
    nodes = _node_ids(count, rng)
    started = time.perf_counter()
    ring = Ring(nodes, vnodes=vnodes, probes=probes)
    build_ms = (time.perf_counter() - started) * 1000
    _, ring_bytes = _traced_bytes(lambda: Ring(nodes, vnodes=vnodes, probes=probes))
    started = time.perf_counter()
    owners = [ring.owner(root) for root in root_ids]
    lookup_us = (time.perf_counter() - started) / len(root_ids) * 1e6
    newcomer, leaver = f"node-new-{rng.getrandbits(32):08x}", rng.choice(nodes)
    bigger = Ring([*nodes, newcomer], vnodes=vnodes, probes=probes)
    smaller = Ring([node for node in nodes if node != leaver], vnodes=vnodes, probes=probes)
    joined = _moves(owners, [bigger.owner(root) for root in root_ids])
    left = _moves(owners, [smaller.owner(root) for root in root_ids])
    mean = len(root_ids) / count
    max_over_mean, min_over_mean = _spread(owners, nodes, mean)
    return RingRow(
        nodes=count,
        vnodes=vnodes,
        probes=probes,
        roots=len(root_ids),
        max_over_mean=max_over_mean,
        min_over_mean=min_over_mean,
        sampling_noise=mean**-0.5,
        moved_on_join=len(joined) / len(root_ids),
        ideal_join=1 / (count + 1),
        moved_on_leave=len(left) / len(root_ids),
        ideal_leave=1 / count,
        stray_moves=sum(new != newcomer for _, new in joined) + sum(old != leaver for old, _ in left),
        build_ms=build_ms,
        lookup_us=lookup_us,
        ring_bytes=ring_bytes,
    )


def simulate_ring(
    node_counts: Iterable[int] = (3, 10, 100, 1000),
    *,
    roots: int = 100_000,
    vnodes: int = 128,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
) -> list[RingRow]:
    """One `RingRow` per node count (see the module docstring for what each figure means)."""
    counts = list(node_counts)
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in counts):
        raise InvalidSimulation(f"node counts must be ints >= 2 (a leave needs a survivor), got {counts!r}")
    if isinstance(roots, bool) or not isinstance(roots, int) or roots < 1:
        raise InvalidSimulation(f"roots must be a positive int, got {roots!r}")
    root_ids = [f"root-{index}" for index in range(roots)]
    return [_simulate_one(count, root_ids, vnodes, probes, seed) for count in counts]


def _balance_row(
    nodes: int, clusters: int, root_ids: Sequence[str], *, vnodes: int, probes: int, seed: int
) -> BalanceRow:
    rng = random.Random(f"{seed}:balance:{nodes}")
    mean = len(root_ids) / nodes
    spreads = []
    for _ in range(clusters):
        names = _node_ids(nodes, rng)
        ring = Ring(names, vnodes=vnodes, probes=probes)
        spreads.append(_spread([ring.owner(root) for root in root_ids], names, mean))
    maxima = sorted(high for high, _ in spreads)
    return BalanceRow(
        nodes=nodes,
        vnodes=vnodes,
        probes=probes,
        clusters=clusters,
        roots=len(root_ids),
        median_max=maxima[len(maxima) // 2],
        p95_max=maxima[min(len(maxima) - 1, math.ceil(0.95 * len(maxima)) - 1)],
        worst_max=maxima[-1],
        worst_min=min(low for _, low in spreads),
        beyond_15=sum(high > 1.15 or low < 0.85 for high, low in spreads) / clusters,
    )


def balance_study(
    *,
    nodes: int = 10,
    clusters: int = 50,
    roots: int = 20_000,
    vnodes: int = 128,
    probes: Iterable[int] = (1, DEFAULT_PROBES),
    seed: int = 0,
) -> list[BalanceRow]:
    """How balance varies over ``clusters`` random node-name sets, per probe count (1 = classic ring)."""
    for name, value, least in (("nodes", nodes, 1), ("clusters", clusters, 1), ("roots", roots, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidSimulation(f"{name} must be a positive int, got {value!r}")
    root_ids = [f"root-{index}" for index in range(roots)]
    return [
        _balance_row(nodes, clusters, root_ids, vnodes=vnodes, probes=count, seed=seed) for count in probes
    ]


class _ActorShape:
    """The bookkeeping a live actor holds besides its task (see the module docstring)."""

    __slots__ = ("built", "failures", "inbox", "last_active", "mailbox", "rebuilds", "root_id", "wanted")

    def __init__(
        self, root_id: str, mailbox: MemoryObjectSendStream[object], inbox: MemoryObjectReceiveStream[object]
    ) -> None:
        self.root_id = root_id
        self.mailbox = mailbox
        self.inbox = inbox
        self.built = 1_000_000 + len(root_id)
        self.wanted = self.built + 1
        self.last_active = time.monotonic()
        self.rebuilds = 0
        self.failures = 0


def _make_actors(count: int) -> dict[str, _ActorShape]:
    actors: dict[str, _ActorShape] = {}
    for index in range(count):
        send, receive = anyio.create_memory_object_stream[object](MAILBOX_SIZE)
        root_id = f"root-{index:08d}"
        actors[root_id] = _ActorShape(root_id, send, receive)
    return actors


def _close_all(actors: dict[str, _ActorShape]) -> None:
    for actor in actors.values():
        actor.mailbox.close()
        actor.inbox.close()


def _measure_live(count: int) -> float:
    actors, used = _traced_bytes(lambda: _make_actors(count))
    _close_all(actors)
    return used / count


async def _park(inbox: MemoryObjectReceiveStream[object]) -> None:
    async with inbox:
        async for _ in inbox:
            pass


async def _measure_with_tasks(count: int) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        actors = _make_actors(count)
        async with anyio.create_task_group() as tg:
            for actor in actors.values():
                tg.start_soon(_park, actor.inbox)
            await anyio.wait_all_tasks_blocked()
            used = tracemalloc.get_traced_memory()[0] - before
            for actor in actors.values():
                actor.mailbox.close()
    finally:
        tracemalloc.stop()
    return used / count


async def _measure_root_actors(count: int) -> float:
    store, cache = MemoryStore(), MemoryCache()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        actors: dict[str, RootActor] = {}
        async with anyio.create_task_group() as tg:
            for index in range(count):
                actor = RootActor(f"root-{index:08d}", store=store, cache=cache, idle_timeout=3600.0)
                actors[actor.root_id] = actor
                await tg.start(actor.run)
            await anyio.wait_all_tasks_blocked()
            used = tracemalloc.get_traced_memory()[0] - before
            tg.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    await cache.aclose()
    return used / count


def _make_passivated(count: int) -> dict[str, int]:
    return {f"root-{index:08d}": 1_000_000 + index for index in range(count)}


def estimate_memory(count: int = 10_000) -> MemoryEstimate:
    """Bytes per live actor shape, the same with its parked task, per passivated root, per RootActor.

    Runs its own event loop for the task figure, so call it from synchronous code."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidSimulation(f"count must be a positive int, got {count!r}")
    live = _measure_live(count)
    with_task = anyio.run(_measure_with_tasks, count)
    passivated = _traced_bytes(lambda: _make_passivated(count))[1] / count
    root_actor = anyio.run(_measure_root_actors, count)
    return MemoryEstimate(count, live, with_task, passivated, root_actor)


def plan_deployment(
    rows: Sequence[RingRow],
    memory: MemoryEstimate,
    *,
    nodes: int = 100,
    roots: int = 10_000_000,
    hot_shares: Iterable[float] = (0.001, 0.01, 0.1),
) -> list[PlanRow]:
    """Per-node needs of a deployment, from the measured row for ``nodes`` (which must be simulated).

    Every root a node owns costs a passivated entry; each hot one also a live `RootActor`."""
    row = next((r for r in rows if r.nodes == nodes), None)
    if row is None:
        raise InvalidSimulation(f"no simulated row for {nodes} nodes: add it to the node counts")
    roots_per_node = -(-roots // nodes)
    plan = []
    for share in hot_shares:
        actors = round(roots_per_node * share)
        plan.append(
            PlanRow(
                nodes=nodes,
                roots=roots,
                hot_share=share,
                roots_per_node=roots_per_node,
                actors_per_node=actors,
                ring_bytes=row.ring_bytes,
                actors_bytes=actors * memory.root_actor_bytes,
                passivated_bytes=roots_per_node * memory.passivated_root_bytes,
            )
        )
    return plan


def _render(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]
    rendered = [header, ["-" * width for width in widths], *lines]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rendered
    )


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def format_table(rows: Sequence[RingRow]) -> str:
    """The ring simulation as an aligned text table."""
    header = [
        "nodes", "vnodes", "probes", "roots", "max/mean", "min/mean", "noise", "join moved", "ideal",
        "leave moved", "ideal", "stray", "build ms", "lookup us", "ring memory",
    ]  # fmt: skip
    lines = [
        [
            str(r.nodes),
            str(r.vnodes),
            str(r.probes),
            str(r.roots),
            f"{r.max_over_mean:.3f}",
            f"{r.min_over_mean:.3f}",
            f"±{r.sampling_noise:.3f}",
            f"{r.moved_on_join:.4f}",
            f"{r.ideal_join:.4f}",
            f"{r.moved_on_leave:.4f}",
            f"{r.ideal_leave:.4f}",
            str(r.stray_moves),
            f"{r.build_ms:.1f}",
            f"{r.lookup_us:.2f}",
            _mib(r.ring_bytes),
        ]
        for r in rows
    ]
    return _render(header, lines)


def format_balance(rows: Sequence[BalanceRow]) -> str:
    """The balance study as an aligned text table."""
    header = ["nodes", "vnodes", "probes", "clusters", "roots", "median max/mean", "p95", "worst max",
              "worst min", "beyond 15%"]  # fmt: skip
    lines = [
        [
            str(r.nodes),
            str(r.vnodes),
            str(r.probes),
            str(r.clusters),
            str(r.roots),
            f"{r.median_max:.3f}",
            f"{r.p95_max:.3f}",
            f"{r.worst_max:.3f}",
            f"{r.worst_min:.3f}",
            f"{r.beyond_15:.0%}",
        ]
        for r in rows
    ]
    return _render(header, lines)


def format_memory(memory: MemoryEstimate) -> str:
    """The memory estimate as an aligned text table."""
    header = ["measured (tracemalloc)", "bytes each", f"per {memory.objects:,}"]
    lines = [
        [name, f"{value:.0f}", _mib(value * memory.objects)]
        for name, value in (
            ("live actor (mailbox + state + dict entry)", memory.live_actor_bytes),
            ("live actor with its parked task", memory.live_actor_with_task_bytes),
            ("passivated root (dict entry id -> int)", memory.passivated_root_bytes),
            ("graphcache RootActor, started and idle", memory.root_actor_bytes),
        )
    ]
    return _render(header, lines)


def format_plan(plan: Sequence[PlanRow]) -> str:
    """The deployment plan as an aligned text table, per node."""
    header = [
        "nodes",
        "roots",
        "hot",
        "roots/node",
        "actors/node",
        "ring",
        "actors",
        "passivated",
        "total/node",
    ]
    lines = [
        [
            str(p.nodes),
            f"{p.roots:,}",
            f"{p.hot_share:.1%}",
            f"{p.roots_per_node:,}",
            f"{p.actors_per_node:,}",
            _mib(p.ring_bytes),
            _mib(p.actors_bytes),
            _mib(p.passivated_bytes),
            _mib(p.total_bytes),
        ]
        for p in plan
    ]
    return _render(header, lines)


def _node_counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphcache.harness._simulate", description=__doc__)
    parser.add_argument(
        "--nodes", type=_node_counts, default=[3, 10, 100, 1000], help="comma list of node counts"
    )
    parser.add_argument("--roots", type=int, default=100_000, help="root ids to place (default 100000)")
    parser.add_argument("--vnodes", type=int, default=128, help="virtual nodes per node (default 128)")
    parser.add_argument(
        "--probes", type=int, default=DEFAULT_PROBES, help="hash probes per lookup, 1 = classic"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the node names")
    parser.add_argument("--memory-objects", type=int, default=10_000, help="objects per memory measurement")
    parser.add_argument(
        "--balance-clusters",
        type=int,
        default=0,
        help="also study balance over this many random 10-node clusters",
    )
    parser.add_argument("--plan-nodes", type=int, default=100, help="deployment plan: node count (simulated)")
    parser.add_argument("--plan-roots", type=int, default=10_000_000, help="deployment plan: total roots")
    args = parser.parse_args(argv)
    rows = simulate_ring(args.nodes, roots=args.roots, vnodes=args.vnodes, probes=args.probes, seed=args.seed)
    print(format_table(rows))
    memory = estimate_memory(args.memory_objects)
    print()
    print(format_memory(memory))
    if any(row.nodes == args.plan_nodes for row in rows):
        print()
        print(format_plan(plan_deployment(rows, memory, nodes=args.plan_nodes, roots=args.plan_roots)))
    if args.balance_clusters:
        print()
        study = balance_study(clusters=args.balance_clusters, vnodes=args.vnodes, seed=args.seed)
        print(format_balance(study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
