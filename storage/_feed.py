"""The PostgreSQL change feed: poll the outbox by transaction snapshot, LISTEN/NOTIFY only to wake up.

Why not "rows with id > last id": a transaction can take its outbox id (or its xid) early and commit late,
after rows with higher ids were already delivered; an id cursor would skip it forever.

How it works. Each outbox row records its writer's transaction id (``xid``). Every poll reads, in ONE
statement (one snapshot), the snapshot's ``xmin``/``xmax``/``xip`` (the transactions still running) and
the outbox rows that could have become visible since the previous poll: ``xid >= previous xmax`` or
``xid`` in the previous ``xip``. A transaction not in ``xip`` and below ``xmax`` had finished when the
previous snapshot was taken, so its rows were already delivered then; nothing can be missed, and a
late-committing transaction stays in ``xip`` until it commits and is delivered by the next poll. A long
transaction elsewhere on the server never delays other rows.

Cursors. ``Change.cursor`` is the snapshot ``xmin`` of the poll *before* the one that delivered it (a
watermark: every transaction below it had finished). ``changes(after=cursor)`` delivers every committed row
with ``xid >= cursor``: nothing older than the cursor, possibly some already delivered (at least once),
and nothing after it is missed.

Order. Within one poll, each root's changes are put in increasing version order. Across polls a root can
show up with a version lower than one already delivered (a transaction that took its xid early but locked
the root late); the iterator skips those superseded changes, so each root's delivered versions strictly
increase within one iterator. Its highest delivered version is always the committed one.

Wake-ups. Each feed has one dedicated connection (never from the pool, so polls never queue behind
writers; ``application_name`` "graphcache feed <schema>") that LISTENs and polls. A NOTIFY (or the
connection's loss) wakes the poller at once, otherwise it polls every ``poll_interval`` seconds, so a
lost NOTIFY is only a delay. Two polls start at least ``min_poll_interval`` seconds apart, so a stream of
commits is read in batches (one poll per interval) instead of one poll per NOTIFY; while polls keep
finding rows the feed does not LISTEN at all (see ``_adapt_listening``), so a busy server does not signal
every feed at every commit.

Faults. No transient fault ends or fails the iterator: a lost or broken connection is dropped and replaced
at the next step; failed connects and polls back off (capped, jittered, exponential: ``_backoff``, the one
policy), only ``aclose()`` cuts a back-off short, and the feed resumes where it was (its xid bounds are
kept) when the database returns. ``statistics().failing`` says whether it is failing right now (for a
readiness check). Only a permanent error (a dropped schema, say) is raised by ``__anext__``.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import NamedTuple, Protocol, Self

import anyio

from ._errors import StoreError, StoreUnavailable
from ._model import Change, RowImage
from ._slots import SlotFilter, slot_bitmap

__all__ = ("FeedConnection", "FeedStatistics", "Outbox", "PollResult", "PostgresFeed", "Row")

logger = logging.getLogger(__name__)

_NOTHING = 2**63 - 1  # a lower bound no xid reaches: the first poll of a feed that starts "now"
_MAX_BACKOFF = 2.0
_BUSY_POLLS = 3
"""Polls in a row that found rows before a feed stops listening (it polls at its own pace meanwhile)."""


Row = tuple[str, int, float, tuple[RowImage, ...] | None]
"""An outbox row as a poll returns it: (root_id, version, committed_at, images or None)."""


class PollResult(NamedTuple):
    """One poll: the snapshot's xmin/xmax/xip and the outbox rows in xid order."""

    xmin: int
    xmax: int
    xip: list[int]
    rows: list[Row]


class FeedConnection(Protocol):
    """What a feed does with its connection itself: notice it is gone, and drop it (asyncpg's
    ``Connection`` is one)."""

    def is_closed(self) -> bool: ...

    def terminate(self) -> None: ...


class Outbox(Protocol):
    """What a feed needs of its store, and nothing more: the store's outbox and the feed's own connection.

    ``PostgresStore`` hands each feed one (``_postgres._FeedOutbox``), so the feed never sees the store's
    pool or its other statements; a test hands it a scripted one. ``connect``, ``poll``, ``set_listening``
    and ``prune`` raise ``StoreError`` (``StoreUnavailable`` when the failure may pass).
    """

    @property
    def retention(self) -> float:
        """Seconds outbox rows are kept before ``prune`` deletes them."""
        ...

    async def connect(self, wake: Callable[..., None], *, listen: bool) -> FeedConnection:
        """A connection of the feed's own, LISTENing if ``listen``; ``wake`` is called on each NOTIFY and
        when the connection is lost."""
        ...

    async def disconnect(self, conn: FeedConnection) -> None:
        """Close ``conn`` politely (bounded in time; dropped instead if that fails). Never raises."""
        ...

    async def poll(
        self, conn: FeedConnection, lower: int, extra: Sequence[int], slots: bytes | None = None
    ) -> PollResult:
        """Outbox rows with ``xid >= lower`` or ``xid`` in ``extra`` (and, with a ``slots`` bitmap, a
        slot in it), with the snapshot they were read in."""
        ...

    async def set_listening(self, conn: FeedConnection, wake: Callable[..., None], *, on: bool) -> None:
        """LISTEN (calling ``wake`` on each NOTIFY) or UNLISTEN on the feed's connection."""
        ...

    async def prune(self) -> int:
        """Delete outbox rows older than ``retention``; how many went."""
        ...

    def forget(self, feed: PostgresFeed) -> None:
        """``feed`` is closed: the store need not close it any more."""
        ...


