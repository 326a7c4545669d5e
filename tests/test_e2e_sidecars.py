"""End to end: three ``run.py serve`` processes with RedisMembership, writer processes, real servers."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import pytest

from graphcache.actors import Ring, graph_key
from graphcache.cache import RedisCache
from graphcache.storage import Graph, PostgresStore, Upsert
from tests._sidecar_procs import ROOT_DIR, Servers, Sidecar, serve_command, sidecar, tail

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOTS = ["e2e-0", "e2e-1"]  # two hot roots: many writes per root while a rebuild is in flight
NODES = ["n0", "n1", "n2"]
WRITES = 200  # per writer process and phase
BASE = 100  # children every root starts with: a graph that is costly to load, as in production
MEMBERSHIP = ["--membership", "redis", "--heartbeat", "0.3", "--ttl", "1.2"]


class Readers:
    """Reader tasks on the cache itself: every version seen, checked against G1 and G2 as it is read."""

    def __init__(self) -> None:
        self.seen = dict.fromkeys(ROOTS, 0)
        self.reads = 0

    async def read_until(self, cache: RedisCache, done: anyio.Event) -> None:
        while not done.is_set():
            for root in ROOTS:
                floor = self.seen[root]
                item = await cache.get(graph_key(root), type=Graph)
                if item is None:
                    continue
                graph: Graph = item.value
                assert item.version == graph.version
                assert graph.version >= floor, f"G1: {root} went from {floor} down to {graph.version}"
                # version 1: the root alone; version 2: BASE children; each later version one more
                assert len(graph.nodes) == BASE + graph.version - 1, f"G2: torn {root} at {graph.version}"
                self.seen[root] = max(self.seen[root], graph.version)
                self.reads += 1
            await anyio.sleep(0.02)


async def cached_versions(cache: RedisCache) -> dict[str, int | None]:
    versions: dict[str, int | None] = {}
    for root in ROOTS:
        item = await cache.get(graph_key(root), type=Graph)
        versions[root] = None if item is None else item.version
    return versions


async def converge(
    cache: RedisCache, store: PostgresStore, within: float
) -> tuple[dict[str, int | None], dict[str, int]]:
    """Poll until the cached versions equal the committed ones (G3), or give up after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        cached = await cached_versions(cache)
        committed = {root: await store.version(root) for root in ROOTS}
        if cached == committed or time.monotonic() > deadline:
            return cached, committed
        await anyio.sleep(0.05)


async def wait_members(nodes: list[Sidecar], count: int, within: float) -> None:
    deadline = time.monotonic() + within
    for node in nodes:
        while (await node.metrics())["graphcache_members"] != count:
            assert time.monotonic() < deadline, f"{node.node_id} never saw {count} members: {tail(node.log)}"
            await anyio.sleep(0.05)


async def run_writers(servers: Servers, phase: str, count: int = 2) -> None:
    async def one(writer: str) -> None:
        command = [
            sys.executable,
            "-m",
            "tests._e2e_writer",
            servers.dsn,
            servers.schema,
            writer,
            str(WRITES),
            *ROOTS,
        ]
        result = await anyio.run_process(command, cwd=ROOT_DIR, check=False)
        assert result.returncode == 0, result.stderr.decode()[-2000:]

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, f"{phase}-w{i}")


@pytest.fixture
async def store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStore]:
    store = await PostgresStore.connect(postgres_dsn, schema=pg_schema)
    for root in ROOTS:
        await store.create_root(root, {"root": root})
        await store.apply(root, [Upsert(f"base-{i}", root, {"base": i}) for i in range(BASE)])
    yield store
    await store.aclose()


@pytest.fixture
def servers(redis_url: str, postgres_dsn: str, namespace: str, pg_schema: str) -> Servers:
    return Servers(redis_url, postgres_dsn, namespace, pg_schema)


async def test_three_sidecars_keep_g1_g3_and_survive_a_sigkill(
    store: PostgresStore, servers: Servers, tmp_path: Path
) -> None:
    """Three serving processes under writer processes: readers never see a regression or a torn graph,
    the cache converges, rebuilds are far fewer than updates, and after one node is SIGKILLed
    mid-load the others take its roots over and the cache converges again."""
    readers = Readers()
    done = anyio.Event()
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                sidecar(serve_command(node_id, servers, MEMBERSHIP), tmp_path / f"{node_id}.log")
            )
            for node_id in NODES
        ]
        await wait_members(nodes, 3, within=15)
        victim = next(node for node in nodes if node.node_id == Ring(NODES).owner(ROOTS[0]))
        survivors = [node for node in nodes if node is not victim]
        cache = await stack.enter_async_context(
            RedisCache.from_url(servers.redis_url, namespace=servers.namespace)
        )
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(readers.read_until, cache, done)

            await run_writers(servers, "one")
            cached, committed = await converge(cache, store, within=20)
            assert cached == committed, "G3 after phase one"
            phase_one = [await node.metrics() for node in nodes]
            rebuilds = sum(m["graphcache_rebuilds_total"] for m in phase_one)
            lag = sum(m["graphcache_commit_to_cache_lag_seconds_sum"] for m in phase_one) / rebuilds
            print(
                f"\nphase one: {rebuilds:.0f} rebuilds for {2 * WRITES} updates, mean lag {lag * 1000:.0f} ms"
            )

            async with anyio.create_task_group() as load:
                load.start_soon(run_writers, servers, "two")
                before = dict(committed)
                # Kill mid-load: once the second phase shows in the cache (another process's doing,
                # so there is no event to wait on).
                with anyio.fail_after(20):
                    while await cached_versions(cache) == before:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                assert await victim.stop(signal.SIGKILL) == -signal.SIGKILL
            await wait_members(survivors, 2, within=15)
            cached, committed = await converge(cache, store, within=20)
            assert cached == committed, "G3 after a node was killed"
            survivor_metrics = [await node.metrics() for node in survivors]
            codes = [await node.stop(signal.SIGTERM) for node in survivors]
            done.set()
    assert sum(committed.values()) == 2 * len(ROOTS) + 4 * WRITES
    # How many commits land during one rebuild depends on the machine (PostgresStore.apply costs about
    # as much as a rebuild and commits to one root are serialised): measured 0.43 to 0.6 rebuilds per
    # update. What holds everywhere: fewer rebuilds than updates. G4 itself is tested in-process.
    assert rebuilds < 2 * WRITES, f"{rebuilds} rebuilds for {2 * WRITES} updates"
    assert sum(m["graphcache_coalesced_total"] for m in phase_one) > 0
    assert all(m["graphcache_feed_rewinds_total"] >= 1 for m in survivor_metrics)
    assert codes == [0, 0]
    assert readers.reads > 0
