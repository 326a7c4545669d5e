# ruff: noqa: S608  (schema names come from the pg_schema fixture; values are bind parameters)
"""PostgresStore's durable checkpoints and root listing: durability, retention, migration, index use."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import msgspec
import pytest

from graphcache.storage import Upsert, slot_of
from graphcache.storage._schema import SCHEMA_VERSION
from tests._shared_fixtures import Connect

pytestmark = pytest.mark.anyio


async def test_a_checkpoint_survives_closing_and_reconnecting(connect: Connect) -> None:
    """A checkpoint saved by one store is loaded by a new store on the same schema after the first closed."""
    first = await connect()
    await first.save_checkpoint("node-1", 4242)
    await first.aclose()
    second = await connect()
    checkpoint = await second.load_checkpoint("node-1")
    assert checkpoint is not None
    assert (checkpoint.cursor, checkpoint.resumable) == (4242, True)


async def test_a_checkpoint_older_than_the_retention_is_not_resumable(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """The age is the server's now() minus saved_at; at or past the retention, resumable is False."""
    store = await connect(retention=3600)
    await store.save_checkpoint("young", 1)
    await store.save_checkpoint("old", 2)
    s = f'"{pg_schema}".checkpoints'
    await raw.execute(f"UPDATE {s} SET saved_at = now() - interval '2 hours' WHERE name = 'old'")
    await raw.execute(f"UPDATE {s} SET saved_at = now() - interval '59 minutes' WHERE name = 'young'")
    old, young = await store.load_checkpoint("old"), await store.load_checkpoint("young")
    assert old is not None
    assert young is not None
    assert (old.cursor, old.resumable) == (2, False)
    assert old.age >= 7200
    assert (young.cursor, young.resumable) == (1, True)
    assert young.age >= 59 * 60


async def test_pruning_forgets_checkpoints_older_than_the_retention(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """Pruning the outbox also deletes checkpoints unsaved for the retention period (they cannot resume),
    so nodes that come and go under new ids leave nothing behind; younger ones stay."""
    store = await connect(retention=3600)
    await store.save_checkpoint("gone-node", 1)
    await store.save_checkpoint("live-node", 2)
    s = f'"{pg_schema}".checkpoints'
    await raw.execute(f"UPDATE {s} SET saved_at = now() - interval '2 hours' WHERE name = 'gone-node'")
    await store.prune_outbox()
    assert await store.load_checkpoint("gone-node") is None
    live = await store.load_checkpoint("live-node")
    assert live is not None
    assert live.cursor == 2


async def test_a_fresh_checkpoint_is_not_resumable_once_pruning_took_a_change_after_it(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """Pruning an outbox row past the cursor makes a checkpoint not resumable whatever its age."""
    store = await connect(retention=3600)
    await store.create_root("r", {})
    await store.save_checkpoint("before", await store.cursor())
    await store.apply("r", [Upsert("x", "r", {})])
    await raw.execute(f'UPDATE "{pg_schema}".outbox SET committed_at = committed_at - 7200')
    assert await store.prune_outbox() == 2
    await store.save_checkpoint("after", await store.cursor())
    before, after = await store.load_checkpoint("before"), await store.load_checkpoint("after")
    assert before is not None
    assert after is not None
    assert before.age < 3600  # young, yet the change after it (version 2) is gone
    assert before.resumable is False
    assert after.resumable is True
    assert await store.prune_outbox() == 0  # pruning nothing moves nothing
    again = await store.load_checkpoint("after")
    assert again is not None
    assert again.resumable


async def test_a_checkpoint_saved_with_a_future_timestamp_has_age_zero(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """A server clock that stepped back never gives a negative age."""
    store = await connect()
    await store.save_checkpoint("n", 1)
    await raw.execute(f"UPDATE \"{pg_schema}\".checkpoints SET saved_at = now() + interval '1 hour'")
    checkpoint = await store.load_checkpoint("n")
    assert checkpoint is not None
    assert (checkpoint.age, checkpoint.resumable) == (0.0, True)


async def test_a_version_2_schema_is_upgraded_on_connect(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """A schema left at version 2 (no checkpoints table, no code-point index) gets both, data untouched."""
    old = await connect()
    await old.create_root("r", {"kept": True})
    await old.aclose()
    s = f'"{pg_schema}"'
    await raw.execute(f"DROP TABLE {s}.checkpoints, {s}.outbox_pruned")
    await raw.execute(f"DROP INDEX {s}.roots_by_code_point")
    await raw.execute(f"UPDATE {s}.schema_version SET version = 2")
    store = await connect()
    assert await raw.fetchval(f"SELECT version FROM {s}.schema_version") == SCHEMA_VERSION == 4
    assert await raw.fetchval(f"SELECT count(*) FROM {s}.outbox_pruned") == 1
    await store.save_checkpoint("n", 7)
    checkpoint = await store.load_checkpoint("n")
    assert checkpoint is not None
    assert checkpoint.cursor == 7
    assert await store.apply("r", [Upsert("c", "r", {})]) == 2
    assert await store.root_versions() == [("r", 2)]
    assert (await store.load("r")).nodes["r"].data == {"kept": True}


async def test_a_version_3_schema_gets_row_images_and_slots_on_connect(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """A schema left at version 3 (no outbox images or slots) is upgraded: old rows get their slot."""
    old = await connect()
    await old.create_root("r", {"kept": True})
    await old.aclose()
    s = f'"{pg_schema}"'
    await raw.execute(f"ALTER TABLE {s}.outbox DROP COLUMN slot, DROP COLUMN images")
    await raw.execute(f"DROP FUNCTION {s}.slot_of(text), {s}.bump_root(text, jsonb)")
    await raw.execute(f"UPDATE {s}.schema_version SET version = 3")
    store = await connect()
    assert await raw.fetchval(f"SELECT version FROM {s}.schema_version") == SCHEMA_VERSION
    assert await raw.fetchval(f"SELECT slot FROM {s}.outbox WHERE root_id = 'r'") == slot_of("r")
    assert await store.apply("r", [Upsert("c", "r", {"n": 1})]) == 2
    images = await raw.fetchval(f"SELECT images::text FROM {s}.outbox WHERE version = 2")
    assert msgspec.json.decode(images) == [["c", "r", {"n": 1}, 1]]


async def test_root_versions_reads_roots_by_their_code_point_index(
    connect: Connect, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """A never-analysed roots table of 5,000 rows: both pages' plans (custom and generic) use the index."""
    store = await connect()
    await raw.execute(
        f'INSERT INTO "{pg_schema}".roots (root_id, version)'
        " SELECT 'r' || g, g FROM generate_series(1, 5000) AS g"
    )
    statements = [(store._sql.root_versions_first, (100,)), (store._sql.root_versions_after, ("r42", 100))]
    for statement, args in statements:
        plans = [await raw.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args)]
        async with raw.transaction():
            await raw.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            plans.append(await raw.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *args))
        for plan in plans:
            scans = [node for node in _plan_nodes(json.loads(plan)[0]["Plan"]) if node.get("Relation Name")]
            assert [node.get("Index Name") for node in scans] == ["roots_by_code_point"], plan
    assert len(await store.root_versions(limit=100_000)) == 5000


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)
