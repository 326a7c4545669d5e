# ruff: noqa: S608  (schema names come from the pg_schema fixture; values are bind parameters)
"""A service's own schema (orders + order_lines): change-tracking triggers and a custom loader."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

from graphcache.actors import Node as CacheNode
from graphcache.actors import graph_key
from graphcache.cache import MemoryCache
from graphcache.storage import (
    Graph,
    InvalidOperation,
    Node,
    PostgresStore,
    RootNotFound,
    install_change_tracking,
)
from tests.test_store_contract import collect_until

pytestmark = pytest.mark.anyio


def order_loader(schema: str) -> Any:
    """The service's loader: an order and its lines as one graph."""

    async def load(conn: Any, root_id: str) -> Graph:
        order = await conn.fetchrow(f'SELECT id, customer FROM "{schema}".orders WHERE id = $1', root_id)
        lines = await conn.fetch(
            f'SELECT id, sku, qty FROM "{schema}".order_lines WHERE order_id = $1 ORDER BY id', root_id
        )
        nodes = {order["id"]: Node(order["id"], None, {"customer": order["customer"]}, 1)}
        for line in lines:
            nodes[line["id"]] = Node(line["id"], root_id, {"sku": line["sku"], "qty": line["qty"]}, 1)
        return Graph(root_id, 0, nodes)

    return load


@pytest.fixture
async def shop(postgres_dsn: str, pg_schema: str) -> AsyncIterator[tuple[PostgresStore, asyncpg.Connection]]:
    """orders + order_lines with change tracking on both, a store loading orders, and a raw connection."""
    conn = await asyncpg.connect(postgres_dsn)
    s = f'"{pg_schema}"'
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
    await conn.execute(f"CREATE TABLE {s}.orders (id text PRIMARY KEY, customer text NOT NULL)")
    await conn.execute(
        f"CREATE TABLE {s}.order_lines (id text PRIMARY KEY, order_id text NOT NULL REFERENCES {s}.orders,"
        " sku text NOT NULL, qty integer NOT NULL)"
    )
    await install_change_tracking(conn, f"{pg_schema}.orders", "id", schema=pg_schema)
    await install_change_tracking(conn, f"{pg_schema}.order_lines", "order_id", schema=pg_schema)
    store = await PostgresStore.connect(
        postgres_dsn, pg_schema, loader=order_loader(pg_schema), poll_interval=0.1
    )
    try:
        yield store, conn
    finally:
        await store.aclose()
        await conn.close()


async def place_order(conn: asyncpg.Connection, schema: str, order_id: str, lines: int) -> None:
    async with conn.transaction():
        await conn.execute(f'INSERT INTO "{schema}".orders VALUES ($1, $2)', order_id, "ada")
        for index in range(lines):
            await conn.execute(
                f'INSERT INTO "{schema}".order_lines VALUES ($1, $2, $3, 0)',
                f"{order_id}-l{index}",
                order_id,
                "sku",
            )


async def test_one_transaction_bumps_the_root_exactly_once(shop: Any, pg_schema: str) -> None:
    """An order and its lines inserted in one transaction make version 1 and one feed change."""
    store, conn = shop
    feed = store.changes(after=await store.cursor())
    await place_order(conn, pg_schema, "o1", lines=3)
    assert await store.version("o1") == 1
    async with feed:
        with anyio.fail_after(30):
            change = await feed.__anext__()
    assert (change.root_id, change.version) == ("o1", 1)
    assert await conn.fetchval(f'SELECT count(*) FROM "{pg_schema}".outbox') == 1


async def test_each_later_transaction_bumps_once_and_moves_bump_both_roots(shop: Any, pg_schema: str) -> None:
    """Updating many lines bumps once; moving a line between orders bumps both orders."""
    store, conn = shop
    s = f'"{pg_schema}"'
    await place_order(conn, pg_schema, "o1", lines=3)
    await place_order(conn, pg_schema, "o2", lines=1)
    await conn.execute(f"UPDATE {s}.order_lines SET qty = qty + 1 WHERE order_id = 'o1'")
    assert await store.version("o1") == 2
    await conn.execute(f"DELETE FROM {s}.order_lines WHERE id = 'o1-l2'")
    assert await store.version("o1") == 3
    await conn.execute(f"UPDATE {s}.order_lines SET order_id = 'o2' WHERE id = 'o1-l1'")
    assert (await store.version("o1"), await store.version("o2")) == (4, 2)


async def test_installing_twice_still_bumps_once(shop: Any, pg_schema: str) -> None:
    """install_change_tracking is idempotent: a second install adds no second bump."""
    store, conn = shop
    await install_change_tracking(conn, f"{pg_schema}.order_lines", "order_id", schema=pg_schema)
    await place_order(conn, pg_schema, "o1", lines=2)
    await conn.execute(f"UPDATE \"{pg_schema}\".order_lines SET qty = 5 WHERE order_id = 'o1'")
    assert await store.version("o1") == 2


async def test_loader_builds_the_graph_with_the_snapshot_version(shop: Any, pg_schema: str) -> None:
    """load runs the service's loader and stamps the result with the version of the same snapshot."""
    store, conn = shop
    await place_order(conn, pg_schema, "o1", lines=2)
    graph = await store.load("o1")
    assert graph.version == 1
    assert sorted(graph.nodes) == ["o1", "o1-l0", "o1-l1"]
    assert graph.nodes["o1-l0"].data == {"sku": "sku", "qty": 0}
    with pytest.raises(RootNotFound):
        await store.load("o9")


