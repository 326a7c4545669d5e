"""The VersionedCache contract, run against MemoryCache, RedisCache and RedisCache on a Redis Cluster."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import pytest

from graphcache.cache import (
    CacheError,
    CacheItem,
    InvalidArgument,
    InvalidKey,
    InvalidValue,
    InvalidVersion,
    KeyExists,
    LockLost,
    MemoryCache,
    ObjectLocked,
    RedisCache,
    ValueTooLarge,
    VersionedCache,
    VersionMismatch,
)
from tests._cache_backends import SMALL_LIMIT, Backend

pytestmark = pytest.mark.anyio

MAX = 2**63 - 1
BIG = 2**53  # above it, a Lua double can no longer tell n from n + 1


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


# -- get / put_if_newer -----------------------------------------------------------------------------


async def test_backends_satisfy_the_protocol(cache: VersionedCache) -> None:
    """Each backend is a runtime VersionedCache."""
    assert isinstance(cache, VersionedCache)


async def test_get_of_an_absent_key_is_none(cache: VersionedCache) -> None:
    """get and get_if_newer return None for a key never written."""
    assert await cache.get("k") is None
    assert await cache.get_if_newer("k", 0) is None


async def test_put_if_newer_stores_and_get_returns_value_and_version(cache: VersionedCache) -> None:
    """A first put_if_newer is stored and read back with its version."""
    assert await cache.put_if_newer("k", {"a": [1, 2]}, 3) is True
    assert await cache.get("k") == CacheItem("k", {"a": [1, 2]}, 3)


async def test_put_if_newer_refuses_equal_and_older_versions(cache: VersionedCache) -> None:
    """Only a strictly newer version replaces the stored item."""
    await cache.put_if_newer("k", "v5", 5)
    assert await cache.put_if_newer("k", "again", 5) is False
    assert await cache.put_if_newer("k", "old", 4) is False
    assert await cache.get("k") == CacheItem("k", "v5", 5)
    assert await cache.put_if_newer("k", "v6", 6) is True
    assert await cache.get("k") == CacheItem("k", "v6", 6)


async def test_put_many_if_newer_puts_each_item_as_put_if_newer_would(cache: VersionedCache) -> None:
    """Each (key, value, version) is stored only if newer than the stored item and above the key's floor,
    in order, so a later item of the same batch sees an earlier one."""
    await cache.put_if_newer("a", "a5", 5)
    await cache.invalidate("c", 4)
    items = [
        ("a", "a4", 4),
        ("b", "b1", 1),
        ("c", "c4", 4),
        ("a", "a6", 6),
        ("b", "b1 again", 1),
        ("c", "c5", 5),
    ]
    assert await cache.put_many_if_newer(items) == [False, True, False, True, False, True]
    assert [await cache.get(key) for key in "abc"] == [
        CacheItem("a", "a6", 6),
        CacheItem("b", "b1", 1),
        CacheItem("c", "c5", 5),
    ]
    assert await cache.put_many_if_newer([]) == []
    assert await cache.put_many_if_newer((("d", Point(1, 2), MAX),)) == [True]
    assert await cache.get("d", type=Point) == CacheItem("d", Point(1, 2), MAX)


async def test_get_if_newer_returns_the_item_only_when_strictly_newer(cache: VersionedCache) -> None:
    """get_if_newer(k, v) is the item when its version > v, else None."""
    await cache.put_if_newer("k", "x", 7)
    assert await cache.get_if_newer("k", 6) == CacheItem("k", "x", 7)
    assert await cache.get_if_newer("k", 7) is None
    assert await cache.get_if_newer("k", 8) is None


async def test_type_decodes_into_a_struct(cache: VersionedCache) -> None:
    """type= decodes the stored msgpack into the given msgspec Struct."""
    await cache.put_if_newer("k", Point(1, 2), 1)
    item = await cache.get("k", type=Point)
    assert item is not None
    assert item.value == Point(1, 2)
    newer = await cache.get_if_newer("k", 0, type=Point)
    assert newer is not None
    assert newer.value == Point(1, 2)
    untyped = await cache.get("k")
    assert untyped is not None
    assert untyped.value == {"x": 1, "y": 2}


async def test_a_value_that_does_not_fit_type_raises_invalid_value(cache: VersionedCache) -> None:
    """get/get_if_newer with a type= the stored value does not fit raise InvalidValue naming the key;
    a type= msgspec cannot decode into is refused even for an absent key (before any I/O)."""
    await cache.put_if_newer("k", {"x": "not an int", "y": 2}, 1)
    for read in (cache.get("k", type=Point), cache.get_if_newer("k", 0, type=Point)):
        with pytest.raises(InvalidValue, match="'k'") as caught:
            await read
        assert isinstance(caught.value, ValueError)
        assert isinstance(caught.value.__cause__, msgspec.ValidationError)
    assert await cache.get("k") == CacheItem("k", {"x": "not an int", "y": 2}, 1)
    for bad_type in (5, "Point", object()):
        with pytest.raises(InvalidValue, match="type="):
            await cache.get("absent", type=bad_type)
        with pytest.raises(InvalidValue, match="type="):
            await cache.get_if_newer("absent", 0, type=bad_type)
    assert await cache.get("absent", type=list[int]) is None


async def test_put_if_newer_ignores_locks(cache: VersionedCache) -> None:
    """A newer versioned put lands even while another holder has the key locked."""
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    assert await cache.put_if_newer("k", "v", 9) is True
    assert await cache.get("k") == CacheItem("k", "v", 9)
    await cache.unlock("k", lock)


# -- get_many -------------------------------------------------------------------------------------------


async def test_get_many_is_get_of_each_key_in_order(cache: VersionedCache) -> None:
    """get_many(keys) is [get(k) for k in keys]: None for absent, invalidated and lease-only keys."""
    await cache.put_if_newer("a", {"n": 1}, 5)
    await cache.put_if_newer("b", "y", MAX)
    await cache.put_if_newer("c", "gone", 2)
    await cache.invalidate("c", 3)
    await cache.lease("d")
    keys = ["a", "b", "c", "d", "absent", "a"]
    expected = [await cache.get(key) for key in keys]
    assert expected == [CacheItem("a", {"n": 1}, 5), CacheItem("b", "y", MAX), None, None, None, expected[0]]
    assert await cache.get_many(keys) == expected
    assert await cache.get_many(tuple(keys[:2])) == expected[:2]
    assert await cache.get_many([]) == []


async def test_get_many_decodes_into_type_and_refuses_a_value_of_another_type(cache: VersionedCache) -> None:
    """type= decodes every item; a well-formed value of another type raises InvalidValue, as get does."""
    await cache.put_if_newer("p", Point(1, 2), 1)
    await cache.put_if_newer("q", Point(3, 4), 2)
    assert await cache.get_many(["p", "absent", "q"], type=Point) == [
        CacheItem("p", Point(1, 2), 1),
        None,
        CacheItem("q", Point(3, 4), 2),
    ]
    await cache.put_if_newer("s", "not a point", 1)
    with pytest.raises(InvalidValue, match="'s'"):
        await cache.get_many(["p", "s"], type=Point)
    with pytest.raises(InvalidValue, match="type="):
        await cache.get_many(["p"], type=object())


async def test_get_many_of_keys_on_many_slots(cache: VersionedCache) -> None:
    """Keys that hash to different Cluster slots (and masters) come back in the order asked."""
    keys = [f"graph:root-{index}" for index in range(50)]
    assert await cache.put_many_if_newer([(key, index, index + 1) for index, key in enumerate(keys)])
    shuffled = random.Random(3).sample(keys, len(keys))
    items = await cache.get_many(shuffled)
    assert [item.key if item is not None else None for item in items] == shuffled
    assert all(item is not None and item.version == int(item.key.rsplit("-", 1)[1]) + 1 for item in items)


# -- versions / discard ------------------------------------------------------------------------------


async def test_versions_reports_the_stored_version_of_each_key_in_order(cache: VersionedCache) -> None:
    """versions(keys) is each key's item version, None for absent, floor-only and lease-only keys."""
    await cache.put_if_newer("a", "x", 5)
    await cache.put_if_newer("b", "y", MAX)
    await cache.invalidate("c", 3)
    await cache.lease("d")
    keys = ["a", "b", "c", "d", "absent", "a"]
    assert await cache.versions(keys) == [5, MAX, None, None, None, 5]
    assert await cache.versions(tuple(keys[:2])) == [5, MAX]
    assert await cache.versions([]) == []
    await cache.put_if_newer("a", "z", 6)
    assert await cache.versions(["a"]) == [6]


