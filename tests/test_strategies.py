"""Each re-cache strategy does what its name says, on the memory backends, step by step."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from graphcache.actors import graph_key
from graphcache.cache import MemoryCache
from graphcache.harness._loadtest import _share
from graphcache.harness._strategies import NAMES, STRATEGIES, Tally
from graphcache.harness._workload import RootPicker, SlowLoads, initial_graph, root_ids, write_ops
from graphcache.storage import Graph, GraphStore, MemoryStore, Upsert
from tests._actor_fakes import WrappedStore

pytestmark = pytest.mark.anyio
ROOT = "root-00000"


@pytest.fixture
async def backends() -> AsyncIterator[tuple[MemoryStore, MemoryCache]]:
    async with MemoryStore() as store, MemoryCache() as cache:
        await store.create_root(ROOT, {"root": ROOT})
        yield store, cache


async def commit(store: MemoryStore, seq: int) -> int:
    return await store.apply(ROOT, write_ops(ROOT, 0, seq))


async def cached(cache: MemoryCache) -> Graph | None:
    item = await cache.get(graph_key(ROOT), type=Graph)
    return None if item is None else item.value


class CommitDuringLoad(WrappedStore):
    """A store whose next ``load`` commits one more change first: the race window, made certain."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store)
        self.store = store
        self.armed = True

    async def load(self, root_id: str) -> Graph:
        if self.armed:
            self.armed = False
            await self.store.apply(root_id, write_ops(root_id, 9, 9))
        return await self.store.load(root_id)


async def test_wrapped_stores_keep_the_protocol(backends: tuple[MemoryStore, MemoryCache]) -> None:
    """SlowLoads and this file's racing wrapper still implement every GraphStore method."""
    store, _ = backends
    assert isinstance(SlowLoads(store, 0.0), GraphStore)
    assert isinstance(CommitDuringLoad(store), GraphStore)


def test_compare_order_lists_every_strategy_once() -> None:
    """--compare runs graphcache first and the no-cache ceiling last, each strategy once."""
    assert NAMES == ("actor", "cas", "naive", "checkset", "lock", "none")
    assert set(NAMES) == set(STRATEGIES)


async def test_cas_caches_the_committed_snapshot(backends: tuple[MemoryStore, MemoryCache]) -> None:
    """cas loads one snapshot after the write and caches it under its own version."""
    store, cache = backends
    version = await commit(store, 0)
    tally = Tally(updates=1)
    await STRATEGIES["cas"].after_write(store, cache, ROOT, version, tally)
    assert await cached(cache) == await store.load(ROOT)
    assert (tally.rebuilds, tally.refused) == (1, 0)


async def test_cas_counts_a_refused_put(backends: tuple[MemoryStore, MemoryCache]) -> None:
    """cas never overwrites a newer cached graph; the refusal is counted, not raised."""
    store, cache = backends
    await commit(store, 0)
    newer = Graph(ROOT, 99, {})
    assert await cache.put_if_newer(graph_key(ROOT), newer, 99)
    tally = Tally()
    await STRATEGIES["cas"].after_write(store, cache, ROOT, 2, tally)
    assert await cached(cache) == newer
    assert (tally.rebuilds, tally.refused) == (1, 1)


async def test_naive_overwrites_a_newer_graph(backends: tuple[MemoryStore, MemoryCache]) -> None:
    """naive blind-sets what it read, even over a newer cached graph: the regression, by construction."""
    store, cache = backends
    version = await commit(store, 0)
    await cache.insert(graph_key(ROOT), Graph(ROOT, 99, {}))
    await STRATEGIES["naive"].after_write(store, cache, ROOT, version, Tally())
    graph = await cached(cache)
    assert graph is not None
    assert graph.version == version


async def test_naive_stamps_new_children_with_the_old_version(
    backends: tuple[MemoryStore, MemoryCache],
) -> None:
    """naive reads the version, then the children: a commit in between yields a torn graph."""
    store, cache = backends
    version = await commit(store, 0)
    racing = CommitDuringLoad(store)
    await STRATEGIES["naive"].after_write(racing, cache, ROOT, version, Tally())
    graph = await cached(cache)
    assert graph is not None
    assert graph.version == version
    assert graph.nodes == (await store.load(ROOT)).nodes
    assert await store.version(ROOT) == version + 1


async def test_checkset_skips_when_the_version_moved(backends: tuple[MemoryStore, MemoryCache]) -> None:
    """checkset re-reads the version and caches nothing when a commit slipped in; the skip is counted."""
    store, cache = backends
    version = await commit(store, 0)
    tally = Tally()
    await STRATEGIES["checkset"].after_write(CommitDuringLoad(store), cache, ROOT, version, tally)
    assert await cached(cache) is None
    assert (tally.rebuilds, tally.refused) == (1, 1)