async def test_load_many_runs_the_loader_for_each_root(shop: Any, pg_schema: str) -> None:
    """With a loader, load_many gives what load gives for each root and leaves unknown roots out."""
    store, conn = shop
    await place_order(conn, pg_schema, "o1", lines=2)
    await place_order(conn, pg_schema, "o2", lines=1)
    await conn.execute(f"UPDATE \"{pg_schema}\".order_lines SET qty = 3 WHERE order_id = 'o2'")
    graphs = await store.load_many(["o2", "o9", "o1"])
    assert list(graphs) == ["o2", "o1"]
    assert graphs == {"o1": await store.load("o1"), "o2": await store.load("o2")}
    assert graphs["o2"].version == 2


async def test_loader_reads_are_never_torn(shop: Any, pg_schema: str, postgres_dsn: str) -> None:
    """While transactions raise every line's qty together, each load sees equal qtys == version - 1."""
    store, conn = shop
    await place_order(conn, pg_schema, "o1", lines=5)
    done = anyio.Event()
    seen: list[Graph] = []

    async def writer() -> None:
        writer_conn = await asyncpg.connect(postgres_dsn)
        try:
            for _ in range(30):
                async with writer_conn.transaction():
                    for index in range(5):
                        await writer_conn.execute(
                            f"UPDATE \"{pg_schema}\".order_lines SET qty = qty + 1 WHERE id = 'o1-l{index}'"
                        )
        finally:
            await writer_conn.close()
            done.set()

    async def loader() -> None:
        while not done.is_set():
            seen.append(await store.load("o1"))

    async with anyio.create_task_group() as group:
        group.start_soon(writer)
        for _ in range(5):
            group.start_soon(loader)
    for graph in seen:
        qtys = {node.data["qty"] for node in graph.nodes.values() if node.parent_id == "o1"}
        assert qtys == {graph.version - 1}
    assert seen
    assert (await store.load("o1")).version == 31


async def test_the_feed_reports_tracked_changes(shop: Any, pg_schema: str) -> None:
    """Trigger-written outbox rows reach the feed like the store's own."""
    store, conn = shop
    feed = store.changes(after=await store.cursor())
    await place_order(conn, pg_schema, "o1", lines=1)
    await conn.execute(f"UPDATE \"{pg_schema}\".order_lines SET qty = 7 WHERE order_id = 'o1'")
    got: dict[str, list[int]] = defaultdict(list)
    async with feed:
        await collect_until(feed, {"o1": 2}, got)
    assert got["o1"] == [1, 2]


@pytest.mark.parametrize(
    ("table", "column"), [("orders; DROP TABLE x", "id"), ("a.b.c", "id"), ("orders", "id)--"), ("", "id")]
)
async def test_bad_identifiers_are_refused_before_any_io(table: str, column: str) -> None:
    """Table and column names must be plain identifiers; the connection is never touched."""

    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"connection used: {name}")

    with pytest.raises(InvalidOperation):
        await install_change_tracking(Untouchable(), table, column)


def empty_when_gone_loader(schema: str) -> Any:
    """A loader that finds no rows for an order whose row is gone, and says so with an empty graph."""
    load_order = order_loader(schema)

    async def load(conn: Any, root_id: str) -> Graph:
        if await conn.fetchval(f'SELECT id FROM "{schema}".orders WHERE id = $1', root_id) is None:
            return Graph(root_id, 0, {})
        graph: Graph = await load_order(conn, root_id)
        return graph

    return load


async def test_a_loader_finding_no_rows_is_root_not_found_and_nothing_is_cached(
    shop: Any, pg_schema: str, postgres_dsn: str
) -> None:
    """A loader's empty graph (the order was deleted) is RootNotFound carrying the deletion's version,
    never an empty graph: a node's read and its rebuild cache nothing, and the key is floored."""
    _, conn = shop
    s = f'"{pg_schema}"'
    await place_order(conn, pg_schema, "o1", lines=2)
    async with conn.transaction():
        await conn.execute(f"DELETE FROM {s}.order_lines WHERE order_id = 'o1'")
        await conn.execute(f"DELETE FROM {s}.orders WHERE id = 'o1'")
    store = await PostgresStore.connect(
        postgres_dsn, pg_schema, loader=empty_when_gone_loader(pg_schema), poll_interval=0.1
    )
    async with store, MemoryCache() as cache, CacheNode(store=store, cache=cache, node_id="n1") as node:
        with pytest.raises(RootNotFound) as raised:
            await store.load("o1")
        assert raised.value.version == 2
        assert await store.load_many(["o1"]) == {}
        with pytest.raises(RootNotFound):
            await node.get("o1")
        assert await cache.get(graph_key("o1")) is None
        node.refresh("o1")  # the rebuild path: the actor forgets the root instead of caching it
        deadline = time.monotonic() + 30
        while node.statistics().roots_forgotten < 1:
            assert time.monotonic() < deadline, "the rebuild never forgot the deleted order"
            await anyio.sleep(0.01)
        assert await cache.get(graph_key("o1")) is None
        assert not await cache.put_if_newer(graph_key("o1"), Graph("o1", 2, {}), 2)  # floored at 2