async def test_discard_drops_the_key_only_at_exactly_the_stored_version(backend: Backend) -> None:
    """discard(k, v) drops the item (leaving no floor) only when v is its stored version."""
    cache = backend.cache
    await cache.put_if_newer("k", "a", 5, ttl=300)
    await cache.invalidate("floor", 3)
    before = await backend.state()
    for wrong in (0, 4, 6, MAX):
        assert await cache.discard("k", wrong) is False
    assert await cache.discard("absent", 5) is False
    assert await cache.discard("floor", 3) is False  # a floor is not an item
    assert await backend.state() == before
    assert await cache.discard("k", 5) is True
    assert await cache.get("k") is None
    assert await cache.discard("k", 5) is False
    assert await cache.put_if_newer("k", "older", 1) is True
    assert await cache.put_if_newer("floor", "stale", 3) is False


# -- exact versions --------------------------------------------------------------------------------


async def test_versions_compare_exactly_above_2_pow_53(cache: VersionedCache) -> None:
    """2**53 and 2**53+1 (one double apart from nothing) are told apart by put and get_if_newer."""
    assert await cache.put_if_newer("k", "a", BIG) is True
    assert await cache.put_if_newer("k", "b", BIG + 1) is True
    assert await cache.put_if_newer("k", "c", BIG + 1) is False
    assert await cache.get("k") == CacheItem("k", "b", BIG + 1)
    assert await cache.get_if_newer("k", BIG) == CacheItem("k", "b", BIG + 1)
    assert await cache.get_if_newer("k", BIG + 1) is None


