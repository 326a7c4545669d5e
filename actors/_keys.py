"""Where a root's graph lives in the cache. Every writer of a graph (the actors, the harness's
strategies, a service in another language) uses this one key, so versioned puts compare like with like."""

from __future__ import annotations

__all__ = ("graph_key",)


def graph_key(root_id: str) -> str:
    """The cache key of ``root_id``'s whole graph."""
    return f"graph:{root_id}"
