"""Input checks shared by every backend: all run before any I/O.

``check_key``, ``check_version`` and ``check_seconds`` are public (``graphcache.cache``): the actors
package checks root ids, versions and timeouts by the cache's own contract, since they end up here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, TypeGuard

import msgspec

from ._errors import InvalidArgument, InvalidKey, InvalidValue, InvalidVersion, ValueTooLarge

MAX_VERSION = 2**63 - 1
MAX_KEY_BYTES = 1024
DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()


def check_key(key: object, *, name: str = "key", limit: int = MAX_KEY_BYTES) -> str:
    """Return ``key`` if it is a non-empty str of at most ``limit`` (default 1024) UTF-8 bytes."""
    if not isinstance(key, str):
        raise InvalidKey(f"{name} must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidKey(f"{name} must not be empty")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise InvalidKey(f"{name} is not valid unicode: {exc}") from exc
    if size > limit:
        raise InvalidKey(f"{name} is {size} UTF-8 bytes, the limit is {limit}")
    return key


def check_version(version: object, *, name: str = "version") -> int:
    """Return ``version`` if it is an int (not bool) in 0..2**63-1."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidVersion(f"{name} must be an int, not {type(version).__name__}")
    if not 0 <= version <= MAX_VERSION:
        raise InvalidVersion(f"{name} must be in 0..2**63-1, got {version}")
    return version


def check_items(items: object) -> list[tuple[str, Any, int, int | None]]:
    """``items`` as ``(key, value, version, lease)``: each a ``(key, value, version)`` or
    ``(key, value, version, lease)`` tuple with a valid key, version and lease."""
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise InvalidValue(f"items must be a sequence of (key, value, version), not {type(items).__name__}")
    checked = []
    for index, item in enumerate(items):
        if not isinstance(item, tuple) or len(item) not in (3, 4):
            raise InvalidValue(
                f"items[{index}] must be a (key, value, version[, lease]) tuple, not {item!r:.80}"
            )
        key, value, version = item[:3]
        lease = check_lease(item[3], name=f"items[{index}] lease") if len(item) == 4 else None
        checked.append((check_key(key), value, check_version(version, name=f"items[{index}] version"), lease))
    return checked


MAX_LEASE = 2**63 - 1


def check_lease(lease: object, *, name: str = "lease") -> int | None:
    """``lease`` if it is None or an incarnation as ``lease()`` returns it (an int in 1..2**63-1)."""
    if lease is None or _is_int_in(lease, 1, MAX_LEASE):
        return lease
    raise InvalidArgument(
        f"{name} must be an incarnation from lease() (an int in 1..2**63-1), got {lease!r:.40}"
    )


def check_keys(keys: object) -> list[str]:
    """``keys`` if it is a sequence (not a str) of valid keys."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Sequence):
        raise InvalidKey(f"keys must be a sequence of str, not {type(keys).__name__}")
    return [check_key(key) for key in keys]


def parse_version(raw: object) -> int | None:
    """A stored version (bytes) as an int, or None if it is not a canonical decimal in 0..2**63-1."""
    if type(raw) is not bytes or not 0 < len(raw) <= 19 or not raw.isdigit():
        return None
    if raw[0] == 48 and len(raw) > 1:  # a leading zero: not what graphcache writes
        return None
    version = int(raw)
    return version if version <= MAX_VERSION else None


def check_seconds(value: object, *, name: str, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a finite number (not bool) > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidArgument(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)


def check_ttl(ttl: object) -> float | None:
    """``ttl`` if it is None (no expiry) or a positive, finite number of seconds."""
    return None if ttl is None else check_seconds(ttl, name="ttl")


def check_limit(value: object) -> int:
    """``max_value_bytes`` must be a positive int."""
    if not _is_int_in(value, 1, None):
        raise InvalidArgument(f"max_value_bytes must be a positive int, got {value!r}")
    return value


def _is_int_in(value: object, low: int, high: int | None) -> TypeGuard[int]:
    """Whether ``value`` is an int (bool is not) in ``low..high`` (no upper bound for None)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int)
        and low <= value
        and (high is None or value <= high)
    )


def encode_value(value: Any, *, limit: int = DEFAULT_MAX_VALUE_BYTES) -> bytes:
    """Encode ``value`` as msgpack, refusing what cannot be encoded or is over ``limit`` bytes."""
    try:
        data = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise InvalidValue(f"value cannot be encoded as msgpack: {exc}") from exc
    except RecursionError as exc:  # a value that contains itself
        raise InvalidValue(
            "value cannot be encoded as msgpack: it is nested too deeply or contains itself"
        ) from exc
    if len(data) > limit:
        raise ValueTooLarge(f"encoded value is {len(data)} bytes, the limit is {limit}")
    return data


_untyped = msgspec.msgpack.Decoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_DECODER_CACHE_SIZE = 256


def check_type(type: Any) -> msgspec.msgpack.Decoder[Any]:
    """A decoder for ``type=`` (None: plain msgpack); ``InvalidValue`` if msgspec cannot decode into it."""
    if type is None:
        return _untyped
    try:
        decoder = _decoders.get(type)
    except TypeError:  # an unhashable type argument: build a decoder each time
        decoder = None
    if decoder is None:
        try:
            decoder = msgspec.msgpack.Decoder(type)
        except TypeError as exc:
            raise InvalidValue(f"type={type!r} is not a type msgspec can decode into: {exc}") from exc
        if len(_decoders) < _DECODER_CACHE_SIZE:
            with contextlib.suppress(TypeError):  # unhashable: not kept
                _decoders[type] = decoder
    return decoder


def decode_value(key: str, data: bytes, decoder: msgspec.msgpack.Decoder[Any] = _untyped) -> Any:
    """Decode the msgpack ``data`` stored at ``key``; ``InvalidValue`` if it does not fit the type."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise InvalidValue(f"the value at key {key!r} does not decode as {decoder.type!r}: {exc}") from exc
