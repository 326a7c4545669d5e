"""graphcache: cached object graphs that stay correct under concurrency and faults.

The library lives in five subpackages, each with its API in its ``__init__``:
``graphcache.cache`` (the versioned cache tier), ``graphcache.storage`` (the source of truth and its
change feed), ``graphcache.actors`` (mailbox actors and the Node), ``graphcache.sidecar`` (the ``serve``
process) and ``graphcache.harness`` (load tests, the checker, benchmarks). ``python -m graphcache`` and
the ``graphcache`` command are the command line. ``open_node`` embeds a node in a web service.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._embed import default_node_id, open_node

__all__ = ("__version__", "default_node_id", "open_node")

DISTRIBUTION = "graphcache-pg"
"""The name graphcache is installed under (``pip install graphcache-pg``); it imports as ``graphcache``."""

try:
    __version__: str = version(DISTRIBUTION)
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    # Loaded on first use: the command line imports this package on every start and needs none of it.
    if name in ("default_node_id", "open_node"):
        from . import _embed  # noqa: PLC0415

        return getattr(_embed, name)
    raise AttributeError(f"module 'graphcache' has no attribute {name!r}")
