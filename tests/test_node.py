"""Node on MemoryStore + MemoryCache: read-through, min_version, strict mode, hand-over, passivation."""

from __future__ import annotations

import random
import re
import time
from collections.abc import AsyncIterator

import anyio
import pytest

from graphcache.actors import (
    ActorOptions,
    InvalidArgument,
    InvalidNodeId,
    Node,
    NodeNotRunning,
    NodeOptions,
    ReadTimeout,
    Ring,
    StaticMembership,
    VersionNotReached,
    graph_key,
)
from graphcache.cache import MemoryCache
from graphcache.storage import Change, Graph, MemoryStore, Upsert
from tests._actor_fakes import (
    BogusChangeStore,
    BrokenFeedStore,
    CursorStore,
    FlakyStore,
    GatedStore,
    ManualMembership,
)
from tests._cache_backends import OffsetClock

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cache() -> AsyncIterator[MemoryCache]:
    async with MemoryCache() as cache:
        yield cache


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    await store.create_root("r", {"name": "root"})
    yield store
    await store.aclose()


async def add_child(store: MemoryStore | Node, root_id: str, child: str) -> int:
    """One write: a new child, so a graph at version v has exactly v - 1 children."""
    return await store.apply(root_id, [Upsert(child, root_id, {"child": child})])


def assert_whole(graph: Graph) -> None:
    assert len(graph.nodes) - 1 == graph.version - 1, f"torn graph: {graph}"


async def cached_version(cache: MemoryCache, root_id: str) -> int | None:
    item = await cache.get(graph_key(root_id), type=Graph)
    return None if item is None else item.version


async def test_concurrent_misses_share_one_load(store: MemoryStore, cache: MemoryCache) -> None:
    """500 concurrent get() misses of one root cause exactly one store load and all get the graph."""
    gated = GatedStore(store)
    results: list[Graph] = []

    async def read(node: Node) -> None:
        results.append(await node.get("r"))

    async with Node(store=gated, cache=cache, node_id="a") as node:
        gated.hold(1)
        async with anyio.create_task_group() as tg:
            for _ in range(500):
                tg.start_soon(read, node)
            await gated.entered.wait()
            await anyio.wait_all_tasks_blocked()  # every reader is waiting on the one load
            gated.release()
        stats = node.statistics()
    assert gated.loads == 1
    assert len(results) == 500
    assert {graph.version for graph in results} == {1}
    assert (stats.reads, stats.read_hits, stats.read_loads) == (500, 0, 1)
    assert await cached_version(cache, "r") == 1


async def test_min_version_never_returns_older(cache: MemoryCache) -> None:
    """get(min_version=v) after a commit of v elsewhere never returns an older graph (G5)."""
    store = MemoryStore(latency=(0.0, 0.001), seed=7)
    roots = [f"r{i}" for i in range(3)]
    for root in roots:
        await store.create_root(root, {})
    checked = 0

    async def write_then_read(node: Node, worker: int) -> None:
        nonlocal checked
        rng = random.Random(worker)
        for i in range(20):
            root = rng.choice(roots)
            version = await add_child(store, root, f"w{worker}-{i}")  # another node's write
            graph = await node.get(root, min_version=version)
            assert graph.version >= version
            assert_whole(graph)
            checked += 1

    async with Node(store=store, cache=cache, node_id="a") as node, anyio.create_task_group() as tg:
        for worker in range(10):
            tg.start_soon(write_then_read, node, worker)
    await store.aclose()
    assert checked == 200


async def test_min_version_beyond_the_store_is_refused(store: MemoryStore, cache: MemoryCache) -> None:
    """Asking for a version the store never committed raises VersionNotReached with both versions."""
    async with Node(store=store, cache=cache, node_id="a") as node:
        with pytest.raises(VersionNotReached, match="committed at version 1, older than 5") as info:
            await node.get("r", min_version=5)
    assert (info.value.min_version, info.value.committed) == (5, 1)


