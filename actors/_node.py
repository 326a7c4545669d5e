"""``Node``: one process's share of the cluster. It follows the change feed, routes each change it owns
to that root's actor, and serves reads from the cache with a single-flight read-through.

Handing roots over without losing a notification
------------------------------------------------
Ownership comes from a ``Ring`` over the membership's view and changes when the view does. Two rules
make a hand-over lose nothing (duplicates are harmless: actors skip versions they built, and the cache's
versioned put keeps the newest):

* Gaining roots (a member left or died): the node re-reads the feed from a checkpoint taken at least
  ``handoff`` seconds before the view changed. A dead member stops heartbeating at t0 and drops out of
  the view at about t0 + ttl, so with ``handoff`` >= ttl + heartbeat every change the dead member might
  not have cached is read again by its successor. Checkpoints are ``(monotonic time, feed cursor)`` pairs
  taken at most every ``checkpoint_interval`` seconds and pruned beyond ``handoff``; a view change within
  ``handoff`` of start-up re-reads the feed from ``feed_after`` (0, the oldest retained change, when not
  given).
* Losing roots (a member joined): the node keeps serving the roots it owned under the previous view for
  ``handoff`` seconds more, so the joiner (which joins before it follows the feed) overlaps with it.

Durable progress: after any outage
----------------------------------
Hand-over covers a member that dies while others run. It cannot cover a node that was down while commits
continued (a restart, a redeploy of every node) nor a cache that lost its state. Two mechanisms bound
convergence (G3) after those:

* A durable checkpoint. Every ``checkpoint_save_interval`` seconds the node saves, in the store under its
  ``node_id``, the feed cursor of the last change it routed. A node started with the same ``node_id``
  resumes the feed there (if the store still keeps the changes since: the checkpoint is ``resumable``),
  so what was committed while it was down reaches its actors at once.
* The reconcile sweep, at start-up and every ``sweep_interval`` seconds: the committed versions of the
  roots this node owns (paged, ``root_versions``) against their cached versions (batched,
  ``versions``); each root cached at an older version is rebuilt. Its result is a live consistency figure
  (``statistics().roots_behind``, ``/metrics``). A root absent from the cache is consistent (a reader's
  miss reads it through), and is not rebuilt.

No failure of the store, the cache or the membership ends the node (G6): the feed, the sweep and the
checkpoint retry with the node's one ``RetryPolicy``, and ``problems()`` says what is failing meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
from tenacity import AsyncRetrying, RetryCallState

from ..cache import CacheError, VersionedCache
from ..storage import SLOTS, Change, Checkpoint, Graph, GraphStore, Op
from ._actor import RootActor
from ._batch import OnStored, Rebuilder
from ._errors import ActorDead, InvalidArgument, NodeNotRunning, ReadTimeout, VersionNotReached
from ._keys import graph_key
from ._membership import Membership, StaticMembership
from ._messages import Changed, Message, Refresh, Stop
from ._options import (
    DEFAULT_MAX_LIVE_GRAPH_BYTES,
    DEFAULT_MIN_REBUILD_INTERVAL,
    DEFAULT_SWEEP_INTERVAL,
    Consistency,
    NodeOptions,
)
from ._retry import RetryPolicy, is_transient
from ._ring import Ring
from ._stats import Counters, NodeStatistics
from ._validate import check_root_id, check_seconds, check_version

__all__ = ("DEFAULT_SWEEP_INTERVAL", "Consistency", "Node")

logger = logging.getLogger(__name__)

_SWEEP_PAGE = 1000
"""Roots per page of a sweep: one store query and one pipelined cache read each."""
_FINAL_SAVE_TIMEOUT = 2.0


class _Flight:
    """One read-through load that any number of readers of the same root wait on."""

    __slots__ = ("done", "error", "graph", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.done = anyio.Event()
        self.graph: Graph | None = None
        self.error: BaseException | None = None


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[Any]) -> AsyncIterator[AsyncIterator[Any]]:
    """Close an async iterator (a feed, a views generator) however the block ends."""
    try:
        yield iterator
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()


class Node:
    """A member of the cache cluster; use it as ``async with Node(store=..., cache=..., node_id=...)``.

    ``membership`` gives the view the ring is built on (default: this node alone). ``consistency``:
    "bounded" serves the previous graph until a rebuild lands; "strict" invalidates older versions as
    soon as a newer one is notified (one cache round trip per new version, in the feed's order).
    ``idle_timeout``, ``mailbox_size``, ``retry_initial``, ``retry_max``, ``min_rebuild_interval`` and
    ``max_live_graph_bytes`` configure the actors (the retry settings also pace the feed's reconnects);
    ``remember_roots`` bounds how many passivated roots' built versions are kept. ``handoff`` (seconds; at
    least the membership ttl plus a heartbeat) and ``checkpoint_interval`` drive the hand-over described
    in the module docstring; ``feed_after`` starts the feed after that cursor instead of "now". Leaving
    ``async with`` gives in-flight rebuilds up to ``shutdown_timeout`` seconds. ``sweep_interval`` and
    ``checkpoint_save_interval`` pace the durable progress described in the module docstring. Every graph
    the node caches (rebuilds and read-throughs) expires after ``graph_ttl`` seconds (None: never).
    ``on_stored(root_id, version)`` is called right after the cache acknowledged each graph this node
    stored, rebuilt or read through (a measuring hook: quick, never blocking; the load test records it).

    The options are checked once, together (``NodeOptions``); a bad one is ``InvalidArgument`` naming it.
    ``Node.from_options`` builds a node from options checked beforehand.
    """

    def __init__(
        self,
        *,
        store: GraphStore,
        cache: VersionedCache,
        node_id: str,
        membership: Membership | None = None,
        consistency: Consistency = "bounded",
        idle_timeout: float = 30.0,
        mailbox_size: int = 16,
        handoff: float = 10.0,
        feed_after: int | None = None,
        remember_roots: int = 100_000,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
        shutdown_timeout: float = 5.0,
        checkpoint_interval: float = 0.5,
        min_rebuild_interval: float = DEFAULT_MIN_REBUILD_INTERVAL,
        max_live_graph_bytes: int = DEFAULT_MAX_LIVE_GRAPH_BYTES,
        sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
        checkpoint_save_interval: float = 1.0,
        graph_ttl: float | None = None,
        on_stored: OnStored | None = None,
    ) -> None:
        options = NodeOptions.create(
            node_id=node_id,
            consistency=consistency,
            idle_timeout=idle_timeout,
            mailbox_size=mailbox_size,
            handoff=handoff,
            feed_after=feed_after,
            remember_roots=remember_roots,
            retry_initial=retry_initial,
            retry_max=retry_max,
            shutdown_timeout=shutdown_timeout,
            checkpoint_interval=checkpoint_interval,
            min_rebuild_interval=min_rebuild_interval,
            max_live_graph_bytes=max_live_graph_bytes,
            sweep_interval=sweep_interval,
            checkpoint_save_interval=checkpoint_save_interval,
            graph_ttl=graph_ttl,
        )
        self._setup(options, store, cache, membership, on_stored)

    @classmethod
    def from_options(
        cls,
        options: NodeOptions,
        *,
        store: GraphStore,
        cache: VersionedCache,
        membership: Membership | None = None,
        on_stored: OnStored | None = None,
    ) -> Self:
        """A node configured by ``options`` as they are (already checked: ``NodeOptions.create``)."""
        node = cls.__new__(cls)  # __init__ would take the options apart and check them again
        node._setup(options, store, cache, membership, on_stored)
        return node

    def _setup(
        self,
        options: NodeOptions,
        store: GraphStore,
        cache: VersionedCache,
        membership: Membership | None,
        on_stored: OnStored | None = None,
    ) -> None:
        self._options = options
        self.node_id = options.node_id
        self._store = store
        self._cache = cache
        self._membership: Membership = (
            membership if membership is not None else StaticMembership([self.node_id])
        )
        self._strict = options.consistency == "strict"
        self._retry = RetryPolicy(options.actor.retry_initial, options.actor.retry_max)
        self._counters = Counters()
        self._rebuilder = Rebuilder(
            store, cache, ttl=options.graph_ttl, counters=self._counters, on_stored=on_stored
        )
        self._actors: dict[str, RootActor] = {}
        self._remembered: dict[str, int] = {}  # built version of passivated roots (oldest first)
        self._flights: dict[str, _Flight] = {}
        self._flight_seq = 0
        self._members: frozenset[str] = frozenset()
        self._ring = Ring([self.node_id])
        self._previous_ring: Ring | None = None
        self._owned: dict[str, bool] = {}  # the ring's answers, cached: a lookup hashes the root id
        self._owned_before: dict[str, bool] = {}  # the same for the previous ring
        self._previous_until = 0.0
        self._checkpoints: deque[tuple[float, int]] = deque()
        self._rewind_to: int | None = None
        self._pass_scope: anyio.CancelScope | None = None
        self._background: list[anyio.CancelScope] = []  # the feed follower's and the view watcher's
        self._actors_gone = anyio.Event()
        self._work: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._running = False
        self._feed: AsyncIterator[Change] | None = None
        self._feed_rows_before = 0  # rows read by the feeds this node closed
        self._slot_filter: frozenset[int] | None = None  # the slots the feed reads (None: all)
        self._slot_filter_ring: tuple[Ring, Ring | None] | None = None  # the rings it was made for
        self._slot_filter_until = 0.0  # when the previous ring's slots drop out of it
        self._feed_started = False
        self._feed_failure: str | None = None  # the feed's last error, until it delivers again
        self._routed_cursor: int | None = None  # cursor of the last change routed
        self._saved_cursor: int | None = None  # the durable checkpoint's cursor
        self._resumed_from: int | None = None

    @property
    def options(self) -> NodeOptions:
        """The node's options, as checked when it was built."""
        return self._options

    @property
    def store(self) -> GraphStore:
        """The source of truth this node reads and writes."""
        return self._store

    @property
    def cache(self) -> VersionedCache:
        """The cache this node keeps graphs in (under ``graph_key(root_id)``)."""
        return self._cache

    @property
    def membership(self) -> Membership:
        """Where this node's view of the cluster comes from."""
        return self._membership

    # -- life cycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError(f"{self!r} is already running")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._start(stack)
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        service = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(service.cancel_scope.cancel)  # leaves the membership last, after the actors
        await service.start(self._membership.run, self.node_id)
        stack.callback(self._close_leftover_actors)  # runs after the work task group has ended
        self._work = await stack.enter_async_context(anyio.create_task_group())
        stack.push_async_callback(self._wind_down)  # runs first: stop intake, let rebuilds finish
        self._apply_view(self._membership.members())
        self._running = True
        await self._work.start(self._watch_views)
        await self._work.start(self._follow_feed)
        await self._work.start(self._save_checkpoints)
        await self._work.start(self._sweep_forever)
        logger.info("node %s started: %r", self.node_id, self)

    async def _wind_down(self) -> None:
        """Stop taking work, let in-flight rebuilds finish (up to ``shutdown_timeout``), then cancel."""
        self._running = False
        for scope in self._background:
            scope.cancel()
        for actor in list(self._actors.values()):
            _tell_quietly(actor, Stop())
        with anyio.move_on_after(self._options.shutdown_timeout, shield=True):
            while self._actors:
                await self._actors_gone.wait()
        if self._actors:
            logger.warning("node %s: abandoning %d rebuilds at shutdown", self.node_id, len(self._actors))
        with anyio.move_on_after(_FINAL_SAVE_TIMEOUT, shield=True):
            await self._save_checkpoint()
        if self._work is not None:
            self._work.cancel_scope.cancel()

    def _close_leftover_actors(self) -> None:
        """Close actors whose task was cancelled before it ever ran (their mailbox would leak)."""
        for actor in self._actors.values():
            actor.close()
        self._actors.clear()
        logger.info("node %s stopped: %r", self.node_id, self)

    def _task_group(self) -> anyio.abc.TaskGroup:
        if not self._running or self._work is None:
            raise NodeNotRunning(f"node {self.node_id!r} is not running: use it inside 'async with'")
        return self._work

    # -- the public API ------------------------------------------------------------------------------

    def owns(self, root_id: str) -> bool:
        """Whether this node rebuilds ``root_id`` (its ring says so, or did until ``handoff`` ago)."""
        if _owns(self._ring, self._owned, self.node_id, root_id):
            return True
        previous = self._previous_ring
        return (
            previous is not None
            and time.monotonic() < self._previous_until
            and _owns(previous, self._owned_before, self.node_id, root_id)
        )

    async def get(
        self,
        root_id: str,
        *,
        min_version: int | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (DESIGN.md names it; ReadTimeout says which read)
    ) -> Graph:
        """The cached graph of ``root_id``, else read through (one load for concurrent misses).

        With ``min_version`` a cached graph older than it is a miss, and the result is never older;
        ``VersionNotReached`` if the store itself is older. ``ReadTimeout`` after ``timeout`` seconds.
        """
        root_id = check_root_id(root_id)
        floor = 0 if min_version is None else check_version(min_version, name="min_version")
        seconds = check_seconds(timeout, name="timeout")
        self._task_group()
        self._counters.reads += 1
        with anyio.move_on_after(seconds):
            return await self._get(root_id, floor)
        raise ReadTimeout(f"read of {root_id!r} did not finish within {seconds}s") from None

    async def apply(self, root_id: str, ops: Sequence[Op], *, expected_version: int | None = None) -> int:
        """Commit ``ops`` to the store, then nudge this node's actor if it owns the root (unless it keeps
        the graph to patch: the feed brings the change with its row images in a moment, and a nudge
        without them would cost a snapshot load)."""
        root_id = check_root_id(root_id)
        self._task_group()
        version = await self._store.apply(root_id, ops, expected_version=expected_version)
        if self.owns(root_id) and self._running:
            actor = self.actor(root_id)
            if actor is None or not actor.patching:
                await self._notify(root_id, Changed(root_id, version, time.time()))
            else:
                await self._strict_floor(root_id, version)
        return version

    def refresh(self, root_id: str) -> None:
        """Ask this node's actor of ``root_id`` to rebuild it from the store now."""
        root_id = check_root_id(root_id)
        self._task_group()
        self._tell(root_id, Refresh(root_id))

    def actor(self, root_id: str) -> RootActor | None:
        """The live actor of ``root_id`` on this node, if there is one."""
        actor = self._actors.get(root_id)
        return actor if actor is not None and actor.alive else None

    def statistics(self) -> NodeStatistics:
        actors = [a.statistics() for a in self._actors.values() if a.alive]
        c = self._counters
        return NodeStatistics(
            node_id=self.node_id,
            members=len(self._members),
            actors_alive=len(actors),
            actors_failing=sum(1 for a in actors if a.failing),
            mailbox_depth=sum(a.mailbox_depth for a in actors),
            notifications=c.notifications,
            ignored=c.ignored,
            coalesced=c.coalesced,
            rebuilds=c.rebuilds,
            rebuild_batches=c.rebuild_batches,
            puts_stored=c.puts_stored,
            puts_refused=c.puts_refused,
            failures=c.failures,
            reads=c.reads,
            read_hits=c.read_hits,
            read_loads=c.read_loads,
            rewinds=c.rewinds,
            lag=c.lag.snapshot(),
            rebuild_seconds=c.rebuild_seconds.snapshot(),
            poisoned=c.poisoned + _cache_poisoned(self._cache),
            keys_recreated=c.keys_recreated,
            snapshot_loads=c.snapshot_loads,
            patched=c.patched,
            roots_forgotten=c.roots_forgotten,
            sweeps=c.sweeps,
            sweep_failures=c.sweep_failures,
            roots_owned=c.roots_owned,
            roots_behind=c.roots_behind,
            roots_uncached=c.roots_uncached,
            feed_failing=self._feed_failure is not None or _feed_failing(self._feed),
            feed_rows=self._feed_rows_before + _feed_rows(self._feed),
            checkpoint=self._saved_cursor,
            resumed_from=self._resumed_from,
        )

    def problems(self) -> list[str]:
        """What keeps this node from being ready (empty: ready): a feed not following, heartbeats that do
        not reach Redis, a failing sweep. The node retries each by itself; this only reports."""
        found = []
        if not self._running:
            found.append("node: not running")
        if not self._feed_started:
            found.append("change feed: not started yet")
        elif self._feed_failure is not None:
            found.append(f"change feed: failing ({self._feed_failure})")
        elif _feed_failing(self._feed):
            found.append("change feed: the store does not answer its polls")
        membership = getattr(self._membership, "statistics", None)
        if membership is not None and not membership().connected:
            found.append("membership: heartbeats do not reach Redis")
        if self._counters.sweep_failing is not None:
            found.append(f"reconcile sweep: failing ({self._counters.sweep_failing})")
        return found

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        consistency = "strict" if self._strict else "bounded"
        c = self._counters
        return (
            f"<Node {self.node_id!r} {state} {consistency} [members: {len(self._members)} | "
            f"actors: {sum(1 for a in self._actors.values() if a.alive)} | "
            f"notifications: {c.notifications}, coalesced: {c.coalesced}, rebuilds: {c.rebuilds}]>"
        )

    # -- reads ---------------------------------------------------------------------------------------

    async def _get(self, root_id: str, floor: int) -> Graph:
        # Only a load that starts after this call may answer it: it then sees every version committed
        # before the call, so it is never older than anything a reader saw before (G1), nor than a
        # write acknowledged before (strict mode, G5). Concurrent misses still share one load.
        ticket = self._flight_seq
        cached = await self._cached(root_id, floor)
        if cached is not None:
            self._counters.read_hits += 1
            return cached
        graph = await self._join(root_id, after=ticket)
        if graph.version < floor:
            raise VersionNotReached(root_id, floor, graph.version)
        return graph

    async def _cached(self, root_id: str, floor: int) -> Graph | None:
        key = graph_key(root_id)
        try:
            item = await self._cache.get(key, type=Graph)
        except ValueError:  # well-formed msgpack that is not a Graph: a malformed entry
            await self._discard_poisoned(root_id, None, "its value is not a graph")
            return None
        except CacheError as exc:
            logger.warning("cache read of %r failed, reading the store: %r", root_id, exc)
            return None
        if item is None:
            return None
        graph: Graph = item.value
        if graph.root_id != root_id or graph.version != item.version:
            why = f"it holds root {graph.root_id!r} at version {graph.version} under version {item.version}"
            await self._discard_poisoned(root_id, item.version, why)
            return None
        if item.version < floor:
            return None
        return graph

    async def _discard_poisoned(self, root_id: str, version: int | None, why: str) -> None:
        """A malformed cached graph is never served: count it and drop it, so the next put replaces it."""
        self._counters.poisoned += 1
        logger.warning(
            "node %s: the cached graph of %r is malformed (%s): removed", self.node_id, root_id, why
        )
        key = graph_key(root_id)
        try:
            if version is None:
                (version,) = await self._cache.versions([key])
            if version is not None:
                await self._cache.discard(key, version)
        except CacheError as exc:
            logger.warning("could not remove the malformed graph of %r: %r", root_id, exc)

    async def _join(self, root_id: str, *, after: int) -> Graph:
        flight = self._flights.get(root_id)
        if flight is None or flight.seq <= after:
            self._flight_seq += 1
            flight = _Flight(self._flight_seq)
            self._flights[root_id] = flight
            self._task_group().start_soon(self._fly, root_id, flight)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.graph is not None
        return flight.graph

    async def _fly(self, root_id: str, flight: _Flight) -> None:
        try:
            flight.graph = await self._read_through(root_id)
        except Exception as exc:  # broad on purpose: every waiter re-raises it
            flight.error = exc
        finally:
            if self._flights.get(root_id) is flight:
                del self._flights[root_id]
            if flight.graph is None and flight.error is None:
                flight.error = NodeNotRunning(f"node {self.node_id!r} stopped during a read of {root_id!r}")
            flight.done.set()

    async def _read_through(self, root_id: str) -> Graph:
        """Load and cache (under a lease taken before the load); if the cache already holds something
        newer, return that instead."""
        key = graph_key(root_id)
        try:
            lease: int | None = await self._rebuilder.lease(root_id)
        except CacheError as exc:
            logger.warning("cache unavailable for %r, serving the store's graph: %r", root_id, exc)
            lease = None
        graph = await self._store.load(root_id)
        self._counters.read_loads += 1
        if lease is None:
            return graph
        try:
            if await self._cache.put_if_newer(
                key, graph, graph.version, ttl=self._options.graph_ttl, lease=lease
            ):
                self._rebuilder.note_stored(root_id, graph.version)
                return graph
            if await self._rebuilder.recreated_since(root_id, lease):
                return graph  # the key was lost since the lease: this graph is still the reader's answer
            item = await self._cache.get(key, type=Graph)
        except (CacheError, ValueError) as exc:
            logger.warning("cache unavailable for %r, serving the store's graph: %r", root_id, exc)
            return graph
        if item is not None and item.version > graph.version:
            cached: Graph = item.value
            if cached.root_id == root_id and cached.version == item.version:  # never serve a malformed one
                return cached
        return graph

    # -- notifications -------------------------------------------------------------------------------

    async def _notify(self, root_id: str, message: Changed) -> None:
        await self._strict_floor(root_id, message.version)
        self._tell(root_id, message)

    async def _strict_floor(self, root_id: str, version: int) -> None:
        """In strict mode, the first notice of ``version`` takes every older graph out of the cache."""
        actor = self._actors.get(root_id)
        known = 0 if actor is None or not actor.alive else max(actor.built, actor.wanted)
        if self._strict and version > max(known, self._remembered.get(root_id, 0)):
            await self._invalidate(root_id, version - 1)

    async def _invalidate(self, root_id: str, version: int) -> None:
        try:
            await self._cache.invalidate(graph_key(root_id), version)
        except CacheError as exc:
            logger.warning("strict invalidation of %r at %d failed: %r", root_id, version, exc)

    def _tell(self, root_id: str, message: Message) -> None:
        actor = self._actors.get(root_id)
        if actor is None or not actor.alive:
            actor = self._spawn(root_id, previous=actor)
        actor.tell(message)

    def _spawn(self, root_id: str, *, previous: RootActor | None) -> RootActor:
        built = self._remembered.pop(root_id, 0)
        if previous is not None:
            built = max(built, previous.built)
        actor = RootActor.from_options(
            root_id,
            self._options.actor,
            store=self._store,
            cache=self._cache,
            counters=self._counters,
            built=built,
            rebuilder=self._rebuilder,
        )
        self._actors[root_id] = actor
        self._task_group().start_soon(self._run_actor, actor, name=f"actor {root_id!r}")
        return actor

    async def _run_actor(self, actor: RootActor) -> None:
        try:
            await actor.run()
        finally:
            actor.close()
            if self._actors.get(actor.root_id) is actor:
                del self._actors[actor.root_id]
                self._remember(actor.root_id, actor.built)
            if not self._actors:
                self._actors_gone.set()
                self._actors_gone = anyio.Event()

    def _remember(self, root_id: str, built: int) -> None:
        limit = self._options.remember_roots
        if limit == 0 or built == 0:
            return
        self._remembered[root_id] = built
        while len(self._remembered) > limit:
            del self._remembered[next(iter(self._remembered))]

    # -- membership ----------------------------------------------------------------------------------

    async def _watch_views(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.CancelScope() as scope:
            self._background.append(scope)
            task_status.started()
            async with _closing(self._membership.views()) as views:
                async for view in views:
                    self._apply_view(view)

    def _apply_view(self, view: frozenset[str]) -> None:
        if not view:
            logger.warning("node %s: empty membership view, owning every root meanwhile", self.node_id)
            view = frozenset([self.node_id])
        if view == self._members:
            return
        lost = self._members - view
        if self._members:
            self._previous_ring, self._owned_before = self._ring, self._owned
            self._previous_until = time.monotonic() + self._options.handoff
        self._members = view
        self._ring, self._owned = Ring(view), {}
        logger.info("node %s: view %s (gone: %s)", self.node_id, sorted(view), sorted(lost))
        if lost:
            self._request_rewind()

    def _request_rewind(self) -> None:
        cutoff = time.monotonic() - self._options.handoff
        cursor = self._checkpoints[0][1] if self._checkpoints else self._start_cursor()
        for at, checkpoint in self._checkpoints:
            if at > cutoff:
                break
            cursor = checkpoint
        self._rewind_to = cursor if self._rewind_to is None else min(self._rewind_to, cursor)
        if self._routed_cursor is not None:  # a checkpoint saved from now on claims the gained slots too
            self._routed_cursor = min(self._routed_cursor, self._rewind_to)
        if self._pass_scope is not None:
            self._pass_scope.cancel()

    async def _current_cursor(self) -> int:
        """The store's cursor for "now".

        Pinning it before following the feed means no change committed after ``__aenter__`` is missed,
        whenever the feed's first poll happens, and gives the first checkpoint a real cursor.
        """
        return await self._store.cursor()

    def _start_cursor(self) -> int:
        feed_after = self._options.feed_after
        return feed_after if feed_after is not None else 0

    # -- the change feed -----------------------------------------------------------------------------

    async def _follow_feed(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the feed until the node stops; resume after errors, re-read after a view change."""
        with anyio.CancelScope() as scope:
            self._background.append(scope)
            cursor = await self._retry.persist(
                f"node {self.node_id}: starting the change feed", self._starting_cursor, logger
            )
            started = False
            while True:
                # No await from this check until the pass's cancel scope exists: a rewind asked for
                # meanwhile (even while pinning the first cursor) is either seen here or cancels the pass.
                if self._rewind_to is not None:
                    cursor, self._rewind_to = self._rewind_to, None
                    self._counters.rewinds += 1
                    logger.info("node %s: re-reading the change feed after cursor %d", self.node_id, cursor)
                feed = self._open_feed(cursor)
                if not started:  # the feed has fixed its starting point: changes from now on are seen
                    started = self._feed_started = True
                    self._checkpoints.append((time.monotonic(), cursor))
                    task_status.started()
                cursor = await self._one_pass(feed, cursor)
                if self._rewind_to is None:
                    logger.info("node %s: the change feed ended", self.node_id)
                    return

    async def _starting_cursor(self) -> int:
        """Where the feed starts: ``feed_after``, else the durable checkpoint, else "now".

        "Now" is pinned before following the feed, so no change committed after ``__aenter__`` is missed
        whenever the feed's first poll happens, and the first in-memory checkpoint is a real cursor.
        """
        if self._options.feed_after is not None:
            return self._options.feed_after
        now = await self._store.cursor()
        saved = await self._store.load_checkpoint(self.node_id)
        if saved is not None and not saved.resumable:
            logger.warning(
                "node %s: its checkpoint is %.0fs old, older than the store keeps changes: starting from"
                " now, the reconcile sweep catches up",
                self.node_id,
                saved.age,
            )
            saved = None
        cursor = await self._slot_checkpoints(saved)
        if cursor is None:
            return now
        self._resumed_from = self._routed_cursor = cursor
        if saved is not None:
            self._saved_cursor = saved.cursor
        logger.info("node %s: resuming the change feed at checkpoint %d", self.node_id, cursor)
        return cursor

    async def _slot_checkpoints(self, own: Checkpoint | None) -> int | None:
        """Where the slots this node owns were left off: its own checkpoint for those it covers, and for
        each other slot the newest resumable checkpoint of a node that read it (a slot's previous owner);
        the oldest of those positions (None: nothing known, start from now)."""
        mine = self._feed_slots()
        wanted = frozenset(range(SLOTS)) if mine is None else mine
        covered = frozenset() if own is None else wanted if own.slots is None else own.slots
        missing = wanted - covered
        positions = [] if own is None else [own.cursor]
        if missing:
            saved = [
                cp for name, cp in await self._store.checkpoints() if name != self.node_id and cp.resumable
            ]
            best: dict[int, int] = {}
            for checkpoint in saved:
                covered = missing if checkpoint.slots is None else missing & checkpoint.slots
                for slot in covered:
                    best[slot] = max(best.get(slot, -1), checkpoint.cursor)
            if best:
                positions.append(min(best.values()))
                logger.info(
                    "node %s: %d of its slots resume where their previous owners left off",
                    self.node_id,
                    len(best),
                )
        return min(positions) if positions else None

    def _open_feed(self, cursor: int) -> AsyncIterator[Change]:
        self._feed_rows_before += _feed_rows(self._feed)
        self._feed = self._store.changes(after=cursor, slots=self._feed_slots)
        return self._feed

    def _feed_slots(self) -> frozenset[int] | None:
        """The slots this node's feed reads: those it owns, and for ``handoff`` seconds after a view
        change those it owned before (None while it owns every slot). The same object until it changes."""
        now = time.monotonic()
        previous = self._previous_ring if now < self._previous_until else None
        rings = (self._ring, previous)
        if self._slot_filter_ring != rings or (previous is not None and now >= self._slot_filter_until):
            if previous is None and self._ring.nodes == frozenset([self.node_id]):
                self._slot_filter = None
            else:
                slots = self._ring.slots_of(self.node_id)
                if previous is not None:
                    slots |= previous.slots_of(self.node_id)
                self._slot_filter = slots
            self._slot_filter_ring, self._slot_filter_until = rings, self._previous_until
        return self._slot_filter

    async def _one_pass(self, feed: AsyncIterator[Change], cursor: int) -> int:
        """Follow ``feed`` until it ends or a rewind is requested; return the last cursor seen.

        Any failure (of the store, or a bug) is retried from the last cursor with capped backoff: the
        feed never ends the node.
        """
        with anyio.CancelScope() as scope:
            self._pass_scope = scope
            retrying: AsyncRetrying = self._retry.retrying(everything=True, before_sleep=self._log_feed_retry)
            async for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        feed = self._open_feed(cursor)
                    async with _closing(feed):
                        async for change in feed:
                            self._feed_failure = None
                            self._checkpoint(cursor)
                            await self._route(change)
                            cursor = self._routed_cursor = change.cursor
        self._pass_scope = None
        return cursor

    async def _route(self, change: Change) -> None:
        try:
            root_id = check_root_id(change.root_id)
            check_version(change.version)
        except InvalidArgument as exc:  # e.g. a custom schema's trigger wrote an unusable root id
            self._counters.ignored += 1
            logger.error("node %s: ignoring a malformed change %r: %s", self.node_id, change, exc)
            return
        if not self.owns(root_id):
            self._counters.ignored += 1
            return
        await self._notify(root_id, Changed(root_id, change.version, change.committed_at, change.images))

    def _checkpoint(self, cursor: int) -> None:
        """Remember that every change from now on comes after ``cursor``; keep ``handoff`` seconds' worth."""
        now = time.monotonic()
        interval = self._options.checkpoint_interval
        if self._checkpoints and now - self._checkpoints[-1][0] < interval:
            return
        self._checkpoints.append((now, cursor))
        horizon = now - self._options.handoff - 2 * interval
        while len(self._checkpoints) > 1 and self._checkpoints[1][0] <= horizon:
            self._checkpoints.popleft()

    def _log_feed_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        self._feed_failure = repr(exc)
        level = logging.WARNING if exc is not None and is_transient(exc) else logging.ERROR
        logger.log(
            level,
            "node %s: change feed failed, resuming in %.2fs: %r",
            self.node_id,
            state.upcoming_sleep,
            exc,
        )

    # -- durable progress ----------------------------------------------------------------------------

    async def _save_checkpoints(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Save the routed cursor every ``checkpoint_save_interval`` seconds while it moves."""
        with anyio.CancelScope() as scope:
            self._background.append(scope)
            task_status.started()
            while True:
                await anyio.sleep(self._options.checkpoint_save_interval)
                await self._save_checkpoint()

    async def _save_checkpoint(self) -> None:
        cursor = self._routed_cursor
        if cursor is None or cursor == self._saved_cursor:
            return
        try:
            await self._store.save_checkpoint(self.node_id, cursor, slots=self._feed_slots())
        except Exception as exc:  # broad on purpose: the next interval tries again; the sweep bounds G3
            logger.warning("node %s: saving its checkpoint failed (will retry): %r", self.node_id, exc)
            return
        self._saved_cursor = cursor

    async def _sweep_forever(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The reconcile sweep at start-up and every ``sweep_interval`` seconds (see the module docstring)."""
        with anyio.CancelScope() as scope:
            self._background.append(scope)
            task_status.started()
            while True:
                await self._retry.persist(f"node {self.node_id}: reconcile sweep", self._sweep_once, logger)
                await anyio.sleep(self._options.sweep_interval)

    async def _sweep_once(self) -> None:
        started = time.monotonic()
        owned = behind = uncached = 0
        after: str | None = None
        try:
            while True:
                page = await self._store.root_versions(after=after, limit=_SWEEP_PAGE)
                if not page:
                    break
                after = page[-1][0]
                mine = [(root_id, version) for root_id, version in page if self._sweepable(root_id)]
                cached = (
                    await self._cache.versions([graph_key(root_id) for root_id, _ in mine]) if mine else []
                )
                for (root_id, committed), version in zip(mine, cached, strict=True):
                    owned += 1
                    if version is None:
                        uncached += 1
                    elif version < committed:
                        behind += 1
                        self._refresh_behind(root_id, version, committed)
                if len(page) < _SWEEP_PAGE:
                    break
        except Exception as exc:  # recorded for problems(), then retried by the caller
            self._counters.sweep_failed(exc)
            raise
        self._counters.sweep_finished(owned, behind, uncached, time.monotonic() - started)
        if behind:
            logger.info("node %s: reconcile sweep found %d of %d roots behind", self.node_id, behind, owned)

    def _sweepable(self, root_id: str) -> bool:
        try:
            check_root_id(root_id)
        except InvalidArgument:
            return False
        return self.owns(root_id)

    def _refresh_behind(self, root_id: str, cached: int, committed: int) -> None:
        """A root cached older than committed: forget what this node believed built, and rebuild it."""
        logger.info("node %s: %r is cached at %d, committed at %d: rebuilding", self.node_id, root_id, cached,
                    committed)  # fmt: skip
        self._remembered.pop(root_id, None)
        if self._running:
            self._tell(root_id, Refresh(root_id))


_OWNED_CACHE_LIMIT = 100_000


def _feed_rows(feed: object) -> int:
    """Changes a feed has read from the store (of its slots only): ``statistics().rows`` or ``rows``."""
    statistics = getattr(feed, "statistics", None)
    rows = getattr(statistics(), "rows", 0) if statistics is not None else getattr(feed, "rows", 0)
    return rows if isinstance(rows, int) else 0


def _feed_failing(feed: object) -> bool:
    """Whether a feed that retries by itself (``PostgresFeed``) reports its latest poll failed."""
    statistics = getattr(feed, "statistics", None)
    return bool(statistics is not None and getattr(statistics(), "failing", False))


def _cache_poisoned(cache: object) -> int:
    """Malformed entries a cache found by itself (``RedisCache.statistics().poisoned``)."""
    statistics = getattr(cache, "statistics", None)
    return int(getattr(statistics(), "poisoned", 0)) if statistics is not None else 0


def _owns(ring: Ring, cache: dict[str, bool], node_id: str, root_id: str) -> bool:
    """``ring.owns(node_id, root_id)``, answered from ``cache`` when it can (a ring never changes)."""
    owned = cache.get(root_id)
    if owned is None:
        if len(cache) >= _OWNED_CACHE_LIMIT:
            cache.clear()
        owned = cache[root_id] = ring.owns(node_id, root_id)
    return owned


def _tell_quietly(actor: RootActor, message: Message) -> None:
    with contextlib.suppress(ActorDead):
        actor.tell(message)
