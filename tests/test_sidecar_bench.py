"""bench sidecar runs end to end against a real ``graphcache serve`` and leaves no key or schema behind."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
from typing import Any

import asyncpg
import pytest
from redis import Redis

from graphcache import _cli
from graphcache.harness import _bench_sidecar
from graphcache.harness._servers import removed_afterwards

ROWS = (_bench_sidecar.SIDECAR, _bench_sidecar.RAW)


def schema_exists(dsn: str, schema: str) -> bool:
    async def exists() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            found: bool = await conn.fetchval(
                "SELECT count(*) > 0 FROM pg_namespace WHERE nspname = $1", schema
            )
        finally:
            await conn.close()
        return found

    return asyncio.run(exists())


def keys_under(redis_url: str, namespace: str) -> list[bytes]:
    with Redis.from_url(redis_url) as client:
        return list(client.scan_iter(match=f"{namespace}:*", count=1000))


def test_bench_sidecar_reports_both_sides_and_the_ratio_then_cleans_up(
    redis_url: str, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tiny run prints ops/s, p50 and p99 for the sidecar GET and the raw HGET, and their ratio; its
    namespace and schema are gone afterwards."""
    used: dict[str, Any] = {}

    def recorded(**where: Any) -> contextlib.AbstractAsyncContextManager[None]:
        used.update(where)
        return removed_afterwards(**where)

    monkeypatch.setattr(_bench_sidecar, "removed_afterwards", recorded)
    parser = argparse.ArgumentParser()
    _bench_sidecar.add_arguments(parser)
    argv = ["--redis", redis_url, "--postgres", postgres_dsn, "--seconds", "0.05", "--rounds", "2"]
    assert _bench_sidecar.run(parser.parse_args(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench sidecar: one client, one request at a time, a 50-node graph, 2 ")
    assert lines[1].split() == ["operation", "ops/s", "p50", "us", "p99", "us"]
    for line, name in zip(lines[2:4], ROWS, strict=True):
        assert line.startswith(name)
        assert re.fullmatch(r"\s+\d+\s+\d+\s+\d+", line[len(name) :]), line
    assert re.fullmatch(
        r"sidecar / raw: throughput \d+\.\d\d \(rounds \d+\.\d\d\.\.\d+\.\d\d\), target 0\.5  "
        r"(ok|BELOW TARGET 0\.5)",
        lines[4],
    ), lines[4]
    assert len(lines) == 5
    assert keys_under(redis_url, used["namespace"]) == []
    assert not schema_exists(postgres_dsn, used["schema"])


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--seconds", "0"], "--seconds"),
        (["--rounds", "0"], "--rounds"),
        (["--target", "-1"], "--target"),
        (["--redis", "foo://bar"], "--redis"),
        (["--postgres", "mysql://x"], "--postgres"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flags are checked before any server is contacted."""
    assert _cli.main(["bench", "sidecar", *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("graphcache bench sidecar: ")
    assert flag in err[0]


def test_an_unreachable_redis_is_one_line_and_exit_1(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that does not answer is named by its flag, before anything is created."""

    def refused(**where: Any) -> None:
        raise AssertionError(f"nothing may be created before the servers answer: {where}")

    monkeypatch.setattr(_bench_sidecar, "removed_afterwards", refused)
    assert (
        _cli.main(["bench", "sidecar", "--redis", "redis://127.0.0.1:1/0", "--postgres", postgres_dsn]) == 1
    )
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("graphcache bench sidecar: cannot reach Redis (--redis")
