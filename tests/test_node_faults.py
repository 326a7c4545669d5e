"""Nodes on a bad day: PostgreSQL killed and restarted, every node down while commits go on, Redis losing its
data under a rebuild, malformed cache entries. Each test first asserts that its fault really fired, then
checks the guarantees: the node keeps running (G6), no reader sees an older version than one seen
before (G1), every graph read is whole (G2), and the cache converges when writes stop (G3)."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import asyncpg
import msgspec
import pytest
import redis.asyncio as aioredis

from graphcache.actors import Node, StaticMembership, graph_key
from graphcache.cache import CacheError, RedisCache
from graphcache.storage import (
    ConcurrencyConflict,
    Graph,
    MemoryStore,
    PostgresStore,
    StoreError,
    StoreUnavailable,
    Upsert,
)
from tests._actor_fakes import GatedStore
from tests._history import Reads, graph_is_whole
from tests._pg_servers import PrivatePostgres
from tests._redis_servers import PrivateRedis

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

ROOTS = [f"r{i}" for i in range(12)]
CONVERGE_WITHIN = 10.0


async def commit_one(store: PostgresStore | MemoryStore, root_id: str, child: int) -> int | None:
    """One write that stamps child ``c<child>`` with the version it commits; None if it did not commit."""
    try:
        version = await store.version(root_id)
        return await store.apply(
            root_id, [Upsert(f"c{child}", root_id, {"at": version + 1})], expected_version=version
        )
    except (ConcurrencyConflict, StoreUnavailable):
        return None


async def writer(store: PostgresStore, seed: int, until: anyio.Event, commits: list[int]) -> None:
    chooser = random.Random(seed)
    while not until.is_set():
        if await commit_one(store, chooser.choice(ROOTS), chooser.randrange(5)) is not None:
            commits.append(1)
        else:
            await anyio.sleep(0.01)  # the store is down or the root contended: do not spin


async def reader(node: Node, reads: Reads, torn: list[Graph], until: anyio.Event, escaped: list[str]) -> None:
    chooser = random.Random()
    while not until.is_set():
        root_id = chooser.choice(ROOTS)
        started = time.monotonic()
        try:
            graph = await node.get(root_id, timeout=5)
        except (StoreError, CacheError, TimeoutError):
            await anyio.sleep(0.01)
            continue
        except Exception as exc:  # anything else escaping a read is a finding
            escaped.append(repr(exc))
            continue
        reads.record(root_id, started, graph.version)
        if not graph_is_whole(graph):
            torn.append(graph)
        await anyio.sleep(0.005)


async def lagging(store: PostgresStore | MemoryStore, cache: RedisCache) -> dict[str, tuple[int | None, int]]:
    """Roots whose cached version is not their committed one: root -> (cached, committed)."""
    committed = {root: await store.version(root) for root in ROOTS}
    cached = await cache.versions([graph_key(root) for root in ROOTS])
    return {
        root: (version, committed[root])
        for root, version in zip(ROOTS, cached, strict=True)
        if version != committed[root]
    }


async def converges(
    store: PostgresStore | MemoryStore, cache: RedisCache, within: float = CONVERGE_WITHIN
) -> None:
    """G3: every root's cached version reaches its committed one within ``within`` seconds."""
    deadline = time.monotonic() + within
    while behind := await lagging(store, cache):
        assert time.monotonic() < deadline, f"not converged after {within}s: {behind}"
        await anyio.sleep(0.05)


async def seed_roots(store: PostgresStore | MemoryStore) -> None:
    for root in ROOTS:
        await store.create_root(root, {"name": root})


async def terminate_backends(dsn: str) -> int:
    """Kill every other client connection of the database (graphcache's feed, pools and writers)."""
    conn = await asyncpg.connect(dsn)
    try:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            " AND datname = current_database()"
        )
    finally:
        await conn.close()
    return killed


