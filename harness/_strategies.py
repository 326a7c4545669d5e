"""Re-cache strategies the load test compares, each given the same committed writes.

After each committed update a writer calls ``after_write``; the strategy maintains the cached graph its
own way, counts what it did in a ``Tally`` (snapshot loads, puts) and returns the version of the graph
the cache acknowledged storing, if it stored one (the writer records that acknowledgement in its
history: the checker's visibility lag runs from a commit to the first stored put of it or a newer one):

  actor     graphcache: nothing here; the Nodes rebuild from the change feed (their counters are read
            from the Nodes' statistics)
  cas       load one snapshot, ``put_if_newer`` (a refused put is counted, it is not an error)
  naive     read the root version, then the children, then blind-set the pair: the race in the wild
  checkset  naive, then re-read the version and cache only if unchanged (the usual workaround)
  lock      a cache lock around load and set (``get_and_lock`` / ``put_and_unlock``)
  none      no cache maintenance at all: the throughput ceiling (readers see nothing)
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

import anyio

from ..actors import graph_key
from ..cache import LockHandle, LockLost, ObjectLocked, VersionedCache
from ..storage import Graph, GraphStore

__all__ = ("NAMES", "STRATEGIES", "Strategy", "Tally")


@dataclass
class Tally:
    """What one process's writers (or a run's nodes) did: committed updates, rebuilds (writers: loads done
    for caching; nodes: their rebuilds, one put each), cache writes (puts) and the refused ones among them
    (or rebuilds given up before a write), failures, and store snapshot loads done for caching."""

    updates: int = 0
    rebuilds: int = 0
    refused: int = 0
    failures: int = 0
    puts: int = 0
    loads: int = 0

    def add(self, other: Tally) -> None:
        self.updates += other.updates
        self.rebuilds += other.rebuilds
        self.refused += other.refused
        self.failures += other.failures
        self.puts += other.puts
        self.loads += other.loads

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Strategy(Protocol):
    name: ClassVar[str]

    async def after_write(
        self, store: GraphStore, cache: VersionedCache, root_id: str, version: int, tally: Tally
    ) -> int | None:
        """Maintain the cache after the commit of ``version``; the version of the graph the cache stored
        (acknowledged), or None if this call stored nothing."""
        ...


class NoCache:
    """The writer only commits and nobody maintains the cache: the throughput ceiling."""

    name: ClassVar[str] = "none"

    async def after_write(
        self, store: GraphStore, cache: VersionedCache, root_id: str, version: int, tally: Tally
    ) -> int | None:
        return None


class ActorFeed(NoCache):
    """The writer only commits, as with ``none``; the Nodes' actors see the change on the feed and rebuild."""

    name: ClassVar[str] = "actor"


class CompareAndSet:
    name: ClassVar[str] = "cas"

    async def after_write(
        self, store: GraphStore, cache: VersionedCache, root_id: str, version: int, tally: Tally
    ) -> int | None:
        graph = await store.load(root_id)
        tally.loads += 1
        tally.rebuilds += 1
        tally.puts += 1
        if not await cache.put_if_newer(graph_key(root_id), graph, graph.version):
            tally.refused += 1
            return None
        return graph.version


class Naive:
    name: ClassVar[str] = "naive"

    async def after_write(
        self, store: GraphStore, cache: VersionedCache, root_id: str, version: int, tally: Tally
    ) -> int | None:
        read_version = await store.version(root_id)
        nodes = (await store.load(root_id)).nodes
        tally.loads += 1
        tally.rebuilds += 1
        tally.puts += 1
        await cache.insert(graph_key(root_id), Graph(root_id, read_version, nodes))
        return read_version


class CheckThenSet:
    name: ClassVar[str] = "checkset"

    async def after_write(
        self, store: GraphStore, cache: VersionedCache, root_id: str, version: int, tally: Tally
    ) -> int | None:
        read_version = await store.version(root_id)
        nodes = (await store.load(root_id)).nodes
        tally.loads += 1
        tally.rebuilds += 1
        if await store.version(root_id) != read_version:
            tally.refused += 1
            return None
        tally.puts += 1
        await cache.insert(graph_key(root_id), Graph(root_id, read_version, nodes))
        return read_version


class Locked:
    """Rebuild under a cache lock; a writer that cannot get it within ``wait`` leaves it to the holder."""

    name: ClassVar[str] = "lock"
    lock_timeout: ClassVar[float] = 2.0
    wait: ClassVar[float] = 1.0

    async def after_write(
        self, store: GraphStore, cache: VersionedCache, root_id: str, version: int, tally: Tally
    ) -> int | None:
        key = graph_key(root_id)
        try:
            _, lock = await cache.get_and_lock(key, lock_timeout=self.lock_timeout, wait=self.wait)
        except ObjectLocked:
            tally.refused += 1
            return None
        try:
            graph = await store.load(root_id)
        except BaseException:
            # Release on any failure (cancellation included) so others need not wait for the lock to lapse.
            await _unlock_quietly(cache, key, lock)
            raise
        tally.loads += 1
        tally.rebuilds += 1
        tally.puts += 1
        try:
            await cache.put_and_unlock(key, graph, lock)
        except LockLost:
            tally.refused += 1
            return None
        return graph.version


async def _unlock_quietly(cache: VersionedCache, key: str, lock: LockHandle) -> None:
    with anyio.CancelScope(shield=True), contextlib.suppress(LockLost):
        await cache.unlock(key, lock)


STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (ActorFeed(), CompareAndSet(), Naive(), CheckThenSet(), Locked(), NoCache())
}
NAMES: tuple[str, ...] = tuple(STRATEGIES)
"""Strategy names in ``--compare`` order."""
