"""The cache tier's exceptions: one tree, every backend raises only these.

    CacheError
    ├── CacheUnavailable        backend down, unreachable or timed out (the address is in the message)
    ├── VersionMismatch         a versioned insert/remove met another version (``.current`` holds it)
    ├── KeyExists               ``add`` on a key that holds an item
    ├── ObjectLocked            the key is locked by another handle
    ├── LockLost                the handle's lock expired or was never this handle's
    ├── InvalidArgument         (also ValueError) a bad ttl, lock_timeout, wait, lease, namespace or limit
    ├── InvalidKey              (also ValueError) empty, non-str or over-long key
    ├── InvalidVersion          (also ValueError) not an int in 0..2**63-1 (bool is refused)
    ├── InvalidValue            (also ValueError) a value msgpack cannot encode
    └── ValueTooLarge           (also ValueError) encoded value over the size limit; nothing written

Foreign exceptions (redis-py, including its internal errors while a Cluster reconfigures, and OS errors)
are translated at one seam in each backend, with ``raise ... from exc`` so the cause is kept: whatever may
pass (a connection lost, a timeout, a failover, out of memory, a busy or loading server) is
``CacheUnavailable``; a reply that retrying cannot change is ``CacheError``.
"""

from __future__ import annotations

__all__ = (
    "CacheError",
    "CacheUnavailable",
    "InvalidArgument",
    "InvalidKey",
    "InvalidValue",
    "InvalidVersion",
    "KeyExists",
    "LockLost",
    "ObjectLocked",
    "ValueTooLarge",
    "VersionMismatch",
)


class CacheError(Exception):
    """Base class of every error the cache tier raises."""


class CacheUnavailable(CacheError):
    """The backend is down, unreachable, failing over, out of memory or too slow to answer: retry later."""


class VersionMismatch(CacheError):
    """A compare-and-set met another version; ``current`` is the stored one (None if absent)."""

    def __init__(self, key: str, expected: int, current: int | None) -> None:
        super().__init__(f"version mismatch on {key!r}: expected {expected}, stored {current}")
        self.key = key
        self.expected = expected
        self.current = current


class KeyExists(CacheError):
    """``add`` found an item already stored under the key."""


class ObjectLocked(CacheError):
    """The key is locked by another handle that has not expired."""


class LockLost(CacheError):
    """The lock expired, was taken over, or was never held by this handle."""


class InvalidArgument(CacheError, ValueError):
    """An argument other than the key, version or value is malformed (a ttl, a lease, a limit...)."""


class InvalidKey(CacheError, ValueError):
    """The key is not a non-empty str of at most 1024 UTF-8 bytes."""


class InvalidVersion(CacheError, ValueError):
    """The version is not an int in 0..2**63-1."""


class InvalidValue(CacheError, ValueError):
    """The value cannot be encoded as msgpack."""


class ValueTooLarge(CacheError, ValueError):
    """The encoded value is larger than the cache's limit."""
