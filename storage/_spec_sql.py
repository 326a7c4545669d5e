"""A graph spec against the database: the catalog check, the generated SQL and ``track``.

Generated from a ``GraphSpec`` (every identifier checked by the spec and quoted here):

- one trigger function per table, ``<store schema>.spec_track_<table>_<hash>``, and one row trigger per
  table calling it. It finds the root of the row before and after the change and bumps each once per
  transaction (``bump_root``: version + 1, an outbox row, a NOTIFY). Below the first level the root is
  found through the ancestors, read ``FOR SHARE``: a concurrent transaction moving an ancestor to
  another root is waited for and then seen, so the row's change bumps the root it really belongs to.
- the snapshot loader: one statement (one snapshot, one round trip) for any number of roots, the root's
  committed version from ``roots`` and every row reachable from the root row, named ``"<table>:<key>"``,
  ``data`` = ``to_jsonb(row)`` (or only the spec's ``columns``).

``track`` compares what is installed with what the spec needs and creates, replaces or removes only the
difference, in one transaction; a second run finds nothing to do.
"""

# ruff: noqa: S608  (identifiers are checked by the spec and quoted; values are bind parameters)
from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from ._schema import SCHEMA_VERSION, Sql, migrate
from ._spec import GraphSpec, SpecError, TableSpec

__all__ = (
    "RENDERING",
    "KeyKind",
    "SpecSql",
    "TrackAction",
    "check_catalog",
    "plan_tracking",
    "track",
)

KeyKind = Literal["integer", "text", "uuid"]
RENDERING = {
    "TimeZone": "UTC",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "IntervalStyle": "postgres",
}
"""How rows are rendered as JSON, fixed for the trigger functions (which log row images in the writer's
transaction) and for the store's own connections (whose loader renders the same rows): a writer's own
TimeZone, say, must not make a patched graph differ from a snapshot of it."""

_KEY_KINDS: dict[str, KeyKind] = {
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
    "text": "text",
    "varchar": "text",
    "uuid": "uuid",
}
_CAST: dict[KeyKind, str] = {"integer": "int8", "text": "text", "uuid": "uuid"}
_ROW_TRIGGER_AFTER_IUD = 1 | 4 | 8 | 16  # pg_trigger.tgtype: ROW, INSERT, DELETE, UPDATE (AFTER = not 2)
_FUNCTION_PREFIX = "spec_track_"
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]{0,18}")  # as PostgreSQL prints an integer: never "-0"
_MAX_BUILD_ARGS = 100  # jsonb_build_object takes at most 100 arguments: 50 columns per call


def _q(name: str) -> str:
    return f'"{name}"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- the catalog -----------------------------------------------------------------------------------------

_CATALOG = """
SELECT c.relname, c.relkind::text AS relkind, a.attname, t.typname, a.attnotnull,
       EXISTS (SELECT FROM pg_index AS i
               WHERE i.indrelid = c.oid AND i.indisunique AND i.indnkeyatts = 1
                 AND i.indkey[0] = a.attnum AND i.indpred IS NULL) AS is_unique
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_type AS t ON t.oid = a.atttypid
WHERE n.nspname = $1 AND c.relname = ANY($2::text[])
"""


class _Table(msgspec.Struct):
    kind: str
    types: dict[str, str]
    unique: set[str]
    not_null: set[str] = msgspec.field(default_factory=set)


async def check_catalog(conn: Any, spec: GraphSpec) -> KeyKind:
    """Check the spec against the database; return the kind of the root's key. One ``SpecError`` per
    problem: a missing table or column, a view, an unsupported or mismatched key type, a key that is not
    unique."""
    rows = await conn.fetch(_CATALOG, spec.schema, [t.name for t in spec.tables])
    found: dict[str, _Table] = {}
    for row in rows:
        table = found.setdefault(row["relname"], _Table(row["relkind"], {}, set()))
        if row["attname"] is not None:
            table.types[row["attname"]] = row["typname"]
            if row["is_unique"]:
                table.unique.add(row["attname"])
            if row["attnotnull"]:
                table.not_null.add(row["attname"])
    kinds: dict[str, KeyKind] = {}
    for spec_table in spec.tables:
        kinds[spec_table.name] = _check_table(spec, spec_table, found, kinds)
    return kinds[spec.root]