async def test_versions_compare_exactly_at_2_pow_63_minus_1(cache: VersionedCache) -> None:
    """MAX-1 then MAX are both stored, and nothing goes above MAX."""
    assert await cache.put_if_newer("k", "a", MAX - 1) is True
    assert await cache.put_if_newer("k", "b", MAX) is True
    assert await cache.get("k") == CacheItem("k", "b", MAX)
    assert await cache.put_if_newer("k", "c", MAX) is False


async def test_insert_increments_exactly_across_2_pow_53(cache: VersionedCache) -> None:
    """insert's old + 1 is exact where doubles are not: 2**53 -> 2**53+1 -> 2**53+2."""
    await cache.put_if_newer("k", "a", BIG)
    assert await cache.insert("k", "b") == BIG + 1
    assert await cache.insert("k", "c", version=BIG + 1) == BIG + 2
    assert await cache.get("k") == CacheItem("k", "c", BIG + 2)


async def test_insert_at_the_maximum_version_is_refused_and_writes_nothing(cache: VersionedCache) -> None:
    """An insert that would pass 2**63-1 raises InvalidVersion and leaves the item as it was."""
    await cache.put_if_newer("k", "top", MAX)
    with pytest.raises(InvalidVersion):
        await cache.insert("k", "over")
    assert await cache.get("k") == CacheItem("k", "top", MAX)


async def test_insert_carries_on_from_9_to_10_digits(cache: VersionedCache) -> None:
    """Incrementing 999999999 carries into a 10th digit, and a shorter version then compares lower."""
    await cache.put_if_newer("k", "a", 999_999_999)
    assert await cache.insert("k", "b") == 1_000_000_000
    await cache.put_if_newer("k", "a", 1_099)
    assert await cache.get("k") == CacheItem("k", "b", 1_000_000_000)


def _boundary_versions(rng: random.Random) -> list[int]:
    """Versions where decimal strings and doubles go wrong: digit-count edges, 2**53, the maximum."""
    edges = [10**n + d for n in range(19) for d in (-1, 0, 1)] + [BIG + d for d in range(-2, 3)]
    edges += [MAX - d for d in range(3)] + [rng.randint(0, MAX) for _ in range(20)]
    return [v for v in edges if 0 <= v <= MAX]


async def test_version_order_matches_python_ints_on_boundary_pairs(cache: VersionedCache) -> None:
    """For boundary and random pairs (a, b), put b after a is stored iff b > a, and insert gives a + 1."""
    rng = random.Random(4242)
    versions = _boundary_versions(rng)
    for index in range(150):
        a, b = rng.choice(versions), rng.choice(versions)
        key = f"pair{index}"
        await cache.put_if_newer(key, "a", a)
        assert await cache.put_if_newer(key, "b", b) is (b > a), (a, b)
        stored = max(a, b)
        if stored < MAX:
            assert await cache.insert(key, "c", version=stored) == stored + 1


# -- add / insert / remove -------------------------------------------------------------------------


async def test_add_stores_only_when_absent(cache: VersionedCache) -> None:
    """add returns version 1 on a fresh key and KeyExists once an item is there."""
    assert await cache.add("k", "first") == 1
    with pytest.raises(KeyExists):
        await cache.add("k", "second")
    assert await cache.get("k") == CacheItem("k", "first", 1)


