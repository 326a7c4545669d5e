"""Unit-level specs: the apply plan, MemoryStore's own knobs, the feed's ordering and fault rules, and
which driver errors are transient."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import asyncpg
import asyncpg.utils
import pytest

from graphcache.storage import (
    ConcurrencyConflict,
    Delete,
    InvalidOperation,
    MemoryStore,
    StoreError,
    StoreUnavailable,
    Upsert,
)
from graphcache.storage._classify import breaks_connection, classify
from graphcache.storage._feed import (
    FeedConnection,
    FeedStatistics,
    Outbox,
    PollResult,
    PostgresFeed,
    Row,
    _per_root_increasing,
)
from graphcache.storage._postgres import _seam
from graphcache.storage._validate import RowInfo, check_ops, plan_apply

pytestmark = pytest.mark.anyio

ROWS = {"r": RowInfo(None, 1), "a": RowInfo("r", 3), "a1": RowInfo("a", 1), "b": RowInfo("r", 1)}


def plan(*ops: Any) -> Any:
    return plan_apply("r", ROWS, check_ops("r", list(ops)))


def test_plan_writes_new_rows_at_row_version_one_and_bumps_existing() -> None:
    """A new node starts at row version 1; an existing one goes up by one."""
    result = plan(Upsert("c", "r", {}), Upsert("a", "r", {"x": 1}))
    assert {key: value[2] for key, value in result.upserts.items()} == {"c": 1, "a": 4}
    assert result.deletes == frozenset()


def test_plan_delete_then_upsert_of_the_same_id_is_one_fresh_row() -> None:
    """Deleted and written again in one call: one upsert at row version 1, its old subtree deleted."""
    result = plan(Delete("a"), Upsert("a", "b", {}))
    assert result.upserts == {"a": ("b", b"{}", 1)}
    assert result.deletes == frozenset({"a1"})


def test_plan_checks_each_expected_row_version_against_the_earlier_ops() -> None:
    """The second write to a row in one call expects the row version the first one produced."""
    plan(Upsert("a", "r", {}, expected_row_version=3), Upsert("a", "r", {}, expected_row_version=4))
    with pytest.raises(ConcurrencyConflict, match="row version 4, expected 3"):
        plan(Upsert("a", "r", {}, expected_row_version=3), Upsert("a", "r", {}, expected_row_version=3))


def test_plan_refuses_a_write_under_a_node_deleted_earlier_in_the_call() -> None:
    """A parent removed by an earlier Delete of the same call is not in the graph."""
    with pytest.raises(InvalidOperation, match="parent 'a1'"):
        plan(Delete("a"), Upsert("x", "a1", {}))


def test_plan_names_the_cycle() -> None:
    """Moving a node under its own descendant is refused, naming the path."""
    with pytest.raises(InvalidOperation, match="cycle: a -> a1"):
        plan(Upsert("a", "a1", {}))


@pytest.mark.parametrize("latency", [(0.2, 0.1), (-1, 0), (0, float("inf")), "fast", (0,), (True, 1)])
def test_memory_store_refuses_bad_latency(latency: Any) -> None:
    """latency must be a (min_s, max_s) pair of finite seconds with 0 <= min <= max."""
    with pytest.raises(InvalidOperation):
        MemoryStore(latency=latency)


async def test_memory_store_repr_shows_live_state() -> None:
    """The repr shows open/closed, the number of roots, the cursor and the open feeds."""
    store = MemoryStore()
    await store.create_root("r", {})
    feed = store.changes()
    assert repr(store) == "<MemoryStore [open | roots: 1 | cursor: 1 | feeds: 1]>"
    await feed.aclose()
    await store.aclose()
    assert repr(store) == "<MemoryStore [closed | roots: 1 | cursor: 1 | feeds: 0]>"


async def test_closing_a_memory_store_ends_its_feeds_and_refuses_calls() -> None:
    """After aclose, a waiting feed ends and every call raises StoreUnavailable."""
    store = MemoryStore()
    await store.create_root("r", {})
    feed = store.changes()
    ended = anyio.Event()

    async def consume() -> None:
        async for _ in feed:
            pass
        ended.set()

    async with anyio.create_task_group() as group:
        group.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        await store.aclose()
    assert ended.is_set()
    with pytest.raises(StoreUnavailable):
        await store.load("r")


async def test_memory_feed_from_an_old_cursor_starts_at_the_oldest_retained_change() -> None:
    """With feed_retention=3, a feed from cursor 0 gets the last three changes."""
    store = MemoryStore(feed_retention=3)
    await store.create_root("r", {})
    for step in range(4):
        await store.apply("r", [Upsert("x", "r", {"step": step})])
    async with store.changes(after=0) as feed:
        versions = [(await feed.__anext__()).version for _ in range(3)]
    assert versions == [3, 4, 5]


def test_within_a_poll_each_roots_changes_come_in_version_order() -> None:
    """Rows in xid order are reordered per root by version, keeping the slots each root occupies."""
    rows: list[Row] = [("a", 3, 0.0, None), ("b", 1, 0.0, None), ("a", 2, 0.0, None)]
    rows += [("b", 2, 0.0, None), ("a", 4, 0.0, None)]
    assert [row[:2] for row in _per_root_increasing(rows)] == [
        ("a", 2),
        ("b", 1),
        ("a", 3),
        ("b", 2),
        ("a", 4),
    ]


class FakeConnection:
    def __init__(self) -> None:
        self.terminated = False

    def is_closed(self) -> bool:
        return self.terminated

    async def close(self) -> None:
        pass

    def terminate(self) -> None:
        self.terminated = True


class ScriptedOutbox:
    """An ``Outbox`` that hands out scripted polls, then closes the feed: a feed without a database."""

    retention = 3600.0

    def __init__(self, polls: list[PollResult]) -> None:
        self.polls = polls
        self.asked: list[tuple[int, list[int]]] = []
        self.feed: PostgresFeed | None = None
        self.disconnected: list[FeedConnection] = []

    async def connect(self, wake: Callable[..., None], *, listen: bool) -> FeedConnection:
        return FakeConnection()

    async def disconnect(self, conn: FeedConnection) -> None:
        self.disconnected.append(conn)

    async def poll(
        self, conn: FeedConnection, lower: int, extra: Sequence[int], slots: bytes | None = None
    ) -> PollResult:
        self.asked.append((lower, list(extra)))
        if len(self.asked) == len(self.polls) and self.feed is not None:
            await self.feed.aclose()
        return self.polls[len(self.asked) - 1]

    async def set_listening(self, conn: FeedConnection, wake: Callable[..., None], *, on: bool) -> None:
        pass

    async def prune(self) -> int:
        return 0

    def forget(self, feed: PostgresFeed) -> None:
        pass


def test_the_scripted_outbox_is_an_outbox() -> None:
    """The feed needs nothing of a store beyond the Outbox protocol (mypy checks the fakes against it)."""
    outbox: Outbox = ScriptedOutbox([])
    assert outbox.retention == 3600.0


async def test_feed_skips_superseded_versions_and_tracks_the_snapshot() -> None:
    """A root version lower than one already delivered is skipped; each poll asks from xmax and xip."""
    outbox = ScriptedOutbox(
        [
            PollResult(100, 105, [100, 103], [("a", 5, 0.0, None), ("b", 1, 0.0, None)]),
            PollResult(103, 110, [103], [("a", 4, 0.0, None), ("a", 6, 0.0, None)]),
            PollResult(110, 110, [], [("a", 6, 0.0, None), ("b", 2, 0.0, None)]),
        ]
    )
    feed = PostgresFeed(outbox, 90, listen=False, poll_interval=0.01)
    outbox.feed = feed
    got = [(change.root_id, change.version, change.cursor) async for change in feed]
    assert got == [("a", 5, 90), ("b", 1, 90), ("a", 6, 100), ("b", 2, 103)]
    assert outbox.asked == [(90, []), (105, [100, 103]), (110, [103])]
    assert feed.statistics().superseded == 2
    assert len(outbox.disconnected) == 1  # closing the feed closed its connection through the outbox


async def test_feed_polls_start_at_least_min_poll_interval_apart() -> None:
    """A feed with rows on every poll still spaces its polls: n polls span at least n - 1 intervals."""
    polls = [PollResult(100 + i, 101 + i, [], [("a", i + 1, 0.0, None)]) for i in range(10)]
    outbox = ScriptedOutbox(polls)
    feed = PostgresFeed(outbox, 90, listen=False, poll_interval=1.0, min_poll_interval=0.02)
    outbox.feed = feed
    began = anyio.current_time()
    got = [change.version async for change in feed]
    elapsed = anyio.current_time() - began
    assert got == list(range(1, 11))
    assert len(outbox.asked) == 10
    assert elapsed >= 9 * 0.02  # unpaced, ten polls that each return a row follow each other at once


async def test_closing_a_memory_feed_ends_a_waiting_consumer() -> None:
    """aclose() from another task ends an iteration that is waiting for the next change."""
    store = MemoryStore()
    feed = store.changes()
    received: list[object] = []

    async def consume() -> None:
        received.extend([change async for change in feed])

    with anyio.fail_after(10):  # a hang guard
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            await feed.aclose()
    assert received == []
    await store.aclose()


async def test_memory_checkpoints_stop_being_resumable_once_the_feed_dropped_changes_after_them() -> None:
    """A MemoryStore checkpoint is resumable while the feed still keeps every change after its cursor."""
    store = MemoryStore(feed_retention=3)
    await store.create_root("r", {})
    await store.save_checkpoint("kept", await store.cursor())
    for _ in range(3):  # cursors 2, 3, 4: the feed keeps exactly these
        await store.apply("r", [Upsert("x", "r", {})])
    kept = await store.load_checkpoint("kept")
    assert kept is not None
    assert (kept.cursor, kept.resumable) == (1, True)
    await store.apply("r", [Upsert("x", "r", {})])  # cursor 5: cursor 2, right after the checkpoint, is gone
    lost = await store.load_checkpoint("kept")
    assert lost is not None
    assert (lost.cursor, lost.resumable) == (1, False)
    await store.save_checkpoint("fresh", await store.cursor())
    fresh = await store.load_checkpoint("fresh")
    assert fresh is not None
    assert fresh.resumable


def _raised_inside_asyncpg() -> BaseException:
    try:
        asyncpg.utils._quote_ident(None)  # type: ignore[arg-type]  # an AttributeError from asyncpg's code
    except AttributeError as exc:
        return exc
    raise AssertionError("asyncpg.utils._quote_ident(None) did not raise")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.exceptions.InternalClientError("cannot switch to state 12"), StoreUnavailable),
        (asyncpg.exceptions.ProtocolError("unexpected message"), StoreUnavailable),
        (asyncpg.exceptions.OutdatedSchemaCacheError("stale type cache"), StoreUnavailable),
        (asyncpg.InterfaceError("connection is closed"), StoreUnavailable),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation"), StoreUnavailable),
        (asyncpg.exceptions.ConnectionFailureError("failure"), StoreUnavailable),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), StoreUnavailable),
        (asyncpg.exceptions.CrashShutdownError("crash"), StoreUnavailable),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), StoreUnavailable),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), StoreUnavailable),
        (asyncpg.exceptions.OutOfMemoryError("oom"), StoreUnavailable),
        (asyncpg.exceptions.SerializationError("serialize"), StoreUnavailable),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), StoreUnavailable),
        (asyncpg.exceptions.QueryCanceledError("statement timeout"), StoreUnavailable),
        (asyncpg.exceptions.InvalidCachedStatementError("cached plan"), StoreUnavailable),
        (ConnectionResetError(104, "reset"), StoreUnavailable),
        (OSError(113, "no route"), StoreUnavailable),
        (TimeoutError(), StoreUnavailable),
        (asyncio.IncompleteReadError(b"", 5), StoreUnavailable),
        (asyncio.InvalidStateError("invalid state"), StoreUnavailable),
        (_raised_inside_asyncpg(), StoreUnavailable),
        (asyncpg.exceptions.UndefinedTableError("no such table"), StoreError),
        (asyncpg.exceptions.InsufficientPrivilegeError("denied"), StoreError),
        (asyncpg.exceptions.UniqueViolationError("duplicate"), StoreError),
        (asyncpg.exceptions.UnknownPostgresError("??"), StoreError),
        (asyncpg.exceptions.DataError("cannot encode"), StoreError),
        (asyncpg.exceptions.ClientConfigurationError("bad option"), InvalidOperation),
        (ValueError("our own bug"), None),
        (KeyError("a loader's bug"), None),
        (asyncio.CancelledError(), None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_driver_errors_are_classified_transient_or_permanent_in_one_table(
    error: BaseException, expected: type[StoreError] | None
) -> None:
    """classify maps a driver/OS error to StoreUnavailable, StoreError or InvalidOperation; others to None."""
    assert classify(error) is expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.exceptions.InternalClientError("cannot switch to state 12"), StoreUnavailable),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), StoreUnavailable),
        (asyncio.InvalidStateError("invalid state"), StoreUnavailable),
        (asyncpg.exceptions.UndefinedTableError("no such table"), StoreError),
    ],
)
def test_the_seam_raises_the_storage_error_from_the_driver_error(
    error: BaseException, expected: type[StoreError]
) -> None:
    """The seam raises the classified storage error, naming the address, with the driver error as cause."""
    with pytest.raises(expected, match=r"db\.example:5433") as caught, _seam("db.example:5433"):
        raise error
    assert type(caught.value) is expected
    assert caught.value.__cause__ is error


def test_the_seam_lets_storage_errors_and_bugs_through_unchanged() -> None:
    """A StoreError raised inside the seam, or an error that is not the driver's, passes as it is."""
    mine = ConcurrencyConflict("nothing was committed")
    with pytest.raises(ConcurrencyConflict) as caught, _seam("h:1"):
        raise mine
    assert caught.value is mine
    with pytest.raises(ZeroDivisionError), _seam("h:1"):
        _ = 1 / 0