class FeedStatistics(NamedTuple):
    """A feed's counters and state. New fields go last, with a default."""

    delivered: int
    superseded: int
    polls: int
    failed: int  # failed connects and polls
    connects: int
    listening: bool
    watermark: int | None
    failing: bool = False  # the latest connect or poll failed and no poll has succeeded since
    rows: int = 0  # outbox rows the polls returned (only the feed's slots, when it has a filter)


class PostgresFeed:
    """Async iterator of ``Change`` from a store's ``Outbox``; ``aclose()`` ends it."""

    def __init__(
        self,
        outbox: Outbox,
        after: int | None,
        *,
        listen: bool,
        poll_interval: float,
        min_poll_interval: float = 0.0,
        slots: SlotFilter | None = None,
    ) -> None:
        self._outbox = outbox
        self._slots = slots
        self._bitmap: tuple[object, bytes | None] = (None, None)  # (the filter's last set, its bitmap)
        self._listen = listen
        self._poll_interval = poll_interval
        self._min_poll_interval = min_poll_interval
        self._last_poll: float | None = None  # anyio clock at the start of the latest poll
        self._closing = anyio.Event()  # cuts a pacing pause short
        self._watermark = after
        self._lower = _NOTHING if after is None else after
        self._extra: list[int] = []
        self._buffer: deque[Change] = deque()
        self._max_seen: dict[str, int] = {}
        self._wake = anyio.Event()
        self._conn: FeedConnection | None = None
        self._listening = False  # whether the current connection LISTENs
        self._busy_polls = 0
        self._failed_in_a_row = 0  # failed connects and polls since the latest good poll
        self._last_prune: float | None = None
        self._closed = False
        self._delivered = self._superseded = self._polls = self._failed = self._connects = 0
        self._rows = 0

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif not self._connected():
            state = "disconnected"
        else:
            state = "listening" if self._listen else "polling only"
        return (
            f"<PostgresFeed [{state} | watermark: {self._watermark}"
            f" | buffered: {len(self._buffer)} | delivered: {self._delivered}]>"
        )

    def statistics(self) -> FeedStatistics:
        return FeedStatistics(
            self._delivered,
            self._superseded,
            self._polls,
            self._failed,
            self._connects,
            self._listening and self._connected(),
            self._watermark,
            self._failed_in_a_row > 0,
            self._rows,
        )

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Change:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            await self._step()
        self._delivered += 1
        return self._buffer.popleft()

    async def aclose(self) -> None:
        self._closed = True
        self._closing.set()
        self._wake.set()
        self._outbox.forget(self)
        await self._disconnect()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _slot_bitmap(self) -> bytes | None:
        """The bitmap of the slots to read now (None: all); rebuilt only when the filter's set changes."""
        if self._slots is None:
            return None
        wanted = self._slots()
        if wanted is not self._bitmap[0]:
            self._bitmap = (wanted, None if wanted is None else slot_bitmap(wanted))
        return self._bitmap[1]

    async def _step(self) -> None:
        """One poll and the wait after it. Never raises a transient error: it backs off instead."""
        await self._pace()
        if self._closed:
            return
        self._wake = anyio.Event()  # a NOTIFY from now on cuts the wait below short
        self._last_poll = anyio.current_time()
        try:
            conn = await self._connection()
            result = await self._outbox.poll(conn, self._lower, self._extra, self._slot_bitmap())
        except StoreUnavailable as exc:
            if self._closing.is_set():  # aclose() took the connection from under the poll: not a fault
                return
            self._failed += 1
            self._failed_in_a_row += 1
            delay = _backoff(self._poll_interval, self._failed_in_a_row)
            logger.warning("change feed poll failed (retrying in %.2fs): %s", delay, exc)
            self._drop_connection()  # whatever state it is in, start afresh
            # Only aclose() cuts a back-off short: the lost connection's own wake-up must not.
            with anyio.move_on_after(delay):
                await self._closing.wait()
            return
        self._polls += 1
        self._rows += len(result.rows)
        self._failed_in_a_row = 0
        self._accept(result)
        await self._maybe_prune()
        try:
            if await self._adapt_listening(conn, busy=bool(self._buffer)):
                return
        except StoreUnavailable as exc:
            logger.warning("change feed could not switch LISTEN; reconnecting: %s", exc)
            self._drop_connection()
            return
        with anyio.move_on_after(self._poll_interval):
            await self._wake.wait()

    async def _adapt_listening(self, conn: FeedConnection, *, busy: bool) -> bool:
        """LISTEN only while the feed waits; True if it should poll again without waiting.

        Under a stream of commits the feed polls every ``min_poll_interval`` anyway, and a NOTIFY per
        commit to every listening feed then costs the server a signal and the feed a wake-up each, for
        nothing: after ``_BUSY_POLLS`` polls in a row that found rows, it UNLISTENs. The first poll that
        finds nothing LISTENs again and asks for one more poll, so a commit between that poll and the
        LISTEN (whose NOTIFY nobody heard) is still read before the feed sleeps.
        """
        if not busy:
            self._busy_polls = 0
            if self._listen and not self._listening:
                await self._outbox.set_listening(conn, self._notified, on=True)
                self._listening = True
                return True
            return False
        self._busy_polls += 1
        if self._listening and self._busy_polls >= _BUSY_POLLS and self._min_poll_interval > 0:
            await self._outbox.set_listening(conn, self._notified, on=False)
            self._listening = False
        return True

    async def _pace(self) -> None:
        """Start a poll no sooner than ``min_poll_interval`` after the previous one started.

        Under a stream of commits every NOTIFY would otherwise cost a poll of its own; pausing lets the
        rows of the commits meanwhile arrive in one poll. A NOTIFY during the pause is covered by it.
        """
        if self._last_poll is None:
            return
        resume = self._last_poll + self._min_poll_interval
        while not self._closed and (pause := resume - anyio.current_time()) > 0:  # a timer may fire early
            with anyio.move_on_after(pause):
                await self._closing.wait()

    def _accept(self, result: PollResult) -> None:
        cursor = result.xmin if self._watermark is None else self._watermark
        for root_id, version, committed_at, images in _per_root_increasing(result.rows):
            if version <= self._max_seen.get(root_id, 0):
                self._superseded += 1
                continue
            self._max_seen[root_id] = version
            self._buffer.append(Change(root_id, version, cursor, committed_at, images))
        self._watermark, self._lower, self._extra = result.xmin, result.xmax, result.xip

    async def _maybe_prune(self) -> None:
        now = anyio.current_time()
        retention = self._outbox.retention
        if self._last_prune is not None and now - self._last_prune < min(retention / 2, 60.0):
            return
        self._last_prune = now
        try:
            pruned = await self._outbox.prune()
        except StoreError as exc:  # housekeeping: never a reason to stop delivering
            logger.warning("outbox pruning failed (will retry): %s", exc)
        else:
            if pruned:
                logger.info("pruned %d outbox rows older than %.0fs", pruned, retention)

    def _connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def _connection(self) -> FeedConnection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        if self._conn is not None:
            logger.warning("change feed connection lost; reconnecting")
            self._drop_connection()
        conn = await self._outbox.connect(self._notified, listen=self._listen)
        self._conn = conn
        self._listening = self._listen
        self._busy_polls = 0
        self._connects += 1
        if self._closed:  # closed while connecting
            self._drop_connection()
            raise StoreUnavailable("the feed was closed")
        return conn

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _disconnect(self) -> None:
        """Close the connection politely (on ``aclose``); never raises."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            await self._outbox.disconnect(conn)

    def _drop_connection(self) -> None:
        """Drop a connection that failed: it may be in an unknown protocol state, so no goodbye."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def _backoff(base: float, attempt: int) -> float:
    """Capped exponential backoff with full jitter between half and all of the step."""
    step = min(max(base, _MAX_BACKOFF), base * 2 ** min(attempt, 16))
    jittered: float = step * random.uniform(0.5, 1.0)
    return jittered


def _per_root_increasing(rows: Sequence[Row]) -> list[Row]:
    """``rows`` with each root's rows reordered by version, keeping the slots roots occupy in xid order."""
    slots: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        slots.setdefault(row[0], []).append(index)
    ordered = list(rows)
    for positions in slots.values():
        if len(positions) > 1:
            by_version = sorted((rows[index] for index in positions), key=lambda row: row[1])
            for index, row in zip(positions, by_version, strict=True):
                ordered[index] = row
    return ordered
