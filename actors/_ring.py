"""Consistent hashing with virtual nodes: which node owns a root.

A root belongs to its slot (``storage.slot_of``: one of 16384, the same in Python and in the store's
feed query) and a slot to a node, so a node's feed can read only its slots (``slots_of``). Slots are
placed as described below; with 16384 of them, a node's share of roots follows its share of slots.

Every node places ``vnodes`` points on a 64-bit circle (BLAKE2b of the node id, so every process and
every machine computes the same ring; Python's ``hash()`` is salted per process and would not). A slot
is hashed to ``probes`` points; each probe's owner is the first virtual node clockwise from it, and the
probe that lands closest to its virtual node decides (multi-probe consistent hashing, Appleton and
O'Reilly 2015). With one probe this is the classic ring, whose per-node share varies by about
``1/sqrt(vnodes)`` (9% at 128 vnodes: in 62% of 50 random 10-node clusters some node was more than
15% off the mean); with three probes one was (worst 13.7%, 95th percentile 11%). Measure it with
``python -m graphcache.harness._simulate --balance-clusters 50``.

Why moves stay minimal: the owner is ``argmin(score(slot, node), node)`` over the nodes, where a
node's score is the shortest clockwise distance from any probe to one of *its* virtual nodes and
depends on no other node. Adding a node can therefore only hand slots (and their roots) to that node,
and removing one only moves the slots it owned.

Errors join the package's tree (``actors._errors``): `EmptyRing` is an ``ActorError`` and a
``LookupError``; `InvalidNodeId` and `InvalidRingConfig` are ``InvalidArgument`` (so ``ValueError``).
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable

from ..storage import SLOTS, slot_of
from ._errors import ActorError, InvalidArgument

__all__ = ("EmptyRing", "InvalidNodeId", "InvalidRingConfig", "Ring")

_SPACE = 1 << 64
_WORDS_PER_DIGEST = 8  # a 64-byte BLAKE2b digest holds eight 64-bit positions
MAX_PROBES = _WORDS_PER_DIGEST
DEFAULT_PROBES = 3
_INDEX_BITS = 32  # node indexes are stored as uint32
_INDEX_MASK = (1 << _INDEX_BITS) - 1
MAX_VNODES = 4096


class EmptyRing(ActorError, LookupError):
    """The ring has no nodes, so no root has an owner."""


class InvalidNodeId(InvalidArgument):
    """A node id is not a non-empty ``str``."""


class InvalidRingConfig(InvalidArgument):
    """``vnodes`` or ``probes`` is not an int in its allowed range."""


def validate_node_id(node_id: object) -> str:
    """Return ``node_id`` if it is a non-empty str, else raise `InvalidNodeId`."""
    if not isinstance(node_id, str) or not node_id:
        raise InvalidNodeId(f"a node id must be a non-empty str, got {node_id!r}")
    return node_id


def _validate_count(name: str, value: object, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise InvalidRingConfig(f"{name} must be an int in 1..{upper}, got {value!r}")
    return value


def _words(data: bytes, count: int) -> list[int]:
    """``count`` 64-bit positions drawn from one BLAKE2b digest of ``data``."""
    digest = hashlib.blake2b(data, digest_size=8 * count).digest()
    return [int.from_bytes(digest[i : i + 8], "big") for i in range(0, 8 * count, 8)]


def _vnode_positions(node_id: str, vnodes: int) -> list[int]:
    encoded = node_id.encode()
    positions: list[int] = []
    for block in range(0, vnodes, _WORDS_PER_DIGEST):
        count = min(_WORDS_PER_DIGEST, vnodes - block)
        positions += _words(b"%d\x00%s" % (block, encoded), count)
    return positions


@functools.cache
def _slot_probes(probes: int) -> tuple[list[int], ...]:
    """Every slot's probe positions (the same for every ring: computed once per probe count)."""
    return tuple(slot_probes(slot, probes) for slot in range(SLOTS))


