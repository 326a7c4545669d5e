"""What an actor's mailbox carries: tagged frozen msgspec Structs, dispatched with ``match``.

A message is a wake-up: the actor's state (the newest version asked for, a pending refresh, a stop
request) is updated when the message is told, so a full mailbox loses nothing and coalescing is exact.
"""

from __future__ import annotations

import msgspec

from ..storage import RowImage

__all__ = ("Changed", "Message", "Refresh", "Stop")


class Changed(msgspec.Struct, frozen=True, tag=True):
    """``root_id`` was committed at ``version``; ``committed_at`` (``time.time()``, 0.0 if unknown) is
    only used for commit-to-cache lag figures; ``images`` (None if unknown) turn the graph at
    ``version - 1`` into the graph at ``version`` (see ``storage.Change``)."""

    root_id: str
    version: int
    committed_at: float = 0.0
    images: tuple[RowImage, ...] | None = None


class Refresh(msgspec.Struct, frozen=True, tag=True):
    """Rebuild ``root_id`` from the store even if no newer version was announced."""

    root_id: str


class Stop(msgspec.Struct, frozen=True, tag=True):
    """Finish the rebuild in flight, then stop; later messages are refused with ``ActorDead``."""


Message = Changed | Refresh | Stop