def _check_table(
    spec: GraphSpec, table: TableSpec, found: dict[str, _Table], kinds: dict[str, KeyKind]
) -> KeyKind:
    name = f"{spec.schema}.{table.name}"

    def fail(message: str) -> SpecError:
        return SpecError(f"graph spec {spec.source}: {message}")

    info = found.get(table.name)
    if info is None:
        raise fail(f"table {name} does not exist")
    if info.kind not in ("r", "p"):
        raise fail(f"{name} is not a table (change tracking needs triggers on a table, not a view)")
    wanted = [table.key, *([table.parent_key] if table.parent_key else []), *(table.columns or ())]
    for column in wanted:
        if column not in info.types:
            raise fail(f"table {name} has no column {column!r}")
    key_type = info.types[table.key]
    kind = _KEY_KINDS.get(key_type)
    if kind is None:
        raise fail(
            f"{name}.{table.key} is of type {key_type}: a key must be text, varchar, smallint, integer,"
            " bigint or uuid"
        )
    if table.key not in info.unique:
        raise fail(
            f"{name}.{table.key} is not unique: a key needs a PRIMARY KEY or UNIQUE constraint on that"
            " column alone"
        )
    if table.key not in info.not_null:
        raise fail(f"{name}.{table.key} may be NULL: a key column must be NOT NULL (or the PRIMARY KEY)")
    if table.parent is not None and table.parent_key is not None:
        parent_kind = kinds[table.parent]
        column_type = info.types[table.parent_key]
        if _KEY_KINDS.get(column_type) != parent_kind:
            parent = spec.table(table.parent)
            raise fail(
                f"{name}.{table.parent_key} is of type {column_type}, but it holds keys of"
                f" {spec.schema}.{parent.name}.{parent.key} ({parent_kind}): the types must match"
            )
    return kind


# -- the generated SQL -------------------------------------------------------------------------------------


