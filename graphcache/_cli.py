"""graphcache's command line: demo | serve | track | loadtest | check | bench (``python -m graphcache``).

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``.
This module wires them together and holds what they share: option types that check each flag as it is
parsed, and one rule for failures: one line on stderr and an exit status, never a traceback.

  0  success
  1  a runtime failure: a server unreachable or failing, a guarantee violated
  2  bad input: a flag, a combination of flags or an input file, found before any server is contacted

Option types raise ``argparse.ArgumentTypeError``, which argparse turns into "argument --flag: reason";
checks that need several flags raise `UsageError`. Messages never show a URL's password. ``env_option``
adds a flag whose default comes from a ``GRAPHCACHE_*`` environment variable (``serve``, ``track``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import SplitResult, urlsplit

from . import __version__
from .cache import CacheError
from .storage import GraphSpec, SpecError, StoreError

__all__ = (
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "CommandError",
    "UsageError",
    "build_parser",
    "choice",
    "count",
    "count_or_zero",
    "describe",
    "env_checked",
    "env_default",
    "env_option",
    "graph_spec",
    "identifier",
    "log_level",
    "main",
    "namespace",
    "new_directory",
    "non_blank",
    "number",
    "number_or_zero",
    "one_line",
    "optional_graph_spec",
    "port",
    "postgres_dsn",
    "redact",
    "redis_url",
    "seconds",
    "seconds_or_zero",
)

EXIT_FAILURE = 1
EXIT_USAGE = 2
TRACEBACK_VARIABLE = "GRAPHCACHE_TRACEBACK"
"""Set to 1 to let an unexpected error end the command with its traceback (for a bug report)."""

# name -> (module, one-line help, the extra that installs its optional dependencies)
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "demo": (
        "graphcache.harness._demo",
        "a naive re-cache vs graphcache side by side (embedded, no servers needed)",
        None,
    ),
    "serve": (
        "graphcache.sidecar._serve",
        "the sidecar: one node with Prometheus /metrics, /healthz and /readyz",
        "sidecar",
    ),
    "track": (
        "graphcache._track",
        "install or update the change-tracking triggers of a graph spec (your own tables)",
        None,
    ),
    "loadtest": (
        "graphcache.harness._loadtest",
        "one workload through each re-cache strategy, every read checked against G1-G3",
        "loadtest",
    ),
    "check": (
        "graphcache.harness._check_cli",
        "run the consistency checker on a recorded history (JSON lines)",
        None,
    ),
    "bench": (
        "graphcache.harness._bench",
        "micro-benchmarks against raw redis-py / asyncpg in the same run",
        None,
    ),
}

_OPTIONAL_MODULES = frozenset({"prometheus_client", "tqdm", "matplotlib"})
"""Modules an extra installs; a command that cannot import one says which extra to install."""


# ---- failures -------------------------------------------------------------------------------------


class CommandError(Exception):
    """A failure the command line reports as one line on stderr and an exit status (1 unless given)."""

    def __init__(self, message: str, *, status: int = EXIT_FAILURE, prog: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.prog = prog


class UsageError(CommandError):
    """Bad input (a flag, a combination of flags, an input file): exit status 2."""

    def __init__(self, message: str, *, prog: str | None = None) -> None:
        super().__init__(message, status=EXIT_USAGE, prog=prog)


_PASSWORD_IN_URL = re.compile(r"(//[^:@/\s]*):[^@/\s]*@")
_PASSWORD_PARAMETER = re.compile(r"(?i)(password=)[^&\s]*")


def redact(text: str) -> str:
    """``text`` with every URL password (``user:***@``) and ``password=`` parameter masked."""
    return _PASSWORD_PARAMETER.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1:***@", text))


def one_line(text: str) -> str:
    """``text`` on a single line (a server's message may span several), passwords masked."""
    return " ".join(redact(text).split())


def _leaves(
    exc: BaseException, notes: tuple[str, ...] = ()
) -> Iterator[tuple[BaseException, tuple[str, ...]]]:
    """Each exception of a (nested) group, with the notes added to it, then to the groups around it."""
    notes = (*getattr(exc, "__notes__", ()), *notes)
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner, notes)
    else:
        yield exc, notes


