"""Fault injection against private Redis servers: a restart without persistence, an eviction flood and a
Cluster master restart. G1 holds throughout (a read never sees a version older than one an earlier read
saw, unless the key is a miss), leased puts from before a loss never land, and nothing but ``CacheError``
escapes the cache."""

from __future__ import annotations

import bisect
import itertools
import random
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import pytest
import redis
from redis.asyncio import Redis, RedisCluster

from graphcache.cache import CacheError, CacheItem, CacheUnavailable, RedisCache
from tests._redis_servers import PrivateRedis, RedisClusterServers, running_cluster

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

HANG_GUARD = 30.0
"""Seconds any single wait may take before the test fails as hung (never a timing assertion)."""
T = TypeVar("T")


# -- shared machinery ------------------------------------------------------------------------------


class Progress:
    """A count that the test can wait on: ``await reach(n)`` returns once it is >= n."""

    def __init__(self) -> None:
        self.value = 0
        self._waiters: list[tuple[int, anyio.Event]] = []

    def add(self) -> None:
        self.value += 1
        for threshold, event in self._waiters:
            if self.value >= threshold:
                event.set()

    async def reach(self, threshold: int) -> None:
        if self.value >= threshold:
            return
        event = anyio.Event()
        self._waiters.append((threshold, event))
        with anyio.fail_after(HANG_GUARD):
            await event.wait()


@dataclass(frozen=True)
class Read:
    """One completed get: logical ticks taken just before the call and just after it returned."""

    start: int
    end: int
    version: int | None


def g1_violations(reads: Sequence[Read]) -> list[tuple[int, Read]]:
    """Reads B that saw a version below one seen by a read A that ended before B started (a miss is allowed
    after a loss), each with the highest such earlier version."""
    done = sorted((r for r in reads if r.version is not None), key=lambda r: r.end)
    ends = [r.end for r in done]
    highest: list[int] = list(itertools.accumulate((r.version or 0 for r in done), max))
    violations = []
    for read in reads:
        if read.version is None:
            continue
        finished_before = bisect.bisect_left(ends, read.start)
        if finished_before and highest[finished_before - 1] > read.version:
            violations.append((highest[finished_before - 1], read))
    return violations


def test_the_g1_checker_finds_a_regression_and_allows_misses_and_overlaps() -> None:
    """g1_violations flags a later read of an older version, not a miss nor two overlapping reads."""
    assert g1_violations([Read(0, 1, 5), Read(2, 3, None), Read(4, 5, 5), Read(6, 7, 6)]) == []
    assert g1_violations([Read(0, 3, 6), Read(1, 4, 5)]) == []  # concurrent: either order is linearizable
    assert g1_violations([Read(0, 1, 6), Read(2, 3, None), Read(4, 5, 5)]) == [(6, Read(4, 5, 5))]


