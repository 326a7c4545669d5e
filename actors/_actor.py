"""``RootActor``: one root's mailbox actor, which rebuilds that root's cached graph.

The mailbox is a wake-up, not the state. ``tell`` records the newest version asked for (and a refresh or
stop request) on the actor at once, then drops a message into the bounded mailbox; when the mailbox is
full a wake-up is already queued, so nothing is lost and the feed consumer never blocks. The loop drains
everything queued, rebuilds once for the newest version (one store snapshot, one versioned put) and
repeats while newer versions arrived meanwhile: a burst of N notifications during one rebuild costs at
most one more rebuild (G4). ``min_rebuild_interval`` paces one root's rebuilds: the next one starts no
sooner than that many seconds after the start of the previous one. The first rebuild after a quiet
period starts at once (an idle system adds no lag); during a sustained burst notifications pile up in
the actor's state meanwhile and one rebuild covers them all. Safety does not depend on the actor:
``put_if_newer`` keeps the newest graph whoever writes it, so a refused put (someone cached a newer one)
is success.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Self

import anyio
import anyio.abc
from anyio import WouldBlock
from tenacity import RetryCallState

from ..cache import VersionedCache
from ..storage import Graph, GraphStore, RootNotFound, RowImage
from ._batch import Rebuilder
from ._errors import ActorDead, InvalidArgument
from ._live import Doubt, LiveGraph
from ._messages import Changed, Message, Refresh, Stop
from ._options import DEFAULT_MAX_LIVE_GRAPH_BYTES, DEFAULT_MIN_REBUILD_INTERVAL, ActorOptions
from ._retry import RetryPolicy, is_transient
from ._stats import ActorStatistics, Counters
from ._validate import check_root_id, check_version

__all__ = ("DEFAULT_MIN_REBUILD_INTERVAL", "RootActor")

logger = logging.getLogger(__name__)

_MAX_IMAGES_UNKEPT = 64
"""Versions whose images an actor keeps while it has no graph to patch them into (those arriving while
its snapshot loads may follow it)."""

_MAX_PENDING_IMAGES = 1024
"""Versions whose row images an actor keeps while they wait to be applied; beyond, it forgets them all
and its next rebuild loads a snapshot (a backlog that long is cheaper to load than to replay)."""


class RootActor:
    """Keeps one root's cached graph at the newest version it has been told about.

    Run it with ``await task_group.start(actor.run)``; feed it with ``tell``. It passivates (returns from
    ``run``) after ``idle_timeout`` seconds without work, and stops on ``Stop()``; a stopped actor refuses
    messages and wakes every ``until_built`` waiter with ``ActorDead``. The keyword options are those of
    ``ActorOptions``; a Node builds its actors with ``RootActor.from_options`` from options it checked once.
    """

    def __init__(
        self,
        root_id: str,
        *,
        store: GraphStore,
        cache: VersionedCache,
        counters: Counters | None = None,
        mailbox_size: int = 16,
        idle_timeout: float = 30.0,
        built: int = 0,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
        min_rebuild_interval: float = DEFAULT_MIN_REBUILD_INTERVAL,
        max_live_graph_bytes: int = DEFAULT_MAX_LIVE_GRAPH_BYTES,
        rebuilder: Rebuilder | None = None,
    ) -> None:
        options = ActorOptions.create(
            mailbox_size=mailbox_size,
            idle_timeout=idle_timeout,
            retry_initial=retry_initial,
            retry_max=retry_max,
            min_rebuild_interval=min_rebuild_interval,
            max_live_graph_bytes=max_live_graph_bytes,
        )
        self._setup(
            root_id, options, store=store, cache=cache, counters=counters, built=built, rebuilder=rebuilder
        )

    @classmethod
    def from_options(
        cls,
        root_id: str,
        options: ActorOptions,
        *,
        store: GraphStore,
        cache: VersionedCache,
        counters: Counters | None = None,
        built: int = 0,
        rebuilder: Rebuilder | None = None,
    ) -> Self:
        """An actor configured by ``options`` as they are (already checked: ``ActorOptions.create``)."""
        actor = cls.__new__(cls)  # __init__ would check the options again, one by one
        actor._setup(
            root_id, options, store=store, cache=cache, counters=counters, built=built, rebuilder=rebuilder
        )
        return actor

    def _setup(
        self,
        root_id: str,
        options: ActorOptions,
        *,
        store: GraphStore,
        cache: VersionedCache,
        counters: Counters | None,
        built: int,
        rebuilder: Rebuilder | None,
    ) -> None:
        self.root_id = check_root_id(root_id)
        self._idle_timeout = options.idle_timeout
        self._retry = RetryPolicy(options.retry_initial, options.retry_max)
        self._min_interval = options.min_rebuild_interval
        self._max_live_bytes = options.max_live_graph_bytes
        self._live: LiveGraph | None = None  # the graph last put, kept to patch the next versions into
        self._images: dict[int, tuple[RowImage, ...] | None] = {}  # row images of versions > built
        self._last_start: float | None = None  # anyio clock at the start of the latest rebuild
        self._stopping = anyio.Event()  # cuts a pacing pause short
        # A node shares one rebuilder among its actors, so rebuilds that start together are batched.
        self._rebuilder = rebuilder if rebuilder is not None else Rebuilder(store, cache)
        self._counters = counters if counters is not None else Counters()
        self._built = check_version(built, name="built")
        self._send, self._receive = anyio.create_memory_object_stream[Message](options.mailbox_size)
        self._wanted = self._built
        self._pending = 0  # notifications not yet accounted as a rebuild or as coalesced
        self._pending_since: float | None = None  # commit time of the oldest uncached notification
        self._refresh = False
        self._stop = False
        self._alive = True
        self._started = False
        self._closed = False
        self._failing = False
        self._progress = anyio.Event()  # set (and replaced) whenever ``built`` rises or the actor dies
        self._notifications = 0
        self._coalesced = 0
        self._rebuilds = 0
        self._failures = 0

    # -- the outside ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the actor has passivated or stopped; it then refuses messages."""
        return self._alive

    @property
    def built(self) -> int:
        """The newest version this actor has put (or found newer) in the cache."""
        return self._built

    @property
    def patching(self) -> bool:
        """Whether the actor keeps its root's graph, so a version whose row images arrive is patched in
        memory rather than loaded."""
        return self._live is not None

    @property
    def wanted(self) -> int:
        """The newest version this actor has been told about."""
        return self._wanted

    def tell(self, message: Message) -> None:
        """Deliver ``message`` without waiting (fire and forget); ``ActorDead`` if the actor has stopped."""
        if not self._alive:
            raise ActorDead(f"actor of {self.root_id!r} has stopped")
        match message:
            case Changed(root_id=root_id, version=version, committed_at=committed_at, images=images):
                self._check_root(root_id)
                self._note_version(check_version(version), committed_at, images)
            case Refresh(root_id=root_id):
                self._check_root(root_id)
                self._refresh = True
            case Stop():
                self._stop = True
                self._stopping.set()
        # When the mailbox is full a wake-up is already queued, and the state above carries the rest.
        with contextlib.suppress(WouldBlock):
            self._send.send_nowait(message)

    async def until_built(self, version: int) -> None:
        """Wait until this actor has cached ``version`` or newer; ``ActorDead`` if it stops first."""
        version = check_version(version)
        while self._built < version:
            if not self._alive:
                raise ActorDead(f"actor of {self.root_id!r} stopped at version {self._built} < {version}")
            await self._progress.wait()

    def close(self) -> None:
        """Stop at once: refuse messages, drain the mailbox, wake waiters. Idempotent.

        ``run`` does this when it ends; the owner calls it for an actor whose task never got to run.
        """
        if self._closed:
            return
        self._closed = True
        self._alive = False
        self._send.close()
        while True:
            try:
                self._receive.receive_nowait()
            except (WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        self._receive.close()
        self._wake_waiters()

    def statistics(self) -> ActorStatistics:
        return ActorStatistics(
            root_id=self.root_id,
            alive=self._alive,
            built=self._built,
            wanted=self._wanted,
            mailbox_depth=self._send.statistics().current_buffer_used if self._alive else 0,
            notifications=self._notifications,
            coalesced=self._coalesced,
            rebuilds=self._rebuilds,
            failures=self._failures,
            failing=self._failing,
        )

    def __repr__(self) -> str:
        state = ("failing" if self._failing else "alive") if self._alive else "stopped"
        depth = self._send.statistics().current_buffer_used if self._alive else 0
        size = self._send.statistics().max_buffer_size
        return (
            f"<RootActor {self.root_id!r} [{state} | built: {self._built}, wanted: {self._wanted} | "
            f"mailbox: {depth}/{size} | rebuilds: {self._rebuilds}, coalesced: {self._coalesced}]>"
        )

    # -- the loop ------------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the mailbox until idle for ``idle_timeout``, told ``Stop()`` or cancelled."""
        if self._started:
            raise RuntimeError(f"actor of {self.root_id!r} runs only once")
        self._started = True
        task_status.started()
        try:
            while await self._next_work():
                await self._catch_up()
        finally:
            self.close()

    async def _next_work(self) -> bool:
        """Wait for work; False means stop (told to, or idle with nothing to do: passivate)."""
        while not self._has_work():
            with anyio.move_on_after(self._idle_timeout) as idle:
                await self._receive.receive()
            # No await from here to ``close``: no ``tell`` can slip between this check and passivation.
            if idle.cancelled_caught and not self._has_work():
                return False
        self._drain()
        return not self._stop

    def _has_work(self) -> bool:
        return self._stop or self._refresh or self._pending > 0 or self._wanted > self._built

    def _drain(self) -> None:
        while True:
            try:
                self._receive.receive_nowait()
            except WouldBlock:
                return

    async def _catch_up(self) -> None:
        """Rebuild until nothing newer than ``built`` was asked for (checking for a stop in between).

        A rebuild patches the graph it keeps when the row images of every version up to the newest are
        at hand (no store read, no pacing); otherwise it loads a snapshot, paced by
        ``min_rebuild_interval``."""
        while not self._stop and self._has_work():
            self._drain()
            if self._wanted <= self._built and not self._refresh:
                pending, self._pending = self._pending, 0
                self._coalesce(pending)  # a rebuild already covered them
                continue
            patched = None if self._refresh else self._patch()
            if patched is None:
                if not await self._pace():
                    return  # told to stop while pausing
                self._drain()
            pending, self._pending = self._pending, 0
            self._refresh = False
            self._coalesce(max(pending - 1, 0))
            since, self._pending_since = self._pending_since, None
            target = self._wanted if patched is None else patched.version
            await self._rebuild(target, since, patched)

    def _patch(self) -> Graph | None:
        """The graph at ``wanted``, patched from the one kept; None if a version's images are missing
        or do not fit (a snapshot is loaded instead)."""
        live = self._live
        if live is None:
            return None
        versions = range(live.version + 1, self._wanted + 1)
        if not versions or any(self._images.get(v) is None for v in versions):
            return None
        try:
            for version in versions:
                images = self._images.pop(version)
                assert images is not None
                live.apply(version, images)
        except Doubt as exc:
            logger.info("root %r: %s; loading a snapshot", self.root_id, exc)
            self._live = None
            return None
        if live.size > self._max_live_bytes:
            self._live = None  # put this one, load the next ones
        self._counters.patched += 1
        return live.graph()

    def _keep(self, graph: Graph, patched: Graph | None, lease: int) -> None:
        """After a put: keep the graph to patch later versions into (a loaded one is taken anew, with the
        lease it was loaded under)."""
        if graph is not patched:
            live = LiveGraph(graph, lease) if self._max_live_bytes else None
            self._live = live if live is not None and live.size <= self._max_live_bytes else None
        for version in [v for v in self._images if v <= graph.version]:
            del self._images[version]

    async def _pace(self) -> bool:
        """Wait until ``min_rebuild_interval`` has passed since the last rebuild started; False on a stop."""
        if self._last_start is None:
            return not self._stop
        resume = self._last_start + self._min_interval
        while not self._stop and (pause := resume - anyio.current_time()) > 0:  # a timer may fire early
            with anyio.move_on_after(pause):
                await self._stopping.wait()
        return not self._stop

    async def _rebuild(self, target: int, since: float | None, patched: Graph | None) -> None:
        if patched is None:
            self._last_start = anyio.current_time()  # pacing counts snapshot loads only
        try:
            await self._rebuild_once(target, since, patched)  # the common case, without retries
        except Exception as exc:  # broad on purpose: a failing root must never take the node down
            if not is_transient(exc):
                self._give_up(target, exc)
                return
            self._note_failure(1, 0.0, exc)
            self._live = None  # after a failure, in doubt: the retries load a snapshot
            await self._rebuild_with_retries(self._wanted, since, None)

    async def _rebuild_with_retries(self, target: int, since: float | None, patched: Graph | None) -> None:
        try:
            async for attempt in self._retry.retrying(before_sleep=self._on_retry):
                with attempt:
                    await self._rebuild_once(target, since, patched)
        except Exception as exc:  # broad on purpose: a failing root must never take the node down
            self._give_up(target, exc)
        finally:
            self._failing = False

    async def _rebuild_once(self, target: int, since: float | None, patched: Graph | None) -> None:
        started = time.monotonic()
        basis = None if patched is None or self._live is None else self._live.lease
        try:
            graph, stored, lease = await self._rebuilder.rebuild_leased(self.root_id, patched, basis)
        except RootNotFound as exc:
            if exc.version is None:  # the store never had it: nothing cached to take back
                raise
            await self._forget(exc.version)
            return
        self._keep(graph, patched, lease)
        self._counters.rebuild_seconds.observe(time.monotonic() - started)
        self._rebuilds += 1
        self._counters.rebuilds += 1
        if stored:
            self._counters.puts_stored += 1
        else:
            self._counters.puts_refused += 1  # someone cached this version or a newer one: also success
        if since:
            self._counters.lag.observe(max(0.0, time.time() - since))
        if graph.version < target:
            logger.warning(
                "store returned %r at version %d, older than the announced %d",
                self.root_id,
                graph.version,
                target,
            )
        self._set_built(max(graph.version, target))

    async def _forget(self, version: int) -> None:
        """The root's row is gone (deleted at ``version``, or a loader found no rows at it): remove the
        cached graph and floor its key at that version, so no older rebuild puts it back; count it built."""
        await self._rebuilder.forget(self.root_id, version)
        self._live = None
        self._images.clear()
        self._counters.roots_forgotten += 1
        logger.info("root %r has no row at version %d: its cached graph is removed", self.root_id, version)
        self._set_built(version)

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _check_root(self, root_id: str) -> None:
        if root_id != self.root_id:
            raise InvalidArgument(f"message for {root_id!r} told to the actor of {self.root_id!r}")

    def _note_version(self, version: int, committed_at: float, images: tuple[RowImage, ...] | None) -> None:
        self._notifications += 1
        self._counters.notifications += 1
        # A duplicate, or a late copy of a version told without images: keep one copy of its images.
        keep = images is not None and self._max_live_bytes and version > self._built
        if self._live is None and len(self._images) >= _MAX_IMAGES_UNKEPT:
            keep = False  # no graph to patch: only the few that may follow the snapshot being loaded
        if keep and self._images.get(version) is None:
            if len(self._images) >= _MAX_PENDING_IMAGES:
                self._images.clear()
            self._images[version] = images
        if version <= max(self._wanted, self._built):
            self._coalesce(1)  # a duplicate or an old version costs nothing
            return
        self._wanted = version
        self._pending += 1
        if self._pending_since is None and committed_at > 0 and math.isfinite(committed_at):
            self._pending_since = committed_at

    def _coalesce(self, count: int) -> None:
        self._coalesced += count
        self._counters.coalesced += count

    def _set_built(self, version: int) -> None:
        if version > self._built:
            self._built = version
            self._wanted = max(self._wanted, version)
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    def _on_retry(self, state: RetryCallState) -> None:
        exc: Any = state.outcome.exception() if state.outcome is not None else None
        self._note_failure(state.attempt_number + 1, state.upcoming_sleep, exc)

    def _note_failure(self, attempt: int, pause: float, exc: BaseException | None) -> None:
        self._failing = True
        self._failures += 1
        self._counters.failures += 1
        logger.warning(
            "rebuild of %r failed (attempt %d), retrying in %.2fs: %r", self.root_id, attempt, pause, exc
        )

    def _give_up(self, target: int, exc: Exception) -> None:
        self._failures += 1
        self._counters.failures += 1
        logger.error("rebuild of %r for version %d given up: %r", self.root_id, target, exc, exc_info=exc)
        self._live = None  # in doubt: the next rebuild loads a snapshot
        self._wanted = self._built  # a permanent error: do not spin; the next notification tries again
