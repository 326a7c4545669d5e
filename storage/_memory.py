"""``MemoryStore``: the embedded, in-process source of truth (a real implementation of ``GraphStore``).

Each root's committed state is one immutable ``(version, rows)`` pair that an ``apply`` replaces in a
single step under the root's lock, so a ``load`` that grabbed the pair returns a consistent snapshot even
when it awaits (simulated I/O latency) between reading the version and reading the nodes. With
``latency=(min_s, max_s)`` every call awaits random delays at its I/O points, which makes the interleavings
of concurrent tasks real (the demo and the race tests rely on it).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self

import anyio
import msgspec

from ._errors import ConcurrencyConflict, InvalidOperation, RootExists, RootNotFound, StoreUnavailable
from ._model import Change, Checkpoint, Graph, Node, Op, RowImage
from ._slots import SlotFilter, check_slots, slot_of
from ._validate import (
    DEFAULT_MAX_DATA_BYTES,
    MAX_PAGE,
    Plan,
    RowInfo,
    check_count,
    check_cursor,
    check_data,
    check_expected,
    check_id,
    check_ids,
    check_ops,
    check_seconds,
    plan_apply,
)

__all__ = ("MemoryStore",)

logger = logging.getLogger(__name__)

_json_decoder = msgspec.json.Decoder(dict[str, Any])


class _Row(NamedTuple):
    parent_id: str | None
    data_json: bytes
    row_version: int


class _Committed(NamedTuple):
    version: int
    rows: dict[str, _Row]  # never mutated once published


class _Root:
    __slots__ = ("committed", "lock")

    def __init__(self, committed: _Committed) -> None:
        self.committed = committed
        self.lock = anyio.Lock()


class MemoryStore:
    """In-process ``GraphStore``; ``latency=(min_s, max_s)`` simulates I/O so concurrent calls interleave.

    The change feed keeps the last ``feed_retention`` changes; cursors are 1, 2, 3, ... in commit order.
    Checkpoints live as long as the store; one is resumable while the feed still keeps every change after it.
    """

    def __init__(
        self,
        latency: tuple[float, float] | None = None,
        *,
        seed: int | None = None,
        max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
        feed_retention: int = 100_000,
    ) -> None:
        self._latency = _check_latency(latency)
        check_count(max_data_bytes, name="max_data_bytes")
        check_count(feed_retention, name="feed_retention")
        self._random = random.Random(seed)
        self._max_data_bytes = max_data_bytes
        self._roots: dict[str, _Root] = {}
        self._sorted_ids: list[str] | None = []  # root ids in order; None: rebuild at the next use
        self._checkpoints: dict[
            str, tuple[int, float, frozenset[int] | None]
        ] = {}  # name -> (cursor, saved at, slots)
        self._log: deque[Change] = deque(maxlen=feed_retention)
        self._last_cursor = 0
        self._appended = anyio.Event()
        self._closed = False
        self._feeds: set[_MemoryFeed] = set()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<MemoryStore [{state} | roots: {len(self._roots)} | cursor: {self._last_cursor}"
            f" | feeds: {len(self._feeds)}]>"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def create_root(self, root_id: str, data: dict[str, Any]) -> int:
        """Create a graph holding only its root node, at version 1."""
        check_id(root_id, name="root_id")
        data_json = check_data(data, limit=self._max_data_bytes)
        await self._io()
        self._check_open()
        if root_id in self._roots:
            raise RootExists(f"root {root_id!r} already exists")
        self._roots[root_id] = _Root(_Committed(1, {root_id: _Row(None, data_json, 1)}))
        self._sorted_ids = None
        self._publish(root_id, 1, (RowImage(root_id, None, _json_decoder.decode(data_json), 1),))
        return 1

    async def apply(self, root_id: str, ops: Sequence[Op], *, expected_version: int | None = None) -> int:
        """Apply ``ops`` all-or-nothing; the root's version goes up by exactly one."""
        check_id(root_id, name="root_id")
        expected = check_expected(expected_version, name="expected_version")
        checked = check_ops(root_id, ops, limit=self._max_data_bytes)
        await self._io()
        root = self._root(root_id)
        async with root.lock:
            await self._io()  # a transaction holds its lock across I/O
            self._check_open()
            committed = root.committed
            if expected is not None and expected != committed.version:
                raise ConcurrencyConflict(
                    f"root {root_id!r} is at version {committed.version}, expected {expected};"
                    " nothing was committed"
                )
            structure = {key: RowInfo(row.parent_id, row.row_version) for key, row in committed.rows.items()}
            plan = plan_apply(root_id, structure, checked)
            rows = {key: row for key, row in committed.rows.items() if key not in plan.deletes}
            for node_id, (parent_id, data_json, row_version) in plan.upserts.items():
                rows[node_id] = _Row(parent_id, data_json, row_version)
            version = committed.version + 1
            root.committed = _Committed(version, rows)
            self._publish(root_id, version, _images(plan))
        return version

    async def load(self, root_id: str) -> Graph:
        """One consistent snapshot of the graph."""
        check_id(root_id, name="root_id")
        await self._io()
        snapshot = self._root(root_id).committed
        await self._io()  # a writer may commit here; the snapshot we hold is unaffected
        return _graph(root_id, snapshot)

    async def load_many(self, root_ids: Sequence[str]) -> dict[str, Graph]:
        """Each root's graph from one consistent snapshot of them all; unknown roots are left out."""
        ids = check_ids(root_ids)
        await self._io()
        self._check_open()
        snapshots = [(root_id, root.committed) for root_id in ids if (root := self._roots.get(root_id))]
        await self._io()  # a writer may commit here; the snapshots we hold are unaffected
        return {root_id: _graph(root_id, snapshot) for root_id, snapshot in snapshots}

    async def version(self, root_id: str) -> int:
        """The root's committed version."""
        check_id(root_id, name="root_id")
        await self._io()
        return self._root(root_id).committed.version

    async def cursor(self) -> int:
        """A cursor for "now": ``changes(after=cursor)`` delivers every change committed after this call."""
        self._check_open()
        return self._last_cursor

    async def save_checkpoint(self, name: str, cursor: int, *, slots: Collection[int] | None = None) -> None:
        """Remember ``cursor`` under ``name`` for as long as the store lives (``slots``: those it covers,
        None: all)."""
        check_id(name, name="name")
        check_cursor(cursor, name="cursor")
        try:
            wanted = check_slots(slots)
        except ValueError as exc:
            raise InvalidOperation(str(exc)) from None
        await self._io()
        self._check_open()
        self._checkpoints[name] = (cursor, time.monotonic(), wanted)

    async def load_checkpoint(self, name: str) -> Checkpoint | None:
        """The cursor last saved under ``name``, its age, and whether the feed still keeps every change
        after it (always, unless more than ``feed_retention`` changes were committed since)."""
        check_id(name, name="name")
        await self._io()
        self._check_open()
        saved = self._checkpoints.get(name)
        return None if saved is None else self._checkpoint(*saved)

    async def checkpoints(self) -> list[tuple[str, Checkpoint]]:
        """Every saved checkpoint, by name."""
        await self._io()
        self._check_open()
        return [(name, self._checkpoint(*saved)) for name, saved in sorted(self._checkpoints.items())]

    def _checkpoint(self, cursor: int, saved_at: float, slots: frozenset[int] | None) -> Checkpoint:
        resumable = not self._log or cursor + 1 >= self._log[0].cursor
        return Checkpoint(cursor, max(time.monotonic() - saved_at, 0.0), resumable, slots)

    async def root_versions(self, *, after: str | None = None, limit: int = 1000) -> list[tuple[str, int]]:
        """Committed ``(root_id, version)`` pairs with ``root_id > after``, by root id, at most ``limit``."""
        if after is not None:
            check_id(after, name="after")
        check_count(limit, name="limit", maximum=MAX_PAGE)
        await self._io()
        self._check_open()
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self._roots)
        ids = self._sorted_ids
        start = 0 if after is None else bisect.bisect_right(ids, after)
        return [(root_id, self._roots[root_id].committed.version) for root_id in ids[start : start + limit]]

    def changes(self, *, after: int | None = None, slots: SlotFilter | None = None) -> _MemoryFeed:
        """The change feed from just after ``after`` (None: from now on); with ``slots``, only the
        changes of roots in the slots it returns."""
        cursor = check_expected(after, name="after")
        feed = _MemoryFeed(self, self._last_cursor if cursor is None else cursor, slots)
        self._feeds.add(feed)
        return feed

    async def aclose(self) -> None:
        """Close the store; open feeds end, later calls raise ``StoreUnavailable``."""
        self._closed = True
        self._appended.set()

    async def _io(self) -> None:
        if self._latency is not None:
            await anyio.sleep(self._random.uniform(*self._latency))

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("MemoryStore is closed")

    def _root(self, root_id: str) -> _Root:
        self._check_open()
        root = self._roots.get(root_id)
        if root is None:
            raise RootNotFound(f"root {root_id!r} not found")
        return root

    def _publish(self, root_id: str, version: int, images: tuple[RowImage, ...]) -> None:
        self._last_cursor += 1
        self._log.append(Change(root_id, version, self._last_cursor, time.time(), images))
        self._wake_feeds()

    def _wake_feeds(self) -> None:
        appended, self._appended = self._appended, anyio.Event()
        appended.set()

    def _since(self, cursor: int) -> list[Change]:
        if not self._log or cursor >= self._last_cursor:
            return []
        first = self._log[0].cursor
        if cursor + 1 < first:
            logger.warning("feed cursor %d is older than the retained changes (from %d)", cursor, first)
        return list(itertools.islice(self._log, max(cursor + 1 - first, 0), None))