@dataclass
class Workload:
    """Leased writers and readers over ``keys``, as the actors use the cache.

    A writer takes the key's lease, then "loads" the newest committed version (a commit happens just
    before the load), spends a random moment loading, and puts it with the lease, retrying the put while
    the server is away. Readers log every get. Between ``hold_loads`` and ``release_loads`` the
    ``straddlers`` first writers' loads last until released (a load that straddles a fault): each then
    puts and reads its key back at once, so a stale put that got through would be seen. Every exception a
    cache call raises is counted by type; a failed call backs off briefly.
    """

    cache: RedisCache
    keys: Sequence[str]
    ttl: float | None = None
    straddlers: int = 2
    committed: dict[str, int] = field(default_factory=dict)
    reads: dict[str, list[Read]] = field(default_factory=dict)
    torn: list[CacheItem] = field(default_factory=list)
    errors: Counter[type[BaseException]] = field(default_factory=Counter)
    stored: Progress = field(default_factory=Progress)
    hits: Progress = field(default_factory=Progress)
    failures: Progress = field(default_factory=Progress)
    held: Progress = field(default_factory=Progress)
    _ticks: Iterator[int] = field(default_factory=itertools.count)
    _stop: anyio.Event = field(default_factory=anyio.Event)
    _release: anyio.Event | None = None

    def __post_init__(self) -> None:
        self.committed = dict.fromkeys(self.keys, 0)
        self.reads = {key: [] for key in self.keys}

    def start(self, tg: Any, *, writers: int, readers: int) -> None:
        for seed in range(writers):
            tg.start_soon(self._writer, random.Random(seed), seed < self.straddlers)
        for seed in range(readers):
            tg.start_soon(self._reader, random.Random(1000 + seed))

    def hold_loads(self) -> None:
        """The straddlers' next loads last until ``release_loads`` (``held`` counts them as they start)."""
        self._release = anyio.Event()

    def release_loads(self) -> None:
        assert self._release is not None
        self._release.set()

    def stop(self) -> None:
        self._stop.set()
        if self._release is not None:
            self._release.set()

    async def _call(self, call: Awaitable[T]) -> tuple[bool, T | None]:
        try:
            return True, await call
        except Exception as exc:  # recorded, and checked to be CacheErrors only
            self.errors[type(exc)] += 1
            self.failures.add()
            await anyio.sleep(0.005)  # retry backoff while the server is away
            return False, None

    async def _writer(self, rng: random.Random, straddler: bool) -> None:
        while not self._stop.is_set():
            key = rng.choice(self.keys)
            ok, lease = await self._call(self.cache.lease(key))
            if not ok:
                continue
            self.committed[key] += 1
            version = self.committed[key]
            held = straddler and self._release is not None and not self._release.is_set()
            if held:
                assert self._release is not None
                self.held.add()
                await self._release.wait()
            else:
                await anyio.sleep(rng.uniform(0, 0.002))  # the load: new interleavings each run
            value = f"{key}@{version}"
            while not self._stop.is_set():
                put = self.cache.put_if_newer(key, value, version, ttl=self.ttl, lease=lease)
                ok, stored = await self._call(put)
                if ok and stored:
                    self.stored.add()
                if ok or not held:  # a held load outlives the fault: it retries its put, same lease
                    break
            if held:
                await self._read(key)

    async def _reader(self, rng: random.Random) -> None:
        while not self._stop.is_set():
            await self._read(rng.choice(self.keys))
            await anyio.lowlevel.checkpoint()

    async def _read(self, key: str) -> None:
        start = next(self._ticks)
        ok, item = await self._call(self.cache.get(key))
        end = next(self._ticks)
        if ok:
            self.reads[key].append(Read(start, end, None if item is None else item.version))
            if item is not None:
                self.hits.add()
                if item.value != f"{key}@{item.version}":
                    self.torn.append(item)

    def check(self) -> None:
        """G1 on every key, no torn item, and only CacheErrors escaped."""
        foreign = [t.__name__ for t in self.errors if not issubclass(t, CacheError)]
        assert foreign == [], self.errors
        assert self.torn == []
        for key, reads in self.reads.items():
            assert g1_violations(reads) == [], key


