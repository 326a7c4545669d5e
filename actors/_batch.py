"""``Rebuilder``: loads and caches graphs for actors, and batches the rebuilds that start together.

A rebuild is one snapshot load and one versioned put. When changes are spread over many roots, each
changed rarely, there is nothing to coalesce, and the per-call cost of a rebuild (a statement, a script
call, two round trips) dominates. One poll of the change feed wakes many actors at once, though. The
rebuilder gathers the rebuilds that start together into one batch, loads it with the store's
``load_many`` (one statement, one round trip) and caches it with one pipelined ``put_many_if_newer``.

This is group commit: the first rebuild of a batch waits one scheduler turn, so the actors woken with it
can join. Then it takes one of ``max_flushes`` flush slots. While every slot is busy, new rebuilds queue
in the open batch and go together when a slot frees up. An idle node adds no delay. A store without
``load_many`` (a test's wrapper, say) gets one ``load`` per root, still concurrently.

Safety does not change: each graph is one snapshot of its root (``load_many`` reads one snapshot of them
all), and each put is the cache's own atomic set-if-newer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from cache import VersionedCache
from storage import Graph, GraphStore, RootNotFound

from ._keys import graph_key
from ._validate import check_count

__all__ = ("DEFAULT_MAX_BATCH", "DEFAULT_MAX_FLUSHES", "Rebuilder")

DEFAULT_MAX_BATCH = 64
"""Roots per batch at most: one ``load_many`` statement and one Redis pipeline."""

DEFAULT_MAX_FLUSHES = 2
"""Batches in flight at once; further rebuilds wait in the open batch."""

LoadMany = Callable[[Sequence[str]], Awaitable[dict[str, Graph]]]


class _Batch:
    __slots__ = ("done", "error", "errors", "results", "root_ids")

    def __init__(self) -> None:
        self.root_ids: list[str] = []
        self.done = anyio.Event()
        self.results: dict[str, tuple[Graph, bool]] = {}
        self.errors: dict[str, Exception] = {}
        self.error: Exception | None = None  # one failure for the whole batch


class Rebuilder:
    """``await rebuild(root_id)`` loads the root's graph and puts it if newer: ``(graph, stored)``.

    Concurrent calls share batches (see the module docstring); each call gets its own root's result or
    error (``RootNotFound``, a value the cache refuses), or the error that failed its whole batch.
    """

    def __init__(
        self,
        store: GraphStore,
        cache: VersionedCache,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_flushes: int = DEFAULT_MAX_FLUSHES,
    ) -> None:
        self._store = store
        self._cache = cache
        self._load_many: LoadMany | None = getattr(store, "load_many", None)
        self._max_batch = check_count(max_batch, name="max_batch")
        self._slots = anyio.Semaphore(check_count(max_flushes, name="max_flushes"))
        self._open: _Batch | None = None
        self.batches = 0  # flushes so far: one load and one put each

    async def rebuild(self, root_id: str) -> tuple[Graph, bool]:
        while True:
            batch = self._open
            lead = batch is None or root_id in batch.root_ids  # a root twice in one batch: start another
            if lead:
                batch = self._open = _Batch()
            assert batch is not None
            batch.root_ids.append(root_id)
            if len(batch.root_ids) >= self._max_batch:
                self._open = None
            if lead:
                await self._lead(batch)
            else:
                await batch.done.wait()
            if (result := batch.results.get(root_id)) is not None:
                return result
            if (error := batch.errors.get(root_id)) is not None:
                raise error
            if batch.error is not None:
                raise batch.error
            # The batch's leader was cancelled before it flushed (its actor stopped): join a new batch.

    async def _lead(self, batch: _Batch) -> None:
        try:
            await anyio.lowlevel.checkpoint()  # the actors woken with this one join meanwhile
            async with self._slots:
                if self._open is batch:
                    self._open = None
                await self._flush(batch)
        finally:
            if self._open is batch:
                self._open = None
            batch.done.set()

    async def _flush(self, batch: _Batch) -> None:
        self.batches += 1
        try:
            graphs = await self._load(batch)
            stored = await self._put(batch, graphs)
        except Exception as exc:  # broad on purpose: every actor of the batch gets it and decides
            batch.error = exc
            return
        for graph, was_stored in zip(graphs, stored, strict=True):
            if graph.root_id not in batch.errors:
                batch.results[graph.root_id] = (graph, was_stored)

    async def _load(self, batch: _Batch) -> list[Graph]:
        root_ids = batch.root_ids
        if self._load_many is not None:
            found = await self._load_many(root_ids)
        else:
            found = await self._load_each(batch)
        for root_id in root_ids:
            if root_id not in found and root_id not in batch.errors:
                batch.errors[root_id] = RootNotFound(f"root {root_id!r} not found")
        return [found[root_id] for root_id in root_ids if root_id in found]

    async def _load_each(self, batch: _Batch) -> dict[str, Graph]:
        found: dict[str, Graph] = {}

        async def one(root_id: str) -> None:
            try:
                found[root_id] = await self._store.load(root_id)
            except Exception as exc:  # broad on purpose: that root's actor gets it
                batch.errors[root_id] = exc

        if len(batch.root_ids) == 1:
            await one(batch.root_ids[0])
        else:
            async with anyio.create_task_group() as tg:
                for root_id in batch.root_ids:
                    tg.start_soon(one, root_id)
        return found

    async def _put(self, batch: _Batch, graphs: list[Graph]) -> list[bool]:
        items: list[tuple[str, Any, int]] = [(graph_key(g.root_id), g, g.version) for g in graphs]
        if not items:
            return []
        try:
            return await self._cache.put_many_if_newer(items)
        except ValueError:  # one graph the cache refuses (too large, say): nothing was written
            if len(items) == 1:
                raise
        stored = []
        for graph in graphs:  # put one by one, so only the refused graph's actor sees the error
            try:
                stored.append(await self._cache.put_if_newer(graph_key(graph.root_id), graph, graph.version))
            except ValueError as exc:
                batch.errors[graph.root_id] = exc
                stored.append(False)
        return stored
