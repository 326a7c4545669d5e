"""graphcache.storage: the source of truth (in memory and on PostgreSQL) and its change feed."""

from ._errors import (
    ConcurrencyConflict,
    InvalidOperation,
    RootExists,
    RootNotFound,
    StoreError,
    StoreUnavailable,
)
from ._memory import MemoryStore
from ._model import Change, Checkpoint, Delete, Graph, Node, Op, Snapshot, Upsert
from ._postgres import PostgresStore, install_change_tracking, track_graph
from ._protocol import GraphStore
from ._spec import GraphSpec, SpecError, TableSpec
from ._spec_sql import TrackAction

__all__ = (
    "Change",
    "Checkpoint",
    "ConcurrencyConflict",
    "Delete",
    "Graph",
    "GraphSpec",
    "GraphStore",
    "InvalidOperation",
    "MemoryStore",
    "Node",
    "Op",
    "PostgresStore",
    "RootExists",
    "RootNotFound",
    "Snapshot",
    "SpecError",
    "StoreError",
    "StoreUnavailable",
    "TableSpec",
    "TrackAction",
    "Upsert",
    "install_change_tracking",
    "track_graph",
)
