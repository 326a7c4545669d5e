"""Leases: a put leased before any loss of its key's state is refused — on every backend — and a model check
that MemoryCache, RedisCache and a reference model agree on every result of random operation sequences."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis, RedisCluster

from graphcache.cache import (
    CacheError,
    CacheItem,
    InvalidArgument,
    InvalidKey,
    KeyExists,
    MemoryCache,
    RedisCache,
    VersionedCache,
    VersionMismatch,
)
from tests._cache_backends import Backend, OffsetClock
from tests._redis_servers import PrivateRedis, RedisClusterServers

MAX = 2**63 - 1
TTL = 60.0
"""Every key these tests lose has a ttl, so MemoryCache can lose it by expiry (``Backend.lose``)."""


# -- the lease contract ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_lease_is_stable_while_the_key_lives_and_new_after_its_state_is_lost(
    backend: Backend,
) -> None:
    """lease(k) is one int in 1..2**63-1 through puts, invalidate and remove, and another one after a loss."""
    cache = backend.cache
    first = await cache.lease("k")
    assert type(first) is int
    assert 1 <= first <= MAX
    assert await cache.lease("k") == first
    assert await cache.put_if_newer("k", "a", 1, ttl=TTL, lease=first)
    assert await cache.lease("k") == first
    await cache.invalidate("k", 1, ttl=TTL)
    assert await cache.lease("k") == first
    assert await cache.put_if_newer("k", "b", 2, ttl=TTL)
    assert await cache.remove("k")
    assert await cache.lease("k") == first
    await backend.lose("k")
    second = await cache.lease("k")
    assert second != first
    assert await cache.lease("k") == second
    assert await cache.lease("other") not in (first, second)


@pytest.mark.anyio
async def test_a_put_with_the_current_lease_stores_and_with_a_stale_one_writes_nothing(
    backend: Backend,
) -> None:
    """put_if_newer(lease=current) stores; a lease from before a loss returns False and writes nothing."""
    cache = backend.cache
    stale = await cache.lease("k")
    assert await cache.put_if_newer("k", "v1", 1, ttl=TTL, lease=stale) is True
    assert await cache.get("k") == CacheItem("k", "v1", 1)
    await backend.lose("k")
    current = await cache.lease("k")
    before = await backend.state()
    assert await cache.put_if_newer("k", "late", 9, ttl=TTL, lease=stale) is False
    assert await cache.put_many_if_newer([("k", "late", 9, stale)], ttl=TTL) == [False]
    assert await backend.state() == before
    assert await cache.get("k") is None
    assert await cache.put_if_newer("k", "fresh", 2, ttl=TTL, lease=current) is True
    assert await cache.get("k") == CacheItem("k", "fresh", 2)


@pytest.mark.anyio
async def test_a_lease_that_is_not_the_keys_incarnation_is_refused(cache: VersionedCache) -> None:
    """A lease of another key is refused on an absent key and on a leased one; the key's own lease stores."""
    other = await cache.lease("a")
    assert await cache.put_if_newer("b", "x", 1, lease=other) is False
    assert await cache.versions(["b"]) == [None]
    own = await cache.lease("b")
    assert own != other
    assert await cache.put_if_newer("b", "x", 1, lease=other) is False
    assert await cache.put_if_newer("b", "x", 1, lease=own) is True
    assert await cache.versions(["a", "b"]) == [None, 1]


@pytest.mark.anyio
async def test_g1_a_load_leased_before_a_loss_never_lands_after_it(backend: Backend) -> None:
    """G1: v6 seen, then the state is lost: a put of v5 leased before is refused; a fresh lease stores v6."""
    cache = backend.cache
    slow = await cache.lease("root")  # writer A leases, then loads v5 slowly
    fast = await cache.lease("root")  # writer B leases the same incarnation, loads v6 and puts it
    assert fast == slow
    assert await cache.put_if_newer("root", "v6", 6, ttl=TTL, lease=fast)
    assert await cache.get("root") == CacheItem("root", "v6", 6)  # a reader has seen v6
    await backend.lose("root")
    assert await cache.put_if_newer("root", "v5", 5, ttl=TTL, lease=slow) is False
    assert await cache.get("root") is None
    assert await cache.put_many_if_newer([("root", "v5", 5, slow)]) == [False]
    assert await cache.get("root") is None
    renewed = await cache.lease("root")
    assert renewed != slow
    assert await cache.put_if_newer("root", "v6", 6, ttl=TTL, lease=renewed)
    assert await cache.get("root") == CacheItem("root", "v6", 6)


