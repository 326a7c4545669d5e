"""RedisCache specifics: the wire format, slots, scripts after SCRIPT FLUSH, an outage and its recovery."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from graphcache.cache import CacheError, CacheItem, CacheUnavailable, InvalidArgument, RedisCache
from tests._cache_backends import Backend, open_backend
from tests._redis_servers import PrivateRedis, RedisClusterServers
from tests.test_cache_contract import HOSTILE_KEYS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["redis", "cluster"])
async def backend(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Backend]:
    async for opened in open_backend(request.param, request, namespace):
        yield opened


def _wire_key(namespace: str, key: str, kind: str) -> bytes:
    """The documented layout, rebuilt independently of the implementation."""
    tag = base64.urlsafe_b64encode(key.encode("utf-8")).decode().rstrip("=")
    return f"{namespace}:{{{tag}}}:{kind}".encode()


async def test_wire_format_is_a_hash_of_decimal_version_msgpack_and_incarnation(backend: Backend) -> None:
    """NS:{b64url(key)}:e holds v (decimal), d (msgpack) and inc (decimal), readable without this library."""
    assert backend.raw is not None
    lease = await backend.cache.lease("graph:r1")
    await backend.cache.put_if_newer("graph:r1", {"nodes": [1, 2]}, 2**62 + 3, lease=lease)
    raw = await backend.raw.hgetall(_wire_key(backend.namespace, "graph:r1", "e"))
    assert raw[b"v"] == str(2**62 + 3).encode()
    assert msgspec.msgpack.decode(raw[b"d"]) == {"nodes": [1, 2]}
    assert raw[b"inc"] == str(lease).encode()
    assert set(raw) == {b"v", b"d", b"inc"}


async def test_wire_format_of_floor_lock_and_fence(backend: Backend) -> None:
    """fl in the entry hash holds the floor (the hash expires with its ttl), l holds "token:fence" (with
    lock_timeout), c the last fence."""
    assert backend.raw is not None
    await backend.cache.invalidate("k", 12, ttl=60)
    _, lock = await backend.cache.get_and_lock("k", lock_timeout=30)
    raw = backend.raw
    entry = _wire_key(backend.namespace, "k", "e")
    assert await raw.hget(entry, "fl") == b"12"
    assert await raw.hget(entry, "v") is None
    assert 0 < await raw.pttl(entry) <= 60_000
    assert await raw.get(_wire_key(backend.namespace, "k", "l")) == f"{lock.token}:{lock.fence}".encode()
    assert 0 < await raw.pttl(_wire_key(backend.namespace, "k", "l")) <= 30_000
    assert await raw.get(_wire_key(backend.namespace, "k", "c")) == str(lock.fence).encode()
    await backend.cache.unlock("k", lock)


async def test_item_ttl_is_the_hash_expiry_and_no_ttl_clears_it(backend: Backend) -> None:
    """put with ttl sets PEXPIRE on the entry hash; a later put without ttl makes it persistent."""
    assert backend.raw is not None
    item_key = _wire_key(backend.namespace, "k", "e")
    await backend.cache.put_if_newer("k", "a", 1, ttl=100)
    assert 0 < await backend.raw.pttl(item_key) <= 100_000
    await backend.cache.put_if_newer("k", "b", 2)
    assert await backend.raw.pttl(item_key) == -1


async def test_hostile_keys_stay_inside_the_namespace(backend: Backend) -> None:
    """Every Redis key written is <namespace>:{base64url tag}:e, one per cache key."""
    for index, key in enumerate(HOSTILE_KEYS):
        await backend.cache.put_if_newer(key, index, index + 1)
    raw = await backend.raw_keys()
    shape = re.compile(rb"%s:\{[A-Za-z0-9_-]+\}:e" % backend.namespace.encode())
    assert all(shape.fullmatch(k) for k in raw), raw
    assert sorted(raw) == sorted(_wire_key(backend.namespace, key, "e") for key in HOSTILE_KEYS)


async def test_all_of_one_keys_state_shares_one_hash_slot(backend: Backend) -> None:
    """Entry hash, lock and fence counter of a key exist and hash to one slot."""
    cache = backend.cache
    assert isinstance(cache, RedisCache)
    for key in HOSTILE_KEYS:
        await cache.put_if_newer(key, "v", 2)
        await cache.invalidate(key, 1)
        _, lock = await cache.get_and_lock(key, lock_timeout=30)
        names = cache.redis_keys(key)
        assert set(names) <= set(await backend.raw_keys())
        assert len({key_slot(name) for name in names}) == 1
        await cache.unlock(key, lock)


async def test_a_key_cannot_choose_its_slot() -> None:
    """A key shaped like a hash tag lands in the slot of its base64 tag, not of its own braces."""
    cache = RedisCache(Redis(), namespace="ns")
    item = cache.redis_keys("{victim}")[0]
    assert key_slot(item) != key_slot(b"{victim}")
    assert item == _wire_key("ns", "{victim}", "e")
    await cache.aclose()


def test_namespace_must_be_plain() -> None:
    """A namespace with braces, colons, spaces or nothing at all is a ValueError."""
    for bad in ["", "a:b", "{a}", "a b", "a*", "ü"]:
        with pytest.raises(ValueError, match="namespace"):
            RedisCache.from_url("redis://127.0.0.1:1/0", namespace=bad)


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "redis://127.0.0.1:port/0", 6379, None])
@pytest.mark.parametrize("cluster", [False, True])
def test_a_url_redis_py_cannot_use_is_invalid_argument_without_its_password(url: Any, cluster: bool) -> None:
    """from_url of a URL redis-py refuses (or of no str) is InvalidArgument, never redis-py's ValueError."""
    with pytest.raises(InvalidArgument, match="URL"):
        RedisCache.from_url(url, cluster=cluster)
    with pytest.raises(InvalidArgument) as caught:
        RedisCache.from_url("redis://user:hunter2@127.0.0.1:port/0")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "options",
    [{"namespace": "a:b"}, {"namespace": ""}, {"floor_ttl": 0}, {"floor_ttl": None}, {"max_value_bytes": 0}],
    ids=repr,
)
def test_bad_constructor_options_are_invalid_argument(options: dict[str, Any]) -> None:
    """A bad namespace, floor_ttl or max_value_bytes is InvalidArgument (a CacheError and a ValueError)."""
    for build in (RedisCache.from_url, lambda url, **kw: RedisCache(Redis.from_url(url), **kw)):
        with pytest.raises(InvalidArgument) as caught:
            build("redis://127.0.0.1:1/0", **options)
        assert isinstance(caught.value, CacheError)
        assert isinstance(caught.value, ValueError)


