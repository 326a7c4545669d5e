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
from ._model import Change, Checkpoint, Delete, Graph, Node, Op, RowImage, Snapshot, Upsert
from ._postgres import PostgresStore, install_change_tracking, prepare_connection, track_graph
from ._protocol import GraphStore
from ._slots import SLOTS, SlotFilter, slot_of
from ._spec import GraphSpec, SpecError, TableSpec
from ._spec_sql import TrackAction

__all__ = (  # noqa: RUF022  (plain sorted order, as tests/test_all_attributes.py checks)
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
    "RowImage",
    "SLOTS",
    "SlotFilter",
    "Snapshot",
    "SpecError",
    "StoreError",
    "StoreUnavailable",
    "TableSpec",
    "TrackAction",
    "Upsert",
    "install_change_tracking",
    "prepare_connection",
    "slot_of",
    "track_graph",
)
