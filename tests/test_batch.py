"""Rebuilder: the rebuilds that start together share one load_many and one pipelined put."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from graphcache.actors import InvalidArgument, Node, Rebuilder, graph_key
from graphcache.actors._stats import Counters
from graphcache.cache import MemoryCache, ValueTooLarge
from graphcache.storage import Graph, MemoryStore, RootNotFound, StoreUnavailable, Upsert
from tests._actor_fakes import BatchStore, WrappedStore

pytestmark = pytest.mark.anyio

ROOTS = [f"r{index}" for index in range(10)]


@pytest.fixture
async def memory() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    for root_id in ROOTS:
        await store.create_root(root_id, {"name": root_id})
        await store.apply(root_id, [Upsert(f"{root_id}-c", root_id, {"n": 1})])
    yield store
    await store.aclose()


@pytest.fixture
def store(memory: MemoryStore) -> BatchStore:
    return BatchStore(memory)


class CountingCache(MemoryCache):
    """A MemoryCache that records the size (and the ttl) of each put_many_if_newer call."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.put_batches: list[int] = []
        self.put_ttls: list[float | None] = []

    async def put_many_if_newer(self, items: Any, *, ttl: float | None = None) -> list[bool]:
        self.put_batches.append(len(items))
        self.put_ttls.append(ttl)
        return await super().put_many_if_newer(items, ttl=ttl)


async def rebuild_all(rebuilder: Rebuilder, root_ids: list[str]) -> dict[str, Any]:
    """Start one rebuild per root at once; each root's (graph, stored) or the exception it raised."""
    results: dict[str, Any] = {}

    async def one(root_id: str) -> None:
        try:
            results[root_id] = await rebuilder.rebuild(root_id)
        except Exception as exc:
            results[root_id] = exc

    async with anyio.create_task_group() as tg:
        for root_id in root_ids:
            tg.start_soon(one, root_id)
    return results


async def test_rebuilds_started_together_share_one_load_and_one_put(
    store: BatchStore, memory: MemoryStore
) -> None:
    """Ten rebuilds started at once: one load_many of all ten, one put of all ten, each its own graph."""
    cache = CountingCache()
    rebuilder = Rebuilder(store, cache)
    results = await rebuild_all(rebuilder, ROOTS)
    assert store.batches == [ROOTS]
    assert cache.put_batches == [10]
    assert rebuilder.batches == 1
    for root_id in ROOTS:
        graph = await memory.load(root_id)
        assert results[root_id] == (graph, True)
        item = await cache.get(graph_key(root_id), type=Graph)
        assert item is not None
        assert (item.value, item.version) == (graph, 2)


async def test_a_rebuild_of_an_already_cached_version_reports_not_stored(store: BatchStore) -> None:
    """The put is set-if-newer: a second rebuild of the same versions stores nothing and says so."""
    rebuilder = Rebuilder(store, MemoryCache())
    await rebuild_all(rebuilder, ROOTS[:3])
    again = await rebuild_all(rebuilder, ROOTS[:3])
    assert [again[root_id][1] for root_id in ROOTS[:3]] == [False, False, False]


async def test_rebuilds_arriving_during_a_flush_go_together_in_the_next(store: BatchStore) -> None:
    """With one flush slot busy, every rebuild that arrives meanwhile joins one batch."""
    rebuilder = Rebuilder(store, MemoryCache(), max_flushes=1)
    store.hold()
    async with anyio.create_task_group() as tg:
        tg.start_soon(rebuilder.rebuild, "r0")
        await store.entered.wait()
        for root_id in ROOTS[1:]:
            tg.start_soon(rebuilder.rebuild, root_id)
        await anyio.wait_all_tasks_blocked()
        assert store.batches == [["r0"]]
        store.release()
    assert store.batches == [["r0"], ROOTS[1:]]
    assert rebuilder.batches == 2


async def test_max_batch_splits_a_large_burst(store: BatchStore) -> None:
    """No batch holds more than max_batch roots."""
    rebuilder = Rebuilder(store, MemoryCache(), max_batch=4)
    results = await rebuild_all(rebuilder, ROOTS)
    assert [len(batch) for batch in store.batches] == [4, 4, 2]
    assert sorted(root_id for batch in store.batches for root_id in batch) == sorted(ROOTS)
    assert all(isinstance(result, tuple) for result in results.values())


async def test_the_same_root_twice_goes_in_two_batches(store: BatchStore) -> None:
    """Two rebuilds of one root never share a batch (the second may want a newer snapshot)."""
    rebuilder = Rebuilder(store, MemoryCache())
    async with anyio.create_task_group() as tg:
        tg.start_soon(rebuilder.rebuild, "r0")
        tg.start_soon(rebuilder.rebuild, "r0")
        tg.start_soon(rebuilder.rebuild, "r1")
    assert store.batches == [["r0"], ["r0", "r1"]]


async def test_an_unknown_root_fails_alone(store: BatchStore) -> None:
    """A root the store does not have gets RootNotFound; the others in its batch are cached."""
    cache = MemoryCache()
    results = await rebuild_all(Rebuilder(store, cache), ["r0", "ghost", "r1"])
    assert isinstance(results["ghost"], RootNotFound)
    assert results["r0"][1] is True
    assert results["r1"][1] is True
    assert await cache.get(graph_key("ghost")) is None


