"""The storage tier's exceptions: one tree, every store raises only these.

    StoreError
    ├── StoreUnavailable        database down, unreachable, connection lost (the address is in the message)
    ├── RootNotFound            no graph with that root id
    ├── RootExists              ``create_root`` on a root that is already there
    ├── ConcurrencyConflict     an ``expected_version`` / ``expected_row_version`` did not match;
    │                           nothing was committed
    └── InvalidOperation        (also ValueError) bad ids, unknown parent, a cycle, deleting the root,
                                data that is not a JSON-compatible dict or is over the size limit;
                                raised before any I/O where the input alone shows it

asyncpg and OS errors are translated at one seam (``raise ... from exc``).
"""

from __future__ import annotations

__all__ = (
    "ConcurrencyConflict",
    "InvalidOperation",
    "RootExists",
    "RootNotFound",
    "StoreError",
    "StoreUnavailable",
)


class StoreError(Exception):
    """Base class of every error the storage tier raises."""


class StoreUnavailable(StoreError):
    """The database is down, unreachable or the connection was lost."""


class RootNotFound(StoreError):
    """No graph has that root id (or its root row is gone).

    ``version`` is the root's last committed version when the store still knows it: a root whose row was
    deleted keeps its version, so a cache can floor the graph's key at it.
    """

    def __init__(self, message: str, *, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


class RootExists(StoreError):
    """A graph with that root id already exists."""


class ConcurrencyConflict(StoreError):
    """An optimistic-concurrency check failed; nothing was committed."""


class InvalidOperation(StoreError, ValueError):
    """The operations are malformed or would break the graph; nothing was committed."""
