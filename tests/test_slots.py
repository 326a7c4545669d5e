# ruff: noqa: S608  (schema names come from the pg_schema fixture; values are bind parameters)
"""The feed partitioned by slot: Python and PostgreSQL agree on every root's slot, a feed reads only its
slots, and nodes split the feed between them without losing a change at a hand-over."""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from graphcache.actors import Node, Ring, graph_key
from graphcache.cache import MemoryCache
from graphcache.storage import SLOTS, Change, Graph, MemoryStore, PostgresStore, Upsert, slot_of
from tests._actor_fakes import ManualMembership

pytestmark = pytest.mark.anyio

IDS = ["r", "order-7", "", "ünïcödé-Ω", "tenant/a b", "x" * 500, "\U0001f600", "0", "'; DROP TABLE x; --"]


async def test_python_and_postgresql_compute_the_same_slot(
    postgres_dsn: str, pg_schema: str, raw: asyncpg.Connection
) -> None:
    """storage.slot_of and the store's SQL slot_of agree, and the outbox's slot column is it."""
    store = await PostgresStore.connect(postgres_dsn, pg_schema)
    try:
        ids = [*IDS, *(f"root-{i}" for i in range(200))]
        found = await raw.fetch(
            f'SELECT id, "{pg_schema}".slot_of(id) AS slot FROM unnest($1::text[]) AS id', ids
        )
        assert {row["id"]: row["slot"] for row in found} == {i: slot_of(i) for i in ids}
        assert all(0 <= slot_of(i) < SLOTS for i in ids)
        await store.create_root("order-7", {})
        assert await raw.fetchval(f'SELECT slot FROM "{pg_schema}".outbox') == slot_of("order-7")
    finally:
        await store.aclose()


async def test_a_feed_with_slots_reads_only_their_changes(postgres_dsn: str, pg_schema: str) -> None:
    """A feed asked for some slots delivers exactly the changes of roots in them, and counts only those."""
    store = await PostgresStore.connect(postgres_dsn, pg_schema, poll_interval=0.05)
    try:
        roots = [f"f{i}" for i in range(30)]
        wanted = frozenset(slot_of(root) for root in roots[::3])
        mine = [root for root in roots if slot_of(root) in wanted]
        feed = store.changes(after=await store.cursor(), slots=lambda: wanted)
        for root in roots:
            await store.create_root(root, {})
        got: list[Change] = []
        with anyio.fail_after(10):
            async for change in feed:
                got.append(change)
                if len(got) == len(mine):
                    break
        assert sorted(change.root_id for change in got) == sorted(mine)
        assert feed.statistics().rows == len(mine)
        await feed.aclose()
    finally:
        await store.aclose()


async def test_two_nodes_split_the_feed_and_a_hand_over_loses_nothing(
    postgres_dsn: str, pg_schema: str
) -> None:
    """Each change is read by the one node owning its slot; when b leaves, a re-reads and takes b's roots."""
    store = await PostgresStore.connect(postgres_dsn, pg_schema, poll_interval=0.05)
    roots = [f"s{i}" for i in range(40)]
    ring = Ring(["a", "b"])
    theirs = [root for root in roots if ring.owner(root) == "b"]
    assert 0 < len(theirs) < len(roots)
    for root in roots:
        await store.create_root(root, {})
    views = {"a": ManualMembership({"a", "b"}), "b": ManualMembership({"a", "b"})}
    try:
        async with MemoryCache() as cache:
            node_a = Node(store=store, cache=cache, node_id="a", membership=views["a"], handoff=30.0)
            node_b = Node(store=store, cache=cache, node_id="b", membership=views["b"], handoff=30.0)
            async with node_a:
                async with node_b:
                    first = {root: await store.apply(root, [Upsert("c", root, {"n": 1})]) for root in roots}
                    await until_cached(cache, first)
                    a, b = node_a.statistics(), node_b.statistics()
                    # Neither read a row of the other's slots (it would have ignored it). The feed is at
                    # least once from "now" (a snapshot's xmin, which another session's open transaction
                    # can hold back), so each may also have re-read its roots' creation: 2 rows a root.
                    assert (a.ignored, b.ignored) == (0, 0)
                    assert len(roots) - len(theirs) <= a.feed_rows <= 2 * (len(roots) - len(theirs))
                    assert len(theirs) <= b.feed_rows <= 2 * len(theirs)
                # b is gone; commits to its roots land before a hears of it
                second = {root: await store.apply(root, [Upsert("c", root, {"n": 2})]) for root in theirs}
                views["a"].publish({"a"})
                await until_cached(cache, second)
                assert node_a.statistics().rewinds == 1
    finally:
        await store.aclose()


async def until_cached(cache: MemoryCache, versions: dict[str, int]) -> None:
    """Wait (bounded) until every root is cached at its version."""
    with anyio.fail_after(15):
        for root, version in versions.items():
            # The cache has no change event to wait on: poll it, bounded by the deadline above.
            while (item := await cache.get(graph_key(root), type=Graph)) is None or item.version < version:  # noqa: ASYNC110
                await anyio.sleep(0.02)


async def test_a_new_owner_resumes_its_slots_where_the_previous_owner_left_off() -> None:
    """A node without a checkpoint of its own starts at the checkpoint of the node that read its slots
    before, so commits made while no node ran reach it through the feed; with none, it starts from now."""
    async with MemoryStore() as store, MemoryCache() as cache:
        roots = [f"m{i}" for i in range(10)]
        for root in roots:
            await store.create_root(root, {})
        async with Node(store=store, cache=cache, node_id="old", checkpoint_save_interval=0.01) as old:
            version = await old.apply(roots[0], [Upsert("c", roots[0], {"n": 1})])
            actor = old.actor(roots[0])
            assert actor is not None
            await actor.until_built(version)
        saved = await store.load_checkpoint("old")
        assert saved is not None
        assert saved.slots is None  # alone, it read every slot
        while_down = {root: await store.apply(root, [Upsert("c", root, {"n": 2})]) for root in roots}
        async with Node(store=store, cache=cache, node_id="new", sweep_interval=3600) as new:
            assert new.statistics().resumed_from == saved.cursor
            await until_cached(cache, while_down)
        async with Node(store=MemoryStore(), cache=cache, node_id="fresh") as fresh:
            assert fresh.statistics().resumed_from is None
