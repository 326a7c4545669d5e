"""Argument checks of the actors package; all run before any I/O."""

from __future__ import annotations

import math

from ._errors import InvalidArgument

__all__ = ("check_count", "check_positive", "check_root_id", "check_version")

MAX_VERSION = 2**63 - 1
MAX_ROOT_ID_BYTES = 1000  # graph_key() adds a short prefix; cache keys stop at 1024 UTF-8 bytes


def check_root_id(root_id: object) -> str:
    """Return ``root_id`` if it is a non-empty str short enough to be a cache key."""
    if not isinstance(root_id, str):
        raise InvalidArgument(f"root_id must be a str, not {type(root_id).__name__}")
    if not root_id:
        raise InvalidArgument("root_id must not be empty")
    try:
        size = len(root_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"root_id is not valid unicode: {exc}") from exc
    if size > MAX_ROOT_ID_BYTES:
        raise InvalidArgument(f"root_id is {size} UTF-8 bytes, the limit is {MAX_ROOT_ID_BYTES}")
    return root_id


def check_version(version: object, *, name: str = "version") -> int:
    """Return ``version`` if it is an int (not bool) in 0..2**63-1."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidArgument(f"{name} must be an int, not {type(version).__name__}")
    if not 0 <= version <= MAX_VERSION:
        raise InvalidArgument(f"{name} must be in 0..2**63-1, got {version}")
    return version


def check_positive(value: object, *, name: str, allow_zero: bool = False) -> float:
    """Return ``value`` if it is a finite number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number, not {type(value).__name__}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not low_ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgument(f"{name} must be finite and {bound}, got {value!r}")
    return float(value)


def check_count(value: object, *, name: str, low: int = 1) -> int:
    """Return ``value`` if it is an int (not bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(f"{name} must be an int >= {low}, got {value!r}")
    return value
