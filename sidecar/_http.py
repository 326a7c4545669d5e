"""A minimal HTTP/1.1 server on anyio for the sidecar's ``/metrics`` and ``/healthz``.

GET (and HEAD) of a route runs its handler, which returns ``(status, content type, body)``; any other
path is 404, any other method 405; a malformed request line is 400, a head over 8 KiB 431, a head not
complete within ``head_timeout`` 408, and a handler that raises 500 (logged). One
request per connection (``Connection: close``): scrapers and health probes need nothing more, and
no connection can pin the server. Request bodies are not read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from ..actors import InvalidArgument

__all__ = ("InvalidPort", "Route", "serve_http")

logger = logging.getLogger(__name__)

Route = Callable[[], Awaitable[tuple[int, str, bytes]]]

MAX_HEAD_BYTES = 8192
HEAD_TIMEOUT = 10.0
_TEXT = "text/plain; charset=utf-8"


class InvalidPort(InvalidArgument):
    """The port is not an int in 0..65535."""


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


def _parse_request_line(head: bytes) -> tuple[str, str]:
    """(method, path without query) of a request head, or `_BadRequest`."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(HTTPStatus.BAD_REQUEST) from None
    return method, target.split("?", 1)[0]


async def _read_head(stream: anyio.abc.ByteStream) -> bytes:
    too_large = _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
    try:
        head = await BufferedByteReceiveStream(stream).receive_until(b"\r\n\r\n", MAX_HEAD_BYTES)
    except anyio.DelimiterNotFound:
        raise too_large from None
    # receive_until enforces its limit only while it waits: a big head that came in one read passes it
    if len(head) > MAX_HEAD_BYTES:
        raise too_large
    return head


def _response(status: int, content_type: str, body: bytes, *, head_only: bool = False) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)


def _error(status: HTTPStatus) -> bytes:
    return _response(status, _TEXT, f"{status.value} {status.phrase}\n".encode())


async def _dispatch(head: bytes, routes: Mapping[str, Route]) -> bytes:
    method, path = _parse_request_line(head)
    if method not in ("GET", "HEAD"):
        return _error(HTTPStatus.METHOD_NOT_ALLOWED)
    route = routes.get(path)
    if route is None:
        return _error(HTTPStatus.NOT_FOUND)
    try:
        status, content_type, body = await route()
    except Exception:  # a failing handler is the handler's bug: answer 500, keep serving
        logger.exception("http: handler for %s failed", path)
        return _error(HTTPStatus.INTERNAL_SERVER_ERROR)
    return _response(status, content_type, body, head_only=method == "HEAD")


async def _answer(
    stream: anyio.abc.ByteStream, routes: Mapping[str, Route], head_timeout: float
) -> bytes | None:
    """The response to the request on ``stream``; None if the client left mid-request."""
    try:
        with anyio.fail_after(head_timeout):
            head = await _read_head(stream)
        return await _dispatch(head, routes)
    except TimeoutError:
        return _error(HTTPStatus.REQUEST_TIMEOUT)
    except _BadRequest as exc:
        return _error(exc.status)
    except (anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return None


async def _handle(stream: anyio.abc.SocketStream, routes: Mapping[str, Route], head_timeout: float) -> None:
    async with stream:
        response = await _answer(stream, routes, head_timeout)
        if response is None:
            return
        try:
            await stream.send(response)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            logger.debug("http: client left before the response was sent")


async def serve_http(
    host: str | None,
    port: int,
    routes: Mapping[str, Route],
    *,
    head_timeout: float = HEAD_TIMEOUT,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``host:port`` until cancelled; ``task_status.started(port)`` reports the
    bound port (``port=0`` picks a free one; ``host=None`` listens on every interface). A client that
    has not sent a whole request head within ``head_timeout`` seconds gets 408."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidPort(f"port must be an int in 0..65535, got {port!r}")
    if isinstance(head_timeout, bool) or not isinstance(head_timeout, int | float) or not head_timeout > 0:
        raise InvalidArgument(f"head_timeout must be a positive number of seconds, got {head_timeout!r}")
    routes = dict(routes)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound: int = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 (anyio, not Django)
        logger.info("http: serving %s on %s:%d", sorted(routes), host, bound)
        task_status.started(bound)

        async def handle(stream: anyio.abc.SocketStream) -> None:
            try:
                await _handle(stream, routes, head_timeout)
            except Exception:  # one broken connection must never stop the server
                logger.exception("http: connection failed")

        await listener.serve(handle)