async def test_bounded_serves_the_previous_version_while_strict_does_not(store: MemoryStore) -> None:
    """During a slow rebuild, bounded mode serves the previous graph and strict mode the new one."""
    served = {}
    for consistency in ("bounded", "strict"):
        gated = GatedStore(store)
        async with (
            MemoryCache() as cache,
            Node(store=gated, cache=cache, node_id="a", consistency=consistency) as node,
        ):
            before = await node.get("r")
            gated.hold(1)  # the actor's rebuild will hang
            version = await add_child(node, "r", f"c-{consistency}")
            await gated.entered.wait()
            served[consistency] = ((await node.get("r")).version, before.version, version)
            gated.release()
    assert served["bounded"][0] == served["bounded"][1] < served["bounded"][2]
    assert served["strict"][0] == served["strict"][2]


async def test_strict_readers_never_see_older_than_an_acknowledged_write(cache: MemoryCache) -> None:
    """In strict mode, a read started after apply() returned v sees v or newer, never torn."""
    store = MemoryStore(latency=(0.0, 0.001), seed=3)
    roots = ["s0", "s1"]
    for root in roots:
        await store.create_root(root, {})
    acknowledged = dict.fromkeys(roots, 0)
    reads = 0
    writers_done = anyio.Event()

    async def writer(node: Node, worker: int) -> None:
        for i in range(25):
            root = roots[(worker + i) % 2]
            version = await add_child(node, root, f"w{worker}-{i}")
            acknowledged[root] = max(acknowledged[root], version)

    async def reader(node: Node, seed: int) -> None:
        nonlocal reads
        rng = random.Random(seed)
        while not writers_done.is_set():
            root = rng.choice(roots)
            floor = acknowledged[root]
            graph = await node.get(root)
            assert graph.version >= floor
            assert_whole(graph)
            reads += 1

    node = Node(store=store, cache=cache, node_id="a", consistency="strict")
    async with node, anyio.create_task_group() as tg:
        for seed in range(8):
            tg.start_soon(reader, node, seed)
        async with anyio.create_task_group() as writers:
            for worker in range(8):
                writers.start_soon(writer, node, worker)
        writers_done.set()
    await store.aclose()
    assert reads > 0


async def test_failing_store_recovers_and_the_node_survives(store: MemoryStore, cache: MemoryCache) -> None:
    """A store failing 3 loads then recovering ends with the newest graph cached and 3 failures counted."""
    flaky = FlakyStore(store, failures=3)
    async with Node(store=flaky, cache=cache, node_id="a", retry_initial=0.001, retry_max=0.005) as node:
        version = await add_child(node, "r", "c")
        actor = node.actor("r")
        assert actor is not None
        await actor.until_built(version)
        stats = node.statistics()
        assert (stats.failures, stats.actors_failing, stats.rebuilds) == (3, 0, 1)
        assert (await node.get("r")) == await store.load("r")


async def test_gaining_roots_rereads_the_feed(cache: MemoryCache) -> None:
    """When a member leaves, the node re-reads the feed and caches the roots it took over."""
    store = MemoryStore()
    roots = [f"g{i}" for i in range(40)]
    for root in roots:
        await store.create_root(root, {})
    ring = Ring(["a", "b"])
    theirs = [root for root in roots if ring.owner(root) == "b"]
    assert 0 < len(theirs) < len(roots)
    membership = ManualMembership({"a", "b"})
    async with Node(store=store, cache=cache, node_id="a", membership=membership, handoff=60.0) as node:
        versions = {root: await add_child(store, root, "c") for root in roots}
        await anyio.wait_all_tasks_blocked()
        assert [await cached_version(cache, root) for root in theirs] == [None] * len(theirs)
        before = node.statistics()  # its feed read only its own slots' changes
        assert (before.ignored, before.feed_rows) == (0, len(roots) - len(theirs))
        membership.publish({"a"})  # b is gone
        await anyio.wait_all_tasks_blocked()
        cached = {root: await cached_version(cache, root) for root in roots}
        stats = node.statistics()
    assert cached == versions
    assert (stats.rewinds, stats.rebuilds) == (1, len(roots))  # replayed changes of its own roots cost none


