# ruff: noqa: S608  (schema names come from fixtures; values are bind parameters)
"""Graph specs: every problem is one line naming it and creates nothing; the generated triggers bump each
touched root once per transaction at any depth; the generated loader names nodes "<table>:<key>" and a
root whose row is gone is RootNotFound carrying its version, which a node floors its cached graph at."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import asyncpg
import pytest

from graphcache import _cli
from graphcache.actors import Node, graph_key
from graphcache.cache import RedisCache
from graphcache.storage import (
    Graph,
    GraphSpec,
    InvalidOperation,
    PostgresStore,
    RootNotFound,
    SpecError,
    Upsert,
    track_graph,
)
from tests._spec_shop import create_shop, nothing_created, shop_schema, spec_toml

ROOT = """
[graph]
root = "orders"
[tables.orders]
key = "id"
"""

# (name, spec text, what the one line must say)
STATIC_ERRORS = [
    ("missing-graph", '[tables.orders]\nkey = "id"\n', "no [graph] section"),
    ("graph-not-a-table", 'graph = 3\n[tables.orders]\nkey = "id"\n', "[graph] must be a table of keys"),
    ("no-root", '[graph]\nschema = "shop"\n[tables.orders]\nkey = "id"\n', "[graph] has no root"),
    ("no-tables", '[graph]\nroot = "orders"\n', "no [tables.NAME] sections"),
    (
        "root-without-section",
        '[graph]\nroot = "orders"\n[tables.lines]\nkey = "id"\nparent = "orders"\nparent_key = "oid"\n',
        "the root table 'orders' has no [tables.orders] section",
    ),
    ("unknown-section", ROOT + "[extra]\nx = 1\n", "unknown section [extra]"),
    ("unknown-graph-key", '[graph]\nroot = "orders"\nowner = "me"\n[tables.orders]\nkey = "id"\n',
     "unknown key 'owner' in [graph]"),
    ("unknown-table-key", ROOT + 'primary = "id"\n', "unknown key 'primary' in [tables.orders]"),
    ("no-key", '[graph]\nroot = "orders"\n[tables.orders]\n', "[tables.orders] has no key"),
    ("bad-key-identifier", ROOT.replace('"id"', '"id; drop table x"'),
     "[tables.orders] key must be a plain SQL identifier"),
    ("bad-table-identifier", ROOT + '[tables."order-lines"]\nkey = "id"\n',
     "the table name [tables.order-lines] must be a plain SQL identifier"),
    ("bad-schema-identifier", ROOT.replace("[graph]", '[graph]\nschema = "a.b"'),
     "[graph] schema must be a plain SQL identifier"),
    ("key-not-a-string", ROOT.replace('"id"', "7"), "[tables.orders] key must be a plain SQL identifier"),
    ("root-with-parent", ROOT + 'parent = "orders"\nparent_key = "id"\n',
     "[tables.orders] is the root table: it cannot have a parent"),
    ("child-without-parent", ROOT + '[tables.lines]\nkey = "id"\n', "[tables.lines] has no parent"),
    ("parent-without-parent-key", ROOT + '[tables.lines]\nkey = "id"\nparent = "orders"\n',
     "[tables.lines] has parent but no parent_key"),
    ("parent-key-without-parent", ROOT + '[tables.lines]\nkey = "id"\nparent_key = "order_id"\n',
     "[tables.lines] has parent_key but no parent"),
    ("unknown-parent", ROOT + '[tables.lines]\nkey = "id"\nparent = "carts"\nparent_key = "cart_id"\n',
     "[tables.lines] names parent 'carts', which is not a table of the spec"),
    (
        "parent-cycle",
        ROOT + '[tables.a]\nkey = "id"\nparent = "b"\nparent_key = "b_id"\n'
        '[tables.b]\nkey = "id"\nparent = "a"\nparent_key = "a_id"\n',
        "parent cycle: a -> b -> a (no path to the root 'orders')",
    ),
    ("self-parent", ROOT + '[tables.a]\nkey = "id"\nparent = "a"\nparent_key = "a_id"\n',
     "parent cycle: a -> a"),
    ("empty-columns", ROOT + "columns = []\n", "[tables.orders] columns must be a non-empty list"),
    ("columns-not-a-list", ROOT + 'columns = "id"\n', "[tables.orders] columns must be a non-empty list"),
    ("column-twice", ROOT + 'columns = ["id", "id"]\n', "[tables.orders] columns names 'id' twice"),
    ("bad-column-identifier", ROOT + 'columns = ["id", "total)--"]\n',
     "[tables.orders] columns must be a plain SQL identifier"),
    ("not-toml", "[graph\nroot = orders\n", "is not valid TOML"),
]  # fmt: skip


class Unreadable(NamedTuple):
    name: str
    write: Any  # (path) -> None: makes the path unreadable as a spec
    says: str


UNREADABLE = [
    Unreadable("missing-file", lambda path: None, "cannot read it: [Errno 2] No such file or directory"),
    Unreadable("a-directory", lambda path: path.mkdir(), "cannot read it: [Errno 21] Is a directory"),
    Unreadable("not-utf8", lambda path: path.write_bytes(b"\xff\xfe[graph]\n"), "cannot read it:"),
]


def _assert_nothing_created(dsn: str, shop: str, store_schema: str) -> None:
    async def check() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            return await nothing_created(conn, shop, store_schema)
        finally:
            await conn.close()

    assert asyncio.run(check())


def _track_cli(
    spec: Path, dsn: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str]]:
    status = _cli.main(["track", "--graph", str(spec), "--postgres", dsn, "--schema", schema])
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize(("text", "says"), [pytest.param(t, s, id=n) for n, t, s in STATIC_ERRORS])
def test_a_spec_the_file_alone_shows_wrong_is_one_line_naming_it(
    text: str,
    says: str,
    *,
    tmp_path: Path,
    postgres_dsn: str,
    pg_schema: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """GraphSpec.loads raises one SpecError line naming the problem; `track` says the same, exits 2 and
    creates nothing."""
    with pytest.raises(SpecError) as raised:
        GraphSpec.loads(text, source="shop.toml")
    message = str(raised.value)
    assert says in message
    assert message.startswith("graph spec shop.toml")
    assert "\n" not in message
    assert isinstance(raised.value, InvalidOperation)
    assert isinstance(raised.value, ValueError)
    path = tmp_path / "shop.toml"
    path.write_text(text)
    status, lines = _track_cli(path, postgres_dsn, pg_schema, capsys)
    assert status == 2
    assert len(lines) == 1
    assert says in lines[0]
    assert lines[0].startswith(f"graphcache track: argument --graph: graph spec {path}")
    _assert_nothing_created(postgres_dsn, f"{pg_schema}_shop", pg_schema)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in UNREADABLE])
def test_an_unreadable_spec_file_is_one_line_naming_the_file(
    case: Unreadable, tmp_path: Path, postgres_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing file, a directory or bytes that are not UTF-8: one SpecError line naming the file; `track`
    exits 2 and creates nothing."""
    path = tmp_path / "shop.toml"
    case.write(path)
    with pytest.raises(SpecError) as raised:
        GraphSpec.from_toml(path)
    assert str(raised.value).startswith(f"graph spec {path}: {case.says}")
    assert "\n" not in str(raised.value)
    status, lines = _track_cli(path, postgres_dsn, pg_schema, capsys)
    assert (status, len(lines)) == (2, 1)
    assert case.says in lines[0]
    _assert_nothing_created(postgres_dsn, f"{pg_schema}_shop", pg_schema)