def describe(exc: BaseException) -> tuple[str, int]:
    """One line and an exit status for a failure (an exception group: its most telling member)."""
    leaves = list(_leaves(exc))
    leaf, notes = next(
        (found for found in leaves if isinstance(found[0], CommandError)),
        next((found for found in leaves if isinstance(found[0], _EXPECTED)), leaves[0]),
    )
    if isinstance(leaf, CommandError):
        message, status = str(leaf), leaf.status
    elif isinstance(leaf, _EXPECTED):
        message, status = str(leaf) or type(leaf).__name__, EXIT_FAILURE
    else:
        message = f"unexpected {type(leaf).__name__}: {leaf} ({TRACEBACK_VARIABLE}=1 shows where)"
        status = EXIT_FAILURE
    if notes:
        message = f"{message} ({'; '.join(notes)})"
    return one_line(message), status


_EXPECTED = (CacheError, StoreError, OSError, TimeoutError)
"""Failures of the world rather than of graphcache: servers, the network, files, time."""


def _say(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: {one_line(message)}\n")
    sys.stderr.flush()


# ---- option types ---------------------------------------------------------------------------------
# Each takes the flag's text (from the command line or an environment variable) and returns the value,
# or raises ArgumentTypeError with the reason; argparse adds "argument --flag:".


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number, got {text!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a whole number, got {text!r}") from None


def _non_negative(text: str, *, zero: bool, what: str) -> float:
    """A finite number above 0 (or 0 too, with ``zero``); ``what`` names it in the message."""
    value = _float(text)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        lowest = "0 or a positive" if zero else "a positive"
        raise argparse.ArgumentTypeError(f"must be {lowest} {what}, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    return _non_negative(text, zero=False, what="number of seconds")


def seconds_or_zero(text: str) -> float:
    """A finite number of seconds, 0 or more."""
    return _non_negative(text, zero=True, what="number of seconds")


def number(text: str) -> float:
    """A positive, finite number."""
    return _non_negative(text, zero=False, what="number")


def number_or_zero(text: str) -> float:
    """A finite number, 0 or more."""
    return _non_negative(text, zero=True, what="number")


def count(text: str) -> int:
    """A whole number, 1 or more."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text!r}")
    return value


def count_or_zero(text: str) -> int:
    """A whole number, 0 or more."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: the system picks a free one)."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {text!r}")
    return value


def non_blank(text: str) -> str:
    """Any text with something else than white space in it."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]+")  # what graphcache.cache accepts as a key namespace
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")  # what graphcache.storage accepts as a schema


def namespace(text: str) -> str:
    """A Redis key namespace: letters, digits, ``_``, ``.`` and ``-``."""
    if not _NAMESPACE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be letters, digits, '_', '.' or '-', got {text!r}")
    return text


def identifier(text: str) -> str:
    """A plain SQL identifier (a PostgreSQL schema name): ``[A-Za-z_][A-Za-z0-9_$]*``, at most 63."""
    if not _IDENTIFIER.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"must be a plain SQL identifier ([A-Za-z_][A-Za-z0-9_$]*, at most 63 characters), got {text!r}"
        )
    return text


def _port_of(parts: SplitResult) -> None:
    try:
        parts.port  # noqa: B018  (urlsplit checks the port lazily, on this access)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad port in {redact(parts.geturl())!r}: {exc}") from None


def redis_url(text: str) -> str:
    """A Redis URL: ``redis://[user:password@]host[:port][/db]``, ``rediss://...`` or ``unix://path``."""
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError(f"want a redis://, rediss:// or unix:// URL, got {redact(text)!r}")
    _port_of(parts)
    if parts.scheme == "unix":
        if not parts.path:
            raise argparse.ArgumentTypeError(f"a unix:// URL needs a socket path, got {redact(text)!r}")
        return text
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"a Redis URL needs a host, got {redact(text)!r}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise argparse.ArgumentTypeError(f"the database of a Redis URL is a number, got {redact(text)!r}")
    return text


def postgres_dsn(text: str) -> str:
    """A PostgreSQL URL: ``postgresql://[user[:password]@][host][:port][/database][?param=value]``."""
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres"):
        raise argparse.ArgumentTypeError(f"want a postgresql:// URL, got {redact(text)!r}")
    if "," not in parts.netloc:  # several hosts (host1:5432,host2:5432) are libpq's business
        _port_of(parts)
    return text


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level(text: str) -> str:
    """A logging level name, any case: DEBUG, INFO, WARNING or ERROR."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"want one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.upper()


def choice(*names: str) -> Callable[[str], str]:
    """One of ``names``. Unlike argparse's ``choices``, it also checks a default that came from the
    environment (argparse converts a string default with ``type`` but never checks it against ``choices``)."""

    def convert(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"want one of {', '.join(names)}, got {text!r}")
        return text

    convert.__name__ = "choice"
    return convert


def new_directory(text: str) -> Path:
    """A directory to write into: absent (it is created) or an existing directory, not a file."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return path


def graph_spec(text: str) -> GraphSpec:
    """A graph spec file (TOML), read and checked as far as the file alone can show
    (``GraphSpec.from_toml``); the catalog is checked once connected."""
    if not text:
        raise argparse.ArgumentTypeError("is required: the graph spec file (TOML)")
    try:
        return GraphSpec.from_toml(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def optional_graph_spec(text: str) -> GraphSpec | None:
    """A graph spec file like `graph_spec`, or nothing (empty text)."""
    return graph_spec(text) if text else None


# ---- options from the environment -------------------------------------------------------------------


class _FromEnvironment(str):
    """A flag's default taken from its GRAPHCACHE_* variable, so a bad value names the variable too."""

    variable: str


def env_default(env: str, default: str) -> str:
    """The value of ``GRAPHCACHE_<env>`` if it is set, else ``default``."""
    name = f"GRAPHCACHE_{env}"
    if name not in os.environ:
        return default
    value = _FromEnvironment(os.environ[name])
    value.variable = name
    return value


def env_checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert``, whose complaint about a value from the environment also names the variable."""

    def check(text: str) -> Any:
        try:
            return convert(text)
        except argparse.ArgumentTypeError as exc:
            if isinstance(text, _FromEnvironment):
                raise argparse.ArgumentTypeError(f"{exc} (from {text.variable})") from None
            raise

    check.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in some messages
    return check


def env_option(
    parser: argparse.ArgumentParser,
    flag: str | tuple[str, ...],
    env: str,
    default: str,
    help_text: str,
    *,
    convert: Callable[[str], Any],
    secret: bool = False,
    metavar: str | None = None,
    shown: str | None = None,
) -> None:
    """A flag whose default comes from GRAPHCACHE_<env>; the value (either way) is checked by ``convert``.
    ``shown`` replaces the default in the help text (e.g. "none" for an empty default)."""
    value = env_default(env, default)
    if shown is None:
        shown = redact(value).replace("%", "%%") if secret else "%(default)s"  # never print a password
    flags = (flag,) if isinstance(flag, str) else flag
    parser.add_argument(
        *flags,
        default=value,  # a string: argparse converts (and so checks) it with ``type`` like a typed flag
        type=env_checked(convert),
        metavar=metavar,
        help=f"{help_text} (default: {shown}) [env GRAPHCACHE_{env}]",
    )


# ---- the parser and main ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, except that an error is one line (no usage block), raised so ``main`` reports it."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, prog=self.prog)


def _missing_extra(sub: Any, name: str, help_text: str, extra: str) -> None:
    """A subcommand whose optional dependencies are not installed: it says how to install them."""
    cmd = sub.add_parser(name, help=f"{help_text} (needs: pip install 'graphcache-pg[{extra}]')")
    cmd.add_argument("rest", nargs=argparse.REMAINDER)
    message = f"needs the {extra!r} extra: pip install 'graphcache-pg[{extra}]'"

    def refuse(args: argparse.Namespace) -> int:
        raise UsageError(message)

    cmd.set_defaults(_run=refuse, _prog=cmd.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="graphcache",
        description="graphcache: cached object graphs that stay correct under concurrency and faults.",
        epilog="Exit status: 0 success, 1 a runtime failure (a server unreachable or failing, a guarantee "
        "violated), 2 bad input. Errors are one line on stderr; "
        f"{TRACEBACK_VARIABLE}=1 adds the traceback of an unexpected one.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text, extra) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if extra is None or exc.name not in _OPTIONAL_MODULES:
                raise
            _missing_extra(sub, name, help_text, extra)
            continue
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run, _prog=cmd.prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and exit status 1 or 2."""
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # said here rather than by argparse, so the message names the subcommand
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}", prog=args._prog)
    except CommandError as exc:
        _say(exc.prog or "graphcache", str(exc))
        return exc.status
    prog: str = args._prog
    try:
        code: int = args._run(args)
    except KeyboardInterrupt:
        _say(prog, "interrupted")
        return 130
    except Exception as exc:  # the command line's one seam: whatever failed is reported as one line
        if os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        message, status = describe(exc)
        _say(getattr(exc, "prog", None) or prog, message)
        return status
    return code