async def test_a_member_leaving_while_the_node_starts_is_not_missed(cache: MemoryCache) -> None:
    """A view change that lands while the feed's first cursor is pinned still re-reads the feed."""
    store = MemoryStore()
    roots = [f"s{i}" for i in range(20)]
    for root in roots:
        await store.create_root(root, {})
    versions = {root: await add_child(store, root, "c") for root in roots}  # before the node starts
    membership = ManualMembership({"a", "b"})

    async def b_leaves() -> None:
        membership.publish({"a"})
        await anyio.wait_all_tasks_blocked()  # the node's view watcher has taken it in

    pinned = CursorStore(store, cursor=40, on_cursor=b_leaves)  # 40 = after every change above
    async with Node(store=pinned, cache=cache, node_id="a", membership=membership, handoff=60.0) as node:
        await anyio.wait_all_tasks_blocked()
        with anyio.fail_after(10):  # a hang guard: a missed rewind leaves the roots without actors
            for root, version in versions.items():
                if (actor := node.actor(root)) is not None:
                    await actor.until_built(version)
        cached = {root: await cached_version(cache, root) for root in roots}
        stats = node.statistics()
    assert cached == versions
    assert stats.rewinds == 1


@pytest.mark.parametrize(("handoff", "rebuilt"), [(60.0, True), (0.0, False)])
async def test_losing_roots_keeps_serving_them_for_the_handoff(
    cache: MemoryCache, handoff: float, rebuilt: bool
) -> None:
    """After a member joins, the node still rebuilds the roots it gave away until ``handoff`` passes."""
    store = MemoryStore()
    roots = [f"j{i}" for i in range(20)]
    for root in roots:
        await store.create_root(root, {})
    moved = next(root for root in roots if Ring(["a", "b"]).owner(root) == "b")
    membership = ManualMembership({"a"})
    async with Node(store=store, cache=cache, node_id="a", membership=membership, handoff=handoff) as node:
        membership.publish({"a", "b"})
        await anyio.wait_all_tasks_blocked()
        assert node.owns(moved) is rebuilt
        version = await add_child(store, moved, "c")
        await anyio.wait_all_tasks_blocked()
    assert (await cached_version(cache, moved) == version) is rebuilt


async def test_a_failed_feed_resumes_from_its_last_cursor(cache: MemoryCache) -> None:
    """When the change feed fails, the node reopens it after the last change it saw and misses none."""
    store = MemoryStore()
    roots = [f"f{i}" for i in range(10)]
    for root in roots:
        await store.create_root(root, {})
    broken = BrokenFeedStore(store, good=3)
    async with Node(store=broken, cache=cache, node_id="a", retry_initial=0.001) as node:
        versions = {root: await add_child(store, root, "c") for root in roots}
        with anyio.fail_after(10):
            await broken.reopened.wait()
        await anyio.wait_all_tasks_blocked()
        cached = {root: await cached_version(cache, root) for root in roots}
        stats = node.statistics()
    assert cached == versions
    assert broken.opened_after == [10, 13]  # pinned after the 10 creates, then after the third change
    assert (stats.notifications, stats.rebuilds) == (10, 10)


@pytest.mark.parametrize("bogus", [Change("", 2, 0), Change("r", -1, 0)], ids=["empty-root", "negative"])
async def test_a_malformed_change_is_ignored_and_the_feed_goes_on(
    store: MemoryStore, cache: MemoryCache, bogus: Change
) -> None:
    """A change with an unusable root id or version is logged and skipped; later ones are still routed."""
    async with Node(store=BogusChangeStore(store, bogus), cache=cache, node_id="a") as node:
        version = await add_child(store, "r", "c")
        await anyio.wait_all_tasks_blocked()
        stats = node.statistics()
    assert (stats.ignored, stats.notifications, stats.rebuilds) == (1, 1, 1)
    assert await cached_version(cache, "r") == version


async def test_idle_actors_passivate_after_many_roots(cache: MemoryCache) -> None:
    """After touching 10,000 roots and idling, no actor is left alive; a woken root rebuilds once."""
    store = MemoryStore()
    roots = [f"p{i}" for i in range(10_000)]
    for root in roots:
        await store.create_root(root, {})
    async with Node(store=store, cache=cache, node_id="a", idle_timeout=0.05) as node:
        started = time.monotonic()
        for root in roots:
            node.refresh(root)
        spawned = time.monotonic()
        peak = node.statistics().actors_alive
        deadline = spawned + 30
        while node.statistics().actors_alive > 0:
            assert time.monotonic() < deadline, node.statistics()
            await anyio.sleep(0.05)
        rebuilds = node.statistics().rebuilds
        idle = time.monotonic()
        print(f"\n10,000 actors: spawned in {spawned - started:.2f}s, none alive after {idle - started:.2f}s")
        version = await add_child(store, roots[0], "c")  # through the feed
        await add_child(node, roots[1], "c")  # nudged, and through the feed again
        await anyio.wait_all_tasks_blocked()
        stats = node.statistics()
    assert (peak, rebuilds) == (10_000, 10_000)
    assert stats.rebuilds == 10_002
    assert await cached_version(cache, roots[0]) == version