@pytest.fixture
async def pg_store(private_postgres: PrivatePostgres, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh schema name on the private PostgreSQL, dropped afterwards."""
    schema = f"nf_{request.node.name.split('[')[0][-40:]}".lower()
    yield schema
    conn = await asyncpg.connect(private_postgres.dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def ready_again(node: Node, within: float = CONVERGE_WITHIN) -> None:
    """G6: the node is running and reports no problem once the fault is over."""
    deadline = time.monotonic() + within
    while problems := node.problems():
        assert time.monotonic() < deadline, f"still not ready after {within}s: {problems}"
        await anyio.sleep(0.05)


async def open_store(dsn: str, schema: str) -> PostgresStore:
    return await PostgresStore.connect(dsn, schema, command_timeout=3, poll_interval=0.1)


def node_options() -> dict[str, float]:
    return {
        "retry_max": 0.5,
        "min_rebuild_interval": 0.02,
        "sweep_interval": 2.0,
        "checkpoint_save_interval": 0.2,
    }


async def run_under_fault(
    dsn: str,
    schema: str,
    cache: RedisCache,
    fault: Callable[[anyio.Event], Awaitable[int]],
) -> tuple[Reads, list[Graph], list[str], int, int]:
    """A node, 4 writers and 4 readers while ``fault`` runs; returns the reads, torn graphs, escaped
    errors, commits and how many times the fault fired. Asserts the node is running and converges."""
    setup = await open_store(dsn, schema)
    await seed_roots(setup)
    node_store = await open_store(dsn, schema)
    writers_store = await open_store(dsn, schema)
    reads, torn, escaped, commits = Reads(), [], [], []
    fired = 0
    try:
        async with Node(store=node_store, cache=cache, node_id="f1", **node_options()) as node:
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for seed in range(4):
                    tg.start_soon(writer, writers_store, seed, stop, commits)
                    tg.start_soon(reader, node, reads, torn, stop, escaped)
                fired = await fault(stop)
                stop.set()
            await converges(setup, cache)
            await ready_again(node)
    finally:
        for store in (setup, node_store, writers_store):
            await store.aclose()
    return reads, torn, escaped, len(commits), fired


async def test_a_storm_of_killed_connections_does_not_end_the_node(
    private_postgres: PrivatePostgres, pg_store: str, redis_url: str, namespace: str
) -> None:
    """Every graphcache connection killed every 50 ms for 20 s under 4 writers: the node keeps running,
    readers see no regression and no torn graph, and the cache converges within 10 s after."""

    async def storm(stop: anyio.Event) -> int:
        killed = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            killed += await terminate_backends(private_postgres.dsn)
            await anyio.sleep(0.05)
        return killed

    async with RedisCache.from_url(redis_url, namespace=namespace) as cache:
        reads, torn, escaped, commits, killed = await run_under_fault(
            private_postgres.dsn, pg_store, cache, storm
        )
    assert killed > 100  # the fault really fired, over and over
    assert commits > 0
    assert reads.count() > 0
    assert escaped == []
    assert reads.regressions() == []
    assert torn == []


async def test_a_fast_restart_under_load_does_not_end_the_node(
    private_postgres: PrivatePostgres, pg_store: str, redis_url: str, namespace: str
) -> None:
    """pg_ctl restart -m fast while writers and readers run: the node survives and converges after."""

    async def restart(stop: anyio.Event) -> int:
        await anyio.sleep(2)  # load first
        await anyio.to_thread.run_sync(private_postgres.stop, "fast")
        try:
            assert await terminate_backends_refused(private_postgres.dsn)  # really down
        finally:
            await anyio.to_thread.run_sync(private_postgres.start)
        await anyio.sleep(3)  # load after
        return 1

    async with RedisCache.from_url(redis_url, namespace=namespace) as cache:
        reads, torn, escaped, commits, restarts = await run_under_fault(
            private_postgres.dsn, pg_store, cache, restart
        )
    assert restarts == 1
    assert commits > 0
    assert reads.count() > 0
    assert escaped == []
    assert reads.regressions() == []
    assert torn == []


async def terminate_backends_refused(dsn: str) -> bool:
    """Whether the server refuses connections (it is down)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return True
    await conn.close()
    return False


async def test_every_node_down_while_commits_continue_converges_after_restart(
    private_postgres: PrivatePostgres, pg_store: str, redis_url: str, namespace: str
) -> None:
    """Two nodes stop, 120 commits land, the same two restart: each resumes its feed from its durable
    checkpoint and the cache converges; two nodes with new ids converge through the start-up sweep."""
    dsn = private_postgres.dsn
    store = await open_store(dsn, pg_store)
    view = StaticMembership(["a", "b"])
    try:
        await seed_roots(store)
        async with RedisCache.from_url(redis_url, namespace=namespace) as cache:
            stores = [await open_store(dsn, pg_store) for _ in range(2)]
            async with (
                Node(store=stores[0], cache=cache, node_id="a", membership=view, **node_options()),
                Node(store=stores[1], cache=cache, node_id="b", membership=view, **node_options()),
            ):
                for index in range(24):
                    await commit_one(store, ROOTS[index % len(ROOTS)], index)
                await converges(store, cache)
            checkpoints = [await store.load_checkpoint(name) for name in ("a", "b")]
            assert all(c is not None and c.resumable for c in checkpoints), checkpoints

            for index in range(120):  # no node runs
                assert await commit_one(store, ROOTS[index % len(ROOTS)], index) is not None
            assert len(await lagging(store, cache)) == len(ROOTS)  # the fault: every root fell behind

            async with (
                Node(store=stores[0], cache=cache, node_id="a", membership=view, **node_options()) as a,
                Node(store=stores[1], cache=cache, node_id="b", membership=view, **node_options()) as b,
            ):
                resumed = [a.statistics().resumed_from, b.statistics().resumed_from]
                await converges(store, cache)
            assert resumed == [c.cursor for c in checkpoints if c is not None]  # from the durable checkpoints

            for index in range(60):  # nobody runs again; then nodes that never saved a checkpoint
                await commit_one(store, ROOTS[index % len(ROOTS)], index)
            assert len(await lagging(store, cache)) == len(ROOTS)
            fresh = StaticMembership(["c", "d"])
            async with (
                Node(store=stores[0], cache=cache, node_id="c", membership=fresh, **node_options()) as c,
                Node(store=stores[1], cache=cache, node_id="d", membership=fresh, **node_options()) as d,
            ):
                await converges(store, cache)
                found = c.statistics().roots_behind + d.statistics().roots_behind
            assert found == len(ROOTS)  # the start-up sweep found every root behind
            for opened in stores:
                await opened.aclose()
    finally:
        await store.aclose()


@pytest.mark.parametrize("loss", ["restart", "allkeys-lru"])
async def test_redis_losing_a_key_under_a_stalled_rebuild_never_regresses(
    private_redis: PrivateRedis, loss: str
) -> None:
    """A rebuild loads version 2 and stalls; version 3 is cached and read; Redis loses the key (restart
    without persistence, or eviction); the stalled rebuild's put is refused, no reader sees 2 again, and
    the node rebuilds 3 under a new lease."""
    store = MemoryStore()
    gated = GatedStore(store)
    await store.create_root("r", {})
    raw = aioredis.Redis(host="127.0.0.1", port=private_redis.port)
    if loss == "allkeys-lru":
        await raw.config_set("maxmemory-policy", "allkeys-lru")
        await raw.config_set("maxmemory", "3mb")
    reads = Reads()
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=1)
    async with (
        RedisCache(client, namespace="gc", close_client=True) as cache,
        Node(store=gated, cache=cache, node_id="n", retry_max=0.2) as node,
    ):
        assert (await node.get("r")).version == 1
        gated.hold(1)
        await node.apply("r", [Upsert("c0", "r", {"at": 2})])  # the actor loads 2, then stalls
        with anyio.fail_after(10):
            await gated.entered.wait()
        v3 = await store.apply("r", [Upsert("c1", "r", {"at": 3})])
        other = RedisCache.from_url(private_redis.url, namespace="gc")  # another node caches 3
        async with other:
            lease = await other.lease(graph_key("r"))
            assert await other.put_if_newer(graph_key("r"), await store.load("r"), v3, lease=lease)
        started = time.monotonic()
        assert (await node.get("r")).version == v3
        reads.record("r", started, v3)

        entry = cache.redis_keys(graph_key("r"))[0]
        await lose(private_redis, raw, loss, entry)
        assert await raw.exists(entry) == 0  # the fault fired

        # Connections the restart broke would fail the stalled put, and its retry would load afresh:
        # start from working connections, so the put of version 2 reaches the emptied Redis.
        await client.connection_pool.disconnect()
        gated.release()
        actor = node.actor("r")
        assert actor is not None
        with anyio.fail_after(10):
            await actor.until_built(2)
        for _ in range(20):
            started = time.monotonic()
            reads.record("r", started, (await node.get("r")).version)
        stats = node.statistics()
        await converges_one(store, cache, "r")
    await raw.aclose()
    assert reads.regressions() == []
    assert stats.keys_recreated >= 1  # the stalled put was refused for the lost incarnation


