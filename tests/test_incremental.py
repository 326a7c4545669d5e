# ruff: noqa: S608  (schema names come from the pg_schema fixture; values are bind parameters)
"""Incremental rebuilds: a graph patched from the feed's row images equals a snapshot load, at every
version; and the actor falls back to a snapshot load on a gap, a doubt, a lost key or a new life."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphcache.actors import ActorDead, Changed, Node, Rebuilder, RootActor, graph_key
from graphcache.actors._live import Doubt, LiveGraph
from graphcache.cache import MemoryCache
from graphcache.storage import (
    Change,
    Delete,
    Graph,
    GraphSpec,
    GraphStore,
    InvalidOperation,
    MemoryStore,
    Op,
    PostgresStore,
    RowImage,
    Upsert,
    track_graph,
)
from graphcache.storage import Node as Row
from tests._spec_shop import create_shop, shop_schema, spec_toml

pytestmark = pytest.mark.anyio

# One abstract step: (kind, which node, which other node, a payload); interpreted against the graph.
Step = tuple[str, int, int, int]
steps = st.tuples(
    st.sampled_from(["add", "add", "update", "move", "delete"]),
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.integers(0, 3),
)
transactions = st.lists(st.lists(steps, min_size=1, max_size=4), min_size=1, max_size=25)


def interpret(graph: Graph, transaction: Sequence[Step], fresh: list[int]) -> list[Op]:
    """Ops for one transaction, chosen against ``graph`` (some may be refused: cycles, gone nodes)."""
    ids = sorted(graph.nodes)
    ops: list[Op] = []
    for kind, a, b, payload in transaction:
        node = ids[a % len(ids)]
        other = ids[b % len(ids)]
        parent = graph.nodes[node].parent_id if node in graph.nodes else graph.root_id
        match kind:
            case "add":
                fresh[0] += 1
                new = f"n{fresh[0]}"
                ops.append(Upsert(new, other, {"payload": payload, "tags": ["x"] * payload}))
                ids.append(new)
            case "update":
                ops.append(Upsert(node, parent if node != graph.root_id else None, {"payload": payload}))
            case "move" if node != graph.root_id:
                ops.append(Upsert(node, other, {"moved": payload}))
            case "delete" if node != graph.root_id:
                ops.append(Delete(node))
    return ops


async def replay_and_compare(store: GraphStore, root_id: str, plan: list[list[Step]]) -> int:
    """Apply ``plan``; after each commit patch the kept graph with the feed's images and compare it with
    a snapshot load at that version. Returns how many versions were compared."""
    feed: Any = store.changes(after=await store.cursor())
    live = LiveGraph(await store.load(root_id), 0)
    fresh = [0]
    compared = 0
    try:
        for transaction in plan:
            ops = interpret(live.graph(), transaction, fresh)
            if not ops:
                continue
            try:
                version = await store.apply(root_id, ops)
            except InvalidOperation:
                continue  # refused as a whole: nothing committed, no change in the feed
            change = await next_change(feed, root_id, live.version)
            assert change.version == version
            assert change.images is not None
            live.apply(change.version, change.images)
            assert live.graph() == await store.load(root_id)
            compared += 1
    finally:
        await feed.aclose()
    return compared


async def next_change(feed: Any, root_id: str, after: int) -> Change:
    """The feed's next change of ``root_id`` past version ``after`` (the feed delivers at least once,
    and may repeat changes committed around the cursor it started from)."""
    with anyio.fail_after(10):
        while True:
            change: Change = await feed.__anext__()
            if change.root_id == root_id and change.version > after:
                return change


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=transactions)
async def test_patched_graph_equals_the_snapshot_at_every_version_in_memory(plan: list[list[Step]]) -> None:
    """MemoryStore: the feed's images turn every version's graph into exactly the next one's."""
    async with MemoryStore() as store:
        await store.create_root("r", {"name": "root"})
        await replay_and_compare(store, "r", plan)


# -- LiveGraph on its own --------------------------------------------------------------------------------


def small_graph() -> Graph:
    return Graph(
        "r",
        3,
        {
            "r": Row("r", None, {}, 1),
            "a": Row("a", "r", {"x": 1}, 1),
            "b": Row("b", "a", {"x": 2}, 1),
        },
    )


