"""A shop kept in its own tables (orders -> order_lines -> line_notes) and its graph spec, for the tests
of graph specs: the tables, the spec's TOML, and what a failed or dry run must not have created."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

__all__ = ("SPEC", "create_shop", "installed", "nothing_created", "shop_schema", "spec_toml")

SPEC = """
[graph]
schema = "{shop}"
root = "orders"

[tables.orders]
key = "id"

[tables.order_lines]
key = "id"
parent = "orders"
parent_key = "order_id"

[tables.line_notes]
key = "id"
parent = "order_lines"
parent_key = "line_id"
{notes}
"""


def spec_toml(shop: str, *, notes: str = 'columns = ["id", "line_id", "body"]') -> str:
    """The shop's spec; ``notes`` is the rest of the [tables.line_notes] section."""
    return SPEC.format(shop=shop, notes=notes)


async def create_shop(conn: asyncpg.Connection, shop: str, key: str = "bigint") -> None:
    """The three tables, keys of type ``key``, each child deleted with its parent (ON DELETE CASCADE)."""
    s = f'"{shop}"'
    await conn.execute(f"""
        CREATE TABLE {s}.orders (
            id {key} PRIMARY KEY, customer text NOT NULL,
            placed timestamptz NOT NULL DEFAULT '2026-01-02 03:04:05+00',
            total numeric(10, 2) NOT NULL DEFAULT 12.50, tags jsonb NOT NULL DEFAULT '{{"vip": true}}');
        CREATE TABLE {s}.order_lines (
            id {key} PRIMARY KEY, order_id {key} REFERENCES {s}.orders ON DELETE CASCADE,
            order_ref {key}, sku text NOT NULL DEFAULT 'sku', qty integer NOT NULL DEFAULT 1);
        CREATE TABLE {s}.line_notes (
            id {key} PRIMARY KEY, line_id {key} REFERENCES {s}.order_lines ON DELETE CASCADE,
            body text NOT NULL DEFAULT 'note', secret text NOT NULL DEFAULT 'hidden');
    """)


@contextlib.asynccontextmanager
async def shop_schema(dsn: str, store_schema: str) -> AsyncIterator[str]:
    """An empty schema for the shop's tables, named after the test's store schema, dropped afterwards
    (also when the test fails)."""
    name = f"{store_schema}_shop"
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


async def installed(conn: Any, shop: str, store_schema: str) -> dict[str, Any]:
    """What tracking installed, as (oid, xmin) per function and trigger: a row replaced or re-created
    gets a new xmin, so two equal snapshots mean nothing was touched."""
    functions = await conn.fetch(
        "SELECT p.proname AS name, p.oid::int8 AS oid, p.xmin::text AS xmin FROM pg_proc AS p"
        " JOIN pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = $1",
        store_schema,
    )
    triggers = await conn.fetch(
        "SELECT c.relname || '.' || t.tgname AS name, t.oid::int8 AS oid, t.xmin::text AS xmin"
        " FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid"
        " JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND NOT t.tgisinternal",
        shop,
    )
    return {row["name"]: (row["oid"], row["xmin"]) for row in [*functions, *triggers]}


async def nothing_created(conn: Any, shop: str, store_schema: str) -> bool:
    """No store schema, no function in it, no trigger on the shop's tables."""
    schema = await conn.fetchval("SELECT to_regnamespace($1)::text", store_schema)
    return schema is None and await installed(conn, shop, store_schema) == {}