class SpecSql:
    """Every statement a spec needs, for one store schema and the root key's kind."""

    def __init__(self, spec: GraphSpec, sql: Sql, key_kind: KeyKind) -> None:
        self.spec = spec
        self.sql = sql
        self.key_kind = key_kind
        self.graphs = self._loader()
        self.functions = {t.name: self._function(t) for t in spec.tables}
        self.triggers = {t.name: self._trigger(t) for t in spec.tables}

    def qualified(self, table: TableSpec) -> str:
        return f"{_q(self.spec.schema)}.{_q(table.name)}"

    def function_name(self, table: TableSpec) -> str:
        digest = hashlib.blake2b(f"{self.spec.schema}.{table.name}".encode(), digest_size=4).hexdigest()
        return f"{_FUNCTION_PREFIX}{table.name}"[:52] + "_" + digest

    def function_body(self, table: TableSpec) -> str:
        s = self.sql.schema
        key = _q(table.key)
        children = [t for t in self.spec.tables if t.parent == table.name]
        # The new root gets the row's after-image, unless a subtree may have come with it (a row with
        # child tables that moved between roots, changed its key, or was inserted below existing
        # children): then NULL, and the root's change is loaded from a snapshot.
        doubts = ["FALSE"]
        if children:
            doubts = [
                f"(TG_OP = 'UPDATE' AND (old_root IS DISTINCT FROM new_root OR OLD.{key} <> NEW.{key}))",
                *(
                    f"(TG_OP = 'INSERT' AND EXISTS (SELECT FROM {self.qualified(child)} AS c"
                    f" WHERE c.{_q(child.parent_key or '')} = NEW.{key}))"
                    for child in children
                ),
            ]
        # A row whose key changed is another node, also a leaf's: the old one leaves its graph (the new
        # image alone would leave it in a graph patched from the images).
        moved = f"old_root IS DISTINCT FROM new_root OR (TG_OP = 'UPDATE' AND OLD.{key} <> NEW.{key})"
        return f"""
DECLARE
    new_root text;
    old_root text;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        new_root := {self._root_of(table, "NEW")};
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_root := {self._root_of(table, "OLD")};
    END IF;
    IF old_root IS NOT NULL AND ({moved}) THEN
        PERFORM {s}.bump_root(old_root, jsonb_build_array({self._node_id(table, "OLD")}));
    END IF;
    IF new_root IS NOT NULL THEN
        PERFORM {s}.bump_root(new_root, CASE WHEN {" OR ".join(doubts)} THEN NULL
            ELSE {self._image(table, "NEW")} END);
    END IF;
    RETURN NULL;
END
"""

    def _node_id(self, table: TableSpec, record: str) -> str:
        return f"{_literal(table.name + ':')} || {record}.{_q(table.key)}::text"

    def _image(self, table: TableSpec, record: str) -> str:
        """The after-image of ``record``, as the loader would return the node: [id, parent_id, data, 0]."""
        if table.parent is None or table.parent_key is None:
            parent_id = "NULL::text"
        else:
            parent_id = f"{_literal(table.parent + ':')} || {record}.{_q(table.parent_key)}::text"
        data = _data(record, table.columns)
        return f"jsonb_build_array({self._node_id(table, record)}, {parent_id}, {data}, 0)"

    def root_id_is_canonical(self, root_id: str) -> bool:
        """Whether ``root_id`` is a key as PostgreSQL prints it (the only form a trigger records)."""
        if self.key_kind == "integer":
            return bool(_CANONICAL_INT.fullmatch(root_id)) and -(2**63) <= int(root_id) < 2**63
        if self.key_kind == "uuid":
            try:
                return str(uuid.UUID(root_id)) == root_id
            except ValueError:
                return False
        return True

    def root_node(self, root_id: str) -> str:
        return self.spec.node_id(self.spec.root, root_id)

    def _function(self, table: TableSpec) -> str:
        name = f"{self.sql.schema}.{_q(self.function_name(table))}"
        body = self.function_body(table)
        settings = " ".join(f"SET {key} = {_literal(value)}" for key, value in RENDERING.items())
        return (
            f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql {settings}"
            f" AS $fn${body}$fn$"
        )

    def _trigger(self, table: TableSpec) -> str:
        function = f"{self.sql.schema}.{_q(self.function_name(table))}"
        return (
            f"CREATE OR REPLACE TRIGGER {_q(self.sql.trigger_name)} AFTER INSERT OR UPDATE OR DELETE"
            f" ON {self.qualified(table)} FOR EACH ROW EXECUTE FUNCTION {function}()"
        )

    def _root_of(self, table: TableSpec, record: str) -> str:
        """The text of the root key of ``record`` (NEW or OLD) of ``table``; NULL for an orphan."""
        chain = self.spec.chain(table.name)
        if len(chain) == 1:
            return f"{record}.{_q(table.key)}::text"
        assert table.parent_key is not None
        if len(chain) == 2:
            return f"{record}.{_q(table.parent_key)}::text"
        # ancestors a1 (child of the root) .. a{d-1} (the parent of the row), locked FOR SHARE
        depth = len(chain) - 1
        parent = chain[depth - 1]
        joins = f"{self.qualified(parent)} AS a{depth - 1}"
        for level in range(depth - 2, 0, -1):
            below = chain[level + 1]
            assert below.parent_key is not None
            joins += (
                f" JOIN {self.qualified(chain[level])} AS a{level}"
                f" ON a{level}.{_q(chain[level].key)} = a{level + 1}.{_q(below.parent_key)}"
            )
        top = chain[1]
        assert top.parent_key is not None
        locked = ", ".join(f"a{level}" for level in range(depth - 1, 0, -1))
        return (
            f"(SELECT a1.{_q(top.parent_key)}::text FROM {joins}"
            f" WHERE a{depth - 1}.{_q(parent.key)} = {record}.{_q(table.parent_key)} FOR SHARE OF {locked})"
        )

    def _loader(self) -> str:
        s = self.sql.schema
        parts = [
            "SELECT q.root_id, q.version, NULL::text AS id, NULL::text AS parent_id,"
            " NULL::jsonb AS data FROM q"
        ]
        for table in self.spec.tables:
            chain = self.spec.chain(table.name)
            joins = f"JOIN {self.qualified(chain[0])} AS t0 ON t0.{_q(chain[0].key)} = q.k"
            for level in range(1, len(chain)):
                child, parent = chain[level], chain[level - 1]
                assert child.parent_key is not None
                joins += (
                    f" JOIN {self.qualified(child)} AS t{level}"
                    f" ON t{level}.{_q(child.parent_key)} = t{level - 1}.{_q(parent.key)}"
                )
            row = f"t{len(chain) - 1}"
            node = f"{_literal(table.name + ':')} || {row}.{_q(table.key)}::text"
            if table.parent is None:
                parent_id = "NULL::text"
            else:
                assert table.parent_key is not None
                parent_id = f"{_literal(table.parent + ':')} || {row}.{_q(table.parent_key)}::text"
            data = _data(row, table.columns)
            parts.append(f"SELECT q.root_id, NULL::bigint, {node}, {parent_id}, {data} FROM q {joins}")
        cast = _CAST[self.key_kind]
        return (
            f"WITH q AS MATERIALIZED (SELECT r.root_id, r.version, r.root_id::{cast} AS k"
            f" FROM unnest($1::text[]) AS u(root_id) JOIN {s}.roots AS r ON r.root_id = u.root_id)\n"
            + "\nUNION ALL\n".join(parts)
            + "\nORDER BY 1, 3 NULLS FIRST"
        )