def test_a_deletion_takes_the_subtree() -> None:
    """Deleting a node removes its descendants, as a snapshot after the store's deletion shows."""
    live = LiveGraph(small_graph(), 0)
    live.apply(4, [RowImage("a")])
    assert sorted(live.graph().nodes) == ["r"]


def test_images_that_do_not_fit_raise_doubt_and_change_nothing() -> None:
    """A parent the graph lacks, a cycle or a skipped version is a Doubt; the graph stays as it was."""
    before = small_graph()
    live = LiveGraph(before, 0)
    for version, images in [
        (4, [RowImage("c", "nowhere", {}, 1)]),
        (4, [RowImage("x", "r", {}, 1), RowImage("a", "b", {}, 2)]),  # a below its own child
        (4, [RowImage("z", None, {}, 1)]),  # a second node without a parent
        (6, [RowImage("c", "r", {}, 1)]),  # not the next version
    ]:
        with pytest.raises(Doubt):
            live.apply(version, images)
        assert live.graph() == before
        assert live.version == 3


def test_a_patched_graph_is_not_changed_by_later_patches() -> None:
    """The graph handed to a put keeps its content when the next version is patched in."""
    live = LiveGraph(small_graph(), 0)
    handed = live.graph()
    live.apply(4, [RowImage("b")])
    assert "b" in handed.nodes
    assert "b" not in live.graph().nodes


# -- the actor -----------------------------------------------------------------------------------------


class CountingStore:
    """A store that counts snapshot loads (``load`` and ``load_many``), delegating the rest."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.loads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load(self, root_id: str) -> Graph:
        self.loads += 1
        return await self.inner.load(root_id)

    async def load_many(self, root_ids: Sequence[str]) -> dict[str, Graph]:
        self.loads += len(root_ids)
        return await self.inner.load_many(root_ids)


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    async with MemoryStore() as store:
        await store.create_root("r", {"name": "root"})
        yield store


@contextlib.asynccontextmanager
async def patching_actor(
    store: MemoryStore, **options: Any
) -> AsyncIterator[tuple[RootActor, CountingStore, MemoryCache]]:
    """A running actor of root "r" on a store that counts its loads; unless ``max_live_graph_bytes`` says
    otherwise, it has built version 1 (one snapshot load) and keeps the graph. Stopped on leaving."""
    counting = CountingStore(store)
    async with MemoryCache() as cache, anyio.create_task_group() as tg:
        actor = RootActor("r", store=counting, cache=cache, min_rebuild_interval=0, **options)
        await tg.start(actor.run)
        if not options:
            actor.tell(Changed("r", 1))
            await actor.until_built(1)
        yield actor, counting, cache
        tg.cancel_scope.cancel()


async def cached(cache: MemoryCache) -> Graph | None:
    item = await cache.get(graph_key("r"), type=Graph)
    return None if item is None else item.value


async def commit(store: MemoryStore, feed: Any, ops: list[Op]) -> Change:
    await store.apply("r", ops)
    with anyio.fail_after(5):
        change: Change = await feed.__anext__()
    return change


async def test_contiguous_versions_are_patched_without_store_reads(store: MemoryStore) -> None:
    """After one snapshot load, versions that arrive with their images cost no store read."""
    feed = store.changes(after=await store.cursor()).__aiter__()
    async with patching_actor(store) as (actor, counting, cache):
        assert counting.loads == 1
        for index in range(20):
            change = await commit(store, feed, [Upsert(f"c{index}", "r", {"i": index})])
            actor.tell(Changed("r", change.version, images=change.images))
            await actor.until_built(change.version)
        assert counting.loads == 1
        assert await cached(cache) == await store.load("r")
        assert actor.patching
        actor.tell(Changed("r", 1))  # an old duplicate changes nothing


async def test_a_gap_or_a_version_without_images_loads_a_snapshot(store: MemoryStore) -> None:
    """A version whose images never arrived is loaded, and so is one told without images."""
    feed = store.changes(after=await store.cursor()).__aiter__()
    async with patching_actor(store) as (actor, counting, cache):
        await commit(store, feed, [Upsert("lost", "r", {})])  # version 2: its images are never told
        third = await commit(store, feed, [Upsert("c", "r", {})])
        actor.tell(Changed("r", third.version, images=third.images))
        await actor.until_built(3)
        assert counting.loads == 2
        fourth = await commit(store, feed, [Upsert("d", "r", {})])
        actor.tell(Changed("r", fourth.version))  # no images: a snapshot
        await actor.until_built(4)
        assert counting.loads == 3
        assert await cached(cache) == await store.load("r")


async def test_images_that_do_not_fit_load_a_snapshot(store: MemoryStore) -> None:
    """Images naming a parent the kept graph lacks are a doubt: the actor loads the version instead."""
    feed = store.changes(after=await store.cursor()).__aiter__()
    async with patching_actor(store) as (actor, counting, cache):
        change = await commit(store, feed, [Upsert("c", "r", {})])
        actor.tell(Changed("r", change.version, images=(RowImage("c", "nowhere", {}, 1),)))
        await actor.until_built(change.version)
        assert counting.loads == 2
        assert await cached(cache) == await store.load("r")


async def test_no_graph_is_kept_beyond_max_live_graph_bytes(store: MemoryStore) -> None:
    """With max_live_graph_bytes below the graph's size every version is loaded, and none is kept."""
    feed = store.changes(after=await store.cursor()).__aiter__()
    async with patching_actor(store, max_live_graph_bytes=10) as (actor, counting, _):
        for index in range(3):
            change = await commit(store, feed, [Upsert(f"c{index}", "r", {"i": index})])
            actor.tell(Changed("r", change.version, images=change.images))
            await actor.until_built(change.version)
            assert not actor.patching
        assert counting.loads == 3