async def test_shutdown_lets_an_in_flight_rebuild_finish(store: MemoryStore, cache: MemoryCache) -> None:
    """Leaving the node waits for a rebuild in flight, which then lands in the cache."""
    gated = GatedStore(store)

    async def release_once_the_node_waits() -> None:
        await anyio.wait_all_tasks_blocked()
        gated.release()

    node = Node(store=gated, cache=cache, node_id="a", shutdown_timeout=60)
    async with anyio.create_task_group() as tg, node:
        gated.hold(1)
        version = await add_child(node, "r", "c")
        await gated.entered.wait()
        tg.start_soon(release_once_the_node_waits)
    assert node.statistics()[2:4] == (0, 0)  # no actor alive, none failing
    assert await cached_version(cache, "r") == version


async def test_shutdown_abandons_a_stuck_rebuild_safely(store: MemoryStore, cache: MemoryCache) -> None:
    """A rebuild still stuck after shutdown_timeout is cancelled: nothing half-done is cached."""
    gated = GatedStore(store)
    async with Node(store=gated, cache=cache, node_id="a", shutdown_timeout=0.01) as node:
        gated.hold(1)
        await add_child(node, "r", "c")
        await gated.entered.wait()
        actor = node.actor("r")
    assert actor is not None
    assert not actor.alive
    assert node.statistics()[2:4] == (0, 0)
    assert await cached_version(cache, "r") is None


async def test_read_timeout(store: MemoryStore, cache: MemoryCache) -> None:
    """A read that cannot finish in time raises ReadTimeout (also a TimeoutError)."""
    gated = GatedStore(store)
    async with Node(store=gated, cache=cache, node_id="a") as node:
        gated.hold(1)
        with pytest.raises(ReadTimeout, match=re.escape("'r' did not finish within 0.05s")):
            await node.get("r", timeout=0.05)
        gated.release()
        assert isinstance(ReadTimeout("x"), TimeoutError)


async def test_repr_and_statistics(store: MemoryStore, cache: MemoryCache) -> None:
    """repr and statistics() show membership, actors and counters as they change."""
    node = Node(store=store, cache=cache, node_id="a", membership=StaticMembership(["a"]))
    assert repr(node) == (
        "<Node 'a' stopped bounded [members: 0 | actors: 0 | notifications: 0, coalesced: 0, rebuilds: 0]>"
    )
    async with node:
        version = await add_child(node, "r", "c")
        actor = node.actor("r")
        assert actor is not None
        await actor.until_built(version)
        await anyio.wait_all_tasks_blocked()  # the feed's copy of the change has arrived too
        assert repr(node) == (
            "<Node 'a' running bounded [members: 1 | actors: 1 | "
            "notifications: 2, coalesced: 1, rebuilds: 1]>"
        )
        assert (await node.get("r")).version == version
        stats = node.statistics()
    assert stats[:17] == ("a", 1, 1, 0, 0, 2, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0)
    assert (stats.lag.samples, stats.rebuild_seconds.samples) == (1, 1)
    assert repr(node).startswith("<Node 'a' stopped bounded [members: 1 | actors: 0 |")


