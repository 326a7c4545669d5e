"""The operation history every load-test process records, and the graph hash the checker compares.

One JSON object per line. ``time`` is ``time.monotonic()``, which on Linux is one system-wide clock
(CLOCK_MONOTONIC), so times from different processes on one machine compare directly.

  process   who recorded it: "writer-3", "reader-1", "node-a", "checker"
  type      "invoke" | "ok" | "fail" | "info" (info: outcome unknown, e.g. a timeout after sending)
  op        "create" (a root's initial graph, one event per transaction of its set-up) | "write"
            (store.apply) | "read" (a cache read) | "rebuild" (a put into the cache, recorded as "ok"
            once the cache acknowledged storing it: by a writer right after its put returned, by a
            graphcache node through ``Node(on_stored=...)``) | "final" (the committed version at the end)
  root      root id
  version   create/write ok: the committed version; read ok: the cached version (None if absent);
            rebuild ok: the version of the graph stored; final: the committed version
  hash      read ok: graph_hash of the cached graph; create ok: graph_hash of the initial graph;
            write ok without ops: graph_hash of the whole graph the write committed (plain-SQL writers
            read it inside their transaction, which holds the root's version row locked)
  ops       write ok / create ok: the operations applied, as msgspec-encoded builtins, so the checker can
            replay them in version order and know the committed graph at every version
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import msgspec

from ..storage import Graph

__all__ = ("Event", "HistoryError", "HistoryWriter", "graph_hash", "read_history", "rows_hash")

EventType = Literal["invoke", "ok", "fail", "info"]
OpName = Literal["create", "write", "read", "rebuild", "final"]


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    process: str
    type: EventType
    op: OpName
    root: str
    time: float
    version: int | None = None
    hash: str | None = None
    ops: list[Any] | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def graph_hash(graph: Graph) -> str:
    """A hash of a graph's content: each node's id, parent and data (not row versions, not the stamp)."""
    return rows_hash((n.id, n.parent_id, n.data) for n in graph.nodes.values())


def rows_hash(rows: Iterable[tuple[str, str | None, dict[str, Any]]]) -> str:
    """The hash ``graph_hash`` computes, from (id, parent_id, data) rows: the checker's replay uses it."""
    content = sorted(rows)
    digest = hashlib.blake2b(msgspec.json.encode(content, order="deterministic"), digest_size=12)
    return digest.hexdigest()


class HistoryWriter:
    """Appends events to a JSON-lines file, buffered; ``flush`` or leaving ``with`` writes them out."""

    def __init__(self, path: str | Path, *, buffer: int = 512) -> None:
        self._file = Path(path).open("ab")  # noqa: SIM115  (closed in close())
        self._pending: list[bytes] = []
        self._buffer = buffer

    def record(self, event: Event) -> None:
        self._pending.append(_encoder.encode(event))
        if len(self._pending) >= self._buffer:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._file.write(b"\n".join(self._pending) + b"\n")
            self._file.flush()
            self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class HistoryError(ValueError):
    """A history file line that is not a valid event; the message names the file and line."""


def read_history(*paths: str | Path) -> list[Event]:
    """All events of the given files, in time order. ``HistoryError`` names a malformed line."""
    events: list[Event] = []
    for path in paths:
        with Path(path).open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    events.append(_decode_line(line, path, lineno))
    events.sort(key=lambda e: e.time)
    return events


def _decode_line(line: bytes, path: str | Path, lineno: int) -> Event:
    try:
        return _decoder.decode(line)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise HistoryError(f"{path}:{lineno}: not a history event: {exc}") from exc