async def test_a_lost_key_is_loaded_never_put_from_memory(store: MemoryStore) -> None:
    """When the cache lost the key after the lease was taken, the patched graph is not put: a new
    lease, then a snapshot load, then the put."""
    feed = store.changes(after=await store.cursor()).__aiter__()
    async with patching_actor(store) as (actor, counting, cache):
        assert await cache.discard(graph_key("r"), 1)  # the cache loses everything of the key
        change = await commit(store, feed, [Upsert("c", "r", {})])
        actor.tell(Changed("r", change.version, images=change.images))
        await actor.until_built(change.version)
        assert counting.loads == 2
        assert await cached(cache) == await store.load("r")


async def test_a_node_patches_from_its_feed_and_a_new_actor_starts_from_a_snapshot() -> None:
    """A node's actor patches every version its feed brings; after passivation, the next life loads."""
    async with MemoryStore() as store:
        counting = CountingStore(store)
        async with (
            MemoryCache() as cache,
            Node(
                store=counting,
                cache=cache,
                node_id="a",
                min_rebuild_interval=0,
                idle_timeout=0.2,
            ) as node,
        ):
            await store.create_root("r", {})
            await node.get("r", min_version=1)
            for index in range(10):
                version = await node.apply("r", [Upsert(f"c{index}", "r", {})])
            actor = node.actor("r")
            assert actor is not None
            with anyio.fail_after(5):
                await actor.until_built(version)
            stats = node.statistics()
            assert stats.patched >= 1
            assert stats.snapshot_loads <= 2
            assert await cached(cache) == await store.load("r")
            with anyio.fail_after(5), pytest.raises(ActorDead):
                await actor.until_built(2**62)  # it passivates after idle_timeout
            loads = counting.loads
            version = await node.apply("r", [Upsert("after", "r", {})])
            actor = node.actor("r")
            assert actor is not None
            with anyio.fail_after(5):
                await actor.until_built(version)
            assert counting.loads == loads + 1


# -- on PostgreSQL: the built-in tables and a graph spec ---------------------------------------------------


@pytest.fixture
async def pg_store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresStore]:
    store = await PostgresStore.connect(postgres_dsn, pg_schema, poll_interval=0.05)
    try:
        yield store
    finally:
        await store.aclose()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(plan=transactions)
async def test_patched_graph_equals_the_snapshot_at_every_version_on_postgresql(
    pg_store: PostgresStore, plan: list[list[Step]]
) -> None:
    """PostgreSQL's built-in tables: the outbox's images turn each version into exactly the next one."""
    root_id = f"r-{uuid.uuid4().hex[:8]}"
    await pg_store.create_root(root_id, {"name": "root"})
    await replay_and_compare(pg_store, root_id, plan)


