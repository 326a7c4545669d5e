"""Three Nodes with disagreeing views on real Redis and PostgreSQL: safety never depends on placement."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from graphcache.actors import Consistency, Node, StaticMembership, graph_key
from graphcache.cache import RedisCache
from graphcache.storage import Graph, PostgresStore, Upsert

pytestmark = pytest.mark.anyio

ROOTS = [f"split-{i}" for i in range(6)]
VIEWS = {"a": ["a"], "b": ["b"], "c": ["a", "c"]}  # a and b own every root, c about half: 2 or 3 owners


@pytest.fixture
async def store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStore]:
    store = await PostgresStore.connect(postgres_dsn, schema=pg_schema)
    yield store
    await store.aclose()


@pytest.fixture
async def caches(redis_url: str, namespace: str) -> AsyncIterator[list[RedisCache]]:
    caches = [RedisCache.from_url(redis_url, namespace=namespace) for _ in VIEWS]
    yield caches
    for cache in caches:
        await cache.aclose()
    client = aioredis.Redis.from_url(redis_url)
    keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


class History:
    """The newest version any reader has seen per root, checked at each read's start (G1)."""

    def __init__(self) -> None:
        self.seen = dict.fromkeys(ROOTS, 0)
        self.reads = 0

    def floor(self, root_id: str) -> int:
        return self.seen[root_id]

    def record(self, graph: Graph, floor: int) -> None:
        assert graph.version >= floor, f"G1: {graph.root_id} went from {floor} down to {graph.version}"
        assert len(graph.nodes) == graph.version, f"G2: torn graph at version {graph.version}"
        self.seen[graph.root_id] = max(self.seen[graph.root_id], graph.version)
        self.reads += 1


async def write_many(nodes: list[Node], store: PostgresStore, worker: int) -> None:
    rng = random.Random(worker)
    for i in range(25):
        root = rng.choice(ROOTS)
        ops = [Upsert(f"w{worker}-{i}", root, {"worker": worker, "i": i})]
        if rng.random() < 0.5:
            await rng.choice(nodes).apply(root, ops)
        else:
            await store.apply(root, ops)  # a writer that knows nothing of the nodes


async def read_until(nodes: list[Node], history: History, done: anyio.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not done.is_set():
        root = rng.choice(ROOTS)
        floor = history.floor(root)
        history.record(await rng.choice(nodes).get(root), floor)


async def wait_converged(cache: RedisCache, store: PostgresStore, deadline: float) -> dict[str, int | None]:
    """Poll until every root's cached version is the committed one (G3) or the deadline passes."""
    while True:
        cached: dict[str, int | None] = {}
        for root in ROOTS:
            item = await cache.get(graph_key(root), type=Graph)
            cached[root] = None if item is None else item.version
        committed = {root: await store.version(root) for root in ROOTS}
        if cached == committed or time.monotonic() > deadline:
            return cached
        await anyio.sleep(0.05)


def split_node(store: PostgresStore, cache: RedisCache, node_id: str, consistency: Consistency) -> Node:
    membership = StaticMembership(VIEWS[node_id])
    return Node(store=store, cache=cache, node_id=node_id, membership=membership, consistency=consistency)


@pytest.mark.parametrize("consistency", ["bounded", "strict"])
async def test_split_views_keep_g1_g2_g3(
    store: PostgresStore, caches: list[RedisCache], consistency: Consistency
) -> None:
    """Nodes that each think they own the roots, under concurrent writes: no regression, no torn graph,
    and the cache converges to the committed versions once writes stop."""
    for root in ROOTS:
        await store.create_root(root, {"root": root})
    history = History()
    done = anyio.Event()
    async with (
        split_node(store, caches[0], "a", consistency) as a,
        split_node(store, caches[1], "b", consistency) as b,
        split_node(store, caches[2], "c", consistency) as c,
    ):
        nodes = [a, b, c]
        async with anyio.create_task_group() as readers:
            for seed in range(6):
                readers.start_soon(read_until, nodes, history, done, seed)
            async with anyio.create_task_group() as writers:
                for worker in range(6):
                    writers.start_soon(write_many, nodes, store, worker)
            done.set()
        cached = await wait_converged(caches[0], store, time.monotonic() + 20)
        stats = [node.statistics() for node in nodes]
    committed = {root: await store.version(root) for root in ROOTS}
    assert cached == committed
    assert sum(committed.values()) == len(ROOTS) + 150
    assert history.reads > 0
    assert all(s.rebuilds > 0 for s in stats)
    assert stats[2].feed_rows < sum(committed.values())  # c reads only its own slots: its view gives a some
