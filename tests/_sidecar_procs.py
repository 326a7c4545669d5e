"""Start ``run.py serve`` processes for tests, read their /metrics, and the writer worker's command line."""

from __future__ import annotations

import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple

import anyio
import anyio.abc
from prometheus_client.parser import text_string_to_metric_families

ROOT_DIR = Path(__file__).resolve().parent.parent
READY = re.compile(rb"graphcache node (\S+) ready (http://\S+)")


class Sidecar:
    """A running ``run.py serve`` process."""

    def __init__(self, process: anyio.abc.Process, node_id: str, base_url: str, log: Path) -> None:
        self.process = process
        self.node_id = node_id
        self.base_url = base_url
        self.metrics_url = base_url + "/metrics"
        self.log = log

    async def metrics(self) -> dict[str, float]:
        """``name`` (or ``name:result``) -> value of this node's graphcache samples."""
        return parse_metrics(await http_get(self.metrics_url))

    async def stop(self, signum: signal.Signals = signal.SIGTERM, *, within: float = 15) -> int:
        """Send ``signum`` and wait for the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        with anyio.fail_after(within):
            return await self.process.wait()


async def http_get(url: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own localhost server)
            body: bytes = response.read()
            return body.decode()

    return await anyio.to_thread.run_sync(fetch)


def parse_metrics(text: str) -> dict[str, float]:
    """``name`` (or ``name:result``) -> value of each sample labelled by node (and result) only; histogram
    buckets (labelled ``le`` too) are left out."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "node" in sample.labels and set(sample.labels) <= {"node", "result"}:
                result = sample.labels.get("result")
                samples[f"{sample.name}:{result}" if result else sample.name] = float(sample.value)
    return samples


class Servers(NamedTuple):
    """Where the sidecars under test keep their data: a Redis namespace and a PostgreSQL schema."""

    redis_url: str
    dsn: str
    namespace: str
    schema: str


def serve_command(node_id: str, servers: Servers, extra: list[str]) -> list[str]:
    return [
        sys.executable, str(ROOT_DIR / "run.py"), "serve",
        "--redis", servers.redis_url, "--postgres", servers.dsn,
        "--namespace", servers.namespace, "--schema", servers.schema,
        "--node-id", node_id, "--port", "0", *extra,
    ]  # fmt: skip


@asynccontextmanager
async def sidecar(command: list[str], log: Path, *, within: float = 30) -> AsyncIterator[Sidecar]:
    """Start ``command``, wait for its ready line; SIGKILL it on the way out if it is still running."""
    with log.open("wb") as stderr:
        process = await anyio.open_process(command, stderr=stderr, cwd=ROOT_DIR)
        try:
            node_id, url = await _ready(process, within, log)
            yield Sidecar(process, node_id, url, log)
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()


async def _ready(process: anyio.abc.Process, within: float, log: Path) -> tuple[str, str]:
    assert process.stdout is not None
    seen = b""
    with anyio.move_on_after(within):
        async for chunk in process.stdout:
            seen += chunk
            match = READY.search(seen)
            if match is not None:
                return match.group(1).decode(), match.group(2).decode()
    raise AssertionError(f"no ready line from {process!r}: stdout={seen!r} stderr={tail(log)}")


def tail(log: Path, size: int = 2000) -> str:
    return log.read_text()[-size:]
