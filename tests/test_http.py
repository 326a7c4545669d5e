"""serve_http: GET routes over real sockets, errors answered with the right status, never a dead server."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest

from graphcache.actors import InvalidArgument
from graphcache.sidecar._http import InvalidPort, Route, serve_http

pytestmark = pytest.mark.anyio

DEADLINE = 20.0  # hang protection only


async def healthz() -> tuple[int, str, bytes]:
    return 200, "text/plain; charset=utf-8", b"ok\n"


async def unhealthy() -> tuple[int, str, bytes]:
    return 503, "text/plain", b"starting\n"


async def boom() -> tuple[int, str, bytes]:
    raise RuntimeError("handler bug")


ROUTES: dict[str, Route] = {"/healthz": healthz, "/unhealthy": unhealthy, "/boom": boom}


@asynccontextmanager
async def serving(routes: dict[str, Route] = ROUTES, **options: float) -> AsyncIterator[int]:
    """Run serve_http on 127.0.0.1 with a free port; yield the port."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_http("127.0.0.1", 0, routes, **options, task_status=task_status)
        )
        yield port
        tg.cancel_scope.cancel()


async def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` and read until the server closes the connection."""
    chunks = []
    with anyio.fail_after(DEADLINE):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(raw)
            while True:
                try:
                    chunks.append(await stream.receive())
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    return b"".join(chunks)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return parse(await exchange(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))


async def test_a_route_answers_with_its_status_type_and_body() -> None:
    """GET of a route returns the handler's status, content type and body, then closes."""
    async with serving() as port:
        status, headers, body = await get(port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers == {
        "Content-Type": "text/plain; charset=utf-8",
        "Content-Length": "3",
        "Connection": "close",
    }


async def test_a_standard_client_reads_the_response() -> None:
    """urllib (a real HTTP client, in a thread) reads status, content type and body."""

    def fetch(port: int) -> tuple[int, str, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz?verbose=1", timeout=DEADLINE) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()

    async with serving() as port:
        assert await anyio.to_thread.run_sync(fetch, port) == (200, "text/plain; charset=utf-8", b"ok\n")


async def test_a_handlers_error_status_is_passed_through() -> None:
    """A handler answering 503 yields a 503 response with its body."""
    async with serving() as port:
        status, _, body = await get(port, "/unhealthy")
    assert (status, body) == (503, b"starting\n")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
        (b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"garbage\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
        (b"GET /healthz SPDY/3\r\n\r\n", 400),
        (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 9000, 431),
    ],
)
async def test_a_bad_request_gets_its_status(raw: bytes, status: int) -> None:
    """Unknown path 404, other method 405, malformed 400, oversized head 431."""
    async with serving() as port:
        got, headers, _ = await get_raw(port, raw)
    assert got == status
    assert headers["Connection"] == "close"


async def get_raw(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    return parse(await exchange(port, raw))


async def test_head_sends_headers_without_the_body() -> None:
    """HEAD answers the route's headers, Content-Length included, and no body."""
    async with serving() as port:
        status, headers, body = await get(port, "/healthz", method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "3", b"")


async def test_a_client_too_slow_to_send_its_head_gets_408() -> None:
    """A request head still incomplete after head_timeout is answered 408."""
    async with serving(head_timeout=0.2) as port:
        status, _, _ = await get_raw(port, b"GET /healthz HTTP/1.1\r\n")
    assert status == 408


async def test_a_failing_handler_gets_500_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that raises yields 500 (logged); the next request is served normally."""
    async with serving() as port:
        assert (await get(port, "/boom"))[0] == 500
        assert (await get(port, "/healthz"))[0] == 200
    assert "handler for /boom failed" in caplog.text


async def test_a_client_that_hangs_up_does_not_stop_the_server() -> None:
    """Connections closed before or midway through a request head leave the server serving."""
    async with serving() as port:
        async with await anyio.connect_tcp("127.0.0.1", port):
            pass
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"GET /heal")
        assert (await get(port, "/healthz"))[0] == 200


async def test_many_concurrent_requests_are_all_answered() -> None:
    """100 concurrent clients each get the route's body; the handler runs once per request."""
    calls = 0

    async def counted() -> tuple[int, str, bytes]:
        nonlocal calls
        calls += 1
        await anyio.lowlevel.checkpoint()  # let requests interleave inside handlers
        return 200, "text/plain", b"counted"

    results: list[tuple[int, bytes]] = []

    async def client(port: int) -> None:
        status, _, body = await get(port, "/counted")
        results.append((status, body))

    async with serving({"/counted": counted}) as port, anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(client, port)
    assert results == [(200, b"counted")] * 100
    assert calls == 100


async def test_port_zero_reports_the_bound_port_and_cancel_closes_it() -> None:
    """started() reports a real port; after cancellation nothing listens there any more."""
    async with serving() as port:
        assert port > 0
        assert (await get(port, "/healthz"))[0] == 200
    with pytest.raises(OSError, match="connect"):
        await anyio.connect_tcp("127.0.0.1", port)


async def test_a_busy_port_raises_oserror() -> None:
    """Binding a port another server holds fails with OSError."""
    async with serving() as port, anyio.create_task_group() as tg:
        with pytest.raises(OSError, match="in use"):
            await tg.start(serve_http, "127.0.0.1", port, ROUTES)


@pytest.mark.parametrize("port", [-1, 65536, True, "8080", 80.0])
async def test_a_bad_port_is_refused_before_binding(port: object) -> None:
    """A port that is not an int in 0..65535 raises InvalidPort, a ValueError."""
    with pytest.raises(InvalidPort) as info:
        await serve_http("127.0.0.1", port, ROUTES)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("head_timeout", [0, -1.0, True, "10"])
async def test_a_bad_head_timeout_is_refused_before_binding(head_timeout: object) -> None:
    """head_timeout must be a positive number of seconds; else InvalidArgument, a ValueError."""
    with pytest.raises(InvalidArgument, match="head_timeout"):
        await serve_http("127.0.0.1", 0, ROUTES, head_timeout=head_timeout)  # type: ignore[arg-type]
