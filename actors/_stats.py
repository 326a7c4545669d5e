"""Live counters shared by a Node and its actors, and the NamedTuples ``statistics()`` returns."""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

__all__ = ("ActorStatistics", "Counters", "Histogram", "HistogramSnapshot", "NodeStatistics")

# Seconds; the same bounds Prometheus clients use by default, plus finer ones under 5 ms.
DEFAULT_BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class HistogramSnapshot(NamedTuple):
    """Cumulative counts per upper bound (``+Inf`` last), as Prometheus exposes a histogram."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    samples: int
    total: float

    def quantile(self, q: float) -> float:
        """The smallest bucket bound under which at least ``q`` of the samples fall (nan if empty)."""
        if self.samples == 0:
            return math.nan
        wanted = q * self.samples
        for bound, seen in zip(self.bounds, self.cumulative, strict=True):
            if seen >= wanted:
                return bound
        return math.inf


class Histogram:
    """A fixed-bucket histogram of seconds; ``observe`` is O(log buckets)."""

    __slots__ = ("_bounds", "_counts", "_total")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BOUNDS) -> None:
        self._bounds = (*bounds, math.inf)
        self._counts = [0] * len(self._bounds)
        self._total = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._total += seconds

    def snapshot(self) -> HistogramSnapshot:
        cumulative: list[int] = []
        running = 0
        for count in self._counts:
            running += count
            cumulative.append(running)
        return HistogramSnapshot(self._bounds, tuple(cumulative), running, self._total)


class Counters:
    """Every counter of one node, in one place: its actors, its rebuilder, its reads, its feed and its
    reconcile sweep add to it, and ``Node.statistics()`` reads it (with the live state beside it)."""

    __slots__ = (
        "coalesced",
        "failures",
        "ignored",
        "keys_recreated",
        "lag",
        "notifications",
        "patched",
        "poisoned",
        "puts_refused",
        "puts_stored",
        "read_hits",
        "read_loads",
        "reads",
        "rebuild_batches",
        "rebuild_seconds",
        "rebuilds",
        "rewinds",
        "roots_behind",
        "roots_forgotten",
        "roots_owned",
        "roots_uncached",
        "snapshot_loads",
        "sweep_failing",
        "sweep_failures",
        "sweep_seconds",
        "sweeps",
    )

    def __init__(self) -> None:
        # The actors'
        self.notifications = 0
        self.coalesced = 0
        self.rebuilds = 0
        self.puts_stored = 0
        self.puts_refused = 0
        self.failures = 0
        self.lag = Histogram()
        self.rebuild_seconds = Histogram()
        # The rebuilder's
        self.rebuild_batches = 0
        self.snapshot_loads = 0
        self.patched = 0
        self.keys_recreated = 0
        self.roots_forgotten = 0
        # The node's: reads, the feed
        self.reads = 0
        self.read_hits = 0
        self.read_loads = 0
        self.poisoned = 0
        self.ignored = 0
        self.rewinds = 0
        # The reconcile sweep's: runs, and the latest one's figures
        self.sweeps = 0
        self.sweep_failures = 0
        self.sweep_failing: str | None = None  # the latest sweep's error, until one succeeds
        self.roots_owned = 0
        self.roots_behind = 0
        self.roots_uncached = 0
        self.sweep_seconds = 0.0

    def sweep_finished(self, owned: int, behind: int, uncached: int, seconds: float) -> None:
        self.sweeps += 1
        self.roots_owned, self.roots_behind, self.roots_uncached = owned, behind, uncached
        self.sweep_seconds = seconds
        self.sweep_failing = None

    def sweep_failed(self, exc: BaseException) -> None:
        self.sweep_failures += 1
        self.sweep_failing = repr(exc)


class ActorStatistics(NamedTuple):
    """One actor's live state. ``notifications == coalesced + rebuilds caused by notifications``."""

    root_id: str
    alive: bool
    built: int
    wanted: int
    mailbox_depth: int
    notifications: int
    coalesced: int
    rebuilds: int
    failures: int
    failing: bool


class NodeStatistics(NamedTuple):
    """A node's live state and its counters since it started."""

    node_id: str
    members: int
    actors_alive: int
    actors_failing: int
    mailbox_depth: int
    notifications: int
    ignored: int
    coalesced: int
    rebuilds: int
    rebuild_batches: int
    puts_stored: int
    puts_refused: int
    failures: int
    reads: int
    read_hits: int
    read_loads: int
    rewinds: int
    lag: HistogramSnapshot
    rebuild_seconds: HistogramSnapshot
    poisoned: int = 0
    """Malformed cached entries found (by readers of this node and by its cache): served as misses."""
    keys_recreated: int = 0
    """Leased puts refused because the cache had lost the key meanwhile (each rebuilt under a new lease)."""
    snapshot_loads: int = 0
    """Roots the rebuilder loaded from a store snapshot (batched loads count each root)."""
    patched: int = 0
    """Rebuilds whose graph was patched in memory from the feed's row images: no store read."""
    roots_forgotten: int = 0
    """Rebuilds that found the root's row gone: the cached graph was removed and its key floored."""
    sweeps: int = 0
    """Reconcile sweeps finished."""
    sweep_failures: int = 0
    roots_owned: int = 0
    """Roots this node owned at its latest sweep."""
    roots_behind: int = 0
    """Of those, cached at an older version than committed (each one rebuilt)."""
    roots_uncached: int = 0
    """Of those, absent from the cache (consistent: a read reads them through)."""
    feed_failing: bool = False
    feed_rows: int = 0
    """Changes this node's feed read from the store: with several nodes, about its share of them (the
    feed reads only the slots the node owns)."""
    checkpoint: int | None = None
    """The feed cursor of this node's durable checkpoint (None: none saved yet)."""
    resumed_from: int | None = None
    """The checkpoint cursor the feed resumed at when the node started (None: it started from now)."""