async def converges_one(store: MemoryStore, cache: RedisCache, root_id: str) -> None:
    deadline = time.monotonic() + CONVERGE_WITHIN
    while (
        item := await cache.get(graph_key(root_id), type=Graph)
    ) is None or item.version != await store.version(root_id):
        assert time.monotonic() < deadline, f"{root_id} cached at {item and item.version}"
        await anyio.sleep(0.05)


async def lose(server: PrivateRedis, raw: aioredis.Redis, loss: str, entry: bytes) -> None:
    """Make Redis lose the graph keys: restart it without persistence, or flood it until it evicts."""
    if loss == "restart":
        await anyio.to_thread.run_sync(server.stop)
        await anyio.to_thread.run_sync(server.start)
        await raw.connection_pool.disconnect()
        return
    filler = b"x" * 64 * 1024
    with anyio.fail_after(30):
        index = 0
        while await raw.exists(entry):
            await raw.set(f"filler:{index}", filler)
            index += 1
    info = await raw.info("stats")
    assert info["evicted_keys"] > 0


POISON: dict[str, Callable[[bytes], dict[bytes, bytes]]] = {
    "version not a number": lambda good: {b"v": b"abc", b"d": good},
    "version of 5000 digits": lambda good: {b"v": b"9" * 5000, b"d": good},
    "version with a sign": lambda good: {b"v": b"-1", b"d": good},
    "value not msgpack": lambda good: {b"v": b"7", b"d": b"\xc1"},
    "value not a graph": lambda good: {b"v": b"7", b"d": msgspec.msgpack.encode([1, 2, 3])},
    "graph of another root": lambda good: {
        b"v": b"900",
        b"d": msgspec.msgpack.encode(Graph("other", 900, {})),
    },
    "graph at another version": lambda good: {
        b"v": b"900",
        b"d": msgspec.msgpack.encode(Graph("r", 3, {})),
    },
}


