"""MemoryStore and PostgresStore agree: the same random op sequences give the same graphs and errors."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from graphcache.storage import Delete, MemoryStore, Op, PostgresStore, StoreError, Upsert

pytestmark = pytest.mark.anyio


@pytest.fixture
async def both(postgres_dsn: str, pg_schema: str) -> AsyncIterator[tuple[MemoryStore, PostgresStore]]:
    """A MemoryStore and a PostgresStore on this test's schema."""
    memory = MemoryStore()
    postgres = await PostgresStore.connect(postgres_dsn, pg_schema, pool_size=2)
    try:
        yield memory, postgres
    finally:
        await memory.aclose()
        await postgres.aclose()


def random_ops(rng: random.Random, known: dict[str, int]) -> list[Op]:
    """1-3 ops over known and new ids, with right, wrong or no expected row versions; some are invalid."""
    ids = [*known, f"n{rng.randrange(12)}", "root"]
    ops: list[Op] = []
    for _ in range(rng.randint(1, 3)):
        node = rng.choice(ids)
        expected = rng.choice([None, None, known.get(node, 0), rng.randrange(4)])
        if rng.random() < 0.7:
            parent = None if node == "root" else rng.choice(ids)
            ops.append(
                Upsert(node, parent, {"v": rng.randrange(100), "tags": ["x"] * rng.randrange(3)}, expected)
            )
        else:
            ops.append(Delete(node, expected))
    return ops


async def outcome(store: Any, ops: list[Op]) -> tuple[str, Any]:
    try:
        version = await store.apply("root", ops)
    except StoreError as exc:
        return type(exc).__name__, await store.load("root")
    return f"v{version}", await store.load("root")


@pytest.mark.parametrize("seed", range(6))
async def test_both_stores_give_the_same_outcome_for_random_ops(
    both: tuple[MemoryStore, PostgresStore], seed: int
) -> None:
    """Each random apply has the same result (version or error class) and leaves equal graphs."""
    memory, postgres = both
    rng = random.Random(seed)
    for store in both:
        await store.create_root("root", {"seed": seed})
    kinds = set()
    for _ in range(25):
        known = {node.id: node.row_version for node in (await memory.load("root")).nodes.values()}
        ops = random_ops(rng, known)
        expected, actual = await outcome(memory, ops), await outcome(postgres, ops)
        assert actual == expected, ops
        kinds.add(expected[0] if not expected[0].startswith("v") else "applied")
    assert "applied" in kinds
    assert len(kinds) >= 2, "the sequence exercised at least one error too"