async def test_scripts_survive_script_flush(private_redis: PrivateRedis) -> None:
    """After SCRIPT FLUSH every script still runs (NOSCRIPT falls back to EVAL)."""
    async with RedisCache.from_url(private_redis.url, namespace="t") as cache:
        assert await cache.put_if_newer("k", "a", 1)
        with private_redis.client() as raw:
            raw.script_flush()
        assert await cache.put_many_if_newer([("k", "b", 2), ("j", "x", 1)]) == [True, True]
        with private_redis.client() as raw:
            raw.script_flush()
        assert await cache.put_many_if_newer([("k", "b", 2)]) == [False]  # one item: a plain EVALSHA
        with private_redis.client() as raw:
            raw.script_flush()
        assert await cache.put_if_newer("k", "b", 2) is False
        assert await cache.insert("k", "c", version=2) == 3
        assert await cache.get_if_newer("k", 2) == CacheItem("k", "c", 3)


async def test_scripts_survive_script_flush_on_the_cluster(redis_cluster: RedisClusterServers) -> None:
    """On every Cluster master, SCRIPT FLUSH does not break later calls on keys of any slot."""
    async with RedisCache.from_url(redis_cluster.url, namespace="flush", cluster=True) as cache:
        keys = [f"key{i}" for i in range(12)]
        for key in keys:
            await cache.put_if_newer(key, "a", 1)
        for node in redis_cluster.nodes:
            with node.client() as raw:
                raw.script_flush()
        assert await cache.put_many_if_newer([(key, "m", 2) for key in keys]) == [True] * len(keys)
        for node in redis_cluster.nodes:
            with node.client() as raw:
                raw.script_flush()
        for key in keys:
            assert await cache.insert(key, "b", version=2) == 3
            assert await cache.remove(key, version=3)


