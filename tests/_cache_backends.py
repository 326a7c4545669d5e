"""Every ``VersionedCache`` backend under test, with a view of its raw state for "nothing written" checks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from graphcache.cache import MemoryCache, RedisCache

__all__ = ("BACKENDS", "Backend", "OffsetClock", "open_backend")

BACKENDS = ("memory", "redis", "cluster")
SMALL_LIMIT = 4096
"""Value size limit the contract tests configure, so ValueTooLarge needs no 16 MiB payload."""


class OffsetClock:
    """The real monotonic clock plus an offset a test moves forward by hand (to expire ttls at once)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


LOSS_JUMP = 3600.0
"""Seconds MemoryCache's clock jumps in ``Backend.lose``: past every lease, floor and test ttl."""


@dataclass
class Backend:
    """A cache plus, for Redis backends, a raw client on its namespace (for MemoryCache, its clock)."""

    kind: str
    cache: MemoryCache | RedisCache
    raw: Redis | RedisCluster | None = None
    namespace: str = ""
    clock: OffsetClock | None = None

    async def lose(self, key: str) -> None:
        """Lose ``key``'s whole state the way Redis can (eviction, restart without persistence).

        Redis: a raw DEL of the key's entry hash, lock and fence counter. MemoryCache holds no state
        outside its process, so it loses state only by expiry: its clock jumps ``LOSS_JUMP`` seconds,
        which expires every state with a ttl (a lease's, a floor's or a put's) — a test that calls
        this gives the key a ttl.
        """
        if self.raw is None:
            assert self.clock is not None
            self.clock.advance(LOSS_JUMP)
            return
        assert isinstance(self.cache, RedisCache)
        await self.raw.delete(*self.cache.redis_keys(key))

    async def raw_keys(self) -> list[bytes]:
        """Every Redis key in this test's namespace (SCAN, over all masters on a Cluster)."""
        assert self.raw is not None
        return sorted([k async for k in self.raw.scan_iter(match=f"{self.namespace}:*".encode(), count=1000)])

    async def state(self) -> Any:
        """Everything stored: Redis keys with their values, or MemoryCache's entries."""
        if self.raw is None:
            assert isinstance(self.cache, MemoryCache)
            return self.cache.statistics(), await _memory_items(self.cache)
        dump = []
        for key in await self.raw_keys():
            kind = await self.raw.type(key)
            value = await self.raw.hgetall(key) if kind == b"hash" else await self.raw.get(key)
            dump.append((key, value, await self.raw.pttl(key) > 0))
        return dump


async def _memory_items(cache: MemoryCache) -> list[Any]:
    return [await cache.get(key) for key in ("k", "other")]


async def open_backend(
    kind: str, request: pytest.FixtureRequest, namespace: str, *, max_value_bytes: int = SMALL_LIMIT
) -> AsyncIterator[Backend]:
    """Yield a fresh backend; Redis ones delete their namespace's keys afterwards."""
    if kind == "memory":
        clock = OffsetClock()
        async with MemoryCache(max_value_bytes=max_value_bytes, clock=clock) as memory:
            yield Backend(kind, memory, clock=clock)
        return
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        raw: Redis | RedisCluster = Redis.from_url(url)
    else:
        url = request.getfixturevalue("redis_cluster").url
        raw = RedisCluster.from_url(url)
    cluster = kind == "cluster"
    cache = RedisCache.from_url(url, namespace=namespace, cluster=cluster, max_value_bytes=max_value_bytes)
    backend = Backend(kind, cache, raw, namespace)
    try:
        yield backend
    finally:
        for key in await backend.raw_keys():
            await raw.delete(key)
        await cache.aclose()
        await raw.aclose()