@pytest.mark.parametrize(
    ("error", "breaks"),
    [
        (asyncpg.exceptions.InternalClientError("cannot switch to state 12"), True),
        (asyncpg.InterfaceError("connection is closed"), True),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),
        (asyncpg.exceptions.ConnectionDoesNotExistError("closed mid-operation"), True),
        (TimeoutError(), True),
        (asyncpg.exceptions.DeadlockDetectedError("deadlock"), False),
        (asyncpg.exceptions.SerializationError("serialize"), False),
        (asyncpg.exceptions.QueryCanceledError("statement timeout"), False),
        (asyncpg.exceptions.UndefinedTableError("no such table"), False),
        (ValueError("our own bug"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_only_errors_that_may_break_the_session_drop_the_pooled_connection(
    error: BaseException, breaks: bool
) -> None:
    """A lost socket or protocol-state error drops the connection; a deadlock or a timeout keeps it."""
    assert breaks_connection(error) is breaks


class FailingOutbox(ScriptedOutbox):
    """Its first ``failures`` polls fail the way a killed connection does: the connection's termination
    wakes the feed, then the poll raises StoreUnavailable. Later polls hand out the scripted results."""

    def __init__(self, failures: int, polls: list[PollResult]) -> None:
        super().__init__(polls)
        self.failures = failures
        self.attempts = 0
        self.wake: Any = None
        self.connections: list[FakeConnection] = []

    async def connect(self, wake: Callable[..., None], *, listen: bool) -> FeedConnection:
        self.wake = wake
        self.connections.append(FakeConnection())
        return self.connections[-1]

    async def poll(
        self, conn: FeedConnection, lower: int, extra: Sequence[int], slots: bytes | None = None
    ) -> PollResult:
        self.attempts += 1
        if self.attempts <= self.failures:
            self.wake()  # the lost connection's termination listener fires first
            raise StoreUnavailable("terminating connection due to administrator command")
        return await super().poll(conn, lower, extra)


async def test_a_failing_feed_reports_it_backs_off_and_delivers_once_polls_succeed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A poll failure sets statistics().failing and drops the connection; the next good poll clears it."""
    monkeypatch.setattr("graphcache.storage._feed._backoff", lambda base, attempt: 0.0)
    outbox = FailingOutbox(2, [PollResult(100, 101, [], [("a", 1, 0.0, None)]), PollResult(101, 101, [], [])])
    feed = PostgresFeed(outbox, 90, listen=False, poll_interval=0.01)
    outbox.feed = feed
    assert feed.statistics().failing is False
    with anyio.fail_after(10):  # a hang guard
        first = await feed.__anext__()
        assert (first.root_id, first.version) == ("a", 1)
        statistics = feed.statistics()
        assert (statistics.failed, statistics.polls, statistics.failing) == (2, 1, False)
        assert [conn.terminated for conn in outbox.connections] == [True, True, False]
        assert [change async for change in feed] == []
    assert outbox.attempts == 4


async def test_a_back_off_is_not_cut_short_by_the_lost_connections_wake_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a failed poll the feed waits out its back-off even though the dead connection woke it."""
    monkeypatch.setattr("graphcache.storage._feed._backoff", lambda base, attempt: 3600.0)
    outbox = FailingOutbox(1, [PollResult(100, 101, [], [])])
    feed = PostgresFeed(outbox, 90, listen=False, poll_interval=0.01)
    ended = anyio.Event()

    async def consume() -> None:
        assert [change async for change in feed] == []
        ended.set()

    with anyio.fail_after(10):  # a hang guard
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            assert outbox.attempts == 1
            assert feed.statistics().failing
            await feed.aclose()  # the only thing that cuts a back-off short
            await ended.wait()
    assert outbox.attempts == 1


def test_feed_statistics_grow_with_defaulted_fields_at_the_end() -> None:
    """FeedStatistics built from the seven original fields still works; the later ones have defaults."""
    statistics = FeedStatistics(1, 0, 2, 0, 1, True, 5)
    assert (statistics.failing, statistics.rows) == (False, 0)
    assert FeedStatistics._fields[-2:] == ("failing", "rows")