async def test_an_existing_client_is_used_and_left_open(redis_url: str, namespace: str) -> None:
    """RedisCache(client) works on the caller's client and does not close it."""
    client = Redis.from_url(redis_url)
    async with RedisCache(client, namespace=namespace) as cache:
        assert await cache.add("k", "v") == 1
    assert await client.hget(_wire_key(namespace, "k", "e"), "v") == b"1"
    await client.delete(_wire_key(namespace, "k", "e"))
    await client.aclose()


async def test_an_existing_cluster_client_is_used(redis_cluster: RedisClusterServers, namespace: str) -> None:
    """A RedisCluster client works the same, and repr names the Cluster."""
    client = RedisCluster.from_url(redis_cluster.url)
    async with RedisCache(client, namespace=namespace) as cache:
        assert await cache.put_if_newer("k", "v", 5)
        assert await cache.get("k") == CacheItem("k", "v", 5)
        assert repr(cache).startswith("<RedisCache [Cluster ")
        await cache.remove("k")
    await client.aclose()


async def test_repr_shows_address_namespace_and_state(redis_url: str) -> None:
    """repr names the backend, the address, the namespace, lock waiters and whether it is closed."""
    cache = RedisCache.from_url("redis://127.0.0.1:6379/0", namespace="ns")
    assert (
        repr(cache)
        == "<RedisCache [Redis redis://127.0.0.1:6379/0 | namespace 'ns' | open, 0 waiting for locks]>"
    )
    await cache.aclose()
    assert repr(cache) == "<RedisCache [Redis redis://127.0.0.1:6379/0 | namespace 'ns' | closed]>"


def test_repr_hides_the_password() -> None:
    """A password in the URL never reaches repr or error messages."""
    cache = RedisCache.from_url("redis://user:secret@127.0.0.1:1/0")
    assert "secret" not in repr(cache)
    assert "user:***@" in repr(cache)


async def test_a_stopped_server_raises_cache_unavailable_then_recovers(private_redis: PrivateRedis) -> None:
    """With Redis down every call raises CacheUnavailable naming the address; once back, calls succeed."""
    cache = RedisCache.from_url(private_redis.url, namespace="t", connect_timeout=1, socket_timeout=1)
    async with cache:
        assert await cache.put_if_newer("k", "a", 1)
        await anyio.to_thread.run_sync(private_redis.stop)  # blocking process control, off the loop
        with anyio.fail_after(30):  # a hang guard: each call is bounded by the client timeouts
            for call in (cache.get("k"), cache.put_if_newer("k", "b", 2), cache.insert("k", "c")):
                with pytest.raises(CacheUnavailable, match=re.escape(f"127.0.0.1:{private_redis.port}")):
                    await call
        await anyio.to_thread.run_sync(private_redis.start)
        assert await cache.get("k") is None  # a fresh server without persistence: the data is gone
        assert await cache.put_if_newer("k", "b", 2)
        assert await cache.get("k") == CacheItem("k", "b", 2)


async def test_cache_unavailable_keeps_the_redis_error_as_its_cause(private_redis: PrivateRedis) -> None:
    """The mapped error is a CacheError whose __cause__ is the redis-py exception."""
    async with RedisCache.from_url(private_redis.url, namespace="t", connect_timeout=1) as cache:
        await anyio.to_thread.run_sync(private_redis.stop)  # blocking process control, off the loop
        with pytest.raises(CacheUnavailable) as caught:
            await cache.get("k")
    assert isinstance(caught.value, CacheError)
    assert caught.value.__cause__ is not None
    assert type(caught.value.__cause__).__module__.startswith("redis")


async def test_a_closed_cache_raises_cache_unavailable(redis_url: str) -> None:
    """Calls after aclose raise CacheUnavailable instead of reopening connections."""
    cache = RedisCache.from_url(redis_url)
    await cache.aclose()
    with pytest.raises(CacheUnavailable, match="closed"):
        await cache.get("k")


