# ruff: noqa: S608  (schema names come from the pg_schema fixture; values are bind parameters)
"""PostgresStore's change feed under the failures it must survive (shared server, own schema)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

from storage import Change, PostgresStore, StoreUnavailable, Upsert
from tests.test_store_contract import collect_until, writer_on_own_root

pytestmark = pytest.mark.anyio

Connect = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def connect(postgres_dsn: str, pg_schema: str) -> AsyncIterator[Connect]:
    """Open PostgresStores on this test's schema; all are closed afterwards."""
    opened: list[PostgresStore] = []

    async def open_store(**options: Any) -> PostgresStore:
        options.setdefault("poll_interval", 0.1)
        store = await PostgresStore.connect(postgres_dsn, pg_schema, **options)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.aclose()


@pytest.fixture
async def raw(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the shared server."""
    conn = await asyncpg.connect(postgres_dsn)
    yield conn
    await conn.close()


async def outbox_xids(raw: asyncpg.Connection, schema: str) -> dict[tuple[str, int], int]:
    rows = await raw.fetch(f'SELECT root_id, version, xid FROM "{schema}".outbox')
    return {(row["root_id"], row["version"]): row["xid"] for row in rows}


async def read_until(feed: Any, root_id: str, version: int) -> list[Change]:
    """Read until ``root_id`` reached ``version``; the deadline only guards against a hang."""
    got: dict[str, list[int]] = defaultdict(list)
    return await collect_until(feed, {root_id: version}, got)


async def test_feed_survives_the_listener_being_killed_mid_burst(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """pg_terminate_backend on the feed's LISTEN connection mid-burst: nothing lost, it comes back."""
    store = await connect()
    roots = [f"root{index}" for index in range(4)]
    feed = store.changes(after=await store.cursor())
    for root in roots:
        await store.create_root(root, {})
    await read_until(feed, roots[-1], 1)  # the feed is now listening
    assert feed.statistics().listening
    commits = 0
    halfway = anyio.Event()

    async def writer(seed: int) -> None:
        nonlocal commits
        rng = random.Random(seed)
        for step in range(10):
            root = rng.choice(roots)
            await store.apply(root, [Upsert(f"w{seed}", root, {"step": step})])
            commits += 1
            if commits == 100:
                halfway.set()

    async def killer() -> None:
        await halfway.wait()
        killed = await raw.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            f"graphcache feed {pg_schema}",
        )
        assert killed == 1

    got: dict[str, list[int]] = defaultdict(list)
    async with feed:
        async with anyio.create_task_group() as group:
            group.start_soon(killer)
            for seed in range(20):
                group.start_soon(writer, seed)
        want = {root: await store.version(root) for root in roots}
        await collect_until(feed, want, got)
        with anyio.fail_after(30):  # eventually: the feed notices the loss at its next step and reconnects
            while feed.statistics().connects < 2 or not feed.statistics().listening:
                version = await store.apply(roots[0], [Upsert("probe", roots[0], {})])
                await read_until(feed, roots[0], version)
    assert {root: got[root][-1] for root in roots} == want
    assert all(got[root] == sorted(set(got[root])) for root in roots)


async def test_feed_without_notifications_still_delivers_everything(connect: Connect) -> None:
    """With LISTEN disabled (every NOTIFY lost), polling alone delivers each root's latest version."""
    store = await connect(listen=False, poll_interval=0.05)
    roots = ["a", "b", "c"]
    feed = store.changes(after=await store.cursor())
    for root in roots:
        await store.create_root(root, {})
    got: dict[str, list[int]] = defaultdict(list)
    async with feed:
        async with anyio.create_task_group() as group:
            group.start_soon(collect_until_committed, store, feed, roots, got)
            for seed in range(10):
                group.start_soon(writer_on_own_root, store, roots, seed)
        want = {root: await store.version(root) for root in roots}
        await collect_until(feed, want, got)
        statistics = feed.statistics()
    assert {root: got[root][-1] for root in roots} == want
    assert all(got[root] == sorted(set(got[root])) for root in roots)
    assert statistics.connects >= 1
    assert not statistics.listening


async def collect_until_committed(
    store: PostgresStore, feed: Any, roots: list[str], got: dict[str, list[int]]
) -> None:
    """Consume while the writers run (so delivery interleaves with commits)."""
    await collect_until(feed, dict.fromkeys(roots, 2), got)


