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

Leases. Before a batch loads, the rebuilder holds a lease (the key's incarnation) for each of its roots,
taken in one pipelined ``lease_many`` for the roots it holds none for; every put carries it. A lease taken
before a load stays good for any later load, so a root keeps its lease from one rebuild to the next and a
rebuild costs no extra round trip. If the cache lost the key meanwhile (a restart without persistence, an
eviction), the put is refused: the graph was loaded before the loss and may be older than what readers
saw. A refused put is then checked with a fresh lease: if the key's incarnation changed, the root is
loaded again under the new lease and put again, and counted in ``recreated``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import msgspec

from ..cache import CacheUnavailable, VersionedCache
from ..storage import Graph, GraphStore, RootNotFound
from ._keys import graph_key
from ._options import Count, Seconds, convert_options
from ._stats import Counters

__all__ = ("DEFAULT_MAX_BATCH", "DEFAULT_MAX_FLUSHES", "Rebuilder")

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64
"""Roots per batch at most: one ``load_many`` statement and one Redis pipeline."""

DEFAULT_MAX_FLUSHES = 2
"""Batches in flight at once; further rebuilds wait in the open batch."""

DEFAULT_REMEMBER_LEASES = 100_000
"""Roots whose lease a rebuilder keeps (oldest forgotten first; a forgotten one is leased again)."""

_RELOADS = 3
"""Loads of one root in one flush when its key keeps being recreated under it."""

LoadMany = Callable[[Sequence[str]], Awaitable[dict[str, Graph]]]
OnStored = Callable[[str, int], None]
"""``on_stored(root_id, version)``: the cache acknowledged storing that root's graph at that version."""


class _Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_batch: Count
    max_flushes: Count
    remember_leases: Count
    ttl: Seconds | None


class _Batch:
    __slots__ = ("basis", "done", "error", "errors", "given", "leases", "results", "root_ids")

    def __init__(self) -> None:
        self.root_ids: list[str] = []
        self.given: dict[str, Graph] = {}  # graphs patched by their actors: put without a load
        self.basis: dict[str, int] = {}  # the lease each patched graph's base snapshot was loaded under
        self.leases: dict[str, int] = {}  # the lease each root's result was put (and loaded) under
        self.done = anyio.Event()
        self.results: dict[str, tuple[Graph, bool]] = {}
        self.errors: dict[str, Exception] = {}
        self.error: Exception | None = None  # one failure for the whole batch


class Rebuilder:
    """``await rebuild(root_id)`` loads the root's graph and puts it if newer: ``(graph, stored)``.

    Concurrent calls share batches (see the module docstring); each call gets its own root's result or
    error (``RootNotFound``, a value the cache refuses), or the error that failed its whole batch. Every
    put carries ``ttl`` (seconds; None: no expiry). A Node shares its ``counters`` with its rebuilder.
    ``on_stored(root_id, version)`` is called right after the cache acknowledged each stored put (a
    measuring hook: it must be quick and must not block).
    """

    def __init__(
        self,
        store: GraphStore,
        cache: VersionedCache,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_flushes: int = DEFAULT_MAX_FLUSHES,
        remember_leases: int = DEFAULT_REMEMBER_LEASES,
        ttl: float | None = None,
        counters: Counters | None = None,
        on_stored: OnStored | None = None,
    ) -> None:
        options = convert_options(
            {
                "max_batch": max_batch,
                "max_flushes": max_flushes,
                "remember_leases": remember_leases,
                "ttl": ttl,
            },
            _Options,
        )
        self._store = store
        self._cache = cache
        self._ttl = options.ttl  # every put carries it (a Node's graph_ttl)
        self._counters = counters if counters is not None else Counters()
        self._on_stored = on_stored
        self._leases: dict[str, int] = {}
        self._remember_leases = options.remember_leases
        self._load_many: LoadMany | None = getattr(store, "load_many", None)
        self._max_batch = options.max_batch
        self._slots = anyio.Semaphore(options.max_flushes)
        self._open: _Batch | None = None

    @property
    def batches(self) -> int:
        """Flushes so far: one load and one put each."""
        return self._counters.rebuild_batches

    @property
    def recreated(self) -> int:
        """Keys found recreated (lost by the cache) under a lease."""
        return self._counters.keys_recreated

    @property
    def ttl(self) -> float | None:
        """Seconds each graph this rebuilder puts lives in the cache (None: no expiry)."""
        return self._ttl

    async def rebuild(self, root_id: str) -> tuple[Graph, bool]:
        """Load ``root_id``'s graph and put it if newer: ``(graph, stored)``."""
        graph, stored, _ = await self.rebuild_leased(root_id)
        return graph, stored

    async def rebuild_leased(
        self, root_id: str, patched: Graph | None = None, basis: int | None = None
    ) -> tuple[Graph, bool, int]:
        """As ``rebuild``, also returning the lease the graph was put (and loaded) under. With
        ``patched`` (a graph its actor computed from the feed's row images on a snapshot loaded under
        lease ``basis``), put that one without a load, unless the key's lease is no longer ``basis``
        (the cache lost the key since: a put under a newer lease only proves nothing was lost since
        *that* lease, and the patched graph may be older than what readers saw before the loss): then
        the graph is loaded anew. Returns the graph put (``patched`` itself, or the loaded one)."""
        while True:
            batch = self._open
            lead = batch is None or root_id in batch.root_ids  # a root twice in one batch: start another
            if lead:
                batch = self._open = _Batch()
            assert batch is not None
            batch.root_ids.append(root_id)
            if patched is not None and basis is not None:
                batch.given[root_id] = patched
                batch.basis[root_id] = basis
            if len(batch.root_ids) >= self._max_batch:
                self._open = None
            if lead:
                await self._lead(batch)
            else:
                await batch.done.wait()
            if (result := batch.results.get(root_id)) is not None:
                return (*result, batch.leases[root_id])
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

    def note_stored(self, root_id: str, version: int) -> None:
        """Tell ``on_stored`` that the cache stored ``root_id``'s graph at ``version`` (the rebuilder's
        own puts, and a node's read-through puts)."""
        if self._on_stored is None:
            return
        try:
            self._on_stored(root_id, version)
        except Exception:  # broad on purpose: a listener's bug must not fail a put the cache stored
            logger.exception("on_stored(%r, %d) failed", root_id, version)

    async def forget(self, root_id: str, version: int) -> None:
        """Remove ``root_id``'s cached graph and refuse every later put at ``version`` or below (its row
        was deleted at ``version``); the floor lasts the cache's default invalidation ttl."""
        await self._cache.invalidate(graph_key(root_id), version)

    # -- leases ----------------------------------------------------------------------------------------

    async def lease(self, root_id: str) -> int:
        """The lease this rebuilder holds for ``root_id``'s key, taken now if it holds none."""
        lease = self._leases.get(root_id)
        if lease is None:
            lease = await self._cache.lease(graph_key(root_id))
            self._keep_lease(root_id, lease)
        return lease

    async def recreated_since(self, root_id: str, lease: int) -> bool:
        """After a refused put: whether the key's incarnation is no longer ``lease`` (now leased anew)."""
        return bool(await self._relapsed([root_id], {root_id: lease}))

    def _keep_lease(self, root_id: str, lease: int) -> None:
        self._leases.pop(root_id, None)
        self._leases[root_id] = lease
        while len(self._leases) > self._remember_leases:
            del self._leases[next(iter(self._leases))]

    async def _take_leases(self, root_ids: Sequence[str]) -> dict[str, int]:
        """The lease of each root: the one held, or (for all the others at once) a new one."""
        missing = [root_id for root_id in root_ids if root_id not in self._leases]
        if missing:
            taken = await self._cache.lease_many([graph_key(root_id) for root_id in missing])
            for root_id, lease in zip(missing, taken, strict=True):
                self._keep_lease(root_id, lease)
        return {root_id: self._leases[root_id] for root_id in root_ids}

    async def _relapsed(self, root_ids: Sequence[str], used: dict[str, int]) -> list[str]:
        """Of roots whose leased put was refused, those whose key was recreated since (leased anew)."""
        if not root_ids:
            return []
        current = await self._cache.lease_many([graph_key(root_id) for root_id in root_ids])
        recreated = []
        for root_id, lease in zip(root_ids, current, strict=True):
            self._keep_lease(root_id, lease)
            if lease != used[root_id]:
                recreated.append(root_id)
        self._counters.keys_recreated += len(recreated)
        return recreated

    # -- one flush ---------------------------------------------------------------------------------------

    async def _flush(self, batch: _Batch) -> None:
        self._counters.rebuild_batches += 1
        pending: list[str] = list(batch.root_ids)
        try:
            for _ in range(_RELOADS):
                leases = await self._take_leases(pending)  # before the load: see the module docstring
                for root_id in pending:  # a patched graph stands on its snapshot's lease, or is loaded
                    if root_id in batch.given and batch.basis[root_id] != leases[root_id]:
                        del batch.given[root_id]
                to_load = [root_id for root_id in pending if root_id not in batch.given]
                graphs = await self._load(batch, to_load) if to_load else []
                graphs += [batch.given[root_id] for root_id in pending if root_id in batch.given]
                stored = await self._put(batch, graphs, leases)
                for graph, was_stored in zip(graphs, stored, strict=True):
                    if was_stored:
                        self.note_stored(graph.root_id, graph.version)
                refused = [
                    g.root_id
                    for g, ok in zip(graphs, stored, strict=True)
                    if not ok and g.root_id not in batch.errors
                ]
                pending = await self._relapsed(refused, leases)
                for root_id in pending:  # the key was lost: load it, never put the patched graph
                    batch.given.pop(root_id, None)
                for graph, was_stored in zip(graphs, stored, strict=True):
                    if graph.root_id not in batch.errors and graph.root_id not in pending:
                        batch.results[graph.root_id] = (graph, was_stored)
                        batch.leases[graph.root_id] = leases[graph.root_id]
                if not pending:
                    return
        except Exception as exc:  # broad on purpose: every actor of the batch gets it and decides
            batch.error = exc
            return
        for root_id in pending:
            batch.errors[root_id] = CacheUnavailable(f"the cache lost the key of {root_id!r} at every put")

    async def _load(self, batch: _Batch, root_ids: list[str]) -> list[Graph]:
        self._counters.snapshot_loads += len(root_ids)
        if self._load_many is not None:
            found = await self._load_many(root_ids)
        else:
            found = await self._load_each(batch, root_ids)
        missing = [r for r in root_ids if r not in found and r not in batch.errors]
        if missing and self._load_many is not None:
            # Rare: ask each missing root on its own, for the store's precise error (a deleted root's
            # RootNotFound carries the version its deletion committed) or a graph committed meanwhile.
            found.update(await self._load_each(batch, missing))
        for root_id in missing:
            if root_id not in found and root_id not in batch.errors:
                batch.errors[root_id] = RootNotFound(f"root {root_id!r} not found")
        return [found[root_id] for root_id in root_ids if root_id in found]

    async def _load_each(self, batch: _Batch, root_ids: list[str]) -> dict[str, Graph]:
        found: dict[str, Graph] = {}

        async def one(root_id: str) -> None:
            try:
                found[root_id] = await self._store.load(root_id)
            except Exception as exc:  # broad on purpose: that root's actor gets it
                batch.errors[root_id] = exc

        if len(root_ids) == 1:
            await one(root_ids[0])
        else:
            async with anyio.create_task_group() as tg:
                for root_id in root_ids:
                    tg.start_soon(one, root_id)
        return found

    async def _put(self, batch: _Batch, graphs: list[Graph], leases: dict[str, int]) -> list[bool]:
        items: list[tuple[str, Any, int, int | None]] = [
            (graph_key(g.root_id), g, g.version, leases[g.root_id]) for g in graphs
        ]
        if not items:
            return []
        try:
            return await self._cache.put_many_if_newer(items, ttl=self._ttl)
        except ValueError:  # one graph the cache refuses (too large, say): nothing was written
            if len(items) == 1:
                raise
        stored = []
        for key, graph, version, lease in items:  # one by one, so only the refused graph's actor sees it
            try:
                stored.append(await self._cache.put_if_newer(key, graph, version, ttl=self._ttl, lease=lease))
            except ValueError as exc:
                batch.errors[graph.root_id] = exc
                stored.append(False)
        return stored
