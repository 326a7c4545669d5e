"""Argument checks of the actors package; all run before any I/O.

A root id becomes a cache key and a version is compared by the cache, so both are checked by the cache's
own public checks (one implementation, ``graphcache.cache``), raised as this package's ``InvalidArgument``
with the same message. A node's options are checked in ``_options.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..cache import CacheError, check_key
from ..cache import check_seconds as cache_check_seconds
from ..cache import check_version as cache_check_version
from ._errors import InvalidArgument

__all__ = ("MAX_ROOT_ID_BYTES", "check_root_id", "check_seconds", "check_version")

MAX_ROOT_ID_BYTES = 1000
"""``graph_key`` adds a short prefix, and cache keys stop at 1024 UTF-8 bytes."""


@contextlib.contextmanager
def _as_invalid_argument() -> Iterator[None]:
    try:
        yield
    except CacheError as exc:  # the cache's checks raise its ValueError kinds only
        raise InvalidArgument(str(exc)) from None


def check_root_id(root_id: object) -> str:
    """Return ``root_id`` if it is a non-empty str short enough to be a cache key."""
    with _as_invalid_argument():
        return check_key(root_id, name="root_id", limit=MAX_ROOT_ID_BYTES)


def check_version(version: object, *, name: str = "version") -> int:
    """Return ``version`` if it is an int (not bool) in 0..2**63-1."""
    with _as_invalid_argument():
        return cache_check_version(version, name=name)


def check_seconds(value: object, *, name: str) -> float:
    """Return ``value`` as a float if it is a finite number of seconds > 0."""
    with _as_invalid_argument():
        return cache_check_seconds(value, name=name)
