"""``MemoryCache``: the embedded, in-process implementation of ``VersionedCache``.

It keeps the same contract as ``RedisCache`` (values are stored msgpack-encoded, so a caller's later
mutation cannot reach the cache and ``type=`` decoding behaves the same). Every method validates its
input, yields to the event loop once, then runs its compare-and-write without another ``await``:
within one event loop each operation is atomic, the way one Lua script is atomic inside Redis.
Time is a monotonic clock (injectable for tests), so wall-clock jumps never expire or revive anything.
As in Redis, a key's item, floor and incarnation are one state with one expiry: they live and die together.
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
    check_keys,
    check_lease,
    check_limit,
    check_seconds,
    check_ttl,
    check_type,
    check_version,
    decode_value,
    encode_value,
)

__all__ = ("MemoryCache", "MemoryCacheStatistics")

_SWEEP_EVERY = 1024
"""Writes between two sweeps of expired entries (reads expire lazily)."""
_LEASE_TTL = 600.0
"""Seconds a key that holds only an incarnation (a lease taken, nothing put yet) lives."""


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
    poisoned: int = 0
    """Malformed entries found; in process memory there are none (kept for parity with Redis)."""


class _Item(NamedTuple):
    version: int
    data: bytes


class _State:
    """One key's item (``version`` not None), or else its floor, and its incarnation: one expiry."""

    __slots__ = ("data", "expires", "floor", "incarnation", "version")

    def __init__(self, expires: float) -> None:
        self.data = b""
        self.version: int | None = None
        self.floor: int | None = None
        self.incarnation = secrets.randbits(63) or 1
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
        self._floor_ttl = check_seconds(floor_ttl, name="floor_ttl")
        self._clock = clock
        self._states: dict[str, _State] = {}
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
        if entry is None:
            return None
        return CacheItem(key, decode_value(key, entry.data, decoder), entry.version)

    async def get_if_newer(self, key: str, version: int, *, type: Any = None) -> CacheItem | None:
        check_key(key)
        check_version(version)
        decoder = check_type(type)
        await self._enter()
        entry = self._item(key)
        if entry is None or entry.version <= version:
            return None
        return CacheItem(key, decode_value(key, entry.data, decoder), entry.version)

    async def get_many(self, keys: Sequence[str], *, type: Any = None) -> list[CacheItem | None]:
        """``get`` of each key, in order (None: absent or invalidated); all checked first."""
        checked = check_keys(keys)
        decoder = check_type(type)
        await self._enter()
        found: list[CacheItem | None] = []
        for key in checked:
            entry = self._item(key)
            found.append(
                None
                if entry is None
                else CacheItem(key, decode_value(key, entry.data, decoder), entry.version)
            )
        return found

    async def versions(self, keys: Sequence[str]) -> list[int | None]:
        """The stored version of each key (None: absent)."""
        checked = check_keys(keys)
        await self._enter()
        return [None if (entry := self._item(key)) is None else entry.version for key in checked]

    async def discard(self, key: str, version: int) -> bool:
        """Drop ``key``'s whole state if its item is stored at exactly ``version`` (see RedisCache)."""
        check_key(key)
        check_version(version)
        await self._enter()
        entry = self._item(key)
        if entry is None or entry.version != version:
            return False
        del self._states[key]
        return True

    # -- leases --------------------------------------------------------------------------------------

    async def lease(self, key: str) -> int:
        """The key's incarnation (created if absent); take it before loading what you will put."""
        check_key(key)
        await self._enter()
        return self._lease(key)

    async def lease_many(self, keys: Sequence[str]) -> list[int]:
        """``lease`` of each key."""
        checked = check_keys(keys)
        await self._enter()
        return [self._lease(key) for key in checked]

    def _lease(self, key: str) -> int:
        state = self._state(key)
        if state is None:
            state = self._states[key] = _State(self._clock() + _LEASE_TTL)
        return state.incarnation

    # -- writes ------------------------------------------------------------------------------------

    async def put_if_newer(
        self, key: str, value: Any, version: int, *, ttl: float | None = None, lease: int | None = None
    ) -> bool:
        check_key(key)
        check_version(version)
        check_lease(lease)
        expires = self._expiry(check_ttl(ttl))
        data = encode_value(value, limit=self._max_value_bytes)
        await self._enter()
        return self._put_if_newer(key, data, version, expires, lease)

    async def put_many_if_newer(
        self,
        items: Sequence[tuple[str, Any, int] | tuple[str, Any, int, int | None]],
        *,
        ttl: float | None = None,
    ) -> list[bool]:
        """``put_if_newer`` of each ``(key, value, version[, lease])`` in order; all checked first."""
        expires = self._expiry(check_ttl(ttl))
        encoded = [
            (key, encode_value(value, limit=self._max_value_bytes), version, lease)
            for key, value, version, lease in check_items(items)
        ]
        await self._enter()
        return [
            self._put_if_newer(key, data, version, expires, lease) for key, data, version, lease in encoded
        ]

    def _put_if_newer(self, key: str, data: bytes, version: int, expires: float, lease: int | None) -> bool:
        state = self._state(key)
        if lease is not None and (state is None or state.incarnation != lease):
            return False  # the key's state was lost (or replaced) since the lease was taken
        if state is not None:
            if state.version is not None and state.version >= version:
                return False
            if state.floor is not None and version <= state.floor:
                return False
        self._store(key, data, version, expires)
        return True

    async def add(self, key: str, value: Any, *, ttl: float | None = None) -> int:
        check_key(key)
        expires = self._expiry(check_ttl(ttl))
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
        expires = self._expiry(check_ttl(ttl))
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
        self._raise_floor(key, entry.version, self._floor_ttl)
        return True

    async def invalidate(self, key: str, version: int, *, ttl: float = DEFAULT_INVALIDATE_TTL) -> None:
        check_key(key)
        check_version(version)
        seconds = check_seconds(ttl, name="ttl")
        await self._enter()
        entry = self._item(key)
        if entry is not None and entry.version > version:
            return  # the stored item is newer: it implies the floor
        self._raise_floor(key, version, seconds)

    # -- pessimistic locks -------------------------------------------------------------------------

    async def get_and_lock(
        self, key: str, *, lock_timeout: float, wait: float = 0, type: Any = None
    ) -> tuple[CacheItem | None, LockHandle]:
        check_key(key)
        decoder = check_type(type)
        timeout = check_seconds(lock_timeout, name="lock_timeout")
        deadline = self._clock() + check_seconds(wait, name="wait", allow_zero=True)
        await self._enter()
        while (held := self._lock(key)) is not None:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise ObjectLocked(f"key {key!r} is locked (fence {held.fence})")
            await self._wait_release(key, min(remaining, held.expires - self._clock()))
            self._check_open()
        entry = self._item(key)
        item = None
        if entry is not None:  # decoded before the lock is granted: a value of another type locks nothing
            item = CacheItem(key, decode_value(key, entry.data, decoder), entry.version)
        fence = self._fences.get(key, 0) + 1
        self._fences[key] = fence
        token = secrets.token_hex(16)
        self._locks[key] = _Lock(token, fence, self._clock() + timeout)
        return item, LockHandle(key, token, fence, time.time() + timeout)

    async def put_and_unlock(
        self, key: str, value: Any, lock: LockHandle, *, ttl: float | None = None
    ) -> int:
        check_key(key)
        expires = self._expiry(check_ttl(ttl))
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
        live = [state for state in self._states.values() if state.expires > now]
        return MemoryCacheStatistics(
            items=sum(1 for state in live if state.version is not None),
            floors=sum(1 for state in live if state.floor is not None),
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

    def _state(self, key: str) -> _State | None:
        state = self._states.get(key)
        if state is not None and state.expires <= self._clock():
            del self._states[key]
            return None
        return state

    def _item(self, key: str) -> _Item | None:
        """The key's item, if it holds one."""
        state = self._state(key)
        if state is None or state.version is None:
            return None
        return _Item(state.version, state.data)

    def _floor(self, key: str) -> int | None:
        state = self._state(key)
        return None if state is None else state.floor

    def _raise_floor(self, key: str, version: int, ttl: float) -> None:
        """Drop the item and keep a floor: never lower a living floor nor shorten its protection."""
        state = self._state(key)
        expires = self._clock() + ttl
        if state is None:
            state = self._states[key] = _State(expires)
        elif state.floor is not None:
            version = max(version, state.floor)
            expires = max(expires, state.expires)
        state.version, state.data, state.floor, state.expires = None, b"", version, expires

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
        state = self._state(key)
        if state is None:
            state = self._states[key] = _State(expires)
        elif state.floor is not None:  # the item implies the floor: it must not end the floor's protection
            expires = max(expires, state.expires)
        state.data, state.version, state.floor, state.expires = data, version, None, expires
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._sweep()

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, state in self._states.items() if state.expires <= now]:
            del self._states[key]

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
