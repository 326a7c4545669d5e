"""The ``GraphStore`` protocol: what actors and the harness need from the source of truth."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any, Protocol, runtime_checkable

from ._model import Change, Checkpoint, Graph, Op
from ._slots import SlotFilter

__all__ = ("GraphStore",)


@runtime_checkable
class GraphStore(Protocol):
    """Source of truth for object graphs; see DESIGN.md ("storage/") for the semantics."""

    async def create_root(self, root_id: str, data: dict[str, Any]) -> int: ...

    async def apply(self, root_id: str, ops: Sequence[Op], *, expected_version: int | None = None) -> int: ...

    async def load(self, root_id: str) -> Graph: ...

    async def version(self, root_id: str) -> int: ...

    async def cursor(self) -> int:
        """A cursor for "now": ``changes(after=cursor())`` delivers every change committed after it."""
        ...

    def changes(self, *, after: int | None = None, slots: SlotFilter | None = None) -> AsyncIterator[Change]:
        """Changes committed after ``after`` (None: from now on); with ``slots``, only those of roots
        whose ``slot_of`` is in the set it returns (asked again before each read)."""
        ...

    async def save_checkpoint(self, name: str, cursor: int, *, slots: Collection[int] | None = None) -> None:
        """Remember feed position ``cursor`` under ``name`` (durably where the store is durable); ``slots``
        are those whose changes were routed up to it (None: all)."""
        ...

    async def checkpoints(self) -> list[tuple[str, Checkpoint]]:
        """Every saved checkpoint, by name."""
        ...

    async def load_checkpoint(self, name: str) -> Checkpoint | None:
        """The position last saved under ``name``, with its age and whether it is still resumable."""
        ...

    async def root_versions(self, *, after: str | None = None, limit: int = 1000) -> list[tuple[str, int]]:
        """Committed ``(root_id, version)`` pairs with ``root_id > after``, ordered by root id, at most
        ``limit``: pass the last root id back as ``after`` to page through every root."""
        ...

    async def aclose(self) -> None: ...