def _data(row: str, columns: Sequence[str] | None) -> str:
    if columns is None:
        return f"to_jsonb({row})"
    per_call = _MAX_BUILD_ARGS // 2
    calls = []
    for start in range(0, len(columns), per_call):
        pairs = ", ".join(f"{_literal(c)}, {row}.{_q(c)}" for c in columns[start : start + per_call])
        calls.append(f"jsonb_build_object({pairs})")
    return " || ".join(calls)


# -- track -------------------------------------------------------------------------------------------------


class TrackAction(msgspec.Struct, frozen=True):
    """One step of installing a spec's change tracking: what it does, to what, and its SQL."""

    verb: Literal["create", "replace", "remove", "unchanged"]
    what: str
    sql: str | None = None

    def __str__(self) -> str:
        return f"{self.verb} {self.what}"


_INSTALLED_FUNCTIONS = """
SELECT p.proname, p.prosrc, coalesce(p.proconfig, '{}') AS proconfig
FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
WHERE n.nspname = $1 AND p.proname LIKE 'spec\\_track\\_%'
"""
_INSTALLED_TRIGGERS = """
SELECT tn.nspname AS table_schema, c.relname AS table_name, t.tgname, p.proname,
       pn.nspname AS function_schema, t.tgtype, t.tgenabled::text AS tgenabled, t.tgnargs
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
JOIN pg_namespace AS tn ON tn.oid = c.relnamespace
JOIN pg_proc AS p ON p.oid = t.tgfoid
JOIN pg_namespace AS pn ON pn.oid = p.pronamespace
WHERE NOT t.tgisinternal AND (t.tgname = $1 OR pn.nspname = $2)
"""


