"""RedisCache specifics: the wire format, slots, scripts after SCRIPT FLUSH, an outage and its recovery."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator

import anyio
import msgspec
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot

from cache import CacheError, CacheItem, CacheUnavailable, RedisCache
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