@pytest.mark.anyio
async def test_lease_many_is_the_lease_of_each_key_in_order(cache: VersionedCache) -> None:
    """lease_many(keys) equals [lease(k) for k in keys], repeated keys included, and [] for no keys."""
    await cache.put_if_newer("a", "x", 1)
    keys = ["a", "b", "a", "c"]
    many = await cache.lease_many(keys)
    assert many == [await cache.lease(key) for key in keys]
    assert many[0] == many[2]
    assert len(set(many)) == 3
    assert await cache.lease_many(("b",)) == [many[1]]
    assert await cache.lease_many([]) == []


@pytest.mark.anyio
async def test_put_many_if_newer_checks_the_lease_of_each_4_tuple(backend: Backend) -> None:
    """A batch of 3-tuples and 4-tuples (current, stale or None lease) stores exactly what lone puts would."""
    cache = backend.cache
    stale_b = await cache.lease("b")
    assert await cache.put_if_newer("b", "b1", 1, ttl=TTL, lease=stale_b)
    await backend.lose("b")
    lease_a = await cache.lease("a")
    items: list[Any] = [
        ("a", "a1", 1, lease_a),
        ("b", "b2", 2, stale_b),
        ("c", "c1", 1, None),
        ("d", "d1", 1),
        ("a", "a0", 0, lease_a),
        ("a", "a2", 2, lease_a),
    ]
    assert await cache.put_many_if_newer(items, ttl=TTL) == [True, False, True, True, False, True]
    assert [await cache.get(key) for key in "abcd"] == [
        CacheItem("a", "a2", 2),
        None,
        CacheItem("c", "c1", 1),
        CacheItem("d", "d1", 1),
    ]
    lease_b = await cache.lease("b")
    assert await cache.put_many_if_newer([("b", "b2", 2, lease_b)]) == [True]
    assert await cache.get("b") == CacheItem("b", "b2", 2)


@pytest.mark.anyio
async def test_a_put_without_a_lease_stores_by_version_alone(backend: Backend) -> None:
    """Without lease=, put_if_newer ignores incarnations: it stores on fresh, leased and lost keys."""
    cache = backend.cache
    assert await cache.put_if_newer("fresh", "x", 3)
    await cache.lease("leased")
    assert await cache.put_if_newer("leased", "x", 3)
    assert await cache.put_if_newer("lost", "x", 6, ttl=TTL)
    await backend.lose("lost")
    assert await cache.put_if_newer("lost", "older", 5)  # nothing protects an unleased put from a loss
    assert await cache.versions(["fresh", "leased", "lost"]) == [3, 3, 5]


@pytest.mark.anyio
async def test_discard_ends_the_incarnation(backend: Backend) -> None:
    """After discard(k, v) at the stored version, the lease taken before is refused and lease() is new."""
    cache = backend.cache
    lease = await cache.lease("k")
    assert await cache.put_if_newer("k", "a", 5, lease=lease)
    assert await cache.discard("k", 5) is True
    assert await cache.put_if_newer("k", "b", 9, lease=lease) is False
    assert await cache.get("k") is None
    renewed = await cache.lease("k")
    assert renewed != lease
    assert await cache.put_if_newer("k", "older", 1, lease=renewed) is True  # no floor was left behind


BAD_LEASES: list[Any] = [0, -1, True, False, 2**63, "x", 1.0, "1"]