async def eventually(call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` retried while it raises CacheUnavailable: a client drops each connection a restart
    killed on first use (the cache does not retry by itself: a script such as insert is not idempotent)."""
    with anyio.fail_after(HANG_GUARD):
        while True:
            try:
                return await call()
            except CacheUnavailable:
                await anyio.sleep(0.005)


def _run_id(server: PrivateRedis) -> str:
    with server.client() as raw:
        return str(raw.info("server")["run_id"])


@contextmanager
def private_server(*extra: str) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own with extra options; stopped afterwards, also on failure."""
    with tempfile.TemporaryDirectory(prefix="gc-fault-redis-") as directory:
        server = PrivateRedis(Path(directory), extra=extra)
        try:
            server.start()
            yield server
        finally:
            server.stop()


# -- a) a restart without persistence ----------------------------------------------------------------

ROOTS = [f"root{i}" for i in range(6)]


async def test_g1_holds_across_a_restart_without_persistence(private_redis: PrivateRedis) -> None:
    """Across a restart without persistence: only CacheErrors, G1 holds, a pre-restart lease is refused."""
    cache = RedisCache.from_url(private_redis.url, namespace="g1", connect_timeout=1, socket_timeout=1)
    async with cache:
        work = Workload(cache, ROOTS)
        async with anyio.create_task_group() as tg:
            work.start(tg, writers=8, readers=4)
            await work.stored.reach(100)
            await work.hits.reach(100)
            work.hold_loads()
            await work.held.reach(work.straddlers)  # loads leased before the restart...
            stored = work.stored.value
            await work.stored.reach(stored + 50)  # ...overtaken by newer versions that readers see

            stale = await cache.lease("stale")  # this writer leases, then its load is slow...
            assert await cache.put_if_newer("stale", "stale@6", 6, lease=stale)  # ...another one puts v6
            assert await cache.get("stale") == CacheItem("stale", "stale@6", 6)  # and a reader saw it

            run_id, failures = _run_id(private_redis), work.failures.value
            await anyio.to_thread.run_sync(private_redis.stop)  # blocking process control, off the loop
            with pytest.raises(CacheUnavailable):  # the fault fired: a put while Redis is down fails
                await cache.put_if_newer("stale", "stale@5", 5, lease=stale)
            work.release_loads()  # ...are put during the outage, and retried until Redis is back
            await work.failures.reach(failures + work.straddlers + 1)  # the workload ran into it too
            await anyio.to_thread.run_sync(private_redis.start)
            assert _run_id(private_redis) != run_id

            stored, hits = work.stored.value, work.hits.value
            await work.stored.reach(stored + 100)  # the workload recovered by itself
            await work.hits.reach(hits + 100)
            refused = await eventually(lambda: cache.put_if_newer("stale", "stale@5", 5, lease=stale))
            assert refused is False  # the slow load leased before the loss never lands
            assert await cache.get("stale") is None
            work.stop()
    assert CacheUnavailable in work.errors
    work.check()


# -- b) eviction ---------------------------------------------------------------------------------------

FILLER = b"x" * 1024
MAX_FILLERS = 60_000
"""A cap on the flood (60 MB through a 2 MB server), so a server that never evicts fails the test."""
PERSISTENT_FILLERS = 100
"""Fillers without a ttl under volatile-lru (the rest have one): few enough never to fill the memory."""
KINDS = ("item with ttl", "item", "floor", "lease only")


async def _evicted_keys(raw: Redis) -> int:
    return int((await raw.info("stats"))["evicted_keys"])


async def _absent(raw: Redis, entries: dict[str, bytes]) -> list[str]:
    pipe = raw.pipeline(transaction=False)
    for entry in entries.values():
        pipe.exists(entry)
    return [key for key, exists in zip(entries, await pipe.execute(), strict=True) if not exists]


async def _flood(raw: Redis, entries: dict[str, bytes], *, persistent: int, evicted_tracked: int) -> int:
    """Write 1 KB filler keys until Redis reports evictions and at least ``evicted_tracked`` of ``entries``
    are gone; the number of fillers written."""
    written = 0
    while True:
        pipe = raw.pipeline(transaction=False)
        for _ in range(100):
            ttl = None if written < persistent or (persistent < 0 and written % 2) else 600
            pipe.set(f"filler:{written}", FILLER, ex=ttl)
            written += 1
        await pipe.execute()
        if await _evicted_keys(raw) > 0 and len(await _absent(raw, entries)) >= evicted_tracked:
            return written
        assert written < MAX_FILLERS, "Redis evicted none of the tracked keys"


async def _fence(cache: RedisCache, raw: Redis, key: str) -> int:
    """A fence granted now, checked against the server clock read just before."""
    seconds, micros = await raw.time()
    _, lock = await cache.get_and_lock(key, lock_timeout=30)
    await cache.unlock(key, lock)
    assert lock.fence >= seconds * 1_000_000 + micros
    return lock.fence


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
async def test_g1_and_leases_hold_while_redis_evicts(policy: str) -> None:
    """Under eviction G1 holds, no lease from before its key's eviction stores, and fences increase."""
    with private_server("--maxmemory", "2mb", "--maxmemory-policy", policy) as server:
        raw = Redis.from_url(server.url)
        cache = RedisCache.from_url(server.url, namespace="ev", socket_timeout=2)
        async with cache, raw:
            tracked: dict[str, tuple[str, int]] = {}
            for index in range(48):
                key, kind = f"tracked{index}", KINDS[index % len(KINDS)]
                lease = await cache.lease(key)
                if kind != "lease only":
                    ttl = None if kind == "item" else 600
                    assert await cache.put_if_newer(key, "v10", 10, ttl=ttl, lease=lease)
                if kind == "floor":
                    await cache.invalidate(key, 10, ttl=600)
                tracked[key] = (kind, lease)
            entries = {key: cache.redis_keys(key)[0] for key in tracked}
            fence_keys = [f"fenced{i}" for i in range(4)]
            before = {key: await _fence(cache, raw, key) for key in fence_keys}

            work = Workload(cache, ROOTS, ttl=600)
            async with anyio.create_task_group() as tg:
                work.start(tg, writers=8, readers=4)
                await work.stored.reach(50)
                work.hold_loads()
                await work.held.reach(work.straddlers)  # loads leased before the flood...
                persistent = PERSISTENT_FILLERS if policy.startswith("volatile") else -1
                await _flood(raw, entries, persistent=persistent, evicted_tracked=len(tracked) // 6)
                work.release_loads()  # ...are put after it
                stored = work.stored.value
                await work.stored.reach(stored + 50)  # leased puts go on under memory pressure
                work.stop()

            await raw.config_set("maxmemory", 0)  # no eviction from here on: the checks see a still state
            evicted = await _evicted_keys(raw)
            assert evicted > 0
            gone = await _absent(raw, entries)
            assert gone
            if policy.startswith("volatile"):  # only keys with an expiry may go
                assert all(tracked[key][0] != "item" for key in gone), gone
            for key, (kind, lease) in tracked.items():
                if key in gone:  # state lost: the lease taken before is refused, whatever the version
                    assert await cache.put_if_newer(key, "v11", 11, lease=lease) is False, key
                    assert await cache.put_if_newer(key, "v5", 5, lease=lease) is False, key
                    assert await cache.get(key) is None
                else:  # state kept: the same lease still stores
                    assert await cache.put_if_newer(key, "v11", 11, lease=lease) is True, (key, kind)
            for key in fence_keys:
                assert await _fence(cache, raw, key) > before[key]
            assert await _evicted_keys(raw) == evicted
    work.check()


# -- c) a Cluster master restarts --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_cluster() -> Iterator[RedisClusterServers]:
    """A private 3-master Cluster for this module only (its nodes get killed), stopped even on failure."""
    with running_cluster("gc-fault-cluster-") as cluster:
        yield cluster


CLUSTER_KEYS = [f"graph:{i}" for i in range(60)]


async def _keys_on(url: str, cache: RedisCache, node: PrivateRedis, keys: Sequence[str]) -> set[str]:
    """The keys whose state lives on ``node``, as the Cluster's slot map says."""
    async with RedisCluster.from_url(url) as client:
        await client.initialize()
        return {key for key in keys if client.get_node_from_key(cache.redis_keys(key)[0]).port == node.port}


async def test_a_cluster_master_restart_raises_only_cache_errors_and_recovers(
    fault_cluster: RedisClusterServers,
) -> None:
    """A Cluster master restart makes calls fail with CacheErrors only; then every key works again."""
    victim = fault_cluster.nodes[0]  # the node of the URL the client starts from
    cache = RedisCache.from_url(
        fault_cluster.url, namespace="cf", cluster=True, connect_timeout=1, socket_timeout=1
    )
    async with cache:
        on_victim = await _keys_on(fault_cluster.url, cache, victim, CLUSTER_KEYS)
        assert 0 < len(on_victim) < len(CLUSTER_KEYS)
        versions = itertools.count(1)
        errors: Counter[type[BaseException]] = Counter()
        done, unavailable, victim_done = Progress(), Progress(), Progress()
        stop = anyio.Event()

        async def locked(key: str) -> None:
            _, lock = await cache.get_and_lock(key, lock_timeout=5)
            if next(versions) % 2:
                await cache.unlock(key, lock)
            else:
                await cache.put_and_unlock(key, "locked", lock)

        async def leased(key: str) -> None:
            lease = await cache.lease(key)
            await cache.put_if_newer(key, "leased", next(versions), lease=lease)

        async def batch(key: str) -> None:
            keys = [key, *random.sample([k for k in CLUSTER_KEYS if k != key], 5)]
            leases = await cache.lease_many(keys)
            await cache.put_many_if_newer(
                [(k, "many", next(versions), lease) for k, lease in zip(keys, leases, strict=True)]
            )
            await cache.versions(keys)

        operations: list[Callable[[str], Awaitable[Any]]] = [
            lambda key: cache.put_if_newer(key, "plain", next(versions)),
            cache.get,
            leased,
            locked,
            batch,
        ]

        async def worker(rng: random.Random) -> None:
            while not stop.is_set():
                key = rng.choice(CLUSTER_KEYS)
                try:
                    await rng.choice(operations)(key)
                except Exception as exc:  # recorded, and checked to be CacheErrors only
                    errors[type(exc)] += 1
                    if isinstance(exc, CacheUnavailable):
                        unavailable.add()
                    await anyio.sleep(0.005)  # retry backoff while the node is away
                    continue
                done.add()
                if restarted.is_set() and key in on_victim:
                    victim_done.add()

        restarted = anyio.Event()
        async with anyio.create_task_group() as tg:
            for seed in range(8):
                tg.start_soon(worker, random.Random(seed))
            await done.reach(200)
            run_id = _run_id(victim)
            await anyio.to_thread.run_sync(victim.stop)  # blocking process control, off the loop
            with pytest.raises(redis.ConnectionError), victim.client() as raw:
                raw.ping()  # the master is really gone
            await unavailable.reach(1)  # and calls on its slots fail
            await anyio.to_thread.run_sync(victim.start)
            await anyio.to_thread.run_sync(fault_cluster.wait_until_ok)
            assert _run_id(victim) != run_id
            restarted.set()
            await victim_done.reach(50)  # the client found the node again by itself
            stop.set()

        foreign = [t.__name__ for t in errors if not issubclass(t, CacheError)]
        assert foreign == [], errors
        assert unavailable.value >= 1
        for key in CLUSTER_KEYS:  # every key, on every master, is writable and readable again
            assert await cache.put_if_newer(key, "final", 2**62) is True, key
            assert await cache.get(key) == CacheItem(key, "final", 2**62)