def test_a_good_spec_is_ordered_root_first_each_table_after_its_parent() -> None:
    """Tables come out root first, each after its parent, whatever their order in the file."""
    text = (
        '[graph]\nroot = "orders"\n'
        '[tables.line_notes]\nkey = "id"\nparent = "order_lines"\nparent_key = "line_id"\n'
        '[tables.order_lines]\nkey = "id"\nparent = "orders"\nparent_key = "order_id"\n'
        '[tables.orders]\nkey = "id"\n'
    )
    spec = GraphSpec.loads(text)
    assert [t.name for t in spec.tables] == ["orders", "order_lines", "line_notes"]
    assert spec.schema == "public"
    assert [t.name for t in spec.chain("line_notes")] == ["orders", "order_lines", "line_notes"]
    assert spec.node_id("orders", 7) == "orders:7"
    assert (
        GraphSpec.from_mapping({"graph": {"root": "orders"}, "tables": {"orders": {"key": "id"}}}).root
        == "orders"
    )


# -- the catalog ---------------------------------------------------------------------------------------


def _replace(old: str, new: str) -> Any:
    return lambda text: text.replace(old, new, 1)


def _whole(spec: str) -> Any:
    return lambda text: spec


_NOTES = '[tables.line_notes]\nkey = "id"'
_STAMPS = '[graph]\nschema = "{shop}"\nroot = "stamps"\n[tables.stamps]\nkey = "at"\n'
_GONE = '[graph]\nschema = "{shop}_gone"\nroot = "orders"\n[tables.orders]\nkey = "id"\n'

