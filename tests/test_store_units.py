"""Unit-level specs: the apply plan, MemoryStore's own knobs, and the feed's ordering rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from storage import (
    ConcurrencyConflict,
    Delete,
    InvalidOperation,
    MemoryStore,
    StoreUnavailable,
    Upsert,
)
from storage._feed import PollResult, PostgresFeed, _per_root_increasing
from storage._validate import RowInfo, check_ops, plan_apply

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
    rows = [("a", 3, 0.0), ("b", 1, 0.0), ("a", 2, 0.0), ("b", 2, 0.0), ("a", 4, 0.0)]
    assert _per_root_increasing(rows) == [
        ("a", 2, 0.0),
        ("b", 1, 0.0),
        ("a", 3, 0.0),
        ("b", 2, 0.0),
        ("a", 4, 0.0),
    ]


class FakeConnection:
    def is_closed(self) -> bool:
        return False

    async def close(self) -> None:
        pass


class ScriptedStore:
    """Stands in for PostgresStore behind a feed: hands out scripted polls, then closes the feed."""

    _retention = 3600.0

    def __init__(self, polls: list[PollResult]) -> None:
        self.polls = polls
        self.asked: list[tuple[int, list[int]]] = []
        self.feed: PostgresFeed | None = None

    async def _open_feed_connection(self, wake: Any, *, listen: bool) -> Any:
        return FakeConnection()

    async def _poll(self, conn: Any, lower: int, extra: Sequence[int]) -> PollResult:
        self.asked.append((lower, list(extra)))
        if len(self.asked) == len(self.polls) and self.feed is not None:
            await self.feed.aclose()
        return self.polls[len(self.asked) - 1]

    async def prune_outbox(self) -> int:
        return 0

    def _forget(self, feed: PostgresFeed) -> None:
        pass


async def test_feed_skips_superseded_versions_and_tracks_the_snapshot() -> None:
    """A root version lower than one already delivered is skipped; each poll asks from xmax and xip."""
    store = ScriptedStore(
        [
            PollResult(100, 105, [100, 103], [("a", 5, 0.0), ("b", 1, 0.0)]),
            PollResult(103, 110, [103], [("a", 4, 0.0), ("a", 6, 0.0)]),
            PollResult(110, 110, [], [("a", 6, 0.0), ("b", 2, 0.0)]),
        ]
    )
    feed = PostgresFeed(store, 90, listen=False, poll_interval=0.01)  # type: ignore[arg-type]
    store.feed = feed
    got = [(change.root_id, change.version, change.cursor) async for change in feed]
    assert got == [("a", 5, 90), ("b", 1, 90), ("a", 6, 100), ("b", 2, 103)]
    assert store.asked == [(90, []), (105, [100, 103]), (110, [103])]
    assert feed.statistics().superseded == 2


async def test_feed_polls_start_at_least_min_poll_interval_apart() -> None:
    """A feed with rows on every poll still spaces its polls: n polls span at least n - 1 intervals."""
    polls = [PollResult(100 + i, 101 + i, [], [("a", i + 1, 0.0)]) for i in range(10)]
    store = ScriptedStore(polls)
    feed = PostgresFeed(store, 90, listen=False, poll_interval=1.0, min_poll_interval=0.02)  # type: ignore[arg-type]
    store.feed = feed
    began = anyio.current_time()
    got = [change.version async for change in feed]
    elapsed = anyio.current_time() - began
    assert got == list(range(1, 11))
    assert len(store.asked) == 10
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