@pytest.mark.anyio
@pytest.mark.parametrize("bad", BAD_LEASES, ids=repr)
async def test_a_malformed_lease_is_invalid_argument_and_writes_nothing(backend: Backend, bad: Any) -> None:
    """A lease not in 1..2**63-1 is InvalidArgument (a CacheError, a ValueError) before any I/O."""
    cache = backend.cache
    await cache.put_if_newer("k", "kept", 5, ttl=300)
    before = await backend.state()
    calls: list[Callable[[], Any]] = [
        lambda: cache.put_if_newer("k", "v", 9, lease=bad),
        lambda: cache.put_many_if_newer([("other", "v", 1), ("k", "v", 9, bad)]),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument, match="lease") as caught:
            await call()
        assert isinstance(caught.value, CacheError)
        assert isinstance(caught.value, ValueError)
    assert await backend.state() == before
    await cache.aclose()  # any I/O would now raise CacheUnavailable: the check runs before it
    for call in calls:
        with pytest.raises(InvalidArgument):
            await call()


@pytest.mark.anyio
async def test_lease_and_lease_many_validate_keys_before_any_io(backend: Backend) -> None:
    """lease("") / lease_many with a bad key or a str for keys raise InvalidKey, also on a closed cache."""
    cache = backend.cache
    await cache.aclose()
    for call in (cache.lease(""), cache.lease_many(["ok", ""]), cache.lease_many("ab")):  # type: ignore[arg-type]
        with pytest.raises(InvalidKey):
            await call


# -- RedisCache specifics ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lease_and_lease_many_survive_script_flush(private_redis: PrivateRedis) -> None:
    """After SCRIPT FLUSH, lease, lease_many and a leased put still run (NOSCRIPT falls back to EVAL)."""

    def flush() -> None:
        with private_redis.client() as raw:
            raw.script_flush()
            assert raw.info("memory")["number_of_cached_scripts"] == 0

    async with RedisCache.from_url(private_redis.url, namespace="t") as cache:
        first = await cache.lease("a")
        flush()
        assert await cache.lease("a") == first
        flush()
        many = await cache.lease_many(["a", "b", "c"])
        assert many[0] == first
        assert len(set(many)) == 3
        flush()
        assert await cache.lease_many(["b"]) == [many[1]]  # one key: a plain EVALSHA
        flush()
        items = [("a", "x", 1, first), ("b", "y", 1, many[1])]
        assert await cache.put_many_if_newer(items) == [True, True]


# -- a reference model, MemoryCache and RedisCache agree on every result ----------------------------


@dataclass
class _ModelState:
    incarnation: int
    item: int | None = None
    value: str | None = None
    floor: int | None = None
    expires: bool = True
    """False only while an item stored without a ttl is held (leases, floors and ttl'd items expire)."""


