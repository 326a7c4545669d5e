"""graphcache installs as one import package, ``graphcache``, and its parts keep to their own seams."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import graphcache

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("actors", "cache", "harness", "sidecar", "storage")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``python -m build`` makes of this checkout (in an isolated build environment)."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = out.glob("*.whl")
    return built


def test_the_wheel_installs_nothing_but_graphcache(wheel: Path) -> None:
    """Every file of the wheel is under graphcache/ or its dist-info: no actors, cache, storage or run."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"graphcache"}
    for part in PARTS:
        assert f"graphcache/{part}/__init__.py" in names
    assert "graphcache/cache/py.typed" in names or "graphcache/py.typed" in names
    assert "graphcache/__main__.py" in names


def test_the_wheel_names_its_distribution_license_and_command(wheel: Path) -> None:
    """The metadata says graphcache-pg, MIT (SPDX), and the graphcache console script."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        entry_points = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(metadata).decode()
        scripts = archive.read(entry_points).decode()
    assert "Name: graphcache-pg" in text
    assert "License-Expression: MIT" in text
    assert "graphcache = graphcache._cli:main" in scripts


def test_an_app_with_its_own_cache_and_storage_modules_imports_graphcache(tmp_path: Path) -> None:
    """A service's own cache.py and storage/ package do not shadow graphcache's parts."""
    (tmp_path / "cache.py").write_text("raise ImportError('the application cache module was imported')\n")
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "__init__.py").write_text("raise ImportError('the application storage')\n")
    code = (
        "import graphcache.cache, graphcache.storage, graphcache.actors, graphcache.harness\n"
        "print(graphcache.cache.RedisCache.__module__, graphcache.storage.PostgresStore.__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["graphcache.cache._redis", "graphcache.storage._postgres"]


def test_python_m_graphcache_and_the_command_print_the_version() -> None:
    """``python -m graphcache --version`` prints the installed version."""
    done = subprocess.run(
        [sys.executable, "-m", "graphcache", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"graphcache {graphcache.__version__}"
    assert graphcache.__version__ != "0+unknown"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, relative ones resolved against its package."""
    package = path.parent.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or ""))
            elif node.level == 1:
                found.append((node.lineno, f"graphcache.{package}.{node.module or ''}"))
            else:
                found.append((node.lineno, f"graphcache.{node.module or ''}"))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


@pytest.mark.parametrize("part", PARTS)
def test_no_part_imports_another_parts_private_module(part: str) -> None:
    """A part uses another part only through its __init__ (no graphcache.<other>._private imports)."""
    offenders = []
    for path in sorted((ROOT / part).glob("*.py")):
        for line, module in _imports(path):
            pieces = module.split(".")
            if (
                len(pieces) >= 3
                and pieces[0] == "graphcache"
                and pieces[1] != part
                and pieces[2].startswith("_")
            ):
                offenders.append(f"{part}/{path.name}:{line} imports {module}")
    assert offenders == []


@pytest.mark.parametrize(
    ("part", "allowed"),
    [
        ("cache", set()),
        ("storage", set()),
        ("actors", {"cache", "storage"}),
        ("sidecar", {"actors", "cache", "storage"}),
        ("harness", {"actors", "cache", "storage", "sidecar"}),
    ],
)
def test_dependencies_point_one_way(part: str, allowed: set[str]) -> None:
    """sidecar -> actors -> cache, storage; harness -> all; cache and storage know nothing of the others."""
    used = set()
    for path in (ROOT / part).glob("*.py"):
        for _, module in _imports(path):
            pieces = module.split(".")
            if len(pieces) >= 2 and pieces[0] == "graphcache" and pieces[1] in PARTS and pieces[1] != part:
                used.add(pieces[1])
    assert used <= allowed