async def test_insert_without_version_overwrites_and_increments(cache: VersionedCache) -> None:
    """An unversioned insert creates at 1, then overwrites at old + 1."""
    assert await cache.insert("k", "a") == 1
    assert await cache.insert("k", "b") == 2
    assert await cache.get("k") == CacheItem("k", "b", 2)


async def test_insert_with_the_stored_version_succeeds(cache: VersionedCache) -> None:
    """insert(version=v) with v the stored version writes v + 1."""
    await cache.put_if_newer("k", "a", 41)
    assert await cache.insert("k", "b", version=41) == 42
    assert await cache.get("k") == CacheItem("k", "b", 42)


async def test_insert_with_another_version_raises_mismatch_with_current(cache: VersionedCache) -> None:
    """A stale insert raises VersionMismatch carrying the stored version, and writes nothing."""
    await cache.put_if_newer("k", "a", 41)
    with pytest.raises(VersionMismatch) as caught:
        await cache.insert("k", "b", version=40)
    assert caught.value.current == 41
    assert caught.value.expected == 40
    assert await cache.get("k") == CacheItem("k", "a", 41)


async def test_versioned_insert_on_an_absent_key_reports_current_none(cache: VersionedCache) -> None:
    """insert(version=v) on a missing key is a VersionMismatch with current None."""
    with pytest.raises(VersionMismatch) as caught:
        await cache.insert("k", "b", version=1)
    assert caught.value.current is None
    assert await cache.get("k") is None


async def test_remove_deletes_and_reports_whether_there_was_an_item(cache: VersionedCache) -> None:
    """remove is True when it deleted an item, False when there was none."""
    await cache.put_if_newer("k", "a", 3)
    assert await cache.remove("k") is True
    assert await cache.get("k") is None
    assert await cache.remove("k") is False


async def test_versioned_remove_only_deletes_the_matching_version(cache: VersionedCache) -> None:
    """remove(version=v) raises VersionMismatch (current set) unless v is stored, then deletes."""
    await cache.put_if_newer("k", "a", 3)
    with pytest.raises(VersionMismatch) as caught:
        await cache.remove("k", version=2)
    assert caught.value.current == 3
    assert await cache.get("k") == CacheItem("k", "a", 3)
    assert await cache.remove("k", version=3) is True
    assert await cache.get("k") is None


async def test_version_never_decreases_across_remove_and_add(cache: VersionedCache) -> None:
    """After remove, add and insert continue above the removed version while its floor lives."""
    await cache.put_if_newer("k", "a", 10)
    await cache.remove("k")
    assert await cache.add("k", "b") == 11
    await cache.remove("k", version=11)
    assert await cache.insert("k", "c") == 12
    assert await cache.put_if_newer("k", "stale", 11) is False


# -- invalidate ------------------------------------------------------------------------------------


async def test_invalidate_refuses_a_refill_at_its_version_and_accepts_the_next(cache: VersionedCache) -> None:
    """invalidate(k, v) removes the item, refuses put_if_newer(v) and accepts v + 1."""
    await cache.put_if_newer("k", "a", 5)
    await cache.invalidate("k", 5)
    assert await cache.get("k") is None
    assert await cache.put_if_newer("k", "stale", 5) is False
    assert await cache.put_if_newer("k", "older", 3) is False
    assert await cache.get("k") is None
    assert await cache.put_if_newer("k", "fresh", 6) is True
    assert await cache.get("k") == CacheItem("k", "fresh", 6)


async def test_invalidate_of_an_absent_key_still_sets_the_floor(cache: VersionedCache) -> None:
    """A tombstone on a key never cached refuses puts up to its version."""
    await cache.invalidate("k", 8)
    assert await cache.put_if_newer("k", "stale", 8) is False
    assert await cache.put_if_newer("k", "fresh", 9) is True


async def test_invalidate_keeps_an_item_newer_than_its_version(cache: VersionedCache) -> None:
    """An item whose version is above the tombstone's is not stale, so it stays."""
    await cache.put_if_newer("k", "new", 9)
    await cache.invalidate("k", 8)
    assert await cache.get("k") == CacheItem("k", "new", 9)


async def test_a_lower_invalidate_never_lowers_the_floor(cache: VersionedCache) -> None:
    """invalidate(10) then invalidate(5): versions up to 10 stay refused."""
    await cache.invalidate("k", 10)
    await cache.invalidate("k", 5)
    assert await cache.put_if_newer("k", "stale", 10) is False
    assert await cache.put_if_newer("k", "fresh", 11) is True