class Model:
    """The contract in plain Python: one state per key (item or floor, incarnation), lost as a whole."""

    def __init__(self) -> None:
        self.states: dict[str, _ModelState] = {}
        self._incarnations = itertools.count(1)

    def _state(self, key: str) -> _ModelState:
        if key not in self.states:
            self.states[key] = _ModelState(next(self._incarnations))
        return self.states[key]

    def _store(self, key: str, value: str, version: int, ttl: float | None) -> None:
        state = self._state(key)
        state.item, state.value, state.floor, state.expires = version, value, None, ttl is not None

    def _item(self, key: str) -> int | None:
        state = self.states.get(key)
        return None if state is None else state.item

    async def get(self, key: str) -> CacheItem | None:
        state = self.states.get(key)
        if state is None or state.item is None:
            return None
        return CacheItem(key, state.value, state.item)

    async def versions(self, keys: list[str]) -> list[int | None]:
        return [self._item(key) for key in keys]

    async def lease(self, key: str) -> int:
        return self._state(key).incarnation

    async def put_if_newer(
        self, key: str, value: str, version: int, *, ttl: float | None = None, lease: int | None = None
    ) -> bool:
        state = self.states.get(key)
        if lease is not None and (state is None or state.incarnation != lease):
            return False
        if state is not None and state.item is not None and state.item >= version:
            return False
        if state is not None and state.floor is not None and state.floor >= version:
            return False
        self._store(key, value, version, ttl)
        return True

    async def invalidate(self, key: str, version: int) -> None:
        item = self._item(key)
        if item is not None and item > version:
            return
        state = self._state(key)
        state.floor = version if state.floor is None else max(version, state.floor)
        state.item, state.value, state.expires = None, None, True

    async def remove(self, key: str, *, version: int | None = None) -> bool:
        current = self._item(key)
        if version is not None and current != version:
            raise VersionMismatch(key, version, current)
        if current is None:
            return False
        state = self.states[key]
        state.floor, state.item, state.value, state.expires = current, None, None, True
        return True

    def _next(self, key: str, base: int | None) -> int:
        version = 1 if base is None else base + 1
        if version > MAX:
            raise InvalidVersionModel
        return version

    async def add(self, key: str, value: str, *, ttl: float | None = None) -> int:
        if self._item(key) is not None:
            raise KeyExists(key)
        state = self.states.get(key)
        version = self._next(key, None if state is None else state.floor)
        self._store(key, value, version, ttl)
        return version

    async def insert(
        self, key: str, value: str, *, version: int | None = None, ttl: float | None = None
    ) -> int:
        current = self._item(key)
        if version is not None and current != version:
            raise VersionMismatch(key, version, current)
        state = self.states.get(key)
        base = current if current is not None else (None if state is None else state.floor)
        new_version = self._next(key, base)
        self._store(key, value, new_version, ttl)
        return new_version

    async def discard(self, key: str, version: int) -> bool:
        if self._item(key) != version:
            return False
        del self.states[key]
        return True

    def expire(self) -> None:
        """Every state with a ttl is gone (the clock jumped past them all)."""
        self.states = {key: state for key, state in self.states.items() if not state.expires}


class InvalidVersionModel(Exception):
    """The model's overflow (compared by name with the backends' InvalidVersion)."""


KEYS = ("a", "b")
_versions = st.one_of(st.integers(0, 8), st.sampled_from([MAX - 1, MAX]))
_optional_versions = st.one_of(st.none(), _versions)
_ttl = st.sampled_from([None, TTL])
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"), st.sampled_from(KEYS), _versions, st.one_of(st.none(), st.integers(0, 30)), _ttl
        ),
        st.tuples(st.just("invalidate"), st.sampled_from(KEYS), _versions),
        st.tuples(st.just("remove"), st.sampled_from(KEYS), _optional_versions),
        st.tuples(st.just("add"), st.sampled_from(KEYS), _ttl),
        st.tuples(st.just("insert"), st.sampled_from(KEYS), _optional_versions, _ttl),
        st.tuples(st.just("discard"), st.sampled_from(KEYS), _optional_versions),
        st.tuples(st.just("lease"), st.sampled_from(KEYS)),
        st.tuples(st.just("get"), st.sampled_from(KEYS)),
        st.tuples(st.just("versions")),
        st.tuples(st.just("expire")),
    ),
    min_size=4,
    max_size=50,
)