SpecStep = tuple[str, int, int, int]
spec_steps = st.tuples(
    st.sampled_from(
        ["add_line", "add_line", "add_note", "add_note", "update", "move_note", "move_line", "delete"]
    ),
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.integers(0, 9),
)
spec_transactions = st.lists(st.lists(spec_steps, min_size=1, max_size=4), min_size=1, max_size=12)


@dataclass
class Shop:
    conn: asyncpg.Connection
    store: PostgresStore
    shop: str
    next_id: int = 1000

    def fresh(self) -> int:
        self.next_id += 1
        return self.next_id


@pytest.fixture
async def spec_shop(postgres_dsn: str, pg_schema: str) -> AsyncIterator[Shop]:
    async with shop_schema(postgres_dsn, pg_schema) as shop:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await create_shop(conn, shop)
            spec = GraphSpec.loads(spec_toml(shop))
            await track_graph(conn, spec, schema=pg_schema)
            store = await PostgresStore.connect(postgres_dsn, pg_schema, graph=spec, poll_interval=0.05)
            try:
                yield Shop(conn, store, shop)
            finally:
                await store.aclose()
        finally:
            await conn.close()


async def run_spec_step(shop: Shop, orders: list[int], step: SpecStep) -> None:
    """One plain-SQL write of the shop, chosen against its current rows."""
    conn, s = shop.conn, f'"{shop.shop}"'
    kind, a, b, payload = step
    lines = [r["id"] for r in await conn.fetch(f"SELECT id FROM {s}.order_lines ORDER BY id")]
    notes = [r["id"] for r in await conn.fetch(f"SELECT id FROM {s}.line_notes ORDER BY id")]
    order = orders[a % len(orders)]
    match kind:
        case "add_line":
            await conn.execute(
                f"INSERT INTO {s}.order_lines (id, order_id, qty) VALUES ($1, $2, $3)",
                shop.fresh(),
                order,
                payload,
            )
        case "add_note" if lines:
            await conn.execute(
                f"INSERT INTO {s}.line_notes (id, line_id, body) VALUES ($1, $2, $3)",
                shop.fresh(),
                lines[b % len(lines)],
                f"note {payload}",
            )
        case "update" if lines and a % 2:
            await conn.execute(
                f"UPDATE {s}.order_lines SET qty = $2 WHERE id = $1", lines[b % len(lines)], payload
            )
        case "update" if notes:
            await conn.execute(
                f"UPDATE {s}.line_notes SET body = $2 WHERE id = $1", notes[b % len(notes)], str(payload)
            )
        case "move_note" if notes and lines:
            await conn.execute(
                f"UPDATE {s}.line_notes SET line_id = $2 WHERE id = $1",
                notes[a % len(notes)],
                lines[b % len(lines)],
            )
        case "move_line" if lines:
            await conn.execute(
                f"UPDATE {s}.order_lines SET order_id = $2 WHERE id = $1", lines[b % len(lines)], order
            )
        case "delete" if notes and a % 2:
            await conn.execute(f"DELETE FROM {s}.line_notes WHERE id = $1", notes[b % len(notes)])
        case "delete" if lines:
            await conn.execute(f"DELETE FROM {s}.order_lines WHERE id = $1", lines[b % len(lines)])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(plan=spec_transactions)
async def test_patched_spec_graph_equals_the_snapshot_at_every_version(
    spec_shop: Shop, plan: list[list[SpecStep]]
) -> None:
    """A 3-level graph spec written with plain SQL: every change that carries images patches into exactly
    the snapshot at its version; the rest (subtrees moved between orders) say so with no images."""
    shop, store = spec_shop, spec_shop.store
    s = f'"{shop.shop}"'
    orders = [shop.fresh(), shop.fresh()]
    feed: Any = store.changes(after=await store.cursor())
    try:
        async with shop.conn.transaction():
            for order in orders:
                await shop.conn.execute(f"INSERT INTO {s}.orders (id, customer) VALUES ($1, 'ada')", order)
        live = {str(order): LiveGraph(await store.load(str(order)), 0) for order in orders}
        seen = {root_id: graph.version for root_id, graph in live.items()}
        for transaction in plan:
            async with shop.conn.transaction():
                for step in transaction:
                    await run_spec_step(shop, orders, step)
            committed = {root_id: await store.version(root_id) for root_id in live}
            while any(seen[root_id] < version for root_id, version in committed.items()):
                with anyio.fail_after(10):
                    change: Change = await feed.__anext__()
                if change.root_id not in live or change.version <= seen[change.root_id]:
                    continue  # the orders' own first versions, read before the loop
                seen[change.root_id] = change.version
                snapshot = await store.load(change.root_id)
                assert snapshot.version == change.version  # one writer: nothing committed since
                if change.images is None:
                    live[change.root_id] = LiveGraph(snapshot, 0)  # what an actor does: load it
                    continue
                live[change.root_id].apply(change.version, change.images)
                assert live[change.root_id].graph() == snapshot
    finally:
        await feed.aclose()