async def test_a_transaction_that_commits_late_is_still_delivered(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """A writer that took its xid first and commits after later ones were delivered is delivered too."""
    store = await connect()
    feed = store.changes(after=await store.cursor())
    await store.create_root("late", {})
    await store.create_root("early", {})
    s = f'"{pg_schema}"'
    async with feed:
        late = raw.transaction()
        await late.start()
        late_xid = await raw.fetchval("SELECT pg_current_xact_id()::text::bigint")
        for step in range(3):
            await store.apply("early", [Upsert("x", "early", {"step": step})])
        early = await read_until(feed, "early", 4)
        version = await raw.fetchval(
            f"UPDATE {s}.roots SET version = version + 1 WHERE root_id = 'late' RETURNING version"
        )
        await raw.execute(f"INSERT INTO {s}.outbox (root_id, version) VALUES ('late', $1)", version)
        await late.commit()
        delivered = await read_until(feed, "late", 2)
    xids = await outbox_xids(raw, pg_schema)
    assert all(late_xid < xids[("early", v)] for v in (2, 3, 4)), "the late writer really had the oldest xid"
    assert (delivered[-1].root_id, delivered[-1].version) == ("late", 2)
    async with store.changes(after=early[-1].cursor) as resumed:  # a cursor taken before it committed
        assert ("late", 2) in {(c.root_id, c.version) for c in await read_until(resumed, "late", 2)}


async def test_resuming_delivers_exactly_the_rows_from_the_cursor_on(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """From cursor c the feed delivers every outbox row with xid >= c and none below it."""
    store = await connect()
    feed = store.changes(after=await store.cursor())
    await store.create_root("r", {})
    for step in range(5):
        await store.apply("r", [Upsert("x", "r", {"step": step})])
    async with feed:
        cursor = (await read_until(feed, "r", 6))[-1].cursor
    for step in range(5):
        await store.apply("r", [Upsert("x", "r", {"step": step})])
    async with store.changes(after=cursor) as resumed:
        delivered = await read_until(resumed, "r", 11)
    xids = await outbox_xids(raw, pg_schema)
    assert {(c.root_id, c.version) for c in delivered} == {key for key, xid in xids.items() if xid >= cursor}
    assert {("r", version) for version in range(7, 12)} <= {(c.root_id, c.version) for c in delivered}


async def test_prune_outbox_deletes_only_rows_past_retention(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """prune_outbox removes the outbox rows older than the retention period and keeps the rest."""
    store = await connect(retention=3600)
    await store.create_root("r", {})
    for step in range(4):
        await store.apply("r", [Upsert("x", "r", {"step": step})])
    await raw.execute(
        f'UPDATE "{pg_schema}".outbox SET committed_at = committed_at - 7200 WHERE version <= 3'
    )
    assert await store.prune_outbox() == 3
    assert sorted(key[1] for key in await outbox_xids(raw, pg_schema)) == [4, 5]


async def test_concurrent_connects_migrate_the_schema_once(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """Many stores connecting to a fresh schema at once all succeed and leave one schema version row."""
    stores: list[PostgresStore] = []

    async def open_one() -> None:
        stores.append(await connect(pool_size=1))

    async with anyio.create_task_group() as group:
        for _ in range(6):
            group.start_soon(open_one)
    assert len(stores) == 6
    levels = await raw.fetch(f'SELECT version FROM "{pg_schema}".schema_version')
    assert [tuple(row) for row in levels] == [(1,)]
    await stores[0].create_root("r", {})
    assert [await store.version("r") for store in stores] == [1] * 6


async def test_repr_shows_live_state(connect: Connect, pg_schema: str) -> None:
    """The store's and the feed's repr show address, schema, pool, feeds and listening state."""
    store = await connect(listen=False)
    feed = store.changes(after=await store.cursor())
    assert f'127.0.0.1:5432 schema "{pg_schema}"' in repr(store)
    assert "feeds: 1" in repr(store)
    watermark = feed.statistics().watermark
    assert (
        repr(feed) == f"<PostgresFeed [disconnected | watermark: {watermark} | buffered: 0 | delivered: 0]>"
    )
    await store.create_root("r", {})
    await read_until(feed, "r", 1)
    assert "polling only" in repr(feed)
    assert "delivered: 1]" in repr(feed)
    await feed.aclose()
    assert "feeds: 0" in repr(store)
    assert "closed" in repr(feed)
    await store.aclose()
    assert repr(store).startswith("<PostgresStore [closed")
    with pytest.raises(StoreUnavailable):
        await store.version("r")