class _Runner:
    """Applies operations to one implementation and normalises its answers for comparison."""

    def __init__(self, cache: Any, expire: Callable[[], Any], prefix: str) -> None:
        self.cache = cache
        self._expire = expire
        self.prefix = prefix
        self.leases: list[int] = []
        self._lease_ids: dict[int, int] = {}

    def _lease_id(self, lease: int) -> int:
        """Leases as the order in which each distinct one was first seen (values are random per backend)."""
        return self._lease_ids.setdefault(lease, len(self._lease_ids))

    async def apply(self, index: int, op: tuple[Any, ...]) -> Any:
        try:
            return await self._apply(index, op)
        except (CacheError, InvalidVersionModel) as exc:
            name = "InvalidVersion" if isinstance(exc, InvalidVersionModel) else type(exc).__name__
            return (name, getattr(exc, "current", None))

    async def _apply(self, index: int, op: tuple[Any, ...]) -> Any:
        kind, *args = op
        cache, value = self.cache, f"value{index}"
        key = self.prefix + args[0] if args else ""
        if kind == "put":
            _, version, lease_ref, ttl = args
            lease = (
                None if lease_ref is None or not self.leases else self.leases[lease_ref % len(self.leases)]
            )
            return await cache.put_if_newer(key, value, version, ttl=ttl, lease=lease)
        if kind == "invalidate":
            return await cache.invalidate(key, args[1])
        if kind == "remove":
            return await cache.remove(key, version=args[1])
        if kind == "add":
            return await cache.add(key, value, ttl=args[1])
        if kind == "insert":
            return await cache.insert(key, value, version=args[1], ttl=args[2])
        if kind == "discard":  # version None: at the version this implementation reports (often a hit)
            version = args[1]
            if version is None:
                version = (await cache.versions([key]))[0] or 0
            return await cache.discard(key, version)
        if kind == "lease":
            lease = await cache.lease(key)
            self.leases.append(lease)
            return ("lease", self._lease_id(lease))
        if kind == "get":
            item = await cache.get(key)
            return None if item is None else (item.key[len(self.prefix) :], item.value, item.version)
        if kind == "versions":
            return await cache.versions([self.prefix + name for name in KEYS])
        assert kind == "expire"
        await self._expire()
        return None


async def _expire_redis(raw: Redis | RedisCluster, cache: RedisCache, keys: list[str]) -> None:
    """What a clock jump does to Redis: every entry hash with an expiry is gone."""
    for key in keys:
        entry = cache.redis_keys(key)[0]
        if await raw.pttl(entry) > 0:
            await raw.delete(entry)


async def _check_one_state_per_key(raw: Redis | RedisCluster, cache: RedisCache, keys: list[str]) -> None:
    """The wire-format invariant: an entry holds an item (v and d) or a floor (fl), never both."""
    for key in keys:
        fields = set(await raw.hkeys(cache.redis_keys(key)[0]))
        assert not ({b"v", b"fl"} <= fields), (key, fields)
        assert (b"v" in fields) == (b"d" in fields), (key, fields)
        assert not fields or b"inc" in fields, (key, fields)


_examples = itertools.count()


async def _run_differential(url: str, cluster: bool, namespace: str, ops: list[tuple[Any, ...]]) -> None:
    prefix = f"ex{next(_examples)}:"
    keys = [prefix + name for name in KEYS]
    clock = OffsetClock()
    raw: Redis | RedisCluster = RedisCluster.from_url(url) if cluster else Redis.from_url(url)
    async with (
        MemoryCache(clock=clock) as memory,
        RedisCache.from_url(url, namespace=namespace, cluster=cluster) as redis,
    ):
        model = Model()

        async def jump() -> None:
            clock.advance(3600)

        async def model_expire() -> None:
            model.expire()

        runners = {
            "model": _Runner(model, model_expire, prefix),
            "memory": _Runner(memory, jump, prefix),
            "redis": _Runner(redis, lambda: _expire_redis(raw, redis, keys), prefix),
        }
        try:
            for index, op in enumerate(ops):
                results = {name: await runner.apply(index, op) for name, runner in runners.items()}
                assert results["memory"] == results["model"], (index, op, results)
                assert results["redis"] == results["model"], (index, op, results)
                await _check_one_state_per_key(raw, redis, keys)
        finally:
            for key in keys:
                await raw.delete(*redis.redis_keys(key))
            await raw.aclose()


# The model keeps item, floor and incarnation as one state per key, so agreeing with it on every result
# means: no put at or below a living item or floor ever lands (after put, invalidate, remove, add, insert
# in any order), a lease never outlives its key's state, and both backends lose state the same way.
@pytest.mark.parametrize("kind", ["redis", "cluster"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPERATIONS)
def test_model_memory_and_redis_agree_on_every_result(
    kind: str, ops: list[tuple[Any, ...]], request: pytest.FixtureRequest, namespace: str
) -> None:
    """Random operation sequences give the same results on a reference model, MemoryCache and Redis."""
    if kind == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        url = cluster.url
    else:
        url = request.getfixturevalue("redis_url")
    anyio.run(_run_differential, url, kind == "cluster", namespace, ops)