# (name, DDL run on the shop schema {s} after the three tables are created, a change to the spec's text,
#  what the one line must say)
CATALOG_ERRORS = [
    ("missing-table", "DROP TABLE {s}.line_notes", None, "table {shop}.line_notes does not exist"),
    ("missing-schema", "", _whole(_GONE), "table {shop}_gone.orders does not exist"),
    ("missing-key-column", "", _replace(_NOTES, _NOTES.replace('"id"', '"nid"')),
     "table {shop}.line_notes has no column 'nid'"),
    ("missing-parent-key-column", "", _replace('parent_key = "line_id"', 'parent_key = "line_ref"'),
     "table {shop}.line_notes has no column 'line_ref'"),
    ("missing-column-in-columns", "", _replace('"body"]', '"body", "colour"]'),
     "table {shop}.line_notes has no column 'colour'"),
    ("a-view", "ALTER TABLE {s}.line_notes RENAME TO notes_table;"
     " CREATE VIEW {s}.line_notes AS SELECT * FROM {s}.notes_table", None,
     "{shop}.line_notes is not a table (change tracking needs triggers on a table, not a view)"),
    ("unsupported-key-type", "CREATE TABLE {s}.stamps (at timestamptz PRIMARY KEY)", _whole(_STAMPS),
     "{shop}.stamps.at is of type timestamptz: a key must be text, varchar, smallint, integer, bigint"),
    ("parent-key-type-mismatch", "ALTER TABLE {s}.line_notes DROP COLUMN line_id;"
     " ALTER TABLE {s}.line_notes ADD COLUMN line_id text", None,
     "{shop}.line_notes.line_id is of type text, but it holds keys of {shop}.order_lines.id (integer)"),
    ("key-not-unique", "ALTER TABLE {s}.line_notes DROP CONSTRAINT line_notes_pkey", None,
     "{shop}.line_notes.id is not unique: a key needs a PRIMARY KEY or UNIQUE constraint"),
    ("key-unique-only-with-another-column", "ALTER TABLE {s}.line_notes DROP CONSTRAINT line_notes_pkey;"
     " ALTER TABLE {s}.line_notes ADD UNIQUE (id, line_id)", None, "{shop}.line_notes.id is not unique"),
    ("key-nullable", "ALTER TABLE {s}.line_notes DROP CONSTRAINT line_notes_pkey;"
     " ALTER TABLE {s}.line_notes ALTER COLUMN id DROP NOT NULL; ALTER TABLE {s}.line_notes ADD UNIQUE (id)",
     None, "{shop}.line_notes.id may be NULL: a key column must be NOT NULL"),
]  # fmt: skip


@pytest.fixture
async def shop(postgres_dsn: str, pg_schema: str) -> AsyncIterator[str]:
    """An empty schema for the shop's tables; the store schema is ``pg_schema``."""
    async with shop_schema(postgres_dsn, pg_schema) as name:
        yield name


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("ddl", "change", "says"), [pytest.param(d, c, s, id=name) for name, d, c, s in CATALOG_ERRORS]
)
async def test_a_spec_that_does_not_fit_the_catalog_is_one_line_and_creates_nothing(
    ddl: str, change: Any, says: str, *, raw: asyncpg.Connection, shop: str, postgres_dsn: str, pg_schema: str
) -> None:
    """track_graph and PostgresStore.connect(graph=) both refuse with one SpecError line naming the table
    and column; no store schema, function or trigger is created."""
    await create_shop(raw, shop)
    if ddl:
        await raw.execute(ddl.format(s=f'"{shop}"'))
    text = spec_toml(shop) if change is None else change(spec_toml(shop)).format(shop=shop)
    spec = GraphSpec.loads(text, source="shop.toml")
    expected = says.format(shop=shop)
    with pytest.raises(SpecError) as by_track:
        await track_graph(raw, spec, schema=pg_schema)
    with pytest.raises(SpecError) as by_connect:
        await PostgresStore.connect(postgres_dsn, pg_schema, graph=spec)
    for raised in (by_track, by_connect):
        assert str(raised.value).startswith("graph spec shop.toml: ")
        assert expected in str(raised.value)
        assert "\n" not in str(raised.value)
    assert await nothing_created(raw, shop, pg_schema)