async def test_a_graph_the_cache_refuses_fails_alone(store: BatchStore, memory: MemoryStore) -> None:
    """One graph over the cache's size limit raises ValueTooLarge for its own rebuild only."""
    await memory.apply("r1", [Upsert("big", "r1", {"blob": "x" * 4096})])
    cache = MemoryCache(max_value_bytes=2048)
    results = await rebuild_all(Rebuilder(store, cache), ["r0", "r1", "r2"])
    assert isinstance(results["r1"], ValueTooLarge)
    assert [results[root_id][1] for root_id in ("r0", "r2")] == [True, True]
    assert await cache.get(graph_key("r1")) is None


async def test_a_failed_load_fails_every_rebuild_of_its_batch(store: BatchStore) -> None:
    """A store outage during a batch's load reaches each rebuild in it; the next batch works."""
    rebuilder = Rebuilder(store, MemoryCache())
    store.fail_next = 1
    failed = await rebuild_all(rebuilder, ROOTS[:4])
    assert all(isinstance(result, StoreUnavailable) for result in failed.values())
    recovered = await rebuild_all(rebuilder, ROOTS[:4])
    assert all(result[1] is True for result in recovered.values())


async def test_a_cancelled_leader_does_not_strand_its_batch(store: BatchStore) -> None:
    """The rebuild that opened a batch is cancelled before it flushes; the others still finish."""
    rebuilder = Rebuilder(store, MemoryCache(), max_flushes=1)
    store.hold()
    results: dict[str, Any] = {}

    async def follower(root_id: str) -> None:
        results[root_id] = await rebuilder.rebuild(root_id)

    with anyio.fail_after(10):  # a hang guard: a stranded batch would wait forever
        await _cancel_a_leader(rebuilder, store, follower)
    assert set(results) == {"r2", "r3"}
    assert all(result[1] is True for result in results.values())
    assert ["r2", "r3"] in store.batches


async def _cancel_a_leader(rebuilder: Rebuilder, store: BatchStore, follower: Any) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(rebuilder.rebuild, "r0")  # takes the only flush slot and holds it
        await store.entered.wait()
        with anyio.CancelScope() as leader_scope:
            async with anyio.create_task_group() as leader_group:
                leader_group.start_soon(rebuilder.rebuild, "r1")  # opens the next batch, waits for the slot
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(follower, "r2")
                tg.start_soon(follower, "r3")
                await anyio.wait_all_tasks_blocked()
                leader_scope.cancel()
        store.release()


async def test_a_store_without_load_many_gets_one_load_per_root(memory: MemoryStore) -> None:
    """A plain GraphStore (no load_many) is loaded root by root, still in one flush."""
    plain = WrappedStore(memory)
    rebuilder = Rebuilder(plain, MemoryCache())
    results = await rebuild_all(rebuilder, [*ROOTS[:5], "ghost"])
    assert plain.loads == 6
    assert rebuilder.batches == 1
    assert isinstance(results["ghost"], RootNotFound)
    assert all(results[root_id][1] is True for root_id in ROOTS[:5])


async def test_every_put_carries_the_rebuilders_ttl(store: BatchStore) -> None:
    """Rebuilder(ttl=s): each batched put carries it (a Node passes its graph_ttl); None by default."""
    cache = CountingCache()
    timed = Rebuilder(store, cache, ttl=5)
    assert timed.ttl == 5.0
    await rebuild_all(timed, ROOTS[:3])
    await rebuild_all(Rebuilder(store, cache), ROOTS[3:6])
    assert cache.put_ttls == [5.0, None]


async def test_a_rebuilder_adds_to_the_counters_it_is_given(store: BatchStore) -> None:
    """batches and recreated are the shared Counters' rebuild_batches and keys_recreated."""
    counters = Counters()
    rebuilder = Rebuilder(store, MemoryCache(), counters=counters)
    await rebuild_all(rebuilder, ROOTS[:4])
    assert rebuilder.batches == counters.rebuild_batches == 1
    assert rebuilder.recreated == counters.keys_recreated == 0


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch": 0},
        {"max_batch": True},
        {"max_batch": "8"},
        {"max_flushes": 0},
        {"remember_leases": 1.5},
        {"ttl": 0},
        {"ttl": float("nan")},
    ],
)
async def test_bad_options_are_refused(store: BatchStore, options: dict[str, Any]) -> None:
    """max_batch, max_flushes and remember_leases must be ints >= 1, ttl None or seconds > 0."""
    with pytest.raises(InvalidArgument, match=next(iter(options))):
        Rebuilder(store, MemoryCache(), **options)


async def test_a_node_batches_the_rebuilds_of_roots_changed_together(store: BatchStore) -> None:
    """Ten roots change while the store is slow: the node rebuilds them all in at most three batches."""
    async with MemoryCache() as cache, Node(store=store, cache=cache, node_id="n") as node:
        store.hold()
        for root_id in ROOTS:
            await node.apply(root_id, [Upsert(f"{root_id}-c", root_id, {"n": 2})])
        await store.entered.wait()
        await anyio.wait_all_tasks_blocked()
        store.release()
        with anyio.fail_after(10):  # a hang guard, not a performance bound
            for root_id in ROOTS:
                await node.actor(root_id).until_built(3)  # type: ignore[union-attr]
        stats = node.statistics()
    assert stats.rebuilds == len(ROOTS)
    assert stats.rebuild_batches <= 3
    assert len(store.batches) == stats.rebuild_batches
