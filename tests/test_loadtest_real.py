"""The load generator on the real servers: writer, reader and node processes, checked histories."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import asyncpg
import msgspec
import pytest
import redis

from graphcache import _cli
from graphcache.actors import graph_key
from graphcache.cache import CacheUnavailable
from graphcache.harness import StrategyResult, _loadtest, read_history
from graphcache.harness._lt_backends import Env
from graphcache.harness._strategies import Tally
from graphcache.harness._workload import Stopper
from tests._redis_servers import PrivateRedis

pytestmark = pytest.mark.slow


def loadtest(argv: list[str]) -> int:
    """``graphcache loadtest ARGV``, in this process."""
    return _cli.main(["loadtest", *argv])


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict[str, StrategyResult]]:
    """A short actor-then-naive run on the shared Redis and PostgreSQL (fresh namespace and schema each)."""
    from tests.conftest import POSTGRES_DSN, REDIS_URL  # noqa: PLC0415

    out = tmp_path_factory.mktemp("real")
    results: dict[str, StrategyResult] = {}
    codes = []
    for strategy in ("actor", "naive"):
        argv = ["--strategy", strategy, "--redis", REDIS_URL, "--postgres", POSTGRES_DSN, "--roots", "4",
                "--writers", "32", "--readers", "6", "--duration", "3", "--settle", "15", "--no-progress",
                "--out", str(out / strategy)]  # fmt: skip
        codes.append(loadtest(argv))
        payload = json.loads((out / strategy / "report.json").read_bytes())
        results.update({r.strategy: r for r in msgspec.convert(payload["results"], list[StrategyResult])})
    return codes[0], out, results


def test_actor_on_real_servers_keeps_g1_g2_g3(real_run: tuple[int, Path, dict[str, StrategyResult]]) -> None:
    """Node processes (run.py serve) rebuild from the PostgreSQL feed: no regression, no torn, converged."""
    code, _, results = real_run
    actor = results["actor"]
    assert code == 0
    assert actor.updates > 0
    assert (actor.check.regressions, actor.check.torn, actor.check.stale) == (0, 0, 0)
    assert actor.check.unread_at_end == 0
    assert 0 < actor.rebuilds < actor.updates


def test_naive_on_real_servers_is_caught(real_run: tuple[int, Path, dict[str, StrategyResult]]) -> None:
    """The naive re-cache across writer processes shows regressions or torn graphs."""
    naive = real_run[2]["naive"]
    assert naive.updates > 0
    assert naive.check.regressions + naive.check.torn > 0


def test_each_process_wrote_its_history(real_run: tuple[int, Path, dict[str, StrategyResult]]) -> None:
    """Writers, readers and the settle phase each leave a history; every writer task wrote."""
    out = real_run[1] / "naive" / "naive"
    names = sorted(p.name for p in out.glob("*.jsonl"))
    assert names == ["main.jsonl", "readers-0.jsonl", "writers-0.jsonl", "writers-1.jsonl"]
    writers = {e.process for e in read_history(*out.glob("writers-*.jsonl")) if e.op == "write"}
    assert writers == {f"writer-{i}" for i in range(32)}


def test_the_run_leaves_no_keys_and_no_schema(
    real_run: tuple[int, Path, dict[str, StrategyResult]], redis_url: str, postgres_dsn: str
) -> None:
    """The actor run's namespace (named in its node logs) has no keys left and its schema is dropped."""
    log = (real_run[1] / "actor" / "actor" / "node-0.log").read_text()
    found = re.search(r"\((gclt[0-9a-f]{10}):members\)", log)
    assert found is not None
    namespace = found.group(1)
    assert keys_under(redis_url, namespace) == []
    assert not anyio.run(schema_exists, postgres_dsn, namespace.replace("gclt", "gclt_", 1))


async def schema_exists(dsn: str, schema: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema))
    finally:
        await conn.close()


def keys_under(url: str, namespace: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return list(client.scan_iter(match=f"{namespace}:*"))


class FailingLoad:
    """Stands in for the load phase: checks the run's schema and keys exist, then fails as if Redis had
    gone away mid-run."""

    def __init__(self) -> None:
        self.seen: list[Env] = []

    async def __call__(self, env: Env, name: str, out: Path, interrupt: Stopper) -> tuple[Tally, float]:
        self.seen.append(env)
        await env.cache.add(graph_key("scratch"), {"made": "by this run"})
        assert env.config.postgres is not None
        assert await schema_exists(env.config.postgres, env.schema)
        raise CacheUnavailable("lost the connection to Redis mid-run")


@pytest.fixture
def servers(redis_url: str, postgres_dsn: str) -> list[str]:
    """The shared servers as command-line flags."""
    return ["--redis", redis_url, "--postgres", postgres_dsn]


@pytest.mark.parametrize("command", ["loadtest", "demo"])
def test_a_run_that_fails_midway_leaves_no_schema_and_no_keys(
    command: str,
    servers: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real-server run that fails after creating its schema and keys exits 1 with one line saying why,
    and its gclt schema and keys are gone."""
    failing = FailingLoad()
    monkeypatch.setattr(_loadtest, "load", failing)
    argv = [*servers, "--duration", "1", "--no-progress"]
    if command == "loadtest":
        argv += ["--strategy", "cas", "--roots", "2", "--out", str(tmp_path)]
    assert _cli.main([command, *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"graphcache {command}: lost the connection to Redis mid-run")
    assert err.count("\n") == 1
    (env,) = failing.seen
    assert env.schema.startswith("gclt_")
    assert env.config.redis is not None
    assert env.config.postgres is not None
    assert not anyio.run(schema_exists, env.config.postgres, env.schema)
    assert keys_under(env.config.redis, env.namespace) == []


@pytest.mark.fault
def test_redis_stopped_mid_run_is_one_line_and_the_schema_is_dropped(
    private_redis: PrivateRedis, postgres_dsn: str, tmp_path: Path
) -> None:
    """Redis killed while the writers run: the load test exits 1 with one line naming what failed and the
    keys it could not remove, and the run's PostgreSQL schema is dropped all the same."""
    argv = [
        sys.executable, "-m", "graphcache", "loadtest", "--strategy", "cas", "--redis", private_redis.url,
        "--postgres", postgres_dsn, "--roots", "4", "--writers", "4", "--readers", "1", "--duration", "3",
        "--settle", "1", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        history = tmp_path / "cas" / "writers-0.jsonl"
        deadline = time.monotonic() + 60
        # The writers' first flushed events: a file condition, polled under a deadline.
        while not (history.exists() and history.stat().st_size > 0):
            assert time.monotonic() < deadline, "the writers never started"
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        private_redis.stop()
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        if private_redis._process is None:
            private_redis.start()
    assert run.returncode == 1, err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    found = re.search(r"could not remove the Redis keys (gclt[0-9a-f]{10}):\*", err)
    assert found is not None, err
    schema = found.group(1).replace("gclt", "gclt_", 1)
    assert not anyio.run(schema_exists, postgres_dsn, schema)