@pytest.mark.anyio
async def test_connect_without_tracking_names_the_track_command_and_creates_nothing(
    raw: asyncpg.Connection, shop: str, postgres_dsn: str, pg_schema: str
) -> None:
    """A spec that fits but was never tracked: SpecError naming `graphcache track`; not even the store
    schema is created."""
    await create_shop(raw, shop)
    spec = GraphSpec.loads(spec_toml(shop), source="shop.toml")
    with pytest.raises(SpecError, match="change tracking is not installed or out of date") as raised:
        await PostgresStore.connect(postgres_dsn, pg_schema, graph=spec)
    assert f"graphcache track --graph shop.toml --postgres DSN --schema {pg_schema}" in str(raised.value)
    assert await nothing_created(raw, shop, pg_schema)


@pytest.mark.anyio
async def test_a_spec_store_is_read_only(tracked: Tracked) -> None:
    """create_root and apply on a spec store raise InvalidOperation: writes are SQL on your tables."""
    with pytest.raises(InvalidOperation, match="write to those tables with SQL"):
        await tracked.store.create_root("9", {})
    with pytest.raises(InvalidOperation, match="write to those tables with SQL"):
        await tracked.store.apply("1", [Upsert("x", "1", {})])
    assert "graph" in repr(tracked.store)
    assert tracked.store.graph is not None


# -- the triggers and the loader ----------------------------------------------------------------------


class Tracked(NamedTuple):
    store: PostgresStore
    conn: asyncpg.Connection
    shop: str  # the tables' schema, quoted for SQL: "s"
    schema: str  # the store schema

    async def outbox(self, root_id: str) -> int:
        return int(
            await self.conn.fetchval(
                f'SELECT count(*) FROM "{self.schema}".outbox WHERE root_id = $1', root_id
            )
        )


@pytest.fixture
async def tracked(
    raw: asyncpg.Connection, shop: str, postgres_dsn: str, pg_schema: str
) -> AsyncIterator[Tracked]:
    """The shop (bigint keys) tracked in ``pg_schema`` and a store serving its graphs."""
    await create_shop(raw, shop)
    spec = GraphSpec.loads(spec_toml(shop))
    await track_graph(raw, spec, schema=pg_schema)
    store = await PostgresStore.connect(postgres_dsn, pg_schema, graph=spec, poll_interval=0.1)
    try:
        yield Tracked(store, raw, f'"{shop}"', pg_schema)
    finally:
        await store.aclose()


async def place(t: Tracked, order: int, lines: dict[int, list[int]]) -> None:
    """An order, its lines and their notes (``{line: [note, ...]}``), in one transaction."""
    async with t.conn.transaction():
        await t.conn.execute(f"INSERT INTO {t.shop}.orders (id, customer) VALUES ($1, 'ada')", order)
        for line, notes in lines.items():
            await t.conn.execute(
                f"INSERT INTO {t.shop}.order_lines (id, order_id) VALUES ($1, $2)", line, order
            )
            for note in notes:
                await t.conn.execute(
                    f"INSERT INTO {t.shop}.line_notes (id, line_id) VALUES ($1, $2)", note, line
                )


@pytest.mark.anyio
async def test_one_transaction_at_every_depth_bumps_the_root_once(tracked: Tracked) -> None:
    """Inserting an order, its lines and notes, then updating a row at each depth, all in one
    transaction, commits version 1 and one outbox row."""
    t = tracked
    async with t.conn.transaction():
        await place(t, 1, {10: [100, 101], 11: [110]})
        await t.conn.execute(f"UPDATE {t.shop}.orders SET customer = 'bob' WHERE id = 1")
        await t.conn.execute(f"UPDATE {t.shop}.order_lines SET qty = 5 WHERE id = 10")
        await t.conn.execute(f"UPDATE {t.shop}.line_notes SET body = 'x' WHERE id = 110")
    assert await t.store.version("1") == 1
    assert await t.outbox("1") == 1
    async with t.conn.transaction():  # a later transaction touching all depths: one more bump
        await t.conn.execute(f"UPDATE {t.shop}.line_notes SET body = 'y' WHERE id = 100")
        await t.conn.execute(f"UPDATE {t.shop}.order_lines SET qty = 6 WHERE id = 11")
        await t.conn.execute(f"UPDATE {t.shop}.orders SET customer = 'cy' WHERE id = 1")
    assert (await t.store.version("1"), await t.outbox("1")) == (2, 2)
    await t.conn.execute(f"UPDATE {t.shop}.line_notes SET body = 'z' WHERE id = 101")  # a note alone
    graph = await t.store.load("1")
    assert graph.version == 3
    assert graph.nodes["line_notes:101"].data["body"] == "z"


