"""The sidecar's HTTP API as an ASGI app (Starlette): graphs, refresh, health, readiness, metrics, OpenAPI.

Every error is ``application/problem+json`` (RFC 9457: ``type``, ``title``, ``status``, ``detail``), never
a traceback. Root ids are taken from the raw (still percent-encoded) path, so a root id may contain any
character, ``/`` included (as ``%2F``), and one that is not UTF-8 once decoded is refused (400).
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import msgspec
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.core import Metric
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..actors import InvalidArgument, Node, NodeNotRunning, ReadTimeout, VersionNotReached
from ..cache import CacheError, check_key, check_version
from ..storage import RootNotFound, StoreError
from ._metrics import NodeCollector

__all__ = ("PROBLEM", "SidecarState", "build_app", "openapi_document")

logger = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
MSGPACK = "application/msgpack"
_GRAPHS = b"/v1/graphs/"
_DECIMAL = re.compile(r"[0-9]{1,20}")
_msgpack = msgspec.msgpack.Encoder()
MAX_ROOT_ID_BYTES = 1000
"""As the node's own check (a root id becomes a cache key with a short prefix)."""


def _checked(check: Callable[[], Any]) -> Any:
    """``check()``, its complaint (the cache's ValueError kinds) as the node's ``InvalidArgument``."""
    try:
        return check()
    except CacheError as exc:
        raise InvalidArgument(str(exc)) from None


class SidecarState(Protocol):
    """What the routes see: the node once it runs, and why the sidecar is not ready (empty: ready)."""

    @property
    def node(self) -> Node | None: ...

    @property
    def membership(self) -> Any: ...

    async def problems(self) -> list[str]: ...


