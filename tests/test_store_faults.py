"""Fault injection against a private PostgreSQL: killed backends and fast restarts while commits flow.

Whatever the fault, a PostgresStore's methods raise only StoreUnavailable (never a raw asyncpg, OS or
asyncio error such as asyncpg's "cannot switch to state 12; another operation is in progress"), its feed
never raises or ends, and once the fault stops the feed delivers every root's final committed version.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import asyncpg
import pytest

from graphcache.storage import PostgresStore, StoreUnavailable, Upsert
from graphcache.storage._feed import PostgresFeed
from tests._pg_servers import PrivatePostgres

pytestmark = [pytest.mark.anyio, pytest.mark.fault]

T = TypeVar("T")

ROOTS = [f"root{index}" for index in range(8)]
WRITERS = 4
LOADERS = 2
STORM_SECONDS = 8.0
KILL_EVERY = 0.05
RETRY_PAUSE = 0.02
"""Pause of a worker between a StoreUnavailable and its next try (so a down server is not hammered)."""
KILL_CLIENT_BACKENDS = (
    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE pid <> pg_backend_pid() AND datname = current_database() AND backend_type = 'client backend'"
)


@dataclass
class Load:
    """Writers, loaders and a feed reader working a store, and everything they saw."""

    store: PostgresStore
    feed: PostgresFeed
    stop: anyio.Event = field(default_factory=anyio.Event)
    commits: int = 0
    unavailable: int = 0
    wrong: list[BaseException] = field(default_factory=list)  # anything but StoreUnavailable
    delivered: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    feed_outcome: BaseException | str | None = None
    feed_closed_by_us: bool = False
    target: dict[str, int] | None = None
    caught_up: anyio.Event = field(default_factory=anyio.Event)
    failing_when_caught_up: bool | None = None

    async def call(self, call: Awaitable[T]) -> T | None:
        """Await ``call``; a StoreUnavailable is counted (None), anything else is recorded as wrong."""
        try:
            return await call
        except StoreUnavailable:
            self.unavailable += 1
            await anyio.sleep(RETRY_PAUSE)
        except Exception as exc:  # the point of the test: nothing but StoreUnavailable may get here
            self.wrong.append(exc)
        return None

    async def writer(self, index: int) -> None:
        step = 0
        while not self.stop.is_set():
            root = ROOTS[(index + step) % len(ROOTS)]
            op = Upsert(f"w{index}", root, {"step": step})
            if await self.call(self.store.apply(root, [op])) is not None:  # else: retry the same write
                self.commits += 1
                step += 1

    async def loader(self, index: int) -> None:
        root = ROOTS[index]
        store = self.store
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.load(root),
            lambda: store.load_many(ROOTS),
            lambda: store.version(root),
            store.cursor,
            lambda: store.root_versions(limit=5),
            lambda: store.save_checkpoint(f"loader{index}", 1),
            lambda: store.load_checkpoint(f"loader{index}"),
        ]
        while not self.stop.is_set():
            for method in calls:
                await self.call(method())

    async def reader(self) -> None:
        try:
            async for change in self.feed:
                self.delivered[change.root_id].append(change.version)
                self._check_caught_up()
            self.feed_outcome = "ended after aclose" if self.feed_closed_by_us else "ended by itself"
        except Exception as exc:
            self.feed_outcome = exc
        finally:
            self.caught_up.set()  # or never will be: do not keep finish() waiting

    def _check_caught_up(self) -> None:
        target = self.target
        if target is not None and all(
            self.delivered[root] and self.delivered[root][-1] >= version for root, version in target.items()
        ):
            self.caught_up.set()

    async def until_commits(self, more: int) -> None:
        """Wait until the writers committed ``more`` times from now (the store works again)."""
        goal = self.commits + more
        while self.commits < goal:  # noqa: ASYNC110  (our own workers' counter, under the test's deadline)
            await anyio.sleep(0.01)

    async def finish(self) -> None:
        """After the fault: read every root's committed version, wait for the feed to deliver it, close it."""
        target = {}
        for root in ROOTS:
            while (version := await self.call(self.store.version(root))) is None and not self.wrong:
                pass  # pooled connections may still be dead: the next try gets a new one
            if version is not None:
                target[root] = version
        self.target = target
        if not self.wrong:  # else check() reports it; there is nothing to wait for
            self._check_caught_up()
            await self.caught_up.wait()
        self.failing_when_caught_up = self.feed.statistics().failing
        self.feed_closed_by_us = True
        await self.feed.aclose()

    def check(self) -> None:
        assert not self.wrong, f"{len(self.wrong)} calls raised other errors, e.g. {self.wrong[0]!r}"
        assert self.feed_outcome == "ended after aclose", f"the feed ended early: {self.feed_outcome!r}"
        assert {root: self.delivered[root][-1] for root in ROOTS} == self.target
        for root in ROOTS:
            versions = self.delivered[root]
            assert versions == sorted(set(versions)), f"{root}: not increasing: {versions}"
        assert self.failing_when_caught_up is False