# -- fences never repeat -----------------------------------------------------------------------------


async def test_fences_increase_across_a_lost_counter_and_a_restart_and_never_trail_the_clock(
    private_redis: PrivateRedis,
) -> None:
    """Fences are >= server TIME in µs and increase across a deleted counter and a restart."""
    fences: list[int] = []
    async with RedisCache.from_url(private_redis.url, namespace="f", socket_timeout=2) as cache:
        counter = cache.redis_keys("k")[2]

        async def grant() -> None:
            with private_redis.client() as raw:
                seconds, micros = raw.time()
            _, lock = await cache.get_and_lock("k", lock_timeout=30)
            assert lock.fence >= seconds * 1_000_000 + micros
            await cache.unlock("k", lock)
            fences.append(lock.fence)

        for _ in range(3):
            await grant()
        with private_redis.client() as raw:
            assert raw.delete(counter) == 1
        await grant()
        await grant()
        with private_redis.client() as raw:
            run_id = raw.info("server")["run_id"]
        await anyio.to_thread.run_sync(private_redis.stop)  # blocking process control, off the loop
        await anyio.to_thread.run_sync(private_redis.start)
        with private_redis.client() as raw:
            assert raw.info("server")["run_id"] != run_id
            assert raw.dbsize() == 0  # the restart really lost the counter
        await _until_reachable(cache)
        await grant()
        await grant()
    assert fences == sorted(set(fences)), fences


async def _until_reachable(cache: RedisCache) -> None:
    """Call until the pool has dropped the connections the restart killed (each fails one call)."""
    with anyio.fail_after(30):  # a hang guard, not a timing assertion
        while True:
            try:
                await cache.versions(["probe"])
            except CacheUnavailable:
                continue
            return


async def test_cache_unavailable_says_what_redis_py_saw(private_redis: PrivateRedis) -> None:
    """The CacheUnavailable message carries the redis-py error's own text, not only its class name."""
    async with RedisCache.from_url(private_redis.url, namespace="t", connect_timeout=1) as cache:
        await cache.put_if_newer("k", "v", 1)
        await anyio.to_thread.run_sync(private_redis.stop)  # blocking process control, off the loop
        for call in (cache.get("k"), cache.put_if_newer("k", "v", 2)):
            with pytest.raises(CacheUnavailable) as caught:
                await call
            cause = caught.value.__cause__
            assert cause is not None
            assert str(cause)
            assert f"{type(cause).__name__}: {cause}" in str(caught.value)


# -- malformed entries ---------------------------------------------------------------------------------


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


_ONE = msgspec.msgpack.encode(Point(1, 2))


async def _hash(raw: Redis | RedisCluster, entry: bytes, fields: dict[str, bytes]) -> None:
    await raw.hset(entry, mapping=fields)  # type: ignore[arg-type]


POISONS: dict[str, Callable[[Redis | RedisCluster, bytes], Awaitable[Any]]] = {
    "non-numeric v": lambda raw, e: _hash(raw, e, {"v": b"abc", "d": _ONE, "inc": b"7"}),
    "5000-digit v": lambda raw, e: _hash(raw, e, {"v": b"9" * 5000, "d": _ONE}),
    "negative v": lambda raw, e: _hash(raw, e, {"v": b"-1", "d": _ONE}),
    "leading-zero v": lambda raw, e: _hash(raw, e, {"v": b"007", "d": _ONE, "inc": b"7"}),
    "v above 2**64": lambda raw, e: _hash(raw, e, {"v": b"18446744073709551616", "d": _ONE}),
    "v without d": lambda raw, e: _hash(raw, e, {"v": b"5", "inc": b"7"}),
    "d without v": lambda raw, e: _hash(raw, e, {"d": _ONE, "inc": b"7"}),
    "undecodable d": lambda raw, e: _hash(raw, e, {"v": b"5", "d": b"\xc1", "inc": b"7"}),
    "a string": lambda raw, e: raw.set(e, b"5"),
    "a list": lambda raw, e: raw.rpush(e, b"5", b"x"),
}
VERSION_VISIBLE = {"undecodable d"}
"""Entries whose well-formed ``v`` versions() reports: it reads no value, so cannot see it is undecodable."""