async def test_add_after_invalidate_starts_above_the_floor(cache: VersionedCache) -> None:
    """add on an invalidated key returns floor + 1."""
    await cache.invalidate("k", 20)
    assert await cache.add("k", "a") == 21


async def test_invalidate_at_the_maximum_version_leaves_the_key_unwritable(cache: VersionedCache) -> None:
    """After invalidate(k, 2**63-1) every put is refused and add cannot pick a version."""
    await cache.invalidate("k", MAX)
    assert await cache.put_if_newer("k", "x", MAX) is False
    with pytest.raises(InvalidVersion):
        await cache.add("k", "x")
    assert await cache.get("k") is None


# -- locks -----------------------------------------------------------------------------------------


async def test_get_and_lock_returns_the_item_and_a_handle(cache: VersionedCache) -> None:
    """get_and_lock returns the item (None if absent) and a handle: token, growing fence, expires_at."""
    before = time.time()
    item, lock = await cache.get_and_lock("k", lock_timeout=30)
    assert item is None
    assert lock.key == "k"
    assert before + 30 <= lock.expires_at <= time.time() + 30
    assert len(lock.token) >= 16
    await cache.unlock("k", lock)
    await cache.put_if_newer("k", "v", 4)
    item, second = await cache.get_and_lock("k", lock_timeout=30)
    assert item == CacheItem("k", "v", 4)
    assert second.fence > lock.fence
    assert second.token != lock.token
    await cache.unlock("k", second)


async def test_get_and_lock_decodes_into_type(cache: VersionedCache) -> None:
    """get_and_lock(type=Point) returns the stored item decoded into the Struct, and None when absent."""
    item, lock = await cache.get_and_lock("k", lock_timeout=30, type=Point)
    assert item is None
    await cache.unlock("k", lock)
    await cache.put_if_newer("k", Point(3, 4), 7)
    item, lock = await cache.get_and_lock("k", lock_timeout=30, type=Point)
    assert item == CacheItem("k", Point(3, 4), 7)
    assert type(item.value) is Point
    await cache.unlock("k", lock)


async def test_get_and_lock_of_a_value_of_another_type_raises_and_leaves_the_key_unlocked(
    cache: VersionedCache,
) -> None:
    """A value that is not of type= raises InvalidValue, and no lock is left behind without a handle."""
    await cache.put_if_newer("k", "not a point", 3)
    with pytest.raises(InvalidValue, match="k"):
        await cache.get_and_lock("k", lock_timeout=30, type=Point)
    item, lock = await cache.get_and_lock("k", lock_timeout=30)  # free at once: nothing held
    assert item == CacheItem("k", "not a point", 3)
    await cache.unlock("k", lock)


async def test_a_held_lock_refuses_another_locker_at_once(cache: VersionedCache) -> None:
    """get_and_lock on a held key raises ObjectLocked when wait is 0."""
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    with pytest.raises(ObjectLocked):
        await cache.get_and_lock("k", lock_timeout=30)
    await cache.unlock("k", lock)


async def test_a_locked_key_refuses_unlocked_insert_and_remove(cache: VersionedCache) -> None:
    """insert and remove without the handle raise ObjectLocked and change nothing."""
    await cache.put_if_newer("k", "a", 1)
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    with pytest.raises(ObjectLocked):
        await cache.insert("k", "b")
    with pytest.raises(ObjectLocked):
        await cache.remove("k")
    assert await cache.get("k") == CacheItem("k", "a", 1)
    await cache.unlock("k", lock)


async def test_the_lock_handle_lets_its_holder_insert_and_remove(cache: VersionedCache) -> None:
    """With the matching handle, insert and remove work while the key is locked."""
    await cache.put_if_newer("k", "a", 1)
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    assert await cache.insert("k", "b", lock=lock) == 2
    assert await cache.remove("k", lock=lock) is True
    await cache.unlock("k", lock)


async def test_another_keys_handle_does_not_open_a_lock(cache: VersionedCache) -> None:
    """A handle for key A neither writes nor unlocks key B."""
    _, lock_a = await cache.get_and_lock("k", lock_timeout=30)
    _, lock_b = await cache.get_and_lock("other", lock_timeout=30)
    with pytest.raises(ObjectLocked):
        await cache.insert("other", "x", lock=lock_a)
    with pytest.raises(LockLost):
        await cache.unlock("other", lock_a)
    await cache.unlock("k", lock_a)
    await cache.unlock("other", lock_b)


async def test_a_handle_on_an_unlocked_key_is_lost(cache: VersionedCache) -> None:
    """insert with a handle whose lock was released raises LockLost."""
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    await cache.unlock("k", lock)
    with pytest.raises(LockLost):
        await cache.insert("k", "x", lock=lock)
    assert await cache.get("k") is None


async def test_put_and_unlock_writes_old_plus_one_and_releases(cache: VersionedCache) -> None:
    """put_and_unlock stores at old + 1 and frees the key for the next locker."""
    await cache.put_if_newer("k", "a", 7)
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    assert await cache.put_and_unlock("k", "b", lock) == 8
    assert await cache.get("k") == CacheItem("k", "b", 8)
    assert await cache.insert("k", "c") == 9


async def test_a_released_handle_cannot_unlock_or_put_again(cache: VersionedCache) -> None:
    """After the release, the same handle gets LockLost from unlock and put_and_unlock."""
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    await cache.unlock("k", lock)
    with pytest.raises(LockLost):
        await cache.unlock("k", lock)
    with pytest.raises(LockLost):
        await cache.put_and_unlock("k", "x", lock)
    assert await cache.get("k") is None


async def test_put_and_unlock_on_an_absent_key_continues_above_the_floor(cache: VersionedCache) -> None:
    """Locking an invalidated key and putting gives floor + 1."""
    await cache.invalidate("k", 30)
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    assert await cache.put_and_unlock("k", "a", lock) == 31


async def test_a_stalled_holder_loses_its_lock_and_the_next_gets_a_larger_fence(
    cache: VersionedCache,
) -> None:
    """Past lock_timeout another caller gets the lock (fence + 1) and the old handle gets LockLost."""
    _, stalled = await cache.get_and_lock("k", lock_timeout=0.2)
    with anyio.fail_after(30):  # a hang guard, not a timing assertion
        while True:  # poll the lock state until it has expired by itself
            try:
                _, next_holder = await cache.get_and_lock("k", lock_timeout=30)
                break
            except ObjectLocked:
                await anyio.sleep(0.02)
    assert next_holder.fence > stalled.fence
    with pytest.raises(LockLost):
        await cache.put_and_unlock("k", "late", stalled)
    with pytest.raises(LockLost):
        await cache.unlock("k", stalled)
    assert await cache.get("k") is None
    await cache.unlock("k", next_holder)


async def test_a_waiter_gets_the_lock_once_it_is_released(cache: VersionedCache) -> None:
    """get_and_lock(wait=...) blocked on a held lock succeeds after the holder unlocks."""
    _, holder = await cache.get_and_lock("k", lock_timeout=60)
    granted: list[Any] = []

    async def waiter() -> None:
        granted.append(await cache.get_and_lock("k", lock_timeout=60, wait=60))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await _until(lambda: _lock_waiters(cache) == 1)
        assert granted == []
        await cache.put_and_unlock("k", "released", holder)
    (item, handle) = granted[0]
    assert item == CacheItem("k", "released", 1)
    assert handle.fence > holder.fence
    assert _lock_waiters(cache) == 0
    await cache.unlock("k", handle)


async def test_a_waiter_whose_wait_runs_out_gets_object_locked(cache: VersionedCache) -> None:
    """get_and_lock(wait=w) raises ObjectLocked when the lock is still held after w seconds."""
    _, holder = await cache.get_and_lock("k", lock_timeout=60)
    with pytest.raises(ObjectLocked):
        await cache.get_and_lock("k", lock_timeout=60, wait=0.1)
    assert _lock_waiters(cache) == 0
    await cache.unlock("k", holder)


def _lock_waiters(cache: VersionedCache) -> int:
    assert isinstance(cache, MemoryCache | RedisCache)
    return cache.statistics().lock_waiters


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(30):  # a hang guard, not a timing assertion
        # The waiter's state is observable only through statistics(), so poll it (with a deadline).
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.005)


# -- bad input: refused before any I/O, nothing written --------------------------------------------

BAD_KEYS: list[Any] = ["", None, 7, b"bytes", "x" * 1025, "é" * 513, "\ud800"]
BAD_VERSIONS: list[Any] = [-1, 2**63, True, False, 1.0, "1", None]
BAD_TTLS: list[Any] = [0, -1, float("nan"), float("inf"), True, "5"]