@pytest.mark.anyio
async def test_moving_a_line_bumps_both_orders_and_takes_its_notes_along(tracked: Tracked) -> None:
    """Re-parenting a line bumps the order it left and the one it joined; its notes move with it in the
    loaded graphs. Moving a note between lines of two orders bumps both too."""
    t = tracked
    await place(t, 1, {10: [100], 11: [110, 111]})
    await place(t, 2, {20: [200]})
    await t.conn.execute(f"UPDATE {t.shop}.order_lines SET order_id = 2 WHERE id = 11")
    graphs = await t.store.load_many(["1", "2"])
    assert (graphs["1"].version, graphs["2"].version) == (2, 2)
    assert sorted(graphs["1"].nodes) == ["line_notes:100", "order_lines:10", "orders:1"]
    assert sorted(graphs["2"].nodes) == [
        "line_notes:110", "line_notes:111", "line_notes:200", "order_lines:11", "order_lines:20", "orders:2",
    ]  # fmt: skip
    assert graphs["2"].nodes["order_lines:11"].parent_id == "orders:2"
    assert graphs["2"].nodes["line_notes:110"].parent_id == "order_lines:11"
    await t.conn.execute(f"UPDATE {t.shop}.line_notes SET line_id = 10 WHERE id = 200")
    graphs = await t.store.load_many(["1", "2"])
    assert (graphs["1"].version, graphs["2"].version) == (3, 3)
    assert graphs["1"].nodes["line_notes:200"].parent_id == "order_lines:10"
    assert "line_notes:200" not in graphs["2"].nodes


@pytest.mark.anyio
async def test_deleting_an_order_bumps_once_and_its_graph_is_not_found_with_that_version(
    tracked: Tracked,
) -> None:
    """DELETE of an order (its lines and notes go by ON DELETE CASCADE) bumps it once; load raises
    RootNotFound carrying that version; load_many leaves it out."""
    t = tracked
    await place(t, 1, {10: [100, 101], 11: [110]})
    await place(t, 2, {20: []})
    await t.conn.execute(f"DELETE FROM {t.shop}.orders WHERE id = 1")
    assert await t.outbox("1") == 2
    assert await t.store.version("1") == 2
    with pytest.raises(RootNotFound) as raised:
        await t.store.load("1")
    assert raised.value.version == 2
    assert list(await t.store.load_many(["1", "2", "3"])) == ["2"]
    with pytest.raises(RootNotFound) as never:
        await t.store.load("3")
    assert never.value.version is None  # never committed: nothing to floor


