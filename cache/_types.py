"""Public data types and the ``VersionedCache`` protocol."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import msgspec

__all__ = ("CacheItem", "LockHandle", "VersionedCache")

DEFAULT_INVALIDATE_TTL = 300.0
"""Seconds an invalidation floor lives when the caller does not say."""


class CacheItem(msgspec.Struct, frozen=True):
    """One cached value and the version it was stored with."""

    key: str
    value: Any
    version: int


class LockHandle(msgspec.Struct, frozen=True):
    """Proof of a pessimistic lock.

    ``token`` is random and proves ownership; ``fence`` increases with every lock granted on the key and
    never repeats, also after Redis lost the key's state (it is never below the server clock in
    microseconds): a fencing token a storage write can check; ``expires_at`` is the holder's
    wall-clock estimate (``time.time()``) of when the lock lapses by itself.
    """

    key: str
    token: str
    fence: int
    expires_at: float


@runtime_checkable
class VersionedCache(Protocol):
    """A cache whose every item carries an integer version; see DESIGN.md for the semantics."""

    async def get(self, key: str, *, type: Any = None) -> CacheItem | None: ...

    async def get_if_newer(self, key: str, version: int, *, type: Any = None) -> CacheItem | None: ...

    async def get_many(self, keys: Sequence[str], *, type: Any = None) -> list[CacheItem | None]:
        """``get`` of each key, in order, in one round trip where it can."""
        ...

    async def versions(self, keys: Sequence[str]) -> list[int | None]:
        """The stored version of each key (None: absent or malformed), in one round trip where it can."""
        ...

    async def lease(self, key: str) -> int:
        """The key's incarnation, created if absent; it dies with the key's state (see DESIGN.md)."""
        ...

    async def lease_many(self, keys: Sequence[str]) -> list[int]: ...

    async def put_if_newer(
        self, key: str, value: Any, version: int, *, ttl: float | None = None, lease: int | None = None
    ) -> bool: ...

    async def put_many_if_newer(
        self,
        items: Sequence[tuple[str, Any, int] | tuple[str, Any, int, int | None]],
        *,
        ttl: float | None = None,
    ) -> list[bool]:
        """``put_if_newer`` of each ``(key, value, version[, lease])`` in order, in one round trip where
        it can."""
        ...

    async def discard(self, key: str, version: int) -> bool:
        """Drop the key's whole state if its item is stored at exactly ``version`` (a malformed entry)."""
        ...

    async def add(self, key: str, value: Any, *, ttl: float | None = None) -> int: ...

    async def insert(
        self,
        key: str,
        value: Any,
        *,
        version: int | None = None,
        lock: LockHandle | None = None,
        ttl: float | None = None,
    ) -> int: ...

    async def remove(
        self, key: str, *, version: int | None = None, lock: LockHandle | None = None
    ) -> bool: ...

    async def invalidate(self, key: str, version: int, *, ttl: float = DEFAULT_INVALIDATE_TTL) -> None: ...

    async def get_and_lock(
        self, key: str, *, lock_timeout: float, wait: float = 0, type: Any = None
    ) -> tuple[CacheItem | None, LockHandle]: ...

    async def put_and_unlock(
        self, key: str, value: Any, lock: LockHandle, *, ttl: float | None = None
    ) -> int: ...

    async def unlock(self, key: str, lock: LockHandle) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