@pytest.mark.parametrize("kind", [*POISON, "not a hash"])
async def test_a_malformed_entry_is_a_miss_counted_and_replaced(
    redis_url: str, namespace: str, kind: str
) -> None:
    """A malformed cached graph is never served: the read gets the store's graph, the entry is counted,
    and the next put replaces it (even one with a lower version than the garbage claims)."""
    store = MemoryStore()
    await store.create_root("r", {})
    await store.apply("r", [Upsert("c0", "r", {"at": 2})])
    async with (
        RedisCache.from_url(redis_url, namespace=namespace) as cache,
        Node(store=store, cache=cache, node_id="p") as node,
    ):
        entry = cache.redis_keys(graph_key("r"))[0]
        good = msgspec.msgpack.encode(await store.load("r"))
        raw = aioredis.Redis.from_url(redis_url)
        await raw.delete(entry)
        if kind == "not a hash":
            await raw.set(entry, b"surprise")
        else:
            await raw.hset(entry, mapping=POISON[kind](good))
        graph = await node.get("r")
        poisoned = node.statistics().poisoned
        item = await cache.get(graph_key("r"), type=Graph)
        await raw.aclose()
    assert graph == await store.load("r")
    assert poisoned == 1
    assert item is not None
    assert item.version == 2
    assert item.value == graph
