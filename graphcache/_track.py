"""Install or update the change tracking of a graph spec: the triggers that make every committed change to
your own tables bump its root's version and write the outbox, in the writer's transaction.

The spec (TOML) names a root table and its child tables; see docs/graph-specs.md. `track` checks the spec
file, then connects and checks it against the catalog (tables, columns, key types, unique keys), then, in
one transaction, creates the store schema (--schema) if needed and creates, replaces or removes only the
trigger functions and triggers that differ from what the spec needs. It prints one line per step
("create ...", "replace ...", "remove ...", "unchanged ...") and a summary; a second run finds everything
unchanged and changes nothing. Run it again after any change to the spec: it replaces exactly the
functions whose generated SQL changed and removes those of tables left out. --dry-run changes nothing
and prints the SQL of each step that would change something.

Then serve the graphs with `graphcache serve --graph SPEC --schema SCHEMA` (the same spec and schema).
Every option can also come from the environment variable shown in brackets.

Exit status: 0 done (or nothing to do); 2 bad input: a flag, a spec file that cannot work, or a spec that
does not fit the database (a missing table or column, a view, a key type, a key that is not unique),
nothing changed; 1 PostgreSQL unreachable or failing.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

import anyio
import asyncpg

from ._cli import (
    CommandError,
    UsageError,
    env_default,
    env_option,
    graph_spec,
    identifier,
    postgres_dsn,
    redact,
)
from .storage import GraphSpec, SpecError, StoreError, TrackAction, track_graph

__all__ = ("add_arguments", "run", "summary")

CONNECT_TIMEOUT = 10.0
"""Seconds to connect, and for each statement (waiting for a table's lock included)."""

_DONE = {"create": "created", "replace": "replaced", "remove": "removed", "unchanged": "unchanged"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``track`` subcommand's options; each defaults to its GRAPHCACHE_* environment variable."""
    env_option(
        parser, "--graph", "GRAPH", "", "the graph spec file (TOML) whose tables to track (required)",
        convert=graph_spec, metavar="SPEC", shown="none",
    )  # fmt: skip
    env_option(
        parser, "--postgres", "POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres",
        "PostgreSQL URL of the database that holds the spec's tables", convert=postgres_dsn, secret=True,
        metavar="DSN",
    )  # fmt: skip
    env_option(
        parser, "--schema", "SCHEMA", "graphcache",
        "PostgreSQL schema of graphcache's own tables (versions, outbox) and the trigger functions;"
        " give serve the same",
        convert=identifier,
    )  # fmt: skip
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=env_default("DRY_RUN", ""),
        help="change nothing: print the SQL of each step that would change something"
        " (default: off) [env GRAPHCACHE_DRY_RUN=1]",
    )


def run(args: argparse.Namespace) -> int:
    """Track the spec; print each step and a summary. Exit 0, or raise a `CommandError` (one line)."""
    dry_run = _dry_run(args.dry_run)
    spec: GraphSpec = args.graph
    actions = anyio.run(_track, args.postgres, spec, args.schema, dry_run)
    lines = _dry_run_lines(actions) if dry_run else [str(action) for action in actions]
    lines.append(summary(spec, args.schema, actions, dry_run=dry_run))
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()
    return 0


def _dry_run(value: bool | str) -> bool:
    """--dry-run given (True), or the text of GRAPHCACHE_DRY_RUN (empty when unset)."""
    if isinstance(value, bool):
        return value
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise UsageError(f"GRAPHCACHE_DRY_RUN must be 1 or 0 (true/false, yes/no, on/off), got {value!r}")


async def _track(dsn: str, spec: GraphSpec, schema: str, dry_run: bool) -> list[TrackAction]:
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, command_timeout=CONNECT_TIMEOUT)
    except ValueError as exc:  # a DSN asyncpg cannot use (e.g. an unknown sslmode)
        raise UsageError(f"--postgres {redact(dsn)}: {exc}") from exc
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        raise CommandError(
            f"cannot reach PostgreSQL (--postgres {redact(dsn)}): {exc or type(exc).__name__}"
        ) from exc
    try:
        return await track_graph(conn, spec, schema=schema, dry_run=dry_run)
    except SpecError as exc:  # the spec does not fit this database: the user's input, nothing changed
        raise UsageError(str(exc)) from exc
    except StoreError as exc:
        raise CommandError(f"{exc} (--postgres {redact(dsn)})") from exc
    finally:
        with anyio.move_on_after(CONNECT_TIMEOUT, shield=True):
            await conn.close()


def _dry_run_lines(actions: Sequence[TrackAction]) -> list[str]:
    """Each step as an SQL comment, followed by its SQL when it would change something."""
    lines = []
    for action in actions:
        lines.append(f"-- {action}")
        if action.sql is not None and not action.sql.startswith("--"):
            lines.append(f"{action.sql.strip()};")
        elif action.sql is not None:
            lines.append(action.sql)
    return lines


def summary(spec: GraphSpec, schema: str, actions: Sequence[TrackAction], *, dry_run: bool = False) -> str:
    """The last line: what changed (or would), counted by verb, or that nothing had to."""
    what = f"change tracking of graph {spec.schema}.{spec.root} in schema {schema}"
    counts: Counter[str] = Counter(action.verb for action in actions)
    if not counts.keys() - {"unchanged"}:
        done = f"{what} is up to date: nothing to do"
    else:
        parts = ", ".join(f"{counts[verb]} {_DONE[verb]}" for verb in _DONE if counts[verb])
        done = f"{what} would be: {parts}" if dry_run else f"{what}: {parts}"
    return f"-- dry run, nothing was changed: {done}" if dry_run else done