@contextlib.asynccontextmanager
async def running_load(server: PrivatePostgres, schema: str) -> AsyncIterator[Load]:
    """4 writers, 2 loaders and a feed reader on a fresh store; on exit the load stops, the feed is read
    up to every root's committed version and closed, and the store is closed."""
    store = await PostgresStore.connect(server.dsn, schema, poll_interval=0.05, command_timeout=2.0)
    try:
        for root in ROOTS:
            await store.create_root(root, {})
        load = Load(store, store.changes(after=await store.cursor()))
        async with anyio.create_task_group() as group:
            group.start_soon(load.reader)
            async with anyio.create_task_group() as workers:
                for index in range(WRITERS):
                    workers.start_soon(load.writer, index)
                for index in range(LOADERS):
                    workers.start_soon(load.loader, index)
                await load.until_commits(20)  # the load runs before the fault starts
                yield load
                load.stop.set()
            await load.finish()
    finally:
        await store.aclose()


async def postmaster_started(server: PrivatePostgres) -> Any:
    conn = await asyncpg.connect(server.dsn)
    try:
        return await conn.fetchval("SELECT pg_postmaster_start_time()")
    finally:
        await conn.close()


async def test_a_storm_of_killed_backends_raises_only_store_unavailable_and_loses_no_change(
    private_postgres: PrivatePostgres,
) -> None:
    """Backends killed every 50 ms under load: only StoreUnavailable escapes; the feed delivers it all."""
    terminated = 0
    with anyio.fail_after(28):  # a hang guard, not a performance bound
        async with running_load(private_postgres, "faults_storm") as load:
            killer = await asyncpg.connect(private_postgres.dsn)
            try:
                commits_before = load.commits
                with anyio.move_on_after(STORM_SECONDS):
                    while True:
                        terminated += await killer.fetchval(KILL_CLIENT_BACKENDS)
                        await anyio.sleep(KILL_EVERY)
            finally:
                await killer.close()
            committed_during_storm = load.commits - commits_before
            await load.until_commits(20)  # and the store works again
    assert terminated > 0, "the fault never fired"
    assert load.unavailable > 0, "no call ever saw the fault"
    assert committed_during_storm > 0
    assert load.feed.statistics().connects >= 2, "the feed's own connection was never killed"
    load.check()


async def test_fast_restarts_raise_only_store_unavailable_and_lose_no_change(
    private_postgres: PrivatePostgres,
) -> None:
    """Fast restarts under load: only StoreUnavailable escapes; the feed says failing, then misses nothing."""
    with anyio.fail_after(28):  # a hang guard, not a performance bound
        started = await postmaster_started(private_postgres)
        async with running_load(private_postgres, "faults_restart") as load:
            for _ in range(2):
                await anyio.to_thread.run_sync(private_postgres.stop, "fast")
                try:
                    while not load.feed.statistics().failing:  # noqa: ASYNC110  (our own feed's state)
                        await anyio.sleep(0.01)
                finally:
                    await anyio.to_thread.run_sync(private_postgres.start)
                await load.until_commits(20)  # the store works again after the restart
                while load.feed.statistics().failing:  # noqa: ASYNC110  (and the feed polls again)
                    await anyio.sleep(0.01)
        restarted = await postmaster_started(private_postgres)
    assert restarted > started, "the server was never restarted"
    assert load.unavailable > 0, "no call ever saw the fault"
    assert load.feed.statistics().failed >= 2
    load.check()


async def backend_pid(store: PostgresStore) -> int:
    async with store._connection() as conn:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        return pid


async def test_a_pooled_connection_left_in_an_unknown_state_is_replaced_not_reused(
    private_postgres: PrivatePostgres,
) -> None:
    """After a client-side protocol error the pool hands out a new backend; after a server error, the same."""
    async with await PostgresStore.connect(private_postgres.dsn, "faults_pool", pool_size=1) as store:
        first = await backend_pid(store)
        with pytest.raises(asyncpg.exceptions.InternalClientError):
            async with store._connection():
                raise asyncpg.exceptions.InternalClientError("cannot switch to state 12")
        second = await backend_pid(store)
        assert second != first
        with pytest.raises(asyncpg.exceptions.UndefinedTableError):
            async with store._connection() as conn:
                await conn.execute("SELECT * FROM no_such_table")
        assert await backend_pid(store) == second
