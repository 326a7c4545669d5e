"""graphcache.sidecar: the ``serve`` process beside a service in any language, and its HTTP endpoint."""

from ._http import InvalidPort, Route, serve_http
from ._metrics import NodeCollector, metrics_registry, render_metrics

__all__ = ("InvalidPort", "NodeCollector", "Route", "metrics_registry", "render_metrics", "serve_http")
