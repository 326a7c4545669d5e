"""The graph model, the write operations and the change-feed record, as msgspec Structs."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ("Change", "Checkpoint", "Delete", "Graph", "Node", "Op", "RowImage", "Snapshot", "Upsert")

_json_encoder = msgspec.json.Encoder()


class Node(msgspec.Struct, frozen=True):
    """One row of a graph. The root is the node whose ``id`` equals the graph's ``root_id``."""

    id: str
    parent_id: str | None
    data: dict[str, Any]
    row_version: int


class Graph(msgspec.Struct, frozen=True):
    """A whole graph as committed at ``version``."""

    root_id: str
    version: int
    nodes: dict[str, Node]

    def to_json(self) -> bytes:
        """The graph as JSON, ``{"root_id", "version", "nodes": {id: {"id", "parent_id", "data",
        "row_version"}}}``: ready for a web framework's response body, no intermediate dicts."""
        return _json_encoder.encode(self)


Snapshot = Graph


class Upsert(msgspec.Struct, frozen=True, tag=True):
    """Insert or update one node; with ``expected_row_version``, only if the row still has it."""

    node_id: str
    parent_id: str | None
    data: dict[str, Any]
    expected_row_version: int | None = None


class Delete(msgspec.Struct, frozen=True, tag=True):
    """Delete one node (and its subtree); with ``expected_row_version``, only if the row still has it."""

    node_id: str
    expected_row_version: int | None = None


Op = Upsert | Delete


class RowImage(msgspec.Struct, frozen=True, array_like=True):
    """One node as a committed transaction left it: its after-image, or (``data`` None) its deletion,
    which takes the node's subtree with it. On the wire (the outbox) ``[id, parent_id, data,
    row_version]``, or ``[id]`` for a deletion."""

    id: str
    parent_id: str | None = None
    data: dict[str, Any] | None = None
    row_version: int = 0


class Change(msgspec.Struct, frozen=True):
    """One committed change: ``root_id`` reached ``version``. ``cursor`` resumes the feed after it.

    ``committed_at`` is the commit's wall-clock time (``time.time()`` seconds; 0.0 where unknown), used
    for commit-to-cache lag figures only, never for ordering. ``images`` are the nodes the transaction
    wrote or deleted, in order: applied to the graph at ``version - 1`` they give the graph at
    ``version``. None where they are not known (a custom loader's tables, a transaction too large to
    log them, a change that moved a subtree between roots): the graph must then be loaded.
    """

    root_id: str
    version: int
    cursor: int
    committed_at: float = 0.0
    images: tuple[RowImage, ...] | None = None


class Checkpoint(msgspec.Struct, frozen=True):
    """A durable feed position saved with ``save_checkpoint``.

    ``age`` is the seconds since it was saved (by the database server's clock for PostgreSQL, a monotonic
    clock for ``MemoryStore``); ``resumable`` says whether ``changes(after=cursor)`` can still deliver every
    change committed after it (PostgreSQL: ``age`` is under the store's outbox ``retention`` and pruning
    has not deleted any outbox row after the cursor). A checkpoint
    that is not resumable still names a valid position, but changes after it may have been pruned: the
    caller must also reconcile (compare ``root_versions``) to catch up.
    """

    cursor: int
    age: float
    resumable: bool
    slots: frozenset[int] | None = None
    """The slots whose changes the saver had routed up to ``cursor`` (None: every slot)."""
