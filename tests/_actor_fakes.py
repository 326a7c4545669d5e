"""Store wrappers for actor and node tests: a load gate the test controls, and a store that fails."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any

import anyio
import anyio.abc

from graphcache.storage import (
    Change,
    Checkpoint,
    Graph,
    GraphStore,
    MemoryStore,
    Op,
    SlotFilter,
    StoreUnavailable,
)


class WrappedStore:
    """Delegates every ``GraphStore`` method to ``inner`` and counts loads; subclasses change ``load``."""

    def __init__(self, inner: GraphStore) -> None:
        self.inner = inner
        self.loads = 0

    async def create_root(self, root_id: str, data: dict[str, Any]) -> int:
        return await self.inner.create_root(root_id, data)

    async def apply(self, root_id: str, ops: Sequence[Op], *, expected_version: int | None = None) -> int:
        return await self.inner.apply(root_id, ops, expected_version=expected_version)

    async def load(self, root_id: str) -> Graph:
        self.loads += 1
        return await self.inner.load(root_id)

    async def version(self, root_id: str) -> int:
        return await self.inner.version(root_id)

    async def cursor(self) -> int:
        return await self.inner.cursor()

    def changes(self, *, after: int | None = None, slots: SlotFilter | None = None) -> AsyncIterator[Change]:
        return self.inner.changes(after=after, slots=slots)

    async def save_checkpoint(self, name: str, cursor: int, *, slots: Collection[int] | None = None) -> None:
        await self.inner.save_checkpoint(name, cursor, slots=slots)

    async def checkpoints(self) -> list[tuple[str, Checkpoint]]:
        return await self.inner.checkpoints()

    async def load_checkpoint(self, name: str) -> Checkpoint | None:
        return await self.inner.load_checkpoint(name)

    async def root_versions(self, *, after: str | None = None, limit: int = 1000) -> list[tuple[str, int]]:
        return await self.inner.root_versions(after=after, limit=limit)

    async def aclose(self) -> None:
        await self.inner.aclose()


class GatedStore(WrappedStore):
    """``hold(n)``: the next ``n`` loads take their snapshot, then wait until ``release()``.

    Taking the snapshot first makes the held load a slow rebuild of an old version, as in production.
    """

    def __init__(self, inner: GraphStore) -> None:
        super().__init__(inner)
        self.entered = anyio.Event()
        self._gate = anyio.Event()
        self._to_hold = 0

    def hold(self, loads: int = 1) -> None:
        self._gate = anyio.Event()
        self.entered = anyio.Event()
        self._to_hold = loads

    def release(self) -> None:
        self._to_hold = 0
        self._gate.set()

    async def load(self, root_id: str) -> Graph:
        graph = await super().load(root_id)
        if self._to_hold > 0:
            self._to_hold -= 1
            gate = self._gate
            self.entered.set()
            await gate.wait()
        return graph


class BatchStore(WrappedStore):
    """Also offers ``load_many``; records each call's root ids. ``hold()`` makes every later
    ``load_many`` wait until ``release()``; ``fail_next`` makes the next ones raise ``StoreUnavailable``."""

    def __init__(self, inner: MemoryStore) -> None:
        super().__init__(inner)
        self.batches: list[list[str]] = []
        self.entered = anyio.Event()
        self.fail_next = 0
        self._gate: anyio.Event | None = None
        self._many = inner

    def hold(self) -> None:
        self._gate = anyio.Event()
        self.entered = anyio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
        self._gate = None

    async def load_many(self, root_ids: Sequence[str]) -> dict[str, Graph]:
        self.batches.append(list(root_ids))
        if self.fail_next > 0:
            self.fail_next -= 1
            raise StoreUnavailable("injected failure")
        graphs = await self._many.load_many(root_ids)
        if (gate := self._gate) is not None:
            self.entered.set()
            await gate.wait()
        return graphs


class FlakyStore(WrappedStore):
    """The first ``failures`` loads raise ``StoreUnavailable``; later ones work."""

    def __init__(self, inner: GraphStore, failures: int) -> None:
        super().__init__(inner)
        self.failures_left = failures

    async def load(self, root_id: str) -> Graph:
        self.loads += 1
        if self.failures_left > 0:
            self.failures_left -= 1
            raise StoreUnavailable("injected failure")
        return await self.inner.load(root_id)


class ManualMembership:
    """A ``Membership`` whose view the test sets with ``publish``."""

    def __init__(self, view: set[str]) -> None:
        self._view = frozenset(view)
        self._changed = anyio.Event()

    async def run(
        self, node_id: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await anyio.sleep_forever()

    def members(self) -> frozenset[str]:
        return self._view

    async def views(self) -> AsyncIterator[frozenset[str]]:
        seen: frozenset[str] | None = None
        while True:
            view, changed = self._view, self._changed
            if view != seen:
                seen = view
                yield view
            await changed.wait()

    def publish(self, view: set[str]) -> None:
        self._view = frozenset(view)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


class BrokenFeedStore(WrappedStore):
    """Its first feed raises ``StoreUnavailable`` after ``good`` changes; later feeds work. Records each
    ``after`` the feed was opened with."""

    def __init__(self, inner: GraphStore, good: int) -> None:
        super().__init__(inner)
        self.good = good
        self.opened_after: list[int | None] = []
        self.reopened = anyio.Event()

    def changes(self, *, after: int | None = None, slots: SlotFilter | None = None) -> AsyncIterator[Change]:
        self.opened_after.append(after)
        if len(self.opened_after) == 2:
            self.reopened.set()
        feed = self.inner.changes(after=after, slots=slots)
        return self._break(feed) if len(self.opened_after) == 1 else feed

    async def _break(self, feed: AsyncIterator[Change]) -> AsyncIterator[Change]:
        try:
            for _ in range(self.good):
                yield await anext(feed)
            raise StoreUnavailable("injected feed failure")
        finally:
            await feed.aclose()  # type: ignore[attr-defined]


class CursorStore(WrappedStore):
    """A store that offers ``cursor()`` (as PostgresStore does) and runs ``on_cursor`` inside it."""

    def __init__(self, inner: GraphStore, cursor: int, on_cursor: Callable[[], Awaitable[None]]) -> None:
        super().__init__(inner)
        self._cursor = cursor
        self._on_cursor = on_cursor

    async def cursor(self) -> int:
        await self._on_cursor()
        return self._cursor


class BogusChangeStore(WrappedStore):
    """Its feed delivers ``bogus`` first (a change no real root has), then the real changes."""

    def __init__(self, inner: GraphStore, bogus: Change) -> None:
        super().__init__(inner)
        self.bogus = bogus

    def changes(self, *, after: int | None = None, slots: SlotFilter | None = None) -> AsyncIterator[Change]:
        return self._prepend(self.inner.changes(after=after))

    async def _prepend(self, feed: AsyncIterator[Change]) -> AsyncIterator[Change]:
        try:
            yield self.bogus
            async for change in feed:
                yield change
        finally:
            await feed.aclose()  # type: ignore[attr-defined]
