"""``GraphSpec``: a graph kept in a service's own tables, described once in TOML.

    [graph]
    schema = "shop"            # where the tables live (default: public)
    root = "orders"            # the root table
    [tables.orders]
    key = "id"
    [tables.order_lines]
    key = "id"
    parent = "orders"          # parent table
    parent_key = "order_id"    # this table's column holding the parent's key
    columns = ["id", "sku"]    # optional: cache only these (default: every column)

Everything the file alone can show is checked here, before any I/O, each problem one ``SpecError`` that
names the file and the table: unknown keys, bad identifiers, a root with a parent, a child without a
parent, a parent that is not in the spec, a parent cycle. What needs the database (tables, columns, key
types, uniqueness) is checked by ``_spec_sql.check_catalog``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from ._errors import InvalidOperation
from ._schema import IDENT

__all__ = ("GraphSpec", "SpecError", "TableSpec")

_GRAPH_KEYS = ("schema", "root")
_TABLE_KEYS = ("key", "parent", "parent_key", "columns")


class SpecError(InvalidOperation):
    """A graph spec that cannot work; the message names the spec, the table and the column."""


class TableSpec(msgspec.Struct, frozen=True):
    """One table of a graph: its key column and, below the root, its parent and the column naming it."""

    name: str
    key: str
    parent: str | None = None
    parent_key: str | None = None
    columns: tuple[str, ...] | None = None  # None: every column of the row


class GraphSpec(msgspec.Struct, frozen=True):
    """A root table and its child tables, root first, each table after its parent."""

    root: str
    tables: tuple[TableSpec, ...]
    schema: str = "public"
    source: str = "<graph spec>"  # where it was read from, for messages

    @classmethod
    def from_toml(cls, path: str | Path) -> GraphSpec:
        """Read and check a spec file (``SpecError`` for every problem the file alone shows)."""
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"graph spec {source}: cannot read it: {exc}") from exc
        return cls.loads(text, source=source)

    @classmethod
    def loads(cls, text: str, *, source: str = "<graph spec>") -> GraphSpec:
        """Parse and check a spec given as TOML text."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"graph spec {source} is not valid TOML: {exc}") from exc
        return cls.from_mapping(document, source=source)

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any], *, source: str = "<graph spec>") -> GraphSpec:
        """Check a spec already parsed into dicts (the shape of the TOML file)."""
        return _Parser(source).parse(document)

    def table(self, name: str) -> TableSpec:
        """The table called ``name`` (``KeyError`` if the spec has none)."""
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(name)

    def chain(self, name: str) -> list[TableSpec]:
        """The tables from the root down to ``name``: ``[root, ..., name]``."""
        path = [self.table(name)]
        while (parent := path[-1].parent) is not None:
            path.append(self.table(parent))
        path.reverse()
        return path

    def node_id(self, table: str, key: object) -> str:
        """The id a node of ``table`` with key ``key`` has in the cached graph: ``"<table>:<key>"``."""
        return f"{table}:{key}"


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str) -> SpecError:
        return SpecError(f"graph spec {self.source}: {message}")

    def parse(self, document: Mapping[str, Any]) -> GraphSpec:
        unknown = sorted(set(document) - {"graph", "tables"})
        if unknown:
            raise self.fail(f"unknown section [{unknown[0]}] (a spec has [graph] and [tables.NAME])")
        graph = self.section(document.get("graph"), "[graph]", _GRAPH_KEYS)
        if "root" not in graph:
            raise self.fail('[graph] has no root: name the root table, e.g. root = "orders"')
        root = self.ident(graph["root"], "[graph] root")
        schema = self.ident(graph.get("schema", "public"), "[graph] schema")
        tables_doc = document.get("tables")
        if not isinstance(tables_doc, Mapping) or not tables_doc:
            raise self.fail("no [tables.NAME] sections: describe at least the root table")
        tables = {
            name: self.table(name, body) for name, body in tables_doc.items()
        }  # checks each table's own keys
        if root not in tables:
            raise self.fail(f"the root table {root!r} has no [tables.{root}] section")
        if tables[root].parent is not None:
            raise self.fail(f"[tables.{root}] is the root table: it cannot have a parent")
        for table in tables.values():
            self.check_parent(table, root, tables)
        ordered = self.order(root, tables)
        return GraphSpec(root=root, tables=tuple(ordered), schema=schema, source=self.source)

    def section(self, value: object, where: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
        if value is None:
            raise self.fail(f"no {where} section")
        if not isinstance(value, Mapping):
            raise self.fail(f"{where} must be a table of keys, not {type(value).__name__}")
        for key in value:
            if key not in keys:
                raise self.fail(f"unknown key {key!r} in {where} (known: {', '.join(keys)})")
        return value

    def ident(self, value: object, where: str) -> str:
        # No "$": the generated trigger functions are dollar-quoted.
        if not isinstance(value, str) or not IDENT.fullmatch(value) or "$" in value:
            raise self.fail(
                f"{where} must be a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63), got {value!r}"
            )
        return value

    def table(self, name: str, body: object) -> TableSpec:
        where = f"[tables.{name}]"
        self.ident(name, f"the table name {where}")
        fields = self.section(body, where, _TABLE_KEYS)
        if "key" not in fields:
            raise self.fail(f'{where} has no key: name its key column, e.g. key = "id"')
        key = self.ident(fields["key"], f"{where} key")
        parent = fields.get("parent")
        parent_key = fields.get("parent_key")
        if parent is not None:
            parent = self.ident(parent, f"{where} parent")
        if parent_key is not None:
            parent_key = self.ident(parent_key, f"{where} parent_key")
        if (parent is None) != (parent_key is None):
            given, missing = ("parent", "parent_key") if parent is not None else ("parent_key", "parent")
            raise self.fail(f"{where} has {given} but no {missing}: a child table needs both")
        columns = self.columns(fields.get("columns"), where)
        return TableSpec(name, key, parent, parent_key, columns)

    def columns(self, value: object, where: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise self.fail(f"{where} columns must be a non-empty list of column names")
        names = tuple(self.ident(item, f"{where} columns") for item in value)
        seen: set[str] = set()
        for column in names:
            if column in seen:
                raise self.fail(f"{where} columns names {column!r} twice")
            seen.add(column)
        return names

    def check_parent(self, table: TableSpec, root: str, tables: Mapping[str, TableSpec]) -> None:
        if table.name == root:
            return
        where = f"[tables.{table.name}]"
        if table.parent is None:
            raise self.fail(
                f"{where} has no parent: every table but the root {root!r} needs parent and parent_key"
            )
        if table.parent not in tables:
            raise self.fail(f"{where} names parent {table.parent!r}, which is not a table of the spec")

    def order(self, root: str, tables: Mapping[str, TableSpec]) -> list[TableSpec]:
        """Root first, each table after its parent; a parent chain that never reaches the root is a cycle."""
        for name in tables:
            seen = [name]
            current = tables[name]
            while current.parent is not None:
                if current.parent in seen:
                    loop = " -> ".join([*seen[seen.index(current.parent) :], current.parent])
                    raise self.fail(f"parent cycle: {loop} (no path to the root {root!r})")
                seen.append(current.parent)
                current = tables[current.parent]
        depth = {name: len(_ancestors(name, tables)) for name in tables}
        return sorted(tables.values(), key=lambda t: (depth[t.name], list(tables).index(t.name)))


def _ancestors(name: str, tables: Mapping[str, TableSpec]) -> list[str]:
    found = []
    current = tables[name]
    while current.parent is not None:
        found.append(current.parent)
        current = tables[current.parent]
    return found
