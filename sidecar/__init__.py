"""graphcache.sidecar: the ``serve`` process beside a service in any language, and its HTTP API."""

from ._api import build_app, openapi_document
from ._metrics import NodeCollector, metrics_registry, render_metrics

__all__ = ("NodeCollector", "build_app", "metrics_registry", "openapi_document", "render_metrics")
