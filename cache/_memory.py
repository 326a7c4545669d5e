"""``MemoryCache``: the embedded, in-process implementation of ``VersionedCache``.

It keeps the same contract as ``RedisCache`` (values are stored msgpack-encoded, so a caller's later
mutation cannot reach the cache and ``type=`` decoding behaves the same). Every method validates its
input, yields to the event loop once, then runs its compare-and-write without another ``await``:
within one event loop each operation is atomic, the way one Lua script is atomic inside Redis.
Time is a monotonic clock (injectable for tests), so wall-clock jumps never expire or revive anything.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

import anyio
import anyio.lowlevel

from ._errors import CacheUnavailable, InvalidVersion, KeyExists, LockLost, ObjectLocked, VersionMismatch
from ._types import DEFAULT_INVALIDATE_TTL, CacheItem, LockHandle
from ._validate import (
    DEFAULT_MAX_VALUE_BYTES,
    MAX_VERSION,
    check_items,
    check_key,
    check_limit,
    check_seconds,
    check_type,
    check_version,
    check_wait,
    decode_value,
    encode_value,
)

__all__ = ("MemoryCache", "MemoryCacheStatistics")

_SWEEP_EVERY = 1024
"""Writes between two sweeps of expired entries (reads expire lazily)."""


def next_version(key: str, base: int | None) -> int:
    """The version after ``base`` (the stored version or the floor; 1 for a fresh key)."""
    if base is None:
        return 1
    if base >= MAX_VERSION:
        raise InvalidVersion(f"key {key!r} is at version 2**63-1 and cannot be versioned higher")
    return base + 1


class MemoryCacheStatistics(NamedTuple):
    items: int
    floors: int
    locks: int
    lock_waiters: int
    """Tasks inside ``get_and_lock(wait=...)`` waiting for a held lock."""


class _Entry:
    __slots__ = ("data", "expires", "version")

    def __init__(self, data: bytes, version: int, expires: float) -> None:
        self.data = data
        self.version = version
        self.expires = expires


class _Floor:
    __slots__ = ("expires", "version")

    def __init__(self, version: int, expires: float) -> None:
        self.version = version
        self.expires = expires


class _Lock:
    __slots__ = ("expires", "fence", "token")

    def __init__(self, token: str, fence: int, expires: float) -> None:
        self.token = token
        self.fence = fence
        self.expires = expires


class MemoryCache:
    """In-process versioned cache; see DESIGN.md for the semantics of each method.

    ``max_value_bytes`` caps an encoded value (``ValueTooLarge`` above it); ``floor_ttl`` is how long the
    floor left by ``remove`` lives; ``clock`` is a monotonic clock in seconds.
    """

    def __init__(
        self,
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        floor_ttl: float = DEFAULT_INVALIDATE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_value_bytes = check_limit(max_value_bytes)
        self._floor_ttl = (
            check_seconds(floor_ttl, name="floor_ttl", allow_none=False) or DEFAULT_INVALIDATE_TTL
        )
        self._clock = clock
        self._items: dict[str, _Entry] = {}
        self._floors: dict[str, _Floor] = {}
        self._locks: dict[str, _Lock] = {}
        self._fences: dict[str, int] = {}
        self._released: dict[str, list[anyio.Event]] = {}
        self._writes = 0
        self._closed = False

    # -- reads -------------------------------------------------------------------------------------

    async def get(self, key: str, *, type: Any = None) -> CacheItem | None:
        check_key(key)
        decoder = check_type(type)
        await self._enter()
        entry = self._item(key)
        return (
            None if entry is None else CacheItem(key, decode_value(key, entry.data, decoder), entry.version)
        )

    async def get_if_newer(self, key: str, version: int, *, type: Any = None) -> CacheItem | None:
        check_key(key)
        check_version(version)
        decoder = check_type(type)
        await self._enter()
        entry = self._item(key)
        if entry is None or entry.version <= version:
            return None
        return CacheItem(key, decode_value(key, entry.data, decoder), entry.version)

    # -- writes ------------------------------------------------------------------------------------

    async def put_if_newer(self, key: str, value: Any, version: int, *, ttl: float | None = None) -> bool:
        check_key(key)
        check_version(version)
        expires = self._expiry(check_seconds(ttl, name="ttl"))
        data = encode_value(value, limit=self._max_value_bytes)
        await self._enter()
        return self._put_if_newer(key, data, version, expires)

    async def put_many_if_newer(
        self, items: Sequence[tuple[str, Any, int]], *, ttl: float | None = None
    ) -> list[bool]:
        """``put_if_newer`` of each ``(key, value, version)`` in order; all checked before any write."""
        expires = self._expiry(check_seconds(ttl, name="ttl"))
        encoded = [
            (key, encode_value(value, limit=self._max_value_bytes), version)
            for key, value, version in check_items(items)
        ]
        await self._enter()
        return [self._put_if_newer(key, data, version, expires) for key, data, version in encoded]

    def _put_if_newer(self, key: str, data: bytes, version: int, expires: float) -> bool:
        entry = self._item(key)
        if entry is not None and entry.version >= version:
            return False
        floor = self._floor(key)
        if floor is not None and version <= floor:
            return False
        self._store(key, data, version, expires)
        return True

    async def add(self, key: str, value: Any, *, ttl: float | None = None) -> int:
        check_key(key)
        expires = self._expiry(check_seconds(ttl, name="ttl"))
        data = encode_value(value, limit=self._max_value_bytes)
        await self._enter()
        if self._item(key) is not None:
            raise KeyExists(f"key {key!r} already holds an item")
        version = next_version(key, self._floor(key))
        self._store(key, data, version, expires)
        return version

    async def insert(
        self,
        key: str,
        value: Any,
        *,
        version: int | None = None,
        lock: LockHandle | None = None,
        ttl: float | None = None,
    ) -> int:
        check_key(key)
        if version is not None:
            check_version(version)
        expires = self._expiry(check_seconds(ttl, name="ttl"))
        data = encode_value(value, limit=self._max_value_bytes)
        await self._enter()
        self._check_lock(key, lock)
        entry = self._item(key)
        current = None if entry is None else entry.version
        if version is not None and current != version:
            raise VersionMismatch(key, version, current)
        new_version = next_version(key, self._floor(key) if current is None else current)
        self._store(key, data, new_version, expires)
        return new_version

    async def remove(self, key: str, *, version: int | None = None, lock: LockHandle | None = None) -> bool:
        check_key(key)
        if version is not None:
            check_version(version)
        await self._enter()
        self._check_lock(key, lock)
        entry = self._item(key)
        current = None if entry is None else entry.version
        if version is not None and current != version:
            raise VersionMismatch(key, version, current)
        if entry is None:
            return False
        del self._items[key]
        self._raise_floor(key, entry.version, self._floor_ttl)
        return True

    async def invalidate(self, key: str, version: int, *, ttl: float = DEFAULT_INVALIDATE_TTL) -> None:
        check_key(key)
        check_version(version)
        seconds = check_seconds(ttl, name="ttl", allow_none=False) or DEFAULT_INVALIDATE_TTL
        await self._enter()
        entry = self._item(key)
        if entry is not None and entry.version <= version:
            del self._items[key]
        self._raise_floor(key, version, seconds)

    # -- pessimistic locks -------------------------------------------------------------------------

    async def get_and_lock(
        self, key: str, *, lock_timeout: float, wait: float = 0
    ) -> tuple[CacheItem | None, LockHandle]:
        check_key(key)
        timeout = check_seconds(lock_timeout, name="lock_timeout", allow_none=False) or 0.0
        deadline = self._clock() + check_wait(wait)
        await self._enter()
        while (held := self._lock(key)) is not None:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise ObjectLocked(f"key {key!r} is locked (fence {held.fence})")
            await self._wait_release(key, min(remaining, held.expires - self._clock()))
            self._check_open()
        fence = self._fences.get(key, 0) + 1
        self._fences[key] = fence
        token = secrets.token_hex(16)
        self._locks[key] = _Lock(token, fence, self._clock() + timeout)
        entry = self._item(key)
        item = None if entry is None else CacheItem(key, decode_value(key, entry.data), entry.version)
        return item, LockHandle(key, token, fence, time.time() + timeout)

    async def put_and_unlock(
        self, key: str, value: Any, lock: LockHandle, *, ttl: float | None = None
    ) -> int:
        check_key(key)
        expires = self._expiry(check_seconds(ttl, name="ttl"))
        data = encode_value(value, limit=self._max_value_bytes)
        await self._enter()
        self._check_owner(key, lock)
        entry = self._item(key)
        version = next_version(key, self._floor(key) if entry is None else entry.version)
        self._store(key, data, version, expires)
        self._release(key)
        return version

    async def unlock(self, key: str, lock: LockHandle) -> None:
        check_key(key)
        await self._enter()
        self._check_owner(key, lock)
        self._release(key)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        self._closed = True
        for waiters in self._released.values():
            for event in waiters:
                event.set()
        self._released.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def statistics(self) -> MemoryCacheStatistics:
        """Live entries (items, floors and locks that have not expired)."""
        now = self._clock()
        return MemoryCacheStatistics(
            items=sum(1 for e in self._items.values() if e.expires > now),
            floors=sum(1 for f in self._floors.values() if f.expires > now),
            locks=sum(1 for lk in self._locks.values() if lk.expires > now),
            lock_waiters=sum(len(waiters) for waiters in self._released.values()),
        )

    def __repr__(self) -> str:
        if self._closed:
            return "<MemoryCache [closed]>"
        stats = self.statistics()
        return (
            f"<MemoryCache [Items: {stats.items} | Floors: {stats.floors} | "
            f"Locks: {stats.locks}, {stats.lock_waiters} waiting]>"
        )

    # -- helpers (no awaits below: each public method's critical section is atomic) ----------------

    async def _enter(self) -> None:
        self._check_open()
        await anyio.lowlevel.checkpoint()
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise CacheUnavailable("MemoryCache is closed")

    def _expiry(self, ttl: float | None) -> float:
        return math.inf if ttl is None else self._clock() + ttl

    def _item(self, key: str) -> _Entry | None:
        entry = self._items.get(key)
        if entry is not None and entry.expires <= self._clock():
            del self._items[key]
            return None
        return entry

    def _floor(self, key: str) -> int | None:
        floor = self._floors.get(key)
        if floor is not None and floor.expires <= self._clock():
            del self._floors[key]
            return None
        return None if floor is None else floor.version

    def _raise_floor(self, key: str, version: int, ttl: float) -> None:
        current = self._floors.get(key)
        expires = self._clock() + ttl
        if current is None or current.expires <= self._clock():
            self._floors[key] = _Floor(version, expires)
            return
        # Never lower a living floor nor shorten its protection.
        current.version = max(current.version, version)
        current.expires = max(current.expires, expires)

    def _lock(self, key: str) -> _Lock | None:
        held = self._locks.get(key)
        if held is not None and held.expires <= self._clock():
            del self._locks[key]
            self._notify(key)
            return None
        return held

    def _check_lock(self, key: str, lock: LockHandle | None) -> None:
        """A locked key is writable only with its handle; a stale handle on a free key is ``LockLost``."""
        held = self._lock(key)
        if lock is None:
            if held is not None:
                raise ObjectLocked(f"key {key!r} is locked (fence {held.fence})")
            return
        if held is None or lock.key != key or held.token != lock.token:
            if held is not None:
                raise ObjectLocked(f"key {key!r} is locked by another handle (fence {held.fence})")
            raise LockLost(f"lock on {key!r} (fence {lock.fence}) expired or was never held")

    def _check_owner(self, key: str, lock: LockHandle) -> None:
        held = self._lock(key)
        if held is None or lock.key != key or held.token != lock.token:
            raise LockLost(f"lock on {key!r} (fence {lock.fence}) expired or is not this handle's")

    def _store(self, key: str, data: bytes, version: int, expires: float) -> None:
        self._items[key] = _Entry(data, version, expires)
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._sweep()

    def _sweep(self) -> None:
        now = self._clock()
        for table in (self._items, self._floors):
            for key in [k for k, v in table.items() if v.expires <= now]:
                del table[key]

    def _release(self, key: str) -> None:
        del self._locks[key]
        self._notify(key)

    def _notify(self, key: str) -> None:
        for event in self._released.pop(key, ()):
            event.set()

    async def _wait_release(self, key: str, seconds: float) -> None:
        event = anyio.Event()
        self._released.setdefault(key, []).append(event)
        with anyio.move_on_after(max(seconds, 0.0)):
            await event.wait()
        waiters = self._released.get(key)
        if waiters is not None and event in waiters:
            waiters.remove(event)
            if not waiters:
                del self._released[key]
