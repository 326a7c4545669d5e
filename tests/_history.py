"""Reads recorded by fault tests, and the guarantees checked on them (G1, G2) without trusting the node."""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from dataclasses import dataclass, field

from graphcache.storage import Graph

__all__ = ("Reads", "graph_is_whole")


@dataclass
class Reads:
    """Every completed read of a root: (start, end, version) on one monotonic clock."""

    seen: dict[str, list[tuple[float, float, int]]] = field(default_factory=lambda: defaultdict(list))

    def record(self, root_id: str, started: float, version: int) -> None:
        self.seen[root_id].append((started, time.monotonic(), version))

    def count(self) -> int:
        return sum(len(reads) for reads in self.seen.values())

    def regressions(self) -> list[str]:
        """G1: a read that started after another read of the same root ended never returns an older
        version. One line per violation."""
        found = []
        for root_id, reads in self.seen.items():
            by_end = sorted(reads, key=lambda read: read[1])
            ends = [end for _, end, _ in by_end]
            best: list[int] = []  # best[i]: the newest version among the first i+1 reads to end
            for _, _, version in by_end:
                best.append(max(version, best[-1]) if best else version)
            for started, _, version in reads:
                before = bisect.bisect_left(ends, started)  # reads that ended before this one started
                if before and best[before - 1] > version:
                    found.append(f"{root_id}: read {version} after a reader had seen {best[before - 1]}")
        return found


def graph_is_whole(graph: Graph) -> bool:
    """G2 for the fault tests' workload: each write sets child ``c<k>``'s ``at`` to the version it
    commits, so the graph at version v holds one child written at v (v > 1) and none written later."""
    stamps = [node.data.get("at", 0) for node_id, node in graph.nodes.items() if node_id != graph.root_id]
    if any(stamp > graph.version for stamp in stamps):
        return False
    return graph.version == 1 or graph.version in stamps
