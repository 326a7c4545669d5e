"""Locating server binaries; a missing one fails the run with the package to install."""

from __future__ import annotations

import glob
import shutil

import pytest

REDIS_PACKAGE = "redis-server (Debian: apt-get install redis-server)"
POSTGRES_PACKAGE = "postgresql (Debian: apt-get install postgresql)"


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(f"redis-server not found on PATH: install {REDIS_PACKAGE}", pytrace=False)
    return path


def postgres_bin_dir() -> str:
    """Directory holding initdb/pg_ctl/postgres."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if shutil.which("initdb", path=candidate) and shutil.which("postgres", path=candidate):
            return candidate
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("postgres"):
        return initdb.rsplit("/", 1)[0]
    pytest.fail(
        f"PostgreSQL server binaries (initdb, postgres) not found: install {POSTGRES_PACKAGE}",
        pytrace=False,
    )


def require_binaries() -> None:
    missing = []
    if shutil.which("redis-server") is None:
        missing.append(REDIS_PACKAGE)
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and shutil.which("initdb") is None:
        missing.append(POSTGRES_PACKAGE)
    if missing:
        raise pytest.UsageError("server binaries missing, install: " + "; ".join(missing))
