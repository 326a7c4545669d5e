"""The command line never tracebacks: every bad invocation is one line on stderr naming what is wrong.

Each invocation in the table runs as its own ``python -m graphcache`` process. They all start at once
(a module fixture) and nothing in them waits on a network: unreachable servers are 127.0.0.1:1, where a
connection is refused at once, and ``serve`` gets a short ``--startup-timeout``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from graphcache import _cli
from graphcache.cache import CacheUnavailable
from tests.conftest import POSTGRES_DSN, REDIS_URL

DOWN_REDIS = "redis://127.0.0.1:1/0"
DOWN_POSTGRES = "postgresql://postgres@127.0.0.1:1/postgres"
SECRET = "s3cret-pw"
SERVE_QUICKLY = ["--startup-timeout", "0.5", "--membership", "static", "--port", "0"]


class Case(NamedTuple):
    name: str
    argv: list[str]
    status: int
    names: str  # the flag (or file) the one line must name
    env: tuple[tuple[str, str], ...] = ()  # environment variables to set


def cases(files: dict[str, str], taken_port: int) -> list[Case]:
    return [
        # demo
        Case("demo-zero-duration", ["demo", "--duration", "0"], 2, "--duration"),
        Case("demo-writers-not-a-number", ["demo", "--writers", "many"], 2, "--writers"),
        Case(
            "demo-bad-redis-scheme",
            ["demo", "--redis", "foo://bar", "--postgres", POSTGRES_DSN],
            2,
            "--redis",
        ),
        Case("demo-redis-without-postgres", ["demo", "--redis", REDIS_URL], 2, "--postgres"),
        Case("demo-servers-down", ["demo", "--redis", DOWN_REDIS, "--postgres", DOWN_POSTGRES], 1, "--redis"),
        # serve
        Case("serve-bad-redis-scheme", ["serve", "--redis", "foo://bar"], 2, "--redis"),
        Case("serve-negative-heartbeat", ["serve", "--heartbeat", "-1"], 2, "--heartbeat"),
        Case("serve-nan-ttl", ["serve", "--ttl", "nan"], 2, "--ttl"),
        Case("serve-ttl-below-heartbeat", ["serve", "--ttl", "1", "--heartbeat", "2"], 2, "--ttl"),
        Case("serve-empty-node-id", ["serve", "--node-id", ""], 2, "--node-id"),
        Case("serve-loud-log-level", ["serve", "--log-level", "LOUD"], 2, "--log-level"),
        Case("serve-port-out-of-range", ["serve", "--port", "70000"], 2, "--port"),
        Case("serve-deprecated-port-alias", ["serve", "--metrics-port", "70000"], 2, "--metrics-port"),
        Case("serve-zero-read-timeout", ["serve", "--read-timeout", "0"], 2, "--read-timeout"),
        Case("serve-open-host-without-token", ["serve", "--host", "192.0.2.1"], 2, "--api-token"),
        Case("serve-schema-not-an-identifier", ["serve", "--schema", "drop table"], 2, "--schema"),
        Case("serve-bad-ttl-from-environment", ["serve"], 2, "GRAPHCACHE_TTL", (("GRAPHCACHE_TTL", "-1"),)),
        Case(
            "serve-bad-membership-from-environment",
            ["serve"],
            2,
            "GRAPHCACHE_MEMBERSHIP",
            (("GRAPHCACHE_MEMBERSHIP", "gossip"),),
        ),
        Case(
            "serve-secret-in-a-bad-url", ["serve", "--redis", f"http://app:{SECRET}@cache:6379"], 2, "--redis"
        ),
        Case(
            "serve-port-in-use",
            ["serve", *SERVE_QUICKLY, "--port", str(taken_port), "--postgres", DOWN_POSTGRES],
            1,
            "--port",
        ),
        Case(
            "serve-postgres-down",
            [
                "serve",
                *SERVE_QUICKLY,
                "--log-level",
                "ERROR",
                "--postgres",
                DOWN_POSTGRES,
                "--redis",
                DOWN_REDIS,
            ],
            1,
            "--postgres",
        ),
        Case("serve-bad-graph-spec", ["serve", "--graph", files["bad_spec"]], 2, "--graph"),
        # track
        Case("track-without-a-spec", ["track"], 2, "--graph"),
        Case("track-bad-spec", ["track", "--graph", files["bad_spec"]], 2, "parent cycle"),
        Case(
            "track-bad-spec-from-environment",
            ["track"],
            2,
            "GRAPHCACHE_GRAPH",
            (("GRAPHCACHE_GRAPH", files["bad_spec"]),),
        ),
        Case(
            "track-postgres-down-with-a-password",
            [
                "track",
                "--graph",
                files["spec"],
                "--postgres",
                f"postgresql://postgres:{SECRET}@127.0.0.1:1/db",
            ],
            1,
            "--postgres",
        ),
        # loadtest
        Case("loadtest-negative-duration", ["loadtest", "--duration", "-1"], 2, "--duration"),
        Case("loadtest-no-writers", ["loadtest", "--writers", "0"], 2, "--writers"),
        Case("loadtest-latency-min-above-max", ["loadtest", "--latency", "0.5", "0.1"], 2, "--latency"),
        Case("loadtest-unknown-strategy", ["loadtest", "--strategy", "cas,bogus"], 2, "--strategy"),
        Case("loadtest-ring-of-one", ["loadtest", "--simulate-ring", "1"], 2, "--simulate-ring"),
        Case("loadtest-out-is-a-file", ["loadtest", "--out", files["history"]], 2, "--out"),
        Case("loadtest-unknown-flag", ["loadtest", "--writerz", "3"], 2, "--writerz"),
        Case("loadtest-postgres-without-redis", ["loadtest", "--postgres", POSTGRES_DSN], 2, "--redis"),
        Case(
            "loadtest-redis-down",
            ["loadtest", "--redis", DOWN_REDIS, "--postgres", POSTGRES_DSN],
            1,
            "--redis",
        ),
        Case(
            "loadtest-postgres-down-with-a-password",
            [
                "loadtest",
                "--redis",
                REDIS_URL,
                "--postgres",
                f"postgresql://postgres:{SECRET}@127.0.0.1:1/db",
            ],
            1,
            "--postgres",
        ),
        # check
        Case("check-missing-file", ["check", files["missing"]], 2, files["missing"]),
        Case("check-malformed-file", ["check", files["malformed"]], 2, f"{files['malformed']}:1"),
        Case("check-binary-file", ["check", files["binary"]], 2, files["binary"]),
        Case("check-directory", ["check", files["directory"]], 2, files["directory"]),
        Case("check-negative-examples", ["check", files["history"], "--examples", "-1"], 2, "--examples"),
        Case(
            "check-json-into-no-directory",
            ["check", files["history"], "--json", "/nonexistent/r.json"],
            2,
            "--json",
        ),
        # bench
        Case("bench-without-a-target", ["bench"], 2, "TARGET"),
        Case("bench-cache-negative-seconds", ["bench", "cache", "--seconds", "-1"], 2, "--seconds"),
        Case("bench-cache-bad-namespace", ["bench", "cache", "--namespace", "a b"], 2, "--namespace"),
        Case("bench-cache-redis-down", ["bench", "cache", "--redis", DOWN_REDIS], 1, "--redis"),
        Case("bench-store-zero-feed-rate", ["bench", "store", "--feed-rate", "0"], 2, "--feed-rate"),
        Case(
            "bench-store-less-than-one-commit",
            ["bench", "store", "--feed-rate", "0.5", "--feed-seconds", "1"],
            2,
            "--feed-rate",
        ),
        Case("bench-store-postgres-down", ["bench", "store", "--postgres", DOWN_POSTGRES], 1, "--postgres"),
        # no command at all
        Case("no-command", [], 2, "COMMAND"),
    ]


class Outcome(NamedTuple):
    status: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Input files for ``check``: a valid (empty) history, a malformed one, a binary one, a directory; for
    ``track`` and ``serve --graph``: a graph spec and one with a parent cycle."""
    where = tmp_path_factory.mktemp("inputs")
    (where / "history.jsonl").write_text("")
    (where / "malformed.jsonl").write_text('{"process": "w"}\n')
    (where / "binary.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (where / "directory").mkdir()
    spec = '[graph]\nroot = "orders"\n[tables.orders]\nkey = "id"\n'
    (where / "spec.toml").write_text(spec)
    (where / "bad_spec.toml").write_text(spec + '[tables.a]\nkey = "id"\nparent = "a"\nparent_key = "a_id"\n')
    names = ("history", "malformed", "binary", "directory")
    return {name: str(where / f"{name}.jsonl" if name != "directory" else where / name) for name in names} | {
        "missing": str(where / "missing.jsonl"),
        "spec": str(where / "spec.toml"),
        "bad_spec": str(where / "bad_spec.toml"),
    }


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """A port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _environment(extra: tuple[tuple[str, str], ...]) -> dict[str, str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("GRAPHCACHE_")}
    return clean | dict(extra)


@pytest.fixture(scope="module")
def outcomes(
    files: dict[str, str], taken_port: int, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Outcome]:
    """Every case of the table, run as concurrent ``python -m graphcache`` processes."""
    cwd = tmp_path_factory.mktemp("cwd")  # a run that wrongly started would write here, not in the checkout
    running = {
        case.name: subprocess.Popen(
            [sys.executable, "-m", "graphcache", *case.argv],
            cwd=cwd,
            env=_environment(case.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in cases(files, taken_port)
    }
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=60)
        results[name] = Outcome(process.returncode, stdout, stderr)
    assert list(cwd.iterdir()) == []
    return results


TABLE = cases(
    {
        "history": "H",
        "missing": "M",
        "malformed": "X",
        "binary": "B",
        "directory": "D",
        "spec": "S",
        "bad_spec": "Y",
    },
    taken_port=0,
)


def test_the_table_covers_every_subcommand() -> None:
    """At least 30 bad invocations, touching demo, serve, track, loadtest, check, bench cache and bench
    store."""
    assert len(TABLE) >= 30
    commands = {
        " ".join(case.argv[:2]) if case.argv[:1] == ["bench"] else case.argv[0] for case in TABLE if case.argv
    }
    assert commands >= {"demo", "serve", "track", "loadtest", "check", "bench cache", "bench store"}


@pytest.mark.parametrize("name", [case.name for case in TABLE])
def test_a_bad_invocation_is_one_line_and_an_exit_status(
    name: str, outcomes: dict[str, Outcome], files: dict[str, str], taken_port: int
) -> None:
    """Exit 2 (bad input) or 1 (runtime failure), exactly one line on stderr naming the flag, no traceback,
    no password."""
    case = next(c for c in cases(files, taken_port) if c.name == name)
    outcome = outcomes[name]
    lines = outcome.stderr.splitlines()
    assert outcome.status == case.status, outcome.stderr
    assert len(lines) == 1, outcome.stderr
    assert case.names in lines[0]
    assert "Traceback" not in outcome.stderr
    assert SECRET not in outcome.stderr + outcome.stdout


def test_every_option_of_every_subcommand_has_a_help_text() -> None:
    """--help describes each option; none is left blank."""
    blank = []
    for prog, parser in _parsers(_cli.build_parser()):
        for action in parser._actions:
            if action.option_strings and not action.help:
                blank.append(f"{prog} {action.option_strings[0]}")
    assert blank == []


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


@pytest.mark.parametrize(
    "command",
    [["demo"], ["serve"], ["track"], ["loadtest"], ["check"], ["bench", "cache"], ["bench", "store"]],
)
def test_help_exits_0_and_shows_no_password(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--help`` of each subcommand prints its options and exits 0; a password in the environment stays
    hidden."""
    monkeypatch.setenv("GRAPHCACHE_POSTGRES", f"postgresql://app:{SECRET}@db/app")
    with pytest.raises(SystemExit) as exited:
        _cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert "--" in out
    assert SECRET not in out


def test_a_failure_inside_a_task_group_is_its_own_one_line() -> None:
    """An exception group is reported by its most telling member, with the notes added on the way out,
    on one line, the password masked."""
    cause = CacheUnavailable(f"Error 111 connecting to redis://u:{SECRET}@h:1.\nConnection refused.")
    cause.add_note("could not remove the Redis keys gclt1:*")
    group = ExceptionGroup("unhandled errors in a TaskGroup", [cause])
    group.add_note("logs in ./loadtest-1")
    message, status = _cli.describe(group)
    assert status == 1
    assert message == (
        "Error 111 connecting to redis://u:***@h:1. Connection refused. "
        "(could not remove the Redis keys gclt1:*; logs in ./loadtest-1)"
    )


def test_an_unexpected_error_is_one_line_that_says_how_to_see_more() -> None:
    """A bug (an exception graphcache does not expect) still ends in one line, exit 1, naming its type."""
    message, status = _cli.describe(ZeroDivisionError("division by zero"))
    assert status == 1
    assert message.startswith("unexpected ZeroDivisionError: division by zero")
    assert "GRAPHCACHE_TRACEBACK=1" in message


@pytest.mark.parametrize(
    ("convert", "text"),
    [
        (_cli.seconds, "0"), (_cli.seconds, "-1"), (_cli.seconds, "nan"), (_cli.seconds, "inf"),
        (_cli.seconds_or_zero, "-0.1"), (_cli.count, "0"), (_cli.count, "1.5"), (_cli.count_or_zero, "-1"),
        (_cli.port, "65536"), (_cli.port, "-1"), (_cli.non_blank, " "), (_cli.log_level, "LOUD"),
        (_cli.redis_url, "redis://"), (_cli.redis_url, "unix://"), (_cli.redis_url, "redis://h/x"),
        (_cli.postgres_dsn, "mysql://h/db"), (_cli.postgres_dsn, "postgresql://h:port/db"),
        (_cli.namespace, "a:b"), (_cli.identifier, "1st"), (_cli.identifier, "x" * 64),
    ],
)  # fmt: skip
def test_an_option_type_refuses_a_bad_value_with_the_reason(convert: object, text: str) -> None:
    """Each shared option type turns a bad value into an argparse type error (argparse names the flag)."""
    assert callable(convert)
    with pytest.raises(argparse.ArgumentTypeError):
        convert(text)


@pytest.mark.parametrize(
    ("convert", "text", "value"),
    [
        (_cli.seconds, "0.5", 0.5), (_cli.seconds_or_zero, "0", 0.0), (_cli.count, "3", 3),
        (_cli.port, "0", 0), (_cli.log_level, "debug", "DEBUG"),
        (_cli.redis_url, "rediss://user:pw@cache.example:6380/2", "rediss://user:pw@cache.example:6380/2"),
        (_cli.redis_url, "unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
        (_cli.postgres_dsn, "postgresql://a@h1:5432,h2:5433/db", "postgresql://a@h1:5432,h2:5433/db"),
        (_cli.namespace, "gc.v2-test_1", "gc.v2-test_1"), (_cli.identifier, "gclt_1$", "gclt_1$"),
    ],
)  # fmt: skip
def test_an_option_type_accepts_a_good_value(convert: object, text: str, value: object) -> None:
    """Good values pass through (converted where the type converts)."""
    assert callable(convert)
    assert convert(text) == value


def test_redact_masks_passwords_in_urls_and_parameters() -> None:
    """User names and hosts stay readable; passwords in user:password@ and password= become ***."""
    text = f"redis://app:{SECRET}@h:1/0 and postgresql://db?user=a&password={SECRET}&x=1"
    assert _cli.redact(text) == "redis://app:***@h:1/0 and postgresql://db?user=a&password=***&x=1"


def test_graphcache_traceback_lets_an_unexpected_error_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """With GRAPHCACHE_TRACEBACK=1 an unexpected error keeps its traceback (for a bug report)."""

    def broken(args: argparse.Namespace) -> int:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("graphcache.harness._check_cli.run", broken)
    monkeypatch.setenv("GRAPHCACHE_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        _cli.main(["check", "x"])
    monkeypatch.delenv("GRAPHCACHE_TRACEBACK")
    assert _cli.main(["check", "x"]) == 1


def test_run_py_is_the_same_command_line(tmp_path: Path) -> None:
    """``python run.py`` from a checkout reports a bad flag the same way."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "run.py"), "loadtest", "--rounds", "0"],
        capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "graphcache loadtest: argument --rounds: must be 1 or more, got '0'\n"
