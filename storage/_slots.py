"""Slots: the feed is partitioned by ``slot_of(root_id)``, so each node reads only its own share.

A root's slot is the first two bytes of the SHA-256 of its UTF-8 id, modulo ``SLOTS`` (16384). Python
and PostgreSQL compute it alike (``slot_of`` here, ``<schema>.slot_of`` there, which fills the outbox's
``slot`` column), so a node's ring and the store's feed query agree on every root. A feed filters by a
bitmap of ``SLOTS`` bits (``slot_bitmap``), bit ``s`` being bit ``s % 8`` (least significant first) of
byte ``s // 8``: PostgreSQL's ``get_bit`` numbering.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable

__all__ = ("SLOTS", "SlotFilter", "check_slots", "slot_bitmap", "slot_of", "slots_of_bitmap")

SLOTS = 16384

SlotFilter = Callable[[], Collection[int] | None]
"""What a feed reads: called before each poll, it returns the slots to read (None: every slot). Return
the same object while the set is unchanged: a feed may turn each new one into a bitmap once."""


def slot_of(root_id: str) -> int:
    """The slot of ``root_id``: 0..16383."""
    digest = hashlib.sha256(root_id.encode("utf-8", "surrogatepass")).digest()
    return ((digest[0] << 8) | digest[1]) & (SLOTS - 1)


def slots_of_bitmap(bitmap: bytes) -> frozenset[int]:
    """The slots a ``slot_bitmap`` holds."""
    return frozenset(
        index * 8 + bit for index, byte in enumerate(bitmap) if byte for bit in range(8) if byte >> bit & 1
    )


def check_slots(slots: object) -> frozenset[int] | None:
    """``slots`` as a frozenset of valid slots (None stays None); ``ValueError`` naming a bad one."""
    if slots is None:
        return None
    if isinstance(slots, str | bytes) or not isinstance(slots, Iterable):
        raise ValueError(f"slots must be a collection of ints in 0..{SLOTS - 1}, not {type(slots).__name__}")
    found = frozenset(slots)
    for slot in found:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < SLOTS:
            raise ValueError(f"slots must be ints in 0..{SLOTS - 1}, got {slot!r}")
    return found


def slot_bitmap(slots: Iterable[int]) -> bytes:
    """``slots`` as the bitmap a feed query filters by (``SLOTS // 8`` bytes)."""
    bitmap = bytearray(SLOTS // 8)
    for slot in slots:
        bitmap[slot >> 3] |= 1 << (slot & 7)
    return bytes(bitmap)
