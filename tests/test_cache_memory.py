"""MemoryCache specifics: its clock, statistics and repr (the shared contract: test_cache_contract)."""

from __future__ import annotations

import pytest

from graphcache.cache import LockLost, MemoryCache, MemoryCacheStatistics, RedisCache


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_item_ttl_follows_the_injected_monotonic_clock() -> None:
    """An item is readable until its ttl has passed on the cache's clock, then absent."""
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    assert await cache.put_if_newer("k", "v", 1, ttl=10)
    clock.now += 9.999
    assert await cache.get("k") is not None
    clock.now += 0.001
    assert await cache.get("k") is None


@pytest.mark.anyio
async def test_expired_lock_is_lost_and_the_next_holder_gets_a_larger_fence() -> None:
    """After lock_timeout the old handle gets LockLost; the next get_and_lock gets fence + 1."""
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    _, first = await cache.get_and_lock("k", lock_timeout=5)
    clock.now += 5
    _, second = await cache.get_and_lock("k", lock_timeout=5)
    assert second.fence == first.fence + 1
    with pytest.raises(LockLost):
        await cache.unlock("k", first)
    await cache.unlock("k", second)


@pytest.mark.anyio
async def test_floor_expires_after_its_ttl_and_then_stops_refusing() -> None:
    """invalidate's floor refuses puts at or below it only while it lives."""
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    await cache.invalidate("k", 7, ttl=30)
    assert not await cache.put_if_newer("k", "old", 7)
    clock.now += 30
    assert await cache.put_if_newer("k", "old", 7)


@pytest.mark.anyio
async def test_statistics_and_repr_show_live_state() -> None:
    """statistics() and repr count live items, floors and locks, and repr says when closed."""
    cache = MemoryCache()
    await cache.put_if_newer("a", 1, 1)
    await cache.invalidate("b", 3)
    await cache.get_and_lock("c", lock_timeout=60)
    assert cache.statistics() == MemoryCacheStatistics(items=1, floors=1, locks=1, lock_waiters=0)
    assert repr(cache) == "<MemoryCache [Items: 1 | Floors: 1 | Locks: 1, 0 waiting]>"
    await cache.aclose()
    assert repr(cache) == "<MemoryCache [closed]>"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "16"])
def test_a_bad_size_limit_is_refused_at_construction(bad: object) -> None:
    """max_value_bytes must be a positive int, for both backends."""
    with pytest.raises(ValueError, match="max_value_bytes"):
        MemoryCache(max_value_bytes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_value_bytes"):
        RedisCache.from_url("redis://127.0.0.1:1/0", max_value_bytes=bad)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_lease_only_state_lives_600_s_of_the_clock_and_then_a_new_lease_begins() -> None:
    """A lease-only key keeps its lease 600 s of the clock (lease() does not extend it), then renews."""
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    lease = await cache.lease("k")
    clock.now += 599.999
    assert await cache.lease("k") == lease
    clock.now += 0.001
    renewed = await cache.lease("k")
    assert renewed != lease
    assert await cache.put_if_newer("k", "late", 1, lease=lease) is False
    assert await cache.put_if_newer("k", "fresh", 1, lease=renewed) is True


@pytest.mark.anyio
async def test_the_expiry_of_an_item_or_a_floor_ends_the_keys_incarnation() -> None:
    """An item's or a floor's expiry ends the key's incarnation: its old lease is refused."""
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    item_lease, floor_lease = await cache.lease_many(["item", "floor"])
    assert await cache.put_if_newer("item", "v", 5, ttl=10, lease=item_lease)
    await cache.invalidate("floor", 5, ttl=20)
    clock.now += 10
    assert await cache.put_if_newer("item", "v", 6, lease=item_lease) is False
    assert await cache.put_if_newer("floor", "v", 6, lease=floor_lease) is True
    clock.now += 10
    assert await cache.versions(["item", "floor"]) == [None, 6]
    await cache.invalidate("floor", 9, ttl=5)
    clock.now += 5
    assert await cache.put_if_newer("floor", "old", 2) is True  # the floor (and everything) expired
    assert await cache.put_if_newer("floor", "newer", 3, lease=floor_lease) is False
    assert cache.statistics() == MemoryCacheStatistics(items=1, floors=0, locks=0, lock_waiters=0, poisoned=0)


@pytest.mark.anyio
async def test_an_item_with_a_short_ttl_over_a_floor_keeps_the_floors_protection() -> None:
    """invalidate(10, ttl=60), then an item at 11 with ttl 1: after 30 s the key still refuses version 9."""
    clock = FakeClock()
    cache = MemoryCache(clock=clock)
    await cache.invalidate("k", 10, ttl=60)
    assert await cache.put_if_newer("k", "eleven", 11, ttl=1)
    clock.now += 30
    assert await cache.put_if_newer("k", "nine", 9) is False
    clock.now += 31
    assert await cache.put_if_newer("k", "nine", 9) is True  # the floor's 60 s are over
