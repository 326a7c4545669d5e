# ruff: noqa: S608  (schema names come from the pg_schema fixture; values are bind parameters)
"""PostgresStore's change feed under the failures it must survive (shared server, own schema)."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import pytest

from graphcache.storage import SLOTS, Change, PostgresStore, StoreUnavailable, Upsert
from graphcache.storage._postgres import _poll_upper_bound
from graphcache.storage._schema import SCHEMA_VERSION
from graphcache.storage._slots import slot_bitmap
from tests._shared_fixtures import Connect
from tests.test_store_contract import collect_until, writer_on_own_root

pytestmark = pytest.mark.anyio


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


async def apply_waits_for_a_lock(conn: asyncpg.Connection) -> bool:
    """Whether the server shows an apply waiting for a lock. Inside a transaction pg_stat_activity is read
    once and then cached, so the cache is cleared first: a poll must see the server as it is now."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND query LIKE '%lock_structure%'"
    )
    return bool(found)


async def test_apply_that_waited_for_the_root_lock_plans_on_what_its_holder_committed(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """apply locks the root and reads the structure in one round trip; after waiting for the lock it
    still sees the holder's committed rows (a new parent, a bumped row version), not its older snapshot."""
    store = await connect()
    await store.create_root("r", {})
    await store.apply("r", [Upsert("c", "r", {"n": 0})])  # r at 2, c at row version 1
    s = f'"{pg_schema}"'
    holder = raw.transaction()
    await holder.start()
    await raw.execute(f"SELECT version FROM {s}.roots WHERE root_id = 'r' FOR UPDATE")
    await raw.execute(f"UPDATE {s}.nodes SET row_version = 2 WHERE root_id = 'r' AND id = 'c'")
    await raw.execute(
        f"INSERT INTO {s}.nodes (root_id, id, parent_id, data, row_version) VALUES ('r', 'd', 'r', '{{}}', 1)"
    )
    await raw.execute(f"UPDATE {s}.roots SET version = 3 WHERE root_id = 'r'")
    ops = [Upsert("c", "r", {"n": 1}, expected_row_version=2), Upsert("e", "d", {})]
    result: list[int] = []

    async def waiting_apply() -> None:
        result.append(await store.apply("r", ops))

    async with anyio.create_task_group() as group:
        group.start_soon(waiting_apply)
        with anyio.fail_after(10):  # the server reports the apply as waiting for the holder's lock
            while not await apply_waits_for_a_lock(raw):  # noqa: ASYNC110  (server state, under a deadline)
                await anyio.sleep(0.01)
        assert result == [], "apply went ahead while the root was locked"
        await holder.commit()
    assert result == [4]
    graph = await store.load("r")
    assert graph.version == 4
    assert (graph.nodes["c"].row_version, graph.nodes["c"].data) == (3, {"n": 1})
    assert graph.nodes["e"].parent_id == "d"


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
    assert [tuple(row) for row in levels] == [(SCHEMA_VERSION,)]
    await stores[0].create_root("r", {})
    assert [await store.version("r") for store in stores] == [1] * 6


async def test_a_version_1_schema_is_upgraded_on_connect(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """A schema left at version 1 (no lock_structure, no checkpoints) gets them on the next connect."""
    old = await connect()
    await old.create_root("r", {"kept": True})
    await old.aclose()
    s = f'"{pg_schema}"'
    await raw.execute(f"DROP FUNCTION {s}.lock_structure(text)")
    await raw.execute(f"DROP TABLE {s}.checkpoints, {s}.outbox_pruned")
    await raw.execute(f"DROP INDEX {s}.roots_by_code_point")
    await raw.execute(f"UPDATE {s}.schema_version SET version = 1")
    store = await connect()
    assert await raw.fetchval(f"SELECT version FROM {s}.schema_version") == SCHEMA_VERSION
    assert await store.apply("r", [Upsert("c", "r", {})]) == 2
    assert (await store.load("r")).nodes["r"].data == {"kept": True}
    assert await store.load_checkpoint("n") is None


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


async def test_the_poll_reads_a_fresh_outbox_by_its_xid_index(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """A never-analysed outbox of 5,000 rows: the poll's plan (custom and generic) uses the xid index.

    A seq scan here is a real cost: every feed polls up to 1/min_poll_interval times a second.
    """
    store = await connect()
    await raw.execute(
        f'INSERT INTO "{pg_schema}".outbox (xid, root_id, version)'
        " SELECT 1000 + g, 'r' || (g % 8), g FROM generate_series(1, 5000) AS g"
    )
    poll_sql = store._sql.poll
    plans = []
    for slots in (None, slot_bitmap(range(0, SLOTS, 2))):  # every slot, and a node's share of them
        args = (5990, [5985], _poll_upper_bound(5990), slots)
        plans.append(await raw.fetchval(f"EXPLAIN (FORMAT JSON) {poll_sql}", *args))
        async with raw.transaction():
            await raw.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            plans.append(await raw.fetchval(f"EXPLAIN (FORMAT JSON) {poll_sql}", *args))
    for plan in plans:
        scans = list(_plan_nodes(json.loads(plan)[0]["Plan"]))
        on_outbox = [node["Node Type"] for node in scans if node.get("Relation Name") == "outbox"]
        assert on_outbox, scans
        assert "Seq Scan" not in on_outbox, plan


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


async def test_a_busy_feed_stops_listening_and_an_idle_one_listens_again(connect: Connect) -> None:
    """Under a stream of commits the feed polls at its own pace without LISTEN; once the stream stops it
    LISTENs again, so with a 60 s poll interval a lone commit still arrives at once (by its NOTIFY)."""
    store = await connect(poll_interval=60.0, min_poll_interval=0.01)
    await store.create_root("r", {})
    feed = store.changes(after=await store.cursor())
    stopped_listening = anyio.Event()
    got: dict[str, list[int]] = defaultdict(list)

    async def stream() -> None:
        step = 0
        while not stopped_listening.is_set():
            step += 1
            await store.apply("r", [Upsert("x", "r", {"step": step})])

    async def watch() -> None:
        async for change in feed:
            got[change.root_id].append(change.version)
            if not feed.statistics().listening:
                stopped_listening.set()
                return

    async with feed:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(stream)
                group.start_soon(watch)
            await collect_until(feed, {"r": await store.version("r")}, got)
        lone: list[int] = []

        async def read_the_lone_commit() -> None:
            async for change in feed:  # its first poll finds nothing, so the feed LISTENs and waits
                lone.append(change.version)
                return

        with anyio.fail_after(10):  # far below the 60 s poll interval: only a NOTIFY can wake it in time
            async with anyio.create_task_group() as group:
                group.start_soon(read_the_lone_commit)
                while not feed.statistics().listening:  # noqa: ASYNC110  (our own feed's state, under a deadline)
                    await anyio.sleep(0.005)
                version = await store.apply("r", [Upsert("z", "r", {})])
        assert lone == [version]
    assert got["r"] == sorted(set(got["r"]))
    assert got["r"][-1] < lone[0] == await store.version("r")