def _key_calls(bad: Any) -> list[Callable[[VersionedCache], Awaitable[Any]]]:
    return [
        lambda c: c.get(bad),
        lambda c: c.get_if_newer(bad, 1),
        lambda c: c.put_if_newer(bad, "v", 1),
        lambda c: c.put_many_if_newer([("other", "v", 1), (bad, "v", 1)]),
        lambda c: c.add(bad, "v"),
        lambda c: c.insert(bad, "v"),
        lambda c: c.remove(bad),
        lambda c: c.invalidate(bad, 1),
        lambda c: c.get_and_lock(bad, lock_timeout=1),
        lambda c: c.versions(["other", bad]),
        lambda c: c.get_many(["other", bad]),
        lambda c: c.lease(bad),
        lambda c: c.lease_many(["other", bad]),
        lambda c: c.discard(bad, 1),
    ]


def _version_calls(bad: Any) -> list[Callable[[VersionedCache], Awaitable[Any]]]:
    calls: list[Callable[[VersionedCache], Awaitable[Any]]] = [
        lambda c: c.get_if_newer("k", bad),
        lambda c: c.put_if_newer("k", "v", bad),
        lambda c: c.put_many_if_newer([("other", "v", 1), ("k", "v", bad)]),
        lambda c: c.invalidate("k", bad),
        lambda c: c.discard("k", bad),
    ]
    if bad is not None:  # None means "no version" where the version is optional
        calls += [lambda c: c.insert("k", "v", version=bad), lambda c: c.remove("k", version=bad)]
    return calls


def _ttl_calls(bad: Any) -> list[Callable[[VersionedCache], Awaitable[Any]]]:
    return [
        lambda c: c.put_if_newer("k", "v", 99, ttl=bad),
        lambda c: c.put_many_if_newer([("k", "v", 99)], ttl=bad),
        lambda c: c.add("other", "v", ttl=bad),
        lambda c: c.insert("k", "v", ttl=bad),
        lambda c: c.invalidate("k", 99, ttl=bad),
        lambda c: c.get_and_lock("k", lock_timeout=bad),
        lambda c: c.get_and_lock("k", lock_timeout=1, wait=-1 if bad == 0 else bad),
    ]


def _value_calls(value: Any) -> list[Callable[[VersionedCache], Awaitable[Any]]]:
    return [
        lambda c: c.put_if_newer("k", value, 99),
        lambda c: c.put_many_if_newer([("other", "v", 1), ("k", value, 99)]),
        lambda c: c.add("other", value),
        lambda c: c.insert("k", value),
    ]


BAD_CALLS = (
    [(InvalidKey, call) for bad in BAD_KEYS for call in _key_calls(bad)]
    + [(InvalidVersion, call) for bad in BAD_VERSIONS for call in _version_calls(bad)]
    + [(ValueError, call) for bad in BAD_TTLS for call in _ttl_calls(bad)]
    + [(ValueTooLarge, call) for call in _value_calls("x" * (SMALL_LIMIT + 1))]
    + [(InvalidValue, call) for value in (object(), {1j: 2}) for call in _value_calls(value)]
    + [
        (InvalidValue, lambda c, items=items: c.put_many_if_newer(items))
        for items in ("kv1", b"kv1", None, [("k", "v")], [["k", "v", 1]], [("other", "v", 1), "k"])
    ]
    + [(InvalidKey, lambda c, keys=keys: c.versions(keys)) for keys in ("k", b"k", None)]
    + [(InvalidKey, lambda c, keys=keys: c.get_many(keys)) for keys in ("k", b"k", None)]
    + [(InvalidValue, lambda c: c.get_many(["k"], type=5))]
)


async def test_bad_input_raises_a_value_error_and_writes_nothing(backend: Backend) -> None:
    """Every malformed argument raises its ValueError subclass and leaves the store unchanged."""
    await backend.cache.put_if_newer("k", "kept", 5, ttl=300)
    await backend.cache.invalidate("gone", 3)
    before = await backend.state()
    for error, call in BAD_CALLS:
        with pytest.raises(error):
            await call(backend.cache)
    assert await backend.state() == before
    assert await backend.cache.get("k") == CacheItem("k", "kept", 5)


async def test_bad_lock_handles_and_values_on_put_and_unlock_write_nothing(backend: Backend) -> None:
    """put_and_unlock refuses an over-limit or unencodable value before touching the lock."""
    cache = backend.cache
    _, lock = await cache.get_and_lock("k", lock_timeout=30)
    before = await backend.state()
    with pytest.raises(ValueTooLarge):
        await cache.put_and_unlock("k", "x" * (SMALL_LIMIT + 1), lock)
    with pytest.raises(InvalidValue):
        await cache.put_and_unlock("k", object(), lock)
    assert await backend.state() == before
    assert await cache.put_and_unlock("k", "fits", lock) == 1