class _MemoryFeed:
    """Async iterator over a ``MemoryStore``'s changes in commit order (per root, versions increase)."""

    def __init__(self, store: MemoryStore, cursor: int, slots: SlotFilter | None) -> None:
        self._store = store
        self._cursor = cursor
        self._slots = slots
        self._buffer: deque[Change] = deque()
        self._closed = False
        self.rows = 0  # changes read (of the feed's slots only, with a filter)

    def __repr__(self) -> str:
        return f"<MemoryFeed [cursor: {self._cursor} | buffered: {len(self._buffer)}]>"

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Change:
        while not self._buffer:
            if self._closed or self._store._closed:
                raise StopAsyncIteration
            waiter = self._store._appended
            found = self._store._since(self._cursor)
            if found:
                self._cursor = found[-1].cursor
                wanted = None if self._slots is None else self._slots()
                if wanted is not None:
                    found = [change for change in found if slot_of(change.root_id) in wanted]
                self.rows += len(found)
                self._buffer.extend(found)
            if not self._buffer:
                await waiter.wait()
        return self._buffer.popleft()

    async def aclose(self) -> None:
        self._closed = True
        self._store._feeds.discard(self)
        self._store._wake_feeds()  # a task waiting in __anext__ sees the close (others just wait again)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _check_latency(latency: object) -> tuple[float, float] | None:
    if latency is None:
        return None
    if not isinstance(latency, tuple) or len(latency) != 2:
        raise InvalidOperation(f"latency must be a (min_s, max_s) tuple, not {latency!r}")
    low = check_seconds(latency[0], name="latency's min_s", allow_zero=True)
    high = check_seconds(latency[1], name="latency's max_s", allow_zero=True)
    if low > high:
        raise InvalidOperation(f"latency must satisfy 0 <= min_s <= max_s, got {latency!r}")
    return (low, high)


def _graph(root_id: str, snapshot: _Committed) -> Graph:
    nodes = {
        node_id: Node(node_id, row.parent_id, _json_decoder.decode(row.data_json), row.row_version)
        for node_id, row in snapshot.rows.items()
    }
    return Graph(root_id, snapshot.version, nodes)


def _images(plan: Plan) -> tuple[RowImage, ...]:
    """The row images of an applied plan: its writes, then its deletions. Writes first: a deletion takes
    the node's subtree as it stands, so a node moved out from under a deleted one must have moved first.
    The plan lists every node it removes, so no surviving node is below a deleted one."""
    gone = [RowImage(node_id) for node_id in sorted(plan.deletes)]
    written = [
        RowImage(node_id, parent_id, _json_decoder.decode(data_json), row_version)
        for node_id, (parent_id, data_json, row_version) in plan.upserts.items()
    ]
    return (*written, *gone)