def _reads(cache: RedisCache) -> list[Callable[[], Awaitable[CacheItem | None]]]:
    return [
        lambda: cache.get("k"),
        lambda: cache.get("k", type=Point),
        lambda: cache.get_if_newer("k", 0),
        lambda: cache.get_if_newer("k", 0, type=Point),
    ]


@pytest.mark.parametrize("poison", list(POISONS))
async def test_a_malformed_entry_is_a_counted_miss_that_is_removed_and_replaced(
    backend: Backend, poison: str
) -> None:
    """A malformed entry reads as None, is counted as poisoned and removed; a put at version 1 stores."""
    cache, raw = backend.cache, backend.raw
    assert isinstance(cache, RedisCache)
    assert raw is not None
    entry = cache.redis_keys("k")[0]
    for read in _reads(cache):
        await POISONS[poison](raw, entry)
        before = cache.statistics().poisoned
        assert await read() is None
        assert cache.statistics().poisoned == before + 1
        assert await raw.exists(entry) == 0
        assert await cache.put_if_newer("k", Point(7, 7), 1) is True
        assert await cache.get("k", type=Point) == CacheItem("k", Point(7, 7), 1)
        await raw.delete(entry)


@pytest.mark.parametrize("poison", list(POISONS))
async def test_versions_reports_none_for_a_malformed_entry(backend: Backend, poison: str) -> None:
    """versions() is None for a malformed v, a missing value or a key of another type."""
    cache, raw = backend.cache, backend.raw
    assert isinstance(cache, RedisCache)
    assert raw is not None
    await POISONS[poison](raw, cache.redis_keys("k")[0])
    await cache.put_if_newer("good", "x", 3)
    expected = 5 if poison in VERSION_VISIBLE else None
    assert await cache.versions(["good", "k", "absent"]) == [3, expected, None]


@pytest.mark.parametrize("poison", list(POISONS))
async def test_get_many_serves_a_malformed_entry_as_a_counted_miss_and_removes_it(
    backend: Backend, poison: str
) -> None:
    """In get_many a malformed entry is a miss, counted and removed, as in get; its neighbours are served."""
    cache, raw = backend.cache, backend.raw
    assert isinstance(cache, RedisCache)
    assert raw is not None
    entry = cache.redis_keys("k")[0]
    await cache.put_if_newer("good", Point(1, 1), 3)
    for kind in (None, Point):
        await POISONS[poison](raw, entry)
        before = cache.statistics().poisoned
        items = await cache.get_many(["good", "k", "absent"], type=kind)
        assert items[1:] == [None, None]
        assert items[0] is not None
        assert items[0].version == 3
        assert cache.statistics().poisoned == before + 1
        assert await raw.exists(entry) == 0


@pytest.mark.parametrize("poison", list(POISONS))
async def test_get_and_lock_on_a_malformed_entry_locks_a_miss_and_put_and_unlock_replaces_it(
    backend: Backend, poison: str
) -> None:
    """get_and_lock on a malformed entry locks a miss, and put_and_unlock replaces the entry."""
    cache, raw = backend.cache, backend.raw
    assert isinstance(cache, RedisCache)
    assert raw is not None
    await POISONS[poison](raw, cache.redis_keys("k")[0])
    item, lock = await cache.get_and_lock("k", lock_timeout=30, type=Point)
    assert item is None
    version = await cache.put_and_unlock("k", Point(8, 8), lock)
    assert await cache.get("k", type=Point) == CacheItem("k", Point(8, 8), version)


# -- configuration warnings and the error seam -----------------------------------------------------


async def test_eviction_warning_names_an_allkeys_policy_only(private_redis: PrivateRedis) -> None:
    """eviction_warning() is None under noeviction and volatile-lru, and names allkeys-lru under it."""
    async with RedisCache.from_url(private_redis.url, namespace="w") as cache:
        with private_redis.client() as raw:
            raw.config_set("maxmemory-policy", "noeviction")
            assert await cache.eviction_warning() is None
            raw.config_set("maxmemory-policy", "volatile-lru")
            assert await cache.eviction_warning() is None
            raw.config_set("maxmemory-policy", "allkeys-lru")
            warning = await cache.eviction_warning()
    assert warning is not None
    assert "allkeys-lru" in warning
    assert private_redis.address in warning


