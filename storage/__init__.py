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
from ._postgres import PostgresStore, install_change_tracking
from ._protocol import GraphStore

__all__ = (
    "Change",
    "Checkpoint",
    "ConcurrencyConflict",
    "Delete",
    "Graph",
    "GraphStore",
    "InvalidOperation",
    "MemoryStore",
    "Node",
    "Op",
    "PostgresStore",
    "RootExists",
    "RootNotFound",
    "Snapshot",
    "StoreError",
    "StoreUnavailable",
    "Upsert",
    "install_change_tracking",
)
