"""The load generator on the real servers: writer, reader and node processes, checked histories."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import anyio
import msgspec
import pytest

from graphcache.harness import StrategyResult, _loadtest, read_history

pytestmark = pytest.mark.slow


def loadtest(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    _loadtest.add_arguments(parser)
    return _loadtest.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict[str, StrategyResult]]:
    """A short actor-then-naive run on the shared Redis and PostgreSQL (fresh namespace and schema each)."""
    from tests.conftest import POSTGRES_DSN, REDIS_URL  # noqa: PLC0415

    out = tmp_path_factory.mktemp("real")
    results: dict[str, StrategyResult] = {}
    codes = []
    for strategy in ("actor", "naive"):
        argv = ["--strategy", strategy, "--redis", REDIS_URL, "--postgres", POSTGRES_DSN, "--roots", "4",
                "--writers", "32", "--readers", "6", "--duration", "3", "--settle", "15", "--no-progress",
                "--out", str(out / strategy)]  # fmt: skip
        codes.append(loadtest(argv))
        payload = json.loads((out / strategy / "report.json").read_bytes())
        results.update({r.strategy: r for r in msgspec.convert(payload["results"], list[StrategyResult])})
    return codes[0], out, results


def test_actor_on_real_servers_keeps_g1_g2_g3(real_run: tuple[int, Path, dict[str, StrategyResult]]) -> None:
    """Node processes (run.py serve) rebuild from the PostgreSQL feed: no regression, no torn, converged."""
    code, _, results = real_run
    actor = results["actor"]
    assert code == 0
    assert actor.updates > 0
    assert (actor.check.regressions, actor.check.torn, actor.check.stale) == (0, 0, 0)
    assert actor.check.unread_at_end == 0
    assert 0 < actor.rebuilds < actor.updates


def test_naive_on_real_servers_is_caught(real_run: tuple[int, Path, dict[str, StrategyResult]]) -> None:
    """The naive re-cache across writer processes shows regressions or torn graphs."""
    naive = real_run[2]["naive"]
    assert naive.updates > 0
    assert naive.check.regressions + naive.check.torn > 0


def test_each_process_wrote_its_history(real_run: tuple[int, Path, dict[str, StrategyResult]]) -> None:
    """Writers, readers and the settle phase each leave a history; every writer task wrote."""
    out = real_run[1] / "naive" / "naive"
    names = sorted(p.name for p in out.glob("*.jsonl"))
    assert names == ["main.jsonl", "readers-0.jsonl", "writers-0.jsonl", "writers-1.jsonl"]
    writers = {e.process for e in read_history(*out.glob("writers-*.jsonl")) if e.op == "write"}
    assert writers == {f"writer-{i}" for i in range(32)}


def test_the_run_leaves_no_keys_and_no_schema(
    real_run: tuple[int, Path, dict[str, StrategyResult]], redis_url: str, postgres_dsn: str
) -> None:
    """The actor run's namespace (named in its node logs) has no keys left and its schema is dropped."""
    import asyncpg  # noqa: PLC0415
    import redis  # noqa: PLC0415

    log = (real_run[1] / "actor" / "actor" / "node-0.log").read_text()
    found = re.search(r"\((gclt[0-9a-f]{10}):members\)", log)
    assert found is not None
    namespace = found.group(1)
    schema = namespace.replace("gclt", "gclt_", 1)

    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(match=f"{namespace}:*")) == []
    finally:
        client.close()

    async def schema_exists() -> bool:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            return bool(await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema))
        finally:
            await conn.close()

    assert not anyio.run(schema_exists)