async def test_a_node_moved_out_from_under_a_deleted_one_survives_the_patch() -> None:
    """Moving Y out from under X and deleting X in one call keeps Y's subtree, as the snapshot does
    (the images list the writes before the deletions)."""
    async with MemoryStore() as store:
        await store.create_root("R", {})
        await store.apply("R", [Upsert("X", "R", {}), Upsert("Y", "X", {}), Upsert("K", "Y", {})])
        feed: Any = store.changes(after=await store.cursor())
        live = LiveGraph(await store.load("R"), 0)
        await store.apply("R", [Upsert("Y", "R", {"moved": True}), Delete("X")])
        change = await next_change(feed, "R", live.version)
        assert change.images is not None
        live.apply(change.version, change.images)
        assert live.graph() == await store.load("R")
        assert sorted(live.graph().nodes) == ["K", "R", "Y"]


async def test_a_patched_graph_is_never_put_under_a_lease_newer_than_its_snapshots(
    store: MemoryStore,
) -> None:
    """After the cache lost the key, a graph patched on a snapshot loaded under the old lease is not
    put, even though the rebuilder meanwhile holds a new lease (a read-through noticed the loss): it is
    loaded anew, so a reader who saw a newer version before the loss never sees the patched older one."""
    async with MemoryCache() as cache:
        rebuilder = Rebuilder(store, cache)
        feed: Any = store.changes(after=await store.cursor())
        base, _, lease = await rebuilder.rebuild_leased("r")
        live = LiveGraph(base, lease)
        await store.apply("r", [Upsert("a", "r", {})])  # v2: its images will be patched in
        two = await next_change(feed, "r", 1)
        await store.apply("r", [Upsert("b", "r", {})])  # v3: a reader saw it cached, then it was lost
        assert await cache.discard(graph_key("r"), 1)
        assert await rebuilder.recreated_since("r", lease)  # a read-through noticed: new lease held
        assert two.images is not None
        live.apply(two.version, two.images)
        graph, stored, _ = await rebuilder.rebuild_leased("r", live.graph(), live.lease)
        assert (graph.version, stored) == (3, True)  # loaded anew, not the patched v2
        assert await cached(cache) == await store.load("r")


async def test_the_writers_session_settings_do_not_change_the_images(spec_shop: Shop) -> None:
    """A writer in another time zone (and float, bytea, interval styles) logs images that patch into
    exactly the snapshot the store loads: both render rows with the same settings."""
    shop, store = spec_shop, spec_shop.store
    s = f'"{shop.shop}"'
    order = shop.fresh()
    feed: Any = store.changes(after=await store.cursor())
    try:
        await shop.conn.execute(f"INSERT INTO {s}.orders (id, customer) VALUES ($1, 'ada')", order)
        live = LiveGraph(await store.load(str(order)), 0)
        async with shop.conn.transaction():
            for setting in (
                "TimeZone = 'Asia/Tokyo'",
                "extra_float_digits = 0",
                "IntervalStyle = 'iso_8601'",
            ):
                await shop.conn.execute(f"SET LOCAL {setting}")
            await shop.conn.execute(
                f"UPDATE {s}.orders SET placed = '2026-05-06 07:08:09+00', total = 1.25 WHERE id = $1", order
            )
        change = await next_change(feed, str(order), live.version)
        assert change.images is not None
        live.apply(change.version, change.images)
        snapshot = await store.load(str(order))
        assert live.graph() == snapshot
        assert snapshot.nodes[f"orders:{order}"].data["placed"] == "2026-05-06T07:08:09+00:00"
    finally:
        await feed.aclose()
