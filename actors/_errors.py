"""The actors package's exceptions: one tree.

    ActorError
    ├── ActorDead               the actor has stopped (passivated or told to stop); a waiter gets this
    │                           instead of waiting forever (pykka's ActorDeadError)
    ├── NodeNotRunning          (also RuntimeError) the Node is used outside ``async with``
    ├── VersionNotReached       ``get(min_version=v)``: the store itself is older than ``v``
    ├── ReadTimeout             (also TimeoutError) ``get`` did not finish within its timeout
    ├── EmptyRing               (also LookupError) a ring without nodes has no owners (``_ring.py``)
    └── InvalidArgument         (also ValueError) a bad root id, version, timeout or option; raised before
        │                       any I/O
        ├── InvalidNodeId, InvalidRingConfig      (``_ring.py``)
        └── InvalidMembershipConfig               (``_membership.py``)

Errors of the store and the cache (``storage.StoreError``, ``cache.CacheError``) pass through ``get`` and
``apply`` unchanged: they are already mapped at their own seams.
"""

from __future__ import annotations

__all__ = ("ActorDead", "ActorError", "InvalidArgument", "NodeNotRunning", "ReadTimeout", "VersionNotReached")


class ActorError(Exception):
    """Base class of every error the actors package raises."""


class ActorDead(ActorError):
    """The actor has stopped; it takes no more messages and wakes every waiter with this."""


class NodeNotRunning(ActorError, RuntimeError):
    """The Node is not running: use it inside ``async with Node(...) as node``."""


class VersionNotReached(ActorError):
    """The store's committed version is older than the ``min_version`` asked for."""

    def __init__(self, root_id: str, min_version: int, committed: int) -> None:
        super().__init__(f"root {root_id!r} is committed at version {committed}, older than {min_version}")
        self.root_id = root_id
        self.min_version = min_version
        self.committed = committed


class ReadTimeout(ActorError, TimeoutError):
    """A read did not finish within its timeout."""


class InvalidArgument(ActorError, ValueError):
    """An argument is malformed; nothing was done."""
