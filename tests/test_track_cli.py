# ruff: noqa: S608  (schema names come from fixtures; values are bind parameters)
"""`graphcache track` installs exactly what a graph spec needs and says so; `graphcache serve --graph`
serves those graphs over HTTP to a service that writes its tables with plain SQL."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import anyio
import asyncpg
import httpx
import msgspec
import pytest

from graphcache import _cli
from graphcache.actors import graph_key
from graphcache.cache import RedisCache
from graphcache.storage import GraphSpec
from graphcache.storage._schema import Sql
from graphcache.storage._spec_sql import SpecSql
from tests._sidecar_procs import ROOT_DIR, Servers, serve_command, sidecar
from tests._spec_shop import create_shop, installed, nothing_created, shop_schema, spec_toml


class Outcome(NamedTuple):
    status: int
    stdout: list[str]
    stderr: list[str]


def _environment(extra: dict[str, str]) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("GRAPHCACHE_")}
    return clean | extra


async def graphcache(*argv: str, env: dict[str, str] | None = None) -> Outcome:
    """``python -m graphcache ARGV`` in its own process."""
    result = await anyio.run_process(
        [sys.executable, "-m", "graphcache", *argv], check=False, cwd=ROOT_DIR, env=_environment(env or {})
    )
    return Outcome(
        result.returncode, result.stdout.decode().splitlines(), result.stderr.decode().splitlines()
    )


@pytest.fixture
async def shop(postgres_dsn: str, pg_schema: str, raw: asyncpg.Connection) -> AsyncIterator[str]:
    """The shop's three tables in a schema of this test's own; the store schema is ``pg_schema``."""
    async with shop_schema(postgres_dsn, pg_schema) as name:
        await create_shop(raw, name)
        yield name


class Tracker(NamedTuple):
    spec: Path
    dsn: str
    schema: str

    async def track(self, text: str, *extra: str, env: dict[str, str] | None = None) -> Outcome:
        """Write ``text`` as the spec file and run ``graphcache track`` on it."""
        self.spec.write_text(text)
        argv = ("track", "--graph", str(self.spec), "--postgres", self.dsn, "--schema", self.schema)
        return await graphcache(*argv, *extra, env=env)


@pytest.fixture
def tracker(tmp_path: Path, postgres_dsn: str, pg_schema: str) -> Tracker:
    return Tracker(tmp_path / "shop.toml", postgres_dsn, pg_schema)


@pytest.mark.anyio
async def test_tracking_twice_changes_nothing_the_second_time(
    tracker: Tracker, shop: str, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """The first run creates the store schema, 3 functions and 3 triggers, one line each and a summary;
    the second reports all unchanged, "nothing to do", and touches no catalog row."""
    first = await tracker.track(spec_toml(shop))
    assert first.status == 0, first.stderr
    assert first.stderr == []
    assert first.stdout[-1] == f"change tracking of graph {shop}.orders in schema {pg_schema}: 7 created"
    steps = first.stdout[:-1]
    assert steps[0].startswith(f"create store schema {pg_schema} ")
    assert sum(line.startswith(f"create function {pg_schema}.spec_track_") for line in steps) == 3
    for table in ("orders", "order_lines", "line_notes"):
        assert any(
            line.startswith("create trigger ") and line.endswith(f" on {shop}.{table}") for line in steps
        )
    before = await installed(raw, shop, pg_schema)
    assert sum(name.startswith("spec_track_") for name in before) == 3
    assert sum(name.endswith(f".graphcache_track_graphcache_{pg_schema}") for name in before) == 3
    second = await tracker.track(spec_toml(shop))
    assert second.status == 0, second.stderr
    assert second.stdout[-1] == (
        f"change tracking of graph {shop}.orders in schema {pg_schema} is up to date: nothing to do"
    )
    assert len(second.stdout[:-1]) == 6
    assert all(line.startswith("unchanged ") for line in second.stdout[:-1])
    assert await installed(raw, shop, pg_schema) == before


@pytest.mark.anyio
async def test_dry_run_prints_the_sql_and_changes_nothing(
    tracker: Tracker, shop: str, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """--dry-run (or GRAPHCACHE_DRY_RUN=1) prints each step as an SQL comment and the SQL of each change,
    and creates nothing, not even the store schema; after a real run it shows a removal as DROP."""
    for extra, env in (("--dry-run",), {}), ((), {"GRAPHCACHE_DRY_RUN": "1"}):
        dry = await tracker.track(spec_toml(shop), *extra, env=env)
        assert dry.status == 0, dry.stderr
        assert dry.stdout[-1] == (
            "-- dry run, nothing was changed: change tracking of graph"
            f" {shop}.orders in schema {pg_schema} would be: 7 created"
        )
        text = "\n".join(dry.stdout)
        assert len(re.findall(r"^CREATE OR REPLACE FUNCTION .*\$fn\$$", text, re.MULTILINE)) == 3
        assert len(re.findall(r"^CREATE OR REPLACE TRIGGER .* ON .*\(\);$", text, re.MULTILINE)) == 3
        assert "FOR SHARE OF a1" in text  # line_notes finds its root through its line
        assert await nothing_created(raw, shop, pg_schema)
    assert (await tracker.track(spec_toml(shop))).status == 0
    before = await installed(raw, shop, pg_schema)
    without_notes = spec_toml(shop).split("[tables.line_notes]")[0]
    dry = await tracker.track(without_notes, "--dry-run")
    assert dry.status == 0, dry.stderr
    removal = [i for i, line in enumerate(dry.stdout) if line.startswith("-- remove function ")]
    assert len(removal) == 1
    assert dry.stdout[removal[0]].endswith(f"and its triggers on {shop}.line_notes (not in this spec)")
    assert re.fullmatch(
        rf'DROP FUNCTION "{pg_schema}"\."spec_track_line_notes_\w+"\(\) CASCADE;', dry.stdout[removal[0] + 1]
    )
    assert dry.stdout[-1].startswith("-- dry run, nothing was changed: ")
    assert "1 removed" in dry.stdout[-1]
    assert await installed(raw, shop, pg_schema) == before


def generated(text: str, schema: str) -> dict[str, str]:
    """The trigger function bodies a spec needs: function name -> body."""
    spec = GraphSpec.loads(text)
    sql = SpecSql(spec, Sql(schema), "integer")
    return {sql.function_name(table): sql.function_body(table) for table in spec.tables}


def steps(outcome: Outcome, verb: str) -> set[str]:
    """The function names of the steps with ``verb`` (``replace function S.NAME (...)``)."""
    prefix = f"{verb} function "
    return {
        line[len(prefix) :].split()[0].split(".", 1)[1] for line in outcome.stdout if line.startswith(prefix)
    }


@pytest.mark.anyio
async def test_changing_the_spec_changes_exactly_what_differs(
    tracker: Tracker, shop: str, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """After a change to the spec (columns added, a new parent_key, a table removed) track replaces exactly
    the functions whose generated SQL differs, removes those of tables left out with their triggers, and
    touches no other function or trigger."""
    original = spec_toml(shop)
    with_columns = original.replace(
        '[tables.orders]\nkey = "id"', '[tables.orders]\nkey = "id"\ncolumns = ["id", "customer"]'
    )
    moved = with_columns.replace('parent_key = "order_id"', 'parent_key = "order_ref"')
    without_notes = moved.split("[tables.line_notes]")[0]
    await raw.execute(f'UPDATE "{shop}".order_lines SET order_ref = order_id')
    assert (await tracker.track(original)).status == 0
    trigger = f"graphcache_track_graphcache_{pg_schema}"
    done: dict[str, tuple[set[str], set[str]]] = {}
    for step, before, after in (
        ("columns", original, with_columns),
        ("parent_key", with_columns, moved),
        ("removal", moved, without_notes),
    ):
        old, new = generated(before, pg_schema), generated(after, pg_schema)
        replace = {name for name in new.keys() & old.keys() if new[name] != old[name]}
        remove = old.keys() - new.keys()
        left_out = {t.name for t in GraphSpec.loads(before).tables} - {
            t.name for t in GraphSpec.loads(after).tables
        }
        catalog = await installed(raw, shop, pg_schema)
        outcome = await tracker.track(after)
        assert outcome.status == 0, outcome.stderr
        assert (steps(outcome, "replace"), steps(outcome, "remove")) == (replace, remove)
        others = [
            line
            for line in outcome.stdout[:-1]
            if not line.startswith(("replace function", "remove function"))
        ]
        assert all(line.startswith("unchanged ") for line in others), outcome.stdout
        now = await installed(raw, shop, pg_schema)
        touched = replace | remove | {f"{table}.{trigger}" for table in left_out}
        assert {name for name in catalog if now.get(name) != catalog[name]} == touched
        assert now.keys() <= catalog.keys()
        done[step] = (replace, remove)
    # the notes and the lines find their order through the parent key: both functions had to change
    assert {name.rsplit("_", 1)[0] for name in done["parent_key"][0]} >= {
        "spec_track_order_lines",
        "spec_track_line_notes",
    }
    assert {name.rsplit("_", 1)[0] for name in done["removal"][1]} == {"spec_track_line_notes"}
    assert not any(name.startswith("line_notes.") for name in await installed(raw, shop, pg_schema))


@pytest.mark.anyio
async def test_a_spec_that_does_not_fit_the_database_exits_2_and_changes_nothing(
    tracker: Tracker, shop: str, raw: asyncpg.Connection, pg_schema: str
) -> None:
    """A missing table is bad input: one line naming it, exit 2, no traceback, nothing created."""
    outcome = await tracker.track(spec_toml(shop).replace("line_notes", "line_memos"))
    assert outcome.status == 2
    assert outcome.stdout == []
    assert outcome.stderr == [
        f"graphcache track: graph spec {tracker.spec}: table {shop}.line_memos does not exist"
    ]
    assert await nothing_created(raw, shop, pg_schema)


@pytest.mark.anyio
async def test_run_py_track_is_the_same_command(tracker: Tracker, shop: str, pg_schema: str) -> None:
    """``python run.py track`` from a checkout tracks like ``graphcache track``."""
    tracker.spec.write_text(spec_toml(shop))
    command = [sys.executable, str(ROOT_DIR / "run.py"), "track", "--graph", str(tracker.spec)]
    result = await anyio.run_process(
        [*command, "--schema", pg_schema],
        check=False, cwd=ROOT_DIR, env=_environment({"GRAPHCACHE_POSTGRES": tracker.dsn}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1].endswith(": 7 created")


BAD_INPUT = [
    # (name, argv after "track --graph SPEC" ({spec}, {missing}, {dir} are paths), env, status, named)
    ("missing-spec-file", ["--graph", "{missing}"], {}, 2, "{missing}: cannot read it"),
    ("spec-is-a-directory", ["--graph", "{dir}"], {}, 2, "{dir}: cannot read it"),
    ("schema-not-an-identifier", ["--schema", "a b"], {}, 2, "argument --schema"),
    ("bad-postgres-scheme", ["--postgres", "mysql://h/db"], {}, 2, "argument --postgres"),
    ("unusable-postgres-option", ["--postgres", "postgresql://h/db?sslmode=bogus"], {}, 2, "--postgres"),
    ("unknown-flag", ["--force"], {}, 2, "unrecognized arguments: --force"),
    ("bad-dry-run-from-environment", [], {"GRAPHCACHE_DRY_RUN": "maybe"}, 2, "GRAPHCACHE_DRY_RUN"),
    ("bad-schema-from-environment", [], {"GRAPHCACHE_SCHEMA": "1st"}, 2, "(from GRAPHCACHE_SCHEMA)"),
    ("postgres-down", ["--postgres", "postgresql://postgres@127.0.0.1:1/postgres"], {}, 1,
     "cannot reach PostgreSQL (--postgres postgresql://postgres@127.0.0.1:1/postgres)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "env", "status", "named"), [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUT]
)
def test_bad_input_is_one_line_and_exit_2_and_an_unreachable_server_exit_1(
    argv: list[str],
    env: dict[str, str],
    status: int,
    named: str,
    *,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bad flag, spec file or environment variable is exit 2 and PostgreSQL unreachable exit 1, each one
    line on stderr naming what is wrong, nothing on stdout."""
    paths = {"spec": tmp_path / "shop.toml", "missing": tmp_path / "missing.toml", "dir": tmp_path}
    paths["spec"].write_text('[graph]\nroot = "orders"\n[tables.orders]\nkey = "id"\n')
    for name in [n for n in os.environ if n.startswith("GRAPHCACHE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    given = [arg.format(**paths) for arg in argv]
    graph = [] if "--graph" in given else ["--graph", str(paths["spec"])]
    assert _cli.main(["track", *graph, *given]) == status
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("graphcache track: ")
    assert named.format(**paths) in err


# -- serve --graph ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_serve_graph_serves_what_plain_sql_wrote(
    tracker: Tracker, shop: str, raw: asyncpg.Connection, *, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Against a tracked spec, the sidecar serves each order written with plain SQL as "<table>:<key>"
    nodes, never older than min_version (JSON and msgpack), and 404 once the order is deleted."""
    assert (await tracker.track(spec_toml(shop))).status == 0
    servers = Servers(redis_url, tracker.dsn, namespace, tracker.schema)
    command = serve_command("spec", servers, ["--graph", str(tracker.spec), "--membership", "static"])
    s = f'"{shop}"'
    async with (
        sidecar(command, tmp_path / "spec.log") as node,
        httpx.AsyncClient(base_url=node.base_url) as http,
    ):
        async with raw.transaction():
            await raw.execute(f"INSERT INTO {s}.orders (id, customer) VALUES (1, 'ada')")
            await raw.execute(f"INSERT INTO {s}.order_lines (id, order_id, qty) VALUES (10, 1, 2)")
            await raw.execute(f"INSERT INTO {s}.line_notes (id, line_id, body) VALUES (100, 10, 'gift')")
        version = await raw.fetchval(f'SELECT version FROM "{tracker.schema}".roots WHERE root_id = $1', "1")
        response = await http.get("/v1/graphs/1", params={"min_version": version})
        assert response.status_code == 200, response.text
        graph = response.json()
        assert (graph["root_id"], graph["version"]) == ("1", version)
        assert sorted(graph["nodes"]) == ["line_notes:100", "order_lines:10", "orders:1"]
        assert graph["nodes"]["line_notes:100"] == {
            "id": "line_notes:100", "parent_id": "order_lines:10", "row_version": 0,
            "data": {"id": 100, "line_id": 10, "body": "gift"},
        }  # fmt: skip
        assert graph["nodes"]["order_lines:10"]["data"]["qty"] == 2

        await raw.execute(f"UPDATE {s}.line_notes SET body = 'wrapped' WHERE id = 100")
        response = await http.get(
            "/v1/graphs/1", params={"min_version": version + 1}, headers={"Accept": "application/msgpack"}
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/msgpack")
        packed = msgspec.msgpack.decode(response.content)
        assert packed["version"] >= version + 1
        assert packed["nodes"]["line_notes:100"]["data"]["body"] == "wrapped"

        assert (await http.get("/v1/graphs/007")).status_code == 404  # not how PostgreSQL prints a key
        await raw.execute(f"DELETE FROM {s}.orders WHERE id = 1")
        deadline = time.monotonic() + 20
        while (response := await http.get("/v1/graphs/1")).status_code != 404:
            assert response.status_code == 200, response.text
            assert time.monotonic() < deadline, "the deleted order is still served"
            await anyio.sleep(0.05)
        assert response.headers["content-type"].startswith("application/problem+json")
        async with RedisCache.from_url(redis_url, namespace=namespace) as cache:
            assert await cache.get(graph_key("1")) is None  # no empty graph cached for the deleted order


@pytest.mark.anyio
async def test_serve_graph_without_tracking_exits_2_naming_track(
    tracker: Tracker, shop: str, raw: asyncpg.Connection, redis_url: str, namespace: str
) -> None:
    """A spec whose tracking is not installed is a configuration error: one line naming `graphcache
    track`, exit 2 at once (not retried like an outage), and nothing created."""
    tracker.spec.write_text(spec_toml(shop))
    servers = Servers(redis_url, tracker.dsn, namespace, tracker.schema)
    command = serve_command(
        "untracked", servers,
        ["--graph", str(tracker.spec), "--membership", "static", "--log-level", "ERROR",
         "--startup-timeout", "60"],
    )  # fmt: skip
    with anyio.fail_after(30):  # well before --startup-timeout: a retried start-up would not end here
        result = await anyio.run_process(command, check=False, cwd=ROOT_DIR, env=_environment({}))
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert "cannot serve: graph spec" in lines[0]
    assert "change tracking is not installed" in lines[0]
    assert f"graphcache track --graph {tracker.spec}" in lines[0]
    assert lines[0].endswith("(--graph)")
    assert await nothing_created(raw, shop, tracker.schema)
