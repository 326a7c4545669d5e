"""bench store runs end to end on the shared PostgreSQL and drops its schema."""

from __future__ import annotations

import argparse
import re

import asyncpg
import pytest

from graphcache.harness import _bench_store

pytestmark = pytest.mark.anyio

ROWS = (
    "apply, transactions/s",
    "load 50-node graph, loads/s",
    "load_many x20, calls/s (raw: 20 loads)",
    "feed commit->delivery p99 ms",
)


async def bench_schemas(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench_store_%'")
    finally:
        await conn.close()
    return {row["nspname"] for row in rows}


async def test_bench_store_reports_every_measure_and_drops_its_schema(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny run prints each measure with a number (and a ratio where there is a baseline)."""
    before = await bench_schemas(postgres_dsn)
    parser = argparse.ArgumentParser()
    _bench_store.add_arguments(parser)
    tiny = ["--rounds", "1", "--seconds", "0.1", "--concurrency", "2"]
    feed = ["--feed-rate", "50", "--feed-seconds", "0.5", "--feed-writers", "2"]
    args = parser.parse_args(["--postgres", postgres_dsn, *tiny, *feed])
    assert await _bench_store._main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ROWS:
        line = next((line for line in lines if line.startswith(name)), None)
        assert line is not None, f"no row {name!r} in {lines}"
        assert re.search(r"\s\d+\.\d\s", line), f"no measured figure in {line!r}"
        if not name.startswith("feed"):  # these have a baseline measured in the same run
            assert re.search(r"\s\d+\.\d\d\s", line), f"no ratio in {line!r}"
    assert await bench_schemas(postgres_dsn) <= before


async def test_a_failed_bench_store_drops_its_schema(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails after creating its schema raises its error, and the schema is dropped."""
    created: list[str] = []

    async def fail_after_creating(args: object, store: object, raw: object, schema: str) -> None:
        created.append(schema)
        assert schema in await bench_schemas(postgres_dsn)
        raise ConnectionResetError("PostgreSQL closed the connection")

    monkeypatch.setattr(_bench_store, "_measure", fail_after_creating)
    parser = argparse.ArgumentParser()
    _bench_store.add_arguments(parser)
    args = parser.parse_args(["--postgres", postgres_dsn, "--concurrency", "1"])
    with pytest.raises(ConnectionResetError):
        await _bench_store._main(args)
    (schema,) = created
    assert schema not in await bench_schemas(postgres_dsn)