def problem(status: int, detail: str, *, headers: dict[str, str] | None = None) -> Response:
    """An ``application/problem+json`` response."""
    title = HTTPStatus(status).phrase
    body = {
        "type": f"https://graphcache.dev/problems/{title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


class _LiveCollector:
    """The node's metrics once it runs; nothing before."""

    def __init__(self, state: SidecarState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        node = self._state.node
        if node is not None:
            yield from NodeCollector(node, membership=self._state.membership).collect()


class _Asgi:
    """An ASGI app Starlette's Route mounts as is (it calls a plain function as a request handler)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)


def _root_id(raw_segment: bytes) -> str:
    try:
        text = unquote_to_bytes(raw_segment).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("root_id is not valid UTF-8 once percent-decoded") from None
    root_id: str = _checked(lambda: check_key(text, name="root_id", limit=MAX_ROOT_ID_BYTES))
    return root_id


def _min_version(request: Request) -> int | None:
    values = request.query_params.getlist("min_version")
    if not values:
        return None
    if len(values) > 1:
        raise InvalidArgument("min_version is given more than once")
    text = values[0]
    if not _DECIMAL.fullmatch(text):
        raise InvalidArgument(f"min_version must be a whole number in 0..2**63-1, got {text[:40]!r}")
    version: int = _checked(lambda: check_version(int(text), name="min_version"))
    return version


def build_app(state: SidecarState, *, read_timeout: float = 10.0, api_token: str | None = None) -> Starlette:
    """The sidecar's ASGI app over ``state``; ``api_token`` guards every ``/v1/`` route."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LiveCollector(state))
    metrics_app = make_asgi_app(registry)
    expected = None if api_token is None else f"Bearer {api_token}".encode()

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, expected)

    async def node_call(call: Callable[[Node], Awaitable[Response]]) -> Response:
        node = state.node
        if node is None:
            return problem(503, "the node is starting: see /readyz")
        try:
            return await call(node)
        except InvalidArgument as exc:
            return problem(400, str(exc))
        except RootNotFound as exc:
            return problem(404, str(exc))
        except (ReadTimeout, VersionNotReached) as exc:
            return problem(504, str(exc))
        except (StoreError, CacheError, NodeNotRunning) as exc:
            return problem(503, f"unavailable: {exc}")

    async def graphs(request: Request) -> Response:
        if not authorized(request):
            return problem(401, "a valid 'Authorization: Bearer <token>' header is required",
                           headers={"WWW-Authenticate": 'Bearer realm="graphcache"'})  # fmt: skip
        raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
        rest = raw.split(b"?", 1)[0][len(_GRAPHS) :]
        parts = rest.split(b"/")
        try:
            if len(parts) == 1 and request.method in ("GET", "HEAD"):
                root_id = _root_id(parts[0])
                min_version = _min_version(request)
            elif len(parts) == 2 and parts[1] == b"refresh" and request.method == "POST":
                root_id = _root_id(parts[0])
                min_version = None
            elif len(parts) in (1, 2) and (len(parts) == 1 or parts[1] == b"refresh"):
                return problem(405, f"{request.method} is not allowed here")
            else:
                return problem(404, "no such route")
        except InvalidArgument as exc:
            return problem(400, str(exc))

        if request.method == "POST":

            async def refresh(node: Node) -> Response:
                node.refresh(root_id)
                return JSONResponse({"root_id": root_id, "status": "refresh requested"}, status_code=202)

            return await node_call(refresh)

        async def read(node: Node) -> Response:
            graph = await node.get(root_id, min_version=min_version, timeout=read_timeout)
            etag = f'"{graph.version}"'
            headers = {"ETag": etag, "Cache-Control": "no-cache"}
            matches = [
                tag.strip().removeprefix("W/") for tag in request.headers.get("if-none-match", "").split(",")
            ]
            if etag in matches or "*" in matches:
                return Response(status_code=304, headers=headers)
            if MSGPACK in request.headers.get("accept", ""):
                return Response(_msgpack.encode(graph), media_type=MSGPACK, headers=headers)
            return Response(graph.to_json(), media_type="application/json", headers=headers)

        return await node_call(read)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")  # alive: outages are /readyz's business, never a reason to restart

    async def readyz(request: Request) -> Response:
        problems = await state.problems()
        if problems:
            return PlainTextResponse("".join(f"{line}\n" for line in problems), status_code=503)
        return PlainTextResponse("ready\n")

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return problem(exc.status_code, exc.detail)
        logger.error("http: %s %s failed: %r", request.method, request.url.path, exc)
        return problem(500, "internal error (logged by the sidecar)")

    routes = [
        Route("/v1/graphs/{rest:path}", graphs, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/openapi.json", openapi, methods=["GET", "HEAD"]),
        Route("/metrics", _Asgi(metrics_app), methods=["GET", "HEAD"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: http_error})


def _problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


_ROOT_ID = {
    "name": "root_id",
    "in": "path",
    "required": True,
    "description": "The graph's root id, percent-encoded (UTF-8, at most 1000 bytes).",
    "schema": {"type": "string", "minLength": 1},
}
_UNAUTHORIZED = _problem_response("Missing or wrong bearer token (only when the sidecar has --api-token).")
_BAD = _problem_response("Bad root id or min_version; nothing was read or written.")
_UNAVAILABLE = _problem_response("PostgreSQL or Redis unavailable, or the node is starting.")
_METRICS = {
    "description": "Prometheus text, or OpenMetrics when the Accept header asks for it (as Prometheus does).",
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "application/openmetrics-text": {"schema": {"type": "string"}},
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the sidecar's routes."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "graphcache sidecar", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                },
                "Node": {
                    "type": "object",
                    "required": ["id", "parent_id", "data", "row_version"],
                    "properties": {
                        "id": {"type": "string"},
                        "parent_id": {"type": ["string", "null"]},
                        "data": {"type": "object"},
                        "row_version": {"type": "integer"},
                    },
                },
                "Graph": {
                    "type": "object",
                    "required": ["root_id", "version", "nodes"],
                    "properties": {
                        "root_id": {"type": "string"},
                        "version": {"type": "integer", "minimum": 0},
                        "nodes": {
                            "type": "object",
                            "additionalProperties": {"$ref": "#/components/schemas/Node"},
                        },
                    },
                },
            },
        },
        "paths": {
            "/v1/graphs/{root_id}": {
                "get": {
                    "summary": "The graph of a root (read-through, one load for concurrent misses).",
                    "security": [{}, {"bearer": []}],
                    "parameters": [
                        _ROOT_ID,
                        {
                            "name": "min_version",
                            "in": "query",
                            "required": False,
                            "description": "Never answer with an older graph (waits for it, else 504).",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                        },
                        {
                            "name": "If-None-Match",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The graph; ETag is its version in quotes.",
                            "headers": {"ETag": {"schema": {"type": "string"}}},
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Graph"}},
                                # the same object, msgpack-encoded (Accept: application/msgpack)
                                MSGPACK: {"schema": {"$ref": "#/components/schemas/Graph"}},
                            },
                        },
                        "304": {"description": "If-None-Match matched the current version."},
                        "400": _BAD,
                        "401": _UNAUTHORIZED,
                        "404": _problem_response("No graph has this root id."),
                        "503": _UNAVAILABLE,
                        "504": _problem_response(
                            "The read (or min_version) did not finish within --read-timeout."
                        ),
                    },
                }
            },
            "/v1/graphs/{root_id}/refresh": {
                "post": {
                    "summary": "Ask the node to rebuild the root's graph from the store now.",
                    "security": [{}, {"bearer": []}],
                    "parameters": [_ROOT_ID],
                    "responses": {
                        "202": {
                            "description": "Refresh requested.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        "400": _BAD,
                        "401": _UNAUTHORIZED,
                        "503": _UNAVAILABLE,
                    },
                }
            },
            "/healthz": {"get": {"summary": "Alive.", "responses": {"200": _text("ok")}}},
            "/readyz": {
                "get": {
                    "summary": "Following the feed, joined, PostgreSQL and Redis reachable.",
                    "responses": {"200": _text("ready"), "503": _text("One reason per line.")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text exposition of the node's metrics.",
                    "responses": {"200": _METRICS},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }
