"""Input checks and the apply plan, shared by every store.

``check_*`` functions look at the input alone and run before any I/O. ``plan_apply`` runs the ops against
the graph's current structure (inside the store's transaction) and either returns what to write or raises
``ConcurrencyConflict`` / ``InvalidOperation``; it never writes anything itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from ._errors import ConcurrencyConflict, InvalidOperation
from ._model import Delete, Upsert

__all__ = (
    "DEFAULT_MAX_DATA_BYTES",
    "MAX_ID_BYTES",
    "MAX_PAGE",
    "MAX_VERSION",
    "CheckedDelete",
    "CheckedOp",
    "CheckedUpsert",
    "Plan",
    "RowInfo",
    "check_count",
    "check_cursor",
    "check_data",
    "check_expected",
    "check_id",
    "check_ids",
    "check_ops",
    "check_seconds",
    "plan_apply",
)

MAX_VERSION = 2**63 - 1
MAX_ID_BYTES = 512
DEFAULT_MAX_DATA_BYTES = 1024 * 1024
MAX_PAGE = 100_000
"""The most rows one ``root_versions`` call returns."""
_MAX_DEPTH = 64
_MAX_FLOAT = 1e16

_json_encoder = msgspec.json.Encoder()


class CheckedUpsert(NamedTuple):
    node_id: str
    parent_id: str | None
    data_json: bytes
    expected_row_version: int | None


class CheckedDelete(NamedTuple):
    node_id: str
    expected_row_version: int | None


CheckedOp = CheckedUpsert | CheckedDelete


class RowInfo(NamedTuple):
    """What the plan needs to know of an existing node."""

    parent_id: str | None
    row_version: int


class Plan(NamedTuple):
    """The net effect of one apply: rows to write (id -> parent, data, new row version) and rows to delete."""

    upserts: dict[str, tuple[str | None, bytes, int]]
    deletes: frozenset[str]


def check_id(value: object, *, name: str = "id") -> str:
    """Return ``value`` if it is a non-empty str of at most 512 UTF-8 bytes without NUL."""
    if not isinstance(value, str):
        raise InvalidOperation(f"{name} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidOperation(f"{name} must not be empty")
    if "\x00" in value:
        raise InvalidOperation(f"{name} must not contain NUL characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidOperation(f"{name} is not valid unicode: {exc}") from exc
    if size > MAX_ID_BYTES:
        raise InvalidOperation(f"{name} is {size} UTF-8 bytes, the limit is {MAX_ID_BYTES}")
    return value


def check_ids(value: object, *, name: str = "root_ids") -> list[str]:
    """Return ``value`` as a list of distinct ids (first one kept) if every item passes ``check_id``."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidOperation(f"{name} must be a sequence of str, not {type(value).__name__}")
    return list(dict.fromkeys(check_id(item, name=f"{name}[{index}]") for index, item in enumerate(value)))


def check_count(value: object, *, name: str, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int (not bool) >= 1, and <= ``maximum`` if one is given."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (maximum is not None and value > maximum)
    ):
        bound = ">= 1" if maximum is None else f"in 1..{maximum}"
        raise InvalidOperation(f"{name} must be an int {bound}, got {value!r}")
    return value


def check_seconds(value: object, *, name: str, allow_zero: bool = False) -> float:
    """Return ``value`` as a float if it is a finite number (not bool) > 0 (>= 0 with ``allow_zero``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        kind = "non-negative" if allow_zero else "positive"
        raise InvalidOperation(f"{name} must be a {kind}, finite number of seconds, got {value!r}")
    return float(value)


def check_expected(value: object, *, name: str) -> int | None:
    """Return ``value`` if it is None or an int (not bool) in 0..2**63-1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOperation(f"{name} must be an int or None, not {type(value).__name__}")
    if not 0 <= value <= MAX_VERSION:
        raise InvalidOperation(f"{name} must be in 0..2**63-1, got {value}")
    return value


def check_cursor(value: object, *, name: str = "cursor") -> int:
    """Return ``value`` if it is an int (not bool) in 0..2**63-1."""
    checked = check_expected(value, name=name)
    if checked is None:
        raise InvalidOperation(f"{name} must be an int, not None")
    return checked


def check_data(data: object, *, limit: int = DEFAULT_MAX_DATA_BYTES) -> bytes:
    """Return ``data`` encoded as JSON if it is a JSON-compatible dict of at most ``limit`` bytes."""
    if not isinstance(data, dict):
        raise InvalidOperation(f"data must be a dict, not {type(data).__name__}")
    _check_json(data, "data", 0)
    try:
        encoded = _json_encoder.encode(data)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise InvalidOperation(f"data cannot be encoded as JSON: {exc}") from exc
    if len(encoded) > limit:
        raise InvalidOperation(f"data is {len(encoded)} bytes as JSON, the limit is {limit}")
    return encoded


def _check_json(value: Any, path: str, depth: int) -> None:
    # Only types that survive a JSON (jsonb) round trip unchanged, so a loaded graph equals what was written.
    if depth > _MAX_DEPTH:
        raise InvalidOperation(f"{path} is nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidOperation(f"{path} is {value!r}, which JSON cannot represent")
        if abs(value) >= _MAX_FLOAT:
            # Written as "1e+16"-style JSON, jsonb's numeric hands it back as an int (not always equal).
            raise InvalidOperation(
                f"{path} is the float {value!r}; floats of 1e16 or more do not survive jsonb"
            )
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidOperation(f"{path} has a key of type {type(key).__name__}; JSON keys are str")
            _check_text(key, f"{path} key {key!r}")
            _check_json(item, f"{path}[{key!r}]", depth + 1)
    else:
        raise InvalidOperation(f"{path} is a {type(value).__name__}, which is not JSON-compatible")


def _check_text(value: str, path: str) -> None:
    if "\x00" in value:
        raise InvalidOperation(f"{path} contains a NUL character, which jsonb cannot store")


def check_ops(root_id: str, ops: object, *, limit: int = DEFAULT_MAX_DATA_BYTES) -> list[CheckedOp]:
    """Check ``ops`` against the input alone; return them with each Upsert's data encoded as JSON."""
    if isinstance(ops, str | bytes) or not isinstance(ops, Sequence):
        raise InvalidOperation(f"ops must be a sequence of Upsert/Delete, not {type(ops).__name__}")
    if not ops:
        raise InvalidOperation("ops must not be empty")
    return [_check_op(root_id, op, index, limit) for index, op in enumerate(ops)]


def _check_op(root_id: str, op: object, index: int, limit: int) -> CheckedOp:
    where = f"ops[{index}]"
    if isinstance(op, Upsert):
        node_id = check_id(op.node_id, name=f"{where}.node_id")
        parent_id = _check_parent(root_id, node_id, op.parent_id, where)
        erv = check_expected(op.expected_row_version, name=f"{where}.expected_row_version")
        return CheckedUpsert(node_id, parent_id, check_data(op.data, limit=limit), erv)
    if isinstance(op, Delete):
        node_id = check_id(op.node_id, name=f"{where}.node_id")
        if node_id == root_id:
            raise InvalidOperation(f"{where} deletes the root {root_id!r}; a graph's root cannot be deleted")
        erv = check_expected(op.expected_row_version, name=f"{where}.expected_row_version")
        return CheckedDelete(node_id, erv)
    raise InvalidOperation(f"{where} must be an Upsert or a Delete, not {type(op).__name__}")


def _check_parent(root_id: str, node_id: str, parent_id: object, where: str) -> str | None:
    if node_id == root_id:
        if parent_id is not None:
            raise InvalidOperation(f"{where} gives the root {root_id!r} a parent; the root's parent is None")
        return None
    if parent_id is None:
        raise InvalidOperation(f"{where}: node {node_id!r} is not the root, so it needs a parent_id")
    parent = check_id(parent_id, name=f"{where}.parent_id")
    if parent == node_id:
        raise InvalidOperation(f"{where}: node {node_id!r} cannot be its own parent")
    return parent


def plan_apply(root_id: str, rows: Mapping[str, RowInfo], ops: Sequence[CheckedOp]) -> Plan:
    """Run ``ops`` in order against ``rows`` (the committed structure) and return the net writes.

    Each ``expected_row_version`` is compared with the row as the earlier ops of the same call left it
    (an absent row has row version 0). A Delete removes the node's whole subtree.
    """
    state = dict(rows)
    upserts: dict[str, tuple[str | None, bytes, int]] = {}
    deletes: set[str] = set()
    for op in ops:
        current = state.get(op.node_id)
        _check_row_version(op, current)
        if isinstance(op, CheckedUpsert):
            row_version = 1 if current is None else current.row_version + 1
            state[op.node_id] = RowInfo(op.parent_id, row_version)
            upserts[op.node_id] = (op.parent_id, op.data_json, row_version)
            deletes.discard(op.node_id)  # deleted earlier in this call, written again: one upsert
        else:
            if current is None:
                raise InvalidOperation(f"cannot delete node {op.node_id!r}: it is not in graph {root_id!r}")
            for gone in _subtree(state, op.node_id):
                del state[gone]
                upserts.pop(gone, None)
                if gone in rows:
                    deletes.add(gone)
    _check_reaches_root(root_id, state, upserts)
    return Plan(upserts, frozenset(deletes))


def _check_row_version(op: CheckedOp, current: RowInfo | None) -> None:
    expected = op.expected_row_version
    actual = 0 if current is None else current.row_version
    if expected is not None and expected != actual:
        raise ConcurrencyConflict(
            f"node {op.node_id!r} has row version {actual}, expected {expected}; nothing was committed"
        )


def _subtree(state: Mapping[str, RowInfo], top: str) -> list[str]:
    children: dict[str, list[str]] = {}
    for node_id, info in state.items():
        if info.parent_id is not None:
            children.setdefault(info.parent_id, []).append(node_id)
    found, stack, seen = [], [top], {top}
    while stack:
        node_id = stack.pop()
        found.append(node_id)
        for child in children.get(node_id, ()):
            if child not in seen:  # an earlier op of the same call may have made a cycle
                seen.add(child)
                stack.append(child)
    return found


def _check_reaches_root(root_id: str, state: Mapping[str, RowInfo], written: Mapping[str, Any]) -> None:
    # Only written nodes can have broken a chain: every other node's chain either avoids them or reaches one.
    good = {root_id}
    for start in written:
        seen: list[str] = []
        node_id: str | None = start
        while node_id not in good:
            if node_id is None:
                raise InvalidOperation(f"node {start!r} is not connected to root {root_id!r}")
            if node_id in seen:
                raise InvalidOperation(f"node {start!r} would be part of a cycle: {' -> '.join(seen)}")
            info = state.get(node_id)
            if info is None:
                raise InvalidOperation(f"parent {node_id!r} of node {seen[-1]!r} is not in graph {root_id!r}")
            seen.append(node_id)
            node_id = info.parent_id
        good.update(seen)