@pytest.mark.anyio
async def test_columns_restricts_data_and_every_other_row_is_its_own_json(tracked: Tracked) -> None:
    """A node's data is to_jsonb of its row (timestamps, numerics, jsonb as PostgreSQL converts them),
    or only the spec's columns; row_version is 0."""
    t = tracked
    await place(t, 1, {10: [100]})
    graph = await t.store.load("1")
    for table, key in (("orders", 1), ("order_lines", 10)):
        row = await t.conn.fetchval(f"SELECT to_jsonb(r)::text FROM {t.shop}.{table} AS r WHERE id = $1", key)
        assert graph.nodes[f"{table}:{key}"].data == json.loads(row)
    assert graph.nodes["orders:1"].data["tags"] == {"vip": True}
    assert graph.nodes["line_notes:100"].data == {"id": 100, "line_id": 10, "body": "note"}
    assert {node.row_version for node in graph.nodes.values()} == {0}
    assert graph.nodes["orders:1"].parent_id is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    "root_id", ["007", "abc", "+7", " 7", "1.0", "-0", "9223372036854775808", "1e3", "٣"]
)
async def test_a_root_id_that_is_not_a_canonical_key_is_not_found_without_a_query(
    tracked: Tracked, root_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For integer keys, "007", "abc" and the like are RootNotFound (no version) without a query:
    a trigger only ever records a key as PostgreSQL prints it."""
    await place(tracked, 7, {})

    def no_query() -> Any:
        raise AssertionError("the store queried PostgreSQL")

    monkeypatch.setattr(tracked.store, "_connection", no_query)
    with pytest.raises(RootNotFound) as raised:
        await tracked.store.load(root_id)
    assert raised.value.version is None
    assert await tracked.store.load_many([root_id]) == {}


class KeyKind(NamedTuple):
    sql: str
    key: Any  # (n) -> the key as PostgreSQL prints it
    not_canonical: str


KEY_KINDS = {
    "integer": KeyKind("integer", str, "07"),
    "text": KeyKind("text", lambda n: f"key-{n}:x", ""),
    "varchar": KeyKind("varchar(40)", lambda n: f"K{n}", ""),
    "uuid": KeyKind(
        "uuid",
        lambda n: str(uuid.UUID(int=0xABCDEF << 96 | n)),
        str(uuid.UUID(int=0xABCDEF << 96 | 1)).upper(),
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", list(KEY_KINDS))
async def test_integer_text_and_uuid_keys(
    kind: str, raw: asyncpg.Connection, shop: str, postgres_dsn: str, pg_schema: str
) -> None:
    """Keys of each supported type: triggers bump the root named by the key's text, the graph's nodes are
    "<table>:<key>", a move bumps both roots; a uuid in another spelling is not found."""
    k = KEY_KINDS[kind]
    await create_shop(raw, shop, k.sql)
    spec = GraphSpec.loads(spec_toml(shop))
    await track_graph(raw, spec, schema=pg_schema)
    s = f'"{shop}"'
    async with await PostgresStore.connect(postgres_dsn, pg_schema, graph=spec) as store:
        cast = f"$1::text::{k.sql}"
        async with raw.transaction():
            for order in (1, 2):
                await raw.execute(
                    f"INSERT INTO {s}.orders (id, customer) VALUES ({cast}, 'ada')", k.key(order)
                )
            await raw.execute(
                f"INSERT INTO {s}.order_lines (id, order_id) VALUES ({cast}, $2::text::{k.sql})",
                k.key(10),
                k.key(1),
            )
            await raw.execute(
                f"INSERT INTO {s}.line_notes (id, line_id) VALUES ({cast}, $2::text::{k.sql})",
                k.key(100),
                k.key(10),
            )
        graph = await store.load(k.key(1))
        assert graph.version == 1
        assert sorted(graph.nodes) == sorted(
            [f"orders:{k.key(1)}", f"order_lines:{k.key(10)}", f"line_notes:{k.key(100)}"]
        )
        assert graph.nodes[f"line_notes:{k.key(100)}"].parent_id == f"order_lines:{k.key(10)}"
        await raw.execute(
            f"UPDATE {s}.order_lines SET order_id = $2::text::{k.sql} WHERE id = {cast}", k.key(10), k.key(2)
        )
        graphs = await store.load_many([k.key(1), k.key(2)])
        assert (graphs[k.key(1)].version, graphs[k.key(2)].version) == (2, 2)
        assert f"line_notes:{k.key(100)}" in graphs[k.key(2)].nodes
        if k.not_canonical:
            with pytest.raises(RootNotFound):
                await store.load(k.not_canonical)


@pytest.mark.anyio
async def test_a_node_removes_and_floors_a_deleted_orders_graph(
    tracked: Tracked, redis_url: str, namespace: str
) -> None:
    """A node caching order 1 removes its graph once the order is deleted, floors the key at the
    deletion's version (an older put is refused) and counts it in roots_forgotten."""
    t = tracked
    await place(t, 1, {10: [100]})
    await t.conn.execute(f"UPDATE {t.shop}.order_lines SET qty = 9 WHERE id = 10")
    key = graph_key("1")
    async with RedisCache.from_url(redis_url, namespace=namespace) as cache:
        async with Node(store=t.store, cache=cache, node_id="n1", min_rebuild_interval=0) as node:
            graph = await node.get("1", min_version=2)
            assert (await cache.get(key, type=Graph)) is not None
            await t.conn.execute(f"DELETE FROM {t.shop}.orders WHERE id = 1")
            deadline = time.monotonic() + 20
            while node.statistics().roots_forgotten < 1 or await cache.get(key) is not None:
                assert time.monotonic() < deadline, "the deleted order's graph was never removed"
                await anyio.sleep(0.05)
            with pytest.raises(RootNotFound):
                await node.get("1")
            assert node.statistics().roots_forgotten == 1
        for version in (2, 3):  # the deletion committed version 3
            assert not await cache.put_if_newer(key, graph, version)
        assert await cache.get(key) is None
