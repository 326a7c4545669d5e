"""graphcache: cached object graphs that stay correct under concurrency and faults.

The library lives in five subpackages, each with its API in its ``__init__``:
``graphcache.cache`` (the versioned cache tier), ``graphcache.storage`` (the source of truth and its
change feed), ``graphcache.actors`` (mailbox actors and the Node), ``graphcache.sidecar`` (the ``serve``
process) and ``graphcache.harness`` (load tests, the checker, benchmarks). ``python -m graphcache`` and
the ``graphcache`` command are the command line.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ("__version__",)

DISTRIBUTION = "graphcache-pg"
"""The name graphcache is installed under (``pip install graphcache-pg``); it imports as ``graphcache``."""

try:
    __version__: str = version(DISTRIBUTION)
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