async def test_checkset_caches_when_nothing_moved(backends: tuple[MemoryStore, MemoryCache]) -> None:
    """Without a concurrent commit, checkset caches the graph it read."""
    store, cache = backends
    version = await commit(store, 0)
    await STRATEGIES["checkset"].after_write(store, cache, ROOT, version, Tally())
    graph = await cached(cache)
    assert graph is not None
    assert graph.nodes == (await store.load(ROOT)).nodes


async def test_lock_caches_under_the_lock_and_releases_it(backends: tuple[MemoryStore, MemoryCache]) -> None:
    """lock loads and sets while holding the cache lock, then the key is free again."""
    store, cache = backends
    version = await commit(store, 0)
    tally = Tally()
    await STRATEGIES["lock"].after_write(store, cache, ROOT, version, tally)
    graph = await cached(cache)
    assert graph == await store.load(ROOT)
    _, handle = await cache.get_and_lock(graph_key(ROOT), lock_timeout=1.0)
    await cache.unlock(graph_key(ROOT), handle)
    assert (tally.rebuilds, tally.refused) == (1, 0)


async def test_lock_gives_up_when_the_lock_stays_held(
    backends: tuple[MemoryStore, MemoryCache], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that cannot get the lock within its wait leaves the rebuild to the holder (counted)."""
    store, cache = backends
    monkeypatch.setattr(type(STRATEGIES["lock"]), "wait", 0.05)
    version = await commit(store, 0)
    _, held = await cache.get_and_lock(graph_key(ROOT), lock_timeout=30.0)
    tally = Tally()
    await STRATEGIES["lock"].after_write(store, cache, ROOT, version, tally)
    await cache.unlock(graph_key(ROOT), held)
    assert await cached(cache) is None
    assert (tally.rebuilds, tally.refused) == (0, 1)


@pytest.mark.parametrize("name", ["actor", "none"])
async def test_writer_side_does_nothing(backends: tuple[MemoryStore, MemoryCache], name: str) -> None:
    """actor (the Nodes rebuild) and none leave the cache alone after a write."""
    store, cache = backends
    version = await commit(store, 0)
    tally = Tally()
    await STRATEGIES[name].after_write(store, cache, ROOT, version, tally)
    assert await cached(cache) is None
    assert tally == Tally()


def test_zipf_favours_the_first_roots_and_uniform_does_not() -> None:
    """Under zipf the first root is picked far more than the last; uniform picks each about equally."""
    roots = root_ids(8)
    zipf = RootPicker(roots, dist="zipf", zipf_s=1.1, rng=random.Random(1))
    uniform = RootPicker(roots, dist="uniform", zipf_s=1.1, rng=random.Random(1))
    z = Counter(zipf.pick() for _ in range(20_000))
    u = Counter(uniform.pick() for _ in range(20_000))
    assert z[roots[0]] > 5 * z[roots[-1]]
    assert set(u) == set(roots)
    assert max(u.values()) < 1.2 * min(u.values())


def test_picker_is_deterministic_per_seed() -> None:
    """The same seed picks the same roots in the same order, so every strategy gets the same workload."""
    roots = root_ids(100)
    first = RootPicker(roots, dist="zipf", zipf_s=1.1, rng=random.Random("1:writer:3"))
    second = RootPicker(roots, dist="zipf", zipf_s=1.1, rng=random.Random("1:writer:3"))
    assert [first.pick() for _ in range(500)] == [second.pick() for _ in range(500)]


def test_picker_refuses_no_roots() -> None:
    """A workload without roots is a clear ValueError."""
    with pytest.raises(ValueError, match="at least one root"):
        RootPicker([], dist="uniform", zipf_s=1.0, rng=random.Random(0))


def test_every_write_changes_the_graph_content() -> None:
    """Two writes never upsert the same data, so each committed version hashes differently."""
    ops = [op for writer in range(8) for seq in range(50) for op in write_ops(ROOT, writer, seq)]
    assert all(isinstance(op, Upsert) and op.parent_id == ROOT for op in ops)
    assert len({(op.node_id, tuple(sorted(op.data.items()))) for op in ops if isinstance(op, Upsert)}) == len(
        ops
    )


async def test_initial_graph_matches_what_the_store_creates(
    backends: tuple[MemoryStore, MemoryCache],
) -> None:
    """The create event's graph is exactly what create_root commits."""
    store, _ = backends
    created = await store.load(ROOT)
    expected = initial_graph(ROOT)
    assert (created.version, set(created.nodes)) == (expected.version, set(expected.nodes))
    assert created.nodes[ROOT].data == expected.nodes[ROOT].data


@pytest.mark.parametrize(("tasks", "procs"), [(64, 2), (10, 3), (3, 3), (7, 1)])
def test_tasks_spread_evenly_over_processes(tasks: int, procs: int) -> None:
    """Writer tasks split into contiguous, non-overlapping slices that differ in size by at most one."""
    slices = [_share(tasks, procs, i) for i in range(procs)]
    numbers = [n for first, count in slices for n in range(first, first + count)]
    assert numbers == list(range(tasks))
    sizes = [count for _, count in slices]
    assert max(sizes) - min(sizes) <= 1
