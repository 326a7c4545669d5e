"""The backends of one strategy's run: in memory, or a fresh namespace and schema on the real servers.

Each real-server strategy run gets a Redis key namespace ``gclt<id>`` and a PostgreSQL schema
``gclt_<id>`` of its own, removed when the run ends, also when it fails (``_servers.removed_afterwards``).
With ``--graph`` that schema is the store schema of the spec's change tracking: its triggers on the
service's tables call functions in it, so dropping it (CASCADE) removes them too.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..cache import MemoryCache, VersionedCache
from ..storage import GraphStore, MemoryStore
from ._lt_config import LoadConfig
from ._lt_graph import install_tracking
from ._procs import open_cache, open_store
from ._servers import removed_afterwards
from ._workload import SlowLoads

__all__ = ("RUN_PREFIX", "Env", "environment")

RUN_PREFIX = "gclt"
"""Every real-server run's namespace starts with this, its schema with this and ``_``."""


@dataclass
class Env:
    """One strategy run's backends; ``namespace``/``schema`` name the real servers' fresh space."""

    config: LoadConfig
    store: GraphStore
    cache: VersionedCache
    namespace: str = ""
    schema: str = ""


@contextlib.asynccontextmanager
async def environment(config: LoadConfig) -> AsyncIterator[Env]:
    """Fresh backends for one strategy run, gone afterwards."""
    if config.redis is None or config.postgres is None:
        async with MemoryStore(latency=config.latency, seed=config.seed) as store, MemoryCache() as cache:
            slow = SlowLoads(store, config.load_latency) if config.load_latency > 0 else store
            yield Env(config, slow, cache)
        return
    run_id = uuid.uuid4().hex[:10]
    namespace, schema = f"{RUN_PREFIX}{run_id}", f"{RUN_PREFIX}_{run_id}"
    spec = None if config.graph is None else config.graph.spec
    # Outermost, so the keys and schema go after the store, the cache and every process using them.
    async with removed_afterwards(
        redis_url=config.redis, namespace=namespace, postgres=config.postgres, schema=schema
    ):
        if spec is not None:
            await install_tracking(config.postgres, spec, schema)
        async with (
            open_store(config.postgres, schema, graph=spec) as store,
            open_cache(config.redis, namespace) as cache,
        ):
            yield Env(config, store, cache, namespace, schema)