def slot_probes(slot: int, probes: int) -> list[int]:
    """The positions on the circle a slot is placed by."""
    return _words(b"slot:%d" % slot, probes)


class Ring:
    """An immutable consistent-hash ring over ``nodes``: ``Ring(["a", "b", "c"]).owner("root-1")``."""

    __slots__ = ("_names", "_nodes", "_owners", "_points", "_probes", "_slot_owners", "_vnodes")

    def __init__(self, nodes: Iterable[str], *, vnodes: int = 128, probes: int = DEFAULT_PROBES) -> None:
        self._vnodes = _validate_count("vnodes", vnodes, MAX_VNODES)
        self._probes = _validate_count("probes", probes, MAX_PROBES)
        self._nodes = frozenset(validate_node_id(node) for node in nodes)
        self._names = tuple(sorted(self._nodes))
        # Sort (position, node index) packed into one int: same order as the pair, no tuple per vnode.
        placed = sorted(
            position << _INDEX_BITS | index
            for index, name in enumerate(self._names)
            for position in _vnode_positions(name, self._vnodes)
        )
        # Two flat typed arrays instead of a list of pairs: 12 bytes per virtual node, not about 100.
        self._points = array("Q", [packed >> _INDEX_BITS for packed in placed])
        self._owners = array("I", [packed & _INDEX_MASK for packed in placed])
        self._slot_owners: list[str | None] = [None] * SLOTS  # each slot's owner, once first asked

    @property
    def nodes(self) -> frozenset[str]:
        """The node ids on the ring."""
        return self._nodes

    @property
    def vnodes(self) -> int:
        """Virtual nodes per node."""
        return self._vnodes

    @property
    def probes(self) -> int:
        """Hash probes per lookup (1 = the classic ring)."""
        return self._probes

    def owner(self, root_id: str) -> str:
        """The node that owns ``root_id`` (the owner of its slot); `EmptyRing` if the ring has no nodes."""
        if not isinstance(root_id, str):
            raise InvalidArgument(f"a root id must be a str, got {root_id!r}")
        if not self._names:
            raise EmptyRing(f"no node owns {root_id!r}: the ring is empty")
        return self._slot_owner(slot_of(root_id))

    def owner_of_slot(self, slot: int) -> str:
        """The node that owns ``slot`` (0..16383); `EmptyRing` if the ring has no nodes."""
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < SLOTS:
            raise InvalidArgument(f"a slot must be an int in 0..{SLOTS - 1}, got {slot!r}")
        if not self._names:
            raise EmptyRing(f"no node owns slot {slot}: the ring is empty")
        return self._slot_owner(slot)

    def slots_of(self, node_id: str) -> frozenset[int]:
        """The slots ``node_id`` owns (empty if it is not on the ring)."""
        if not self._names:
            return frozenset()
        return frozenset(slot for slot in range(SLOTS) if self._slot_owner(slot) == node_id)

    def _slot_owner(self, slot: int) -> str:
        owner = self._slot_owners[slot]
        if owner is None:
            owner = self._slot_owners[slot] = self._place(_slot_probes(self._probes)[slot])
        return owner

    def _place(self, probes: Iterable[int]) -> str:
        """Multi-probe placement: the owner of the probe closest to its virtual node."""
        points = self._points
        size = len(points)
        best: tuple[int, str] | None = None
        for probe in probes:
            slot = bisect_left(points, probe)
            distance = (points[slot] if slot < size else points[0] + _SPACE) - probe
            candidate = (distance, self._names[self._owners[slot % size]])
            if best is None or candidate < best:
                best = candidate
        assert best is not None  # probes >= 1
        return best[1]

    def owns(self, node_id: str, root_id: str) -> bool:
        """Whether ``node_id`` owns ``root_id`` (False on an empty ring)."""
        return bool(self._names) and self.owner(root_id) == node_id

    def __repr__(self) -> str:
        extra = "" if self._probes == DEFAULT_PROBES else f" probes={self._probes}"
        return f"<Ring nodes={len(self._names)} vnodes={self._vnodes}{extra}>"