async def test_use_outside_async_with_is_refused(store: MemoryStore, cache: MemoryCache) -> None:
    """get/apply on a node that is not running raise NodeNotRunning before touching the store."""
    node = Node(store=store, cache=cache, node_id="a")
    with pytest.raises(NodeNotRunning):
        await node.get("r")
    with pytest.raises(NodeNotRunning):
        await add_child(node, "r", "c")
    assert await store.version("r") == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"root_id": ""}, "root_id must not be empty"),
        ({"root_id": "x" * 1001}, "root_id is 1001 UTF-8 bytes"),
        ({"min_version": -1}, "min_version must be in 0..2**63-1"),
        ({"min_version": 1.0}, "min_version must be an int, not float"),
        ({"timeout": 0}, "timeout must be a finite number of seconds > 0, got 0"),
    ],
)
async def test_bad_read_arguments_are_refused(
    store: MemoryStore, cache: MemoryCache, call: dict[str, object], message: str
) -> None:
    """Malformed get() arguments raise InvalidArgument before any I/O."""
    gated = GatedStore(store)
    async with Node(store=gated, cache=cache, node_id="a") as node:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            await node.get(**({"root_id": "r"} | call))  # type: ignore[arg-type]
        assert (gated.loads, node.statistics().reads) == (0, 0)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"node_id": ""}, "node_id must be a non-empty str, got ''"),
        ({"consistency": "eventual"}, "consistency must be one of ('bounded', 'strict'), got 'eventual'"),
        ({"handoff": -1}, "handoff must be a finite number of seconds >= 0, got -1"),
        ({"mailbox_size": 0}, "mailbox_size must be an int >= 1, got 0"),
        ({"mailbox_size": True}, "mailbox_size must be an int >= 1, got True"),
        ({"feed_after": -3}, "feed_after must be an int in 0..2**63-1 or None, got -3"),
        (
            {"min_rebuild_interval": float("nan")},
            "min_rebuild_interval must be a finite number of seconds >= 0",
        ),
        ({"idle_timeout": float("inf")}, "idle_timeout must be a finite number of seconds > 0, got inf"),
        ({"graph_ttl": 0}, "graph_ttl must be a finite number of seconds > 0 or None, got 0"),
        ({"sweep_interval": "60"}, "sweep_interval must be a finite number of seconds > 0, got '60'"),
    ],
)
def test_bad_node_options_are_refused(option: dict[str, object], message: str) -> None:
    """Malformed Node options raise InvalidArgument naming the option, what it must be and what it was."""
    options: dict[str, object] = {"store": MemoryStore(), "cache": MemoryCache(), "node_id": "a"} | option
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        Node(**options)  # type: ignore[arg-type]


def test_a_bad_node_id_is_the_rings_invalid_node_id() -> None:
    """node_id is checked with the other options, and its error is still InvalidNodeId."""
    for bad in ("", None, 7):
        with pytest.raises(InvalidNodeId, match="node_id must be a non-empty str"):
            Node(store=MemoryStore(), cache=MemoryCache(), node_id=bad)  # type: ignore[arg-type]


def test_node_options_are_checked_once_and_shown_on_the_node() -> None:
    """Node(...) gathers its keywords into one NodeOptions; the actors' options land in .actor."""
    store, cache = MemoryStore(), MemoryCache()
    node = Node(store=store, cache=cache, node_id="a", idle_timeout=7, handoff=0, graph_ttl=9)
    assert node.options == NodeOptions.create(node_id="a", idle_timeout=7, handoff=0, graph_ttl=9)
    assert node.options.actor == ActorOptions.create(idle_timeout=7)
    assert (node.options.handoff, node.options.graph_ttl, node.options.feed_after) == (0.0, 9.0, None)
    assert (node.store, node.cache) == (store, cache)
    with pytest.raises(AttributeError):
        node.options.handoff = 5  # type: ignore[misc]
    nested = NodeOptions.create(node_id="a", actor=ActorOptions.create(idle_timeout=7))
    assert nested.actor == node.options.actor
    with pytest.raises(InvalidArgument, match="not both"):
        NodeOptions.create(node_id="a", idle_timeout=7, actor=ActorOptions())


async def test_every_graph_the_node_caches_expires_after_graph_ttl(store: MemoryStore) -> None:
    """graph_ttl: a read-through's put and a rebuild's put both expire after it (None: never)."""
    clock = OffsetClock()
    async with (
        MemoryCache(clock=clock) as cache,
        Node(store=store, cache=cache, node_id="a", graph_ttl=60) as node,
    ):
        await node.get("r")  # read through
        assert await cached_version(cache, "r") == 1
        clock.advance(61)
        assert await cached_version(cache, "r") is None
        version = await add_child(node, "r", "c")  # rebuilt by the actor
        actor = node.actor("r")
        assert actor is not None
        await actor.until_built(version)
        assert await cached_version(cache, "r") == version
        clock.advance(61)
        assert await cached_version(cache, "r") is None
    async with MemoryCache(clock=clock) as cache, Node(store=store, cache=cache, node_id="b") as node:
        await node.get("r")
        clock.advance(10**6)
        assert await cached_version(cache, "r") == version
