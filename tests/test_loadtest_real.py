"""The load generator on the real servers: writer, reader and node processes, checked histories."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest
import redis

from graphcache import _cli
from graphcache.actors import graph_key
from graphcache.cache import CacheUnavailable
from graphcache.harness import StrategyResult, _loadtest, read_history
from graphcache.harness._lt_backends import Env
from graphcache.harness._servers import drop_schema
from graphcache.harness._strategies import Tally
from graphcache.harness._workload import Stopper
from tests._redis_servers import PrivateRedis
from tests._spec_shop import spec_toml

pytestmark = pytest.mark.slow


def loadtest(argv: list[str]) -> int:
    """``graphcache loadtest ARGV``, in this process."""
    return _cli.main(["loadtest", *argv])


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


def test_visibility_lag_and_costs_are_measured_on_real_servers(
    real_run: tuple[int, Path, dict[str, StrategyResult]],
) -> None:
    """The sidecars (serve --record-puts) and the naive writers record the puts Redis stored: both get a
    finite visibility lag, and snapshot loads and puts per update above zero."""
    out, results = real_run[1], real_run[2]
    for name in ("actor", "naive"):
        result = results[name]
        p50, p99 = result.check.visibility_lag_p50, result.check.visibility_lag_p99
        assert p50 is not None
        assert p99 is not None
        assert 0 <= p50 <= p99 < 60
        assert result.check.stored_puts > 0
        assert result.loads_per_update is not None
        assert result.loads_per_update > 0
        assert result.puts_per_update is not None
        assert result.puts_per_update > 0
    files = sorted((out / "actor" / "actor").glob("node-*.jsonl"))
    assert [f.name for f in files] == ["node-0.jsonl", "node-1.jsonl"]
    puts = read_history(*files)
    assert puts
    assert {e.process for e in puts} <= {"node-0", "node-1"}  # a node may own none of the 4 roots
    assert {(e.op, e.type) for e in puts} == {("rebuild", "ok")}


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
    log = (real_run[1] / "actor" / "actor" / "node-0.log").read_text()
    found = re.search(r"\((gclt[0-9a-f]{10}):members\)", log)
    assert found is not None
    namespace = found.group(1)
    assert keys_under(redis_url, namespace) == []
    assert not anyio.run(schema_exists, postgres_dsn, namespace.replace("gclt", "gclt_", 1))


async def schema_exists(dsn: str, schema: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema))
    finally:
        await conn.close()


def keys_under(url: str, namespace: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return list(client.scan_iter(match=f"{namespace}:*"))


class FailingLoad:
    """Stands in for the load phase: checks the run's schema and keys exist, then fails as if Redis had
    gone away mid-run."""

    def __init__(self) -> None:
        self.seen: list[Env] = []

    async def __call__(self, env: Env, name: str, out: Path, interrupt: Stopper) -> tuple[Tally, float]:
        self.seen.append(env)
        await env.cache.add(graph_key("scratch"), {"made": "by this run"})
        assert env.config.postgres is not None
        assert await schema_exists(env.config.postgres, env.schema)
        raise CacheUnavailable("lost the connection to Redis mid-run")


@pytest.fixture
def servers(redis_url: str, postgres_dsn: str) -> list[str]:
    """The shared servers as command-line flags."""
    return ["--redis", redis_url, "--postgres", postgres_dsn]


@pytest.mark.parametrize("command", ["loadtest", "demo"])
def test_a_run_that_fails_midway_leaves_no_schema_and_no_keys(
    command: str,
    servers: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real-server run that fails after creating its schema and keys exits 1 with one line saying why,
    and its gclt schema and keys are gone."""
    failing = FailingLoad()
    monkeypatch.setattr(_loadtest, "load", failing)
    argv = [*servers, "--duration", "1", "--no-progress"]
    if command == "loadtest":
        argv += ["--strategy", "cas", "--roots", "2", "--out", str(tmp_path)]
    assert _cli.main([command, *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"graphcache {command}: lost the connection to Redis mid-run")
    assert err.count("\n") == 1
    (env,) = failing.seen
    assert env.schema.startswith("gclt_")
    assert env.config.redis is not None
    assert env.config.postgres is not None
    assert not anyio.run(schema_exists, env.config.postgres, env.schema)
    assert keys_under(env.config.redis, env.namespace) == []


@pytest.mark.fault
def test_redis_stopped_mid_run_is_one_line_and_the_schema_is_dropped(
    private_redis: PrivateRedis, postgres_dsn: str, tmp_path: Path
) -> None:
    """Redis killed while the writers run: the load test exits 1 with one line naming what failed and the
    keys it could not remove, and the run's PostgreSQL schema is dropped all the same."""
    argv = [
        sys.executable, "-m", "graphcache", "loadtest", "--strategy", "cas", "--redis", private_redis.url,
        "--postgres", postgres_dsn, "--roots", "4", "--writers", "4", "--readers", "1", "--duration", "3",
        "--settle", "1", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        history = tmp_path / "cas" / "writers-0.jsonl"
        deadline = time.monotonic() + 60
        # The writers' first flushed events: a file condition, polled under a deadline.
        while not (history.exists() and history.stat().st_size > 0):
            assert time.monotonic() < deadline, "the writers never started"
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        private_redis.stop()
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    # The private server stays down: it kept nothing (no persistence), so there is nothing to clean, and
    # restarting it on its old port can fail once an outgoing connection has taken that port meanwhile.
    assert run.returncode == 1, err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    found = re.search(r"could not remove the Redis keys (gclt[0-9a-f]{10}):\*", err)
    assert found is not None, err
    schema = found.group(1).replace("gclt", "gclt_", 1)
    assert not anyio.run(schema_exists, postgres_dsn, schema)


# ---- --graph: the load test on a team's own tables ---------------------------------------------------------

SHOP_TABLES = """
CREATE TABLE {s}.orders (id bigint PRIMARY KEY, customer text, total numeric(8,2), paid boolean NOT NULL
    DEFAULT false, code varchar(4));
CREATE TABLE {s}.order_lines (id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES {s}.orders,
    sku text UNIQUE, qty int, pos smallint, price float8, meta jsonb);
CREATE TABLE {s}.line_notes (id bigint PRIMARY KEY, line_id bigint NOT NULL REFERENCES {s}.order_lines,
    body text CHECK (length(body) < 100), noted_at timestamptz NOT NULL DEFAULT now());
"""
SHOP_ROWS = """
INSERT INTO {s}.orders (id, customer, total) SELECT g, 'c' || g, g * 1.5 FROM generate_series(1, 10) g;
INSERT INTO {s}.order_lines (id, order_id, sku, qty, meta)
    SELECT g, 1 + g % 10, 'sku-' || g, g, '{{"gift": false}}' FROM generate_series(1, 30) g;
INSERT INTO {s}.line_notes (id, line_id, body) SELECT g, 1 + g % 30, 'n' || g FROM generate_series(1, 40) g;
"""
WRITABLE = {
    "orders": {"customer", "total", "paid", "code"},
    "order_lines": {"qty", "pos", "price", "meta"},
    "line_notes": set(),  # body is under a CHECK, noted_at a timestamp: no-op updates only
}
"""The columns a --graph writer may change in the shop's tables; every other column stays as it was."""


async def make_shop(dsn: str, schema: str, *, rows: bool) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"' + SHOP_TABLES.format(s=f'"{schema}"'))
        if rows:
            await conn.execute(SHOP_ROWS.format(s=f'"{schema}"'))
    finally:
        await conn.close()


async def shop_rows(dsn: str, schema: str) -> dict[str, dict[int, dict[str, object]]]:
    """Every row of the shop's tables, by table and key."""
    conn = await asyncpg.connect(dsn)
    try:
        return {
            table: {row["id"]: dict(row) for row in await conn.fetch(f'SELECT * FROM "{schema}".{table}')}  # noqa: S608
            for table in WRITABLE
        }
    finally:
        await conn.close()


async def triggers_on(dsn: str, schema: str) -> list[str]:
    """The user triggers on the tables of ``schema`` (a foreign key's internal ones aside)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT t.tgname FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid"
            " JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND NOT t.tgisinternal",
            schema,
        )
        return [row["tgname"] for row in rows]
    finally:
        await conn.close()


class Shop(msgspec.Struct):
    """A team's schema of three tables (orders -> order_lines -> line_notes) and its graph spec."""

    schema: str
    spec: Path


@contextlib.contextmanager
def shop(dsn: str, directory: Path, *, rows: bool = True) -> Iterator[Shop]:
    from tests.conftest import RUN_ID  # noqa: PLC0415

    schema = f"gct_{RUN_ID}_shop{uuid.uuid4().hex[:6]}"
    spec = directory / "shop.toml"
    spec.write_text(spec_toml(schema))
    try:
        anyio.run(functools.partial(make_shop, dsn, schema, rows=rows))
        yield Shop(schema, spec)
    finally:
        anyio.run(drop_schema, dsn, schema)


class GraphRun(msgspec.Struct):
    code: int
    out: Path
    shop: Shop
    before: dict[str, dict[int, dict[str, object]]]
    after: dict[str, dict[int, dict[str, object]]]


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GraphRun]:
    """A short ``loadtest --graph`` run (actor) on a three-level shop in a schema of its own."""
    from tests.conftest import POSTGRES_DSN, REDIS_URL  # noqa: PLC0415

    out = tmp_path_factory.mktemp("graph")
    with shop(POSTGRES_DSN, out) as team:
        before = anyio.run(shop_rows, POSTGRES_DSN, team.schema)
        argv = ["--graph", str(team.spec), "--yes", "--strategy", "actor", "--redis", REDIS_URL,
                "--postgres", POSTGRES_DSN, "--roots", "4", "--writers", "8", "--readers", "4",
                "--duration", "3", "--settle", "15", "--no-progress", "--out", str(out / "run")]  # fmt: skip
        code = loadtest(argv)
        after = anyio.run(shop_rows, POSTGRES_DSN, team.schema)
        yield GraphRun(code, out / "run", team, before, after)


def graph_report(run: GraphRun) -> tuple[StrategyResult, dict[str, Any]]:
    payload = json.loads((run.out / "report.json").read_bytes())
    (actor,) = msgspec.convert(payload["results"], list[StrategyResult])
    return actor, payload["config"]["graph"]


def test_graph_run_keeps_g1_g2_g3(graph_run: GraphRun) -> None:
    """Plain-SQL writes to the team's tables, sidecars serving the spec: the checker judges reads against
    the hashes the writers read inside their transactions and finds no regression, torn graph or stale
    root."""
    actor, graph = graph_report(graph_run)
    assert graph_run.code == 0
    assert len(graph["roots"]) == 4
    assert actor.updates > 0
    check = actor.check
    assert (check.regressions, check.torn, check.stale) == (0, 0, 0)
    assert check.reads - check.absent_reads - check.unjudged > 0  # reads judged by hash
    assert check.unread_at_end == 0
    assert 0 < actor.rebuilds < actor.updates


def test_graph_run_writes_only_writable_columns_of_sampled_roots(graph_run: GraphRun) -> None:
    """No row appears or vanishes, no key or parent key moves, no column outside the writable ones
    changes, and the rows of roots that were not sampled are untouched; the writable ones did change."""
    _, graph = graph_report(graph_run)
    sampled = {int(key) for key in graph["roots"]}
    before, after = graph_run.before, graph_run.after
    changed = 0
    for table, writable in WRITABLE.items():
        assert after[table].keys() == before[table].keys()
        for key, row in after[table].items():
            old = before[table][key]
            root = key if table == "orders" else None
            if table == "order_lines":
                root = row["order_id"]
            elif table == "line_notes":
                root = before["order_lines"][row["line_id"]]["order_id"]
            moved = {column for column in row if row[column] != old[column]}
            assert moved <= (writable if root in sampled else set()), (table, key, moved)
            changed += len(moved)
    assert changed > 0


def test_graph_run_removes_triggers_schema_and_keys(
    graph_run: GraphRun, redis_url: str, postgres_dsn: str
) -> None:
    """Afterwards the team's tables carry no trigger, the run's store schema is dropped and its Redis
    namespace is empty."""
    assert anyio.run(triggers_on, postgres_dsn, graph_run.shop.schema) == []
    log = (graph_run.out / "actor" / "node-0.log").read_text()
    found = re.search(r"\((gclt[0-9a-f]{10}):members\)", log)
    assert found is not None
    namespace = found.group(1)
    assert keys_under(redis_url, namespace) == []
    assert not anyio.run(schema_exists, postgres_dsn, namespace.replace("gclt", "gclt_", 1))


GRAPH_BAD_INPUT = {
    "no --postgres": "--graph runs on the real servers only",
    "spec cycle": "parent cycle",
    "spec names a missing column": "has no column 'colour'",
    "empty root table": "has no rows to write to",
    "no --yes without a terminal": "add --yes to go ahead",
}


@pytest.mark.parametrize("case", GRAPH_BAD_INPUT)
def test_graph_bad_input_is_one_line_and_exit_2(
    case: str,
    redis_url: str,
    postgres_dsn: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bad input to --graph is one line on stderr, exit 2, and nothing is installed or written."""
    with shop(postgres_dsn, tmp_path, rows=case != "empty root table") as team:
        spec = team.spec.read_text()
        if case == "spec cycle":
            spec = spec.replace('parent = "orders"', 'parent = "line_notes"')
        elif case == "spec names a missing column":
            spec = spec.replace('["id", "line_id", "body"]', '["id", "colour"]')
        team.spec.write_text(spec)
        servers = ["--redis", redis_url] + ([] if case == "no --postgres" else ["--postgres", postgres_dsn])
        yes = [] if case == "no --yes without a terminal" else ["--yes"]
        before = anyio.run(shop_rows, postgres_dsn, team.schema)
        argv = ["--graph", str(team.spec), *yes, *servers, "--duration", "1", "--no-progress",
                "--out", str(tmp_path / "out")]  # fmt: skip
        assert loadtest(argv) == 2
        err = capsys.readouterr().err
        assert GRAPH_BAD_INPUT[case] in err, err
        assert err.count("\n") == 1, err
        assert anyio.run(triggers_on, postgres_dsn, team.schema) == []
        assert anyio.run(shop_rows, postgres_dsn, team.schema) == before