BAD_SECONDS: list[Any] = [0, -1, -0.5, float("nan"), float("inf"), float("-inf"), True, "5", b"5", [1]]
BAD_WAITS: list[Any] = [-1, -0.001, float("nan"), float("inf"), True, "1", None]


def _seconds_calls(bad: Any) -> list[Callable[[VersionedCache], Awaitable[Any]]]:
    return [
        lambda c: c.put_if_newer("k", "v", 99, ttl=bad),
        lambda c: c.put_many_if_newer([("k", "v", 99, None)], ttl=bad),
        lambda c: c.add("other", "v", ttl=bad),
        lambda c: c.insert("k", "v", ttl=bad),
        lambda c: c.invalidate("k", 99, ttl=bad),
        lambda c: c.get_and_lock("k", lock_timeout=bad),
    ]


ARGUMENT_CALLS = [call for bad in BAD_SECONDS for call in _seconds_calls(bad)] + [
    lambda c, bad=bad: c.get_and_lock("k", lock_timeout=1, wait=bad) for bad in BAD_WAITS
]


async def test_a_bad_ttl_lock_timeout_or_wait_is_invalid_argument_and_writes_nothing(
    backend: Backend,
) -> None:
    """A bad ttl, lock_timeout or wait is InvalidArgument (CacheError, ValueError); nothing written."""
    await backend.cache.put_if_newer("k", "kept", 5, ttl=300)
    before = await backend.state()
    for call in ARGUMENT_CALLS:
        with pytest.raises(InvalidArgument) as caught:
            await call(backend.cache)
        assert isinstance(caught.value, CacheError)
        assert isinstance(caught.value, ValueError)
    assert await backend.state() == before
    await backend.cache.aclose()  # any I/O would now raise CacheUnavailable: the checks come first
    for call in ARGUMENT_CALLS:
        with pytest.raises(InvalidArgument):
            await call(backend.cache)


def _recursive_values() -> list[Any]:
    loop: list[Any] = [1]
    loop.append(loop)
    cycle: dict[str, Any] = {}
    cycle["self"] = {"inner": [cycle]}
    return [loop, cycle]


async def test_a_value_that_contains_itself_is_invalid_value_and_writes_nothing(backend: Backend) -> None:
    """A value that contains itself is InvalidValue (not RecursionError) on every write; nothing written."""
    cache = backend.cache
    await cache.put_if_newer("k", "kept", 5, ttl=300)
    _, lock = await cache.get_and_lock("locked", lock_timeout=30)
    before = await backend.state()
    for value in _recursive_values():
        calls = [
            cache.put_if_newer("k", value, 99),
            cache.put_many_if_newer([("other", "v", 1), ("k", value, 99)]),
            cache.add("other", value),
            cache.insert("k", value),
            cache.put_and_unlock("locked", value, lock),
        ]
        for call in calls:
            with pytest.raises(InvalidValue, match="contains itself"):
                await call
    assert await backend.state() == before
    assert await cache.get("k") == CacheItem("k", "kept", 5)
    assert await cache.put_and_unlock("locked", "fine", lock) == 1


async def test_validation_happens_before_any_io(backend: Backend) -> None:
    """On a closed cache (any I/O would raise CacheUnavailable) bad input still raises its ValueError."""
    await backend.cache.aclose()
    for error, call in BAD_CALLS:
        with pytest.raises(error):
            await call(backend.cache)


# -- hostile keys ----------------------------------------------------------------------------------

HOSTILE_KEYS = [
    "{",
    "}",
    "{}",
    "{a}",
    "a}{b",
    "ns:{x}:i",
    ":",
    "::",
    "*",
    "?",
    "[a-z]",
    "\n",
    "a\nb",
    "\r\n",
    "\x00",
    " ",
    "é",
    "e\u0301",
    "日本",
    "😀",
    "k",
    "K",
    "k ",
    "x" * 1024,
    "é" * 512,
]


async def test_hostile_keys_round_trip_without_collisions(cache: VersionedCache) -> None:
    """Keys made of braces, colons, globs, newlines and unicode each keep their own value."""
    for index, key in enumerate(HOSTILE_KEYS):
        assert await cache.put_if_newer(key, index, index + 1)
    for index, key in enumerate(HOSTILE_KEYS):
        assert await cache.get(key) == CacheItem(key, index, index + 1)