class _FailingPipeline:
    """A pipeline whose replies are those a Cluster node that dropped its connection mid-read leaves."""

    def __init__(self, replies: list[Any]) -> None:
        self._replies = replies

    def execute_command(self, *args: Any) -> None:
        pass

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return self._replies


class _PipelineClient:
    connection_pool = type("Pool", (), {"connection_kwargs": {"host": "fake", "port": 1}})()

    def __init__(self, replies: list[Any]) -> None:
        self._replies = replies

    def pipeline(self, transaction: bool = True) -> _FailingPipeline:
        return _FailingPipeline(self._replies)


async def test_versions_maps_a_failed_pipelined_reply_instead_of_reporting_a_miss() -> None:
    """versions() raises CacheUnavailable for a failed pipelined reply instead of reporting a miss."""
    wrong_type = ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    client = _PipelineClient([b"4", True, wrong_type, wrong_type])
    cache = RedisCache(client, namespace="fake")  # type: ignore[arg-type]
    assert await cache.versions(["a", "b"]) == [4, None]
    client._replies = [b"4", True, RedisConnectionError("Connection closed by server."), True]
    with pytest.raises(CacheUnavailable) as caught:
        await cache.versions(["a", "b"])
    assert isinstance(caught.value.__cause__, RedisConnectionError)


async def test_get_many_reads_every_key_in_one_pipeline_and_maps_a_failed_reply() -> None:
    """get_many sends one pipeline, nothing else; a failed pipelined reply is CacheUnavailable, not a miss."""
    stored = [b"4", msgspec.msgpack.encode(Point(1, 2))]
    client = _PipelineClient([stored, [None, None], stored])  # a client with no other command: any raises
    cache = RedisCache(client, namespace="fake")  # type: ignore[arg-type]
    assert await cache.get_many(["a", "b", "c"], type=Point) == [
        CacheItem("a", Point(1, 2), 4),
        None,
        CacheItem("c", Point(1, 2), 4),
    ]
    client._replies = [stored, RedisConnectionError("Connection closed by server.")]
    with pytest.raises(CacheUnavailable) as caught:
        await cache.get_many(["a", "b"])
    assert isinstance(caught.value.__cause__, RedisConnectionError)


async def test_an_item_with_a_short_ttl_over_a_floor_keeps_the_floors_expiry(backend: Backend) -> None:
    """An item stored over a floor with a shorter ttl keeps the entry alive as long as the floor had left,
    so the floor's protection never ends early (the hash's PTTL stays near the floor's 60 s)."""
    assert backend.raw is not None
    entry = _wire_key(backend.namespace, "k", "e")
    await backend.cache.invalidate("k", 10, ttl=60)
    assert await backend.cache.put_if_newer("k", "eleven", 11, ttl=1)
    assert await backend.raw.pttl(entry) > 50_000
    assert await backend.cache.put_if_newer("k", "twelve", 12, ttl=1)  # no floor any more: its own ttl
    assert 0 < await backend.raw.pttl(entry) <= 1_000


@pytest.mark.parametrize("inc", [b"not-a-number", b"", b"0", b"-5", b"99999999999999999999"])
async def test_a_malformed_incarnation_is_replaced_not_served(backend: Backend, inc: bytes) -> None:
    """A malformed inc field never escapes as a ValueError: lease() gives a fresh incarnation, a leased put
    with it stores, and a lease taken before stays refused."""
    assert backend.raw is not None
    entry = _wire_key(backend.namespace, "k", "e")
    await backend.raw.hset(entry, mapping={b"v": b"3", b"d": msgspec.msgpack.encode("three"), b"inc": inc})
    lease = await backend.cache.lease("k")
    assert 1 <= lease <= 2**63 - 1
    assert await backend.cache.lease_many(["k"]) == [lease]
    assert await backend.cache.put_if_newer("k", "four", 4, lease=lease)
    assert await backend.cache.get("k") == CacheItem("k", "four", 4)