async def plan_tracking(conn: Any, spec_sql: SpecSql, *, schema: str) -> list[TrackAction]:
    """What ``track`` would do now: one action per function and trigger (``unchanged`` ones included)."""
    spec = spec_sql.spec
    sql = spec_sql.sql
    actions: list[TrackAction] = []
    level = await _store_level(conn, sql)
    if level < SCHEMA_VERSION:
        actions.append(
            TrackAction(
                "create" if level == 0 else "replace",
                f"{'' if level == 0 else 'upgrade of '}store schema {schema} (roots, outbox, checkpoints:"
                f" migration {SCHEMA_VERSION})",
                f"-- the store schema {schema}: migrated as PostgresStore.connect does",
            )
        )
    functions = {
        row["proname"]: (row["prosrc"], sorted(row["proconfig"]))
        for row in await conn.fetch(_INSTALLED_FUNCTIONS, schema)
    }
    settings = sorted(f"{key}={value}" for key, value in RENDERING.items())
    triggers = await conn.fetch(_INSTALLED_TRIGGERS, sql.trigger_name, schema)
    wanted = {spec_sql.function_name(t) for t in spec.tables}
    for table in spec.tables:
        name = spec_sql.function_name(table)
        what = f"function {schema}.{name} (roots of {spec.schema}.{table.name} rows)"
        installed = functions.get(name)
        if installed is None:
            actions.append(TrackAction("create", what, spec_sql.functions[table.name]))
        elif installed != (spec_sql.function_body(table), settings):
            actions.append(TrackAction("replace", what, spec_sql.functions[table.name]))
        else:
            actions.append(TrackAction("unchanged", what))
    for table in spec.tables:
        name = spec_sql.function_name(table)
        what = f"trigger {sql.trigger_name} on {spec.schema}.{table.name}"
        on_table = [
            row
            for row in triggers
            if row["table_schema"] == spec.schema
            and row["table_name"] == table.name
            and row["tgname"] == sql.trigger_name
        ]
        if not on_table:
            actions.append(TrackAction("create", what, spec_sql.triggers[table.name]))
            continue
        row = on_table[0]
        current = (
            row["function_schema"] == schema
            and row["proname"] == name
            and row["tgtype"] == _ROW_TRIGGER_AFTER_IUD
            and row["tgenabled"] == "O"
            and row["tgnargs"] == 0
        )
        if current:
            actions.append(TrackAction("unchanged", what))
        else:
            actions.append(TrackAction("replace", what, spec_sql.triggers[table.name]))
    for name in sorted(set(functions) - wanted):
        users = sorted(
            f"{row['table_schema']}.{row['table_name']}" for row in triggers if row["proname"] == name
        )
        on = f" and its triggers on {', '.join(users)}" if users else ""
        actions.append(
            TrackAction(
                "remove",
                f"function {schema}.{name}{on} (not in this spec)",
                f"DROP FUNCTION {sql.schema}.{_q(name)}() CASCADE",
            )
        )
    return actions


async def _store_level(conn: Any, sql: Sql) -> int:
    """The store schema's migration level (0: not created)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{sql.schema}.schema_version")
    if not exists:
        return 0
    level = await conn.fetchval(f"SELECT max(version) FROM {sql.schema}.schema_version")
    return 0 if level is None else int(level)


async def track(conn: Any, spec_sql: SpecSql, *, schema: str, dry_run: bool = False) -> list[TrackAction]:
    """Install or update the spec's change tracking in one transaction; return what was (or, with
    ``dry_run``, would be) done. Nothing is written on a dry run, and nothing when all is unchanged."""
    if dry_run:
        return await plan_tracking(conn, spec_sql, schema=schema)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"graphcache track:{schema}"
        )
        actions = await plan_tracking(conn, spec_sql, schema=schema)
        for action in actions:
            if action.sql is not None and action.sql.startswith("--"):
                await migrate(conn, spec_sql.sql)
            elif action.sql is not None:
                await conn.execute(action.sql)
    return actions
