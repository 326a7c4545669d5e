"""A node's options: frozen msgspec Structs, checked once, by one ``msgspec.convert`` call.

``Node(...)`` gathers its keyword arguments (the signature DESIGN.md and docs/node.md show) into a
``NodeOptions``; msgspec checks every constraint declared on the fields (types, bounds, finiteness, the
consistency literal) and the first failure becomes ``InvalidArgument`` naming the option and what it must
be. The parts of a node take what they need from the one checked object: each ``RootActor`` its
``NodeOptions.actor``, the ``Rebuilder`` and the read-through ``graph_ttl``, the node the rest. An option
is therefore declared, defaulted and checked in exactly one place.

The bounds' descriptions live in the ``msgspec.Meta`` of each field type, so the error messages, a JSON
schema of the options and this file cannot disagree.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Annotated, Any, Literal, Self, TypeVar

import msgspec

from ._errors import InvalidArgument
from ._ring import InvalidNodeId

__all__ = (
    "DEFAULT_MAX_LIVE_GRAPH_BYTES",
    "DEFAULT_MIN_REBUILD_INTERVAL",
    "DEFAULT_SWEEP_INTERVAL",
    "ActorOptions",
    "Consistency",
    "NodeOptions",
    "convert_options",
)

T = TypeVar("T", bound=msgspec.Struct)

DEFAULT_MIN_REBUILD_INTERVAL = 0.1
"""Seconds between the starts of two rebuilds of one root (see docs/node.md, "Pacing", for the trade-off)."""

DEFAULT_SWEEP_INTERVAL = 60.0
"""Seconds between two reconcile sweeps (one also runs at start-up)."""

DEFAULT_MAX_LIVE_GRAPH_BYTES = 1 << 20
"""The most memory (estimated: the graph's msgpack size plus the images applied since) one live actor
spends on keeping its root's graph for incremental rebuilds; a larger graph is loaded for each rebuild."""

_MAX_VERSION = 2**63 - 1
_FINITE = sys.float_info.max  # an upper bound that only infinity exceeds (NaN fails every bound)

Seconds = Annotated[float, msgspec.Meta(gt=0, le=_FINITE, description="a finite number of seconds > 0")]
SecondsOrZero = Annotated[
    float, msgspec.Meta(ge=0, le=_FINITE, description="a finite number of seconds >= 0")
]
Count = Annotated[int, msgspec.Meta(ge=1, description="an int >= 1")]
CountOrZero = Annotated[int, msgspec.Meta(ge=0, description="an int >= 0")]
Version = Annotated[int, msgspec.Meta(ge=0, le=_MAX_VERSION, description="an int in 0..2**63-1")]
NodeId = Annotated[str, msgspec.Meta(min_length=1, description="a non-empty str")]
Consistency = Literal["bounded", "strict"]
_ConsistencyOption = Annotated[Consistency, msgspec.Meta(description="one of ('bounded', 'strict')")]


class ActorOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a ``RootActor`` works: its mailbox, when it passivates, how it retries and paces rebuilds.

    Build it with ``ActorOptions.create(**values)`` (checked); the plain constructor checks nothing.
    """

    mailbox_size: Count = 16
    idle_timeout: Seconds = 30.0
    retry_initial: Seconds = 0.05
    retry_max: Seconds = 5.0
    min_rebuild_interval: SecondsOrZero = DEFAULT_MIN_REBUILD_INTERVAL
    max_live_graph_bytes: CountOrZero = DEFAULT_MAX_LIVE_GRAPH_BYTES

    @classmethod
    def create(cls, **values: Any) -> Self:
        """The options ``values`` name (defaults for the rest); ``InvalidArgument`` naming a bad one."""
        return convert_options(values, cls)


class NodeOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything ``Node(...)`` takes besides its store, cache and membership; see ``Node`` for each.

    Build it with ``NodeOptions.create(node_id=..., **values)``: the actor's options are given flat, as
    ``Node`` takes them, and land in ``actor``. The plain constructor checks nothing.
    """

    node_id: NodeId
    consistency: _ConsistencyOption = "bounded"
    handoff: SecondsOrZero = 10.0
    feed_after: Version | None = None
    remember_roots: CountOrZero = 100_000
    shutdown_timeout: Seconds = 5.0
    checkpoint_interval: Seconds = 0.5
    sweep_interval: Seconds = DEFAULT_SWEEP_INTERVAL
    checkpoint_save_interval: Seconds = 1.0
    graph_ttl: Seconds | None = None
    """Seconds every graph this node caches lives (rebuilds and read-throughs alike); None: no expiry."""
    actor: ActorOptions = ActorOptions()

    @classmethod
    def create(cls, **values: Any) -> Self:
        """The options ``values`` name (defaults for the rest), in one conversion; ``InvalidArgument``
        (``InvalidNodeId`` for the node id) naming the first bad one, or an unknown one. The actor's
        options come flat, as ``Node`` takes them, or as one ``actor=ActorOptions.create(...)``."""
        flat = {name: values.pop(name) for name in ActorOptions.__struct_fields__ if name in values}
        if flat and "actor" in values:
            raise InvalidArgument("give the actor's options flat or as actor=ActorOptions(...), not both")
        if "actor" not in values:
            values["actor"] = flat
        return convert_options(values, cls)


def convert_options(values: dict[str, Any], kind: type[T]) -> T:
    """``values`` as a ``kind`` Struct, every constraint checked by one ``msgspec.convert`` call."""
    try:
        return msgspec.convert(values, kind)
    except msgspec.ValidationError as exc:
        raise _invalid(kind, values, str(exc)) from None


_WHERE = re.compile(r" - at `\$((?:\.\w+)+)`$")
"""msgspec ends a ValidationError's message with where the value was, e.g. `` - at `$.actor.mailbox_size```
(it has no structured attribute for it)."""
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
_ERRORS: dict[str, type[InvalidArgument]] = {"node_id": InvalidNodeId}
"""Options whose errors are a subclass of their own (the ring's, for node ids)."""


def _invalid(kind: type[msgspec.Struct], values: dict[str, Any], text: str) -> InvalidArgument:
    """The ``InvalidArgument`` for msgspec's ``text``: which option, what it must be, what it was."""
    unknown = _UNKNOWN.search(text)
    if unknown is not None:
        return InvalidArgument(f"unknown option {unknown[1]!r}")
    where = _WHERE.search(text)
    if where is None:  # not a field's value (msgspec found no path): say what msgspec said
        return InvalidArgument(f"invalid options: {text}")
    path = where[1].lstrip(".").split(".")
    value: Any = values
    for step in path:
        value = value.get(step) if isinstance(value, dict) else None
    name = path[-1]
    need = _requirements(kind).get(name) or text[: where.start()]
    return _ERRORS.get(name, InvalidArgument)(f"{name} must be {need}, got {value!r:.80}")


@functools.cache
def _requirements(kind: type[msgspec.Struct]) -> dict[str, str]:
    """Each field's requirement in words (its type's ``Meta.description``), nested Structs' included."""
    found: dict[str, str] = {}
    info = msgspec.inspect.type_info(kind)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        if isinstance(field.type, msgspec.inspect.StructType):
            found.update(_requirements(field.type.cls))
        elif (need := _describe(field.type)) is not None:
            found[field.name] = need
    return found


def _describe(info: msgspec.inspect.Type) -> str | None:
    if isinstance(info, msgspec.inspect.Metadata):
        description = (info.extra_json_schema or {}).get("description")
        return description if isinstance(description, str) else None
    if isinstance(info, msgspec.inspect.UnionType):
        described = [need for member in info.types if (need := _describe(member)) is not None]
        if len(described) == 1 and any(isinstance(m, msgspec.inspect.NoneType) for m in info.types):
            return f"{described[0]} or None"
    return None
