"""Prometheus exposition of a Node's statistics, read at scrape time (nothing to update on hot paths)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ..actors import HistogramSnapshot, Node, NodeStatistics

__all__ = ("NodeCollector", "metrics_registry", "render_metrics")

_COUNTERS = (
    ("notifications", "notifications", "Change notifications routed to this node's actors."),
    ("notifications_ignored", "ignored", "Change notifications for roots another node owns."),
    ("coalesced", "coalesced", "Notifications that cost no rebuild of their own."),
    ("rebuilds", "rebuilds", "Rebuilds: one versioned put each, of a graph loaded or patched from the feed."),
    ("snapshot_loads", "snapshot_loads", "Roots loaded from a store snapshot for a rebuild."),
    ("patched_rebuilds", "patched", "Rebuilds patched in memory from the feed's row images: no store read."),
    ("rebuild_batches", "rebuild_batches", "Batches of rebuilds that started together: one load, one put."),
    ("rebuild_failures", "failures", "Failed rebuild attempts (retried with backoff, or given up)."),
    ("reads", "reads", "get() calls."),
    ("read_hits", "read_hits", "get() calls answered from the cache."),
    ("read_loads", "read_loads", "Read-through loads (one per single flight)."),
    ("feed_rewinds", "rewinds", "Times the change feed was re-read after a member left."),
    ("poisoned_entries", "poisoned", "Malformed cached entries found: served as misses and removed."),
    ("keys_recreated", "keys_recreated", "Leased puts refused because the cache had lost the key."),
    (
        "roots_forgotten",
        "roots_forgotten",
        "Rebuilds that found the root row gone: graph removed, key floored.",
    ),
    ("sweeps", "sweeps", "Reconcile sweeps finished."),
    ("feed_rows", "feed_rows", "Changes this node's feed read from the store (only the slots it owns)."),
    ("sweep_failures", "sweep_failures", "Reconcile sweeps that failed (retried with backoff)."),
)
_GAUGES = (
    ("members", "members", "Members in this node's current view."),
    ("actors_alive", "actors_alive", "Root actors alive on this node."),
    ("actors_failing", "actors_failing", "Root actors retrying a failed rebuild."),
    ("mailbox_depth", "mailbox_depth", "Wake-up messages queued in all mailboxes."),
    ("roots_owned", "roots_owned", "Roots this node owned at its latest reconcile sweep."),
    ("roots_behind", "roots_behind", "Owned roots cached older than committed at the latest sweep."),
    ("roots_uncached", "roots_uncached", "Owned roots absent from the cache at the latest sweep."),
    ("feed_failing", "feed_failing", "1 while the change feed fails to read the store."),
)


def _histogram(name: str, doc: str, snapshot: HistogramSnapshot, node_id: str) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["node"])
    buckets = [
        ("+Inf" if bound == float("inf") else repr(bound), float(count))
        for bound, count in zip(snapshot.bounds, snapshot.cumulative, strict=True)
    ]
    family.add_metric([node_id], buckets, snapshot.total)
    return family


class NodeCollector:
    """A prometheus_client collector that turns ``node.statistics()`` into metric families."""

    def __init__(self, node: Node, *, membership: Any = None) -> None:
        self._node = node
        self._membership = membership

    def collect(self) -> Iterator[Metric]:
        stats = self._node.statistics()
        yield from self._counters(stats)
        yield from self._gauges(stats)
        puts = CounterMetricFamily("graphcache_puts", "Versioned puts by result.", labels=["node", "result"])
        puts.add_metric([stats.node_id, "stored"], stats.puts_stored)
        puts.add_metric([stats.node_id, "refused"], stats.puts_refused)
        yield puts
        yield _histogram(
            "graphcache_rebuild_seconds",
            "Rebuild duration: load and put.",
            stats.rebuild_seconds,
            stats.node_id,
        )
        yield _histogram(
            "graphcache_commit_to_cache_lag_seconds",
            "From the commit of the oldest change a rebuild covers to its put.",
            stats.lag,
            stats.node_id,
        )
        consistent = GaugeMetricFamily(
            "graphcache_roots_consistent_ratio",
            "Share of owned roots whose cache was not behind the store at the latest sweep.",
            labels=["node"],
        )
        owned = stats.roots_owned
        consistent.add_metric([stats.node_id], 1.0 if owned == 0 else (owned - stats.roots_behind) / owned)
        yield consistent
        yield from self._membership_metrics(stats.node_id)

    def _counters(self, stats: NodeStatistics) -> Iterator[Metric]:
        for name, field, doc in _COUNTERS:
            family = CounterMetricFamily(f"graphcache_{name}", doc, labels=["node"])
            family.add_metric([stats.node_id], getattr(stats, field))
            yield family

    def _gauges(self, stats: NodeStatistics) -> Iterator[Metric]:
        for name, field, doc in _GAUGES:
            family = GaugeMetricFamily(f"graphcache_{name}", doc, labels=["node"])
            family.add_metric([stats.node_id], float(getattr(stats, field)))
            yield family

    def _membership_metrics(self, node_id: str) -> Iterator[Metric]:
        statistics = getattr(self._membership, "statistics", None)
        if statistics is None:
            return
        stats = statistics()
        connected = GaugeMetricFamily(
            "graphcache_membership_connected", "1 while heartbeats reach Redis.", labels=["node"]
        )
        connected.add_metric([node_id], 1.0 if stats.connected else 0.0)
        yield connected
        failures = CounterMetricFamily(
            "graphcache_membership_heartbeat_failures", "Heartbeats that failed.", labels=["node"]
        )
        failures.add_metric([node_id], stats.failures)
        yield failures


def metrics_registry(node: Node, *, membership: Any = None) -> CollectorRegistry:
    """A registry of this node's metrics only (no process-global state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, membership=membership))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    data: bytes = generate_latest(registry)
    return data
